//! Prompt VACUUM of the table the worker reads as a queue, `notification_deliveries`.
//!
//! The worker reads the due deliveries, oldest first, from the start of a partial index
//! (`notification_deliveries_pending`), on every poll. Marking a row delivered takes it out of the
//! partial index only for new snapshots: its old entry stays in the index until VACUUM removes
//! it, and every later poll walks past it. After the benchmark's queue spike (40,000 deliveries,
//! all done) a delivery poll read 129 index pages in 0.7 ms; after `VACUUM` of the table, 4.
//! Autovacuum comes too late: it looks at a database once a minute at most, and by then the
//! spike is over.
//!
//! So the worker vacuums the table once enough rows have been marked ([`QueueVacuum::done`]), in
//! the background, not more often than [`MIN_INTERVAL`]. VACUUM removes only what no transaction
//! can see any more; it never blocks writers, and `SKIP_LOCKED` makes it give up rather than wait
//! if another vacuum (autovacuum's) has the table. `INDEX_CLEANUP ON` because cleaning the index
//! is the point: by default, PostgreSQL skips it when few pages have dead rows, and with days of
//! delivered rows kept (`retention`) a spike's rows are few.
//!
//! The cost grows with the table: every vacuum reads all of the table's indexes (66 ms of
//! database time per vacuum after the benchmark's spike). The outbox was vacuumed the same way
//! until its relay started its scan at a floor (`floor`), which needs no vacuum at all, at any
//! size; the deliveries could too, with the same argument, but a delivery waiting for a retry
//! stays pending below the newest ones, which the floor would have to account for (not done).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// Least time between two vacuums of one table by one process.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);

/// Rows marked done after which a table is vacuumed.
pub const AFTER_ROWS: u64 = 10_000;

/// Counts the rows of one queue table marked done, and vacuums the table after [`AFTER_ROWS`].
pub struct QueueVacuum {
    table: &'static str,
    since: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl QueueVacuum {
    /// `table` is one of the product's own table names (it is written into the statement).
    pub fn new(table: &'static str) -> Self {
        debug_assert!(table.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "a table name");
        Self { table, since: AtomicU64::new(0), last: Mutex::new(None) }
    }

    /// `rows` rows of the table have just left its pending index. Once [`AFTER_ROWS`] have since
    /// the last vacuum, and [`MIN_INTERVAL`] has passed, starts one on a connection of `pool` in
    /// the background. Two never overlap: one still running after the interval holds the
    /// table's vacuum lock, and `SKIP_LOCKED` makes the next give up at once. A failure is
    /// logged; the table is tried again after as many rows more, and autovacuum still comes.
    pub fn done(&self, pool: &PgPool, rows: u64) {
        if rows == 0 || self.since.fetch_add(rows, Ordering::Relaxed) + rows < AFTER_ROWS {
            return;
        }
        {
            let mut last = self.last.lock().expect("not poisoned");
            if last.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.since.store(0, Ordering::Relaxed);
        let (pool, table) = (pool.clone(), self.table);
        tokio::spawn(async move {
            let started = Instant::now();
            let sql = format!("VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON) {table}");
            // VACUUM cannot run inside a transaction block: the simple protocol, one statement.
            match sqlx::raw_sql(&sql).execute(&pool).await {
                Ok(_) => {
                    metrics::counter!("queue_vacuums_total", "table" => table).increment(1);
                    tracing::debug!(table, ms = started.elapsed().as_millis() as u64, "vacuumed a queue table");
                }
                Err(e) => tracing::warn!(error = %e, table, "vacuum of a queue table failed; autovacuum will do it"),
            }
        });
    }
}
