//! Kafka really stopped: bookings go on, and the outbox publishes every event once when Kafka is
//! back. This is its own test binary because it stops the shared broker (cargo runs test binaries
//! one after another, so no other test is running meanwhile).

mod common;

use std::time::Duration;

use common::{QueueSettings, TestEnv};
use serde_json::Value;

/// `scripts/services.sh <cmd>` of this checkout, refused unless it acts on this test's services.
fn services(cmd: &str) {
    common::services::run(cmd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_stopped_holds_and_payments_succeed_and_every_event_is_published_once_after() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(4, 10).await;
    let u = api.user("during-outage").await;
    api.charge(&u, 1000).await;
    let t = api.active_token(&u, &schedule).await;

    services("stop-kafka");
    let result = async {
        let mut held = Vec::new();
        for seat in &seats[..3] {
            let r = api.hold(&u, &t, seat).await;
            assert_eq!(r.status(), 201, "holds go on without Kafka");
            held.push(r.json::<Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string());
        }
        let r = api.pay(&u, "outage-pay", &held[0]).await;
        assert_eq!(r.status(), 201, "payments go on without Kafka");
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&env.pool).await.unwrap();
        assert!(pending >= 4, "events wait in the outbox: {pending}");
        held
    };
    let held = tokio::time::timeout(Duration::from_secs(60), result).await;
    services("start-kafka");
    let held = held.expect("requests did not wait for Kafka");

    common::eventually(Duration::from_secs(90), || async {
        // The outbox keeps only what is still to be sent (migration 0210).
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&env.pool).await.unwrap();
        n == 0
    }).await;
    let created = env.read_topic_settled(&env.topics().reservation_created, 3, Duration::from_secs(30), Duration::from_secs(1)).await;
    let mut ids: Vec<String> = created.iter().map(|e| e["payload"]["reservationId"].as_str().unwrap().to_string()).collect();
    ids.sort();
    let mut want = held.clone();
    want.sort();
    assert_eq!(ids, want, "each reservation.created exactly once");
    let paid = env.read_topic_settled(&env.topics().payment_completed, 1, Duration::from_secs(30), Duration::from_secs(1)).await;
    assert_eq!(paid.len(), 1, "payment.completed exactly once");
    let notes = env.read_topic(&env.topics().notification_request, usize::MAX, Duration::from_secs(3)).await;
    let confirmed = notes.iter().filter(|(_, n, _)| n["payload"]["type"] == "PAYMENT_CONFIRMED").count();
    assert_eq!(confirmed, 1, "the payment's notification once");
    let ids: Vec<&str> = created.iter().chain(&paid).chain(notes.iter().map(|(_, n, _)| n)).map(|e| e["eventId"].as_str().unwrap_or_default()).collect();
    let distinct: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len(), "every event published once: {ids:?}");
    api.stop().await;
}
