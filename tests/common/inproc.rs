//! The daemons run in the test's own process, on the test's isolated resources: each returns a
//! [`Task`] that [`stop`] ends the way SIGTERM would (cancel, then wait for a clean exit).
//! Settings start from what the tests need (short polls, a log channel, a file export) and a
//! test changes only the field it is about.

use std::path::PathBuf;
use std::time::Duration;

use booking::app::{self, ExpirerMode, ExpirerSettings, WorkerSettings};
use booking::export::Sink;
use booking::scheduler::SchedulerConfig;
use booking::worker::Channel;
use tokio_util::sync::CancellationToken;

use super::TestEnv;

pub type Task = (CancellationToken, tokio::task::JoinHandle<()>);

/// The file the worker exports to, one per test.
pub fn export_path(env: &TestEnv) -> PathBuf {
    std::env::temp_dir().join(format!("export-{}.jsonl", env.prefix))
}

pub fn worker_settings(env: &TestEnv) -> WorkerSettings {
    WorkerSettings {
        channel: Channel::Log,
        sink: Sink::File(export_path(env)),
        delivery_poll: Duration::from_millis(200),
        delivery_batch: 100,
        delivery_max_backoff: Duration::from_millis(500),
        ranking_reconcile: booking::worker::ReconcileEvery { window: Duration::from_secs(1), full: Duration::from_secs(3600) },
        ranking_retention: Default::default(),
        retention: Default::default(),
    }
}

pub fn scheduler_config() -> SchedulerConfig {
    SchedulerConfig { batch_size: 100, lease: Duration::from_secs(5), poll_interval: Duration::from_millis(200), rearm_interval: Duration::from_secs(3600) }
}

pub fn expirer_settings() -> ExpirerSettings {
    ExpirerSettings {
        mode: ExpirerMode::After,
        sweep_interval: Duration::from_secs(3600),
        sweep_grace: Duration::from_secs(3600),
        sweep_batch: 100,
        legacy_interval: Duration::from_secs(10),
        outbox_batch: 100,
        outbox_poll: Duration::from_millis(200),
    }
}

async fn ops_listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A worker whose consumer groups are named `<group_prefix>notifications` and so on.
pub async fn worker(env: &TestEnv, group_prefix: &str, settings: WorkerSettings) -> Task {
    let t = CancellationToken::new();
    let (res, gp, sd, ops) = (env.res.clone(), group_prefix.to_string(), t.clone(), ops_listener().await);
    (t, tokio::spawn(async move { app::run_worker(res, settings, &gp, ops, booking::telemetry::install_metrics(), sd).await.unwrap() }))
}

/// The consumer group of the test's delay schedulers (what `bookingctl --scheduler-group` names).
pub fn scheduler_group(env: &TestEnv) -> String {
    format!("{}scheduler", env.prefix)
}

/// The consumer group of the test's expirers.
pub fn expirer_group(env: &TestEnv) -> String {
    format!("{}expirer", env.prefix)
}

/// A delay scheduler in the test's scheduler group (two calls make two members).
pub async fn scheduler(env: &TestEnv, cfg: SchedulerConfig) -> Task {
    let t = CancellationToken::new();
    let (res, g, sd, ops) = (env.res.clone(), scheduler_group(env), t.clone(), ops_listener().await);
    (t, tokio::spawn(async move { app::run_scheduler(res, cfg, &g, ops, booking::telemetry::install_metrics(), sd).await.unwrap() }))
}

/// An expirer in the test's expirer group (two calls make two members).
pub async fn expirer(env: &TestEnv, settings: ExpirerSettings) -> Task {
    let t = CancellationToken::new();
    let (res, g, sd, ops) = (env.res.clone(), expirer_group(env), t.clone(), ops_listener().await);
    (t, tokio::spawn(async move { app::run_expirer(res, settings, &g, ops, booking::telemetry::install_metrics(), sd).await.unwrap() }))
}

/// Ends each task as SIGTERM would and waits for it.
pub async fn stop(tasks: Vec<Task>) {
    for (t, h) in tasks {
        t.cancel();
        let _ = h.await;
    }
}
