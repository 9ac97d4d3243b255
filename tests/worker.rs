//! The worker's consumers: notifications, ranking and data-platform export, against the real
//! services (issue: notifications, ranking and data platform).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use booking::app::WorkerSettings;
use booking::worker::Channel;
use common::inproc::{self, export_path, stop, Task};
use common::{QueueSettings, TestApi, TestEnv, User};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use warp::Filter;

async fn worker(env: &TestEnv, group_prefix: &str, channel: Channel) -> Task {
    inproc::worker(env, group_prefix, WorkerSettings { channel, ..inproc::worker_settings(env) }).await
}

/// The delay scheduler and the expirer: holds expire on their own.
async fn pipeline(env: &TestEnv) -> Vec<Task> {
    let cfg = booking::scheduler::SchedulerConfig { poll_interval: Duration::from_secs(1), ..inproc::scheduler_config() };
    vec![inproc::scheduler(env, cfg).await, inproc::expirer(env, inproc::expirer_settings()).await]
}

async fn list(api: &TestApi, u: &User) -> Vec<Value> {
    let v: Value = api.http.get(api.url("/v1/users/me/notifications")).bearer_auth(&u.token).send().await.unwrap().json().await.unwrap();
    v["items"].as_array().unwrap().clone()
}

fn types(items: &[Value]) -> Vec<String> {
    let mut t: Vec<String> = items.iter().map(|n| n["type"].as_str().unwrap().to_string()).collect();
    t.sort();
    t
}

