//! The outbox relay against the real PostgreSQL and Kafka: a row Kafka refuses for good is set
//! aside and every other event still leaves (issue 15 item 8).

mod common;

use std::time::Duration;

use booking::kafka::{Envelope, EventType};
use booking::outbox::{self, Relay};
use rdkafka::producer::Producer;
use common::TestEnv;
use serde_json::json;
use uuid::Uuid;

async fn enqueue(env: &TestEnv, topic: &str, payload: serde_json::Value) -> Uuid {
    let envelope = Envelope::new(EventType::NotificationRequest, payload);
    let mut tx = env.pool.begin().await.unwrap();
    // One key for every row: order is promised per key.
    outbox::enqueue(&mut tx, topic, "one-key", &envelope).await.unwrap();
    tx.commit().await.unwrap();
    envelope.event_id
}

async fn published(env: &TestEnv, event: Uuid) -> bool {
    sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1").bind(event).fetch_one(&env.pool).await.unwrap()
}

/// (set aside, last error) of the row of `event`.
async fn set_aside(env: &TestEnv, event: Uuid) -> (bool, Option<String>) {
    sqlx::query_as("SELECT set_aside_at IS NOT NULL, last_error FROM outbox WHERE event_id = $1").bind(event).fetch_one(&env.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_kafka_refuses_for_good_is_set_aside_and_every_later_event_is_published() {
    let metrics = booking::telemetry::install_metrics();
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let first = enqueue(&env, &topic, json!({"n": 1})).await;
    // Over the producer's message.max.bytes (1 MB) and the broker's limit alike.
    let too_large = enqueue(&env, &topic, json!({"blob": "x".repeat(2 << 20)})).await;
    let no_topic = enqueue(&env, &format!("{}no.such.topic", env.prefix), json!({"n": 2})).await;
    let last = enqueue(&env, &topic, json!({"n": 3})).await;

    let relay = Relay::new(env.pool.clone(), env.res.producer.clone(), 100, Duration::from_millis(100));
    common::eventually(Duration::from_secs(60), || async {
        relay.step().await.unwrap();
        published(&env, last).await && set_aside(&env, no_topic).await.0
    })
    .await;

    assert!(published(&env, first).await);
    let (aside, error) = set_aside(&env, too_large).await;
    assert!(aside && !published(&env, too_large).await, "the oversized row is set aside, not published");
    assert!(error.unwrap_or_default().to_lowercase().contains("too large"), "its reason is kept");
    let (_, error) = set_aside(&env, no_topic).await;
    assert!(error.unwrap_or_default().to_lowercase().contains("unknown"), "the missing topic is the reason");

    let got = env.read_topic(&topic, 2, Duration::from_secs(20)).await;
    let ids: Vec<String> = got.iter().map(|(_, v, _)| v["eventId"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(ids, vec![first.to_string(), last.to_string()], "both good events reached Kafka, in order");

    // The set-aside rows stay out of the relay's way; the gauge reports them.
    assert_eq!(relay.step().await.unwrap(), booking::outbox::RelayTick::Idle);
    let text = metrics.render();
    assert!(text.lines().any(|l| l.starts_with("outbox_set_aside ")), "outbox_set_aside is exported:\n{text}");

    // An operator's retry (clearing set_aside_at) sends a row again; a still-missing topic is
    // set aside again rather than blocking.
    sqlx::query("UPDATE outbox SET set_aside_at = NULL WHERE event_id = $1").bind(no_topic).execute(&env.pool).await.unwrap();
    let after = enqueue(&env, &topic, json!({"n": 4})).await;
    common::eventually(Duration::from_secs(60), || async {
        relay.step().await.unwrap();
        published(&env, after).await && set_aside(&env, no_topic).await.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_fatal_error_of_the_idempotent_producer_the_relay_builds_a_new_one_and_goes_on() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let factory = env.res.producer_factory("relay-test");
    let relay = Relay::new(env.pool.clone(), factory().unwrap(), 100, Duration::from_millis(100)).rebuild_with(factory);
    let before = enqueue(&env, &topic, json!({"n": 1})).await;
    common::eventually(Duration::from_secs(30), || async { relay.step().await.unwrap(); published(&env, before).await }).await;

    // librdkafka's own test hook raises the fatal error a broken idempotent sequence would.
    let broken = relay.producer();
    let reason = std::ffi::CString::new("simulated by the test").unwrap();
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            broken.client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
    assert!(broken.client().fatal_error().is_some());

    let after = enqueue(&env, &topic, json!({"n": 2})).await;
    common::eventually(Duration::from_secs(60), || async { relay.step().await.unwrap(); published(&env, after).await }).await;
    assert!(relay.producer().client().fatal_error().is_none(), "a new producer publishes");
    let got = env.read_topic(&topic, 2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2);
}

/// Two relays (as in two api processes) stepping at once over one backlog: the relay lock lets
/// one publish at a time, so every row reaches Kafka once and in order (issue 14: the relay lock
/// keeps its one-at-a-time guarantee with two of every daemon). Without it both would read the
/// same unpublished rows and send them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_stepping_at_once_publish_each_row_once_in_order() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let mut events = Vec::new();
    for n in 0..600 {
        events.push(enqueue(&env, &topic, json!({"n": n})).await);
    }
    let relays = [
        Relay::new(env.pool.clone(), env.res.producer.clone(), 50, Duration::from_millis(100)),
        Relay::new(env.pool.clone(), env.res.producer.clone(), 50, Duration::from_millis(100)),
    ];
    let last = *events.last().unwrap();
    let busy = std::sync::atomic::AtomicUsize::new(0);
    let run = |relay: &Relay| {
        let (env, busy) = (&env, &busy);
        let relay = relay.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !published(env, last).await && tokio::time::Instant::now() < deadline {
                if relay.step().await.unwrap() == booking::outbox::RelayTick::Busy {
                    busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    };
    tokio::join!(run(&relays[0]), run(&relays[1]));
    assert!(published(&env, last).await, "the backlog was published");
    let got = env.read_topic_settled(&topic, events.len(), Duration::from_secs(30), Duration::from_secs(2)).await;
    let ids: Vec<Uuid> = got.iter().map(|v| v["eventId"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "each row once (the other relay was turned away {} times)", busy.into_inner());
    assert_eq!(ids, events, "in the order of the outbox (one key)");
}

/// Pages the relay's scan for pending rows reads when nothing is pending.
async fn pending_scan_pages(env: &TestEnv) -> i64 {
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
         SELECT id FROM outbox WHERE published_at IS NULL AND set_aside_at IS NULL ORDER BY id LIMIT 500",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    plan[0]["Plan"]["Shared Hit Blocks"].as_i64().unwrap_or(0) + plan[0]["Plan"]["Shared Read Blocks"].as_i64().unwrap_or(0)
}

/// A burst leaves the old index entries of every published row in the relay's pending index
/// until VACUUM, and every later step walks past them (`vacuum`). The relay vacuums the outbox
/// itself after 10,000 published rows, so the next steps read a page or two again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_relay_vacuums_the_outbox_and_its_scan_is_short_again() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let burst = booking::vacuum::AFTER_ROWS as i64 + 500;
    sqlx::query(
        "INSERT INTO outbox (topic, message_key, event_id, envelope)
         SELECT $1, 'k' || (n % 10), gen_random_uuid(), jsonb_build_object('n', n) FROM generate_series(1, $2) AS n",
    )
    .bind(&topic)
    .bind(burst)
    .execute(&env.pool)
    .await
    .unwrap();
    let relay = Relay::new(env.pool.clone(), env.res.producer.clone(), 1000, Duration::from_millis(100));
    let pending = || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetch_one(&env.pool).await.unwrap() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pending().await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the relay published the burst");
        relay.step().await.unwrap();
    }
    common::eventually(Duration::from_secs(30), || async {
        let vacuums: i64 = sqlx::query_scalar("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'outbox'").fetch_one(&env.pool).await.unwrap();
        vacuums >= 1
    })
    .await;
    // The first scan after the vacuum may still meet the entries of the last rows published
    // while it ran (and mark them dead); the one after it is what every later step pays.
    pending_scan_pages(&env).await;
    let pages = pending_scan_pages(&env).await;
    assert!(pages <= 4, "the scan for pending rows read {pages} pages after the vacuum");
}
