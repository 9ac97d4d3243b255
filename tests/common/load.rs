//! A booking load for fault tests and the invariants that must hold once it settles: simulated
//! customers (queue, hold, then pay, cancel or walk away) against one or several api processes,
//! and every check of the chaos run (no hold past its expiry, no double sale or payment, one
//! notification per outcome, ranking and export exact, outbox empty, nothing dead-lettered).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::TestEnv;

/// What the customers did.
#[derive(Default)]
pub struct Ops {
    pub holds: AtomicU64,
    pub conflicts: AtomicU64,
    pub payments: AtomicU64,
    pub cancels: AtomicU64,
    pub left_to_expire: AtomicU64,
    pub unavailable: AtomicU64,
}

impl Ops {
    pub fn table(&self) -> Vec<(&'static str, u64)> {
        [("holds", &self.holds), ("seat conflicts (409)", &self.conflicts), ("payments", &self.payments), ("cancellations", &self.cancels), ("holds left to expire", &self.left_to_expire), ("requests refused or failed during faults", &self.unavailable)]
            .into_iter()
            .map(|(n, v)| (n, v.load(Ordering::Relaxed)))
            .collect()
    }
}

fn dice() -> u8 {
    Uuid::new_v4().as_bytes()[0]
}

/// An HTTP client over one or several api processes: a request that cannot reach one (refused,
/// timed out) moves this client to the next, as a load balancer would.
pub struct Client {
    pub http: reqwest::Client,
    pub bases: Vec<String>,
    next: AtomicUsize,
}

impl Client {
    pub fn new(bases: Vec<String>) -> Self {
        Self { http: reqwest::Client::new(), bases, next: AtomicUsize::new(0) }
    }

    /// Sends the request built for the current api; `None` if it could not be reached.
    pub async fn send(&self, build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder) -> Option<(u16, Value)> {
        let i = self.next.load(Ordering::Relaxed) % self.bases.len();
        // 30 s: on a machine shared with compilers a healthy api can take seconds to answer.
        match build(&self.http, &self.bases[i]).timeout(Duration::from_secs(30)).send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                Some((s, r.json().await.unwrap_or(Value::Null)))
            }
            Err(_) => {
                let _ = self.next.compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
                None
            }
        }
    }
}

