//! Wake-ups without NOTIFY in the booking transactions (issue 11): holds, payments and queue
//! entries commit without sending a NOTIFY (PostgreSQL serializes the commits of notifying
//! transactions), yet their events still leave through the outbox at once, with the relay's
//! poll interval set to an hour; the worker announces a stored batch with one NOTIFY per up to
//! 200 users, not one per row, and names every user whose stream has something new.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use booking::app::{ApiSettings, WorkerSettings};
use booking::export::Sink;
use booking::kafka::{partition_for, Envelope, EventType, PARTITIONS};
use booking::notification::{self, Kind, NotificationRequest};
use booking::queue::QueueConfig;
use booking::worker::Channel;
use common::{eventually, QueueSettings, TestApi, TestEnv, ADMIN};
use rdkafka::producer::FutureRecord;
use serde_json::json;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The api with the outbox relay's fallback poll at one hour: an event that leaves quickly was
/// woken by its commit, not found by a poll.
async fn api_without_poll(env: &TestEnv) -> TestApi {
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
        streams: booking::sequencer::StreamSettings::default(),
    };
    let handle = tokio::spawn(booking::app::run_api(env.res.clone(), settings, listener, None, booking::telemetry::install_metrics(), shutdown.clone()));
    TestApi { base: format!("http://{addr}"), metrics_url: None, http: reqwest::Client::new(), shutdown, handle: Some(handle) }
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
    let api = api_without_poll(&env).await;
    let u = api.user("fan").await;
    api.charge(&u, 100_000).await;
    let (schedule, seats) = api.concert(2, 1000).await;
    let token = api.active_token(&u, &schedule).await;
    let r = api.hold(&u, &token, &seats[0]).await;
    assert_eq!(r.status(), 201);
    let reservation = r.json::<serde_json::Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string();
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
async fn the_worker_announces_each_stored_batch_once_naming_every_user() {
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
    let settings = WorkerSettings {
        channel: Channel::Log,
        sink: Sink::File(std::env::temp_dir().join(format!("wakeup-export-{}.jsonl", env.prefix))),
        delivery_poll: Duration::from_secs(1),
        delivery_batch: 1000,
        delivery_max_backoff: Duration::from_secs(1),
        ranking_reconcile: Duration::from_secs(3600),
        ranking_retention: Default::default(),
        retention: Default::default(),
    };
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (res, group, sd) = (env.res.clone(), format!("{}worker-", env.prefix), shutdown.clone());
    let worker = tokio::spawn(async move {
        booking::app::run_worker(res, settings, &group, ops, booking::telemetry::install_metrics(), sd).await.unwrap();
    });

    // Listen until every user was named (or the deadline), counting the announcements.
    let mut named: HashSet<Uuid> = HashSet::new();
    let mut announcements = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while named.len() < users.len() {
        let Ok(n) = tokio::time::timeout_at(deadline, listener.recv()).await else { break };
        announcements += 1;
        named.extend(notification::announced_users(n.unwrap().payload()));
    }
    assert_eq!(named, users.iter().copied().collect::<HashSet<_>>(), "every user with a new notification is named");
    // Up to 500 messages per consumed batch and 200 users per payload: a handful, whatever the
    // batch boundaries; one per row would be 300.
    assert!(announcements <= 30, "{announcements} announcements for 300 rows: one per row, not per batch");
    let pool = env.pool.clone();
    eventually(Duration::from_secs(30), || {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notifications").fetch_one(&pool).await.unwrap() == 300 }
    })
    .await;
    shutdown.cancel();
    let _ = worker.await;
}
