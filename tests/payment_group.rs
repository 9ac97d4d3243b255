//! Payments written in groups (issue 11, `payment::GroupCommit`): many payments at once share a
//! statement and a commit, and each still ends as it would alone, against the real PostgreSQL,
//! Redis and Kafka.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{QueueSettings, TestApi, TestEnv, User};
use serde_json::Value;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(300);
const PRICE: i64 = 100;

/// A user with `points`, holding one seat each of `seats`: the reservation ids.
async fn holder(api: &TestApi, schedule: &str, name: &str, points: i64, seats: &[String]) -> (User, Vec<String>) {
    let u = api.user(name).await;
    if points > 0 {
        api.charge(&u, points).await;
    }
    let token = api.active_token(&u, schedule).await;
    let mut held = Vec::new();
    for seat in seats {
        let r = api.hold(&u, &token, seat).await;
        assert_eq!(r.status(), 201, "hold for {name}");
        held.push(r.json::<Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string());
    }
    (u, held)
}

/// Every payment below is sent at the same moment, so they reach the api together and are
/// written in groups; each answer must be the one the payment gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_sent_at_once_each_end_as_they_would_alone() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(40, PRICE).await;
    let mut seats = seats.into_iter();
    let mut take = |n: usize| (&mut seats).take(n).collect::<Vec<_>>();

    // Thirty buyers who can pay for their seat.
    let mut buyers = Vec::new();
    for i in 0..30 {
        buyers.push(holder(&api, &schedule, &format!("buyer{i}"), PRICE, &take(1)).await);
    }
    // One who cannot, one paying for a hold that is not theirs, one paying two holds with points
    // for one, one sending the same payment twice, one using one key for two holds.
    let short = holder(&api, &schedule, "short", PRICE / 2, &take(1)).await;
    let stranger = holder(&api, &schedule, "stranger", PRICE, &[]).await;
    let twice = holder(&api, &schedule, "twice", PRICE, &take(2)).await;
    let replay = holder(&api, &schedule, "replay", PRICE, &take(1)).await;
    let reuse = holder(&api, &schedule, "reuse", 2 * PRICE, &take(2)).await;

    // (label, user, key, reservation)
    let mut asks: Vec<(String, User, String, String)> = Vec::new();
    for (i, (u, held)) in buyers.iter().enumerate() {
        asks.push((format!("buyer{i}"), u.clone(), Uuid::new_v4().to_string(), held[0].clone()));
    }
    asks.push(("short".into(), short.0.clone(), Uuid::new_v4().to_string(), short.1[0].clone()));
    asks.push(("stranger".into(), stranger.0.clone(), Uuid::new_v4().to_string(), buyers[0].1[0].clone()));
    for r in &twice.1 {
        asks.push(("twice".into(), twice.0.clone(), Uuid::new_v4().to_string(), r.clone()));
    }
    let replay_key = Uuid::new_v4().to_string();
    for _ in 0..2 {
        asks.push(("replay".into(), replay.0.clone(), replay_key.clone(), replay.1[0].clone()));
    }
    let reuse_key = Uuid::new_v4().to_string();
    for r in &reuse.1 {
        asks.push(("reuse".into(), reuse.0.clone(), reuse_key.clone(), r.clone()));
    }

    let barrier = Arc::new(tokio::sync::Barrier::new(asks.len()));
    let api = Arc::new(api);
    let mut tasks = Vec::new();
    for (label, u, key, reservation) in asks {
        let (api, barrier) = (api.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = api.pay(&u, &key, &reservation).await;
            let status = r.status().as_u16();
            (label, reservation, status, r.json::<Value>().await.unwrap())
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let of = |label: &str| answers.iter().filter(|a| a.0 == label).map(|a| (a.2, a.3.clone())).collect::<Vec<_>>();
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_string();

    for (i, (u, held)) in buyers.iter().enumerate() {
        let answer = &of(&format!("buyer{i}"))[0];
        assert_eq!(answer.0, 201, "buyer{i}: {}", answer.1);
        assert_eq!((answer.1["reservationId"].as_str(), answer.1["balance"].as_i64()), (Some(held[0].as_str()), Some(0)), "buyer{i}");
        assert_eq!(api.balance(u).await, 0, "buyer{i} paid once");
    }
    let short_answer = &of("short")[0];
    assert_eq!((short_answer.0, code(&short_answer.1)), (409, "INSUFFICIENT_POINTS".into()));
    assert_eq!(api.balance(&short.0).await, PRICE / 2, "nothing taken from short");
    let stranger_answer = &of("stranger")[0];
    assert_eq!((stranger_answer.0, code(&stranger_answer.1)), (404, "NOT_FOUND".into()));
    assert_eq!(api.balance(&stranger.0).await, PRICE, "nothing taken from the stranger");

    let mut twice_answers: Vec<(u16, String)> = of("twice").iter().map(|(s, v)| (*s, code(v))).collect();
    twice_answers.sort();
    assert_eq!(twice_answers, vec![(201, String::new()), (409, "INSUFFICIENT_POINTS".into())], "points for one of two holds");
    assert_eq!(api.balance(&twice.0).await, 0);

    let replay_answers = of("replay");
    assert_eq!(replay_answers.iter().map(|a| a.0).collect::<Vec<_>>(), vec![201, 201], "{replay_answers:?}");
    assert_eq!(replay_answers[0].1["paymentId"], replay_answers[1].1["paymentId"], "the same payment, answered twice");
    assert_eq!(api.balance(&replay.0).await, 0, "charged once");

    let mut reuse_answers: Vec<(u16, String)> = of("reuse").iter().map(|(s, v)| (*s, code(v))).collect();
    reuse_answers.sort();
    assert_eq!(reuse_answers, vec![(201, String::new()), (422, "IDEMPOTENCY_KEY_REUSED".into())]);
    assert_eq!(api.balance(&reuse.0).await, PRICE, "charged once");

    // In the database: one payment, one CONFIRMED hold and one payment.completed per 201.
    let paid: Vec<String> = answers.iter().filter(|a| a.2 == 201).map(|a| a.1.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(paid.len(), 30 + 3);
    let (payments, confirmed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM payments), (SELECT count(*) FROM reservations WHERE status = 'CONFIRMED')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let completed = env.written_events(&env.topics().payment_completed, |_| true).await as i64;
    assert_eq!((payments, confirmed, completed), (33, 33, 33));
    let not_paid: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = 'HELD'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(not_paid, 3, "short's hold, twice's second, reuse's second");

    // They were written in groups: some statement wrote more than one payment.
    let metrics = api.http.get(api.metrics_url.clone().unwrap()).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok())).unwrap_or(0.0);
    let (groups, grouped) = (value("payment_group_size_count"), value("payment_group_size_sum"));
    assert!(grouped > groups && groups > 0.0, "{grouped} payments in {groups} groups");
    Arc::try_unwrap(api).ok().unwrap().stop().await;
}
