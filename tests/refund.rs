//! Refunds (issue 13) against the real services: a refund gives the points back and puts the seat
//! on sale again; the ranking and the data-platform export change once each, even when
//! `payment.refunded` is consumed again; every refusal has its own code.

mod common;

use std::time::Duration;

use common::inproc::{self, export_path, Task};
use common::{QueueSettings, TestApi, TestEnv, User, ADMIN};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use uuid::Uuid;

fn export_lines(env: &TestEnv) -> Vec<Value> {
    std::fs::read_to_string(export_path(env))
        .map(|s| s.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
        .unwrap_or_default()
}

async fn worker(env: &TestEnv, group_prefix: &str) -> Task {
    inproc::worker(env, group_prefix, inproc::worker_settings(env)).await
}

async fn stop(task: Task) {
    inproc::stop(vec![task]).await;
}

async fn refund(api: &TestApi, u: &User, key: Option<&str>, reservation: &str) -> reqwest::Response {
    let mut req = api.http.post(api.url(&format!("/v1/reservations/{reservation}/refund"))).bearer_auth(&u.token);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.unwrap()
}

async fn error_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    (status, v["error"]["code"].as_str().unwrap_or_default().to_string())
}

/// Charges `points`, enters the queue, holds `seat` and pays it; returns the reservation id.
async fn buy(api: &TestApi, u: &User, schedule: &str, seat: &str, points: i64) -> String {
    api.charge(u, points).await;
    let t = api.active_token(u, schedule).await;
    let h: Value = api.hold(u, &t, seat).await.json().await.unwrap();
    let id = h["reservationId"].as_str().unwrap().to_string();
    assert_eq!(api.pay(u, &format!("pay-{id}"), &id).await.status(), 201);
    id
}

async fn ranking(api: &TestApi) -> Vec<Value> {
    let v: Value = api.http.get(api.url("/v1/rankings/schedules?limit=10")).send().await.unwrap().json().await.unwrap();
    v["items"].as_array().unwrap().clone()
}

async fn sold(api: &TestApi, schedule: &str) -> i64 {
    ranking(api).await.iter().find(|e| e["scheduleId"] == schedule).map(|e| e["soldSeats"].as_i64().unwrap()).unwrap_or(0)
}

fn rewind(env: &TestEnv, group: &str, topics: &[&str]) {
    let c: BaseConsumer = booking::kafka::consumer_config(&env.brokers, group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for p in 0..booking::kafka::PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Offset(0)).unwrap();
        }
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

