//! The README's "Try it" walkthrough, run as written (bash, curl, jq) against the four daemons of
//! an isolated world with a 2 s hold: from creating a user to the RESERVATION_EXPIRED notification.

mod common;

use std::process::Stdio;
use std::time::Duration;

use booking::app::{self, ExpirerMode, ExpirerSettings, WorkerSettings};
use booking::scheduler::SchedulerConfig;
use common::{QueueSettings, TestEnv};
use tokio_util::sync::CancellationToken;

/// The first ```sh block after the "## Try it" heading.
fn try_it_block() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n## Try it\n").nth(1).expect("README has a Try it section");
    let section = section.split("\n## ").next().unwrap();
    let block = section.split("```sh\n").nth(1).expect("Try it has a ```sh block");
    block.split("\n```").next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_try_it_walkthrough_ends_with_the_reservation_expired_notification() {
    let block = try_it_block();
    assert!(block.contains("curl") && block.contains("RESERVATION_EXPIRED"), "the block is the walkthrough:\n{block}");
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(2), QueueSettings::default()).await;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let listener = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    {
        let (res, group, sd, l) = (env.res.clone(), format!("{}scheduler", env.prefix), stop.clone(), listener().await);
        let cfg = SchedulerConfig { batch_size: 100, lease: Duration::from_secs(5), poll_interval: Duration::from_secs(1), rearm_interval: Duration::from_secs(3600) };
        tasks.push(tokio::spawn(async move { app::run_scheduler(res, cfg, &group, l, booking::telemetry::install_metrics(), sd).await.unwrap() }));
    }
    {
        let (res, group, sd, l) = (env.res.clone(), format!("{}expirer", env.prefix), stop.clone(), listener().await);
        // The sweeper stays out of the way: the expiry must come through the pipeline.
        let s = ExpirerSettings {
            mode: ExpirerMode::After,
            sweep_interval: Duration::from_secs(3600),
            sweep_grace: Duration::from_secs(3600),
            sweep_batch: 1000,
            legacy_interval: Duration::from_secs(1),
            outbox_batch: 500,
            outbox_poll: Duration::from_millis(200),
        };
        tasks.push(tokio::spawn(async move { app::run_expirer(res, s, &group, l, booking::telemetry::install_metrics(), sd).await.unwrap() }));
    }
    {
        let (res, group, sd, l) = (env.res.clone(), format!("{}worker-", env.prefix), stop.clone(), listener().await);
        let s = WorkerSettings {
            ranking_reconcile: booking::worker::ReconcileEvery { window: Duration::from_secs(10), full: Duration::from_secs(3600) },
            ..common::inproc::worker_settings(&env)
        };
        tasks.push(tokio::spawn(async move { app::run_worker(res, s, &group, l, booking::telemetry::install_metrics(), sd).await.unwrap() }));
    }

    let child = tokio::process::Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &block])
        .env("API", &api.base)
        .env("ADMIN_TOKEN", common::ADMIN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs");
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await.expect("the walkthrough finishes within 2 minutes").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the walkthrough failed ({}):\n{stdout}\n{stderr}", out.status);

    // What it printed last is the notification of the hold it made, and PostgreSQL agrees.
    let (id, status): (uuid::Uuid, String) = sqlx::query_as("SELECT id, status FROM reservations").fetch_one(&env.pool).await.unwrap();
    assert_eq!(status, "EXPIRED");
    let tail = stdout.rsplit("not paying").next().unwrap();
    let note: serde_json::Value = serde_json::from_str(tail.trim()).unwrap_or_else(|e| panic!("the last output is the notification ({e}):\n{tail}"));
    assert_eq!(note["type"], "RESERVATION_EXPIRED");
    assert_eq!(note["data"]["reservationId"], id.to_string());

    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    api.stop().await;
}
