//! A fair sale (issue 12) and queue notifications that cannot be lost (issue 15 item 4), against
//! the real PostgreSQL, Redis and Kafka: the seat limit per user, the active window that ends,
//! the shuffled early arrivals, operators steering admission, idempotent holds, my reservations.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use booking::queue::{EarlyOrder, Queue, QueueConfig};
use common::{FairSettings, QueueSettings, TestApi, TestEnv, User, ADMIN};
use serde_json::{json, Value};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(300);

async fn admin_get(api: &TestApi, schedule: &str) -> Value {
    let r = api.http.get(api.url(&format!("/v1/admin/schedules/{schedule}/queue"))).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn admin_patch(api: &TestApi, schedule: &str, body: Value) -> Value {
    let r = api.http.patch(api.url(&format!("/v1/admin/schedules/{schedule}/queue"))).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// A queue handle on the test's Redis, as another api replica would have it (for driving one
/// admission step at a time).
fn replica(env: &TestEnv, batch: u32, max_active: u32) -> Queue {
    Queue::new(
        env.res.redis.clone(),
        env.keys().clone(),
        QueueConfig {
            tick: Duration::from_secs(3600),
            batch,
            max_active,
            idle: Duration::from_secs(300),
            active_limit: Duration::from_secs(900),
            early_order: EarlyOrder::Shuffle,
            secret: "test-secret".into(),
        },
    )
}

/// The api's own admission loop ticks once at start and then not for an hour: the test drives
/// admission one step at a time.
fn driven_queue() -> QueueSettings {
    QueueSettings { tick: Duration::from_secs(3600), ..QueueSettings::default() }
}

/// A schedule whose booking opens in 2098: every entrant is an early arrival until the test
/// moves the opening.
async fn opening_night(api: &TestApi) -> String {
    let body = json!({"title": "Opening night", "schedules": [{"startsAt": "2099-01-01T19:00:00Z", "bookingOpensAt": "2098-01-01T00:00:00Z", "seatCount": 10, "price": 10}]});
    let v: Value = api.http.post(api.url("/v1/admin/concerts")).bearer_auth(ADMIN).json(&body).send().await.unwrap().json().await.unwrap();
    v["schedules"][0]["scheduleId"].as_str().unwrap().to_string()
}

/// The operator moves the opening of `schedule` to a second ago, and the test waits out the
/// second each api trusts an opening time it read (`catalog::OpeningTimes`).
async fn open_now(env: &TestEnv, schedule: &str) {
    sqlx::query("UPDATE schedules SET booking_opens_at = now() - interval '1 second' WHERE id = $1::uuid")
        .bind(schedule).execute(&env.pool).await.unwrap();
    tokio::time::sleep(booking::catalog::OPENING_TIME_TTL).await;
}

/// `n` new users named `{prefix}{i}` enter the queue of `schedule` through `api`: each with the
/// answer it got and its queue token.
async fn enter(api: &TestApi, schedule: &str, prefix: &str, n: usize) -> Vec<(User, Value, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let u = api.user(&format!("{prefix}{i}")).await;
        let v = api.enter_queue(&u, schedule).await;
        let token = v["queueToken"].as_str().unwrap().to_string();
        out.push((u, v, token));
    }
    out
}

fn sid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

async fn activated_notifications(env: &TestEnv, user: &str) -> i64 {
    let activated = |e: &Value| e["payload"]["type"] == "QUEUE_ACTIVATED" && e["payload"]["userId"] == user;
    env.written_events(&env.topics().notification_request, activated).await as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_schedule_admits_nobody_until_resumed_and_a_batch_change_applies_on_the_next_tick() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, driven_queue()).await;
    let (schedule, _) = api.concert(5, 10).await;

    // Unauthorized callers and unknown schedules are refused.
    let r = api.http.get(api.url(&format!("/v1/admin/schedules/{schedule}/queue"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let user = api.user("not-an-admin").await;
    let r = api.http.patch(api.url(&format!("/v1/admin/schedules/{schedule}/queue"))).bearer_auth(&user.token).json(&json!({"paused": true})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = api.http.get(api.url(&format!("/v1/admin/schedules/{}/queue", Uuid::new_v4()))).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), 404);
    for bad in [json!({"batch": 0}), json!({"maxActive": -1}), json!({"paused": "yes"}), json!({"speed": 3}), json!({"maxActive": null}), json!({"paused": null})] {
        let r = api.http.patch(api.url(&format!("/v1/admin/schedules/{schedule}/queue"))).bearer_auth(ADMIN).json(&bad).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }

    let state = admin_patch(&api, &schedule, json!({"paused": true})).await;
    assert_eq!(state, json!({"waiting": 0, "active": 0, "paused": true, "batch": 1000, "tick": 3_600_000, "maxActive": 100_000, "admittedTotal": 0}));

    let mut users = Vec::new();
    for i in 0..8 {
        let u = api.user(&format!("fan{i}")).await;
        let t = api.enter_queue(&u, &schedule).await["queueToken"].as_str().unwrap().to_string();
        users.push((u, t));
    }
    // Two replicas with other flag defaults: the operator's setting in Redis rules both.
    let (a, b) = (replica(&env, 1000, 100_000), replica(&env, 7, 50));
    for q in [&a, &b, &a] {
        let step = q.admit(sid(&schedule)).await.unwrap();
        assert!(step.paused);
        assert_eq!(step.admitted, 0, "a paused schedule admits nobody");
    }
    let state = admin_get(&api, &schedule).await;
    assert_eq!((state["waiting"].as_u64(), state["active"].as_u64(), state["paused"].as_bool()), (Some(8), Some(0), Some(true)));
    for (u, t) in &users {
        assert_eq!(api.queue_status(u, t).await["status"], "WAITING");
    }

    // Resume with a batch of 2: the next tick admits 2, on whichever replica runs it.
    admin_patch(&api, &schedule, json!({"paused": false, "batch": 2})).await;
    assert_eq!(b.admit(sid(&schedule)).await.unwrap().admitted, 2);
    assert_eq!(a.admit(sid(&schedule)).await.unwrap().admitted, 2);
    // Pausing again keeps the active users' places.
    admin_patch(&api, &schedule, json!({"paused": true})).await;
    assert_eq!(a.admit(sid(&schedule)).await.unwrap().admitted, 0);
    let active: Vec<usize> = {
        let mut v = Vec::new();
        for (i, (u, t)) in users.iter().enumerate() {
            if api.queue_status(u, t).await["status"] == "ACTIVE" {
                v.push(i);
            }
        }
        v
    };
    assert_eq!(active, vec![0, 1, 2, 3], "arrival order, still active while paused");
    // A batch change while running takes effect on the very next tick; maxActive caps it.
    admin_patch(&api, &schedule, json!({"paused": false, "batch": 3})).await;
    assert_eq!(b.admit(sid(&schedule)).await.unwrap().admitted, 3);
    admin_patch(&api, &schedule, json!({"maxActive": 8, "batch": 100})).await;
    assert_eq!(a.admit(sid(&schedule)).await.unwrap().admitted, 1);
    let state = admin_get(&api, &schedule).await;
    assert_eq!(state, json!({"waiting": 0, "active": 8, "paused": false, "batch": 100, "tick": 3_600_000, "maxActive": 8, "admittedTotal": 8}));
    api.stop().await;
}

/// Makes PostgreSQL refuse every outbox row of notification type `kind` for `schedule`, through
/// a trigger named `refuse_<kind in lower case>` (the test drops it to end the outage).
async fn refuse_notifications(env: &TestEnv, kind: &str, schedule: &str) {
    let name = format!("refuse_{}", kind.to_lowercase());
    sqlx::query(&format!(
        "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.envelope->'payload'->>'type' = '{kind}' AND NEW.envelope->'payload'->'data'->>'scheduleId' = '{schedule}' THEN
             RAISE EXCEPTION 'simulated outage';
           END IF;
           RETURN NEW;
         END $$"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(&format!("CREATE TRIGGER {name} BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION {name}()")).execute(&env.pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_activated_is_written_after_a_postgres_failure_and_once_after_a_crash_between_the_steps() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (blocked, _) = api.concert(2, 10).await;
    let (other, _) = api.concert(2, 10).await;
    // PostgreSQL refuses QUEUE_ACTIVATED for one schedule, as if it were down for that write.
    refuse_notifications(&env, "QUEUE_ACTIVATED", &blocked).await;

    let alice = api.user("alice").await;
    api.active_token(&alice, &blocked).await;
    // Two more admissions on the other schedule, one after the other: by the time the second is
    // ACTIVE, at least one whole tick ran after Alice's admission (and failed to notify her).
    let bob = api.user("bob").await;
    api.active_token(&bob, &other).await;
    let carol = api.user("carol").await;
    api.active_token(&carol, &other).await;
    // Each one's notification is written in the admitting tick, just after the place turns
    // ACTIVE in Redis (what `active_token` waits for): await it rather than race it.
    common::eventually(Duration::from_secs(10), || async { activated_notifications(&env, &bob.id).await == 1 }).await;
    common::eventually(Duration::from_secs(10), || async { activated_notifications(&env, &carol.id).await == 1 }).await;
    // One schedule's failure does not hold back another's; Alice's stays unwritten meanwhile.
    assert_eq!(activated_notifications(&env, &alice.id).await, 0);

    // PostgreSQL is back: Alice's notification is written, once.
    sqlx::query("DROP TRIGGER refuse_queue_activated ON outbox").execute(&env.pool).await.unwrap();
    common::eventually(Duration::from_secs(10), || async { activated_notifications(&env, &alice.id).await == 1 }).await;

    // A crash between the two steps: admitted in Redis by one replica, which dies before
    // writing the notification; the next tick (another replica) writes it.
    api.stop().await;
    let (sched, _) = {
        let api = env.api(TTL, driven_queue()).await;
        let c = api.concert(2, 10).await;
        let dave = api.user("dave").await;
        api.enter_queue(&dave, &c.0).await;
        api.stop().await;
        (c.0, dave)
    };
    let dave_id: String = sqlx::query_scalar("SELECT id::text FROM users WHERE name = 'dave'").fetch_one(&env.pool).await.unwrap();
    let dying = replica(&env, 10, 100);
    assert_eq!(dying.admit(sid(&sched)).await.unwrap().admitted, 1);
    drop(dying); // SIGKILL here: admitted, nothing written to PostgreSQL
    assert_eq!(activated_notifications(&env, &dave_id).await, 0);
    let survivor = replica(&env, 10, 100);
    survivor.tick(&env.pool, env.topics()).await.unwrap();
    assert_eq!(activated_notifications(&env, &dave_id).await, 1);
    // A crash after the commit but before the pending entry left Redis: the re-drain writes
    // nothing new (same event id).
    let pending = env.keys().queue_pending_notifications(sid(&sched));
    let mut conn = env.res.redis.clone();
    let _: () = redis::cmd("RPUSH").arg(&pending).arg(format!("{dave_id}:1")).query_async(&mut conn).await.unwrap();
    assert_eq!(survivor.drain_notifications(&env.pool, env.topics(), sid(&sched)).await.unwrap(), 1);
    assert_eq!(activated_notifications(&env, &dave_id).await, 1, "de-duplicated by event id");
    let left: i64 = redis::cmd("LLEN").arg(&pending).query_async(&mut conn).await.unwrap();
    assert_eq!(left, 0);
}

async fn position_notifications(env: &TestEnv, user: &str) -> Vec<Value> {
    let position = |e: &Value| e["payload"]["type"] == "QUEUE_POSITION" && e["payload"]["userId"] == user;
    env.events_written(&env.topics().notification_request, position).await
}

/// Issue 11 and "nothing lost": a new entrant's `QUEUE_POSITION` used to be written by the
/// entering request itself, after the entry was made in Redis. With PostgreSQL refusing that
/// write the request failed, the entry stayed, and the client's retry found it already queued:
/// the notification was never written. Now the entry and its pending notification are one
/// atomic step in Redis, and the admission tick writes it once PostgreSQL takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_position_is_written_after_a_postgres_failure_and_the_entry_is_answered_meanwhile() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (blocked, _) = api.concert(2, 10).await;
    let (other, _) = api.concert(2, 10).await;
    // PostgreSQL refuses QUEUE_POSITION for one schedule, as if it were down for that write.
    refuse_notifications(&env, "QUEUE_POSITION", &blocked).await;

    // The entry does not wait for PostgreSQL: Alice is answered with her place.
    let alice = api.user("alice").await;
    let r = api.http.post(api.url("/v1/queue/tokens")).bearer_auth(&alice.token).json(&json!({"scheduleId": blocked})).send().await.unwrap();
    assert_eq!(r.status(), 201, "the entry is answered while its notification cannot be written");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["position"], 1);
    // Bob enters another schedule after her; once his notification is out, a tick ran after
    // Alice's entry and could not write hers.
    let bob = api.user("bob").await;
    api.enter_queue(&bob, &other).await;
    common::eventually(Duration::from_secs(10), || async { position_notifications(&env, &bob.id).await.len() == 1 }).await;
    assert!(position_notifications(&env, &alice.id).await.is_empty());

    // PostgreSQL takes it again: Alice's notification is written, once, with the place she was given.
    sqlx::query("DROP TRIGGER refuse_queue_position ON outbox").execute(&env.pool).await.unwrap();
    common::eventually(Duration::from_secs(10), || async { position_notifications(&env, &alice.id).await.len() == 1 }).await;
    let written = position_notifications(&env, &alice.id).await;
    assert_eq!(written[0]["payload"]["data"]["position"], 1);
    assert_eq!(written[0]["payload"]["data"]["scheduleId"], blocked.as_str());

    // A crash after the commit but before the pending entry left Redis: the re-drain writes
    // nothing new (the same event id). The entry is put back as the script wrote it.
    api.stop().await;
    let pending = env.keys().queue_pending_notifications(sid(&blocked));
    let mut conn = env.res.redis.clone();
    let _: () = redis::cmd("RPUSH").arg(&pending).arg(format!("position:{}:1:1", alice.id)).query_async(&mut conn).await.unwrap();
    let survivor = replica(&env, 10, 100);
    assert_eq!(survivor.drain_notifications(&env.pool, env.topics(), sid(&blocked)).await.unwrap(), 1);
    let left: i64 = redis::cmd("LLEN").arg(&pending).query_async(&mut conn).await.unwrap();
    assert_eq!(left, 0);
    // The re-drained row carries the first one's event id (the outbox drops it while the first
    // is unsent; the worker stores one notification per event id).
    assert_eq!(position_notifications(&env, &alice.id).await.len(), 1, "the same event id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_holds_by_one_user_across_two_replicas_give_exactly_the_limit() {
    let env = TestEnv::new().await;
    let fair = FairSettings { max_seats_per_user: 4, ..FairSettings::default() };
    let api1 = env.api_with(TTL, QueueSettings::default(), fair).await;
    let api2 = env.api_with(TTL, QueueSettings::default(), fair).await;
    let (schedule, seats) = api1.concert(24, 10).await;
    let u = api1.user("greedy").await;
    let t = api1.active_token(&u, &schedule).await;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for (i, seat) in seats.iter().take(20).enumerate() {
        let api = if i % 2 == 0 { &api1 } else { &api2 };
        let (http, url, token, qt, seat, barrier) = (api.http.clone(), api.url("/v1/reservations"), u.token.clone(), t.clone(), seat.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = http.post(url).bearer_auth(token).header("X-Queue-Token", qt).json(&json!({"seatId": seat})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut held = Vec::new();
    let mut limited = 0;
    for task in tasks {
        match task.await.unwrap() {
            (201, body) => held.push(body["reservationId"].as_str().unwrap().to_string()),
            (409, body) => {
                assert_eq!(body["error"]["code"], "SEAT_LIMIT_REACHED", "{body}");
                limited += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((held.len(), limited), (4, 16));
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE user_id = $1::uuid AND status = 'HELD'")
        .bind(&u.id).fetch_one(&env.pool).await.unwrap();
    assert_eq!(live, 4);
    // The apis run in this process: their series are in its recorder (served on --metrics-addr).
    let metrics = booking::telemetry::install_metrics().render();
    assert!(metrics.contains("holds_total{outcome=\"limit\"}"), "the limit has its own hold outcome");

    // One hold's time runs out (its expiresAt passes; no expirer needed): one more hold succeeds,
    // and the one after that hits the limit again.
    sqlx::query("UPDATE reservations SET expires_at = now() - interval '1 second' WHERE id = $1::uuid")
        .bind(&held[0]).execute(&env.pool).await.unwrap();
    assert_eq!(api2.hold(&u, &t, &seats[20]).await.status(), 201);
    let r = api1.hold(&u, &t, &seats[21]).await;
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "SEAT_LIMIT_REACHED");
    // A cancelled hold stops counting too.
    let r = api1.http.delete(api1.url(&format!("/v1/reservations/{}", held[1]))).bearer_auth(&u.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(api1.hold(&u, &t, &seats[21]).await.status(), 201);
    // A paid seat still counts; a refunded one stops counting. (The payment ends the queue
    // place, so the user queues again for the next holds.)
    api1.charge(&u, 10).await;
    assert_eq!(api1.pay(&u, "pay-limit", &held[2]).await.status(), 201);
    let t = api1.active_token(&u, &schedule).await;
    // A seat none of the earlier holds took (any of seats 0 to 19 may be one the user holds or
    // paid for, which answers SEAT_UNAVAILABLE before the limit is looked at).
    let r = api1.hold(&u, &t, &seats[23]).await;
    assert_eq!((r.status(), r.json::<Value>().await.unwrap()["error"]["code"].clone()), (reqwest::StatusCode::CONFLICT, json!("SEAT_LIMIT_REACHED")), "CONFIRMED counts");
    let r = api1.http.post(api1.url(&format!("/v1/reservations/{}/refund", held[2]))).bearer_auth(&u.token).header("Idempotency-Key", "refund-limit").send().await.unwrap();
    assert_eq!(r.status(), 200, "refunded");
    assert_eq!(api1.hold(&u, &t, &seats[23]).await.status(), 201, "a refunded seat stops counting");
    // Another user is not limited by this one.
    let other = api1.user("other").await;
    let ot = api1.active_token(&other, &schedule).await;
    assert_eq!(api1.hold(&other, &ot, &seats[22]).await.status(), 201);
    api1.stop().await;
    api2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_user_whose_attempts_all_fail_lapses_at_the_idle_timeout() {
    let env = TestEnv::new().await;
    let q = QueueSettings { idle: Duration::from_secs(2), ..QueueSettings::default() };
    let api = env.api(TTL, q).await;
    let (schedule, seats) = api.concert(2, 10).await;
    let owner = api.user("owner").await;
    let ot = api.active_token(&owner, &schedule).await;
    assert_eq!(api.hold(&owner, &ot, &seats[0]).await.status(), 201);

    let bot = api.user("bot").await;
    let bt = api.active_token(&bot, &schedule).await;
    let deadline = api.queue_status(&bot, &bt).await["activeUntil"].as_str().unwrap().to_string();
    let mut attempts = 0;
    loop {
        // No such seat: 404 while active; once lapsed the queue answers first, 403.
        let missing = api.hold(&bot, &bt, &Uuid::new_v4().to_string()).await.status().as_u16();
        let r = api.hold(&bot, &bt, &seats[0]).await; // taken: 409 while active, 403 once lapsed
        let status = r.status().as_u16();
        if missing == 403 {
            assert_eq!(status, 403, "a lapsed place stays lapsed");
            break;
        }
        assert_eq!(missing, 404);
        if status == 403 {
            break;
        }
        assert_eq!(status, 409);
        attempts += 1;
        let place = api.queue_status(&bot, &bt).await;
        if place["status"] == "ACTIVE" {
            assert_eq!(place["activeUntil"].as_str().unwrap(), deadline, "a failed attempt does not extend the place");
        }
        assert!(attempts < 200, "the place never lapsed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(attempts > 0);
    assert_eq!(api.queue_status(&bot, &bt).await["status"], "EXPIRED");
    // A lapsed user must queue again; the new place works.
    let bt2 = api.active_token(&bot, &schedule).await;
    assert_eq!(api.hold(&bot, &bt2, &seats[1]).await.status(), 201);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_user_who_keeps_succeeding_lapses_at_the_active_limit() {
    let env = TestEnv::new().await;
    let q = QueueSettings { idle: Duration::from_millis(1500), ..QueueSettings::default() };
    let fair = FairSettings { active_limit: Duration::from_secs(4), ..FairSettings::default() };
    let api = env.api_with(TTL, q, fair).await;
    let (schedule, seats) = api.concert(1, 10).await;
    let u = api.user("busy").await;
    let t = api.active_token(&u, &schedule).await;
    let first: chrono::DateTime<chrono::Utc> = api.queue_status(&u, &t).await["activeUntil"].as_str().unwrap().parse().unwrap();
    // Activation + idle = first deadline, so the hard limit is activation + 4 s.
    let hard = first - chrono::Duration::milliseconds(1500) + chrono::Duration::seconds(4);
    let mut successes = 0;
    let mut latest = first;
    loop {
        let r = api.hold(&u, &t, &seats[0]).await;
        if r.status() == 403 {
            break;
        }
        assert_eq!(r.status(), 201);
        successes += 1;
        let id = r.json::<Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string();
        let place = api.queue_status(&u, &t).await;
        if place["status"] == "ACTIVE" {
            let until: chrono::DateTime<chrono::Utc> = place["activeUntil"].as_str().unwrap().parse().unwrap();
            assert!(until <= hard, "never past the active limit: {until} > {hard}");
            latest = latest.max(until);
        }
        let r = api.http.delete(api.url(&format!("/v1/reservations/{id}"))).bearer_auth(&u.token).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(successes < 500, "the place never lapsed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(latest > first, "successful holds extended the place");
    assert_eq!(latest, hard, "until the active limit");
    assert_eq!(api.queue_status(&u, &t).await["status"], "EXPIRED");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_early_arrivals_are_shuffled_once_the_same_on_every_replica_and_before_every_late_one() {
    let env = TestEnv::new().await;
    let q = QueueSettings { tick: Duration::from_millis(100), ..QueueSettings::default() };
    let api1 = env.api(TTL, q).await;
    let api2 = env.api(TTL, q).await;
    let schedule = opening_night(&api1).await;
    // The operator holds admission, so positions can be read after the draw.
    admin_patch(&api1, &schedule, json!({"paused": true})).await;

    let mut early: Vec<(User, String)> = Vec::new();
    for i in 0..1000 {
        let u = api1.user(&format!("early{i}")).await;
        let v = if i % 2 == 0 { api1.enter_queue(&u, &schedule).await } else { api2.enter_queue(&u, &schedule).await };
        assert_eq!(v["status"], "WAITING");
        assert!(v["position"].is_null(), "no position before opening: {v}");
        assert_eq!(v["opensAt"], "2098-01-01T00:00:00Z");
        early.push((u, v["queueToken"].as_str().unwrap().to_string()));
    }
    // Booking opens now (the operator moved the opening; each entry copies it to Redis).
    open_now(&env, &schedule).await;
    let late: Vec<(User, String)> = enter(&api2, &schedule, "late", 20).await.into_iter().map(|(u, _, t)| (u, t)).collect();
    // The draw happens at the first tick after opening, paused or not.
    let (u0, t0) = &early[0];
    common::eventually(Duration::from_secs(10), || async { api1.queue_status(u0, t0).await["position"].is_number() }).await;

    let mut positions = Vec::new();
    for (i, (u, t)) in early.iter().chain(late.iter()).enumerate() {
        let p1 = api1.queue_status(u, t).await;
        let p2 = api2.queue_status(u, t).await;
        assert_eq!(p1["position"], p2["position"], "the same order through both replicas (user {i})");
        positions.push(p1["position"].as_u64().unwrap());
    }
    let (early_pos, late_pos) = positions.split_at(1000);
    let mut sorted = early_pos.to_vec();
    sorted.sort();
    assert_eq!(sorted, (1..=1000).collect::<Vec<u64>>(), "a permutation of the early arrivals, first");
    assert_ne!(early_pos, &sorted[..], "not their arrival order");
    assert_eq!(late_pos, &(1001..=1020).collect::<Vec<u64>>()[..], "late arrivals after them, in arrival order");

    // Admission follows the drawn order.
    admin_patch(&api1, &schedule, json!({"paused": false, "batch": 100, "maxActive": 100})).await;
    common::eventually(Duration::from_secs(10), || async { admin_get(&api2, &schedule).await["active"] == 100 }).await;
    let by_pos: HashMap<u64, usize> = positions.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    for p in [1u64, 50, 100, 101, 500] {
        let (u, t) = &early[by_pos[&p]];
        let want = if p <= 100 { "ACTIVE" } else { "WAITING" };
        assert_eq!(api1.queue_status(u, t).await["status"], want, "position {p}");
    }
    api1.stop().await;
    api2.stop().await;
}

/// `--queue-early-order fifo`: early arrivals keep their arrival order at opening (the operator's
/// choice against the default shuffle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_fifo_order_early_arrivals_keep_their_arrival_order_at_opening() {
    let env = TestEnv::new().await;
    let fair = FairSettings { early_order: EarlyOrder::Fifo, ..FairSettings::default() };
    let api = env.api_with(TTL, QueueSettings::default(), fair).await;
    let schedule = opening_night(&api).await;
    admin_patch(&api, &schedule, json!({"paused": true})).await;
    let mut early = Vec::new();
    for (u, v, t) in enter(&api, &schedule, "early", 50).await {
        assert!(v["position"].is_null(), "no position before opening: {v}");
        early.push((u, t));
    }
    open_now(&env, &schedule).await;
    // A late entrant brings the new opening time to Redis (each entry copies it there).
    early.extend(enter(&api, &schedule, "late", 3).await.into_iter().map(|(u, _, t)| (u, t)));
    let (u0, t0) = &early[0];
    common::eventually(Duration::from_secs(10), || async { api.queue_status(u0, t0).await["position"].is_number() }).await;
    let mut positions = Vec::new();
    for (u, t) in &early {
        positions.push(api.queue_status(u, t).await["position"].as_u64().unwrap());
    }
    assert_eq!(positions, (1..=53).collect::<Vec<u64>>(), "arrival order, the early ones first");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_retried_with_its_key_gives_one_reservation_and_the_same_body() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(2, 10).await;
    let u = api.user("retrier").await;
    let t = api.active_token(&u, &schedule).await;
    let send = |seat: String, key: &'static str| {
        let (http, url, token, qt) = (api.http.clone(), api.url("/v1/reservations"), u.token.clone(), t.clone());
        async move {
            let r = http.post(url).bearer_auth(token).header("X-Queue-Token", qt).header("Idempotency-Key", key).json(&json!({"seatId": seat})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = send(seats[0].clone(), "hold-1").await;
    assert_eq!(status, 201);
    // The answer was lost; the client retries, several times and at once.
    let retries = futures_util::future::join_all((0..5).map(|_| send(seats[0].clone(), "hold-1"))).await;
    for (status, body) in retries {
        assert_eq!(status, 201);
        assert_eq!(body, first, "the same body");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE user_id = $1::uuid").bind(&u.id).fetch_one(&env.pool).await.unwrap();
    assert_eq!(n, 1, "held once");
    let (status, body) = send(seats[1].clone(), "hold-1").await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(api.seat_status(&schedule, &seats[1]).await, "AVAILABLE");
    let r = api.http.post(api.url("/v1/reservations")).bearer_auth(&u.token).header("X-Queue-Token", &t).header("Idempotency-Key", "")
        .json(&json!({"seatId": seats[1]})).send().await.unwrap();
    assert_eq!(r.status(), 400, "an empty key is malformed");

    // The answer was lost, the client paid anyway (it learnt the id elsewhere), and the payment
    // ended its queue place: a late retry of the hold still gets the stored answer, not a 403.
    api.charge(&u, first["price"].as_i64().unwrap()).await;
    let paid = api.pay(&u, "pay-1", first["reservationId"].as_str().unwrap()).await;
    assert_eq!(paid.status(), 201);
    let gone = api.http.post(api.url("/v1/reservations")).bearer_auth(&u.token).header("X-Queue-Token", &t)
        .json(&json!({"seatId": seats[1]})).send().await.unwrap();
    assert_eq!(gone.status(), 403, "the queue place ended with the payment");
    let (status, late) = send(seats[0].clone(), "hold-1").await;
    assert_eq!((status, &late), (201, &first), "the key's stored answer, after the queue place ended");
    let (status, body) = send(seats[1].clone(), "hold-1").await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("IDEMPOTENCY_KEY_REUSED")), "reused for another seat, after the place ended");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn my_reservations_lists_only_the_callers_own_filtered_and_paged_newest_first() {
    let env = TestEnv::new().await;
    let api = env.api(TTL, QueueSettings::default()).await;
    let (schedule, seats) = api.concert(6, 10).await;
    let me = api.user("me").await;
    let other = api.user("other").await;
    let t = api.active_token(&me, &schedule).await;
    let mut mine = Vec::new();
    for seat in &seats[..3] {
        let v: Value = api.hold(&me, &t, seat).await.json().await.unwrap();
        mine.push(v["reservationId"].as_str().unwrap().to_string());
    }
    let r = api.http.delete(api.url(&format!("/v1/reservations/{}", mine[1]))).bearer_auth(&me.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ot = api.active_token(&other, &schedule).await;
    let theirs: Value = api.hold(&other, &ot, &seats[4]).await.json().await.unwrap();

    let list = |u: &User, q: &str| {
        let req = api.http.get(api.url(&format!("/v1/users/me/reservations{q}"))).bearer_auth(&u.token);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let ids = |v: &Value| v["items"].as_array().unwrap().iter().map(|i| i["reservationId"].as_str().unwrap().to_string()).collect::<Vec<_>>();

    let (s, all) = list(&me, "").await;
    assert_eq!(s, 200);
    assert_eq!(ids(&all), vec![mine[2].clone(), mine[1].clone(), mine[0].clone()], "newest first, only mine");
    assert!(all["next"].is_null());
    let got: Value = api.reservation(&me, &mine[2]).await.json().await.unwrap();
    assert_eq!(all["items"][0], got, "items are shaped as GET /v1/reservations/{{id}}");

    let (_, cancelled) = list(&me, "?status=CANCELLED").await;
    assert_eq!(ids(&cancelled), vec![mine[1].clone()]);
    let (_, held) = list(&me, "?status=HELD").await;
    assert_eq!(ids(&held), vec![mine[2].clone(), mine[0].clone()]);

    let (_, page1) = list(&me, "?limit=2").await;
    assert_eq!(ids(&page1), vec![mine[2].clone(), mine[1].clone()]);
    let next = page1["next"].as_str().unwrap().to_string();
    let (_, page2) = list(&me, &format!("?limit=2&after={next}")).await;
    assert_eq!(ids(&page2), vec![mine[0].clone()]);
    assert!(page2["next"].is_null());

    let (_, theirs_list) = list(&other, "").await;
    assert_eq!(ids(&theirs_list), vec![theirs["reservationId"].as_str().unwrap().to_string()]);
    for bad in ["?status=SOLD", "?after=nope", &format!("?after={}", theirs["reservationId"].as_str().unwrap()), "?limit=0"] {
        let (s, body) = list(&me, bad).await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "INVALID_INPUT");
    }
    let r = api.http.get(api.url("/v1/users/me/reservations")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    api.stop().await;
}
