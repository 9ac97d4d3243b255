//! Scenario `notify-drain`: the worker alone draining a backlog of notification requests
//! (design document §7-2, "10,000+ notifications per second").
//!
//! N `notification.request` envelopes (spread over many user ids and the four types) are produced
//! straight to Kafka on a fresh topic prefix while no worker runs; then a worker is started (the
//! `worker` binary as a child process, or in-process in tests) with a fresh consumer group, and
//! `notifications` is polled until all N are stored and all N are DELIVERED. Nothing else writes
//! to that topic, so the figures are the worker's: consume + store (one `UNNEST` insert per
//! batch) and the delivery loop (log channel by default).
//!
//! The stack's own worker must not run meanwhile: its delivery loop shares the table.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::stats::Throughput;
use super::{pg, Ctx};
use booking::app::{Resources, WorkerSettings};
use booking::kafka::{Envelope, EventType, Topics, PARTITIONS};
use booking::notification::{event_id, Kind, NotificationRequest};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub notifications: usize,
    /// Distinct (random) user ids the notifications are spread over.
    pub users: usize,
    pub kafka_brokers: String,
    /// A topic prefix no other process uses (its topics are created here).
    pub topic_prefix: String,
    pub replication_factor: i32,
    /// Longest wait for all to be stored and delivered, from the worker's start.
    pub timeout_s: f64,
}

/// How the worker under test is started.
pub enum Worker {
    /// The `worker` binary; `args` are its connection flags (`--database-url`, `--redis-url`,
    /// `--kafka-brokers`, `--metrics-addr`, …); the scenario adds `--topic-prefix`,
    /// `--redis-prefix` and `--group-prefix`. Output goes to `log`.
    Process { bin: PathBuf, args: Vec<String>, log: PathBuf },
    /// In-process through [`booking::app::run_worker`] (tests); topics are replaced by the
    /// scenario's.
    InProcess { res: Resources, settings: WorkerSettings },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NotifyDrain {
    pub config: Option<Config>,
    /// How the worker ran (command line or "in-process").
    pub worker: String,
    /// Producing the backlog to Kafka (acknowledged).
    pub produced: Throughput,
    pub stored: usize,
    pub delivered: usize,
    /// Rows with the same event id stored twice (must be 0; `event_id` is unique).
    pub duplicates: usize,
    /// Worker started → every notification stored / delivered (includes start-up and the
    /// consumer group join).
    pub all_stored_after_start_s: Option<f64>,
    pub all_delivered_after_start_s: Option<f64>,
    /// First row stored → last row stored (`created_at`): consumed + stored per second.
    pub stored_per_second: f64,
    /// First row stored → last row delivered: delivered per second over the drain.
    pub delivered_per_second: f64,
    /// Most rows stored / delivered within one wall-clock second.
    pub peak_stored_second: i64,
    pub peak_delivered_second: i64,
    /// Every notification was stored and delivered within the wait.
    pub drained: bool,
    /// CPU from the worker's start until everything was delivered (taken before it stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<super::cpu::CpuUsage>,
}

/// A producer for the backlog: batches (`linger.ms`), acknowledged by all replicas.
fn producer(brokers: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "bench-notify-drain")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "30000")
        .create()?)
}