/// Opens the user's SSE stream and collects `data:` payloads into a shared list.
async fn open_stream(api: &TestApi, u: &User, last_event_id: Option<&str>) -> (Arc<Mutex<Vec<(String, Value)>>>, tokio::task::JoinHandle<()>) {
    let mut req = api.http.get(api.url("/v1/users/me/notifications/stream")).bearer_auth(&u.token);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await.unwrap();
    if resp.status() != 200 {
        panic!("stream refused: {} {}", resp.status(), resp.text().await.unwrap());
    }
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let h = tokio::spawn(async move {
        let mut resp = resp;
        let mut buf = String::new();
        let mut id = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find("\n\n") {
                let event: String = buf.drain(..pos + 2).collect();
                let mut data = None;
                for line in event.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data = serde_json::from_str::<Value>(d.trim()).ok();
                    }
                }
                if let Some(v) = data {
                    g.lock().unwrap().push((id.clone(), v));
                }
            }
        }
    });
    (got, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_expiry_and_queue_events_reach_the_users_list_and_stream_with_the_briefs_texts() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(2), QueueSettings::default()).await;
    let mut tasks = pipeline(&env).await;
    tasks.push(worker(&env, &format!("{}w-", env.prefix), Channel::Log).await);
    let (schedule, seats) = api.concert(2, 100).await;
    let u = api.user("listener").await;
    api.charge(&u, 1000).await;
    let (stream, reader) = open_stream(&api, &u, None).await;
    let t = api.active_token(&u, &schedule).await;
    // QUEUE_POSITION and QUEUE_ACTIVATED.
    common::eventually(Duration::from_secs(30), || async { list(&api, &u).await.len() >= 2 }).await;
    let paid: Value = api.hold(&u, &t, &seats[0]).await.json().await.unwrap();
    let r = api.pay(&u, "k1", paid["reservationId"].as_str().unwrap()).await;
    assert_eq!(r.status(), 201);
    common::eventually(Duration::from_secs(30), || async { stream.lock().unwrap().iter().any(|(_, n)| n["type"] == "PAYMENT_CONFIRMED") }).await;
    // A hold left to expire.
    let t = api.active_token(&u, &schedule).await;
    let lapsed: Value = api.hold(&u, &t, &seats[1]).await.json().await.unwrap();
    common::eventually(Duration::from_secs(30), || async { list(&api, &u).await.iter().any(|n| n["type"] == "RESERVATION_EXPIRED") }).await;
    let items = list(&api, &u).await;
    let want = [
        ("PAYMENT_CONFIRMED", "결제 완료", "결제가 완료되었습니다. 콘서트 예약이 확정되었습니다."),
        ("RESERVATION_EXPIRED", "예약 만료", "5분 이내 결제하지 않아 예약이 만료되었습니다."),
        ("QUEUE_POSITION", "대기 순번", "현재 대기 순번은 1번입니다."),
        ("QUEUE_ACTIVATED", "예약 가능", "예약 가능한 시간입니다."),
    ];
    for (kind, title, message) in want {
        let n = items.iter().find(|n| n["type"] == kind).unwrap_or_else(|| panic!("{kind} missing: {items:?}"));
        assert_eq!(n["title"], title);
        assert_eq!(n["message"], message);
    }
    let expired = items.iter().find(|n| n["type"] == "RESERVATION_EXPIRED").unwrap();
    assert_eq!(expired["data"]["reservationId"], lapsed["reservationId"]);
    // The stream saw everything stored after it opened, in order, once.
    common::eventually(Duration::from_secs(10), || async { stream.lock().unwrap().len() >= items.len() }).await;
    let streamed: Vec<String> = stream.lock().unwrap().iter().map(|(_, n)| n["notificationId"].as_str().unwrap().to_string()).collect();
    let listed: Vec<String> = items.iter().map(|n| n["notificationId"].as_str().unwrap().to_string()).collect();
    assert_eq!(streamed, listed);
    reader.abort();

    // Reconnecting with Last-Event-ID resumes after it: no gap, no repeat.
    let first_id = stream.lock().unwrap()[0].0.clone();
    let (resumed, reader) = open_stream(&api, &u, Some(&first_id)).await;
    common::eventually(Duration::from_secs(10), || async { resumed.lock().unwrap().len() >= listed.len() - 1 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again: Vec<String> = resumed.lock().unwrap().iter().map(|(_, n)| n["notificationId"].as_str().unwrap().to_string()).collect();
    assert_eq!(again, listed[1..].to_vec());
    reader.abort();
    stop(tasks).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_topics_creates_no_second_notification_ranking_increment_or_export() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let group = format!("{}w-", env.prefix);
    let w = worker(&env, &group, Channel::Log).await;
    let (schedule, seats) = api.concert(3, 10).await;
    let mut users = Vec::new();
    for (i, seat) in seats.iter().enumerate() {
        let u = api.user(&format!("buyer{i}")).await;
        api.charge(&u, 100).await;
        let t = api.active_token(&u, &schedule).await;
        let h: Value = api.hold(&u, &t, seat).await.json().await.unwrap();
        assert_eq!(api.pay(&u, "k", h["reservationId"].as_str().unwrap()).await.status(), 201);
        users.push(u);
    }
    let count = |sql: &'static str| { let pool = env.pool.clone(); async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() } };
    // 3 × (QUEUE_POSITION, QUEUE_ACTIVATED, PAYMENT_CONFIRMED)
    common::eventually(Duration::from_secs(30), || async { count("SELECT count(*) FROM notifications").await == 9 }).await;
    common::eventually(Duration::from_secs(30), || async { export_lines(&env) == 3 }).await;
    assert_eq!(ranking(&api).await[0]["soldSeats"], 3);
    stop(vec![w]).await;

    // Rewind both consumer groups to the beginning and run the worker again.
    for (suffix, topic) in [("notifications", env.topics().notification_request.clone()), ("payments", env.topics().payment_completed.clone())] {
        rewind(&env, &format!("{group}{suffix}"), &topic);
    }
    let w = worker(&env, &group, Channel::Log).await;
    let replayed = env.read_topic(&env.topics().notification_request, 9, Duration::from_secs(10)).await.len();
    assert_eq!(replayed, 9);
    // Wait until the replay was consumed (the group's lag reaches zero), then check nothing doubled.
    common::eventually(Duration::from_secs(30), || async { group_caught_up(&env, &format!("{group}notifications"), &env.topics().notification_request) && group_caught_up(&env, &format!("{group}payments"), &env.topics().payment_completed) }).await;
    assert_eq!(count("SELECT count(*) FROM notifications").await, 9);
    assert_eq!(export_lines(&env), 3);
    assert_eq!(ranking(&api).await[0]["soldSeats"], 3);
    stop(vec![w]).await;
    api.stop().await;
}

fn export_lines(env: &TestEnv) -> usize {
    std::fs::read_to_string(export_path(env)).map(|s| s.lines().count()).unwrap_or(0)
}

async fn ranking(api: &TestApi) -> Vec<Value> {
    let v: Value = api.http.get(api.url("/v1/rankings/schedules?limit=10")).send().await.unwrap().json().await.unwrap();
    v["items"].as_array().unwrap().clone()
}

fn rewind(env: &TestEnv, group: &str, topic: &str) {
    let c: BaseConsumer = booking::kafka::consumer_config(&env.brokers, group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..booking::kafka::PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Offset(0)).unwrap();
    }
    c.commit(&tpl, CommitMode::Sync).unwrap();
}

