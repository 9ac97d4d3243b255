//! `bookingctl outbox …`: what waits in the transactional outbox for Kafka, and the rows the relay
//! set aside because Kafka refused them for good (`set_aside_at`, `last_error`: see `outbox.rs`
//! and migration 0050).
//!
//! `outbox retry` clears `set_aside_at` and gives the row a new id: it goes back in line at the
//! end (the relay publishes it like any other, or sets it aside again with Kafka's new answer).
//! Back in its old place it would sit below the relay's floor (`floor`), where the relay looks
//! only now and then. Its event id, and so every consumer's de-duplication, is unchanged.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{fmt_time, Ops, OpsError, Report, Table};

/// `outbox status`: the backlog and its age, and how many rows are set aside.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxStatus {
    /// Rows waiting for Kafka (set-aside rows not counted).
    pub backlog: i64,
    /// Age of the oldest of them, in seconds (0 when nothing waits).
    pub oldest_age_seconds: f64,
    /// Rows the relay set aside (see `outbox stuck`).
    pub set_aside: i64,
}

impl Report for OutboxStatus {
    fn table(&self) -> String {
        let mut t = Table::new(&["backlog", "oldest age", "set aside"]);
        t.row(&[self.backlog.to_string(), format!("{:.1}s", self.oldest_age_seconds), self.set_aside.to_string()]);
        t.to_string()
    }
}

/// The backlog, the age of its oldest row and the set-aside count (the outbox holds only what
/// is unsent or set aside, so each stays short).
pub async fn status(ops: &Ops) -> Result<OutboxStatus, OpsError> {
    let (backlog, age): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM outbox
         WHERE set_aside_at IS NULL",
    )
    .fetch_one(&ops.pool)
    .await?;
    let set_aside: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE set_aside_at IS NOT NULL")
        .fetch_one(&ops.pool)
        .await?;
    Ok(OutboxStatus { backlog, oldest_age_seconds: age.unwrap_or(0.0).max(0.0), set_aside })
}

/// One set-aside row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct SetAside {
    pub id: i64,
    pub topic: String,
    #[sqlx(rename = "message_key")]
    pub key: String,
    pub event_id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
    pub set_aside_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// `outbox stuck`.
#[derive(Debug, Clone, Serialize)]
pub struct Stuck(pub Vec<SetAside>);

impl Report for Stuck {
    fn table(&self) -> String {
        let mut t = Table::new(&["id", "set aside at", "topic", "key", "error"]);
        for r in &self.0 {
            t.row(&[r.id.to_string(), fmt_time(&r.set_aside_at), r.topic.clone(), r.key.clone(), r.last_error.clone().unwrap_or_default()]);
        }
        t.to_string()
    }
}

/// The rows the relay set aside, oldest first, at most `limit`.
pub async fn stuck(ops: &Ops, limit: i64) -> Result<Stuck, OpsError> {
    let rows = sqlx::query_as::<_, SetAside>(
        "SELECT id, topic, message_key, event_id, created_at, set_aside_at, last_error FROM outbox
         WHERE set_aside_at IS NOT NULL ORDER BY id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&ops.pool)
    .await?;
    Ok(Stuck(rows))
}

/// `outbox retry`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Retried {
    pub id: i64,
    /// The row's id from now on: its place at the end of the line.
    pub new_id: i64,
    pub topic: String,
    /// Kafka's answer when the row was set aside.
    pub last_error: Option<String>,
}

impl Report for Retried {
    fn table(&self) -> String {
        format!(
            "outbox row {} ({}) is back in line as row {}; it was set aside with: {}\n",
            self.id,
            self.topic,
            self.new_id,
            self.last_error.as_deref().unwrap_or("-")
        )
    }
}

/// Puts set-aside row `id` back in line for the relay, at the end, under a new id (the
/// statement trigger of migration 0170 takes the transaction id before the new id is drawn).
pub async fn retry(ops: &Ops, id: i64) -> Result<Retried, OpsError> {
    let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
        "UPDATE outbox SET id = nextval(pg_get_serial_sequence('outbox', 'id')), set_aside_at = NULL
         WHERE id = $1 AND set_aside_at IS NOT NULL
         RETURNING id, topic, last_error",
    )
    .bind(id)
    .fetch_optional(&ops.pool)
    .await?;
    let (new_id, topic, last_error) = row.ok_or_else(|| OpsError::NotFound(format!("outbox row {id} is not set aside (see `bookingctl outbox stuck`)")))?;
    ops.audit("outbox retry", serde_json::json!({"id": id, "newId": new_id, "topic": topic, "lastError": last_error})).await;
    Ok(Retried { id, new_id, topic, last_error })
}
