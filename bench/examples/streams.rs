//! Benchmark of the live streams (issues 13 and 15 item 7) against a running api:
//! 1. `WATCHERS` seat-map streams on one schedule while `HOLDS` holds expire on their own:
//!    `expiresAt` → the `seat` AVAILABLE event on every stream (p50, p99, max), and the api's CPU
//!    and memory per 1,000 watchers (from /proc of `API_PID`);
//! 2. `IDLE_STREAMS` idle notification streams: the transactions per second the api's database
//!    sees with and without them (pg_stat_database).
//!
//! `API=http://127.0.0.1:18480 API_PID=… DATABASE_URL=… ADMIN_TOKEN=… cargo run -p bench --example streams`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn proc_cpu_seconds(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn proc_rss_mib(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024.0
}

fn pct(v: &[f64], q: f64) -> f64 {
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i]
}

async fn xacts(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn user(http: &reqwest::Client, api: &str, name: &str) -> (String, String) {
    let v: Value = http.post(format!("{api}/v1/users")).json(&json!({"name": name})).send().await.unwrap().json().await.unwrap();
    (v["userId"].as_str().unwrap().to_string(), v["token"].as_str().unwrap().to_string())
}

#[tokio::main]
async fn main() {
    let api = env("API", "http://127.0.0.1:18480");
    let pid = env("API_PID", "");
    let admin = env("ADMIN_TOKEN", "admin");
    let watchers: usize = env("WATCHERS", "2000").parse().unwrap();
    let holds: usize = env("HOLDS", "40").parse().unwrap();
    let idle: usize = env("IDLE_STREAMS", "10000").parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&env("DATABASE_URL", "")).await.unwrap();
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    // --- 1. seat-map streams while holds expire
    let body = json!({"title": "stream bench", "schedules": [{"startsAt": "2030-01-01T19:00:00Z", "bookingOpensAt": "2020-01-01T00:00:00Z", "seatCount": 50, "price": 1}]});
    let v: Value = http.post(format!("{api}/v1/admin/concerts")).bearer_auth(&admin).json(&body).send().await.unwrap().json().await.unwrap();
    let schedule = v["schedules"][0]["scheduleId"].as_str().unwrap().to_string();
    let seats: Value = http.get(format!("{api}/v1/schedules/{schedule}/seats")).send().await.unwrap().json().await.unwrap();
    let seat_ids: Vec<String> = seats["items"].as_array().unwrap().iter().map(|s| s["seatId"].as_str().unwrap().to_string()).collect();

    let (cpu0, rss0) = (proc_cpu_seconds(&pid), proc_rss_mib(&pid));
    // seat id → arrival times of AVAILABLE events, one per stream
    let arrivals: Arc<Mutex<HashMap<String, Vec<DateTime<Utc>>>>> = Arc::default();
    let opened = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let resp = http.get(format!("{api}/v1/schedules/{schedule}/seats/stream")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let arrivals = arrivals.clone();
        tasks.push(tokio::spawn(async move {
            let mut resp = resp;
            let mut buf = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                let now = Utc::now();
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    if !block.contains("event:seat") && !block.contains("event: seat") {
                        continue;
                    }
                    let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
                    let v: Value = serde_json::from_str(data.trim()).unwrap();
                    if v["status"] == "AVAILABLE" {
                        arrivals.lock().unwrap().entry(v["seatId"].as_str().unwrap().to_string()).or_default().push(now);
                    }
                }
            }
        }));
    }
    let open_s = opened.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu1, rss1) = (proc_cpu_seconds(&pid), proc_rss_mib(&pid));

    // Holds by `holds` users on distinct seats; they expire on their own.
    let mut expires: HashMap<String, DateTime<Utc>> = HashMap::new();
    for (i, seat) in seat_ids.iter().take(holds).enumerate() {
        let (_, token) = user(&http, &api, &format!("holder-{i}")).await;
        let q: Value = http.post(format!("{api}/v1/queue/tokens")).bearer_auth(&token).json(&json!({"scheduleId": schedule})).send().await.unwrap().json().await.unwrap();
        let qt = q["queueToken"].as_str().unwrap().to_string();
        loop {
            let s: Value = http.get(format!("{api}/v1/queue/tokens/me")).bearer_auth(&token).header("X-Queue-Token", &qt).send().await.unwrap().json().await.unwrap();
            if s["status"] == "ACTIVE" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r: Value = http.post(format!("{api}/v1/reservations")).bearer_auth(&token).header("X-Queue-Token", &qt).json(&json!({"seatId": seat})).send().await.unwrap().json().await.unwrap();
        expires.insert(seat.clone(), r["expiresAt"].as_str().unwrap().parse().unwrap());
    }
    let cpu_before_wave = proc_cpu_seconds(&pid);
    let wave = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = {
            let a = arrivals.lock().unwrap();
            expires.keys().all(|s| a.get(s).is_some_and(|v| v.len() >= watchers))
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wave_s = wave.elapsed().as_secs_f64();
    let cpu2 = proc_cpu_seconds(&pid);
    let mut lat: Vec<f64> = Vec::new();
    let a = arrivals.lock().unwrap().clone();
    for (seat, at) in &expires {
        for t in a.get(seat).map(|v| v.as_slice()).unwrap_or_default() {
            lat.push((*t - *at).num_microseconds().unwrap() as f64 / 1000.0);
        }
    }
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let want = holds * watchers;
    println!("## seat map: {watchers} streams on one schedule, {holds} holds expiring on their own");
    println!("events received {} of {want}", lat.len());
    if !lat.is_empty() {
        println!("expiresAt → seat event (ms): p50 {:.0}, p99 {:.0}, max {:.0}", pct(&lat, 0.5), pct(&lat, 0.99), lat[lat.len() - 1]);
    }
    println!("opening {watchers} streams took {open_s:.1} s; api CPU {:.2} s for it", cpu1 - cpu0);
    println!("api RSS {rss0:.1} MiB → {rss1:.1} MiB: {:.1} MiB per 1,000 watchers", (rss1 - rss0) * 1000.0 / watchers as f64);
    let per_k = (cpu2 - cpu_before_wave) / (watchers as f64 / 1000.0);
    println!("api CPU during the expiry wave ({wave_s:.1} s): {:.2} CPU-s in all, {per_k:.2} CPU-s per 1,000 watchers ({:.1} % of a core per 1,000 watchers)", cpu2 - cpu_before_wave, per_k / wave_s * 100.0);
    for t in tasks {
        t.abort();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // --- 2. idle notification streams: the database work they cause
    let window = Duration::from_secs(10);
    let x0 = xacts(&pool).await;
    tokio::time::sleep(window).await;
    let base = (xacts(&pool).await - x0) as f64 / window.as_secs_f64();
    let mut streams = Vec::new();
    let users = idle.div_ceil(5);
    for i in 0..users {
        let (_, token) = user(&http, &api, &format!("idle-{i}")).await;
        for _ in 0..5.min(idle - streams.len()) {
            let resp = http.get(format!("{api}/v1/users/me/notifications/stream")).bearer_auth(&token).send().await.unwrap();
            assert_eq!(resp.status(), 200, "stream {}", streams.len());
            streams.push(resp);
        }
    }
    let rss3 = proc_rss_mib(&pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let x1 = xacts(&pool).await;
    let c3 = proc_cpu_seconds(&pid);
    tokio::time::sleep(window).await;
    let with = (xacts(&pool).await - x1) as f64 / window.as_secs_f64();
    let c4 = proc_cpu_seconds(&pid);
    println!("## {} idle notification streams ({users} users × 5)", streams.len());
    println!("database transactions/s on the api's database: {base:.1} with no stream open, {with:.1} with them open");
    println!("api RSS with them open {rss3:.1} MiB; api CPU while idle {:.1} %", (c4 - c3) / window.as_secs_f64() * 100.0);
    drop(streams);
}
