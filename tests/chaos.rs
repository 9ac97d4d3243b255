//! Chaos run (issue: faults and abuse). Keeps a booking load going (holds, payments, cancels,
//! holds left to expire) while every daemon is SIGKILLed and restarted, Kafka is stopped, Redis is
//! flushed and restarted without its data, and PostgreSQL is restarted; then checks that nothing
//! was lost or double-sold. `CHAOS_FULL=1` runs the long version (`scripts/chaos.sh`).
//!
//! Its own test binary: it stops and flushes the shared services, and cargo runs test binaries one
//! after another, so no other test is running meanwhile.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestEnv;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `scripts/services.sh <cmd>` of this checkout, refused unless it acts on this test's services.
fn services(cmd: &str) {
    common::services::run(cmd);
}

struct Daemon {
    name: &'static str,
    bin: &'static str,
    args: Vec<String>,
    metrics_port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(self.bin).args(&self.args).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
    fn sigterm(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
    }
    async fn healthy(&self) {
        let url = format!("http://127.0.0.1:{}/health", self.metrics_port);
        common::eventually(Duration::from_secs(60), || {
            let url = url.clone();
            async move { reqwest::get(url).await.map(|r| r.status() == 200).unwrap_or(false) }
        })
        .await;
    }
}

#[derive(Default)]
struct Ops {
    holds: AtomicU64,
    conflicts: AtomicU64,
    payments: AtomicU64,
    cancels: AtomicU64,
    left_to_expire: AtomicU64,
    unavailable: AtomicU64,
}

fn dice() -> u8 {
    Uuid::new_v4().as_bytes()[0]
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn send(&self, req: reqwest::RequestBuilder) -> Option<(u16, Value)> {
        let r = req.timeout(Duration::from_secs(10)).send().await.ok()?;
        let s = r.status().as_u16();
        Some((s, r.json().await.unwrap_or(Value::Null)))
    }
    fn url(&self, p: &str) -> String {
        format!("{}{}", self.base, p)
    }
}

