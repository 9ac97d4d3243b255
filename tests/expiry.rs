//! The hold expiry pipeline: delay-scheduler and expirer against the real services.

mod common;


use std::time::Duration;

use booking::app::{ExpirerMode, ExpirerSettings};
use booking::kafka::partition_for;
use booking::reservation::ReservationEvent;
use booking::scheduler::{Scheduler, SchedulerConfig};
use common::inproc::{self, Task};
use common::{QueueSettings, TestApi, TestEnv, User};
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use uuid::Uuid;

fn sched_cfg(lease: Duration) -> SchedulerConfig {
    SchedulerConfig { batch_size: 100, lease, poll_interval: Duration::from_secs(1), rearm_interval: Duration::from_secs(3600) }
}

fn expirer_cfg(mode: ExpirerMode, sweep_interval: Duration, sweep_grace: Duration) -> ExpirerSettings {
    ExpirerSettings { mode, sweep_interval, sweep_grace, sweep_batch: 1000, legacy_interval: Duration::from_secs(1), outbox_batch: 500, outbox_poll: Duration::from_millis(200) }
}

async fn scheduler(env: &TestEnv, lease: Duration) -> Task {
    inproc::scheduler(env, sched_cfg(lease)).await
}

async fn expirer(env: &TestEnv, s: ExpirerSettings) -> Task {
    inproc::expirer(env, s).await
}

async fn stop(task: Task) {
    inproc::stop(vec![task]).await;
}

async fn hold_one(api: &TestApi, name: &str, schedule: &str, seat: &str) -> (User, String) {
    let u = api.user(name).await;
    api.charge(&u, 10_000).await;
    let t = api.active_token(&u, schedule).await;
    let r = api.hold(&u, &t, seat).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (u, v["reservationId"].as_str().unwrap().to_string())
}

async fn status_of(env: &TestEnv, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM reservations WHERE id = $1::uuid").bind(id).fetch_one(&env.pool).await.unwrap()
}