fn caught_up(env: &TestEnv, group: &str, topics: &[&str]) -> bool {
    let c: BaseConsumer = booking::kafka::consumer_config(&env.brokers, group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for p in 0..booking::kafka::PARTITIONS {
            tpl.add_partition(topic, p);
        }
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    committed.elements().iter().all(|e| {
        let (_, high) = c.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5)).unwrap();
        match e.offset() {
            Offset::Offset(o) => o >= high,
            _ => high == 0,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_gives_the_points_back_frees_the_seat_and_changes_ranking_and_export_once_even_when_replayed() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let group = format!("{}w-", env.prefix);
    let w = worker(&env, &group).await;
    let (schedule, seats) = api.concert(3, 700).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let refunded = buy(&api, &alice, &schedule, &seats[0], 1000).await;
    buy(&api, &bob, &schedule, &seats[1], 1000).await;
    assert_eq!(api.balance(&alice).await, 300);
    common::eventually(Duration::from_secs(30), || async { sold(&api, &schedule).await == 2 }).await;
    common::eventually(Duration::from_secs(30), || async { export_lines(&env).len() == 2 }).await;
    assert_eq!(api.seat_status(&schedule, &seats[0]).await, "SOLD");

    let r = refund(&api, &alice, Some("refund-1"), &refunded).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reservationId"], refunded.as_str());
    assert_eq!(body["status"], "REFUNDED");
    assert_eq!(body["refundedAmount"], 700);
    assert_eq!(body["balance"], 1000);
    // The same key again: the same answer, and the points come back only once.
    let again: Value = refund(&api, &alice, Some("refund-1"), &refunded).await.json().await.unwrap();
    assert_eq!(again, body);
    assert_eq!(api.balance(&alice).await, 1000);
    let history: Value = api.http.get(api.url("/v1/users/me/points/history")).bearer_auth(&alice.token).send().await.unwrap().json().await.unwrap();
    let kinds: Vec<&str> = history["items"].as_array().unwrap().iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["REFUND", "USE", "CHARGE"]);
    assert_eq!(history["items"][0]["amount"], 700);
    assert_eq!(history["items"][0]["balanceAfter"], 1000);
    let res: Value = api.reservation(&alice, &refunded).await.json().await.unwrap();
    assert_eq!(res["status"], "REFUNDED");
    assert_eq!(res["refundedAt"], body["refundedAt"], "the reservation says when it was refunded: {res}");
    assert!(res["confirmedAt"].is_string(), "and still when it was paid: {res}");

    // The seat is on sale again: the map says so, and the next buyer gets it.
    assert_eq!(api.seat_status(&schedule, &seats[0]).await, "AVAILABLE");
    let carol = api.user("carol").await;
    let t = api.active_token(&carol, &schedule).await;
    assert_eq!(api.hold(&carol, &t, &seats[0]).await.status(), 201);
    assert_eq!(api.seat_status(&schedule, &seats[0]).await, "HELD");

    // The notification, with the texts.
    common::eventually(Duration::from_secs(30), || async {
        let v: Value = api.http.get(api.url("/v1/users/me/notifications")).bearer_auth(&alice.token).send().await.unwrap().json().await.unwrap();
        v["items"].as_array().unwrap().iter().any(|n| n["type"] == "PAYMENT_REFUNDED")
    })
    .await;
    let v: Value = api.http.get(api.url("/v1/users/me/notifications")).bearer_auth(&alice.token).send().await.unwrap().json().await.unwrap();
    let n = v["items"].as_array().unwrap().iter().find(|n| n["type"] == "PAYMENT_REFUNDED").unwrap().clone();
    assert_eq!(n["title"], "환불 완료");
    assert_eq!(n["message"], "환불이 완료되었습니다. 포인트가 반환되었습니다.");
    assert_eq!(n["data"]["reservationId"], refunded.as_str());

    // payment.refunded on Kafka, keyed by the reservation.
    let msgs = env.read_topic(&env.topics().payment_refunded, 1, Duration::from_secs(10)).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0.as_deref(), Some(refunded.as_str()));
    assert_eq!(msgs[0].1["eventType"], "payment.refunded");
    assert_eq!(msgs[0].1["payload"]["amount"], 700);

    // Ranking: one seat fewer. Export: the refund as its own line.
    common::eventually(Duration::from_secs(30), || async { sold(&api, &schedule).await == 1 }).await;
    common::eventually(Duration::from_secs(30), || async { export_lines(&env).len() == 3 }).await;
    let refund_line = export_lines(&env).into_iter().find(|l| l["eventType"] == "payment.refunded").unwrap();
    assert_eq!(refund_line["reservationId"], refunded.as_str());
    assert_eq!(refund_line["amount"], 700);
    stop(w).await;

    // Replay both payment topics from the beginning: nothing changes a second time.
    let topics = [env.topics().payment_completed.as_str(), env.topics().payment_refunded.as_str()];
    rewind(&env, &format!("{group}payments"), &topics);
    let w = worker(&env, &group).await;
    common::eventually(Duration::from_secs(30), || async { caught_up(&env, &format!("{group}payments"), &topics) }).await;
    assert_eq!(sold(&api, &schedule).await, 1);
    assert_eq!(export_lines(&env).len(), 3);
    stop(w).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_seen_before_its_payment_leaves_the_ranking_unchanged() {
    // payment.completed and payment.refunded travel on different topics, so the worker may see
    // them in either order; the ranking must end the same either way.
    let env = TestEnv::new().await;
    let (redis, keys) = (&env.res.redis, env.keys());
    let (schedule, kept, refunded) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (now, memory) = (chrono::Utc::now(), booking::ranking::Retention::default());
    assert!(booking::ranking::unrecord(redis, keys, &memory, refunded, schedule, now, Some(now)).await.unwrap());
    assert!(booking::ranking::record(redis, keys, refunded, schedule, now).await.unwrap());
    assert!(booking::ranking::record(redis, keys, kept, schedule, now).await.unwrap());
    // Replays of either message change nothing.
    assert!(!booking::ranking::unrecord(redis, keys, &memory, refunded, schedule, now, Some(now)).await.unwrap());
    assert!(!booking::ranking::record(redis, keys, refunded, schedule, now).await.unwrap());
    let mut conn = redis.clone();
    let score: Option<f64> = redis::cmd("ZSCORE").arg(keys.ranking()).arg(schedule.to_string()).query_async(&mut conn).await.unwrap();
    assert_eq!(score, Some(1.0));
    // The usual order, down to zero: the schedule leaves the ranking instead of showing 0 sold.
    assert!(booking::ranking::unrecord(redis, keys, &memory, kept, schedule, now, Some(now)).await.unwrap());
    let score: Option<f64> = redis::cmd("ZSCORE").arg(keys.ranking()).arg(schedule.to_string()).query_async(&mut conn).await.unwrap();
    assert_eq!(score, None);
}

/// Issue 15, item 10: the ranking forgets payments after its retention, yet a refund of such an
/// old payment still takes its seat off (the refund says when the payment was made), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_of_a_payment_the_ranking_has_forgotten_still_takes_its_seat_off() {
    let env = TestEnv::new().await;
    let (redis, keys) = (&env.res.redis, env.keys());
    let memory = booking::ranking::Retention { remember: Duration::from_secs(3600), window: Duration::from_secs(600) };
    let (schedule, old, recent) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let now = chrono::Utc::now();
    let long_ago = now - chrono::Duration::hours(2);
    assert!(booking::ranking::record(redis, keys, old, schedule, long_ago).await.unwrap());
    assert!(booking::ranking::record(redis, keys, recent, schedule, now).await.unwrap());
    // The old payment leaves the counted set; the recent one stays.
    assert_eq!(booking::ranking::prune(redis, keys, &memory).await.unwrap(), 1);
    let mut conn = redis.clone();
    let counted: Vec<String> = redis::cmd("ZRANGE").arg(keys.ranking_counted()).arg(0).arg(-1).query_async(&mut conn).await.unwrap();
    assert_eq!(counted, vec![recent.to_string()]);
    // Its refund still counts, once.
    assert!(booking::ranking::unrecord(redis, keys, &memory, old, schedule, now, Some(long_ago)).await.unwrap());
    assert!(!booking::ranking::unrecord(redis, keys, &memory, old, schedule, now, Some(long_ago)).await.unwrap());
    let score: Option<f64> = redis::cmd("ZSCORE").arg(keys.ranking()).arg(schedule.to_string()).query_async(&mut conn).await.unwrap();
    assert_eq!(score, Some(1.0));
    // A refund message without paidAt (written before it existed) of a payment not counted
    // changes nothing: only what the ranking knows it counted is taken off.
    let unknown = Uuid::new_v4();
    assert!(booking::ranking::unrecord(redis, keys, &memory, unknown, schedule, now, None).await.unwrap());
    let score: Option<f64> = redis::cmd("ZSCORE").arg(keys.ranking()).arg(schedule.to_string()).query_async(&mut conn).await.unwrap();
    assert_eq!(score, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refund_refusal_has_its_code_and_changes_nothing() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(3, 100).await;
    let alice = api.user("alice").await;
    let mallory = api.user("mallory").await;
    let paid = buy(&api, &alice, &schedule, &seats[0], 500).await;

    // Someone else's reservation, or one that does not exist: 404.
    assert_eq!(error_code(refund(&api, &mallory, Some("m"), &paid).await).await, (404, "NOT_FOUND".into()));
    assert_eq!(error_code(refund(&api, &alice, Some("x"), &Uuid::new_v4().to_string()).await).await, (404, "NOT_FOUND".into()));
    assert_eq!(error_code(refund(&api, &alice, Some("x"), "not-a-uuid").await).await, (404, "NOT_FOUND".into()));
    // No token: 401; no key: 400 naming the header.
    let r = api.http.post(api.url(&format!("/v1/reservations/{paid}/refund"))).header("Idempotency-Key", "k").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = refund(&api, &alice, None, &paid).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["field"], "Idempotency-Key");

    // A hold that is not paid: NOT_CONFIRMED.
    let t = api.active_token(&alice, &schedule).await;
    let held: Value = api.hold(&alice, &t, &seats[1]).await.json().await.unwrap();
    let held = held["reservationId"].as_str().unwrap();
    assert_eq!(error_code(refund(&api, &alice, Some("h"), held).await).await, (409, "NOT_CONFIRMED".into()));
    assert_eq!(api.seat_status(&schedule, &seats[1]).await, "HELD");

    // Refunded once; a second refund with another key: NOT_CONFIRMED, no second credit. The first
    // key for another reservation: 422.
    assert_eq!(refund(&api, &alice, Some("r1"), &paid).await.status(), 200);
    assert_eq!(error_code(refund(&api, &alice, Some("r2"), &paid).await).await, (409, "NOT_CONFIRMED".into()));
    assert_eq!(error_code(refund(&api, &alice, Some("r1"), held).await).await, (422, "IDEMPOTENCY_KEY_REUSED".into()));
    assert_eq!(api.balance(&alice).await, 500);

    // A show starting within the cutoff (24 h here): REFUND_WINDOW_CLOSED, still SOLD, no points.
    let starts = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let body = json!({"title": "Tonight", "schedules": [{"startsAt": starts, "bookingOpensAt": "2020-01-01T00:00:00Z", "seatCount": 1, "price": 100}]});
    let v: Value = api.http.post(api.url("/v1/admin/concerts")).bearer_auth(ADMIN).json(&body).send().await.unwrap().json().await.unwrap();
    let tonight = v["schedules"][0]["scheduleId"].as_str().unwrap().to_string();
    let seat = api.seats(&tonight).await[0]["seatId"].as_str().unwrap().to_string();
    let late = buy(&api, &alice, &tonight, &seat, 100).await;
    let before = api.balance(&alice).await;
    assert_eq!(error_code(refund(&api, &alice, Some("late"), &late).await).await, (409, "REFUND_WINDOW_CLOSED".into()));
    assert_eq!(api.seat_status(&tonight, &seat).await, "SOLD");
    assert_eq!(api.balance(&alice).await, before);
    // A refused request leaves no key behind: nothing was half-written.
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE scope = 'refund'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(keys, 1);
    let refunds = env.written_events(&env.topics().payment_refunded, |_| true).await;
    assert_eq!(refunds, 1);
    api.stop().await;
}
