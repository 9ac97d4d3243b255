//! Test harness: every test gets its own PostgreSQL database, Redis key prefix, Kafka topics and
//! consumer groups, against the real services started by `scripts/services.sh`.
#![allow(dead_code)]

pub mod daemon;
pub mod inproc;
pub mod load;
pub mod services;

use std::time::Duration;

use booking::app::{ApiSettings, Resources};
use booking::kafka::{Envelope, Topics};
use booking::keys::Keys;
use booking::queue::{EarlyOrder, QueueConfig};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through scripts/test.sh"))
}

/// Test databases older than this are dropped by the next test that starts (a test keeps its
/// database afterwards, for a look after a failure; a developer's PostgreSQL would otherwise
/// collect hundreds, each visited by autovacuum).
const KEEP_TEST_DATABASES_FOR: u64 = 2 * 3600;

/// Drops `test_<created>_<id>` databases older than [`KEEP_TEST_DATABASES_FOR`], and the old
/// temporary files of tests, once per test binary. Best effort: another binary may be dropping
/// the same ones.
async fn drop_old_test_leftovers(admin: &PgPool, now: u64) {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'test\\_%'").fetch_all(admin).await.unwrap_or_default();
    for name in names {
        // Older databases of this suite were named `test_<id>`, without their creation time.
        let created = name.strip_prefix("test_").and_then(|rest| rest.split_once('_')).and_then(|(t, _)| t.parse::<u64>().ok()).unwrap_or(0);
        if now.saturating_sub(created) > KEEP_TEST_DATABASES_FOR {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(admin).await;
        }
    }
    remove_old_temp_files(now);
}

