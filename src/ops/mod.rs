//! Operations: what `bookingctl` shows and does during a sale (the dead letters, the pending
//! expiries, the queue, the outbox), in the same nouns the code uses.
//!
//! Invariants this module keeps:
//! - It names Redis keys and Kafka topics only through [`Keys`] and [`Topics`], and changes the
//!   scheduler's sets only through [`crate::scheduler::Scheduler`], so it follows whatever layout
//!   the daemons use (hash tags for Redis Cluster included).
//! - Every command that changes something records who ran it and what changed ([`Ops::audit`]:
//!   a log line and a row of `ops_audit`) and is safe to repeat: re-arming is `ZADD NX`, a dead
//!   letter is replayed once unless forced (`dlq_replays`), the queue settings are absolute.
//! - Reading never needs every dependency: `status` reports each one that is down and goes on.

pub mod dlq;
pub mod outbox;
pub mod queue;
pub mod scheduler;
pub mod status;
mod table;

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use serde::Serialize;
use sqlx::PgPool;

pub use table::Table;

use crate::kafka::Topics;
use crate::keys::Keys;
use crate::redis_conn::RedisConn;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis is unreachable: {0}")]
    RedisDown(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error("admin API: {0}")]
    Api(String),
    #[error("{0}")]
    Usage(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("refusing to change anything: standard input is not a terminal and --yes was not given")]
    NeedsYes,
    #[error("nothing changed: not confirmed")]
    Declined,
}

/// The consumer groups of the daemons (their `--group` flags), whose lag `status` reports.
#[derive(Clone, Debug)]
pub struct Groups {
    /// The delay scheduler's group.
    pub scheduler: String,
    /// The expirer's group.
    pub expirer: String,
    /// The worker's group prefix (`<prefix>notifications`, `<prefix>payments`).
    pub worker_prefix: String,
}

impl Groups {
    /// Each product topic with the groups that consume it, in the order of the design document.
    pub fn consumers(&self, t: &Topics) -> Vec<(String, Vec<String>)> {
        let w = &self.worker_prefix;
        vec![
            (t.reservation_created.clone(), vec![self.scheduler.clone()]),
            (t.reservation_expiration.clone(), vec![self.expirer.clone()]),
            (t.reservation_cancelled.clone(), vec![self.scheduler.clone()]),
            (t.payment_completed.clone(), vec![self.scheduler.clone(), format!("{w}payments")]),
            (t.payment_refunded.clone(), vec![format!("{w}payments")]),
            (t.notification_request.clone(), vec![format!("{w}notifications")]),
        ]
    }
}

/// Everything an operation may need. PostgreSQL is a lazy pool and Redis optional, so a command
/// that does not need a dependency still runs while that dependency is down.
#[derive(Clone)]
pub struct Ops {
    pub pool: PgPool,
    pub redis: Result<RedisConn, String>,
    pub producer: FutureProducer,
    pub brokers: String,
    pub keys: Keys,
    pub topics: Topics,
    pub groups: Groups,
    /// The delay scheduler's `--lease`: an in-flight member's score is its claim time plus this.
    pub lease: Duration,
    /// Who runs the command (`$USER@host`), written beside every change.
    pub actor: String,
    /// The api's admin routes, for the queue commands.
    pub api: queue::AdminApi,
}

impl Ops {
    /// The Redis connection, or why there is none.
    pub fn redis(&self) -> Result<RedisConn, OpsError> {
        self.redis.clone().map_err(OpsError::RedisDown)
    }

    /// Records a change: an `info` log line naming the actor, and a row of `ops_audit`. A failed
    /// insert (PostgreSQL down while changing Redis) is logged and does not undo the change.
    pub async fn audit(&self, command: &str, detail: serde_json::Value) {
        tracing::info!(actor = %self.actor, command, %detail, "bookingctl changed something");
        let r = sqlx::query("INSERT INTO ops_audit (actor, command, detail) VALUES ($1, $2, $3)")
            .bind(&self.actor)
            .bind(command)
            .bind(&detail)
            .execute(&self.pool)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, command, "could not write the audit row (the change was made)");
        }
    }
}

/// `$USER@host` of whoever runs this process.
pub fn actor() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host}")
}

/// Asks before a change. `--yes` skips the question; without it, a terminal is asked and
/// anything else (a script, a pipe) is refused, so nothing changes by accident.
pub fn confirm(question: &str, yes: bool) -> Result<(), OpsError> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(OpsError::NeedsYes);
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(|e| OpsError::Usage(e.to_string()))?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(OpsError::Declined),
    }
}

/// A command's result: JSON with `--json`, a table otherwise.
pub trait Report: Serialize {
    /// The human-readable form.
    fn table(&self) -> String;
}

/// A progress bar on stderr for `n` steps (hidden when stderr is not a terminal); a spinner
/// when the number of steps is not known.
pub fn progress(n: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(n);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Formats a time for tables (UTC, to the millisecond).
pub(crate) fn fmt_time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

/// Formats an optional value for tables.
pub(crate) fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
