//! `bookingctl outbox …`: what waits in the transactional outbox for Kafka.

use serde::Serialize;

use super::{Ops, OpsError, Report, Table};

/// `outbox status`: the backlog and its age.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxStatus {
    /// Rows not yet acknowledged by Kafka.
    pub backlog: i64,
    /// Age of the oldest of them, in seconds (0 when nothing waits).
    pub oldest_age_seconds: f64,
}

impl Report for OutboxStatus {
    fn table(&self) -> String {
        let mut t = Table::new(&["backlog", "oldest age"]);
        t.row(&[self.backlog.to_string(), format!("{:.1}s", self.oldest_age_seconds)]);
        t.to_string()
    }
}

/// The backlog and the age of its oldest row (the partial index `outbox_unpublished` keeps this
/// cheap however long the table is).
pub async fn status(ops: &Ops) -> Result<OutboxStatus, OpsError> {
    let (backlog, age): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(&ops.pool)
    .await?;
    Ok(OutboxStatus { backlog, oldest_age_seconds: age.unwrap_or(0.0).max(0.0) })
}