async fn await_status(env: &TestEnv, id: &str, want: &str, timeout: Duration) {
    common::eventually(timeout, || async { status_of(env, id).await == want }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_hold_expires_frees_its_seat_and_notifies_once() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(2), QueueSettings::default()).await;
    let s = scheduler(&env, Duration::from_secs(5)).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    let (schedule, seats) = api.concert(1, 10).await;
    let (u, id) = hold_one(&api, "slow-payer", &schedule, &seats[0]).await;
    await_status(&env, &id, "EXPIRED", Duration::from_secs(30)).await;
    assert_eq!(api.seat_status(&schedule, &seats[0]).await, "AVAILABLE");
    let r: Value = api.reservation(&u, &id).await.json().await.unwrap();
    assert_eq!(r["status"], "EXPIRED");
    // Exactly one RESERVATION_EXPIRED request is published for it.
    let notes = env.read_topic_settled(&env.topics().notification_request, 3, Duration::from_secs(20), Duration::from_secs(1)).await;
    let expired: Vec<&Value> = notes.iter().filter(|n| n["payload"]["type"] == "RESERVATION_EXPIRED").collect();
    assert_eq!(expired.len(), 1, "{notes:?}");
    assert_eq!(expired[0]["payload"]["data"]["reservationId"], id.as_str());
    assert_eq!(expired[0]["payload"]["title"], "예약 만료");
    // The sweeper never had to act: the pipeline did it.
    let sweeper_path = env.expired_notifications(&id).await;
    assert_eq!(sweeper_path, 1);
    stop(s).await;
    stop(e).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_paid_or_cancelled_before_expiry_never_expires_and_sends_no_expiration() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(3), QueueSettings::default()).await;
    let s = scheduler(&env, Duration::from_secs(5)).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    let (schedule, seats) = api.concert(3, 10).await;
    let (payer, paid) = hold_one(&api, "payer", &schedule, &seats[0]).await;
    let (canceller, cancelled) = hold_one(&api, "canceller", &schedule, &seats[1]).await;
    let (_, control) = hold_one(&api, "control", &schedule, &seats[2]).await;
    assert_eq!(api.pay(&payer, "k", &paid).await.status(), 201);
    let r = api.http.delete(api.url(&format!("/v1/reservations/{cancelled}"))).bearer_auth(&canceller.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The control hold expires; by then the other two were due as well.
    await_status(&env, &control, "EXPIRED", Duration::from_secs(30)).await;
    // An absence has no event to wait for; this is the condition instead: none of the three is
    // left in the scheduler (each was removed or published, acknowledged) and the expirer has
    // read the expiration topic to its end.
    settled(&env, &[paid.clone(), cancelled.clone(), control.clone()]).await;
    assert_eq!(status_of(&env, &paid).await, "CONFIRMED");
    assert_eq!(status_of(&env, &cancelled).await, "CANCELLED");
    let msgs = env.read_topic(&env.topics().reservation_expiration, usize::MAX, Duration::from_secs(3)).await;
    let ids: Vec<String> = msgs.iter().map(|(_, v, _)| v["payload"]["reservationId"].as_str().unwrap().to_string()).collect();
    assert!(ids.contains(&control));
    assert!(!ids.contains(&paid), "no expiration for the paid hold: {ids:?}");
    assert!(!ids.contains(&cancelled), "no expiration for the cancelled hold: {ids:?}");
    stop(s).await;
    stop(e).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_that_dies_between_claim_and_publish_loses_nothing() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(1), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(1, 10).await;
    let (_, id) = hold_one(&api, "victim", &schedule, &seats[0]).await;
    let rid = Uuid::parse_str(&id).unwrap();
    // A scheduler instance schedules the hold, claims it once it is due, then "dies" before
    // publishing: nothing is acknowledged, the member sits in flight with its lease.
    let doomed = Scheduler::new(env.res.redis.clone(), env.keys().clone(), env.res.producer.clone(), env.topics().clone(), sched_cfg(Duration::from_secs(2)));
    let (uid, sid, seat, exp): (Uuid, Uuid, Uuid, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT user_id, seat_id, schedule_id, expires_at FROM reservations WHERE id = $1").bind(rid).fetch_one(&env.pool).await.unwrap();
    let ev = ReservationEvent { reservation_id: rid, user_id: uid, seat_id: seat, schedule_id: sid, expires_at: exp };
    let shard = partition_for(&id, booking::kafka::PARTITIONS);
    doomed.schedule(shard, &ev).await.unwrap();
    // Claimed once it is due (a 1 s hold), polled with a deadline.
    let claimed = common::eventually_some(Duration::from_secs(10), || async {
        let c = doomed.claim(shard).await.unwrap();
        (!c.members.is_empty()).then_some(c)
    })
    .await;
    assert_eq!(claimed.members.len(), 1, "claimed before the crash");
    drop(doomed);
    assert_eq!(status_of(&env, &id).await, "HELD");

    // A healthy scheduler and the expirer take over once the lease runs out. The sweeper is far
    // away, so only the lease can bring the hold back.
    let s = scheduler(&env, Duration::from_secs(2)).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    await_status(&env, &id, "EXPIRED", Duration::from_secs(30)).await;
    settled(&env, std::slice::from_ref(&id)).await;
    assert_eq!(env.expired_notifications(&id).await, 1, "expired once");
    stop(s).await;
    stop(e).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_survive_redis_forgetting_them_through_rearm_and_the_sweeper() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(3), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(2, 10).await;
    let s = scheduler(&env, Duration::from_secs(5)).await;
    let (_, first) = hold_one(&api, "a", &schedule, &seats[0]).await;
    // Wait until the scheduler has it, then make Redis forget everything of this world. (The
    // services are shared by parallel tests, so "FLUSHALL" is the deletion of every key under
    // this test's prefix, which is all the product has in Redis.)
    let mut conn = env.res.redis.clone();
    let due_key = env.keys().sched_due(partition_for(&first, booking::kafka::PARTITIONS));
    common::eventually(Duration::from_secs(20), || {
        let (mut c, k, f) = (conn.clone(), due_key.clone(), first.clone());
        async move { redis::cmd("ZSCORE").arg(&k).arg(&f).query_async::<Option<f64>>(&mut c).await.unwrap().is_some() }
    }).await;
    stop(s).await;
    forget_everything(&mut conn, &env.prefix).await;
    // A restarted scheduler re-arms from PostgreSQL.
    let s = scheduler(&env, Duration::from_secs(5)).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    await_status(&env, &first, "EXPIRED", Duration::from_secs(30)).await;
    stop(s).await;
    stop(e).await;

    // With no scheduler at all and Redis forgotten again, the sweeper is the last net.
    let (_, second) = hold_one(&api, "b", &schedule, &seats[1]).await;
    forget_everything(&mut conn, &env.prefix).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_millis(300), Duration::from_millis(100))).await;
    await_status(&env, &second, "EXPIRED", Duration::from_secs(30)).await;
    assert_eq!(env.expired_notifications(&second).await, 1);
    stop(e).await;
    api.stop().await;
}

