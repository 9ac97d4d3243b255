//! Notification delivery over the webhook channel (issue 15, items 5 and 6), against the real
//! PostgreSQL and a real HTTP receiver: a crash re-sends only what was in flight, no transaction
//! stays open while a receiver answers, deliveries run a bounded number at a time, every request
//! carries a Stripe-style timestamped signature, the worker refuses to start the webhook channel
//! without a secret, and each notification keeps a delivery log operators can read.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use booking::worker::{Channel, Deliverer};
use common::TestEnv;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;
use uuid::Uuid;
use warp::Filter;

const SECRET: &str = "whsec-test";

/// One request the receiver got: event id, signature header, body.
type Received = (String, String, Vec<u8>);

/// A webhook receiver: records every request (event id, signature header, body), answers with
/// `status()` and, when `gate` is set, holds each request until the test releases a permit.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
    status: Arc<AtomicUsize>,
}

impl Receiver {
    fn new(gate: Option<Arc<Semaphore>>) -> Self {
        let r = Receiver { gate, ..Default::default() };
        r.status.store(200, Ordering::SeqCst);
        r
    }

    async fn serve(&self) -> String {
        let me = self.clone();
        let hook = warp::post()
            .and(warp::header::<String>("x-event-id"))
            .and(warp::header::<String>("x-signature"))
            .and(warp::body::bytes())
            .then(move |event: String, sig: String, body: bytes::Bytes| {
                let me = me.clone();
                async move {
                    let now = me.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    me.most_in_flight.fetch_max(now, Ordering::SeqCst);
                    if let Some(g) = &me.gate {
                        g.acquire().await.unwrap().forget();
                    }
                    me.got.lock().unwrap().push((event, sig, body.to_vec()));
                    me.in_flight.fetch_sub(1, Ordering::SeqCst);
                    warp::http::StatusCode::from_u16(me.status.load(Ordering::SeqCst) as u16).unwrap()
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(hook).incoming(listener).run());
        format!("http://{addr}/hook")
    }

    fn received(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    fn per_event(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (e, _, _) in self.got.lock().unwrap().iter() {
            *m.entry(e.clone()).or_default() += 1;
        }
        m
    }
}

fn webhook(url: &str, timeout: Duration, concurrency: usize) -> Channel {
    Channel::webhook(url, SECRET, timeout, concurrency).expect("a webhook channel with a secret")
}

fn deliverer(env: &TestEnv, channel: Channel, batch: i64) -> Deliverer {
    Deliverer { pool: env.pool.clone(), channel, batch, max_backoff: Duration::from_millis(200) }
}

/// Stores `n` pending notifications directly, as the worker's consumer would.
async fn store(env: &TestEnv, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    sqlx::query(
        "INSERT INTO notifications (event_id, user_id, type, title, message)
         SELECT e, gen_random_uuid(), 'QUEUE_ACTIVATED', '예약 가능', '예약 가능한 시간입니다.' FROM UNNEST($1::uuid[]) AS e",
    )
    .bind(&ids)
    .execute(&env.pool)
    .await
    .unwrap();
    ids
}

async fn delivered(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE status = 'DELIVERED'").fetch_one(&env.pool).await.unwrap()
}

/// Drives steps until every notification is DELIVERED.
async fn drain(env: &TestEnv, d: &Deliverer, total: i64) {
    common::eventually(Duration::from_secs(60), || async {
        let _ = d.step().await;
        delivered(env).await == total
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_resends_only_the_deliveries_that_were_in_flight() {
    let env = TestEnv::new().await;
    // The receiver answers 30 requests, then holds the next ones.
    let gate = Arc::new(Semaphore::new(30));
    let rx = Receiver::new(Some(gate.clone()));
    let url = rx.serve().await;
    store(&env, 60).await;
    let concurrency = 4;
    // One step takes the whole backlog; the worker "crashes" (its task is dropped, connections
    // and all) while the receiver holds a request, after 30 answered.
    let d = deliverer(&env, webhook(&url, Duration::from_secs(1), concurrency), 1000);
    let step = tokio::spawn(async move { d.step().await });
    common::eventually(Duration::from_secs(30), || async { rx.received() == 30 && rx.in_flight.load(Ordering::SeqCst) > 0 }).await;
    step.abort();
    gate.add_permits(10_000);
    let _ = step.await;
    let seen_before_crash = rx.received();

    // A fresh worker delivers the rest, once the crashed worker's claim has lapsed.
    let d = deliverer(&env, webhook(&url, Duration::from_secs(1), concurrency), 1000);
    drain(&env, &d, 60).await;
    let per_event = rx.per_event();
    assert_eq!(per_event.len(), 60, "every notification reached the receiver");
    let resent = per_event.values().filter(|n| **n > 1).count();
    println!("{seen_before_crash} requests before the crash, {resent} notifications sent twice");
    // At most what was sent but not yet recorded: the requests in flight (the concurrency) and
    // one group of outcomes being written (at most the concurrency again).
    assert!(resent <= 2 * concurrency, "{resent} notifications sent twice after a crash, with {concurrency} in flight at most");
    assert!(per_event.values().all(|n| *n <= 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_run_a_bounded_number_at_a_time_and_no_transaction_waits_on_a_receiver() {
    let env = TestEnv::new().await;
    let gate = Arc::new(Semaphore::new(0));
    let rx = Receiver::new(Some(gate.clone()));
    let url = rx.serve().await;
    store(&env, 20).await;
    let concurrency = 4;
    let d = deliverer(&env, webhook(&url, Duration::from_secs(30), concurrency), 1000);
    let step = tokio::spawn(async move { d.step().await });
    // The receiver holds every request: `concurrency` of them arrive together, and meanwhile no
    // transaction of this database is open (nothing holds row locks or VACUUM back).
    common::eventually(Duration::from_secs(20), || async { rx.in_flight.load(Ordering::SeqCst) == concurrency }).await;
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(open, 0, "a transaction stays open while the receiver answers");
    gate.add_permits(1000);
    let (ok, failed) = step.await.unwrap().unwrap();
    assert_eq!((ok, failed), (20, 0));
    assert_eq!(rx.most_in_flight.load(Ordering::SeqCst), concurrency, "never more than {concurrency} at a time");
    assert_eq!(delivered(&env).await, 20);
}

fn hmac_hex(secret: &str, msg: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(msg);
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_webhook_is_signed_over_a_timestamp_and_the_body_and_a_receiver_can_refuse_replays() {
    let env = TestEnv::new().await;
    let rx = Receiver::new(None);
    let url = rx.serve().await;
    let events = store(&env, 3).await;
    let d = deliverer(&env, webhook(&url, Duration::from_secs(5), 4), 1000);
    drain(&env, &d, 3).await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    let now = chrono::Utc::now().timestamp();
    for (event, header, body) in &got {
        // `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
        let parts: HashMap<&str, &str> = header.split(',').filter_map(|kv| kv.split_once('=')).collect();
        let t: i64 = parts.get("t").unwrap_or_else(|| panic!("no t= in {header:?}")).parse().unwrap();
        assert!((now - t).abs() <= 60, "the timestamp is the sending time: {t} vs {now}");
        let mut signed = format!("{t}.").into_bytes();
        signed.extend_from_slice(body);
        assert_eq!(parts.get("v1").copied(), Some(hmac_hex(SECRET, &signed).as_str()), "v1 is the HMAC of t.body");
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["eventId"].as_str(), Some(event.as_str()), "the body carries the event id for de-duplication");
        assert!(events.iter().any(|e| e.to_string() == *event));

        // The verification a receiver runs (docs/webhooks.md): fresh and intact passes,
        // a replay outside the tolerance, a tampered body and another secret do not.
        let tolerance = Duration::from_secs(300);
        booking::webhook::verify(SECRET.as_bytes(), header, body, now, tolerance).expect("a fresh, intact request verifies");
        let later = now + 301;
        assert!(matches!(booking::webhook::verify(SECRET.as_bytes(), header, body, later, tolerance), Err(booking::webhook::VerifyError::OutsideTolerance { .. })));
        let mut tampered = body.clone();
        tampered.push(b' ');
        assert!(matches!(booking::webhook::verify(SECRET.as_bytes(), header, &tampered, now, tolerance), Err(booking::webhook::VerifyError::Mismatch)));
        assert!(matches!(booking::webhook::verify(b"other", header, body, now, tolerance), Err(booking::webhook::VerifyError::Mismatch)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_refuses_to_start_the_webhook_channel_without_a_secret() {
    let env = TestEnv::new().await;
    for secret in [None, Some("")] {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"));
        cmd.args(env.common_args())
            .args(["--metrics-addr", "127.0.0.1:0", "--group-prefix", &format!("{}w-", env.prefix)])
            .args(["--channel", "webhook", "--webhook-url", "http://127.0.0.1:9/hook"])
            .env_remove("WEBHOOK_SECRET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(s) = secret {
            cmd.args(["--webhook-secret", s]);
        }
        let child = cmd.spawn().unwrap();
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("the worker exits instead of running unsigned").unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("--webhook-secret"), "says which flag is missing: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_notification_keeps_a_delivery_log_of_attempts_last_status_and_last_error() {
    let env = TestEnv::new().await;
    let rx = Receiver::new(None);
    let url = rx.serve().await;
    let events = store(&env, 1).await;
    rx.status.store(500, Ordering::SeqCst);
    let d = deliverer(&env, webhook(&url, Duration::from_secs(5), 4), 1000);
    assert_eq!(d.step().await.unwrap(), (0, 1));
    // The operators' query (docs/webhooks.md "The delivery log").
    let log = || async {
        sqlx::query_as::<_, (String, i32, Option<i32>, Option<String>, bool)>(
            "SELECT status, attempts, last_status, last_error, last_attempt_at IS NOT NULL FROM notifications n JOIN notification_deliveries d ON d.notification_id = n.id WHERE n.event_id = $1",
        )
        .bind(events[0])
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    let (state, attempts, status, error, tried) = log().await;
    assert_eq!((state.as_str(), attempts, status, tried), ("PENDING", 1, Some(500), true));
    assert!(error.as_deref().unwrap_or_default().contains("500"), "{error:?}");
    rx.status.store(200, Ordering::SeqCst);
    drain(&env, &d, 1).await;
    let (state, attempts, status, error, _) = log().await;
    assert_eq!((state.as_str(), attempts, status, error), ("DELIVERED", 2, Some(200), None));

    // No receiver at all: no status, the connection error is kept.
    let events = store(&env, 1).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let d = deliverer(&env, webhook(&format!("http://{closed}/hook"), Duration::from_secs(5), 4), 1000);
    assert_eq!(d.step().await.unwrap(), (0, 1));
    let (status, error): (Option<i32>, Option<String>) = sqlx::query_as("SELECT last_status, last_error FROM notifications n JOIN notification_deliveries d ON d.notification_id = n.id WHERE n.event_id = $1").bind(events[0]).fetch_one(&env.pool).await.unwrap();
    assert_eq!(status, None);
    assert!(error.is_some_and(|e| !e.is_empty()));
}

/// `n` notification requests for fresh users, with their event ids.
fn requests(n: usize) -> Vec<(Uuid, booking::notification::NotificationRequest)> {
    use booking::notification::{Kind, NotificationRequest};
    (0..n).map(|_| (Uuid::new_v4(), NotificationRequest::new(Kind::QueueActivated, Uuid::new_v4(), serde_json::json!({ "scheduleId": Uuid::new_v4() })))).collect()
}

async fn pending_due_at(env: &TestEnv) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    sqlx::query_as("SELECT status, next_attempt_at FROM notification_deliveries ORDER BY notification_id").fetch_all(&env.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_with_its_delivery_claimed_is_no_other_workers_until_the_claim_lapses_then_is_delivered_once() {
    let env = TestEnv::new().await;
    let rx = Receiver::new(None);
    let url = rx.serve().await;
    let reqs = requests(20);
    let stored = booking::notification::store_claimed(&env.pool, &reqs, Some(Duration::from_secs(3))).await.unwrap();
    assert_eq!(stored.rows.len(), 20);
    let token = stored.token.expect("a claim for the new rows");
    // Every delivery row was born claimed, with the token the storing worker fences on.
    let rows = pending_due_at(&env).await;
    assert_eq!(rows.len(), 20, "one delivery row per notification, not two");
    assert!(rows.iter().all(|(s, at)| s == "PENDING" && *at == token), "{rows:?} vs {token}");
    // Storing the same requests again stores nothing and claims nothing.
    let again = booking::notification::store_claimed(&env.pool, &reqs, Some(Duration::from_secs(3))).await.unwrap();
    assert!(again.rows.is_empty() && again.token.is_none());

    // Another worker's claim takes none of them while the claim holds.
    let d = deliverer(&env, webhook(&url, Duration::from_secs(1), 4), 1000);
    assert_eq!(d.step().await.unwrap(), (0, 0));
    assert_eq!(rx.received(), 0);

    // The storing worker died before sending: once its claim lapses, the rows are delivered, once each.
    drain(&env, &d, 20).await;
    let per_event = rx.per_event();
    assert_eq!(per_event.len(), 20);
    assert!(per_event.values().all(|n| *n == 1), "{per_event:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_delivers_what_its_consumer_stored_without_waiting_for_a_claim() {
    use booking::kafka::{Handler, Incoming};
    let env = TestEnv::new().await;
    let rx = Receiver::new(None);
    let url = rx.serve().await;
    // A webhook's claim lasts four request timeouts (here 40 minutes) and the poll is an hour, so
    // only the handoff can deliver these rows: no claim may take them before their lease lapses.
    let d = deliverer(&env, webhook(&url, Duration::from_secs(600), 4), 1000);
    let (handoff, inbox) = d.handoff();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let loop_task = tokio::spawn(d.run_with(Some(inbox), Duration::from_secs(3600), shutdown.clone()));
    let handler = booking::worker::NotificationHandler { pool: env.pool.clone(), handoff: Some(handoff) };
    let reqs = requests(12);
    let msgs: Vec<Incoming> = reqs
        .iter()
        .enumerate()
        .map(|(i, (id, n))| {
            let row = booking::notification::outbox_row(env.topics(), *id, n.clone());
            Incoming { topic: row.topic, partition: 0, offset: i as i64, key: Some(row.key), payload: serde_json::to_vec(&row.envelope).unwrap(), timestamp_ms: None }
        })
        .collect();
    let out = handler.handle_batch(&msgs).await;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    common::eventually(Duration::from_secs(20), || async { delivered(&env).await == 12 }).await;
    let per_event = rx.per_event();
    assert_eq!(per_event.len(), 12);
    assert!(per_event.values().all(|n| *n == 1), "{per_event:?}");
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM notification_deliveries").fetch_all(&env.pool).await.unwrap();
    assert_eq!(attempts, vec![1; 12]);
    // What the receiver got is the stored notification, with its id.
    let (_, _, body) = rx.got.lock().unwrap()[0].clone();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id: i64 = sqlx::query_scalar("SELECT id FROM notifications WHERE event_id = $1").bind(Uuid::parse_str(body["eventId"].as_str().unwrap()).unwrap()).fetch_one(&env.pool).await.unwrap();
    assert_eq!(body["notificationId"], serde_json::json!(id.to_string()));
    assert_eq!(body["title"], "예약 가능");
    shutdown.cancel();
    loop_task.await.unwrap();
}
