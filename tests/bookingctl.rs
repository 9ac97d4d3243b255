//! `bookingctl` against the real services: the real binary (`CARGO_BIN_EXE_bookingctl`) reading
//! and changing what the daemons of one isolated test world hold.

mod common;

use std::process::Stdio;
use std::time::Duration;

use booking::kafka::{consumer_config, partition_for, ConsumerRunner, HandleError, Handler, Incoming, PARTITIONS};
use booking::reservation::ReservationEvent;
use booking::scheduler::{Scheduler, SchedulerConfig};
use common::inproc::{self, Task};
use common::{eventually, QueueSettings, TestApi, TestEnv, User};
use rdkafka::producer::FutureRecord;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn sched_cfg() -> SchedulerConfig {
    SchedulerConfig { batch_size: 100, lease: LEASE, poll_interval: Duration::from_secs(1), rearm_interval: Duration::from_secs(3600) }
}

/// What one run of bookingctl printed.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        assert!(self.ok, "bookingctl failed:\n{}\n{}", self.stdout, self.stderr);
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// The flags that point bookingctl at this test's world.
fn world(env: &TestEnv) -> Vec<String> {
    let mut a = env.common_args();
    for (flag, v) in [
        ("--scheduler-group", inproc::scheduler_group(env)),
        ("--expirer-group", inproc::expirer_group(env)),
        ("--worker-group-prefix", format!("{}worker-", env.prefix)),
        ("--lease", "30s".to_string()),
    ] {
        a.push(flag.into());
        a.push(v);
    }
    a
}

