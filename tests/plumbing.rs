//! Kafka and PostgreSQL plumbing, and the daemons themselves (issue: foundation).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use booking::kafka::{consumer_config, ConsumerRunner, Envelope, EventType, HandleError, Handler, Incoming};
use common::TestEnv;
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

/// Records what it saw; fails transiently the first time it sees `flaky`, and calls anything
/// that is not an envelope poison.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Envelope<Value>>>,
    attempts_on_flaky: AtomicUsize,
}

impl Handler for Recorder {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = Envelope::<Value>::parse(&msg.payload, EventType::NotificationRequest).map_err(HandleError::Poison)?;
        if env.payload["flaky"] == true && self.attempts_on_flaky.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(HandleError::Transient("database down (simulated)".into()));
        }
        self.seen.lock().unwrap().push(env);
        Ok(())
    }
}

async fn run_for(env: &TestEnv, group: &str, handler: &Recorder, until: impl Fn(&Recorder) -> bool) {
    let topic = env.topics().notification_request.clone();
    let runner = ConsumerRunner::new(&consumer_config(&env.brokers, group), &[&topic], env.res.producer.clone(), "test").unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let watcher = async {
        common::eventually(Duration::from_secs(30), || async { until(handler) }).await;
        s.cancel();
    };
    tokio::join!(runner.run(handler, stop.clone()), watcher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_receives_what_the_producer_sent_retries_transient_failures_and_dead_letters_poison() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let send = |payload: String, key: &'static str| {
        let (p, t) = (env.res.producer.clone(), topic.clone());
        async move { p.send(FutureRecord::to(&t).key(key).payload(&payload).partition(0), Duration::from_secs(5)).await.unwrap() }
    };
    let first = Envelope::new(EventType::NotificationRequest, json!({"n": 1}));
    let flaky = Envelope::new(EventType::NotificationRequest, json!({"n": 2, "flaky": true}));
    let last = Envelope::new(EventType::NotificationRequest, json!({"n": 3}));
    send(serde_json::to_string(&first).unwrap(), "a").await;
    send(serde_json::to_string(&flaky).unwrap(), "a").await;
    send("this is not an envelope".into(), "a").await;
    send(serde_json::to_string(&last).unwrap(), "a").await;

    let group = format!("{}runner", env.prefix);
    let rec = Recorder::default();
    run_for(&env, &group, &rec, |r| r.seen.lock().unwrap().len() == 3).await;
    let seen = rec.seen.lock().unwrap().clone();
    assert_eq!(seen, vec![first, flaky, last.clone()], "envelopes intact and in order");
    assert_eq!(rec.attempts_on_flaky.load(Ordering::SeqCst), 2, "the transient failure was seen again");

    let dlq = env.read_topic(&format!("{topic}.dlq"), 1, Duration::from_secs(20)).await;
    assert_eq!(dlq.len(), 1);
    assert!(dlq[0].2.iter().any(|(k, v)| k == "dlq-reason" && v.contains("malformed")));

    // Offsets were committed only for handled messages: the same group resumes after them.
    let after = Envelope::new(EventType::NotificationRequest, json!({"n": 4}));
    send(serde_json::to_string(&after).unwrap(), "a").await;
    let rec2 = Recorder::default();
    run_for(&env, &group, &rec2, |r| !r.seen.lock().unwrap().is_empty()).await;
    assert_eq!(rec2.seen.lock().unwrap().clone(), vec![after]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_transient_retry_stores_no_offset() {
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let always = Envelope::new(EventType::NotificationRequest, json!({"flaky": true}));
    env.res.producer.send(FutureRecord::to(&topic).key("k").payload(&serde_json::to_string(&always).unwrap()).partition(1), Duration::from_secs(5)).await.unwrap();
    let group = format!("{}stop", env.prefix);
    // First member: fails once, and is stopped while waiting to retry.
    let rec = Recorder::default();
    let runner = ConsumerRunner::new(&consumer_config(&env.brokers, &group), &[&topic], env.res.producer.clone(), "test").unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let watcher = async {
        common::eventually(Duration::from_secs(30), || async { rec.attempts_on_flaky.load(Ordering::SeqCst) >= 1 }).await;
        s.cancel();
    };
    tokio::join!(runner.run(&rec, stop.clone()), watcher);
    assert!(rec.seen.lock().unwrap().is_empty());
    // The next member of the group gets the message again.
    let rec2 = Recorder::default();
    rec2.attempts_on_flaky.store(1, Ordering::SeqCst);
    run_for(&env, &group, &rec2, |r| !r.seen.lock().unwrap().is_empty()).await;
    assert_eq!(rec2.seen.lock().unwrap().clone(), vec![always]);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(bin: &str, args: &[String]) -> Child {
    Command::new(bin).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("binary starts")
}

async fn health(port: u16) -> Option<(u16, Value)> {
    let r = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/health")).timeout(Duration::from_secs(5)).send().await.ok()?;
    let s = r.status().as_u16();
    Some((s, r.json().await.ok()?))
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success();
    assert!(ok);
}

async fn exits_cleanly_within(mut child: Child, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not exit within {limit:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn daemon_args(env: &TestEnv, bin: &str, metrics_port: u16, redis_url: Option<&str>) -> Vec<String> {
    let mut args = env.common_args();
    if let Some(url) = redis_url {
        let i = args.iter().position(|a| a == "--redis-url").unwrap();
        args[i + 1] = url.to_string();
    }
    args.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{metrics_port}")]);
    match bin {
        "api" => args.extend(["--listen".into(), format!("127.0.0.1:{}", free_port()), "--queue-secret".into(), "s".into()]),
        "delay-scheduler" | "expirer" => args.extend(["--group".into(), format!("{}{bin}", env.prefix)]),
        "worker" => args.extend([
            "--group-prefix".into(), format!("{}w-", env.prefix),
            "--export-sink".into(), format!("file:{}/export-{}.jsonl", std::env::temp_dir().display(), env.prefix),
        ]),
        _ => {}
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_daemon_is_healthy_serves_metrics_and_exits_zero_on_sigterm() {
    let env = TestEnv::new().await;
    let bins = [
        ("api", env!("CARGO_BIN_EXE_api")),
        ("delay-scheduler", env!("CARGO_BIN_EXE_delay-scheduler")),
        ("expirer", env!("CARGO_BIN_EXE_expirer")),
        ("worker", env!("CARGO_BIN_EXE_worker")),
    ];
    for (name, path) in bins {
        let port = free_port();
        let child = spawn(path, &daemon_args(&env, name, port, None));
        common::eventually(Duration::from_secs(30), || async {
            matches!(health(port).await, Some((200, v)) if v["dependencies"]["postgres"]["status"] == "ok"
                && v["dependencies"]["redis"]["status"] == "ok" && v["dependencies"]["kafka"]["status"] == "ok")
        }).await;
        let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap();
        assert_eq!(metrics.status(), 200, "{name} /metrics");
        let text = metrics.text().await.unwrap();
        assert!(text.contains("dependency_up"), "{name} serves Prometheus text");
        sigterm(&child);
        exits_cleanly_within(child, Duration::from_secs(10)).await;
    }
}

/// An api process on its own public and operations ports, once its public `/health` says 200.
async fn healthy_api(env: &TestEnv) -> (Child, u16, u16) {
    let ops_port = free_port();
    let mut args = daemon_args(env, "api", ops_port, None);
    let public_port = free_port();
    let i = args.iter().position(|a| a == "--listen").unwrap();
    args[i + 1] = format!("127.0.0.1:{public_port}");
    let child = spawn(env!("CARGO_BIN_EXE_api"), &args);
    common::eventually(Duration::from_secs(30), || async { matches!(health(public_port).await, Some((200, _))) }).await;
    (child, public_port, ops_port)
}

/// A load balancer, or hundreds of clients opening connections at once, may ask `/health` far
/// more often than dependencies need asking. Each real check is a PostgreSQL query, a Redis PING
/// and a Kafka metadata request; on a broker with many topics the last one is heavy for both
/// sides (the profile of the seat fight, where 500 clients each asked `/health` once, showed the
/// api parsing cluster metadata and the broker busy answering it). A burst is answered from one
/// check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_health_probes_asks_the_dependencies_once() {
    let env = TestEnv::new().await;
    let (child, public_port, ops_port) = healthy_api(&env).await;
    let checks = || async {
        let text = reqwest::get(format!("http://127.0.0.1:{ops_port}/metrics")).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("health_checks_total ")).and_then(|v| v.trim().parse::<f64>().ok())
    };
    let before = checks().await.expect("the api counts its dependency checks: health_checks_total");
    let http = reqwest::Client::new();
    let answers = futures_util::future::join_all((0..300).map(|_| {
        let http = http.clone();
        async move { http.get(format!("http://127.0.0.1:{public_port}/health")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    }))
    .await;
    assert!(answers.iter().all(|s| *s == 200), "every probe answered 200: {answers:?}");
    let after = checks().await.unwrap();
    // One check answers the burst; a second may start if the burst outlives the answer's reuse
    // window, and the background probe may run once.
    assert!(after - before <= 5.0, "300 probes caused {} dependency checks", after - before);
    sigterm(&child);
    exits_cleanly_within(child, Duration::from_secs(10)).await;
}

/// Issue 15, item 12: the api's public listener answers `/health` (for load balancers) but not
/// `/metrics`, which only the operations address (`--metrics-addr`) serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_metrics_on_its_operations_address_only() {
    let env = TestEnv::new().await;
    let (child, public_port, ops_port) = healthy_api(&env).await;

    let public = reqwest::get(format!("http://127.0.0.1:{public_port}/metrics")).await.unwrap();
    assert_eq!(public.status(), 404, "no /metrics on the public listener");
    let body: Value = public.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NOT_FOUND", "{body}");
    let ops = reqwest::get(format!("http://127.0.0.1:{ops_port}/metrics")).await.unwrap();
    assert_eq!(ops.status(), 200);
    assert!(ops.text().await.unwrap().contains("http_requests_total"), "the api's series are on the operations address");
    sigterm(&child);
    exits_cleanly_within(child, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_503_naming_redis_while_redis_is_down_and_recovers() {
    let env = TestEnv::new().await;
    // A private Redis, so stopping it disturbs no other test.
    let redis_port = free_port();
    let dir = std::env::temp_dir().join(format!("redis-{}", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let start_redis = || {
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (installed by scripts/services.sh)")
    };
    let mut redis = start_redis();
    let url = format!("redis://127.0.0.1:{redis_port}");
    common::eventually(Duration::from_secs(10), || async { std::net::TcpStream::connect(("127.0.0.1", redis_port)).is_ok() }).await;
    let port = free_port();
    let child = spawn(env!("CARGO_BIN_EXE_delay-scheduler"), &daemon_args(&env, "delay-scheduler", port, Some(&url)));
    common::eventually(Duration::from_secs(30), || async { matches!(health(port).await, Some((200, _))) }).await;

    redis.kill().unwrap();
    redis.wait().unwrap();
    common::eventually(Duration::from_secs(20), || async {
        // The state only: the driver's error text stays in the log.
        matches!(health(port).await, Some((503, v)) if v["dependencies"]["redis"] == json!({"status": "down"}) && v["dependencies"]["postgres"]["status"] == "ok")
    }).await;

    // An outage of some seconds, longer than the client's first reconnect attempts. With the
    // redis crate's default backoff (1 s, then ×100, capped at 60 s) the process then hung on
    // Redis for up to a minute after Redis was back; now it is a reconnect delay of 1 to 2 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut redis = start_redis();
    common::eventually(Duration::from_secs(10), || async { matches!(health(port).await, Some((200, _))) }).await;
    sigterm(&child);
    exits_cleanly_within(child, Duration::from_secs(10)).await;
    redis.kill().unwrap();
    let _ = redis.wait();
}

/// What the members of one group handled, and by whom.
#[derive(Default)]
struct Shared {
    attempts_on_stuck: AtomicUsize,
    seen: Mutex<Vec<(&'static str, i32, Value)>>,
}

/// A member of the group: while `sick` (its own connection to a dependency is broken), it fails
/// transiently on the message marked `stuck`; it handles everything else.
struct Member {
    name: &'static str,
    sick: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shared: std::sync::Arc<Shared>,
}

impl Handler for Member {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = Envelope::<Value>::parse(&msg.payload, EventType::NotificationRequest).map_err(HandleError::Poison)?;
        if env.payload["stuck"] == true {
            self.shared.attempts_on_stuck.fetch_add(1, Ordering::SeqCst);
            if self.sick.load(Ordering::SeqCst) {
                return Err(HandleError::Transient("database down (simulated)".into()));
            }
        }
        self.shared.seen.lock().unwrap().push((self.name, msg.partition, env.payload));
        Ok(())
    }
}

/// A member retrying a transient failure still serves its group: another member joining gets its
/// share of the partitions at once and consumes them, instead of waiting up to
/// `max.poll.interval.ms` (5 min) for the stuck member to poll again; the stuck message is handled
/// by the healthy member if its partition moved there, else by the first once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_retrying_a_transient_failure_lets_a_joining_member_take_its_partitions() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let env = TestEnv::new().await;
    let topic = env.topics().notification_request.clone();
    let send = |payload: Value, partition: i32| {
        let (p, t) = (env.res.producer.clone(), topic.clone());
        let body = serde_json::to_string(&Envelope::new(EventType::NotificationRequest, payload)).unwrap();
        async move { p.send(FutureRecord::to(&t).key("k").payload(&body).partition(partition), Duration::from_secs(5)).await.unwrap() }
    };
    send(json!({"stuck": true}), 0).await;
    let group = format!("{}rebalance", env.prefix);
    let shared = Arc::new(Shared::default());
    let a_sick = Arc::new(AtomicBool::new(true));
    let stop = CancellationToken::new();

    // The first member owns every partition and retries the stuck message.
    let a = ConsumerRunner::new(&consumer_config(&env.brokers, &group), &[&topic], env.res.producer.clone(), "a").unwrap();
    let task_a = tokio::spawn({
        let (h, stop) = (Member { name: "a", sick: a_sick.clone(), shared: shared.clone() }, stop.clone());
        async move { a.run(&h, stop).await }
    });
    common::eventually(Duration::from_secs(30), || async { shared.attempts_on_stuck.load(Ordering::SeqCst) >= 2 }).await;

    // A healthy second member joins while the first is still retrying.
    let b = ConsumerRunner::new(&consumer_config(&env.brokers, &group), &[&topic], env.res.producer.clone(), "b").unwrap();
    let owned_by_b = b.assignment();
    let task_b = tokio::spawn({
        let (h, stop) = (Member { name: "b", sick: Arc::new(AtomicBool::new(false)), shared: shared.clone() }, stop.clone());
        async move { b.run(&h, stop).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while owned_by_b.borrow().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the joining member got no partition within 60 s: the group waited for the member stuck in its retry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What is sent to b's partitions now is handled by b, while a is still sick.
    let theirs: Vec<i32> = owned_by_b.borrow().iter().map(|(_, p)| *p).collect();
    println!("b owns partitions {theirs:?}");
    for p in &theirs {
        send(json!({"to": p}), *p).await;
    }
    common::eventually(Duration::from_secs(30), || async {
        let seen = shared.seen.lock().unwrap();
        theirs.iter().all(|p| seen.iter().any(|(who, at, v)| *who == "b" && at == p && v["to"] == *p))
    })
    .await;
    let stuck_by = |who: &str| shared.seen.lock().unwrap().iter().filter(|(w, at, v)| *w == who && *at == 0 && v["stuck"] == true).count();
    assert_eq!(stuck_by("a"), 0, "the sick member handled nothing stuck");
    if theirs.contains(&0) {
        assert_eq!(stuck_by("b"), 1, "the stuck message moved to the healthy member with its partition");
    }

    // The first member recovers: the stuck message is handled, by whichever member owns it.
    a_sick.store(false, Ordering::SeqCst);
    common::eventually(Duration::from_secs(30), || async { stuck_by("a") + stuck_by("b") >= 1 }).await;
    stop.cancel();
    task_a.await.unwrap();
    task_b.await.unwrap();
}

/// A request for `user` to store, with a fresh event id.
fn a_notification(user: uuid::Uuid) -> (uuid::Uuid, booking::notification::NotificationRequest) {
    (uuid::Uuid::new_v4(), booking::notification::NotificationRequest::new(booking::notification::Kind::QueueActivated, user, json!({})))
}

/// Another session holds the notification stream's row lock (what a concurrent store holds while
/// it writes) until the returned transaction ends.
async fn hold_the_notification_stream(env: &TestEnv) -> booking::db::Tx {
    let mut blocker = booking::db::begin(&env.pool).await.unwrap();
    sqlx::query("SELECT 1 FROM stream_heads WHERE stream = 'notification' FOR UPDATE").execute(&mut *blocker).await.unwrap();
    blocker
}

/// A transaction whose opening lock wait is abandoned (an HTTP client that hangs up, a timeout
/// around the call) must not go back to the pool still open. sqlx 0.8 returns it as is: the
/// session then holds the lock it was waiting for, idle in a transaction nothing will end, and
/// every other writer of the stream waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_transaction_start_leaves_no_lock_held_in_the_pool() {
    let env = TestEnv::new().await;
    let user = uuid::Uuid::new_v4();
    // One connection, so the abandoned one is the one the pool hands out next.
    let worker_pool = booking::db::connect(&env.db_url, 1).await.unwrap();
    let blocker = hold_the_notification_stream(&env).await;
    let abandoned = tokio::time::timeout(Duration::from_millis(300), booking::notification::store(&worker_pool, &[a_notification(user)])).await;
    assert!(abandoned.is_err(), "the store waited for the stream's lock");
    blocker.commit().await.unwrap();
    // The pool in use again for something that opens no transaction of its own (a read, the
    // announcement after a store), then another writer of the stream: it gets through.
    let listed = booking::notification::list_after(&worker_pool, user, 0, 10).await.unwrap();
    assert!(listed.is_empty(), "the abandoned store wrote nothing");
    let other = tokio::time::timeout(Duration::from_secs(10), booking::notification::store(&env.pool, &[a_notification(user)])).await;
    assert!(matches!(other, Ok(Ok(ref s)) if s.len() == 1), "another writer of the stream waited on a lock nobody releases: {other:?}");
    let stored = tokio::time::timeout(Duration::from_secs(10), booking::notification::store(&worker_pool, &[a_notification(user)])).await;
    assert!(matches!(stored, Ok(Ok(ref s)) if s.len() == 1), "the pool's next store: {stored:?}");
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = $1").bind(user).fetch_one(&env.pool).await.unwrap();
    assert_eq!(visible, 2, "both stores committed and are visible to other sessions");
}

/// A transaction whose opening statement fails (here PostgreSQL's `lock_timeout`, as an operator
/// may set on the role; a cancelled query does the same) must not go back to the pool inside the
/// aborted transaction: sqlx 0.8 does not end it, so every later statement on that connection
/// failed with "current transaction is aborted" for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transaction_start_does_not_poison_its_connection() {
    let env = TestEnv::new().await;
    let user = uuid::Uuid::new_v4();
    let impatient = format!("{}?options=-c%20lock_timeout%3D200", env.db_url);
    let worker_pool = booking::db::connect(&impatient, 1).await.unwrap();
    let blocker = hold_the_notification_stream(&env).await;
    let failed = booking::notification::store(&worker_pool, &[a_notification(user)]).await;
    let code = failed.as_ref().err().and_then(|e| e.as_database_error()).and_then(|e| e.code()).map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("55P03"), "the store gave up on the lock: {failed:?}");
    blocker.commit().await.unwrap();
    let stored = booking::notification::store(&worker_pool, &[a_notification(user)]).await;
    assert!(matches!(stored, Ok(ref s) if s.len() == 1), "the next store on the pool: {stored:?}");
    let balance: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = $1").bind(user).fetch_one(&worker_pool).await;
    assert_eq!(balance.ok(), Some(1), "a plain read on the pool works");
}

/// The pool checks a borrowed connection only if it sat idle (`db::connect`: a check on every
/// borrow was one more round trip per request under a spike). A connection the server ended
/// while it sat in the pool, as a restart of PostgreSQL or a proxy's idle timeout would, must
/// still not reach a caller: after a quiet moment the next statement runs on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ended_while_idle_in_the_pool_is_replaced_before_use() {
    let env = TestEnv::new().await;
    let pool = booking::db::connect(&env.db_url, 1).await.unwrap();
    let first: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool).await.unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(first).fetch_one(&env.pool).await.unwrap();
    assert!(ended, "the server ended the pooled connection");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let next: Result<i32, _> = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool).await;
    assert!(matches!(next, Ok(pid) if pid != first), "the next statement ran on a new connection: {next:?}");
}

/// The api's connections run the hold and the payment once when opened (`db::connect_warmed`,
/// `app::API_WARM`), so that a sale's first requests do not pay for their first run. The
/// warm-ups must run against the real schema (a broken one would only be logged, and every
/// connection would stay cold), stay prepared on the connection, and write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmed_connection_has_run_the_hold_and_the_payment_and_wrote_nothing() {
    let env = TestEnv::new().await;
    let mut conn = sqlx::PgConnection::connect(&env.db_url).await.unwrap();
    for (name, warm) in [("hold", booking::reservation::warm as booking::db::Warm), ("payment", booking::payment::warm)] {
        sqlx::Executor::execute(&mut conn, "BEGIN").await.unwrap();
        let ran = warm(&mut conn).await;
        assert!(ran.is_ok(), "the {name}'s warm-up ran: {ran:?}");
        sqlx::Executor::execute(&mut conn, "COMMIT").await.unwrap();
    }
    let pool = booking::db::connect_warmed(&env.db_url, 1, booking::app::API_WARM).await.unwrap();
    let prepared: Vec<String> = sqlx::query_scalar("SELECT statement FROM pg_prepared_statements").fetch_all(&pool).await.unwrap();
    assert!(prepared.iter().any(|s| s.contains("FROM hold_seat(")), "the hold's call is prepared on the pool's connection: {prepared:?}");
    assert!(prepared.iter().any(|s| s.contains("INSERT INTO payments")), "the payment's statement is prepared: {prepared:?}");
    let written: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM reservations) + (SELECT count(*) FROM payments) + (SELECT count(*) FROM outbox)
              + (SELECT count(*) FROM idempotency_keys) + (SELECT count(*) FROM point_ledger)",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(written, 0, "the warm-ups wrote nothing, even committed");
}
