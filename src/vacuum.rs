//! Prompt VACUUM of the tables the product reads as queues.
//!
//! The relay reads the outbox's unpublished rows, and the worker the due notification
//! deliveries, oldest first, from the start of a partial index (`outbox_pending`,
//! `notification_deliveries_pending`), on every step. Marking a row done takes it out of the
//! partial index only for new snapshots: its old entry stays in the index until VACUUM removes
//! it, and every later step walks past it. After the benchmark's queue spike (40,000 entrants,
//! 40,000 outbox rows and deliveries, all done) a relay step that found nothing read 67 index
//! pages in 0.45 ms, and a delivery poll 129 pages in 0.7 ms; after `VACUUM` of the two tables
//! (74 ms) they read 1 and 4 pages. Those steps run hundreds of times a second while the sale
//! goes on: part of why the holds and payments after the spike cost PostgreSQL about 30 % more
//! CPU than the same holds on clean tables. Autovacuum comes too late: it looks at a database once a
//! minute at most, and by then the spike is over.
//!
//! So the process that marks the rows vacuums the table once enough of them have been marked
//! ([`QueueVacuum::done`]), in the background, not more often than [`MIN_INTERVAL`]. VACUUM
//! removes only what no transaction can see any more; it never blocks writers, and
//! `SKIP_LOCKED` makes it give up rather than wait if another vacuum (autovacuum's) has the
//! table. `INDEX_CLEANUP ON` because cleaning the index is the point: by default,
//! PostgreSQL skips it when few pages have dead rows, and with days of published rows kept
//! (`retention`) a spike's rows are few.
//!
//! The cost grows with the table: every vacuum reads all of the table's indexes. With the
//! default retention (3 days of published outbox rows) and a very large sale that can be seconds
//! of database time per vacuum; [`MIN_INTERVAL`] bounds how often that is paid. A pending-rows
//! table of its own per queue, kept small, would make it cheap at any size (not done yet).

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