async fn forget_everything(conn: &mut booking::redis_conn::RedisConn, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(conn).await.unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(conn).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_expirations_and_two_schedulers_still_expire_each_hold_once() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(2), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(4, 10).await;
    let s1 = scheduler(&env, Duration::from_secs(5)).await;
    let s2 = scheduler(&env, Duration::from_secs(5)).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    let mut ids = Vec::new();
    for (i, seat) in seats.iter().enumerate() {
        ids.push(hold_one(&api, &format!("u{i}"), &schedule, seat).await.1);
    }
    for id in &ids {
        await_status(&env, id, "EXPIRED", Duration::from_secs(30)).await;
    }
    // Deliver every expiration again, twice.
    let msgs = env.read_topic(&env.topics().reservation_expiration, ids.len(), Duration::from_secs(10)).await;
    for _ in 0..2 {
        for (key, v, _) in &msgs {
            let body = serde_json::to_string(v).unwrap();
            let k = key.clone().unwrap();
            env.res.producer.send(FutureRecord::to(&env.topics().reservation_expiration).key(&k).payload(&body), Duration::from_secs(5)).await.unwrap();
        }
    }
    let expected = msgs.len() * 3;
    let all = env.read_topic(&env.topics().reservation_expiration, expected, Duration::from_secs(10)).await;
    assert!(all.len() >= expected);
    settled(&env, &ids).await;
    for id in &ids {
        assert_eq!(env.expired_notifications(id).await, 1, "one notification for {id}");
        let exp: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar("SELECT expired_at FROM reservations WHERE id = $1::uuid").bind(id).fetch_one(&env.pool).await.unwrap();
        assert!(exp.is_some());
    }
    stop(s1).await;
    stop(s2).await;
    stop(e).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_before_mode_expires_holds_by_scanning() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(1), QueueSettings::default()).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::Before, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    let (schedule, seats) = api.concert(1, 10).await;
    let (_, id) = hold_one(&api, "legacy", &schedule, &seats[0]).await;
    await_status(&env, &id, "EXPIRED", Duration::from_secs(20)).await;
    assert_eq!(env.expired_notifications(&id).await, 1);
    stop(e).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reservation_created_goes_to_the_dead_letter_topic_and_the_scheduler_carries_on() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(2), QueueSettings::default()).await;
    let topic = env.topics().reservation_created.clone();
    for p in 0..booking::kafka::PARTITIONS {
        env.res.producer.send(FutureRecord::to(&topic).key("junk").payload("{not json").partition(p), Duration::from_secs(5)).await.unwrap();
    }
    let s = scheduler(&env, Duration::from_secs(5)).await;
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    let (schedule, seats) = api.concert(1, 10).await;
    let (_, id) = hold_one(&api, "after-junk", &schedule, &seats[0]).await;
    await_status(&env, &id, "EXPIRED", Duration::from_secs(30)).await;
    let dlq = env.read_topic(&format!("{topic}.dlq"), 3, Duration::from_secs(20)).await;
    assert_eq!(dlq.len(), 3);
    assert!(dlq.iter().all(|(_, _, h)| h.iter().any(|(k, v)| k == "dlq-reason" && v.contains("malformed"))), "{dlq:?}");
    stop(s).await;
    stop(e).await;
    api.stop().await;
}

