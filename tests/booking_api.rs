//! The booking API against real PostgreSQL, Redis and Kafka (issue: booking API).

mod common;

use std::time::Duration;

use common::{QueueSettings, TestEnv};
use serde_json::{json, Value};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_simultaneous_holds_on_one_seat_give_one_winner_and_499_conflicts() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(1, 1000).await;
    let mut users = Vec::new();
    for i in 0..500 {
        let u = api.user(&format!("fan{i}")).await;
        let t = api.enter_queue(&u, &schedule).await["queueToken"].as_str().unwrap().to_string();
        users.push((u, t));
    }
    // Wait until every token is active (the queue admits 1000 per 100 ms tick here).
    for (u, t) in &users {
        let t2 = t.clone();
        common::eventually(Duration::from_secs(20), || { let t = t2.clone(); let api = &api; async move { api.queue_status(u, &t).await["status"] == "ACTIVE" } }).await;
    }
    let seat = seats[0].clone();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(users.len()));
    let mut tasks = Vec::new();
    for (u, t) in users {
        let (http, url, seat, barrier) = (api.http.clone(), api.url("/v1/reservations"), seat.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = http.post(url).bearer_auth(&u.token).header("X-Queue-Token", t).json(&json!({"seatId": seat})).send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (status, body)
        }));
    }
    let mut created = 0;
    let mut conflicts = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => created += 1,
            409 => {
                assert_eq!(body["error"]["code"], "SEAT_UNAVAILABLE");
                conflicts += 1
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!((created, conflicts), (1, 499));
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE seat_id = $1::uuid AND status IN ('HELD','CONFIRMED')")
        .bind(&seat).fetch_one(&env.pool).await.unwrap();
    assert_eq!(active, 1);
    assert_eq!(api.seat_status(&schedule, &seat).await, "HELD");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_past_its_expiry_cannot_be_paid_and_the_seat_can_be_held_by_someone_else() {
    let env = TestEnv::new().await;
    // No expirer runs in this test: only the rule itself stands between the user and the seat.
    let api = env.api(Duration::from_millis(800), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(1, 100).await;
    let alice = api.user("alice").await;
    api.charge(&alice, 1000).await;
    let t = api.active_token(&alice, &schedule).await;
    let r = api.hold(&alice, &t, &seats[0]).await;
    assert_eq!(r.status(), 201);
    let held: Value = r.json().await.unwrap();
    let id = held["reservationId"].as_str().unwrap().to_string();

    // Wait for the hold's expiry to pass (the seat reads AVAILABLE again), not a fixed time.
    common::eventually(Duration::from_secs(10), || async { api.seat_status(&schedule, &seats[0]).await == "AVAILABLE" }).await;
    let r = api.pay(&alice, "pay-1", &id).await;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RESERVATION_EXPIRED");
    assert_eq!(api.balance(&alice).await, 1000, "no points were taken");
    assert_eq!(api.seat_status(&schedule, &seats[0]).await, "AVAILABLE");

    let bob = api.user("bob").await;
    let tb = api.active_token(&bob, &schedule).await;
    let r = api.hold(&bob, &tb, &seats[0]).await;
    assert_eq!(r.status(), 201, "the stale hold no longer blocks the seat");
    let old: Value = api.reservation(&alice, &id).await.json().await.unwrap();
    assert_eq!(old["status"], "EXPIRED");
    assert!(old["expiredAt"].is_string());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_retried_with_its_idempotency_key_charges_once_and_answers_the_same() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(5, 300).await;
    let u = api.user("payer").await;
    api.charge(&u, 1000).await;
    let t = api.active_token(&u, &schedule).await;
    let held: Value = api.hold(&u, &t, &seats[0]).await.json().await.unwrap();
    let id = held["reservationId"].as_str().unwrap().to_string();

    // The same key, ten times at once.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (http, url, token, id) = (api.http.clone(), api.url("/v1/payments"), u.token.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).bearer_auth(token).header("Idempotency-Key", "key-A").json(&json!({"reservationId": id})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 201, "{body}");
        bodies.push(body);
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]), "every retry gets the same answer");
    assert_eq!(bodies[0]["status"], "CONFIRMED");
    assert_eq!(bodies[0]["balance"], 700);
    assert_eq!(api.balance(&u).await, 700, "charged once");
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&env.pool).await.unwrap();
    assert_eq!(payments, 1);

    // Paying freed the buyer's queue place: booking again means queueing again.
    let r = api.hold(&u, &t, &seats[1]).await;
    assert_eq!(r.status(), 403, "the token lapsed with the payment");
    let t = api.active_token(&u, &schedule).await;

    // The same key with another request is refused.
    let held2: Value = api.hold(&u, &t, &seats[1]).await.json().await.unwrap();
    let id2 = held2["reservationId"].as_str().unwrap().to_string();
    let r = api.pay(&u, "key-A", &id2).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "IDEMPOTENCY_KEY_REUSED");

    // The same key for two other holds at once: one is paid, the other told the key is taken.
    let t = api.active_token(&u, &schedule).await;
    let (ha, hb) = (api.hold(&u, &t, &seats[2]).await, api.hold(&u, &t, &seats[3]).await);
    let ha = ha.json::<Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string();
    let hb = hb.json::<Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string();
    let (a, b) = tokio::join!(api.pay(&u, "key-E", &ha), api.pay(&u, "key-E", &hb));
    let mut answers = vec![(a.status().as_u16(), a.json::<Value>().await.unwrap()), (b.status().as_u16(), b.json::<Value>().await.unwrap())];
    answers.sort_by_key(|(status, _)| *status);
    assert_eq!((answers[0].0, answers[1].0), (201, 422), "{answers:?}");
    assert_eq!(answers[1].1["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(api.balance(&u).await, 400, "charged once");
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM reservations WHERE id = ANY($1::uuid[]) ORDER BY status")
        .bind(vec![ha.clone(), hb.clone()])
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(statuses, vec!["CONFIRMED", "HELD"]);
    api.charge(&u, 300).await;
    for id in [&ha, &hb] {
        // The unpaid one goes, so the seat limit leaves room for the holds below.
        api.http.delete(api.url(&format!("/v1/reservations/{id}"))).bearer_auth(&u.token).send().await.unwrap();
    }

    // Two different keys for one hold: one 201, one 409.
    let (a, b) = tokio::join!(api.pay(&u, "key-B", &id2), api.pay(&u, "key-C", &id2));
    let mut statuses = vec![a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, vec![201, 409]);
    assert_eq!(api.balance(&u).await, 400);

    // Insufficient points: 409 and nothing changes.
    let t = api.active_token(&u, &schedule).await;
    let held3: Value = api.hold(&u, &t, &seats[4]).await.json().await.unwrap();
    let id3 = held3["reservationId"].as_str().unwrap().to_string();
    sqlx::query("UPDATE users SET balance = 100 WHERE id = $1::uuid").bind(&u.id).execute(&env.pool).await.unwrap();
    let r = api.pay(&u, "key-D", &id3).await;
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "INSUFFICIENT_POINTS");
    assert_eq!(api.balance(&u).await, 100);
    let still: Value = api.reservation(&u, &id3).await.json().await.unwrap();
    assert_eq!(still["status"], "HELD");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_whose_key_another_request_is_storing_waits_for_it_and_changes_nothing() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(1, 300).await;
    let u = api.user("racer").await;
    api.charge(&u, 1000).await;
    let t = api.active_token(&u, &schedule).await;
    let held: Value = api.hold(&u, &t, &seats[0]).await.json().await.unwrap();
    let id = held["reservationId"].as_str().unwrap().to_string();

    // Another request (for something else) has stored the key and not committed yet.
    let mut other = booking::db::begin(&env.pool).await.unwrap();
    sqlx::query("INSERT INTO idempotency_keys (user_id, scope, key, request_hash, status_code, response) VALUES ($1::uuid, 'payment', 'key-R', 'other', 201, '{}')")
        .bind(&u.id)
        .execute(&mut *other)
        .await
        .unwrap();
    let pay = {
        let (http, url, token, id) = (api.http.clone(), api.url("/v1/payments"), u.token.clone(), id.clone());
        tokio::spawn(async move {
            let r = http.post(url).bearer_auth(token).header("Idempotency-Key", "key-R").json(&json!({"reservationId": id})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    // The payment waits on that key: a backend waits for the other transaction to end.
    let other_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *other).await.unwrap();
    let pool = env.pool.clone();
    common::eventually(Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks w JOIN pg_locks h ON h.locktype = 'transactionid' AND h.transactionid = w.transactionid
                 WHERE h.pid = $1 AND h.granted AND NOT w.granted",
            )
            .bind(other_pid)
            .fetch_one(&pool)
            .await
            .unwrap();
            waiting > 0
        }
    })
    .await;
    other.commit().await.unwrap();
    let (status, body) = pay.await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("IDEMPOTENCY_KEY_REUSED")), "{body}");
    assert_eq!(api.balance(&u).await, 1000, "no points were taken");
    let r: Value = api.reservation(&u, &id).await.json().await.unwrap();
    assert_eq!(r["status"], "HELD");
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&env.pool).await.unwrap();
    let events = env.written_events(&env.topics().payment_completed, |_| true).await;
    assert_eq!((payments, events), (0, 0), "nothing of the payment was written");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_admits_in_arrival_order_at_most_batch_per_tick_and_guards_reservations() {
    let env = TestEnv::new().await;
    let q = QueueSettings { tick: Duration::from_millis(700), batch: 2, max_active: 100, idle: Duration::from_millis(1500) };
    let api = env.api(TTL, q).await;
    let (schedule, seats) = api.concert(5, 10).await;
    let (other_schedule, _) = api.concert(5, 10).await;
    let mut users = Vec::new();
    for i in 0..6 {
        let u = api.user(&format!("q{i}")).await;
        let v = api.enter_queue(&u, &schedule).await;
        let again = api.enter_queue(&u, &schedule).await;
        assert_eq!(v["queueToken"], again["queueToken"], "asking again returns the same token");
        users.push((u, v["queueToken"].as_str().unwrap().to_string()));
    }
    // Record the order in which users become ACTIVE, and how many per observation.
    let mut activated: Vec<usize> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut max_jump = 0;
    while activated.len() < 6 && tokio::time::Instant::now() < deadline {
        let before = activated.len();
        for (i, (u, t)) in users.iter().enumerate() {
            if !activated.contains(&i) && api.queue_status(u, t).await["status"] == "ACTIVE" {
                activated.push(i);
            }
        }
        max_jump = max_jump.max(activated.len() - before);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sorted_pairs = activated.clone();
    sorted_pairs.sort();
    assert_eq!(sorted_pairs, (0..6).collect::<Vec<_>>());
    // Admitted pairwise in arrival order: {0,1} before {2,3} before {4,5}.
    for (pos, i) in activated.iter().enumerate() {
        assert_eq!(pos / 2, i / 2, "user {i} admitted out of order: {activated:?}");
    }
    assert!(max_jump <= 2, "at most the batch size per tick");

    // A waiting token cannot reserve.
    let late = api.user("late").await;
    let lt = api.enter_queue(&late, &other_schedule).await["queueToken"].as_str().unwrap().to_string();
    let (u0, t0) = &users[0];
    // A forged token (signature changed) and someone else's token are refused.
    let forged = format!("{}{}", &t0[..t0.len() - 1], if t0.ends_with('0') { '1' } else { '0' });
    let r = api.hold(u0, &forged, &seats[0]).await;
    assert_eq!(r.status(), 403);
    let r = api.hold(&late, t0, &seats[0]).await;
    assert_eq!(r.status(), 403, "another user's token");
    let r = api.hold(&late, &lt, &seats[0]).await;
    assert_eq!(r.status(), 403, "a token for another schedule");
    let r = api.hold(u0, "", &seats[0]).await;
    assert_eq!(r.status(), 403, "no token");

    // Idle active tokens lapse.
    let (u5, t5) = &users[5];
    common::eventually(Duration::from_secs(10), || async { api.queue_status(u5, t5).await["status"] == "EXPIRED" }).await;
    let r = api.hold(u5, t5, &seats[1]).await;
    assert_eq!(r.status(), 403);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_token_cannot_reserve() {
    let env = TestEnv::new().await;
    let q = QueueSettings { tick: Duration::from_secs(3600), batch: 1, max_active: 1, idle: Duration::from_secs(60) };
    let api = env.api(TTL, q).await;
    let (schedule, seats) = api.concert(2, 10).await;
    let u = api.user("waiter").await;
    let v = api.enter_queue(&u, &schedule).await;
    assert_eq!(v["status"], "WAITING");
    assert_eq!(v["position"], 1);
    assert!(v["retryAfterMs"].as_u64().unwrap() > 0);
    let r = api.hold(&u, v["queueToken"].as_str().unwrap(), &seats[0]).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "QUEUE_TOKEN_NOT_ACTIVE");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_elses_reservation_is_not_found_for_read_cancel_and_payment() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(1, 10).await;
    let owner = api.user("owner").await;
    let thief = api.user("thief").await;
    api.charge(&thief, 1000).await;
    let t = api.active_token(&owner, &schedule).await;
    let held: Value = api.hold(&owner, &t, &seats[0]).await.json().await.unwrap();
    let id = held["reservationId"].as_str().unwrap();
    assert_eq!(api.reservation(&thief, id).await.status(), 404);
    let r = api.http.delete(api.url(&format!("/v1/reservations/{id}"))).bearer_auth(&thief.token).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(api.pay(&thief, "k", id).await.status(), 404);
    assert_eq!(api.balance(&thief).await, 1000);
    // The owner can still cancel: seat free again, and a second cancel is NOT_HELD.
    let r = api.http.delete(api.url(&format!("/v1/reservations/{id}"))).bearer_auth(&owner.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "CANCELLED");
    assert_eq!(api.seat_status(&schedule, &seats[0]).await, "AVAILABLE");
    let r = api.http.delete(api.url(&format!("/v1/reservations/{id}"))).bearer_auth(&owner.token).send().await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "NOT_HELD");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let u = api.user("careful").await;
    // A fresh connection per request: the server may close a connection after refusing a
    // request whose body it did not read, and a pooled client would then send the next request
    // on a closed connection (hyper's IncompleteMessage), which is not what this test checks.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let h = &fresh;
    let charge = api.url("/v1/users/me/points/charges");
    let send = |b: reqwest::RequestBuilder| async move {
        let r = b.send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("malformed json", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "a").body("{\"amount\":"), 400, "INVALID_INPUT"),
        ("wrong type", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "b").json(&json!({"amount": "ten"})), 400, "INVALID_INPUT"),
        ("unknown field", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "c").json(&json!({"amount": 5, "bonus": 1})), 400, "INVALID_INPUT"),
        ("zero amount", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "d").json(&json!({"amount": 0})), 400, "INVALID_INPUT"),
        ("negative amount", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "e").json(&json!({"amount": -5})), 400, "INVALID_INPUT"),
        ("huge amount", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "f").json(&json!({"amount": 10_000_001})), 400, "INVALID_INPUT"),
        ("overflowing amount", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "g").body("{\"amount\": 99999999999999999999999}"), 400, "INVALID_INPUT"),
        ("missing idempotency key", h.post(&charge).bearer_auth(&u.token).json(&json!({"amount": 5})), 400, "INVALID_INPUT"),
        ("no token", h.post(&charge).header("Idempotency-Key", "h").json(&json!({"amount": 5})), 401, "UNAUTHORIZED"),
        ("bad token", h.post(&charge).bearer_auth("nope").header("Idempotency-Key", "i").json(&json!({"amount": 5})), 401, "UNAUTHORIZED"),
        ("oversized body", h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "j").body(format!("{{\"amount\": 5, \"x\": \"{}\"}}", "a".repeat(70_000))), 413, "PAYLOAD_TOO_LARGE"),
        ("bad uuid in body", h.post(api.url("/v1/reservations")).bearer_auth(&u.token).json(&json!({"seatId": "not-a-uuid"})), 400, "INVALID_INPUT"),
        ("bad uuid in path", h.get(api.url("/v1/reservations/not-a-uuid")).bearer_auth(&u.token), 404, "NOT_FOUND"),
        ("unknown schedule", h.get(api.url(&format!("/v1/schedules/{}/seats", Uuid::new_v4()))), 404, "NOT_FOUND"),
        ("empty name", h.post(api.url("/v1/users")).json(&json!({"name": ""})), 400, "INVALID_INPUT"),
        ("non utf-8 body", h.post(api.url("/v1/users")).body(vec![0xff, 0xfe, 0x00]), 400, "INVALID_INPUT"),
        ("admin without token", h.post(api.url("/v1/admin/concerts")).json(&json!({"title": "x", "schedules": []})), 401, "UNAUTHORIZED"),
        ("unknown route", h.get(api.url("/v1/nothing-here")), 404, "NOT_FOUND"),
    ];
    for (name, req, status, code) in cases {
        let (s, body) = send(req).await;
        assert_eq!(s, status, "{name}: {body}");
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
    }
    let (_, body) = send(h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "k").json(&json!({"amount": "ten"}))).await;
    assert_eq!(body["error"]["field"], "amount", "the field is named: {body}");
    let (_, body) = send(h.post(&charge).bearer_auth(&u.token).header("Idempotency-Key", "l").json(&json!({"amount": 1, "bonus": 1}))).await;
    assert_eq!(body["error"]["field"], "bonus", "the unknown field is named: {body}");
    let r = h.put(api.url("/v1/users")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = h.patch(api.url(&format!("/v1/reservations/{}", Uuid::new_v4()))).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, DELETE");
    assert_eq!(api.balance(&u).await, 0, "nothing was credited");
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM point_ledger").fetch_one(&env.pool).await.unwrap();
    assert_eq!(ledger, 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_on_an_unknown_seat_or_a_seat_of_another_schedule_is_refused_and_holds_nothing() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, _) = api.concert(1, 10).await;
    let (_, elsewhere) = api.concert(1, 10).await;
    let u = api.user("lost").await;
    let t = api.active_token(&u, &schedule).await;
    let code = |r: reqwest::Response| async move { (r.status().as_u16(), r.json::<Value>().await.unwrap()["error"]["code"].as_str().unwrap_or("").to_string()) };
    for key in [None, Some("k")] {
        let hold = |seat: String| {
            let mut b = api.http.post(api.url("/v1/reservations")).bearer_auth(&u.token).header("X-Queue-Token", &t);
            if let Some(k) = key {
                b = b.header("Idempotency-Key", k);
            }
            b.json(&json!({"seatId": seat})).send()
        };
        assert_eq!(code(hold(Uuid::new_v4().to_string()).await.unwrap()).await, (404, "NOT_FOUND".into()), "unknown seat, key {key:?}");
        assert_eq!(code(hold(elsewhere[0].clone()).await.unwrap()).await, (403, "QUEUE_TOKEN_MISMATCH".into()), "another schedule's seat, key {key:?}");
    }
    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations").fetch_one(&env.pool).await.unwrap();
    let events = env.written_events(&env.topics().reservation_created, |_| true).await;
    assert_eq!((reservations, events), (0, 0));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_retried_with_its_key_credits_once() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let u = api.user("saver").await;
    let send = || api.http.post(api.url("/v1/users/me/points/charges")).bearer_auth(&u.token).header("Idempotency-Key", "same").json(&json!({"amount": 500})).send();
    let (a, b) = tokio::join!(send(), send());
    let (a, b): (Value, Value) = (a.unwrap().json().await.unwrap(), b.unwrap().json().await.unwrap());
    assert_eq!(a, b);
    assert_eq!(a["balance"], 500);
    assert_eq!(api.balance(&u).await, 500);
    let hist: Value = api.http.get(api.url("/v1/users/me/points/history")).bearer_auth(&u.token).send().await.unwrap().json().await.unwrap();
    assert_eq!(hist["items"].as_array().unwrap().len(), 1);
    assert_eq!(hist["items"][0]["kind"], "CHARGE");
    assert_eq!(hist["items"][0]["balanceAfter"], 500);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_booking_leaves_through_the_outbox_once() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(2, 50).await;
    let u = api.user("evented").await;
    api.charge(&u, 100).await;
    let t = api.active_token(&u, &schedule).await;
    let h1: Value = api.hold(&u, &t, &seats[0]).await.json().await.unwrap();
    let h2: Value = api.hold(&u, &t, &seats[1]).await.json().await.unwrap();
    let r = api.pay(&u, "p", h1["reservationId"].as_str().unwrap()).await;
    assert_eq!(r.status(), 201);
    let answer: Value = r.json().await.unwrap();
    let r = api.http.delete(api.url(&format!("/v1/reservations/{}", h2["reservationId"].as_str().unwrap()))).bearer_auth(&u.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let topics = env.topics().clone();
    let created = env.read_topic_settled(&topics.reservation_created, 2, Duration::from_secs(20), Duration::from_millis(500)).await;
    assert_eq!(created.len(), 2);
    assert!(created.iter().all(|e| e["eventType"] == "reservation.created"));
    // The event says what the hold answered and what PostgreSQL stored: the delay scheduler
    // expires the hold at the event's expiresAt, so it must be the row's, to the microsecond.
    for h in [&h1, &h2] {
        let e = created.iter().find(|e| e["payload"]["reservationId"] == h["reservationId"]).expect("an event per hold");
        for field in ["seatId", "scheduleId"] {
            assert_eq!(e["payload"][field], h[field], "{field}");
        }
        let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
        let id = Uuid::parse_str(h["reservationId"].as_str().unwrap()).unwrap();
        let stored: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT expires_at FROM reservations WHERE id = $1").bind(id).fetch_one(&env.pool).await.unwrap();
        assert_eq!(at(&e["payload"]["expiresAt"]), stored, "the event's expiresAt is the row's");
        assert_eq!(at(&h["expiresAt"]), stored, "the answer's expiresAt is the row's");
        assert_eq!(at(&h["expiresAt"]) - at(&h["createdAt"]), chrono::Duration::from_std(TTL).unwrap(), "expiresAt = createdAt + TTL");
    }
    let paid = env.read_topic_settled(&topics.payment_completed, 1, Duration::from_secs(20), Duration::from_millis(500)).await;
    assert_eq!(paid.len(), 1);
    // The event says what the payment answered and what PostgreSQL stored.
    let event = &paid[0]["payload"];
    assert_eq!(event["reservationId"], h1["reservationId"]);
    for field in ["seatId", "scheduleId"] {
        assert_eq!(event[field], h1[field], "{field}");
    }
    for field in ["paymentId", "amount", "paidAt"] {
        assert_eq!(event[field], answer[field], "{field}");
    }
    assert_eq!(event["amount"], 50);
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let stored: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT paid_at FROM payments WHERE id = $1").bind(Uuid::parse_str(answer["paymentId"].as_str().unwrap()).unwrap()).fetch_one(&env.pool).await.unwrap();
    assert_eq!(at(&event["paidAt"]), stored, "the event's paidAt is the payment's");
    let cancelled = env.read_topic_settled(&topics.reservation_cancelled, 1, Duration::from_secs(20), Duration::from_millis(500)).await;
    assert_eq!(cancelled.len(), 1);
    // QUEUE_POSITION (entry), QUEUE_ACTIVATED (admission), PAYMENT_CONFIRMED.
    let notes = env.read_topic_settled(&topics.notification_request, 3, Duration::from_secs(20), Duration::from_millis(500)).await;
    let mut types: Vec<&str> = notes.iter().map(|n| n["payload"]["type"].as_str().unwrap()).collect();
    types.sort();
    assert_eq!(types, vec!["PAYMENT_CONFIRMED", "QUEUE_ACTIVATED", "QUEUE_POSITION"]);
    let confirmed = &notes.iter().find(|n| n["payload"]["type"] == "PAYMENT_CONFIRMED").unwrap()["payload"]["data"];
    for field in ["reservationId", "seatId", "scheduleId"] {
        assert_eq!(confirmed[field], h1[field], "{field}");
    }
    assert_eq!((&confirmed["paymentId"], &confirmed["amount"]), (&answer["paymentId"], &answer["amount"]));
    // The outbox keeps only what is still to be sent.
    let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&env.pool).await.unwrap();
    assert_eq!(unpublished, 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_lists_exactly_the_routes_served() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let r = api.http.get(api.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.starts_with("openapi: 3"), "an OpenAPI 3 document");
    let documented: Vec<(String, String)> = openapi_operations(&text);
    let mut served: Vec<String> = booking::http::ROUTES.iter().map(|r| r.to_string()).collect();
    served.sort();
    let mut doc_paths: Vec<String> = documented.iter().map(|(p, _)| p.replace("{concertId}", "{id}").replace("{scheduleId}", "{id}").replace("{reservationId}", "{id}")).collect();
    doc_paths.sort();
    doc_paths.dedup();
    assert_eq!(doc_paths, served, "documented paths = served paths");
    // Every documented operation is routed (never warp's "no such route" / 405).
    for (path, method) in documented {
        let concrete = path.replace("{concertId}", &Uuid::new_v4().to_string()).replace("{scheduleId}", &Uuid::new_v4().to_string()).replace("{reservationId}", &Uuid::new_v4().to_string()).replace("{id}", &Uuid::new_v4().to_string());
        if path.ends_with("/stream") {
            continue;
        }
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = api.http.request(m, api.url(&concrete)).send().await.unwrap();
        assert_ne!(r.status(), 405, "{method} {path}");
        if r.status() == 404 {
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_ne!(body["error"]["message"], "no such route", "{method} {path} is not routed");
        }
    }
    api.stop().await;
}

/// (path, method) pairs of the `paths:` section, read without a YAML library: paths are indented
/// two spaces, methods four.
fn openapi_operations(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_paths = false;
    let mut current = None;
    for line in text.lines() {
        if line.starts_with("paths:") {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.trim().is_empty() {
            break;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            current = Some(format!("/{}", p.trim_end_matches(':').trim_end_matches(":").trim().trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.trim_end_matches(':');
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                if let Some(p) = &current {
                    out.push((p.trim_end_matches(':').to_string(), m.to_string()));
                }
            }
        }
    }
    out
}