/// The same for what tests leave in the temporary directory (export sinks, daemons' logs and data
/// directories): entries named after a test's prefix, `<kind>-t<12 hex digits>.…`, last modified
/// more than [`KEEP_TEST_DATABASES_FOR`] ago.
fn remove_old_temp_files(now: u64) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.match_indices("-t").any(|(i, _)| {
            let rest = &name.as_bytes()[i + 2..];
            rest.len() > 12 && rest[12] == b'.' && rest[..12].iter().all(u8::is_ascii_hexdigit)
        }) {
            continue;
        }
        let modified = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        if modified.is_some_and(|m| now.saturating_sub(m.as_secs()) > KEEP_TEST_DATABASES_FOR) {
            let path = entry.path();
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// One isolated world on the shared services.
#[derive(Clone)]
pub struct TestEnv {
    pub db_url: String,
    pub redis_url: String,
    pub brokers: String,
    pub prefix: String,
    pub pool: PgPool,
    pub res: Resources,
}

impl TestEnv {
    /// On `REDIS_URL` and `KAFKA_BROKERS`. `TOPIC_REPLICATION_FACTOR` is 3 on the cluster
    /// topology (`scripts/services.sh env --topology cluster` exports it): with
    /// min.insync.replicas=2 a topic of one replica refuses every acks=all write.
    pub async fn new() -> Self {
        let replication_factor: i32 = std::env::var("TOPIC_REPLICATION_FACTOR").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        Self::on(var("REDIS_URL"), var("KAFKA_BROKERS"), replication_factor).await
    }

    /// An isolated world on the given Redis and Kafka (the cluster topology's, for example) and
    /// the shared PostgreSQL; topics get `replication_factor` replicas.
    pub async fn on(redis_url: String, brokers: String, replication_factor: i32) -> Self {
        let base = var("DATABASE_URL");
        let id = Uuid::new_v4().simple().to_string()[..12].to_string();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        // The creation time in the name lets a later run drop what this one leaves behind.
        let db = format!("test_{now}_{id}");
        let admin = PgPoolOptions::new().max_connections(1).connect(&base).await.expect("admin connection");
        drop_old_test_leftovers(&admin, now).await;
        sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.expect("create database");
        admin.close().await;
        let (head, _) = base.rsplit_once('/').expect("database url has a path");
        let db_url = format!("{head}/{db}");
        let prefix = format!("t{id}.");
        let common = booking::config::Common {
            database_url: db_url.clone(),
            redis_url: redis_url.clone(),
            kafka_brokers: brokers.clone(),
            topic_prefix: prefix.clone(),
            redis_prefix: prefix.clone(),
            replication_factor,
            db_max_connections: 40,
            log_json: false,
        };
        // Warmed like bin/api's: every test of the api runs on connections that ran the warm-ups.
        let res = Resources::connect_warmed(&common, "test", booking::app::API_WARM).await.expect("resources");
        booking::kafka::bootstrap_topics(&brokers, &res.topics, replication_factor).await.expect("topics");
        let pool = res.pool.clone();
        Self { db_url, redis_url, brokers, prefix, pool, res }
    }

    pub fn topics(&self) -> &Topics {
        &self.res.topics
    }

    pub fn keys(&self) -> &Keys {
        &self.res.keys
    }

    /// Flags shared by every binary for this environment.
    pub fn common_args(&self) -> Vec<String> {
        vec![
            "--database-url".into(), self.db_url.clone(),
            "--redis-url".into(), self.redis_url.clone(),
            "--kafka-brokers".into(), self.brokers.clone(),
            "--topic-prefix".into(), self.prefix.clone(),
            "--redis-prefix".into(), self.prefix.clone(),
        ]
    }

    /// Starts the api in-process on a random port.
    pub async fn api(&self, hold_ttl: Duration, queue: QueueSettings) -> TestApi {
        self.api_with(hold_ttl, queue, FairSettings::default()).await
    }

    /// Starts the api in-process on a random port, with the fair-sale settings of issue 12.
    pub async fn api_with(&self, hold_ttl: Duration, queue: QueueSettings, fair: FairSettings) -> TestApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let settings = ApiSettings {
            hold_ttl,
            refund_cutoff: Duration::from_secs(24 * 3600),
            max_seats_per_user: fair.max_seats_per_user,
            admin_token: ADMIN.into(),
            queue: QueueConfig {
                tick: queue.tick,
                batch: queue.batch,
                max_active: queue.max_active,
                idle: queue.idle,
                active_limit: fair.active_limit,
                early_order: fair.early_order,
                secret: "test-secret".into(),
            },
            outbox_batch: 500,
            outbox_poll: Duration::from_millis(200),
            streams: booking::sequencer::StreamSettings::default(),
        };
        let metrics = booking::telemetry::install_metrics();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_url = format!("http://{}/metrics", ops.local_addr().unwrap());
        let handle = tokio::spawn(booking::app::run_api(self.res.clone(), settings, listener, Some(ops), metrics, shutdown.clone()));
        TestApi { base: format!("http://{addr}"), metrics_url: Some(metrics_url), http: reqwest::Client::new(), shutdown, handle: Some(handle) }
    }

    /// A consumer of every partition of `topic` from the beginning, in a group of its own;
    /// `eof`: it reports the end of each partition.
    fn reader(&self, topic: &str, eof: bool) -> StreamConsumer {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("reader-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", if eof { "true" } else { "false" })
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..booking::kafka::PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        consumer
    }

    /// Reads every message of `topic` from the beginning until `want` arrived or `timeout`.
    pub async fn read_topic(&self, topic: &str, want: usize, timeout: Duration) -> Vec<(Option<String>, Value, Vec<(String, String)>)> {
        let consumer = self.reader(topic, false);
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < want {
            let Ok(msg) = tokio::time::timeout_at(deadline, consumer.recv()).await else { break };
            // A transient error (a partition whose leader is still being elected on a fresh
            // topic of the cluster topology) is retried until the deadline.
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("read_topic {topic}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
            let value = serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap_or(Value::Null);
            let headers = msg.headers().map(|h| {
                use rdkafka::message::Headers;
                h.iter().map(|hd| (hd.key.to_string(), String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned())).collect()
            }).unwrap_or_default();
            out.push((key, value, headers));
        }
        out
    }

    /// Every message on `topic` now: read from the beginning to the end of each partition,
    /// without waiting for more (a partition that cannot be read within 20 s fails the test).
    pub async fn read_topic_to_end(&self, topic: &str) -> Vec<Value> {
        let consumer = self.reader(topic, true);
        let (mut out, mut at_end) = (Vec::new(), std::collections::HashSet::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while at_end.len() < booking::kafka::PARTITIONS as usize {
            let msg = tokio::time::timeout_at(deadline, consumer.recv()).await;
            let msg = msg.unwrap_or_else(|_| panic!("read_topic_to_end {topic}: partitions {at_end:?} of {} at their end after 20 s", booking::kafka::PARTITIONS));
            match msg {
                Ok(m) => out.push(serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null)),
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                }
                Err(e) => {
                    eprintln!("read_topic_to_end {topic}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        out
    }

    /// How many events were written for `topic` that `keep` selects, however far each got: the
    /// outbox holds only what the relay has not sent yet (migration 0210), Kafka has the rest.
    /// The outbox is read first, so an event written before the call is counted wherever the
    /// relay moved it meanwhile; one seen in both places (acknowledged, its row not yet deleted)
    /// counts once, by event id.
    pub async fn written_events(&self, topic: &str, keep: impl Fn(&Value) -> bool) -> usize {
        self.events_written(topic, keep).await.len()
    }

    /// The envelopes `written_events` counts, one per event id.
    pub async fn events_written(&self, topic: &str, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        let waiting: Vec<Value> = sqlx::query_scalar("SELECT envelope FROM outbox WHERE topic = $1").bind(topic).fetch_all(&self.pool).await.unwrap();
        let sent = self.read_topic_to_end(topic).await;
        let mut seen = std::collections::HashSet::new();
        waiting.into_iter().chain(sent).filter(|e| keep(e)).filter(|e| seen.insert(e["eventId"].as_str().unwrap_or_default().to_string())).collect()
    }

    /// How many `RESERVATION_EXPIRED` notifications were written for reservation `id`.
    pub async fn expired_notifications(&self, id: &str) -> i64 {
        let expired = |e: &Value| e["payload"]["type"] == "RESERVATION_EXPIRED" && e["payload"]["data"]["reservationId"] == id;
        self.written_events(&self.topics().notification_request, expired).await as i64
    }

    /// Like `read_topic`, then keeps listening for `settle` to catch unexpected extras.
    pub async fn read_topic_settled(&self, topic: &str, want: usize, timeout: Duration, settle: Duration) -> Vec<Value> {
        let mut got = self.read_topic(topic, want, timeout).await;
        if got.len() >= want {
            tokio::time::sleep(settle).await;
            got = self.read_topic(topic, usize::MAX, Duration::from_secs(3)).await;
        }
        got.into_iter().map(|(_, v, _)| v).collect()
    }
}

pub const ADMIN: &str = "admin-secret";

#[derive(Clone, Copy)]
pub struct QueueSettings {
    pub tick: Duration,
    pub batch: u32,
    pub max_active: u32,
    pub idle: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self { tick: Duration::from_millis(100), batch: 1000, max_active: 100_000, idle: Duration::from_secs(300) }
    }
}

/// The api's issue-12 flags (apart from `QueueSettings` so its literals stay valid).
#[derive(Clone, Copy)]
pub struct FairSettings {
    pub max_seats_per_user: u32,
    pub active_limit: Duration,
    pub early_order: EarlyOrder,
}

impl Default for FairSettings {
    fn default() -> Self {
        Self { max_seats_per_user: 4, active_limit: Duration::from_secs(900), early_order: EarlyOrder::Shuffle }
    }
}

/// A running api and a client for it.
pub struct TestApi {
    pub base: String,
    /// `/metrics` on the operations listener, when the test gave the api one.
    pub metrics_url: Option<String>,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub handle: Option<tokio::task::JoinHandle<()>>,
}

/// A user as the tests drive it.
#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub token: String,
}

impl TestApi {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    pub async fn user(&self, name: &str) -> User {
        let r = self.http.post(self.url("/v1/users")).json(&json!({"name": name})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        User { id: v["userId"].as_str().unwrap().into(), token: v["token"].as_str().unwrap().into() }
    }

    pub async fn charge(&self, u: &User, amount: i64) -> Value {
        let r = self.http.post(self.url("/v1/users/me/points/charges")).bearer_auth(&u.token)
            .header("Idempotency-Key", Uuid::new_v4().to_string()).json(&json!({"amount": amount})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Creates a concert with one schedule of `seats` seats at `price`; returns (scheduleId, seat ids).
    pub async fn concert(&self, seats: i32, price: i64) -> (String, Vec<String>) {
        let body = json!({"title": "Test concert", "schedules": [{"startsAt": "2030-01-01T19:00:00Z", "bookingOpensAt": "2020-01-01T00:00:00Z", "seatCount": seats, "price": price}]});
        let r = self.http.post(self.url("/v1/admin/concerts")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        let schedule = v["schedules"][0]["scheduleId"].as_str().unwrap().to_string();
        let seats = self.seats(&schedule).await.iter().map(|s| s["seatId"].as_str().unwrap().to_string()).collect();
        (schedule, seats)
    }

    pub async fn seats(&self, schedule: &str) -> Vec<Value> {
        let v: Value = self.http.get(self.url(&format!("/v1/schedules/{schedule}/seats"))).send().await.unwrap().json().await.unwrap();
        v["items"].as_array().unwrap().clone()
    }

    pub async fn seat_status(&self, schedule: &str, seat: &str) -> String {
        self.seats(schedule).await.iter().find(|s| s["seatId"] == seat).unwrap()["status"].as_str().unwrap().to_string()
    }

    pub async fn enter_queue(&self, u: &User, schedule: &str) -> Value {
        let r = self.http.post(self.url("/v1/queue/tokens")).bearer_auth(&u.token).json(&json!({"scheduleId": schedule})).send().await.unwrap();
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    }

    pub async fn queue_status(&self, u: &User, token: &str) -> Value {
        let r = self.http.get(self.url("/v1/queue/tokens/me")).bearer_auth(&u.token).header("X-Queue-Token", token).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Enters the queue and waits until the token is ACTIVE.
    pub async fn active_token(&self, u: &User, schedule: &str) -> String {
        let token = self.enter_queue(u, schedule).await["queueToken"].as_str().unwrap().to_string();
        let token2 = token.clone();
        eventually(Duration::from_secs(20), || {
            let t = token2.clone();
            async move { self.queue_status(u, &t).await["status"] == "ACTIVE" }
        })
        .await;
        token
    }

    pub async fn hold(&self, u: &User, token: &str, seat: &str) -> reqwest::Response {
        self.http.post(self.url("/v1/reservations")).bearer_auth(&u.token).header("X-Queue-Token", token)
            .json(&json!({"seatId": seat})).send().await.unwrap()
    }

    pub async fn pay(&self, u: &User, key: &str, reservation: &str) -> reqwest::Response {
        self.http.post(self.url("/v1/payments")).bearer_auth(&u.token).header("Idempotency-Key", key)
            .json(&json!({"reservationId": reservation})).send().await.unwrap()
    }

    pub async fn reservation(&self, u: &User, id: &str) -> reqwest::Response {
        self.http.get(self.url(&format!("/v1/reservations/{id}"))).bearer_auth(&u.token).send().await.unwrap()
    }

    pub async fn balance(&self, u: &User) -> i64 {
        let v: Value = self.http.get(self.url("/v1/users/me/points")).bearer_auth(&u.token).send().await.unwrap().json().await.unwrap();
        v["balance"].as_i64().unwrap()
    }
}

/// Polls `check` until it holds or `timeout` passes (then panics).
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_some(timeout, || {
        let held = check();
        async move { held.await.then_some(()) }
    })
    .await
}

/// Polls `check` until it returns a value or `timeout` passes (then panics); returns the value.
pub async fn eventually_some<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Envelope payload helper.
pub fn payload(v: &Value) -> &Value {
    &v["payload"]
}

pub fn parse_env<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Envelope<T> {
    serde_json::from_value(v.clone()).unwrap()
}
