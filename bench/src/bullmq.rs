//! The delay scheduler against BullMQ 5 on the same Redis, one workload (issue 11).
//!
//! Ours: N holds whose `expiresAt` fall in one window, written straight into PostgreSQL by
//! [`booking::reservation::hold`] (the real transaction with its outbox row, no HTTP), so the whole
//! pipeline runs: outbox → `reservation.created` → delay-scheduler → `reservation.expiration` →
//! expirer. Lateness is `expired_at − expires_at`, read from PostgreSQL.
//!
//! BullMQ: `bench/bullmq/delayed.cjs` (Node.js, the npm package `bullmq` installed by
//! `scripts/bench.sh` into a cache directory) adds N delayed jobs due in the same window on the
//! same Redis and runs one Worker; lateness is the job's start − its due time.
//!
//! The window starts after a lead long enough for all N holds (or jobs) to be written first.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::client::Histogram;
use super::run::pool;
use super::stats::{fmt_ms, Summary};
use super::Ctx;

/// One comparison run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub n: usize,
    pub window_ms: u64,
    /// From the end of writing to the first due time is at least this.
    pub lead_ms: u64,
    /// Concurrent hold transactions (ours).
    pub concurrency: usize,
    /// The running stack's `--topic-prefix` (the holds' outbox rows go to its topics).
    pub stack_topic_prefix: String,
    /// The stack's database (a pool of `concurrency` connections is opened on it).
    pub database_url: String,
    /// Longest wait past the last due time.
    pub timeout_s: f64,
    /// The delay-scheduler's /metrics (its publish-lateness histogram), optional.
    pub scheduler_metrics: Option<String>,
    /// BullMQ: the Node.js binary, the script, the Redis URL and a key prefix of its own.
    pub node: String,
    pub script: PathBuf,
    pub redis_url: String,
    pub bullmq_prefix: String,
    /// BullMQ Worker concurrency.
    pub bullmq_concurrency: usize,
    /// The stack's brokers, to read back each expiration's append time (optional).
    pub kafka_brokers: Option<String>,
}

/// Our pipeline's result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ours {
    pub holds: usize,
    pub hold_errors: usize,
    /// Time to write the N holds.
    pub write_ms: f64,
    pub expired: usize,
    /// `expired_at − expires_at`.
    pub lateness: Summary,
    /// The delay-scheduler's own stage (Kafka ack of `reservation.expiration` − expiresAt),
    /// bucket bounds from its histogram.
    pub scheduler_stage: Option<String>,
    /// Broker append time of each hold's `reservation.expiration` − expiresAt (the scheduler's
    /// stage, exact), when the topic could be read back.
    #[serde(default)]
    pub append_lateness: Option<Summary>,
    /// `expired_at` − that append time (the expirer's stage).
    #[serde(default)]
    pub expirer_stage: Option<Summary>,
}

/// BullMQ's result, as printed by the script.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bull {
    pub version: String,
    pub jobs: usize,
    pub started: usize,
    pub write_ms: f64,
    /// Job start − due time.
    pub lateness: Summary,
}

/// Both, side by side.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Comparison {
    pub n: usize,
    pub window_ms: u64,
    pub ours: Option<Ours>,
    pub bullmq: Option<Bull>,
    pub bullmq_error: Option<String>,
    pub ours_error: Option<String>,
}

/// Runs ours, then BullMQ, for one N.
pub async fn run(ctx: &Ctx, cfg: &Config) -> Comparison {
    let mut c = Comparison { n: cfg.n, window_ms: cfg.window_ms, ..Default::default() };
    match ours(ctx, cfg).await {
        Ok(o) => c.ours = Some(o),
        Err(e) => c.ours_error = Some(format!("{e:#}")),
    }
    match bullmq(ctx, cfg).await {
        Ok(b) => c.bullmq = Some(b),
        Err(e) => c.bullmq_error = Some(format!("{e:#}")),
    }
    c
}

async fn scheduler_histogram(ctx: &Ctx, cfg: &Config) -> Option<Histogram> {
    let url = cfg.scheduler_metrics.as_ref()?;
    let text = ctx.api.http.get(url).send().await.ok()?.text().await.ok()?;
    Histogram::parse(&text, "scheduler_publish_lateness_seconds")
}