/// Waits until every expiration of `ids` there will be was handled: the scheduler holds none of
/// them any more, and the expirer's group has read its topic to the end.
async fn settled(env: &TestEnv, ids: &[String]) {
    for id in ids {
        common::eventually(Duration::from_secs(20), || async { in_scheduler(env, id).await == (None, false) }).await;
    }
    let group = inproc::expirer_group(env);
    common::eventually(Duration::from_secs(20), || async { group_caught_up(env, &group, &env.topics().reservation_expiration) }).await;
}

/// The scheduler's due and in-flight sets of a hold's shard: (score in due, in flight).
async fn in_scheduler(env: &TestEnv, id: &str) -> (Option<f64>, bool) {
    let shard = partition_for(id, booking::kafka::PARTITIONS);
    let mut conn = env.res.redis.clone();
    let due: Option<f64> = redis::cmd("ZSCORE").arg(env.keys().sched_due(shard)).arg(id).query_async(&mut conn).await.unwrap();
    let inflight: Option<f64> = redis::cmd("ZSCORE").arg(env.keys().sched_inflight(shard)).arg(id).query_async(&mut conn).await.unwrap();
    (due, inflight.is_some())
}

async fn event_of(env: &TestEnv, id: &str) -> ReservationEvent {
    let (reservation_id, user_id, seat_id, schedule_id, expires_at): (Uuid, Uuid, Uuid, Uuid, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT id, user_id, seat_id, schedule_id, expires_at FROM reservations WHERE id = $1::uuid").bind(id).fetch_one(&env.pool).await.unwrap();
    ReservationEvent { reservation_id, user_id, seat_id, schedule_id, expires_at }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiration_that_arrives_early_leaves_the_hold_payable_and_it_expires_on_time_once() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(5), QueueSettings::default()).await;
    let s = scheduler(&env, Duration::from_secs(15)).await;
    // The sweeper is an hour away: only the pipeline can expire the hold.
    let e = expirer(&env, expirer_cfg(ExpirerMode::After, Duration::from_secs(3600), Duration::from_secs(3600))).await;
    let (schedule, seats) = api.concert(2, 10).await;
    // Users and queue tokens first, so the two holds are taken together.
    let (payer, other) = (api.user("payer").await, api.user("late-payer").await);
    api.charge(&payer, 10_000).await;
    let (t1, t2) = (api.active_token(&payer, &schedule).await, api.active_token(&other, &schedule).await);
    let held = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["reservationId"].as_str().unwrap().to_string()
    };
    let paid = held(api.hold(&payer, &t1, &seats[0]).await).await;
    let id = held(api.hold(&other, &t2, &seats[1]).await).await;
    for hold in [&paid, &id] {
        // As if the scheduler had claimed it by a Redis clock running ahead and published it
        // (claimed and acknowledged: gone from Redis), its expiration is published now, seconds
        // before its expiresAt.
        common::eventually(Duration::from_secs(10), || async { in_scheduler(&env, hold).await.0.is_some() }).await;
        let shard = partition_for(hold, booking::kafka::PARTITIONS);
        let mut conn = env.res.redis.clone();
        let _: () = redis::cmd("ZREM").arg(env.keys().sched_due(shard)).arg(hold.as_str()).query_async(&mut conn).await.unwrap();
        let _: () = redis::cmd("HDEL").arg(env.keys().sched_payload(shard)).arg(hold.as_str()).query_async(&mut conn).await.unwrap();
        let early = booking::kafka::Envelope::new(booking::kafka::EventType::ReservationExpiration, event_of(&env, hold).await);
        let body = serde_json::to_string(&early).unwrap();
        env.res.producer.send(FutureRecord::to(&env.topics().reservation_expiration).key(hold.as_str()).payload(&body), Duration::from_secs(5)).await.unwrap();
    }
    // The expirer handled the early messages when each hold is either back in the scheduler or
    // no longer HELD.
    for hold in [&paid, &id] {
        common::eventually(Duration::from_secs(10), || async { in_scheduler(&env, hold).await.0.is_some() || status_of(&env, hold).await != "HELD" }).await;
        assert_eq!(status_of(&env, hold).await, "HELD", "an early expiration must not end a hold before its expiresAt");
    }
    assert_eq!(api.pay(&payer, "early", &paid).await.status(), 201, "the hold is still payable");

    await_status(&env, &id, "EXPIRED", Duration::from_secs(15)).await;
    let (expires_at, expired_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT expires_at, expired_at FROM reservations WHERE id = $1::uuid").bind(&id).fetch_one(&env.pool).await.unwrap();
    assert!(expired_at >= expires_at, "never before expiresAt: {expired_at} < {expires_at}");
    println!("expired {} ms after expiresAt", (expired_at - expires_at).num_milliseconds());
    // The scheduler's copy is published too, and changes nothing: one expiry, one notification.
    common::eventually(Duration::from_secs(20), || async { in_scheduler(&env, &id).await == (None, false) }).await;
    let group = inproc::expirer_group(&env);
    common::eventually(Duration::from_secs(20), || async { group_caught_up(&env, &group, &env.topics().reservation_expiration) }).await;
    assert_eq!(env.expired_notifications(&id).await, 1, "expired once");
    assert_eq!(status_of(&env, &paid).await, "CONFIRMED");
    stop(s).await;
    stop(e).await;
    api.stop().await;
}