impl Client {
    /// Like [`Client::send`], trying the apis in turn (up to 20 times) until one answers.
    pub async fn send_until_reached(&self, build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder) -> (u16, Value) {
        for _ in 0..20 {
            if let Some(r) = self.send(&build).await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no api answered");
    }
}

/// One simulated customer: queue, pick a free seat, hold, then pay, cancel or walk away.
pub async fn customer(c: Arc<Client>, token: String, schedules: Arc<Vec<String>>, ops: Arc<Ops>, stop: CancellationToken) {
    let pause = || tokio::time::sleep(Duration::from_millis(200));
    while !stop.is_cancelled() {
        let schedule = schedules[dice() as usize % schedules.len()].clone();
        let Some((201, v)) = c.send(|h, b| h.post(format!("{b}/v1/queue/tokens")).bearer_auth(&token).json(&json!({"scheduleId": schedule}))).await else {
            ops.unavailable.fetch_add(1, Ordering::Relaxed);
            pause().await;
            continue;
        };
        let qt = v["queueToken"].as_str().unwrap_or_default().to_string();
        if v["status"] != "ACTIVE" {
            pause().await;
            continue;
        }
        let Some((200, seats)) = c.send(|h, b| h.get(format!("{b}/v1/schedules/{schedule}/seats"))).await else {
            ops.unavailable.fetch_add(1, Ordering::Relaxed);
            pause().await;
            continue;
        };
        let free: Vec<&Value> = seats["items"].as_array().map(|a| a.iter().filter(|s| s["status"] == "AVAILABLE").collect()).unwrap_or_default();
        if free.is_empty() {
            pause().await;
            continue;
        }
        let seat = free[dice() as usize % free.len()]["seatId"].as_str().unwrap().to_string();
        let held = c.send(|h, b| h.post(format!("{b}/v1/reservations")).bearer_auth(&token).header("X-Queue-Token", &qt).json(&json!({"seatId": seat}))).await;
        let id = match held {
            Some((201, v)) => {
                ops.holds.fetch_add(1, Ordering::Relaxed);
                v["reservationId"].as_str().unwrap().to_string()
            }
            Some((409, _)) => {
                ops.conflicts.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => {
                ops.unavailable.fetch_add(1, Ordering::Relaxed);
                pause().await;
                continue;
            }
        };
        let d = dice();
        if d < 110 {
            // Pay, retrying with the same key through outages: it must charge once.
            let key = Uuid::new_v4().to_string();
            for _ in 0..20 {
                match c.send(|h, b| h.post(format!("{b}/v1/payments")).bearer_auth(&token).header("Idempotency-Key", &key).json(&json!({"reservationId": id}))).await {
                    Some((201, _)) => {
                        ops.payments.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some((s, _)) if s < 500 => break,
                    _ => {
                        ops.unavailable.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        } else if d < 160 {
            if let Some((200, _)) = c.send(|h, b| h.delete(format!("{b}/v1/reservations/{id}")).bearer_auth(&token)).await {
                ops.cancels.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            ops.left_to_expire.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn scalar(env: &TestEnv, sql: &str) -> Option<i64> {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(&env.pool).await.ok()
}

/// Every invariant of the chaos run, with its current verdict. `overdue` is how long past its
/// expiry a hold may still be HELD (the settling time of the path under test).
pub async fn invariants(env: &TestEnv, client: &Client, export: &Path, overdue: Duration) -> Vec<(&'static str, bool, String)> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, ok: bool, detail: String| out.push((name, ok, detail));
    let n = scalar(env, &format!("SELECT count(*) FROM reservations WHERE status = 'HELD' AND expires_at < now() - interval '{} milliseconds'", overdue.as_millis())).await;
    check("no hold still HELD past its expiry", n == Some(0), format!("{n:?} overdue"));
    let n = scalar(env, "SELECT count(*) FROM (SELECT seat_id FROM reservations WHERE status IN ('HELD','CONFIRMED') GROUP BY seat_id HAVING count(*) > 1) x").await;
    check("no seat with two HELD/CONFIRMED reservations", n == Some(0), format!("{n:?} seats"));
    let n = scalar(env, "SELECT count(*) FROM (SELECT reservation_id FROM payments GROUP BY 1 HAVING count(*) > 1) x").await;
    let m = scalar(env, "SELECT (SELECT count(*) FROM reservations WHERE status = 'CONFIRMED') - (SELECT count(*) FROM payments)").await;
    check("no reservation with two payments; one payment per CONFIRMED", n == Some(0) && m == Some(0), format!("{n:?} doubled, {m:?} difference"));
    let n = scalar(env, "SELECT count(*) FROM users u WHERE u.balance < 0 OR u.balance <> COALESCE((SELECT sum(CASE kind WHEN 'USE' THEN -amount ELSE amount END) FROM point_ledger l WHERE l.user_id = u.id), 0)").await;
    check("balance = charges − uses + refunds, never negative", n == Some(0), format!("{n:?} users off"));
    // One grouped pass over the notifications (a hash join), not one scan per reservation.
    let per_outcome = |status: &str, kind: &str| {
        format!(
            "SELECT count(*) FROM reservations r LEFT JOIN (SELECT data->>'reservationId' AS rid, count(*) AS c FROM notifications
             WHERE type = '{kind}' GROUP BY 1) n ON n.rid = r.id::text WHERE r.status = '{status}' AND COALESCE(n.c, 0) <> 1"
        )
    };
    let n = scalar(env, &per_outcome("EXPIRED", "RESERVATION_EXPIRED")).await;
    let m = scalar(env, &per_outcome("CONFIRMED", "PAYMENT_CONFIRMED")).await;
    check("one notification per EXPIRED and per CONFIRMED", n == Some(0) && m == Some(0), format!("{n:?} expired, {m:?} confirmed without exactly one"));
    let db: Vec<(String, i64)> = sqlx::query_as("SELECT schedule_id::text, count(*) FROM reservations WHERE status = 'CONFIRMED' GROUP BY 1").fetch_all(&env.pool).await.unwrap_or_default();
    let ranking = client.send(|h, b| h.get(format!("{b}/v1/rankings/schedules?limit=100"))).await;
    let ours: Option<Vec<(String, i64)>> = ranking.and_then(|(_, v)| v["items"].as_array().map(|a| a.iter().map(|e| (e["scheduleId"].as_str().unwrap_or_default().to_string(), e["soldSeats"].as_i64().unwrap_or(-1))).filter(|(_, n)| *n > 0).collect()));
    let ranking_ok = ours.as_ref().is_some_and(|o| {
        let mut a = o.clone();
        let mut b = db.clone();
        a.sort();
        b.sort();
        a == b
    });
    check("ranking = confirmed seats per schedule", ranking_ok, format!("db {db:?}, ranking {ours:?}"));
    let payments: Vec<String> = sqlx::query_scalar("SELECT id::text FROM payments").fetch_all(&env.pool).await.unwrap_or_default();
    let lines: Vec<String> = std::fs::read_to_string(export).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).map(|v| v["paymentId"].as_str().unwrap_or_default().to_string()).collect();
    let distinct: HashSet<&String> = lines.iter().collect();
    let want: HashSet<&String> = payments.iter().collect();
    check("export holds each payment once", lines.len() == distinct.len() && distinct == want, format!("{} lines, {} payments", lines.len(), payments.len()));
    // The outbox keeps only what is still to be sent (migration 0210).
    let n = scalar(env, "SELECT count(*) FROM outbox").await;
    check("outbox fully published", n == Some(0), format!("{n:?} unpublished"));
    out
}

/// Messages in every dead-letter topic of `env` (from the partitions' watermarks: instant).
pub async fn dead_letters(env: &TestEnv) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let brokers = env.brokers.clone();
    let topics: Vec<String> = env.topics().specs().into_iter().map(|(t, _)| t).filter(|t| t.ends_with(".dlq")).collect();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = rdkafka::config::ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", "dlq-count").create().unwrap();
        let mut n = 0usize;
        for t in &topics {
            for p in 0..booking::kafka::PARTITIONS {
                let (lo, hi) = c.fetch_watermarks(t, p, Duration::from_secs(10)).unwrap_or((0, 0));
                n += (hi - lo).max(0) as usize;
            }
        }
        n
    })
    .await
    .unwrap()
}

/// p50, p99 and max of `v` (sorted here), or zeros when empty.
pub fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}
