//! Retention (issue 15, item 10): what the system writes for its own bookkeeping is kept for a
//! bounded time, pruned in small batches by the worker, and its size is a metric.
//!
//! | what | default | why that long |
//! | --- | --- | --- |
//! | `idempotency_keys` | 2 days | a client retries within minutes; 24 h is the usual promise, kept with a margin |
//! | `processed_events` | 8 days | consumers de-duplicate replays; a message can be replayed while its topic keeps it (7 days) |
//! | the ranking's counted and refunded sets | 8 days | the same, for `payment.completed` and `payment.refunded` (see [`crate::ranking`]) |
//!
//! Each batch deletes at most `batch` rows in its own short transaction (no long lock, no
//! VACUUM held back), oldest first through an index on `created_at` (migration 0110). Several
//! workers may prune at once: they only contend on the same rows for a moment.
//!
//! The outbox is not here: its relay deletes a row as soon as Kafka has it (migration 0210), and
//! a row Kafka refused for good stays, set aside, until an operator acts.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How long each table keeps its rows, and how the pruning runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub idempotency_keys: Duration,
    pub processed_events: Duration,
    /// Time between two prunings.
    pub interval: Duration,
    /// Most rows one DELETE removes.
    pub batch: i64,
}

impl Default for Settings {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Settings {
            idempotency_keys: Duration::from_secs(2 * DAY),
            processed_events: Duration::from_secs(8 * DAY),
            interval: Duration::from_secs(60),
            batch: 5000,
        }
    }
}

/// A table under retention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    IdempotencyKeys,
    ProcessedEvents,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::IdempotencyKeys, Table::ProcessedEvents];

    pub fn name(self) -> &'static str {
        match self {
            Table::IdempotencyKeys => "idempotency_keys",
            Table::ProcessedEvents => "processed_events",
        }
    }

    fn keep(self, s: &Settings) -> Duration {
        match self {
            Table::IdempotencyKeys => s.idempotency_keys,
            Table::ProcessedEvents => s.processed_events,
        }
    }
}

/// Deletes one batch of `table`'s rows older than its retention; returns how many.
pub async fn prune_batch(pool: &PgPool, table: Table, s: &Settings) -> Result<u64, sqlx::Error> {
    // The table name comes from the enum above, never from input.
    let sql = format!(
        "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {t} WHERE created_at < now() - make_interval(secs => $1::float8)
             ORDER BY created_at LIMIT $2))",
        t = table.name(),
    );
    let done = sqlx::query(&sql).bind(table.keep(s).as_secs_f64()).bind(s.batch).execute(pool).await?.rows_affected();
    metrics::counter!("retention_pruned_rows_total", "table" => table.name()).increment(done);
    Ok(done)
}

/// Prunes every table until a batch comes back short (at most 100 batches per table, so one
/// step ends even under a backlog); returns the rows removed per table. Then refreshes the
/// size gauges.
pub async fn step(pool: &PgPool, s: &Settings) -> Result<Vec<(Table, u64)>, sqlx::Error> {
    let mut out = Vec::new();
    for table in Table::ALL {
        let mut total = 0;
        for _ in 0..100 {
            let n = prune_batch(pool, table, s).await?;
            total += n;
            if (n as i64) < s.batch {
                break;
            }
        }
        out.push((table, total));
    }
    record_sizes(pool).await?;
    Ok(out)
}

/// `retained_rows{table}`: the planner's estimate of each table's rows (kept current by
/// autovacuum; a count would scan the table).
pub async fn record_sizes(pool: &PgPool) -> Result<(), sqlx::Error> {
    let rows: Vec<(String, f32)> = sqlx::query_as(
        "SELECT relname::text, GREATEST(reltuples, 0)::float4 FROM pg_class
         WHERE relname IN ('idempotency_keys', 'processed_events') AND relkind = 'r'
           AND relnamespace = current_schema()::regnamespace",
    )
    .fetch_all(pool)
    .await?;
    for (table, n) in rows {
        metrics::gauge!("retained_rows", "table" => table).set(n as f64);
    }
    Ok(())
}

/// Prunes every `interval` until `shutdown`.
pub async fn run(pool: PgPool, s: Settings, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match step(&pool, &s).await {
            Ok(done) => {
                for (table, n) in done.into_iter().filter(|(_, n)| *n > 0) {
                    tracing::info!(table = table.name(), rows = n, "pruned past retention");
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention pruning failed"),
        }
    }
}
