//! Wake-ups without NOTIFY in the booking transactions (issue 11): holds, payments and queue
//! entries commit without sending a NOTIFY (PostgreSQL serializes the commits of notifying
//! transactions), yet their events still leave through the outbox at once, with the relay's
//! poll interval set to an hour; the worker announces a stored batch with one NOTIFY per up to
//! 100 users, not one per row, and names every user whose stream has something new, with the
//! position to wake it with; and the
//! api's stream feed acts on that announcement, so a payment's PAYMENT_CONFIRMED reaches an open
//! stream with every poll on the path (relay, feed) set to an hour.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use booking::app::{ApiSettings, WorkerSettings};
use booking::kafka::{partition_for, Envelope, EventType, PARTITIONS};
use booking::notification::{self, Kind, NotificationRequest};
use booking::queue::QueueConfig;
use common::{eventually, inproc, QueueSettings, TestApi, TestEnv, ADMIN};
use rdkafka::producer::FutureRecord;
use serde_json::json;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The api with the outbox relay's fallback poll at one hour: an event that leaves quickly was
/// woken by its commit, not found by a poll. `streams` sets the live streams' feed.
async fn api_without_poll(env: &TestEnv, streams: booking::sequencer::StreamSettings) -> TestApi {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let q = QueueSettings::default();
    let settings = ApiSettings {
        hold_ttl: Duration::from_secs(300),
        refund_cutoff: Duration::from_secs(24 * 3600),
        max_seats_per_user: 4,
        admin_token: ADMIN.into(),
        queue: QueueConfig {
            tick: q.tick,
            batch: q.batch,
            max_active: q.max_active,
            idle: q.idle,
            active_limit: Duration::from_secs(900),
            early_order: booking::queue::EarlyOrder::Shuffle,
            secret: "test-secret".into(),
        },
        outbox_batch: 500,
        outbox_poll: Duration::from_secs(3600),
        streams,
    };
    let handle = tokio::spawn(booking::app::run_api(env.res.clone(), settings, listener, None, booking::telemetry::install_metrics(), shutdown.clone()));
    TestApi { base: format!("http://{addr}"), metrics_url: None, http: reqwest::Client::new(), shutdown, handle: Some(handle) }
}

fn worker_settings(env: &TestEnv) -> WorkerSettings {
    WorkerSettings {
        delivery_poll: Duration::from_secs(1),
        delivery_batch: 1000,
        delivery_max_backoff: Duration::from_secs(1),
        ranking_reconcile: booking::worker::ReconcileEvery { window: Duration::from_secs(3600), full: Duration::from_secs(3600) },
        ..inproc::worker_settings(env)
    }
}

/// Runs the real worker (consumers, store, announcement) until `shutdown`.
fn start_worker(env: &TestEnv, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
    let settings = worker_settings(env);
    let (res, group, sd) = (env.res.clone(), format!("{}worker-", env.prefix), shutdown.clone());
    tokio::spawn(async move {
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        booking::app::run_worker(res, settings, &group, ops, booking::telemetry::install_metrics(), sd).await.unwrap();
    })
}

/// A user with points, queued and admitted, holding one seat of a new concert: (user, reservation).
async fn holding_fan(api: &TestApi) -> (common::User, String) {
    let u = api.user("fan").await;
    api.charge(&u, 100_000).await;
    let (schedule, seats) = api.concert(1, 1000).await;
    let token = api.active_token(&u, &schedule).await;
    let r = api.hold(&u, &token, &seats[0]).await;
    assert_eq!(r.status(), 201);
    let reservation = r.json::<serde_json::Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string();
    (u, reservation)
}