async fn ours(ctx: &Ctx, cfg: &Config) -> Result<Ours> {
    let n = cfg.n;
    let per = n.min(10_000);
    let schedules = ctx.api.create_schedules(&format!("bench {} versus-bullmq {n}", ctx.run_id), n.div_ceil(per), per as i32, 1000).await?;
    let mut seats = Vec::with_capacity(n);
    for s in &schedules {
        seats.extend(ctx.api.seat_ids(*s).await?.into_iter().map(|seat| (seat, *s)));
    }
    seats.truncate(n);
    // Holders: a few users (the library's hold has no per-user limit; the queue token is HTTP's).
    let mut users = Vec::new();
    for i in 0..cfg.concurrency.clamp(1, 64) {
        let u = ctx.api.create_user(&format!("bench {} bullmq {i}", ctx.run_id)).await?;
        users.push(u.id);
    }
    let db = sqlx::postgres::PgPoolOptions::new().max_connections(cfg.concurrency.max(1) as u32).connect(&cfg.database_url).await?;
    // The api's group commit of holds: the holds written together share a statement, as the api's do.
    let group = booking::reservation::HoldGroup::start(db.clone());
    let topics = booking::kafka::Topics::new(&cfg.stack_topic_prefix);
    let expiration_topic = topics.reservation_expiration.clone();
    let h0 = scheduler_histogram(ctx, cfg).await;

    // Due times: first + window × i / n, the first one a lead after the writing is expected to end.
    let lead = Duration::from_millis(cfg.lead_ms);
    let first: DateTime<Utc> = Utc::now() + chrono::Duration::from_std(lead)?;
    let window = cfg.window_ms as f64;
    let bar = ctx.bar(n, &format!("versus-bullmq {n}: holds"));
    let started = std::time::Instant::now();
    let (seats, users) = (Arc::new(seats), Arc::new(users));
    let results = pool(n, cfg.concurrency, &bar, move |i| {
        let (db, group, topics, seats, users) = (db.clone(), group.clone(), topics.clone(), seats.clone(), users.clone());
        async move {
            let due = first + chrono::Duration::microseconds((window * 1000.0 * i as f64 / n as f64) as i64);
            let ttl = (due - Utc::now()).to_std().unwrap_or(Duration::from_millis(1));
            {
                // No seat limit in the way of the benchmark's bookers.
                let (seat, schedule) = seats[i];
                let req = booking::reservation::HoldRequest { user: users[i % users.len()], seat, ttl, max_seats: u32::MAX, key: None };
                booking::reservation::hold(&db, &group, &topics, req, schedule).await.ok().and_then(|h| h.fresh).map(|r| (r.reservation_id, r.expires_at))
            }
        }
    })
    .await;
    let write_ms = started.elapsed().as_secs_f64() * 1000.0;
    bar.finish_and_clear();
    let written: Vec<(Uuid, DateTime<Utc>)> = results.into_iter().flatten().collect();
    if written.is_empty() {
        bail!("no hold was written");
    }
    let ids: Vec<Uuid> = written.iter().map(|w| w.0).collect();
    // The holds' own `expiresAt`, stamped by PostgreSQL's clock: a few milliseconds past the
    // due times asked for, so the wait below ranges over these, not over the window.
    let first_due = written.iter().map(|w| w.1).min().expect("holds were written");
    let last_due = written.iter().map(|w| w.1).max().expect("holds were written");
    if Utc::now() > first {
        ctx.say(&format!("versus-bullmq {n}: writing took {write_ms:.0} ms, past the lead of {} ms: raise --bullmq-lead", cfg.lead_ms));
    }
    let last = first + chrono::Duration::milliseconds(cfg.window_ms as i64);
    let deadline = last + chrono::Duration::milliseconds((cfg.timeout_s * 1000.0) as i64);
    let spinner = ctx.spinner(&format!("versus-bullmq {n}: waiting for {} expiries", ids.len()));
    // Nothing is complete before the last hold is due, so nothing is read until then: the
    // database's time belongs to the pipeline under measurement (reading the lateness of 10,000
    // ids every 250 ms cost PostgreSQL 2.7 s of CPU during a 4-second burst). Then a count of the
    // window's holds still HELD, a range of the partial index on HELD holds' expiry that shrinks
    // to nothing, and the lateness once, at the end.
    if let Ok(wait) = (last_due - Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reservations WHERE status = 'HELD' AND expires_at >= $1 AND expires_at <= $2 AND schedule_id = ANY($3)",
        )
        .bind(first_due)
        .bind(last_due)
        .bind(&schedules)
        .fetch_one(&ctx.pool)
        .await?;
        if left == 0 || Utc::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each expired hold's due and expiry times (ms since the epoch), read once: its lateness,
    // and the split of that lateness below.
    let rows: Vec<(Uuid, f64, f64)> = sqlx::query_as(
        "SELECT id, EXTRACT(EPOCH FROM expires_at)::float8 * 1000, EXTRACT(EPOCH FROM expired_at)::float8 * 1000 FROM reservations
         WHERE id = ANY($1) AND status = 'EXPIRED' AND expired_at IS NOT NULL",
    )
    .bind(&ids)
    .fetch_all(&ctx.pool)
    .await?;
    let split = match &cfg.kafka_brokers {
        Some(brokers) => match stages(brokers, &expiration_topic, &rows).await {
            Ok(split) => Some(split),
            Err(e) => {
                ctx.say(&format!("versus-bullmq {n}: reading the expirations' append times back failed: {e:#}"));
                None
            }
        },
        None => None,
    };
    spinner.finish_and_clear();
    let h1 = scheduler_histogram(ctx, cfg).await;
    let scheduler_stage = h1.map(|h1| h1.since(&h0.unwrap_or_default())).filter(|d| d.count > 0.0).map(|d| {
        let q = |x: f64| d.quantile_bound(x).map(|s| format!("≤ {}", fmt_ms(s * 1000.0))).unwrap_or_else(|| "?".into());
        format!("p50 {} / p99 {} ms (histogram buckets)", q(0.5), q(0.99))
    });
    let out = Ours {
        holds: ids.len(),
        hold_errors: n - ids.len(),
        write_ms: write_ms.round(),
        expired: rows.len(),
        lateness: Summary::from_ms(rows.iter().map(|(_, due, expired)| expired - due).collect()),
        scheduler_stage,
        append_lateness: split.as_ref().map(|s| s.0.clone()),
        expirer_stage: split.map(|s| s.1),
    };
    ctx.say(&format!("versus-bullmq {n}: ours {}/{} expired, lateness {}", out.expired, out.holds, out.lateness.short()));
    Ok(out)
}

