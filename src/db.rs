//! PostgreSQL pool and the embedded migrations (applied by every binary at start; sqlx takes an
//! advisory lock, so several processes starting together apply them once).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// The migrations in `migrations/`, compiled into the binaries.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects a pool of at most `max` connections. Each connection carries the program's name as
/// `application_name` (unless the URL sets one), so `pg_stat_activity` and the server's logs say
/// which process a session belongs to: what an operator looks at first when the database is
/// busy, and how the benchmark splits PostgreSQL's CPU among its clients.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    let mut options: PgConnectOptions = url.parse()?;
    if options.get_application_name().is_none() {
        if let Some(name) = std::env::current_exe().ok().and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned())) {
            options = options.application_name(&name);
        }
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