async fn listen(env: &TestEnv, channels: &[&str]) -> PgListener {
    let mut l = PgListener::connect(&env.db_url).await.unwrap();
    l.listen_all(channels.iter().copied()).await.unwrap();
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_payments_and_queue_entries_commit_without_notify_and_their_events_leave_at_once() {
    let env = TestEnv::new().await;
    let mut listener = listen(&env, &["outbox_new", notification::STORED_CHANNEL]).await;
    let api = api_without_poll(&env, Default::default()).await;
    let (u, reservation) = holding_fan(&api).await;
    let t = env.topics();
    // Well under the relay's one-hour poll.
    let created = env.read_topic(&t.reservation_created, 1, Duration::from_secs(20)).await;
    assert_eq!(created.len(), 1, "the hold's reservation.created left without waiting for a poll");
    let r = api.pay(&u, "pay-1", &reservation).await;
    assert_eq!(r.status(), 201);
    let paid = env.read_topic(&t.payment_completed, 1, Duration::from_secs(20)).await;
    assert_eq!(paid.len(), 1, "the payment's payment.completed left without waiting for a poll");
    // QUEUE_POSITION, QUEUE_ACTIVATED and PAYMENT_CONFIRMED.
    let notes = env.read_topic(&t.notification_request, 3, Duration::from_secs(20)).await;
    assert_eq!(notes.len(), 3, "{notes:?}");

    // Every one of those commits is long done; a NOTIFY sent by any of them would have arrived.
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(heard.is_err(), "a booking commit sent a NOTIFY: {:?}", heard.map(|n| n.map(|n| n.channel().to_string())));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_announces_each_stored_batch_once_naming_every_user_with_their_position() {
    let env = TestEnv::new().await;
    let users: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    // The backlog is in Kafka before the worker starts, so it stores it in a few large batches.
    let topic = env.topics().notification_request.clone();
    let mut sends = Vec::new();
    for user in &users {
        let req = NotificationRequest::new(Kind::QueueActivated, *user, json!({}));
        let env_ = Envelope::with_id(Uuid::new_v4(), EventType::NotificationRequest, req);
        let payload = serde_json::to_string(&env_).unwrap();
        let key = user.to_string();
        let record = FutureRecord::to(&topic).key(&key).payload(&payload).partition(partition_for(&key, PARTITIONS));
        sends.push(env.res.producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for s in sends {
        s.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let mut listener = listen(&env, &[notification::STORED_CHANNEL]).await;

    let shutdown = CancellationToken::new();
    let worker = start_worker(&env, &shutdown);

    // Listen until every user was named (or the deadline), counting the announcements.
    let mut named: HashSet<Uuid> = HashSet::new();
    let mut positions: std::collections::HashMap<Uuid, i64> = Default::default();
    let mut announcements = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while named.len() < users.len() {
        let Ok(n) = tokio::time::timeout_at(deadline, listener.recv()).await else { break };
        announcements += 1;
        let n = n.unwrap();
        named.extend(notification::announced_users(n.payload()));
        for item in n.payload().split(',') {
            let (user, pos) = item.split_once(':').expect("every item says `user:position`");
            positions.insert(user.parse().unwrap(), pos.parse().unwrap());
        }
    }
    assert_eq!(named, users.iter().copied().collect::<HashSet<_>>(), "every user with a new notification is named");
    // Up to 500 messages per consumed batch and 100 users per payload: a handful, whatever the
    // batch boundaries; one per row would be 300.
    assert!(announcements <= 30, "{announcements} announcements for 300 rows: one per row, not per batch");
    let pool = env.pool.clone();
    eventually(Duration::from_secs(30), || {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notifications").fetch_one(&pool).await.unwrap() == 300 }
    })
    .await;
    // The position announced for a user is the one their notification got: what the api's
    // streams are woken with, without reading.
    let stored: std::collections::HashMap<Uuid, i64> =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT user_id, pos FROM notifications").fetch_all(&env.pool).await.unwrap().into_iter().collect();
    assert_eq!(positions, stored, "each user announced with their notification's stream position");
    shutdown.cancel();
    let _ = worker.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payments_notification_reaches_an_open_stream_when_every_poll_on_the_path_is_an_hour() {
    let env = TestEnv::new().await;
    // The feed's first step runs at start; after it, only the worker's announcement can wake it.
    let streams = booking::sequencer::StreamSettings { poll: Duration::from_secs(3600), ..Default::default() };
    let api = api_without_poll(&env, streams).await;
    let shutdown = CancellationToken::new();
    let worker = start_worker(&env, &shutdown);

    let (u, reservation) = holding_fan(&api).await;

    let resp = api.http.get(api.url("/v1/users/me/notifications/stream")).bearer_auth(&u.token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut resp = resp;
            while let Ok(Some(chunk)) = resp.chunk().await {
                seen.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk));
            }
        })
    };

    let r = api.pay(&u, "pay-1", &reservation).await;
    assert_eq!(r.status(), 201);
    // Far inside the feed's one-hour poll: the announcement woke it.
    eventually(Duration::from_secs(20), || {
        let seen = seen.clone();
        async move { seen.lock().unwrap().contains("PAYMENT_CONFIRMED") }
    })
    .await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.matches("\"PAYMENT_CONFIRMED\"").count(), 1, "exactly once on the stream: {got}");

    reader.abort();
    shutdown.cancel();
    let _ = worker.await;
    api.stop().await;
}