fn group_caught_up(env: &TestEnv, group: &str, topic: &str) -> bool {
    let c: BaseConsumer = booking::kafka::consumer_config(&env.brokers, group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..booking::kafka::PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    committed.elements().iter().all(|e| {
        let (_, high) = c.fetch_watermarks(topic, e.partition(), Duration::from_secs(5)).unwrap();
        match e.offset() {
            Offset::Offset(o) => o >= high,
            _ => high == 0,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_for_a_while_gets_each_notification_once_after_it_returns() {
    let env = TestEnv::new().await;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let received: Arc<Mutex<HashMap<String, usize>>> = Arc::new(Mutex::new(HashMap::new()));
    let (u2, r2) = (up.clone(), received.clone());
    let hook = warp::post().and(warp::header::<String>("x-event-id")).and(warp::header::<String>("x-signature")).map(move |event: String, sig: String| {
        if !u2.load(std::sync::atomic::Ordering::SeqCst) {
            return warp::http::StatusCode::SERVICE_UNAVAILABLE;
        }
        assert!(sig.starts_with("t=") && sig.contains(",v1="));
        *r2.lock().unwrap().entry(event).or_default() += 1;
        warp::http::StatusCode::OK
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(hook).incoming(listener).run());

    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let channel = Channel::webhook(&format!("http://{addr}/hook"), "s", Duration::from_secs(5), 4).unwrap();
    let w = worker(&env, &format!("{}w-", env.prefix), channel).await;
    let (schedule, _) = api.concert(1, 10).await;
    for i in 0..3 {
        let u = api.user(&format!("hooked{i}")).await;
        api.active_token(&u, &schedule).await;
    }
    // Six notifications stored, every delivery attempt refused so far.
    common::eventually(Duration::from_secs(30), || async {
        let (n, tried): (i64, i64) = sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE attempts > 0) FROM notification_deliveries").fetch_one(&env.pool).await.unwrap();
        n == 6 && tried == 6
    }).await;
    assert!(received.lock().unwrap().is_empty());
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    common::eventually(Duration::from_secs(30), || async {
        let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE status = 'DELIVERED'").fetch_one(&env.pool).await.unwrap();
        delivered == 6
    }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 6);
    assert!(got.values().all(|n| *n == 1), "each notification once: {got:?}");
    stop(vec![w]).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ranking_orders_schedules_by_confirmed_seats_as_the_database_does() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let w = worker(&env, &format!("{}w-", env.prefix), Channel::Log).await;
    let mut sold = Vec::new();
    for n in [1usize, 3, 2] {
        let (schedule, seats) = api.concert(3, 10).await;
        for seat in seats.iter().take(n) {
            let u = api.user("fan").await;
            api.charge(&u, 10).await;
            let t = api.active_token(&u, &schedule).await;
            let h: Value = api.hold(&u, &t, seat).await.json().await.unwrap();
            assert_eq!(api.pay(&u, "k", h["reservationId"].as_str().unwrap()).await.status(), 201);
        }
        sold.push((schedule, n));
    }
    common::eventually(Duration::from_secs(30), || async { ranking(&api).await.iter().map(|e| e["soldSeats"].as_i64().unwrap()).sum::<i64>() == 6 }).await;
    let items = ranking(&api).await;
    let db: Vec<(String, i64)> = sqlx::query_as("SELECT schedule_id::text, count(*) FROM reservations WHERE status = 'CONFIRMED' GROUP BY schedule_id ORDER BY count(*) DESC")
        .fetch_all(&env.pool).await.unwrap();
    let ours: Vec<(String, i64)> = items.iter().map(|e| (e["scheduleId"].as_str().unwrap().to_string(), e["soldSeats"].as_i64().unwrap())).collect();
    assert_eq!(ours, db);
    assert!(items.iter().all(|e| e["concertTitle"] == "Test concert" && e["seatCount"] == 3));
    let r = api.http.get(api.url("/v1/rankings/schedules?limit=1")).send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(r["items"].as_array().unwrap().len(), 1);
    // Redis forgets the ranking (flush or restart without data): the worker rebuilds it from
    // PostgreSQL, without counting any payment twice.
    let mut conn = env.res.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*ranking*", env.prefix)).query_async(&mut conn).await.unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
    assert!(ranking(&api).await.is_empty());
    common::eventually(Duration::from_secs(30), || async { ranking(&api).await.iter().map(|e| e["soldSeats"].as_i64().unwrap()).sum::<i64>() == 6 }).await;
    let rebuilt: Vec<(String, i64)> = ranking(&api).await.iter().map(|e| (e["scheduleId"].as_str().unwrap().to_string(), e["soldSeats"].as_i64().unwrap())).collect();
    assert_eq!(rebuilt, db);
    stop(vec![w]).await;
    api.stop().await;
}

/// Issue 15, item 11: a partial loss (AOF `everysec` on power loss, a failover to a lagging
/// replica) keeps the `built` marker but drops the last increments. The periodic reconcile finds
/// them whatever the marker says, and counts each as a correction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcile_restores_increments_lost_while_the_ranking_marker_survived() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(3, 10).await;
    let mut payments = Vec::new();
    for seat in seats.iter().take(3) {
        let u = api.user("fan").await;
        api.charge(&u, 10).await;
        let t = api.active_token(&u, &schedule).await;
        let h: Value = api.hold(&u, &t, seat).await.json().await.unwrap();
        let p: Value = api.pay(&u, "k", h["reservationId"].as_str().unwrap()).await.json().await.unwrap();
        payments.push(p["paymentId"].as_str().unwrap().to_string());
    }
    // Paid a minute ago: past the time the consumer is given to count them itself.
    sqlx::query("UPDATE payments SET paid_at = now() - interval '1 minute'").execute(&env.pool).await.unwrap();
    use booking::ranking::Reach;
    let (redis, keys, memory) = (&env.res.redis, env.keys(), booking::ranking::Retention::default());
    let first = booking::ranking::reconcile(redis, keys, &env.pool, &memory, Reach::Window).await.unwrap();
    assert!(first.rebuilt, "no marker yet: built from PostgreSQL");
    assert_eq!(first.corrections, 3);
    let again = booking::ranking::reconcile(redis, keys, &env.pool, &memory, Reach::Window).await.unwrap();
    assert_eq!(again, booking::ranking::Reconciled { rebuilt: false, corrections: 0 }, "nothing to correct");

    // The last increment is lost with its counted member; the marker survives.
    let mut conn = redis.clone();
    let _: () = redis::cmd("ZREM").arg(keys.ranking_counted()).arg(&payments[2]).query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("ZINCRBY").arg(keys.ranking()).arg(-1).arg(&schedule).query_async(&mut conn).await.unwrap();
    assert_eq!(ranking(&api).await[0]["soldSeats"], 2);
    let fixed = booking::ranking::reconcile(redis, keys, &env.pool, &memory, Reach::Window).await.unwrap();
    assert_eq!(fixed, booking::ranking::Reconciled { rebuilt: false, corrections: 1 });
    assert_eq!(ranking(&api).await[0]["soldSeats"], 3, "as PostgreSQL says");

    // A loss older than the window (found only after a worker was down longer than that): the
    // window's reconcile cannot see it, the reconcile over everything remembered (at the
    // worker's start, and every --ranking-full-reconcile-interval) does.
    sqlx::query("UPDATE payments SET paid_at = now() - interval '1 hour' WHERE id = $1::uuid").bind(&payments[2]).execute(&env.pool).await.unwrap();
    let _: () = redis::cmd("ZREM").arg(keys.ranking_counted()).arg(&payments[2]).query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("ZINCRBY").arg(keys.ranking()).arg(-1).arg(&schedule).query_async(&mut conn).await.unwrap();
    let window = booking::ranking::reconcile(redis, keys, &env.pool, &memory, Reach::Window).await.unwrap();
    assert_eq!(window.corrections, 0, "an hour ago is outside the 5-minute window");
    assert_eq!(ranking(&api).await[0]["soldSeats"], 2);
    let full = booking::ranking::reconcile(redis, keys, &env.pool, &memory, Reach::Remembered).await.unwrap();
    assert_eq!(full, booking::ranking::Reconciled { rebuilt: false, corrections: 1 });
    assert_eq!(ranking(&api).await[0]["soldSeats"], 3, "as PostgreSQL says");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_notifications_are_never_visible_and_the_stream_needs_a_token() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(300), QueueSettings::default()).await;
    let w = worker(&env, &format!("{}w-", env.prefix), Channel::Log).await;
    let (schedule, _) = api.concert(1, 10).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    api.active_token(&alice, &schedule).await;
    common::eventually(Duration::from_secs(30), || async { list(&api, &alice).await.len() == 2 }).await;
    assert!(list(&api, &bob).await.is_empty());
    assert_eq!(types(&list(&api, &alice).await), vec!["QUEUE_ACTIVATED", "QUEUE_POSITION"]);
    let r = api.http.get(api.url("/v1/users/me/notifications/stream")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = api.http.get(api.url("/v1/users/me/notifications")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Bob's stream, replayed from the very beginning, shows none of Alice's.
    let (bobs, reader) = open_stream(&api, &bob, Some("0")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(bobs.lock().unwrap().is_empty());
    reader.abort();
    stop(vec![w]).await;
    api.stop().await;
}
