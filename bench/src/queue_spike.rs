//! Scenario 1, the queue spike: N users enter one schedule's waiting queue at once.
//!
//! Measures entry throughput and latency, position-query latency (`GET /v1/queue/tokens/me`, asked
//! by pollers during the spike and by everyone afterwards until all are ACTIVE), the admission rate
//! (the api's `queue_admitted_total`, sampled every 100 ms), and — since every entry and every
//! admission writes a notification through the outbox — the notification pipeline's throughput
//! (outbox → Kafka → worker → `notifications`), read from PostgreSQL and, for the publishing,
//! back from Kafka (design document §7-2).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::run::{pool, try_pool, Rng};
use super::stats::{Summary, Throughput};
use super::{pg, Ctx, User};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub users: usize,
    /// Concurrent clients creating users and entering the queue.
    pub concurrency: usize,
    /// Clients asking for positions while the others enter.
    pub pollers: usize,
    /// Longest wait for the notification backlog to be stored.
    pub drain_timeout_s: f64,
    /// The stack's brokers and `--topic-prefix`, to read the notification requests back from
    /// Kafka for the publishing rate and the pipeline's lag (the outbox keeps only what is
    /// unsent); without them both are left out.
    #[serde(default)]
    pub kafka_brokers: Option<String>,
    #[serde(default)]
    pub stack_topic_prefix: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueSpike {
    pub config: Option<Config>,
    pub user_creation: Throughput,
    pub entry: Throughput,
    pub entry_latency: Summary,
    pub entry_errors: usize,
    pub position_latency: Summary,
    pub position_queries_during_entry: usize,
    pub position_errors: usize,
    pub admission: Admission,
    pub notifications: Notifications,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Admission {
    /// Users seen ACTIVE at the end.
    pub active: usize,
    /// Growth of the api's `queue_admitted_total` during the scenario.
    pub admitted_metric: Option<f64>,
    /// Users admitted per second, from the first entry to the last admission.
    pub per_second: f64,
    /// From the first entry until every user was admitted.
    pub all_admitted_after_s: f64,
    /// From the last entry's answer until every user was admitted.
    pub after_last_entry_ms: f64,
    /// `metrics` (the api's counter) or `statuses` (our own polls).
    pub measured_by: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Notifications {
    /// QUEUE_POSITION + QUEUE_ACTIVATED expected (2 per user).
    pub expected: usize,
    pub stored: usize,
    /// Stored rows / (last − first `created_at`).
    pub stored_per_second: f64,
    /// Most rows stored within one wall-clock second.
    pub peak_second: i64,
    pub stored_span_s: f64,
    /// The relay's publishing rate of these notifications (their append times on Kafka).
    pub published: usize,
    pub published_per_second: f64,
    /// Event written to the outbox (its envelope's `eventTime`) → notification stored: the whole
    /// asynchronous pipeline.
    pub outbox_to_stored: Summary,
    /// Delivered by the worker's channel by the end of the wait (not awaited).
    pub delivered: usize,
    pub delivered_per_second: f64,
    /// Every expected notification was stored within the wait.
    pub drained: bool,
}

/// Runs the queue spike.
pub async fn run(ctx: &Ctx, cfg: &Config) -> Result<QueueSpike> {
    let n = cfg.users;
    let schedule = ctx.api.create_schedules(&format!("bench {} queue spike", ctx.run_id), 1, 50, 1000).await?[0];

    // Users first (also HTTP): timed on its own.
    let bar = ctx.bar(n, "queue spike: creating users");
    let started = Instant::now();
    let (api, run) = (ctx.api.clone(), ctx.run_id.clone());
    let users: Vec<User> = try_pool(n, cfg.concurrency, &bar, move |i| {
        let (api, run) = (api.clone(), run.clone());
        async move { api.create_user(&format!("bench-{run}-q-{i}")).await }
    })
    .await?;
    let user_creation = Throughput::new(n, started.elapsed());
    bar.finish_and_clear();
    ctx.say(&format!("queue spike: {n} users created in {:.1} s", user_creation.seconds));

    let notes_base = pg::max_id(&ctx.pool, "notifications").await?;
    let admitted0 = ctx.api.metric_sum("queue_admitted_total").await;

    // Admission watcher: the api's counter every 100 ms.
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let watcher = {
        let (api, stop, samples) = (ctx.api.clone(), stop.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = api.metric_sum("queue_admitted_total").await {
                    samples.lock().unwrap().push((t0.elapsed().as_secs_f64(), v));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Entries, with pollers asking for the positions of those already in.
    let users = Arc::new(users);
    let tokens: Arc<Vec<Mutex<Option<String>>>> = Arc::new((0..n).map(|_| Mutex::new(None)).collect());
    let entered: Arc<Mutex<Vec<usize>>> = Arc::default();
    let entries_done = Arc::new(AtomicBool::new(false));
    let position_ms: Arc<Mutex<Vec<f64>>> = Arc::default();
    let position_errors = Arc::new(AtomicUsize::new(0));
    let mut pollers = Vec::new();
    for _ in 0..cfg.pollers {
        let (api, users, tokens, entered, done, lat, errs) =
            (ctx.api.clone(), users.clone(), tokens.clone(), entered.clone(), entries_done.clone(), position_ms.clone(), position_errors.clone());
        pollers.push(tokio::spawn(async move {
            let mut rng = Rng::new();
            let mut count = 0usize;
            while !done.load(Ordering::Relaxed) {
                let pick = {
                    let e = entered.lock().unwrap();
                    (!e.is_empty()).then(|| e[rng.below(e.len())])
                };
                let Some(i) = pick else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let token = tokens[i].lock().unwrap().clone().expect("entered users have a token");
                match api.queue_me(&users[i], &token).await {
                    Ok(a) if a.status == 200 => lat.lock().unwrap().push(a.took.as_secs_f64() * 1000.0),
                    _ => {
                        errs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                count += 1;
            }
            count
        }));
    }

    let bar = ctx.bar(n, "queue spike: entering");
    let entry_started = Instant::now();
    let first_entry_at = t0.elapsed().as_secs_f64();
    let (api, u2, t2, e2) = (ctx.api.clone(), users.clone(), tokens.clone(), entered.clone());
    let results = pool(n, cfg.concurrency, &bar, move |i| {
        let (api, users, tokens, entered) = (api.clone(), u2.clone(), t2.clone(), e2.clone());
        async move {
            let a = api.enter_queue(&users[i], schedule).await.ok()?;
            if a.status != 201 {
                return None;
            }
            *tokens[i].lock().unwrap() = Some(a.str("queueToken")?.to_string());
            entered.lock().unwrap().push(i);
            Some(a.took.as_secs_f64() * 1000.0)
        }
    })
    .await;
    let entry = Throughput::new(results.iter().flatten().count(), entry_started.elapsed());
    let last_entry_at = t0.elapsed().as_secs_f64();
    entries_done.store(true, Ordering::Relaxed);
    bar.finish_and_clear();
    let entry_errors = results.iter().filter(|r| r.is_none()).count();
    let entry_latency = Summary::from_ms(results.into_iter().flatten().collect());
    let mut during = 0;
    for p in pollers {
        during += p.await.unwrap_or(0);
    }
    ctx.say(&format!("queue spike: {} entries at {:.0}/s ({}), {during} position queries meanwhile", entry.count, entry.per_second, entry_latency.short()));

    // Everyone asks for their place until all are ACTIVE.
    let bar = ctx.bar(n, "queue spike: awaiting ACTIVE");
    let mut pending: Vec<usize> = (0..n).filter(|i| tokens[*i].lock().unwrap().is_some()).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut all_active_at = None;
    while !pending.is_empty() && Instant::now() < deadline {
        let list = Arc::new(pending.clone());
        let (api, users, tokens, l2) = (ctx.api.clone(), users.clone(), tokens.clone(), list.clone());
        let answers = pool(list.len(), cfg.concurrency, &ProgressBar::hidden(), move |k| {
            let (api, users, tokens, l) = (api.clone(), users.clone(), tokens.clone(), l2.clone());
            async move {
                let i = l[k];
                let token = tokens[i].lock().unwrap().clone().expect("token");
                api.queue_me(&users[i], &token).await.ok()
            }
        })
        .await;
        let mut still = Vec::new();
        for (i, a) in list.iter().zip(answers) {
            match a {
                Some(a) if a.status == 200 => {
                    position_ms.lock().unwrap().push(a.took.as_secs_f64() * 1000.0);
                    if a.str("status") != Some("ACTIVE") {
                        still.push(*i);
                    }
                }
                _ => {
                    position_errors.fetch_add(1, Ordering::Relaxed);
                    still.push(*i);
                }
            }
        }
        bar.set_position((n - still.len()) as u64);
        pending = still;
        if pending.is_empty() {
            all_active_at = Some(t0.elapsed().as_secs_f64());
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bar.finish_and_clear();
    // Let the watcher see the final count.
    tokio::time::sleep(Duration::from_millis(250)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    let active = entry.count - pending.len();

    let admission = admission(admitted0, &samples.lock().unwrap(), active, first_entry_at, last_entry_at, all_active_at);
    ctx.say(&format!("queue spike: {active} ACTIVE, {:.0} admitted/s ({})", admission.per_second, admission.measured_by));

    let kafka = match (&cfg.kafka_brokers, &cfg.stack_topic_prefix) {
        (Some(b), Some(p)) => Some((b.clone(), booking::kafka::Topics::new(p).notification_request)),
        _ => None,
    };
    let notifications = drain_notifications(ctx, notes_base, schedule, kafka, entry.count + active, Duration::from_secs_f64(cfg.drain_timeout_s)).await?;
    let position_latency = Summary::from_ms(std::mem::take(&mut *position_ms.lock().unwrap()));
    Ok(QueueSpike {
        config: Some(cfg.clone()),
        user_creation,
        entry,
        entry_latency,
        entry_errors,
        position_latency,
        position_queries_during_entry: during,
        position_errors: position_errors.load(Ordering::Relaxed),
        admission,
        notifications,
    })
}

fn admission(start: Option<f64>, samples: &[(f64, f64)], active: usize, first_entry: f64, last_entry: f64, all_active_at: Option<f64>) -> Admission {
    let target = start.map(|s| s + active as f64);
    let reached = target.and_then(|t| samples.iter().find(|(_, v)| *v >= t).map(|(at, _)| *at));
    let (at, by) = match reached {
        Some(at) => (at, "metrics"),
        None => (all_active_at.unwrap_or(last_entry), "statuses"),
    };
    let span = (at - first_entry).max(1e-3);
    Admission {
        active,
        admitted_metric: start.and_then(|s| samples.last().map(|(_, v)| v - s)),
        per_second: (active as f64 / span * 10.0).round() / 10.0,
        all_admitted_after_s: (span * 1000.0).round() / 1000.0,
        after_last_entry_ms: ((at - last_entry) * 1000.0).round(),
        measured_by: by.into(),
    }
}

const QUEUE_TYPES: &str = "type IN ('QUEUE_POSITION', 'QUEUE_ACTIVATED')";

/// Waits until `expected` queue notifications after `notes_base` are stored (or no progress for
/// 15 s, or `timeout`), then reads the pipeline's rates from PostgreSQL, and, given `kafka`
/// (brokers, the notification request topic), the publishing from Kafka.
pub async fn drain_notifications(
    ctx: &Ctx,
    notes_base: i64,
    schedule: uuid::Uuid,
    kafka: Option<(String, String)>,
    expected: usize,
    timeout: Duration,
) -> Result<Notifications> {
    let bar = ctx.bar(expected, "notifications stored");
    let deadline = Instant::now() + timeout;
    let (mut last, mut last_change) = (0i64, Instant::now());
    loop {
        let stored: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM notifications WHERE id > $1 AND {QUEUE_TYPES}"))
            .bind(notes_base)
            .fetch_one(&ctx.pool)
            .await?;
        bar.set_position(stored as u64);
        if stored != last {
            (last, last_change) = (stored, Instant::now());
        }
        if stored as usize >= expected || Instant::now() > deadline || last_change.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish_and_clear();

    let (stored, span, delivered, delivered_span): (i64, Option<f64>, i64, Option<f64>) = sqlx::query_as(&format!(
        "SELECT count(*), EXTRACT(EPOCH FROM max(created_at) - min(created_at))::float8,
                count(delivered_at), EXTRACT(EPOCH FROM max(delivered_at) - min(delivered_at))::float8
         FROM notifications n LEFT JOIN notification_deliveries d ON d.notification_id = n.id WHERE n.id > $1 AND {QUEUE_TYPES}"
    ))
    .bind(notes_base)
    .fetch_one(&ctx.pool)
    .await?;
    let peak: i64 = sqlx::query_scalar(&format!(
        "SELECT COALESCE(max(c), 0)::bigint FROM (SELECT count(*) AS c FROM notifications WHERE id > $1 AND {QUEUE_TYPES}
         GROUP BY date_trunc('second', created_at)) x"
    ))
    .bind(notes_base)
    .fetch_one(&ctx.pool)
    .await?;
    // Each of this schedule's queue notifications as sent: (event time, first append), in ms.
    let mut sent: std::collections::HashMap<uuid::Uuid, (f64, Option<i64>)> = std::collections::HashMap::new();
    if let Some((brokers, topic)) = &kafka {
        let schedule = schedule.to_string();
        for r in super::topic::read_to_end(brokers, topic).await? {
            let Ok(e) = serde_json::from_slice::<booking::kafka::Envelope<serde_json::Value>>(&r.payload) else { continue };
            let queue = matches!(e.payload["type"].as_str(), Some("QUEUE_POSITION" | "QUEUE_ACTIVATED"));
            if queue && e.payload["data"]["scheduleId"].as_str() == Some(schedule.as_str()) {
                let at = e.event_time.timestamp_micros() as f64 / 1000.0;
                let first = sent.get(&e.event_id).and_then(|s| s.1).into_iter().chain(r.appended_ms).min();
                sent.insert(e.event_id, (at, first));
            }
        }
    }
    let appended: Vec<i64> = sent.values().filter_map(|s| s.1).collect();
    let (published, pub_span) = match (appended.iter().min(), appended.iter().max()) {
        (Some(lo), Some(hi)) => (appended.len() as i64, Some((hi - lo) as f64 / 1000.0)),
        _ => (0, None),
    };
    let stored_at: Vec<(uuid::Uuid, f64)> = sqlx::query_as(&format!(
        "SELECT event_id, (EXTRACT(EPOCH FROM created_at) * 1000)::float8 FROM notifications WHERE id > $1 AND {QUEUE_TYPES}"
    ))
    .bind(notes_base)
    .fetch_all(&ctx.pool)
    .await?;
    let lags: Vec<f64> = stored_at.iter().filter_map(|(id, at)| sent.get(id).map(|s| at - s.0)).collect();
    let rate = |count: i64, span: Option<f64>| match span {
        Some(s) if s > 0.0 => (count as f64 / s * 10.0).round() / 10.0,
        _ => 0.0,
    };
    let out = Notifications {
        expected,
        stored: stored as usize,
        stored_per_second: rate(stored, span),
        peak_second: peak,
        stored_span_s: span.unwrap_or(0.0),
        published: published as usize,
        published_per_second: rate(published, pub_span),
        outbox_to_stored: Summary::from_ms(lags),
        delivered: delivered as usize,
        delivered_per_second: rate(delivered, delivered_span),
        drained: stored as usize >= expected,
    };
    ctx.say(&format!(
        "notifications: {} stored at {:.0}/s (peak second {}), published at {:.0}/s, outbox→stored {}",
        out.stored, out.stored_per_second, out.peak_second, out.published_per_second, out.outbox_to_stored.short()
    ));
    Ok(out)
}