/// Produces `n` notification requests; returns the acknowledged count.
async fn produce(ctx: &Ctx, cfg: &Config, topic: &str) -> Result<usize> {
    let producer = producer(&cfg.kafka_brokers)?;
    let users: Vec<Uuid> = (0..cfg.users.max(1)).map(|_| Uuid::new_v4()).collect();
    let bar = ctx.bar(cfg.notifications, "notify-drain: producing");
    let mut pending = Vec::with_capacity(cfg.notifications);
    for i in 0..cfg.notifications {
        let user = users[i % users.len()];
        let kind = match i % 4 {
            0 => Kind::QueuePosition((i / 4) as u64 + 1),
            1 => Kind::QueueActivated,
            2 => Kind::PaymentConfirmed,
            _ => Kind::ReservationExpired,
        };
        let subject = format!("bench-drain-{}-{i}", ctx.run_id);
        let req = NotificationRequest::new(kind, user, serde_json::json!({"benchRun": ctx.run_id, "n": i}));
        let env = Envelope::with_id(event_id(kind, &subject), EventType::NotificationRequest, req);
        let payload = serde_json::to_vec(&env)?;
        let key = user.to_string();
        let partition = booking::kafka::partition_for(&key, PARTITIONS);
        loop {
            let record = FutureRecord::to(topic).key(&key).payload(&payload).partition(partition);
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => bail!("producing: {e}"),
            }
        }
        bar.inc(1);
    }
    let mut acked = 0;
    for f in futures_util::future::join_all(pending).await {
        match f {
            Ok(Ok(_)) => acked += 1,
            Ok(Err((e, _))) => bail!("produce failed: {e}"),
            Err(_) => bail!("produce cancelled"),
        }
    }
    bar.finish_and_clear();
    Ok(acked)
}

enum Running {
    Child(tokio::process::Child),
    Task(CancellationToken, tokio::task::JoinHandle<()>),
}

async fn start(worker: Worker, prefix: &str) -> Result<(Running, String)> {
    let group_prefix = format!("{prefix}drain-worker-");
    match worker {
        Worker::Process { bin, mut args, log } => {
            args.extend(["--topic-prefix".into(), prefix.into(), "--redis-prefix".into(), prefix.into(), "--group-prefix".into(), group_prefix]);
            let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let child = tokio::process::Command::new(&bin)
                .args(&args)
                .stdout(out.try_clone()?)
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let shown: Vec<String> = args.iter().filter(|a| !a.contains("://")).cloned().collect();
            Ok((Running::Child(child), format!("{} {}", bin.file_name().unwrap_or_default().to_string_lossy(), shown.join(" "))))
        }
        Worker::InProcess { mut res, settings } => {
            res.topics = Topics::new(prefix);
            let token = CancellationToken::new();
            let sd = token.clone();
            let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let h = tokio::spawn(async move {
                if let Err(e) = booking::app::run_worker(res, settings, &group_prefix, ops, booking::telemetry::install_metrics(), sd).await {
                    tracing::warn!(error = %e, "in-process worker failed");
                }
            });
            Ok((Running::Task(token, h), "in-process".into()))
        }
    }
}

