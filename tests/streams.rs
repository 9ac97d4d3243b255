//! The live streams against the real services: the seat map (issue 13), commit-ordered ids under
//! several writers and replicas (issue 17), and the caps on open streams (issue 15, item 7).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use booking::app::ExpirerSettings;
use common::inproc::{self, stop, Task};
use common::{QueueSettings, TestApi, TestEnv, User};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// One Server-Sent Event as received.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// Splits complete events off the front of `buf`.
fn parse_events(buf: &mut String) -> Vec<Sse> {
    let mut out = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let (mut id, mut event, mut data) = (String::new(), String::new(), None);
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data = serde_json::from_str(v.trim()).ok();
            }
        }
        if let Some(data) = data {
            out.push(Sse { id, event, data });
        }
    }
    out
}

async fn open(http: &reqwest::Client, url: &str, token: Option<&str>, last_event_id: Option<&str>) -> reqwest::Response {
    let mut req = http.get(url).header("Accept", "text/event-stream");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    req.send().await.unwrap()
}

/// A watcher that collects every event of a stream. With `hop_every`, it disconnects after that
/// many events and reconnects to the next of `bases` with `Last-Event-ID`.
struct Watcher {
    events: Arc<Mutex<Vec<Sse>>>,
    reconnects: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn start(bases: Vec<String>, path: String, token: Option<String>, hop_every: Option<usize>) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let reconnects = Arc::new(Mutex::new(0));
        let http = reqwest::Client::new();
        // The first connection is made before returning, so the caller knows it is subscribed.
        let first = open(&http, &format!("{}{path}", bases[0]), token.as_deref(), None).await;
        assert_eq!(first.status(), 200, "stream refused");
        let (ev, rc) = (events.clone(), reconnects.clone());
        let task = tokio::spawn(async move {
            let mut resp = first;
            let mut which = 0;
            let mut last_id: Option<String> = None;
            loop {
                let mut buf = String::new();
                let mut got = 0usize;
                'conn: while let Ok(Some(chunk)) = resp.chunk().await {
                    buf.push_str(&String::from_utf8_lossy(&chunk));
                    for e in parse_events(&mut buf) {
                        last_id = Some(e.id.clone());
                        ev.lock().unwrap().push(e);
                        got += 1;
                        if hop_every.is_some_and(|n| got >= n) {
                            break 'conn;
                        }
                    }
                }
                drop(resp);
                // Reconnect to the other api, resuming after the last event received.
                which = (which + 1) % bases.len();
                *rc.lock().unwrap() += 1;
                loop {
                    let r = open(&http, &format!("{}{path}", bases[which]), token.as_deref(), last_id.as_deref()).await;
                    if r.status() == 200 {
                        resp = r;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { events, reconnects, task }
    }

    fn events(&self) -> Vec<Sse> {
        self.events.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.events.lock().unwrap().len()
    }
}

/// Replays a watcher's seat-map events: seat → status, and per seat the number of HELD events.
fn replay(events: &[Sse]) -> (HashMap<String, String>, HashMap<String, usize>) {
    let mut state = HashMap::new();
    let mut held = HashMap::new();
    for e in events {
        match e.event.as_str() {
            "snapshot" => {
                for s in e.data["items"].as_array().unwrap() {
                    state.insert(s["seatId"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string());
                }
            }
            "seat" => {
                let seat = e.data["seatId"].as_str().unwrap().to_string();
                let status = e.data["status"].as_str().unwrap().to_string();
                if status == "HELD" {
                    *held.entry(seat.clone()).or_default() += 1;
                }
                state.insert(seat, status);
            }
            other => panic!("unexpected event {other}"),
        }
    }
    (state, held)
}

/// Seat statuses as PostgreSQL holds them (by reservation status, what the stream reports).
async fn pg_state(env: &TestEnv, schedule: &str) -> HashMap<String, String> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.id::text, CASE r.status WHEN 'CONFIRMED' THEN 'SOLD' WHEN 'HELD' THEN 'HELD' ELSE 'AVAILABLE' END
         FROM seats s LEFT JOIN reservations r ON r.seat_id = s.id AND r.status IN ('HELD', 'CONFIRMED')
         WHERE s.schedule_id = $1::uuid",
    )
    .bind(schedule)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

async fn expirer(env: &TestEnv) -> Task {
    let s = ExpirerSettings { sweep_interval: Duration::from_millis(300), sweep_grace: Duration::from_millis(500), ..inproc::expirer_settings() };
    inproc::expirer(env, s).await
}

async fn scheduler(env: &TestEnv) -> Task {
    inproc::scheduler(env, inproc::scheduler_config()).await
}

fn seat_events_of<'a>(events: &'a [Sse], seat: &str) -> Vec<&'a str> {
    events.iter().filter(|e| e.event == "seat" && e.data["seatId"] == seat).map(|e| e.data["status"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_watchers_see_every_change_of_a_seat_in_order_even_across_a_reconnect() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(2), QueueSettings::default()).await;
    let mut tasks = vec![scheduler(&env).await, expirer(&env).await];
    let (schedule, seats) = api.concert(3, 10).await;
    let seat = seats[1].clone();
    let path = format!("/v1/schedules/{schedule}/seats/stream");
    let a = Watcher::start(vec![api.base.clone()], path.clone(), None, None).await;
    // B drops its connection after every 2 events and resumes with Last-Event-ID.
    let b = Watcher::start(vec![api.base.clone()], path.clone(), None, Some(2)).await;
    common::eventually(Duration::from_secs(10), || async { a.count() >= 1 && b.count() >= 1 }).await;
    let first = &a.events()[0];
    assert_eq!(first.event, "snapshot");
    assert_eq!(first.data["items"].as_array().unwrap().len(), 3);
    assert!(first.data["items"].as_array().unwrap().iter().all(|s| s["status"] == "AVAILABLE"));

    let u = api.user("watcher-test").await;
    api.charge(&u, 1000).await;
    // hold → cancel → hold → expire (by the expirer) → hold → pay
    let t = api.active_token(&u, &schedule).await;
    let r: Value = api.hold(&u, &t, &seat).await.json().await.unwrap();
    let id = r["reservationId"].as_str().unwrap().to_string();
    let c = api.http.delete(api.url(&format!("/v1/reservations/{id}"))).bearer_auth(&u.token).send().await.unwrap();
    assert_eq!(c.status(), 200);
    let r: Value = api.hold(&u, &t, &seat).await.json().await.unwrap();
    let id = r["reservationId"].as_str().unwrap().to_string();
    common::eventually(Duration::from_secs(20), || async {
        api.reservation(&u, &id).await.json::<Value>().await.unwrap()["status"] == "EXPIRED"
    })
    .await;
    let r = api.hold(&u, &t, &seat).await;
    assert_eq!(r.status(), 201);
    let r: Value = r.json().await.unwrap();
    let paid = api.pay(&u, "pay-1", r["reservationId"].as_str().unwrap()).await;
    assert_eq!(paid.status(), 201);

    let want = ["HELD", "AVAILABLE", "HELD", "AVAILABLE", "HELD", "SOLD"];
    for w in [&a, &b] {
        common::eventually(Duration::from_secs(10), || async { seat_events_of(&w.events(), &seat).len() >= want.len() }).await;
    }
    assert_eq!(seat_events_of(&a.events(), &seat), want);
    assert_eq!(seat_events_of(&b.events(), &seat), want, "nothing missing or repeated after reconnects");
    assert!(*b.reconnects.lock().unwrap() >= 2, "B reconnected");
    assert_eq!(b.events().iter().filter(|e| e.event == "snapshot").count(), 1, "a resume replays, it does not start over");
    // Ids only grow.
    for w in [&a, &b] {
        let ids: Vec<i64> = w.events().iter().map(|e| e.id.parse().unwrap()).collect();
        assert!(ids.windows(2).all(|p| p[0] < p[1]), "ids in order: {ids:?}");
    }
    // The seat's status on the other seats never changed.
    assert!(a.events().iter().filter(|e| e.event == "seat").all(|e| e.data["seatId"] == seat.as_str()));

    // An id that cannot be replayed gets a fresh snapshot.
    let r = open(&api.http, &api.url(&path), None, Some("not-a-position")).await;
    assert_eq!(r.status(), 200);
    let mut resp = r;
    let mut buf = String::new();
    let ev = loop {
        let chunk = resp.chunk().await.unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(e) = parse_events(&mut buf).into_iter().next() {
            break e;
        }
    };
    assert_eq!(ev.event, "snapshot");
    let sold = ev.data["items"].as_array().unwrap().iter().find(|s| s["seatId"] == seat.as_str()).unwrap().clone();
    assert_eq!(sold["status"], "SOLD");
    // Pruned history: a resume from before the watermark gets a snapshot too.
    sqlx::query("UPDATE stream_heads SET pruned_upto = pos WHERE stream = 'seat'").execute(&env.pool).await.unwrap();
    let r = open(&api.http, &api.url(&path), None, Some(&first.id)).await;
    let mut resp = r;
    let mut buf = String::new();
    let ev = loop {
        let chunk = resp.chunk().await.unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(e) = parse_events(&mut buf).into_iter().next() {
            break e;
        }
    };
    assert_eq!(ev.event, "snapshot", "too old to replay: a fresh snapshot");

    let missing = api.http.get(api.url(&format!("/v1/schedules/{}/seats/stream", uuid::Uuid::new_v4()))).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    a.task.abort();
    b.task.abort();
    stop(std::mem::take(&mut tasks)).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_gets_429_too_many_streams_beyond_the_per_user_cap_and_a_place_back_when_one_closes() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(60), QueueSettings::default()).await;
    let u = api.user("streamer").await;
    let other = api.user("other").await;
    let cap = booking::sequencer::StreamSettings::default().max_streams_per_user;
    let url = api.url("/v1/users/me/notifications/stream");
    let mut open_streams = Vec::new();
    for _ in 0..cap {
        let r = open(&api.http, &url, Some(&u.token), None).await;
        assert_eq!(r.status(), 200);
        open_streams.push(r);
    }
    let refused = open(&api.http, &url, Some(&u.token), None).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TOO_MANY_STREAMS");
    // Another user is not affected.
    assert_eq!(open(&api.http, &url, Some(&other.token), None).await.status(), 200);
    // Closing one frees its place (once the server noticed the disconnect).
    drop(open_streams.pop());
    let (http, url2, token) = (api.http.clone(), url.clone(), u.token.clone());
    let kept = Arc::new(Mutex::new(Vec::new()));
    let k = kept.clone();
    common::eventually(Duration::from_secs(10), move || {
        let (http, url2, token, k) = (http.clone(), url2.clone(), token.clone(), k.clone());
        async move {
            let r = open(&http, &url2, Some(&token), None).await;
            let ok = r.status() == 200;
            k.lock().unwrap().push(r);
            ok
        }
    })
    .await;
    drop(kept);
    drop(open_streams);
    api.stop().await;
}

/// Opens and commits a notification for `user` directly in PostgreSQL, holding the transaction
/// open for `hold` so that later inserts commit first (what another writer would do).
async fn slow_notification(pool: sqlx::PgPool, user: String, hold: Duration) {
    let mut tx = booking::db::begin(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO notifications (event_id, user_id, type, title, message)
         VALUES (gen_random_uuid(), $1::uuid, 'QUEUE_POSITION', '대기 순번', 'slow writer')",
    )
    .bind(&user)
    .execute(&mut *tx)
    .await
    .unwrap();
    // Held open on purpose: the scenario is a commit that comes late, not a synchronization.
    tokio::time::sleep(hold).await;
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_list_cursor_never_skips_a_row_that_commits_late() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(60), QueueSettings::default()).await;
    let u: User = api.user("cursor").await;
    // A slow writer takes its id first, a fast one commits after it; the fast row is listed and
    // its cursor handed out before the slow row commits.
    let slow = tokio::spawn(slow_notification(env.pool.clone(), u.id.clone(), Duration::from_millis(1500)));
    let uid = u.id.clone();
    common::eventually(Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE 'INSERT INTO notifications%'")
            .fetch_one(&env.pool).await.unwrap() > 0
    })
    .await;
    sqlx::query("INSERT INTO notifications (event_id, user_id, type, title, message) VALUES (gen_random_uuid(), $1::uuid, 'QUEUE_ACTIVATED', '예약 가능', 'fast writer')")
        .bind(&uid)
        .execute(&env.pool)
        .await
        .unwrap();
    let list = |after: Option<String>| {
        let (http, url, token) = (api.http.clone(), api.url("/v1/users/me/notifications"), u.token.clone());
        async move {
            let mut req = http.get(url).bearer_auth(token);
            if let Some(a) = after {
                req = req.query(&[("after", a)]);
            }
            req.send().await.unwrap().json::<Value>().await.unwrap()
        }
    };
    let mut page = list(None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while page["items"].as_array().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
        page = list(None).await;
    }
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["message"], "fast writer");
    let next = page["next"].as_str().unwrap().to_string();
    slow.await.unwrap();
    // The late commit appears after the cursor already handed out.
    let mut later = list(Some(next.clone())).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while later["items"].as_array().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the late row was skipped by the cursor");
        tokio::time::sleep(Duration::from_millis(20)).await;
        later = list(Some(next.clone())).await;
    }
    assert_eq!(later["items"][0]["message"], "slow writer");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_stored_by_concurrent_writers_become_visible_in_position_order_once_each() {
    use booking::notification::{store, Kind, NotificationRequest};
    let env = TestEnv::new().await;
    let user = uuid::Uuid::new_v4();
    let stop = CancellationToken::new();
    // Four writers (four worker replicas), each storing batches of 1..=20 as fast as it can; every
    // third batch repeats an event already stored (a redelivery).
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (pool, stop) = (env.pool.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let (mut stored, mut last): (usize, Option<uuid::Uuid>) = (0, None);
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let mut batch: Vec<(uuid::Uuid, NotificationRequest)> =
                    (0..(i % 20 + 1)).map(|_| (uuid::Uuid::new_v4(), NotificationRequest::new(Kind::QueuePosition(w), user, serde_json::json!({})))).collect();
                if let (Some(again), true) = (last, i.is_multiple_of(3)) {
                    batch.insert(0, (again, NotificationRequest::new(Kind::QueuePosition(w), user, serde_json::json!({}))));
                }
                last = batch.last().map(|b| b.0);
                let new = store(&pool, &batch).await.unwrap();
                stored += new.len();
            }
            stored
        }));
    }
    // A reader that remembers the highest position it has seen: no row at or below it may
    // appear later (what a stream resuming from that position would skip).
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (pool, rstop, rreads) = (env.pool.clone(), stop.clone(), reads.clone());
    let reader = tokio::spawn(async move {
        let mut seen: std::collections::HashSet<i64> = Default::default();
        let mut high = 0i64;
        while !rstop.is_cancelled() {
            let rows: Vec<i64> = sqlx::query_scalar("SELECT pos FROM notifications WHERE user_id = $1 AND pos IS NOT NULL ORDER BY pos").bind(user).fetch_all(&pool).await.unwrap();
            for p in &rows {
                if seen.insert(*p) {
                    assert!(*p > high, "position {p} became visible after {high} had been seen");
                }
            }
            high = high.max(rows.last().copied().unwrap_or(0));
            rreads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Run until the reader has looked many times while plenty was written (not for a fixed time).
    let pool = env.pool.clone();
    common::eventually(Duration::from_secs(60), || {
        let (pool, reads) = (pool.clone(), reads.clone());
        async move {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = $1").bind(user).fetch_one(&pool).await.unwrap();
            rows >= 1000 && reads.load(std::sync::atomic::Ordering::Relaxed) >= 50
        }
    })
    .await;
    stop.cancel();
    let mut stored = 0;
    for w in writers {
        stored += w.await.unwrap();
    }
    reader.await.unwrap();
    let (rows, distinct, nulls, max): (i64, i64, i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), count(DISTINCT event_id), count(*) FILTER (WHERE pos IS NULL), max(pos) FROM notifications WHERE user_id = $1")
            .bind(user)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((rows, distinct, nulls), (stored as i64, stored as i64, 0), "each event stored once, every row with its position");
    let head: i64 = sqlx::query_scalar("SELECT pos FROM stream_heads WHERE stream = 'notification'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(Some(head), max, "the head is the highest position");
}

/// Keeps `api`'s users holding, paying, cancelling and letting holds lapse on `seats` until
/// `stop`; returns the number of successful holds per seat.
async fn shopper(api: Arc<TestApi>, schedule: String, seats: Vec<String>, n: usize, sales: Arc<std::sync::atomic::AtomicIsize>, stop: CancellationToken) -> HashMap<String, usize> {
    let u = api.user(&format!("shopper-{n}")).await;
    api.charge(&u, 1_000_000).await;
    let mut held: HashMap<String, usize> = HashMap::new();
    let mut token = api.active_token(&u, &schedule).await;
    let mut i = n * 7919;
    while !stop.is_cancelled() {
        i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let seat = &seats[(i >> 33) % seats.len()];
        let r = api.hold(&u, &token, seat).await;
        match r.status().as_u16() {
            201 => {
                *held.entry(seat.clone()).or_default() += 1;
                let v: Value = r.json().await.unwrap();
                let id = v["reservationId"].as_str().unwrap().to_string();
                match (i >> 40) % 4 {
                    // Sold seats stay sold (no refunds here), so only a few sales keep seats cycling.
                    0 if sales.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 => {
                        let p = api.pay(&u, &uuid::Uuid::new_v4().to_string(), &id).await;
                        assert!(p.status() == 201 || p.status() == 409, "pay: {}", p.status());
                        if p.status() == 201 {
                            token = api.active_token(&u, &schedule).await;
                        }
                    }
                    0 | 1 => {
                        let c = api.http.delete(api.url(&format!("/v1/reservations/{id}"))).bearer_auth(&u.token).send().await.unwrap();
                        assert!(c.status() == 200 || c.status() == 409);
                    }
                    _ => {} // left to expire
                }
            }
            409 => {}
            403 => token = api.active_token(&u, &schedule).await,
            s => panic!("hold: {s}"),
        }
    }
    held
}

/// A writer whose transactions stay open while others commit: it cancels a live hold and commits
/// only after a while, so a change with a smaller insertion id becomes visible after larger ones.
async fn slow_canceller(pool: sqlx::PgPool, schedule: String, stop: CancellationToken) -> usize {
    let mut n = 0;
    while !stop.is_cancelled() {
        let mut tx = booking::db::begin(&pool).await.unwrap();
        let hit: Option<uuid::Uuid> = sqlx::query_scalar(
            "UPDATE reservations SET status = 'CANCELLED', cancelled_at = clock_timestamp()
             WHERE id = (SELECT id FROM reservations WHERE schedule_id = $1::uuid AND status = 'HELD'
                         AND expires_at > now() + interval '300 milliseconds' LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .bind(&schedule)
        .fetch_optional(&mut *tx)
        .await
        .unwrap();
        if hit.is_some() {
            n += 1;
            // Held open on purpose (the scenario, not a synchronization).
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_apis_and_two_expirers_each_watcher_ends_in_postgresqls_state_with_one_held_event_per_hold() {
    let env = TestEnv::new().await;
    let ttl = Duration::from_millis(1200);
    let api1 = Arc::new(env.api(ttl, QueueSettings::default()).await);
    let api2 = Arc::new(env.api(ttl, QueueSettings::default()).await);
    let mut tasks = vec![scheduler(&env).await, expirer(&env).await, expirer(&env).await];
    let (schedule, seats) = api1.concert(50, 1).await;
    let path = format!("/v1/schedules/{schedule}/seats/stream");
    let steady = Watcher::start(vec![api1.base.clone()], path.clone(), None, None).await;
    let hopper = Watcher::start(vec![api2.base.clone(), api1.base.clone()], path.clone(), None, Some(150)).await;

    let stop_load = CancellationToken::new();
    let mut shoppers = Vec::new();
    let sales = Arc::new(std::sync::atomic::AtomicIsize::new(15));
    for n in 0..12 {
        let api = if n % 2 == 0 { api1.clone() } else { api2.clone() };
        shoppers.push(tokio::spawn(shopper(api, schedule.clone(), seats.clone(), n, sales.clone(), stop_load.clone())));
    }
    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(slow_canceller(env.pool.clone(), schedule.clone(), stop_load.clone()))).collect();
    // Load until the hopper has reconnected several times.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while *hopper.reconnects.lock().unwrap() < 6 {
        let (s, h, r) = (steady.count(), hopper.count(), *hopper.reconnects.lock().unwrap());
        assert!(tokio::time::Instant::now() < deadline, "load too slow: steady {s} events, hopper {h} events, {r} reconnects");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_load.cancel();
    let mut holds: HashMap<String, usize> = HashMap::new();
    for s in shoppers {
        for (seat, k) in s.await.unwrap() {
            *holds.entry(seat).or_default() += k;
        }
    }
    let mut slow_cancels = 0;
    for s in slow {
        slow_cancels += s.await.unwrap();
    }
    assert!(slow_cancels > 0, "some transactions were held open");
    // Every hold ends (paid, cancelled or expired on its own) and every change reaches both.
    common::eventually(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM reservations WHERE status = 'HELD'").fetch_one(&env.pool).await.unwrap() == 0
    })
    .await;
    let changes: i64 = sqlx::query_scalar("SELECT count(*) FROM seat_events").fetch_one(&env.pool).await.unwrap();
    let want = pg_state(&env, &schedule).await;
    for (name, w) in [("steady", &steady), ("hopper", &hopper)] {
        let done = || async {
            let (state, _) = replay(&w.events());
            state == want
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !done().await && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let events = w.events();
        let (state, held) = replay(&events);
        let wrong: Vec<_> = want.iter().filter(|(k, v)| state.get(*k) != Some(v)).collect();
        assert!(wrong.is_empty(), "{name}: {} seats differ from PostgreSQL after {} events ({changes} changes): {wrong:?}", wrong.len(), events.len());
        for seat in &seats {
            assert_eq!(held.get(seat).copied().unwrap_or(0), holds.get(seat).copied().unwrap_or(0), "{name}: HELD events of seat {seat}");
        }
        let ids: Vec<i64> = events.iter().map(|e| e.id.parse().unwrap()).collect();
        assert!(ids.windows(2).all(|p| p[0] < p[1]), "{name}: ids strictly increasing");
        assert_eq!(events.iter().filter(|e| e.event == "snapshot").count(), 1, "{name}: one snapshot");
    }
    let total_holds: usize = holds.values().sum();
    let expired: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = 'EXPIRED'").fetch_one(&env.pool).await.unwrap();
    assert!(expired > 0, "some holds expired on their own");
    eprintln!("{total_holds} holds, {expired} expired, {slow_cancels} slow cancels, {changes} seat changes, hopper reconnected {} times", hopper.reconnects.lock().unwrap());
    steady.task.abort();
    hopper.task.abort();
    stop(std::mem::take(&mut tasks)).await;
    for a in [api1, api2] {
        if let Ok(a) = Arc::try_unwrap(a) {
            a.stop().await;
        }
    }
}

/// Issue 17: two workers share the `notification.request` group and store one user's
/// notifications while the group rebalances twice (the second worker joins, then the first
/// leaves, so the user's partition changes hands), and other writers insert notifications for
/// the same user in transactions held open on purpose. A steady stream and a stream that hops
/// between two apis with `Last-Event-ID` each receive every notification exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_across_a_forced_rebalance_give_a_hopping_stream_each_notification_once() {
    use booking::kafka::{Envelope, EventType};
    use booking::notification::NotificationRequest;
    use rdkafka::producer::FutureRecord;

    const VIA_KAFKA: usize = 600;
    let env = TestEnv::new().await;
    let api1 = env.api(Duration::from_secs(60), QueueSettings::default()).await;
    let api2 = env.api(Duration::from_secs(60), QueueSettings::default()).await;
    let u = api1.user("fan").await;
    let user: uuid::Uuid = u.id.parse().unwrap();
    let path = "/v1/users/me/notifications/stream".to_string();
    let steady = Watcher::start(vec![api2.base.clone()], path.clone(), Some(u.token.clone()), None).await;
    let hopper = Watcher::start(vec![api1.base.clone(), api2.base.clone()], path.clone(), Some(u.token.clone()), Some(40)).await;

    let group = format!("{}w-", env.prefix);
    let first = inproc::worker(&env, &group, inproc::worker_settings(&env)).await;
    let stop_writers = CancellationToken::new();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (pool, uid, stop) = (env.pool.clone(), u.id.clone(), stop_writers.clone());
            tokio::spawn(async move {
                let mut n = 0usize;
                while !stop.is_cancelled() {
                    slow_notification(pool.clone(), uid.clone(), Duration::from_millis(250)).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let topic = env.topics().notification_request.clone();
    let stored = || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notifications WHERE user_id = $1").bind(user).fetch_one(&env.pool).await.unwrap() };
    let mut second = None;
    let mut stored_when_first_left = None;
    let mut first = Some(first);
    for i in 0..VIA_KAFKA {
        let note = Envelope::new(EventType::NotificationRequest, NotificationRequest { user_id: user, kind: "QUEUE_POSITION".into(), title: "대기 순번".into(), message: format!("kafka {i}"), data: serde_json::json!({"i": i}) });
        let body = serde_json::to_string(&note).unwrap();
        env.res.producer.send(FutureRecord::to(&topic).key(&u.id).payload(&body), Duration::from_secs(10)).await.unwrap();
        if i == VIA_KAFKA / 3 {
            // Rebalance 1: a second member joins the group.
            second = Some(inproc::worker(&env, &group, inproc::worker_settings(&env)).await);
        }
        if i == 2 * VIA_KAFKA / 3 {
            // Rebalance 2: the first member leaves; every partition is now the second's.
            inproc::stop(vec![first.take().unwrap()]).await;
            stored_when_first_left = Some(stored().await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_writers.cancel();
    let mut direct = 0;
    for s in slow {
        direct += s.await.unwrap();
    }
    assert!(direct > 0, "other writers inserted notifications");
    let want = (VIA_KAFKA + direct) as i64;
    common::eventually(Duration::from_secs(60), || async { stored().await == want }).await;
    assert!(stored_when_first_left.unwrap() < want, "the second worker stored notifications after the first left");

    let ids: std::collections::BTreeSet<String> = sqlx::query_scalar("SELECT id::text FROM notifications WHERE user_id = $1").bind(user).fetch_all(&env.pool).await.unwrap().into_iter().collect();
    for (name, w) in [("steady", &steady), ("hopper", &hopper)] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while w.count() < ids.len() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A repeat would show up as an extra event: wait a moment for one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let events = w.events();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for e in &events {
            *seen.entry(e.data["notificationId"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
        let missing: Vec<_> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
        let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(missing.is_empty() && repeated.is_empty(), "{name}: {} of {} notifications missing {missing:?}, repeated {repeated:?} ({} events)", missing.len(), ids.len(), events.len());
        let cursors: Vec<i64> = events.iter().map(|e| e.id.parse().unwrap()).collect();
        assert!(cursors.windows(2).all(|p| p[0] < p[1]), "{name}: event ids strictly increasing");
    }
    assert!(*hopper.reconnects.lock().unwrap() >= 10, "the hopper moved between the apis");
    eprintln!("{VIA_KAFKA} via Kafka, {direct} direct, hopper reconnected {} times", hopper.reconnects.lock().unwrap());
    steady.task.abort();
    hopper.task.abort();
    inproc::stop(second.into_iter().collect()).await;
    api1.stop().await;
    api2.stop().await;
}
