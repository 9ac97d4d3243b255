//! Schemathesis (property-based API testing from PyPI) against `/openapi.yaml` of a real api:
//! no 5xx, and no response that contradicts the description (status codes, headers, content
//! types, bodies). `scripts/test.sh` installs it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{QueueSettings, TestEnv};

/// One schemathesis run against `url` with `headers`, limited to the operations `include`
/// matches (a path regex) when given.
async fn fuzz(url: String, headers: Vec<String>, include: Option<&'static str>) {
    // `positive_data_acceptance` is left out on purpose: schemathesis reuses one generated
    // Idempotency-Key with different bodies, and refusing that (422) is the point of the key.
    let out = tokio::task::spawn_blocking(move || {
        let mut args: Vec<String> = ["run", &url, "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "10", "--no-color"].map(String::from).to_vec();
        for h in headers {
            args.extend(["--header".to_string(), h]);
        }
        if let Some(re) = include {
            args.extend(["--include-path-regex".to_string(), re.to_string()]);
        }
        Command::new(std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into()))
            .args(&args)
            .output()
            .expect("schemathesis is installed (scripts/test.sh installs it)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis ({include:?}) found problems:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("passed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_contradicting_the_description() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let user = api.user("fuzzer").await;
    let (schedule, _) = api.concert(5, 100).await;
    // An ACTIVE queue token, so that holds get past the queue check to the seat, the seat limit
    // and the Idempotency-Key (issue 12's paths), not only to 403.
    let queue_token = api.active_token(&user, &schedule).await;
    let url = api.url("/openapi.yaml");
    // As a user: every operation (the admin ones answer 401/403 with this token).
    fuzz(url.clone(), vec![format!("Authorization: Bearer {}", user.token), format!("X-Queue-Token: {queue_token}")], None).await;
    // As an operator: the admin operations, with the admin token (concerts, queue admission).
    fuzz(url, vec![format!("Authorization: Bearer {}", common::ADMIN)], Some("^/v1/admin/")).await;
    api.stop().await;
}
