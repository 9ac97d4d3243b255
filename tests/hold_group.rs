//! Holds written in groups (issue 11, `reservation::HoldGroup`): many holds at once share a
//! statement and a commit, and each still ends as it would alone, against the real PostgreSQL,
//! Redis and Kafka.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{QueueSettings, TestEnv, User};
use serde_json::Value;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(300);

/// Every hold below is sent at the same moment, so they reach the api together and are written
/// in groups; each answer must be the one the hold gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_sent_at_once_each_end_as_they_would_alone() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(60, 100).await;
    let (other_schedule, other_seats) = api.concert(5, 100).await;
    let mut seats = seats.into_iter();

    // (label, user, token, seat)
    let mut asks: Vec<(String, User, String, String)> = Vec::new();
    // Thirty buyers, each on a free seat of their own.
    for i in 0..30 {
        let u = api.user(&format!("buyer{i}")).await;
        let token = api.active_token(&u, &schedule).await;
        asks.push((format!("buyer{i}"), u, token, seats.next().unwrap()));
    }
    // Six buyers on one seat.
    let fought = seats.next().unwrap();
    for i in 0..6 {
        let u = api.user(&format!("fighter{i}")).await;
        let token = api.active_token(&u, &schedule).await;
        asks.push((format!("fighter{i}"), u, token, fought.clone()));
    }
    // One buyer on seven seats at once: the limit is four per schedule.
    let greedy = api.user("greedy").await;
    let greedy_token = api.active_token(&greedy, &schedule).await;
    for i in 0..7 {
        asks.push((format!("greedy{i}"), greedy.clone(), greedy_token.clone(), seats.next().unwrap()));
    }
    // A seat held before, a seat of another schedule, a seat that does not exist.
    let late = api.user("late").await;
    let late_token = api.active_token(&late, &schedule).await;
    let early = api.user("early").await;
    let taken = seats.next().unwrap();
    assert_eq!(api.hold(&early, &api.active_token(&early, &schedule).await, &taken).await.status(), 201);
    asks.push(("taken".into(), late.clone(), late_token.clone(), taken.clone()));
    asks.push(("other schedule".into(), late.clone(), late_token.clone(), other_seats[0].clone()));
    asks.push(("no seat".into(), late.clone(), late_token.clone(), Uuid::new_v4().to_string()));
    let _ = other_schedule;

    let api = Arc::new(api);
    let go = Arc::new(tokio::sync::Barrier::new(asks.len()));
    let mut tasks = Vec::new();
    for (label, u, token, seat) in asks {
        let (api, go) = (api.clone(), go.clone());
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let r = api.hold(&u, &token, &seat).await;
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (label, seat, status, body)
        }));
    }
    let mut answers: HashMap<String, (String, u16, Value)> = HashMap::new();
    for t in tasks {
        let (label, seat, status, body) = t.await.unwrap();
        answers.insert(label, (seat, status, body));
    }
    let code = |label: &str| answers[label].2["error"]["code"].as_str().unwrap_or("").to_string();

    for i in 0..30 {
        let (seat, status, body) = &answers[&format!("buyer{i}")];
        assert_eq!(*status, 201, "buyer{i}: {body}");
        assert_eq!(body["seatId"].as_str(), Some(seat.as_str()));
        assert_eq!(body["status"], "HELD");
    }
    let fight: Vec<u16> = (0..6).map(|i| answers[&format!("fighter{i}")].1).collect();
    assert_eq!(fight.iter().filter(|s| **s == 201).count(), 1, "one winner of the seat: {fight:?}");
    for i in 0..6 {
        if answers[&format!("fighter{i}")].1 != 201 {
            assert_eq!((answers[&format!("fighter{i}")].1, code(&format!("fighter{i}"))), (409, "SEAT_UNAVAILABLE".into()));
        }
    }
    let greedy_held = (0..7).filter(|i| answers[&format!("greedy{i}")].1 == 201).count();
    assert_eq!(greedy_held, 4, "the seat limit, with seven holds at once");
    for i in 0..7 {
        if answers[&format!("greedy{i}")].1 != 201 {
            assert_eq!((answers[&format!("greedy{i}")].1, code(&format!("greedy{i}"))), (409, "SEAT_LIMIT_REACHED".into()));
        }
    }
    assert_eq!((answers["taken"].1, code("taken")), (409, "SEAT_UNAVAILABLE".into()));
    assert_eq!((answers["other schedule"].1, code("other schedule")), (403, "QUEUE_TOKEN_MISMATCH".into()));
    assert_eq!(answers["no seat"].1, 404);

    // In the database: one live hold per 201, plus the one held before; the answer's expiresAt
    // is the row's, and each hold has its reservation.created with that expiresAt.
    let answered: Vec<(Uuid, DateTime<Utc>)> = answers
        .values()
        .filter(|a| a.1 == 201)
        .map(|a| (a.2["reservationId"].as_str().unwrap().parse().unwrap(), a.2["expiresAt"].as_str().unwrap().parse().unwrap()))
        .collect();
    assert_eq!(answered.len(), 30 + 1 + 4);
    let rows: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as("SELECT id, expires_at FROM reservations WHERE status = 'HELD'").fetch_all(&env.pool).await.unwrap();
    let rows: HashMap<Uuid, DateTime<Utc>> = rows.into_iter().collect();
    assert_eq!(rows.len(), answered.len() + 1);
    for (id, expires_at) in &answered {
        assert_eq!(rows.get(id), Some(expires_at), "hold {id}: the answer's expiresAt is the row's");
    }
    let events = env.events_written(&env.topics().reservation_created, |_| true).await;
    let events: HashMap<Uuid, DateTime<Utc>> = events
        .iter()
        .map(|e| (e["payload"]["reservationId"].as_str().unwrap().parse().unwrap(), e["payload"]["expiresAt"].as_str().unwrap().parse().unwrap()))
        .collect();
    assert_eq!(events.len(), rows.len(), "one reservation.created per hold");
    for (id, expires_at) in &rows {
        assert_eq!(events.get(id), Some(expires_at), "hold {id}: its event carries PostgreSQL's expiresAt");
    }

    // They were written in groups: some statement wrote more than one hold.
    let metrics = api.http.get(api.metrics_url.clone().unwrap()).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok())).unwrap_or(0.0);
    let (groups, grouped) = (value("hold_group_size_count"), value("hold_group_size_sum"));
    assert!(grouped > groups && groups > 0.0, "{grouped} holds in {groups} groups");
    Arc::try_unwrap(api).ok().unwrap().stop().await;
}
