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
    let mut tx = booking::db::begin(&env.pool).await.unwrap();
    // One key for every row: order is promised per key.
    outbox::enqueue(&mut tx, topic, "one-key", &envelope).await.unwrap();
    tx.commit().await.unwrap();
    envelope.event_id
}

/// Whether the row of `event` (which was written) has been published: the relay deletes a row
/// once Kafka has acknowledged it (migration 0210), and nothing else deletes one.
async fn published(env: &TestEnv, event: Uuid) -> bool {
    sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE event_id = $1)").bind(event).fetch_one(&env.pool).await.unwrap()
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

    // A row put back by hand (below the relay's floor) is found by its next scan from the
    // lowest id (every 30 s by default; `bookingctl outbox retry` gives the row a new id instead).
    let relay = Relay::new(env.pool.clone(), env.res.producer.clone(), 100, Duration::from_millis(100)).full_scan_every(Duration::from_secs(2));
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

/// Pages the relay's scan for pending rows reads, from id `from` on, when nothing is pending.
async fn pending_scan_pages(env: &TestEnv, from: i64) -> i64 {
    // As the relay plans it (`Relay::step`: no sequential scan in its transaction).
    let mut tx = booking::db::begin(&env.pool).await.unwrap();
    sqlx::query("SELECT set_config('enable_seqscan', 'off', true)").execute(&mut *tx).await.unwrap();
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
         SELECT id FROM outbox WHERE set_aside_at IS NULL AND id >= $1 ORDER BY id LIMIT 500",
    )
    .bind(from)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    plan[0]["Plan"]["Shared Hit Blocks"].as_i64().unwrap_or(0) + plan[0]["Plan"]["Shared Read Blocks"].as_i64().unwrap_or(0)
}

/// A burst leaves the index entries of every published (deleted) row in the outbox's primary key
/// until VACUUM, and a scan from the lowest id walks past all of them. The relay's scan starts
/// at its floor (`floor`), which passes the burst once it is published: the next steps read a
/// page or two, with no vacuum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_the_relay_scans_from_past_it_and_its_scan_is_short_again() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let newest: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (topic, message_key, event_id, envelope)
         SELECT $1, 'k' || (n % 10), gen_random_uuid(), jsonb_build_object('n', n) FROM generate_series(1, 5000) AS n
         RETURNING id",
    )
    .bind(&topic)
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .into_iter()
    .max()
    .unwrap();
    let relay = Relay::new(env.pool.clone(), env.res.producer.clone(), 1000, Duration::from_millis(100)).full_scan_every(Duration::from_secs(3600));
    // A transaction running anywhere on the server (another test's) holds the floor back for
    // as long as it runs: step until the floor passes the burst.
    common::eventually(Duration::from_secs(60), || async {
        relay.step().await.unwrap();
        relay.floor() > newest
    })
    .await;
    let (from_floor, from_start) = (pending_scan_pages(&env, relay.floor()).await, pending_scan_pages(&env, 0).await);
    assert!(from_floor <= 4, "the relay's scan read {from_floor} pages after the burst (from the lowest id: {from_start})");
}

/// The floor's argument (`floor`): a row whose transaction took its id before a later row
/// committed, and commits only after the relay published that later row, is still published.
/// The floor waits for every transaction that may hold a lower id to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_after_a_later_one_was_published_is_still_published() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let relay = Relay::new(env.pool.clone(), env.res.producer.clone(), 100, Duration::from_millis(100)).full_scan_every(Duration::from_secs(3600));
    let late_envelope = Envelope::new(EventType::NotificationRequest, json!({"n": "late"}));
    let mut late = booking::db::begin(&env.pool).await.unwrap();
    outbox::enqueue(&mut late, &topic, "one-key", &late_envelope).await.unwrap();
    let late_id: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE event_id = $1").bind(late_envelope.event_id).fetch_one(&mut *late).await.unwrap();

    let early = enqueue(&env, &topic, json!({"n": "early"})).await;
    common::eventually(Duration::from_secs(30), || async {
        relay.step().await.unwrap();
        published(&env, early).await
    })
    .await;
    for _ in 0..5 {
        assert_eq!(relay.step().await.unwrap(), booking::outbox::RelayTick::Idle);
    }
    assert!(relay.floor() <= late_id, "the floor ({}) stays at or below {late_id} while its writer runs", relay.floor());

    late.commit().await.unwrap();
    common::eventually(Duration::from_secs(30), || async {
        relay.step().await.unwrap();
        published(&env, late_envelope.event_id).await
    })
    .await;
}

/// Migration 0170: a statement writing the outbox holds its transaction id before it computes
/// its rows (so before a row takes its id), even when it is the transaction's first write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_writer_holds_its_transaction_id_before_its_rows_take_ids() {
    let env = TestEnv::new().await;
    // Three transactions: drawing from the sequence also takes a transaction id, but only on
    // the one draw in 32 that writes the sequence to the WAL.
    for _ in 0..3 {
        let mut tx = booking::db::begin(&env.pool).await.unwrap();
        let seen: Option<String> = sqlx::query_scalar(
            "INSERT INTO outbox (topic, message_key, event_id, envelope)
             VALUES ('t', 'k', gen_random_uuid(), jsonb_build_object('xid', pg_current_xact_id_if_assigned()::text))
             RETURNING envelope->>'xid'",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert!(seen.is_some(), "the row was computed before the transaction had an id");
        tx.rollback().await.unwrap();
    }
}

/// The outbox keeps only what is still to be sent (migration 0210): once the relay has a
/// backlog acknowledged, its rows are gone, every event is on Kafka in order, and the row Kafka
/// refused for good is the one row left, set aside for an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_row_leaves_the_outbox_and_a_refused_one_stays() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let refused = enqueue(&env, &format!("{}no.such.topic", env.prefix), json!({"n": "refused"})).await;
    let events: Vec<Uuid> = sqlx::query_scalar(
        "WITH x AS (SELECT n, gen_random_uuid() AS e FROM generate_series(1, 300) AS n)
         INSERT INTO outbox (topic, message_key, event_id, envelope)
         SELECT $1, 'one-key', e, jsonb_build_object('eventId', e, 'n', n) FROM x ORDER BY n
         RETURNING event_id",
    )
    .bind(&topic)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let relay = Relay::new(env.pool.clone(), env.res.producer.clone(), 100, Duration::from_millis(100));
    common::eventually(Duration::from_secs(60), || async {
        relay.step().await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE set_aside_at IS NULL").fetch_one(&env.pool).await.unwrap();
        left == 0
    })
    .await;
    let left: Vec<(Uuid, bool)> = sqlx::query_as("SELECT event_id, set_aside_at IS NOT NULL FROM outbox").fetch_all(&env.pool).await.unwrap();
    assert_eq!(left, vec![(refused, true)], "only the refused row stays, set aside");
    let got = env.read_topic_to_end(&topic).await;
    let ids: Vec<Uuid> = got.iter().map(|v| v["eventId"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(ids, events, "every deleted row is on Kafka, once, in order");
}
