//! Command-line flags shared by every daemon. Each flag has an environment-variable twin and
//! durations are written the humantime way (`250ms`, `1s`, `5m`).

use std::time::Duration;

/// Connection settings and naming prefixes every daemon needs.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// PostgreSQL connection URL (the source of truth).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// Redis connection URL (waiting queue, delay scheduler sets, ranking): `redis://host:port` for one
    /// Redis, `redis+cluster://host:port,host:port,…` for a Redis Cluster (any seed nodes).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: String,

    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Prefix put in front of every Kafka topic name (isolates test runs and environments).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Prefix put in front of every Redis key.
    #[arg(long, env = "REDIS_PREFIX", default_value = "booking:")]
    pub redis_prefix: String,

    /// Replication factor for the topics this process creates (3 in production, 1 for one broker).
    #[arg(long, env = "TOPIC_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i32,

    /// Maximum PostgreSQL connections in this process's pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,

    /// Emit logs as JSON lines instead of human-readable text.
    #[arg(long, env = "LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// Parses a humantime duration such as `1s`, `250ms` or `5m` (used as a clap value parser).
pub fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}