/// Splits each expired hold's lateness at its `reservation.expiration`'s broker append time
/// (`LogAppendTime`, read back from the topic): (append − expiresAt, `expired_at` − append), in
/// ms. Where the late ones lose their time: the scheduler's stage, or the expirer's. `rows`:
/// each expired hold's id, due time and expiry time (ms since the epoch).
async fn stages(brokers: &str, topic: &str, rows: &[(Uuid, f64, f64)]) -> Result<(Summary, Summary)> {
    let wanted: HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
    // The first append of each hold (a duplicate publish is appended later).
    let mut appended: HashMap<Uuid, i64> = HashMap::with_capacity(wanted.len());
    for r in super::topic::read_to_end(brokers, topic).await? {
        let id = r.key.as_deref().and_then(|k| Uuid::parse_str(k).ok()).filter(|id| wanted.contains(id));
        if let (Some(id), Some(ts)) = (id, r.appended_ms) {
            appended.entry(id).and_modify(|t| *t = (*t).min(ts)).or_insert(ts);
        }
    }
    let (mut scheduler, mut expirer) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
    for (id, due, expired) in rows {
        if let Some(&ts) = appended.get(id) {
            scheduler.push(ts as f64 - due);
            expirer.push(expired - ts as f64);
        }
    }
    if scheduler.is_empty() {
        bail!("none of the holds' expirations was found on {topic}");
    }
    Ok((Summary::from_ms(scheduler), Summary::from_ms(expirer)))
}

/// What the script prints as its last line.
#[derive(Deserialize)]
struct Printed {
    version: String,
    jobs: usize,
    started: usize,
    write_ms: f64,
    lateness_ms: Vec<f64>,
}

async fn bullmq(ctx: &Ctx, cfg: &Config) -> Result<Bull> {
    let timeout_ms = (cfg.timeout_s * 1000.0) as u64;
    let spinner = ctx.spinner(&format!("versus-bullmq {}: BullMQ", cfg.n));
    let out = tokio::process::Command::new(&cfg.node)
        .arg(&cfg.script)
        .args(["--redis", &cfg.redis_url, "--prefix", &cfg.bullmq_prefix])
        .args(["--n", &cfg.n.to_string(), "--window-ms", &cfg.window_ms.to_string(), "--lead-ms", &cfg.lead_ms.to_string()])
        .args(["--concurrency", &cfg.bullmq_concurrency.to_string(), "--timeout-ms", &timeout_ms.to_string()])
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {} {}", cfg.node, cfg.script.display()))?;
    spinner.finish_and_clear();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("BullMQ script failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default());
    }
    let last = stdout.lines().rev().find(|l| l.starts_with('{')).context("the BullMQ script printed no result")?;
    let p: Printed = serde_json::from_str(last).context("parsing the BullMQ script's result")?;
    let b = Bull { version: p.version, jobs: p.jobs, started: p.started, write_ms: p.write_ms.round(), lateness: Summary::from_ms(p.lateness_ms) };
    ctx.say(&format!("versus-bullmq {}: BullMQ {} {}/{} started, lateness {}", cfg.n, b.version, b.started, b.jobs, b.lateness.short()));
    Ok(b)
}
