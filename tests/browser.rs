//! The sale page in a real browser (issue 13): Debian's Chromium driven by playwright-core
//! (`tests/browser/*.mjs`, run with node), against a stack of its own: the api, the delay
//! scheduler, the expirer and the worker, on this test's database, key prefix and topics, with
//! a short hold so the expiry happens within the test. `scripts/test.sh` installs Chromium
//! (apt) and playwright-core (npm, into `tests/browser/node_modules`).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use booking::app::{ExpirerSettings, WorkerSettings};
use booking::scheduler::SchedulerConfig;
use common::inproc::{self, Task};
use common::{QueueSettings, TestEnv, ADMIN};
use serde_json::json;

/// The delay scheduler, the expirer and the worker, in this process, on `env`.
async fn daemons(env: &TestEnv) -> Vec<Task> {
    let expirer = ExpirerSettings { sweep_interval: Duration::from_secs(5), sweep_grace: Duration::from_secs(5), ..inproc::expirer_settings() };
    let worker = WorkerSettings { ranking_reconcile: booking::worker::ReconcileEvery { window: Duration::from_secs(60), full: Duration::from_secs(3600) }, ..inproc::worker_settings(env) };
    vec![
        inproc::scheduler(env, SchedulerConfig { poll_interval: Duration::from_secs(1), ..inproc::scheduler_config() }).await,
        inproc::expirer(env, expirer).await,
        inproc::worker(env, &format!("{}w-", env.prefix), worker).await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_watch_a_hold_expire_and_the_seat_go_to_the_other_visitor_without_reloading() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in {}: run the tests through scripts/test.sh",
        dir.display()
    );
    let env = TestEnv::new().await;
    // Long enough for a person (here: a browser under load) to see the hold; short enough to wait.
    let api = env.api(Duration::from_secs(6), QueueSettings::default()).await;
    let tasks = daemons(&env).await;
    let body = json!({"title": "Browser test concert", "schedules": [{"startsAt": "2030-01-01T19:00:00Z", "bookingOpensAt": "2020-01-01T00:00:00Z", "seatCount": 20, "price": 50000}]});
    let r = api.http.post(api.url("/v1/admin/concerts")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("browser-{}", env.prefix.trim_end_matches('.')));
    let (base, shots_dir, script_dir) = (api.base.clone(), shots.clone(), dir.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("seat_expiry.mjs")
            .current_dir(&script_dir)
            .env("BASE_URL", base)
            .env("SCREENSHOT_DIR", shots_dir)
            .env("STEP_TIMEOUT_MS", "30000")
            .output()
            .expect("node is installed (scripts/test.sh installs it)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser scenario failed (screenshots in {}):\n{stdout}\n{stderr}", shots.display());
    assert!(stdout.contains("scenario passed"), "{stdout}");

    // What the pages showed is what the database holds.
    let (sold_to, expired): (String, i64) = sqlx::query_as(
        "SELECT (SELECT u.name FROM reservations r JOIN users u ON u.id = r.user_id JOIN seats s ON s.id = r.seat_id
                 WHERE s.seat_no = 1 AND r.status = 'CONFIRMED'),
                (SELECT count(*) FROM reservations WHERE status = 'EXPIRED')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((sold_to.as_str(), expired), ("Bob", 1));
    for (t, h) in tasks {
        t.cancel();
        let _ = h.await;
    }
    api.stop().await;
}
