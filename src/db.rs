//! PostgreSQL pool and the embedded migrations (applied by every binary at start; sqlx takes an
//! advisory lock, so several processes starting together apply them once).

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// The migrations in `migrations/`, compiled into the binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects a pool of at most `max` connections.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