/// Runs bookingctl with `flags` then `args`; standard input is not a terminal (as in a script).
async fn ctl(flags: &[String], args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookingctl"))
        .args(flags)
        .args(args)
        .env_remove("ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("bookingctl runs");
    Run { ok: out.status.success(), stdout: String::from_utf8_lossy(&out.stdout).into(), stderr: String::from_utf8_lossy(&out.stderr).into() }
}

async fn scheduler(env: &TestEnv) -> Task {
    inproc::scheduler(env, sched_cfg()).await
}

/// The sweeper is kept out of the way: only the pipeline (and replays) may expire holds here.
async fn expirer(env: &TestEnv) -> Task {
    inproc::expirer(env, inproc::expirer_settings()).await
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

/// Polls `dlq list --json` until it shows `n` dead letters (of `topic`).
async fn dead_letters(flags: &[String], topic: &str, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        last = ctl(flags, &["--json", "dlq", "list", "--topic", topic]).await.json().as_array().unwrap().clone();
        if last.len() >= n {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("expected {n} dead letters on {topic}, saw {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_reservation_created_lands_in_the_dlq_and_dlq_list_shows_it_with_its_reason() {
    let env = TestEnv::new().await;
    let flags = world(&env);
    let topic = env.topics().reservation_created.clone();
    // A topic just created may be unknown to the broker for a moment: send until it is known.
    let mut tries = 0;
    let sent = loop {
        match env.res.producer.send(FutureRecord::to(&topic).key("junk-key").payload("{not json").partition(1), Duration::from_secs(5)).await {
            Ok(d) => break d,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("send failed, retrying: {:?}", e.0);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{:?}", e.0),
        }
    };
    let s = scheduler(&env).await;

    let letters = dead_letters(&flags, "reservation.created", 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let d = &letters[0];
    assert_eq!(d["key"], "junk-key");
    assert!(d["reason"].as_str().unwrap().contains("malformed envelope"), "{d}");
    assert_eq!(d["originalTopic"], topic.as_str());
    assert_eq!(d["originalPartition"], 1);
    assert_eq!(d["originalOffset"], sent.offset);
    assert_eq!(d["dlqTopic"], format!("{topic}.dlq"));
    assert!(d["time"].is_string());
    assert_eq!(d["replayed"], 0);

    // The table shows the same, and `show` pretty-prints the one letter.
    let table = ctl(&flags, &["dlq", "list"]).await;
    assert!(table.ok, "{}", table.stderr);
    assert!(table.stdout.contains("junk-key") && table.stdout.contains("malformed envelope"), "{}", table.stdout);
    let pos = format!("{}:{}", d["partition"], d["offset"]);
    let shown = ctl(&flags, &["--json", "dlq", "show", &format!("{topic}.dlq"), &pos]).await.json();
    assert_eq!(shown["payload"], "{not json");
    assert_eq!(shown["consumer"], "delay-scheduler");
    let missing = ctl(&flags, &["dlq", "show", "reservation.created", "2:999"]).await;
    assert!(!missing.ok && missing.stderr.contains("no message at 2:999"), "{}", missing.stderr);
    stop(s).await;
}

/// A consumer with a bug: it rejects every message as poison, valid or not.
struct Buggy;

impl Handler for Buggy {
    async fn handle(&self, _msg: &Incoming) -> Result<(), HandleError> {
        Err(HandleError::Poison("bug: rejected a valid expiration (fixed in the next release)".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_message_dead_lettered_by_a_bug_is_processed_once_after_replay_and_a_second_replay_does_nothing() {
    let env = TestEnv::new().await;
    let flags = world(&env);
    let api = env.api(Duration::from_secs(2), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(1, 10).await;
    let s = scheduler(&env).await;
    // The expirer's group runs the buggy release: the hold's expiration is dead-lettered.
    let group = inproc::expirer_group(&env);
    let topic = env.topics().reservation_expiration.clone();
    let buggy = ConsumerRunner::new(&consumer_config(&env.brokers, &group), &[&topic], env.res.producer.clone(), "expirer").unwrap();
    let stop_buggy = CancellationToken::new();
    let b = tokio::spawn({
        let t = stop_buggy.clone();
        async move { buggy.run(&Buggy, t).await }
    });
    let (_, id) = hold_one(&api, "victim", &schedule, &seats[0]).await;
    dead_letters(&flags, "reservation.expiration.dlq", 1).await;
    stop_buggy.cancel();
    b.await.unwrap();
    // The scheduler stops too: a re-arm of the still-HELD hold would publish a fresh expiration
    // and the fixed expirer would need no replay. (The scheduler may already have published more
    // than one: duplicates are allowed, and every copy was dead-lettered.)
    stop(s).await;
    let letters = ctl(&flags, &["--json", "dlq", "list", "--topic", "reservation.expiration"]).await.json();
    let letters = letters.as_array().unwrap();
    let n = letters.len();
    assert!(letters.iter().all(|d| d["key"] == id.as_str() && d["reason"].as_str().unwrap().starts_with("bug:")), "{letters:?}");
    assert_eq!(status_of(&env, &id).await, "HELD", "the dead-lettered expiration changed nothing");

    // The fixed release takes over the group (its offset is past the dead-lettered message).
    let e = expirer(&env).await;
    let replay = ["--json", "dlq", "replay", "--topic", "reservation.expiration", "--all"];

    // No terminal and no --yes: refused, nothing replayed.
    let refused = ctl(&flags, &replay).await;
    assert!(!refused.ok && refused.stderr.contains("--yes"), "{}", refused.stderr);
    let dry = ctl(&flags, &[&replay[..], &["--dry-run"]].concat()).await.json();
    assert_eq!(dry["replayed"], n, "{dry}");
    assert_eq!(status_of(&env, &id).await, "HELD");

    let first = ctl(&flags, &[&["--yes"][..], &replay].concat()).await;
    let v = first.json();
    assert_eq!(v["replayed"], n, "{v}");
    assert!(first.stderr.contains("dead letter replayed") && first.stderr.contains('@'), "who replayed is logged: {}", first.stderr);
    eventually(Duration::from_secs(30), || async { status_of(&env, &id).await == "EXPIRED" }).await;
    assert_eq!(env.expired_notifications(&id).await, 1);
    let copies = env.read_topic(&topic, 2 * n, Duration::from_secs(10)).await;
    assert_eq!(copies.len(), 2 * n, "the originals and one replay of each");
    let headers = &copies.iter().find(|(_, _, h)| h.iter().any(|(k, _)| k == "replayed-from")).expect("the replay is marked").2;
    assert!(headers.contains(&("replay-count".to_string(), "1".to_string())), "{headers:?}");
    assert!(copies.iter().all(|c| c.0.as_deref() == Some(id.as_str())), "same key");

    // Again: nothing happens without --force.
    let second = ctl(&flags, &[&["--yes"][..], &replay].concat()).await.json();
    assert_eq!(second["replayed"], 0, "{second}");
    assert_eq!(second["items"][0]["outcome"], "skipped");
    assert_eq!(env.read_topic(&topic, 2 * n + 1, Duration::from_secs(3)).await.len(), 2 * n, "no new copy");
    // With --force it goes again, and the idempotent expirer still expires once.
    let forced = ctl(&flags, &[&["--yes"][..], &replay, &["--force"]].concat()).await.json();
    assert_eq!(forced["replayed"], n);
    assert_eq!(forced["items"][0]["replayCount"], 2);
    assert_eq!(env.read_topic(&topic, 3 * n, Duration::from_secs(10)).await.len(), 3 * n);
    let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_audit WHERE command = 'dlq replay' AND actor LIKE '%@%'").fetch_one(&env.pool).await.unwrap();
    assert_eq!(audit, 2, "each replay that changed something is recorded");
    stop(e).await;
    assert_eq!(env.expired_notifications(&id).await, 1);
    api.stop().await;
}

async fn find(flags: &[String], id: &str) -> Value {
    ctl(flags, &["--json", "scheduler", "find", id]).await.json()
}

async fn event_of(env: &TestEnv, id: &str) -> ReservationEvent {
    let (reservation_id, user_id, seat_id, schedule_id, expires_at): (Uuid, Uuid, Uuid, Uuid, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT id, user_id, seat_id, schedule_id, expires_at FROM reservations WHERE id = $1::uuid").bind(id).fetch_one(&env.pool).await.unwrap();
    ReservationEvent { reservation_id, user_id, seat_id, schedule_id, expires_at }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_find_tells_due_in_flight_tombstoned_and_lost_and_rearm_brings_the_lost_one_back() {
    let env = TestEnv::new().await;
    let flags = world(&env);
    let api = env.api(Duration::from_secs(3600), QueueSettings::default()).await;
    let (schedule, seats) = api.concert(3, 10).await;
    // The delay scheduler's own operations, driven step by step (as its consumer and loop would).
    let sched = Scheduler::new(env.res.redis.clone(), env.keys().clone(), env.res.producer.clone(), env.topics().clone(), sched_cfg());
    let shard_of = |id: &str| partition_for(id, PARTITIONS);

    // A fresh hold: due at its expiry on its shard.
    let (_, fresh) = hold_one(&api, "fresh", &schedule, &seats[0]).await;
    let ev = event_of(&env, &fresh).await;
    assert!(sched.schedule(shard_of(&fresh), &ev).await.unwrap());
    let f = find(&flags, &fresh).await;
    assert_eq!(f["redis"]["state"], "due", "{f}");
    assert_eq!(f["redis"]["shard"], shard_of(&fresh));
    let due_at = f["redis"]["dueAt"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert_eq!(due_at.timestamp_millis(), booking::scheduler::due_ms(ev.expires_at), "due at its expiry (in whole ms, rounded up)");
    assert_eq!(f["postgres"]["status"], "HELD");
    assert_eq!(f["warnings"].as_array().unwrap().len(), 0, "{f}");

    // Lost after Redis forgot everything of this world (only this test's keys: Redis is shared).
    let mut conn = env.res.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", env.prefix)).query_async(&mut conn).await.unwrap();
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
    let f = find(&flags, &fresh).await;
    assert_eq!(f["redis"]["state"], "absent", "{f}");
    assert!(f["warnings"][0].as_str().unwrap().contains("HELD in PostgreSQL but nowhere in Redis"), "{f}");
    let table = ctl(&flags, &["scheduler", "find", &fresh]).await;
    assert!(table.stdout.contains("WARNING"), "{}", table.stdout);

    // Re-arm: asks, then re-adds exactly the missing one; a second run finds nothing missing.
    let refused = ctl(&flags, &["scheduler", "rearm"]).await;
    assert!(!refused.ok && refused.stderr.contains("--yes"), "{}", refused.stderr);
    let r = ctl(&flags, &["--yes", "--json", "scheduler", "rearm"]).await.json();
    assert_eq!((r["held"].as_u64(), r["missing"].as_u64()), (Some(1), Some(1)), "{r}");
    let f = find(&flags, &fresh).await;
    assert_eq!(f["redis"]["state"], "due", "{f}");
    let again = ctl(&flags, &["--yes", "--json", "scheduler", "rearm"]).await.json();
    assert_eq!(again["missing"], 0);
    let audit: Vec<(String, Value)> = sqlx::query_as("SELECT command, detail FROM ops_audit ORDER BY id").fetch_all(&env.pool).await.unwrap();
    let readded: Vec<i64> = audit.iter().filter(|(c, _)| c == "scheduler rearm").map(|(_, d)| d["readded"].as_i64().unwrap()).collect();
    assert_eq!(readded, [1, 0], "each re-arm audited with what it added: {audit:?}");

    // Claimed: in flight since the claim, until the lease runs out.
    let (_, claimed) = hold_one(&api, "claimed", &schedule, &seats[1]).await;
    let mut ev = event_of(&env, &claimed).await;
    ev.expires_at = chrono::Utc::now() - chrono::Duration::seconds(1);
    assert!(sched.schedule(shard_of(&claimed), &ev).await.unwrap());
    let before = chrono::Utc::now();
    let c = sched.claim(shard_of(&claimed)).await.unwrap();
    assert!(c.members.iter().any(|(m, _)| *m == claimed));
    let f = find(&flags, &claimed).await;
    assert_eq!(f["redis"]["state"], "inFlight", "{f}");
    let at = |k: &str| f["redis"][k].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert_eq!(at("leaseUntil") - at("since"), chrono::Duration::seconds(30));
    assert!((at("since") - before).num_seconds().abs() <= 2, "{f}");

    // Paid: tombstoned, and PostgreSQL agrees.
    let (u, paid) = hold_one(&api, "paid", &schedule, &seats[2]).await;
    assert!(sched.schedule(shard_of(&paid), &event_of(&env, &paid).await).await.unwrap());
    assert!(api.pay(&u, "pay-1", &paid).await.status().is_success());
    sched.cancel(paid.parse().unwrap()).await.unwrap();
    let f = find(&flags, &paid).await;
    assert_eq!(f["redis"]["state"], "tombstoned", "{f}");
    assert_eq!(f["postgres"]["status"], "CONFIRMED");
    assert_eq!(f["warnings"].as_array().unwrap().len(), 0, "{f}");

    // `scheduler list`: the pending ones, earliest first.
    let l = ctl(&flags, &["--json", "scheduler", "list"]).await.json();
    let ids: Vec<&str> = l.as_array().unwrap().iter().map(|p| p["reservationId"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![claimed.as_str(), fresh.as_str()], "{l}");
    let listed = |args: Vec<String>| {
        let flags = flags.clone();
        async move {
            let mut a = vec!["--json".to_string(), "scheduler".into(), "list".into()];
            a.extend(args);
            let v = ctl(&flags, &a.iter().map(String::as_str).collect::<Vec<_>>()).await.json();
            v.as_array().unwrap().iter().map(|p| p["reservationId"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    // --due-before: the claimed one was due a second ago, the fresh one in an hour.
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert_eq!(listed(vec!["--due-before".into(), now]).await, vec![claimed.clone()]);
    assert_eq!(listed(vec!["--limit".into(), "1".into()]).await, vec![claimed.clone()]);
    // --shard: only that shard's holds.
    for (id, other) in [(&fresh, &claimed), (&claimed, &fresh)] {
        let on_shard = listed(vec!["--shard".into(), shard_of(id).to_string()]).await;
        assert!(on_shard.contains(id), "{id} on its shard: {on_shard:?}");
        assert_eq!(on_shard.contains(other), shard_of(other) == shard_of(id), "{other} only on its own shard: {on_shard:?}");
    }
    let unknown = find(&flags, &Uuid::new_v4().to_string()).await;
    assert_eq!(unknown["redis"]["state"], "absent");
    assert!(unknown["postgres"].is_null());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_names_every_dependency_topic_group_shard_schedule_and_dead_letter_topic() {
    let env = TestEnv::new().await;
    let flags = world(&env);
    let api = env.api(Duration::from_secs(3600), QueueSettings::default()).await;
    let (schedule, _) = api.concert(1, 10).await;
    let u = api.user("waiting").await;
    api.enter_queue(&u, &schedule).await;

    let v = ctl(&flags, &["status", "--json"]).await.json();
    let names = |arr: &Value, k: &str| -> Vec<String> { arr.as_array().unwrap().iter().map(|x| x[k].as_str().unwrap().to_string()).collect() };
    assert_eq!(names(&v["dependencies"], "name"), ["postgres", "redis", "kafka"]);
    assert!(v["dependencies"].as_array().unwrap().iter().all(|d| d["up"] == true), "{v}");
    let t = env.topics();
    let product = [&t.reservation_created, &t.reservation_expiration, &t.reservation_cancelled, &t.payment_completed, &t.payment_refunded, &t.notification_request];
    let topics = names(&v["topics"], "topic");
    for p in product {
        assert!(topics.contains(p), "{p} in {topics:?}");
        let dlq = format!("{p}.dlq");
        assert!(v["dlq"].as_array().unwrap().iter().any(|d| d["topic"] == dlq.as_str() && d["messages"] == 0), "{dlq}: {v}");
    }
    let groups: Vec<String> = v["topics"].as_array().unwrap().iter().flat_map(|t| names(&t["groups"], "group")).collect();
    for g in ["scheduler", "expirer", "worker-payments", "worker-notifications"] {
        assert!(groups.contains(&format!("{}{g}", env.prefix)), "{g} in {groups:?}");
    }
    let shards: Vec<i64> = v["scheduler"].as_array().unwrap().iter().map(|s| s["shard"].as_i64().unwrap()).collect();
    assert_eq!(shards, (0..PARTITIONS as i64).collect::<Vec<_>>());
    let q = v["queues"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{v}");
    assert_eq!(q[0]["scheduleId"], schedule.as_str());
    assert!(v["outbox"]["backlog"].is_number());

    // Redis unreachable: status still answers, says so, and keeps every other part.
    let mut down = flags.clone();
    let i = down.iter().position(|a| a == "--redis-url").unwrap();
    down[i + 1] = "redis://127.0.0.1:1".into();
    let v = ctl(&down, &["--json", "status"]).await.json();
    let redis = v["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == "redis").unwrap().clone();
    assert_eq!(redis["up"], false, "{v}");
    assert_eq!(v["topics"].as_array().unwrap().len(), product.len());
    assert!(v["scheduler"][0]["due"].is_null());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_stuck_lists_set_aside_rows_and_retry_puts_one_back_in_line_once() {
    let env = TestEnv::new().await;
    let flags = world(&env);
    // A row as the relay leaves it when Kafka refused it for good (outbox.rs, migration 0050).
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (topic, message_key, event_id, envelope, set_aside_at, last_error)
         VALUES ($1, 'k1', $2, '{}'::jsonb, now(), 'Broker: Message size too large') RETURNING id",
    )
    .bind(&env.topics().notification_request)
    .bind(Uuid::new_v4())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let st = ctl(&flags, &["--json", "outbox", "status"]).await.json();
    assert_eq!((st["setAside"].as_i64(), st["backlog"].as_i64()), (Some(1), Some(0)), "{st}");
    let stuck = ctl(&flags, &["--json", "outbox", "stuck"]).await.json();
    assert_eq!(stuck[0]["id"], id);
    assert_eq!(stuck[0]["lastError"], "Broker: Message size too large");

    let refused = ctl(&flags, &["outbox", "retry", &id.to_string()]).await;
    assert!(!refused.ok && refused.stderr.contains("--yes"), "{}", refused.stderr);
    let r = ctl(&flags, &["--yes", "--json", "outbox", "retry", &id.to_string()]).await.json();
    assert_eq!(r["id"], id);
    // Back in line at the end, under a new id (below the relay's floor the relay would look
    // for it only now and then); the event is the same one.
    let new_id = r["newId"].as_i64().unwrap_or_default();
    assert!(new_id > id, "{r}");
    let moved: bool = sqlx::query_scalar("SELECT set_aside_at IS NULL FROM outbox WHERE id = $1").bind(new_id).fetch_one(&env.pool).await.unwrap();
    assert!(moved, "the row is pending again");
    let st = ctl(&flags, &["--json", "outbox", "status"]).await.json();
    assert_eq!((st["setAside"].as_i64(), st["backlog"].as_i64()), (Some(0), Some(1)), "back in line: {st}");
    let again = ctl(&flags, &["--yes", "outbox", "retry", &id.to_string()]).await;
    assert!(!again.ok && again.stderr.contains("not set aside"), "{}", again.stderr);
    let audit: Vec<(String, String)> = sqlx::query_as("SELECT command, detail::text FROM ops_audit ORDER BY id").fetch_all(&env.pool).await.unwrap();
    assert_eq!(audit.len(), 1, "the retry that changed something, once: {audit:?}");
    assert!(audit[0].0.starts_with("outbox") && audit[0].1.contains(&id.to_string()), "{audit:?}");
}

/// Issue 16 with issue 12: `bookingctl queue` steers a live sale through the api's admin routes.
/// A paused queue admits nobody; resuming admits the waiting; `set` changes the batch; every
/// change is in the audit log with its before and after; a change without a token, or with
/// nothing to change, is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_pause_set_and_resume_steer_admission_and_are_audited() {
    let env = TestEnv::new().await;
    let api = env.api(Duration::from_secs(3600), QueueSettings::default()).await;
    let (schedule, _) = api.concert(2, 10).await;
    let mut flags = world(&env);
    flags.extend(["--api-url".to_string(), api.base.clone()]);
    let mut admin = flags.clone();
    admin.extend(["--admin-token".to_string(), common::ADMIN.to_string()]);

    let refused = ctl(&flags, &["queue", "pause", &schedule, "--yes"]).await;
    assert!(!refused.ok && refused.stderr.contains("--admin-token"), "{}", refused.stderr);
    let nothing = ctl(&admin, &["queue", "set", &schedule, "--yes"]).await;
    assert!(!nothing.ok && nothing.stderr.contains("nothing to change"), "{}", nothing.stderr);

    let paused = ctl(&admin, &["queue", "pause", &schedule, "--yes", "--json"]).await.json();
    assert_eq!(paused["paused"], true, "{paused}");
    let alice = api.user("alice").await;
    let entered = api.enter_queue(&alice, &schedule).await;
    let token = entered["queueToken"].as_str().unwrap().to_string();
    // An admission tick walks the queue with alice in it (its gauge says one waiting, set after
    // the tick's admission step) and leaves her waiting: nobody is admitted while paused.
    let waiting_line = format!("queue_waiting{{schedule=\"{schedule}\"}} 1");
    let metrics_url = api.metrics_url.clone().unwrap();
    eventually(Duration::from_secs(10), || async {
        let text = api.http.get(&metrics_url).send().await.unwrap().text().await.unwrap();
        text.lines().any(|l| l == waiting_line)
    })
    .await;
    assert_eq!(api.queue_status(&alice, &token).await["status"], "WAITING");
    let shown = ctl(&admin, &["queue", "show", &schedule, "--json"]).await.json();
    assert_eq!((shown["paused"].clone(), shown["waiting"].clone()), (Value::Bool(true), Value::from(1)), "{shown}");
    // `status` reads the same state from Redis, without the api or its token; the api's gauge
    // says paused too.
    let queue_in_status = |v: Value| v["queues"].as_array().unwrap().iter().find(|q| q["scheduleId"] == schedule.as_str()).cloned().unwrap_or_else(|| panic!("{v}"));
    let q = queue_in_status(ctl(&flags, &["status", "--json"]).await.json());
    assert_eq!((q["paused"].clone(), q["waiting"].clone(), q["active"].clone()), (Value::Bool(true), Value::from(1), Value::from(0)), "{q}");
    let gauge = |v: u8| format!("queue_admission_paused{{schedule=\"{schedule}\"}} {v}");
    let scrape = || async { api.http.get(&metrics_url).send().await.unwrap().text().await.unwrap() };
    assert!(scrape().await.lines().any(|l| l == gauge(1)), "{}", gauge(1));

    let set = ctl(&admin, &["queue", "set", &schedule, "--batch", "5", "--yes", "--json"]).await.json();
    assert_eq!(set["batch"], 5, "{set}");
    let resumed = ctl(&admin, &["queue", "resume", &schedule, "--yes", "--json"]).await.json();
    assert_eq!(resumed["paused"], false, "{resumed}");
    eventually(Duration::from_secs(10), || async { api.queue_status(&alice, &token).await["status"] == "ACTIVE" }).await;
    let q = queue_in_status(ctl(&flags, &["status", "--json"]).await.json());
    assert_eq!((q["paused"].clone(), q["waiting"].clone(), q["active"].clone()), (Value::Bool(false), Value::from(0), Value::from(1)), "{q}");
    assert!(scrape().await.lines().any(|l| l == gauge(0)), "{}", gauge(0));

    let audit: Vec<(String, Value)> = sqlx::query_as("SELECT command, detail FROM ops_audit ORDER BY id").fetch_all(&env.pool).await.unwrap();
    assert_eq!(audit.len(), 3, "pause, set, resume: {audit:?}");
    assert!(audit.iter().all(|(c, d)| c == "queue" && d["scheduleId"] == schedule.as_str()), "{audit:?}");
    assert_eq!(audit[1].1["change"]["batch"], 5);
    assert_eq!(audit[1].1["before"]["batch"], 1000, "the flag's batch before the change");
    api.stop().await;
}