fn group_caught_up(env: &TestEnv, group: &str, topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
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
async fn a_send_that_cannot_be_queued_counts_as_failed_and_goes_straight_back_to_be_sent_again() {
    let env = TestEnv::new().await;
    // A producer whose local queue holds one message: the second send of a batch is refused at
    // once with QueueFull.
    let tiny = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("queue.buffering.max.messages", "1")
        .set("linger.ms", "50")
        .create()
        .unwrap();
    // A lease of a minute: only the failure handling, not the lease, can bring members back.
    let sched = Scheduler::new(env.res.redis.clone(), env.keys().clone(), tiny, env.topics().clone(), sched_cfg(Duration::from_secs(60)));
    let shard = 0;
    let mut ids = Vec::new();
    for _ in 0..3 {
        // Due a second ago: all three are due at the first claim, whatever the millisecond
        // rounding of the due time against Redis's clock.
        let expires_at = chrono::Utc::now() - chrono::Duration::seconds(1);
        let ev = ReservationEvent { reservation_id: Uuid::new_v4(), user_id: Uuid::new_v4(), seat_id: Uuid::new_v4(), schedule_id: Uuid::new_v4(), expires_at };
        assert!(sched.schedule(shard, &ev).await.unwrap());
        ids.push(ev.reservation_id.to_string());
    }
    let tick = sched.step(shard).await.unwrap();
    let booking::scheduler::Tick::Published { claimed, published, failed, .. } = tick else { panic!("{tick:?}") };
    assert_eq!(claimed, 3);
    assert!(failed >= 1, "the refused sends count as failed: {tick:?}");
    assert_eq!(published + failed, 3);
    let mut conn = env.res.redis.clone();
    let inflight: u64 = redis::cmd("ZCARD").arg(env.keys().sched_inflight(shard)).query_async(&mut conn).await.unwrap();
    let due: u64 = redis::cmd("ZCARD").arg(env.keys().sched_due(shard)).query_async(&mut conn).await.unwrap();
    assert_eq!((inflight, due), (0, failed as u64), "failed members are back in the due set, not waiting out the lease");
    // The next steps send them.
    let sent = std::sync::atomic::AtomicUsize::new(published);
    common::eventually(Duration::from_secs(20), || async {
        if let Ok(booking::scheduler::Tick::Published { published, .. }) = sched.step(shard).await {
            sent.fetch_add(published, std::sync::atomic::Ordering::SeqCst);
        }
        sent.load(std::sync::atomic::Ordering::SeqCst) == 3
    })
    .await;
    let got = env.read_topic(&env.topics().reservation_expiration, 3, Duration::from_secs(20)).await;
    let mut keys: Vec<String> = got.into_iter().filter_map(|(k, _, _)| k).collect();
    keys.sort();
    ids.sort();
    assert_eq!(keys, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_of_new_paid_and_cancelled_holds_schedules_only_the_unpaid_ones() {
    use booking::kafka::{Envelope, EventType, HandleError, Handler, Incoming};
    use booking::scheduler::SchedulerHandler;
    let env = TestEnv::new().await;
    let topics = env.topics().clone();
    let scheduler = std::sync::Arc::new(Scheduler::new(env.res.redis.clone(), env.keys().clone(), env.res.producer.clone(), topics.clone(), sched_cfg(Duration::from_secs(30))));
    let handler = SchedulerHandler { scheduler: scheduler.clone() };
    // Already due, so a claim shows what is scheduled.
    let hold = || ReservationEvent { reservation_id: Uuid::new_v4(), user_id: Uuid::new_v4(), seat_id: Uuid::new_v4(), schedule_id: Uuid::new_v4(), expires_at: chrono::Utc::now() - chrono::Duration::seconds(1) };
    let (paid_first, paid, cancelled, kept, kept_too) = (hold(), hold(), hold(), hold(), hold());
    let msg = |topic: &str, id: Uuid, body: String| Incoming {
        topic: topic.to_string(),
        partition: partition_for(&id.to_string(), booking::kafka::PARTITIONS),
        offset: 0,
        key: Some(id.to_string()),
        payload: body.into_bytes(),
        timestamp_ms: None,
    };
    let created = |h: &ReservationEvent| msg(&topics.reservation_created, h.reservation_id, serde_json::to_string(&Envelope::new(EventType::ReservationCreated, h.clone())).unwrap());
    let ended = |topic: &str, kind: EventType, h: &ReservationEvent| msg(topic, h.reservation_id, serde_json::to_string(&Envelope::new(kind, serde_json::json!({"reservationId": h.reservation_id}))).unwrap());
    // Both orders in one batch: a payment read before its hold's creation (they travel on
    // different topics), and cancellations after; a malformed message in the middle.
    let batch = vec![
        ended(&topics.payment_completed, EventType::PaymentCompleted, &paid_first),
        created(&paid_first),
        created(&paid),
        created(&kept),
        msg(&topics.reservation_created, Uuid::new_v4(), "{not json".into()),
        created(&cancelled),
        created(&kept_too),
        ended(&topics.payment_completed, EventType::PaymentCompleted, &paid),
        ended(&topics.reservation_cancelled, EventType::ReservationCancelled, &cancelled),
    ];
    let results = handler.handle_batch(&batch).await;
    let poison: Vec<usize> = results.iter().enumerate().filter(|(_, r)| matches!(r, Err(HandleError::Poison(_)))).map(|(i, _)| i).collect();
    assert_eq!(poison, vec![4], "only the malformed message is poison: {results:?}");
    assert!(results.iter().all(|r| !matches!(r, Err(HandleError::Transient(_)))), "{results:?}");

    let mut due = Vec::new();
    for shard in 0..booking::kafka::PARTITIONS {
        due.extend(scheduler.claim(shard).await.unwrap().members.into_iter().map(|(m, _)| m));
    }
    due.sort();
    let mut want = vec![kept.reservation_id.to_string(), kept_too.reservation_id.to_string()];
    want.sort();
    assert_eq!(due, want, "only the holds neither paid nor cancelled are scheduled");
}
