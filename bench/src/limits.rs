//! What the machine's own PostgreSQL can do, measured in the same run (issue 11): `pgbench` of a
//! one-row insert-and-commit and of a plain one-row read, at the concurrency of our scenarios.
//! The report prints each of our figures beside the matching limit as a ratio; on a shared
//! machine the absolute figures drift from run to run, the ratio much less.
//!
//! The scratch table lives in the bench database for the measurement only and is dropped after.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Ctx;

/// What to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Client counts to measure at (each of our scenarios' concurrency).
    pub clients: Vec<usize>,
    /// Length of each pgbench run.
    pub seconds: u64,
    /// The database pgbench connects to (the stack's).
    pub database_url: String,
    /// The pgbench binary.
    pub pgbench: String,
}

/// One pgbench run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Limit {
    /// `insert` (one-row insert-and-commit) or `read` (one-row primary-key read).
    pub kind: String,
    pub clients: usize,
    /// Transactions per second (without connection set-up).
    pub tps: f64,
    pub latency_avg_ms: f64,
}

/// Every limit measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Limits {
    pub config: Option<Config>,
    pub runs: Vec<Limit>,
}

impl Limits {
    /// The limit of `kind` at `clients`, or at the nearest client count measured.
    pub fn get(&self, kind: &str, clients: usize) -> Option<&Limit> {
        self.runs.iter().filter(|l| l.kind == kind).min_by_key(|l| l.clients.abs_diff(clients))
    }
}

const TABLE: &str = "bench_limit_scratch";
/// A row like an outbox row: a JSON body of about the size of an envelope.
const INSERT: &str = "INSERT INTO bench_limit_scratch (body) VALUES ('{\"eventId\":\"6c1d0a4e-5b8f-4f7e-9d1a-2f3b4c5d6e7f\",\"eventType\":\"notification.request\",\"payload\":{\"userId\":\"0b9e2f54-3c1d-4a7e-8f6a-1d2c3b4a5e6f\",\"type\":\"QUEUE_POSITION\",\"message\":\"position 42\"}}');\n";
const READ: &str = "\\set id random(1, 1000)\nSELECT id, body FROM bench_limit_scratch WHERE id = :id;\n";

/// Runs pgbench for each client count, insert then read.
pub async fn run(ctx: &Ctx, cfg: &Config) -> Result<Limits> {
    sqlx::query(&format!("DROP TABLE IF EXISTS {TABLE}")).execute(&ctx.pool).await?;
    sqlx::query(&format!("CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, body jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"))
        .execute(&ctx.pool)
        .await?;
    let dir = std::env::temp_dir().join(format!("bench-limits-{}", ctx.run_id));
    std::fs::create_dir_all(&dir)?;
    let insert = write(&dir, "insert.sql", INSERT)?;
    let read = write(&dir, "read.sql", READ)?;
    let mut runs = Vec::new();
    let result: Result<()> = async {
        for &clients in &cfg.clients {
            let l = pgbench(cfg, "insert", &insert, clients).await?;
            ctx.say(&format!("limit: insert-and-commit at {clients} clients: {:.0}/s (avg {:.1} ms)", l.tps, l.latency_avg_ms));
            runs.push(l);
        }
        // The reads need rows to find.
        sqlx::query(&format!("INSERT INTO {TABLE} (body) SELECT '{{}}'::jsonb FROM generate_series(1, 1000)")).execute(&ctx.pool).await?;
        for &clients in &cfg.clients {
            let l = pgbench(cfg, "read", &read, clients).await?;
            ctx.say(&format!("limit: read at {clients} clients: {:.0}/s (avg {:.1} ms)", l.tps, l.latency_avg_ms));
            runs.push(l);
        }
        Ok(())
    }
    .await;
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {TABLE}")).execute(&ctx.pool).await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(Limits { config: Some(cfg.clone()), runs })
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

async fn pgbench(cfg: &Config, kind: &str, script: &std::path::Path, clients: usize) -> Result<Limit> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(clients).max(1);
    let out = tokio::process::Command::new(&cfg.pgbench)
        .args(["-n", "-c", &clients.to_string(), "-j", &threads.to_string(), "-T", &cfg.seconds.to_string(), "-f"])
        .arg(script)
        .arg(&cfg.database_url)
        .output()
        .await
        .with_context(|| format!("running {} (Debian: apt-get install postgresql-client)", cfg.pgbench))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("pgbench {kind} at {clients} clients failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
    }
    let (tps, latency_avg_ms) = parse(&stdout).with_context(|| format!("pgbench printed no tps: {stdout}"))?;
    Ok(Limit { kind: kind.into(), clients, tps, latency_avg_ms })
}

/// (tps, average latency in ms) from pgbench's summary.
pub fn parse(stdout: &str) -> Option<(f64, f64)> {
    let number = |line: &str, prefix: &str| line.strip_prefix(prefix).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok());
    let tps = stdout.lines().find_map(|l| number(l.trim(), "tps = "))?;
    let latency = stdout.lines().find_map(|l| number(l.trim(), "latency average = ")).unwrap_or(0.0);
    Some((tps, latency))
}
