//! What HTTP cannot show, read from PostgreSQL: the statistics views (database work) and a few
//! counts. Note that PostgreSQL 15+ backends flush their statistics at most once a second while
//! busy and within 10 s once idle, so a snapshot is exact only after such a settle time.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Counters of one table from `pg_stat_user_tables`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, sqlx::FromRow)]
pub struct TableStats {
    pub seq_scan: i64,
    pub seq_tup_read: i64,
    pub idx_scan: i64,
    pub idx_tup_fetch: i64,
    pub n_tup_upd: i64,
}

impl TableStats {
    pub fn delta(&self, before: &Self) -> Self {
        Self {
            seq_scan: self.seq_scan - before.seq_scan,
            seq_tup_read: self.seq_tup_read - before.seq_tup_read,
            idx_scan: self.idx_scan - before.idx_scan,
            idx_tup_fetch: self.idx_tup_fetch - before.idx_tup_fetch,
            n_tup_upd: self.n_tup_upd - before.n_tup_upd,
        }
    }

    /// Rows read: sequentially scanned plus fetched through an index.
    pub fn rows_read(&self) -> i64 {
        self.seq_tup_read + self.idx_tup_fetch
    }

    /// Scans started (sequential plus index).
    pub fn scans(&self) -> i64 {
        self.seq_scan + self.idx_scan
    }
}

/// Reads the counters of `table` (in the public schema).
pub async fn table_stats(pool: &PgPool, table: &str) -> Result<TableStats, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq_scan, seq_tup_read, COALESCE(idx_scan, 0) AS idx_scan, COALESCE(idx_tup_fetch, 0) AS idx_tup_fetch, n_tup_upd
         FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
    )
    .bind(format!("public.{table}"))
    .fetch_one(pool)
    .await
}

/// Counters of the whole database from `pg_stat_database` (every process's work, not only the
/// expirer's).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, sqlx::FromRow)]
pub struct DbStats {
    pub xact_commit: i64,
    pub tup_returned: i64,
    pub tup_fetched: i64,
    pub tup_updated: i64,
    pub blks_hit: i64,
    pub blks_read: i64,
}

impl DbStats {
    pub fn delta(&self, before: &Self) -> Self {
        Self {
            xact_commit: self.xact_commit - before.xact_commit,
            tup_returned: self.tup_returned - before.tup_returned,
            tup_fetched: self.tup_fetched - before.tup_fetched,
            tup_updated: self.tup_updated - before.tup_updated,
            blks_hit: self.blks_hit - before.blks_hit,
            blks_read: self.blks_read - before.blks_read,
        }
    }
}

pub async fn db_stats(pool: &PgPool) -> Result<DbStats, sqlx::Error> {
    sqlx::query_as(
        "SELECT xact_commit, tup_returned, tup_fetched, tup_updated, blks_hit, blks_read
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
}

/// Highest id of a bigserial table (0 when empty): a baseline for "rows added since".
pub async fn max_id(pool: &PgPool, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT COALESCE(max(id), 0)::bigint FROM {table}")).fetch_one(pool).await
}

/// `server_version` of PostgreSQL.
pub async fn server_version(pool: &PgPool) -> String {
    sqlx::query_scalar::<_, String>("SHOW server_version").fetch_one(pool).await.unwrap_or_else(|_| "unknown".into())
}
