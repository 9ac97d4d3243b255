//! Schemathesis (property-based API testing from PyPI) against `/openapi.yaml` of a real api:
//! no 5xx, and no response that contradicts the description (status codes, headers, content
//! types, bodies). `scripts/test.sh` installs it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{QueueSettings, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_contradicting_the_description() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let user = api.user("fuzzer").await;
    api.concert(5, 100).await;
    let url = api.url("/openapi.yaml");
    let token = format!("Authorization: Bearer {}", user.token);
    // `positive_data_acceptance` is left out on purpose: schemathesis reuses one generated
    // Idempotency-Key with different bodies, and refusing that (422) is the point of the key.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into()))
            .args(["run", &url, "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "10", "--header", &token, "--no-color"])
            .output()
            .expect("schemathesis is installed (scripts/test.sh installs it)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("passed"), "{stdout}");
    api.stop().await;
}