async fn stop(r: Running) {
    match r {
        Running::Child(mut c) => {
            if let Some(pid) = c.id() {
                let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
            if tokio::time::timeout(Duration::from_secs(20), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
        Running::Task(t, h) => {
            t.cancel();
            let _ = h.await;
        }
    }
}

/// Runs the scenario.
/// `cpu_marker` as for [`super::cpu::snapshot`].
pub async fn run(ctx: &Ctx, cfg: &Config, worker: Worker, cpu_marker: Option<&str>) -> Result<NotifyDrain> {
    let n = cfg.notifications;
    // A fresh database may not have the tables yet (the worker would create them at start).
    booking::db::migrate(&ctx.pool).await.context("applying migrations")?;
    let topics = Topics::new(&cfg.topic_prefix);
    booking::kafka::bootstrap_topics(&cfg.kafka_brokers, &topics, cfg.replication_factor).await.context("creating the drain topics")?;
    let pending_before: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE status = 'PENDING'").fetch_one(&ctx.pool).await?;
    if pending_before > 0 {
        ctx.say(&format!("notify-drain: warning: {pending_before} notifications already PENDING in this database"));
    }
    let base = pg::max_id(&ctx.pool, "notifications").await?;

    let t = Instant::now();
    let acked = produce(ctx, cfg, &topics.notification_request).await?;
    let produced = Throughput::new(acked, t.elapsed());
    ctx.say(&format!("notify-drain: {acked} requests produced at {:.0}/s; starting the worker", produced.per_second));

    let cpu0 = super::cpu::snapshot(cpu_marker);
    let (running, shown) = start(worker, &cfg.topic_prefix).await?;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(cfg.timeout_s);
    let bar = ctx.bar(n, "notify-drain: delivered");
    let (mut all_stored, mut all_delivered) = (None, None);
    let mut polled = Err(anyhow::anyhow!("not polled"));
    while Instant::now() < deadline {
        let counts: Result<(i64, i64), sqlx::Error> =
            sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE status = 'DELIVERED') FROM notifications n LEFT JOIN notification_deliveries d ON d.notification_id = n.id WHERE n.id > $1")
                .bind(base)
                .fetch_one(&ctx.pool)
                .await;
        if let Ok((s, d)) = counts {
            bar.set_position(d as u64);
            if all_stored.is_none() && s as usize >= n {
                all_stored = Some(t0.elapsed());
            }
            if d as usize >= n {
                all_delivered = Some(t0.elapsed());
                polled = Ok(());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    let cpu = cpu0.usage_since(cpu_marker);
    stop(running).await;
    if polled.is_err() {
        ctx.say("notify-drain: timed out before every notification was delivered");
    }

    let tag = ctx.run_id.clone();
    let (stored, distinct, delivered, stored_span, delivered_span): (i64, i64, i64, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT event_id), count(*) FILTER (WHERE status = 'DELIVERED'),
                EXTRACT(EPOCH FROM max(created_at) - min(created_at))::float8,
                EXTRACT(EPOCH FROM max(delivered_at) - min(created_at))::float8
         FROM notifications n LEFT JOIN notification_deliveries d ON d.notification_id = n.id WHERE n.id > $1 AND data->>'benchRun' = $2",
    )
    .bind(base)
    .bind(&tag)
    .fetch_one(&ctx.pool)
    .await?;
    let peak = |col: &str| {
        format!(
            "SELECT COALESCE(max(c), 0)::bigint FROM (SELECT count(*) AS c FROM notifications n LEFT JOIN notification_deliveries d ON d.notification_id = n.id
             WHERE n.id > $1 AND data->>'benchRun' = $2 AND {col} IS NOT NULL GROUP BY date_trunc('second', {col})) s"
        )
    };
    let peak_stored: i64 = sqlx::query_scalar(&peak("created_at")).bind(base).bind(&tag).fetch_one(&ctx.pool).await?;
    let peak_delivered: i64 = sqlx::query_scalar(&peak("delivered_at")).bind(base).bind(&tag).fetch_one(&ctx.pool).await?;
    let rate = |count: i64, span: Option<f64>| match span {
        Some(s) if s > 0.0 => (count as f64 / s).round(),
        _ => 0.0,
    };
    let out = NotifyDrain {
        config: Some(cfg.clone()),
        worker: shown,
        produced,
        stored: stored as usize,
        delivered: delivered as usize,
        duplicates: (stored - distinct) as usize,
        all_stored_after_start_s: all_stored.map(|d| d.as_secs_f64()),
        all_delivered_after_start_s: all_delivered.map(|d| d.as_secs_f64()),
        stored_per_second: rate(stored, stored_span),
        delivered_per_second: rate(delivered, delivered_span),
        peak_stored_second: peak_stored,
        peak_delivered_second: peak_delivered,
        drained: stored as usize == n && delivered as usize == n,
        cpu: Some(cpu),
    };
    ctx.say(&format!(
        "notify-drain: {} stored at {:.0}/s (peak second {}), {} delivered at {:.0}/s (peak second {}); all delivered {:.1} s after the worker started",
        out.stored, out.stored_per_second, out.peak_stored_second, out.delivered, out.delivered_per_second, out.peak_delivered_second, out.all_delivered_after_start_s.unwrap_or(f64::NAN)
    ));
    Ok(out)
}