/// One simulated customer: queue, pick a free seat, hold, then pay, cancel or walk away.
async fn customer(c: Arc<Client>, token: String, schedules: Arc<Vec<String>>, ops: Arc<Ops>, stop: CancellationToken) {
    let pause = || tokio::time::sleep(Duration::from_millis(200));
    while !stop.is_cancelled() {
        let schedule = &schedules[dice() as usize % schedules.len()];
        let Some((201, v)) = c.send(c.http.post(c.url("/v1/queue/tokens")).bearer_auth(&token).json(&json!({"scheduleId": schedule}))).await else {
            ops.unavailable.fetch_add(1, Ordering::Relaxed);
            pause().await;
            continue;
        };
        let qt = v["queueToken"].as_str().unwrap_or_default().to_string();
        if v["status"] != "ACTIVE" {
            pause().await;
            continue;
        }
        let Some((200, seats)) = c.send(c.http.get(c.url(&format!("/v1/schedules/{schedule}/seats")))).await else {
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
        let held = c.send(c.http.post(c.url("/v1/reservations")).bearer_auth(&token).header("X-Queue-Token", &qt).json(&json!({"seatId": seat}))).await;
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
                match c.send(c.http.post(c.url("/v1/payments")).bearer_auth(&token).header("Idempotency-Key", &key).json(&json!({"reservationId": id}))).await {
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
            if let Some((200, _)) = c.send(c.http.delete(c.url(&format!("/v1/reservations/{id}"))).bearer_auth(&token)).await {
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

/// Every invariant of the issue, with its current verdict.
async fn invariants(env: &TestEnv, client: &Client, export: &PathBuf) -> Vec<(&'static str, bool, String)> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, ok: bool, detail: String| out.push((name, ok, detail));
    let n = scalar(env, "SELECT count(*) FROM reservations WHERE status = 'HELD' AND expires_at < now() - interval '6 seconds'").await;
    check("no hold still HELD past expiry + sweeper grace", n == Some(0), format!("{n:?} overdue"));
    let n = scalar(env, "SELECT count(*) FROM (SELECT seat_id FROM reservations WHERE status IN ('HELD','CONFIRMED') GROUP BY seat_id HAVING count(*) > 1) x").await;
    check("no seat with two HELD/CONFIRMED reservations", n == Some(0), format!("{n:?} seats"));
    let n = scalar(env, "SELECT count(*) FROM (SELECT reservation_id FROM payments GROUP BY 1 HAVING count(*) > 1) x").await;
    let m = scalar(env, "SELECT (SELECT count(*) FROM reservations WHERE status = 'CONFIRMED') - (SELECT count(*) FROM payments)").await;
    check("no reservation with two payments; one payment per CONFIRMED", n == Some(0) && m == Some(0), format!("{n:?} doubled, {m:?} difference"));
    let n = scalar(env, "SELECT count(*) FROM users u WHERE u.balance < 0 OR u.balance <> COALESCE((SELECT sum(CASE kind WHEN 'USE' THEN -amount ELSE amount END) FROM point_ledger l WHERE l.user_id = u.id), 0)").await;
    check("balance = charges − uses + refunds, never negative", n == Some(0), format!("{n:?} users off"));
    let n = scalar(env, "SELECT count(*) FROM reservations r WHERE r.status = 'EXPIRED' AND (SELECT count(*) FROM notifications n WHERE n.type = 'RESERVATION_EXPIRED' AND n.data->>'reservationId' = r.id::text) <> 1").await;
    let m = scalar(env, "SELECT count(*) FROM reservations r WHERE r.status = 'CONFIRMED' AND (SELECT count(*) FROM notifications n WHERE n.type = 'PAYMENT_CONFIRMED' AND n.data->>'reservationId' = r.id::text) <> 1").await;
    check("one notification per EXPIRED and per CONFIRMED", n == Some(0) && m == Some(0), format!("{n:?} expired, {m:?} confirmed without exactly one"));
    let db: Vec<(String, i64)> = sqlx::query_as("SELECT schedule_id::text, count(*) FROM reservations WHERE status = 'CONFIRMED' GROUP BY 1").fetch_all(&env.pool).await.unwrap_or_default();
    let ranking = client.send(client.http.get(client.url("/v1/rankings/schedules?limit=100"))).await;
    let ours: Option<Vec<(String, i64)>> = ranking.and_then(|(_, v)| v["items"].as_array().map(|a| a.iter().map(|e| (e["scheduleId"].as_str().unwrap_or_default().to_string(), e["soldSeats"].as_i64().unwrap_or(-1))).collect()));
    let ranking_ok = ours.as_ref().is_some_and(|o| { let mut a = o.clone(); let mut b = db.clone(); a.sort(); b.sort(); a == b });
    check("ranking = confirmed seats per schedule", ranking_ok, format!("db {} schedules", db.len()));
    let payments: Vec<String> = sqlx::query_scalar("SELECT id::text FROM payments").fetch_all(&env.pool).await.unwrap_or_default();
    let lines: Vec<String> = std::fs::read_to_string(export).unwrap_or_default().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).map(|v| v["paymentId"].as_str().unwrap_or_default().to_string()).collect();
    let distinct: HashSet<&String> = lines.iter().collect();
    let want: HashSet<&String> = payments.iter().collect();
    check("export holds each payment once", lines.len() == distinct.len() && distinct == want, format!("{} lines, {} payments", lines.len(), payments.len()));
    let n = scalar(env, "SELECT count(*) FROM outbox WHERE published_at IS NULL").await;
    check("outbox fully published", n == Some(0), format!("{n:?} unpublished"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_faults_nothing_is_lost_and_nothing_is_double_sold() {
    let full = std::env::var("CHAOS_FULL").is_ok();
    let (between, kafka_outage) = if full { (Duration::from_secs(20), Duration::from_secs(30)) } else { (Duration::from_secs(3), Duration::from_secs(8)) };
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(format!("chaos-{}", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("export.jsonl");
    let api_port = free_port();
    let base = format!("http://127.0.0.1:{api_port}");
    let mk = |name: &'static str, bin: &'static str, extra: Vec<String>| {
        let metrics_port = free_port();
        let mut args = env.common_args();
        args.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{metrics_port}")]);
        args.extend(extra);
        Daemon { name, bin, args, metrics_port, log: dir.join(format!("{name}.log")), child: None }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut daemons = vec![
        mk("api", env!("CARGO_BIN_EXE_api"), [s(&["--listen", &format!("127.0.0.1:{api_port}"), "--hold-ttl", "3s", "--admin-token", "adm", "--queue-secret", "chaos", "--queue-tick", "100ms", "--queue-batch", "10000", "--queue-max-active", "100000", "--queue-idle-timeout", "60s"])].concat()),
        mk("delay-scheduler", env!("CARGO_BIN_EXE_delay-scheduler"), s(&["--group", &format!("{}sched", env.prefix), "--lease", "3s", "--rearm-interval", "5s"])),
        mk("expirer", env!("CARGO_BIN_EXE_expirer"), s(&["--group", &format!("{}exp", env.prefix), "--sweep-interval", "2s", "--sweep-grace", "2s"])),
        mk("worker", env!("CARGO_BIN_EXE_worker"), s(&["--group-prefix", &format!("{}w-", env.prefix), "--export-sink", &format!("file:{}", export.display()), "--ranking-reconcile-interval", "2s", "--delivery-poll-interval", "500ms"])),
    ];
    for d in daemons.iter_mut() {
        d.start();
    }
    for d in &daemons {
        d.healthy().await;
    }

    // A sale: schedules of seats, 24 customers with plenty of points. The long run has enough
    // seats that the sale does not sell out before the last fault.
    let (n_schedules, n_seats) = if full { (20, 50) } else { (8, 20) };
    let client = Arc::new(Client { http: reqwest::Client::new(), base: base.clone() });
    let body = json!({"title": "Chaos night", "schedules": (0..n_schedules).map(|_| json!({"startsAt": "2030-01-01T19:00:00Z", "bookingOpensAt": "2020-01-01T00:00:00Z", "seatCount": n_seats, "price": 1000})).collect::<Vec<_>>()});
    let (_, created) = client.send(client.http.post(client.url("/v1/admin/concerts")).bearer_auth("adm").json(&body)).await.unwrap();
    let schedules: Arc<Vec<String>> = Arc::new(created["schedules"].as_array().unwrap().iter().map(|s| s["scheduleId"].as_str().unwrap().to_string()).collect());
    let ops = Arc::new(Ops::default());
    let stop = CancellationToken::new();
    let mut load = Vec::new();
    for i in 0..24 {
        let (_, u) = client.send(client.http.post(client.url("/v1/users")).json(&json!({"name": format!("c{i}")}))).await.unwrap();
        let token = u["token"].as_str().unwrap().to_string();
        let (st, _) = client.send(client.http.post(client.url("/v1/users/me/points/charges")).bearer_auth(&token).header("Idempotency-Key", "seed").json(&json!({"amount": 10_000_000}))).await.unwrap();
        assert_eq!(st, 200);
        load.push(tokio::spawn(customer(client.clone(), token, schedules.clone(), ops.clone(), stop.clone())));
    }

    let mut faults: Vec<(String, Duration)> = Vec::new();
    tokio::time::sleep(between).await;
    for i in 0..daemons.len() {
        let started = Instant::now();
        daemons[i].kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        daemons[i].start();
        daemons[i].healthy().await;
        faults.push((format!("SIGKILL {} and restart", daemons[i].name), started.elapsed()));
        tokio::time::sleep(between).await;
    }
    let started = Instant::now();
    services("stop-kafka");
    tokio::time::sleep(kafka_outage).await;
    services("start-kafka");
    faults.push((format!("Kafka stopped for {}s", kafka_outage.as_secs()), started.elapsed()));
    tokio::time::sleep(between).await;

    let started = Instant::now();
    let mut conn = env.res.redis.clone();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    services("stop-redis");
    services("start-redis");
    faults.push(("Redis flushed and restarted without its data".into(), started.elapsed()));
    tokio::time::sleep(between).await;

    let started = Instant::now();
    services("stop-postgres");
    tokio::time::sleep(Duration::from_secs(2)).await;
    services("start-postgres");
    faults.push(("PostgreSQL restarted".into(), started.elapsed()));
    tokio::time::sleep(between).await;

    stop.cancel();
    for l in load {
        let _ = l.await;
    }

    // Let the system settle, then every invariant must hold.
    let deadline = Instant::now() + Duration::from_secs(180);
    let verdicts = loop {
        let v = invariants(&env, &client, &export).await;
        if v.iter().all(|(_, ok, _)| *ok) || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let dlq_total: usize = {
        let mut n = 0;
        for (t, _) in env.topics().specs().iter().filter(|(t, _)| !t.ends_with(".dlq")) {
            n += env.read_topic(&format!("{t}.dlq"), usize::MAX, Duration::from_secs(2)).await.len();
        }
        n
    };

    println!("\n| fault injected | recovered in |\n| --- | --- |");
    for (f, d) in &faults {
        println!("| {f} | {:.1} s |", d.as_secs_f64());
    }
    println!("\n| operations | count |\n| --- | --- |");
    for (name, v) in [("holds", &ops.holds), ("seat conflicts (409)", &ops.conflicts), ("payments", &ops.payments), ("cancellations", &ops.cancels), ("holds left to expire", &ops.left_to_expire), ("requests refused or failed during faults", &ops.unavailable)] {
        println!("| {name} | {} |", v.load(Ordering::Relaxed));
    }
    println!("\n| invariant | held | detail |\n| --- | --- | --- |");
    for (name, ok, detail) in &verdicts {
        println!("| {name} | {} | {detail} |", if *ok { "yes" } else { "NO" });
    }
    println!("| nothing in a dead-letter topic | {} | {dlq_total} messages |", if dlq_total == 0 { "yes" } else { "NO" });

    for d in daemons.iter_mut() {
        d.sigterm();
    }
    for d in daemons.iter_mut() {
        if let Some(mut c) = d.child.take() {
            let _ = c.wait();
        }
    }
    let failed: Vec<_> = verdicts.iter().filter(|(_, ok, _)| !ok).collect();
    if !failed.is_empty() || dlq_total > 0 {
        for d in &daemons {
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            println!("--- {} log (last lines) ---\n{}", d.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
    assert!(failed.is_empty(), "invariants broken: {failed:?}");
    assert_eq!(dlq_total, 0, "unexplained dead letters");
    assert!(ops.holds.load(Ordering::Relaxed) > 0 && ops.payments.load(Ordering::Relaxed) > 0, "the load really ran");
}
