//! The production topology, really run (issue 14): three Kafka brokers (replication factor 3,
//! min.insync.replicas=2), a Redis Cluster of 3 masters + 3 replicas, and two processes of every
//! daemon (api, delay-scheduler, expirer, worker), one consumer group per role.
//!
//! A booking load (queue → hold → pay; hold → expire; cancel) runs while, in turn, the broker
//! leading the partitions of `reservation.expiration` is SIGKILLed and restarted, one Redis master
//! is SIGKILLed (its replica takes over by the cluster's own failover), and one of the two
//! delay-schedulers, expirers and apis is SIGKILLed for good. After each fault the load pauses and
//! every invariant of the chaos run must hold: no hold HELD past its expiry, no double sale or
//! payment, one notification per outcome, ranking and export exact, outbox empty, no dead letter.
//! The sweeper's grace is longer than the settling deadline, so the holds of a killed process's
//! partitions can only have been expired by the survivor.
//!
//! Needs the cluster topology: `scripts/test.sh` brings it up (`scripts/services.sh up --topology
//! cluster`) and exports `CLUSTER_REDIS_URL` and `CLUSTER_KAFKA_BROKERS`. Prints the figures of
//! `docs/bench/cluster.md` (expiry lateness per phase, failover times).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::load::{customer, dead_letters, invariants, percentiles, Client, Ops};
use common::daemon::{free_port, Daemon};
use common::TestEnv;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Longest a hold may stay HELD past its expiry once the load pauses (the check of the chaos run).
const OVERDUE: Duration = Duration::from_secs(6);
/// How long each fault gets to settle; shorter than the sweeper's grace (90 s), so the sweeper
/// cannot be what made the invariants hold.
const SETTLE: Duration = Duration::from_secs(60);

fn cluster_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run through scripts/test.sh, which brings up `scripts/services.sh up --topology cluster`"))
}


/// `scripts/services.sh --topology cluster ARGS…` of the checkout the test runs from (blocking;
/// run it off the async threads). Refused unless that script's cluster is the one this test's
/// daemons use (`CLUSTER_REDIS_URL`, `CLUSTER_KAFKA_BROKERS`): a fault must never hit another
/// checkout's services.
fn services(args: &[&str]) {
    let script = common::services::script();
    let out = Command::new("bash").arg(&script).args(["--topology", "cluster", "env"]).output().unwrap();
    let env = String::from_utf8_lossy(&out.stdout);
    for (name, ours) in [("REDIS_URL", cluster_var("CLUSTER_REDIS_URL")), ("KAFKA_BROKERS", cluster_var("CLUSTER_KAFKA_BROKERS"))] {
        let theirs = env.lines().find_map(|l| l.strip_prefix(&format!("export {name}="))).unwrap_or_default();
        assert_eq!(theirs, ours, "refusing to run {} {args:?}: it acts on another cluster", script.display());
    }
    // A broker restarted after SIGKILL recovers every partition it holds first: on a busy
    // machine that takes minutes, not seconds.
    let timeout = std::env::var("BOOKING_SERVICES_TIMEOUT").unwrap_or_else(|_| "300".into());
    let ok = Command::new("bash").arg(&script).arg("--topology").arg("cluster").args(args).env("BOOKING_SERVICES_TIMEOUT", timeout).stdout(Stdio::null()).status().unwrap().success();
    assert!(ok, "services.sh --topology cluster {args:?}");
}

async fn services_async(args: Vec<String>) {
    tokio::task::spawn_blocking(move || services(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
}

/// The broker leading most partitions of `topic`.
fn leader_of(brokers: &str, topic: &str) -> i32 {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut counts = std::collections::BTreeMap::<i32, usize>::new();
    for p in md.topics()[0].partitions() {
        *counts.entry(p.leader()).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(b, _)| b).unwrap()
}

/// The Redis port of the master serving `slot`, asked of any node that answers.
fn master_of(ports: &[u16], slot: u16) -> Option<u16> {
    for port in ports {
        let Ok(out) = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string(), "cluster", "nodes"]).output() else { continue };
        if !out.status.success() {
            continue;
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|r| {
                let mut it = r.split('-').map(|x| x.parse::<u16>());
                match (it.next(), it.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => a <= slot && slot <= b,
                    (Some(Ok(a)), None) => a == slot,
                    _ => false,
                }
            });
            if serves {
                return f[1].split('@').next()?.rsplit(':').next()?.parse().ok();
            }
        }
        return None;
    }
    None
}

/// Expiry lateness (seconds) of the holds due in [from, to) — optionally only those of `shards`.
async fn lateness(env: &TestEnv, from: DateTime<Utc>, to: DateTime<Utc>, shards: Option<&BTreeSet<i32>>) -> Vec<f64> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT id::text, EXTRACT(EPOCH FROM expired_at - expires_at)::float8 FROM reservations
         WHERE status = 'EXPIRED' AND expires_at >= $1 AND expires_at < $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter()
        .filter(|(id, _)| shards.is_none_or(|s| s.contains(&booking::kafka::partition_for(id, booking::kafka::PARTITIONS))))
        .map(|(_, l)| l)
        .collect()
}

/// The customers, started and stopped around each fault.
struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(customers: &[(Arc<Client>, String)], schedules: &Arc<Vec<String>>, ops: &Arc<Ops>) -> Self {
        let stop = CancellationToken::new();
        let tasks = customers.iter().map(|(c, t)| tokio::spawn(customer(c.clone(), t.clone(), schedules.clone(), ops.clone(), stop.clone()))).collect();
        Self { stop, tasks }
    }
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// One produce per 100 ms to a replicated probe topic, each ack's latency kept: what a producer
/// sees of a broker failover.
fn probe(producer: FutureProducer, topic: String, stop: CancellationToken) -> Arc<Mutex<Vec<(Instant, f64, bool)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let (p, t, s) = (producer.clone(), topic.clone(), seen.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let r = p.send(FutureRecord::to(&t).key("probe").payload("x"), Duration::from_secs(60)).await;
                s.lock().unwrap().push((sent, sent.elapsed().as_secs_f64(), r.is_ok()));
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    out
}

struct Phase {
    name: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    recovered: Option<Duration>,
    note: String,
    killed_shards: Option<BTreeSet<i32>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_topology_survives_a_broker_a_redis_master_and_one_of_each_daemon() {
    let redis_url = cluster_var("CLUSTER_REDIS_URL");
    let brokers = cluster_var("CLUSTER_KAFKA_BROKERS");
    let redis_ports: Vec<u16> = redis_url.trim_start_matches("redis+cluster://").split(',').filter_map(|n| n.rsplit(':').next()?.parse().ok()).collect();
    let env = TestEnv::on(redis_url.clone(), brokers.clone(), 3).await;
    assert!(env.res.redis.is_cluster(), "the daemons talk to the Redis Cluster");
    let dir = std::env::temp_dir().join(format!("cluster-{}", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("export.jsonl");

    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mk = |name: String, bin: &'static str, extra: Vec<String>| {
        let metrics_port = free_port();
        let mut args = env.common_args();
        args.extend(s(&["--replication-factor", "3", "--metrics-addr", &format!("127.0.0.1:{metrics_port}")]));
        args.extend(extra);
        Daemon::new(name, bin, args, metrics_port, &dir)
    };
    let api_ports = [free_port(), free_port()];
    let mut daemons: Vec<Daemon> = Vec::new();
    for (i, side) in ["a", "b"].iter().enumerate() {
        daemons.push(mk(format!("api-{side}"), env!("CARGO_BIN_EXE_api"), s(&["--listen", &format!("127.0.0.1:{}", api_ports[i]), "--hold-ttl", "3s", "--admin-token", "adm", "--queue-secret", "cluster", "--queue-tick", "100ms", "--queue-batch", "10000", "--queue-max-active", "100000", "--queue-idle-timeout", "120s"])));
        daemons.push(mk(format!("delay-scheduler-{side}"), env!("CARGO_BIN_EXE_delay-scheduler"), s(&["--group", &format!("{}sched", env.prefix), "--lease", "11s", "--rearm-interval", "30s"])));
        daemons.push(mk(format!("expirer-{side}"), env!("CARGO_BIN_EXE_expirer"), s(&["--group", &format!("{}exp", env.prefix), "--sweep-interval", "5s", "--sweep-grace", "90s"])));
        daemons.push(mk(format!("worker-{side}"), env!("CARGO_BIN_EXE_worker"), s(&["--group-prefix", &format!("{}w-", env.prefix), "--export-sink", &format!("file:{}", export.display()), "--ranking-reconcile-interval", "2s", "--delivery-poll-interval", "500ms"])));
    }
    let by_name = |daemons: &Vec<Daemon>, n: &str| daemons.iter().position(|d| d.name == n).unwrap();
    for d in daemons.iter_mut() {
        d.start();
    }
    for d in daemons.iter_mut() {
        d.healthy(Duration::from_secs(90)).await;
    }

    // Two clients, each preferring one api and moving to the other when it cannot reach it.
    let bases: Vec<String> = api_ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let clients = [Arc::new(Client::new(bases.clone())), Arc::new(Client::new(bases.iter().rev().cloned().collect()))];
    let admin = &clients[0];
    // A fresh sale for every phase: a phase lasts as long as its fault takes to heal (a broker
    // restarted on a busy machine may take a minute), and the load must never find the next
    // phase sold out. 16 × 100 seats outlast the longest phase seen (about 16 sold a second), and
    // six phases of 16 schedules stay within the 100 the ranking check can read back.
    let new_sale = |phase: &'static str| {
        let admin = admin.clone();
        async move {
            let body = json!({"title": format!("Cluster night: {phase}"), "schedules": (0..16).map(|_| json!({"startsAt": "2030-01-01T19:00:00Z", "bookingOpensAt": "2020-01-01T00:00:00Z", "seatCount": 100, "price": 1000})).collect::<Vec<_>>()});
            let (st, created) = admin.send_until_reached(|h, b| h.post(format!("{b}/v1/admin/concerts")).bearer_auth("adm").json(&body)).await;
            assert_eq!(st, 201, "{created}");
            Arc::new(created["schedules"].as_array().unwrap().iter().map(|s| s["scheduleId"].as_str().unwrap().to_string()).collect::<Vec<_>>())
        }
    };
    let new_customer = |i: usize| {
        let c = clients[i % 2].clone();
        async move {
            let (_, u) = c.send_until_reached(|h, b| h.post(format!("{b}/v1/users")).json(&json!({"name": format!("c{i}")}))).await;
            let token = u["token"].as_str().unwrap().to_string();
            let (st, _) = c.send_until_reached(|h, b| h.post(format!("{b}/v1/users/me/points/charges")).bearer_auth(&token).header("Idempotency-Key", "seed").json(&json!({"amount": 10_000_000}))).await;
            assert_eq!(st, 200);
            (c, token)
        }
    };
    let mut customers = Vec::new();
    for i in 0..16 {
        customers.push(new_customer(i).await);
    }
    let ops = Arc::new(Ops::default());

    // The producer's view of a broker failover: a probe topic with three replicas.
    let probe_topic = format!("{}probe", env.prefix);
    {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        admin.create_topics(&[NewTopic::new(&probe_topic, 3, TopicReplication::Fixed(3))], &AdminOptions::new()).await.unwrap();
    }
    let probe_stop = CancellationToken::new();
    let probes = probe(booking::kafka::producer(&brokers, "probe").unwrap(), probe_topic, probe_stop.clone());

    let mut phases: Vec<Phase> = Vec::new();
    // Per phase: its name, each check (what, passed, detail), and the dead letters it left.
    type PhaseVerdicts = (String, Vec<(&'static str, bool, String)>, usize);
    let mut verdicts_all: Vec<PhaseVerdicts> = Vec::new();
    let settle = |name: String| {
        let (env, client, export) = (&env, clients[1].clone(), export.clone());
        async move {
            let started = Instant::now();
            let deadline = started + SETTLE;
            let v = loop {
                let v = invariants(env, &client, &export, OVERDUE).await;
                if v.iter().all(|(_, ok, _)| *ok) || Instant::now() > deadline {
                    break v;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            (format!("{name} (settled in {:.0} s)", started.elapsed().as_secs_f64()), v, dead_letters(env).await)
        }
    };
    let lap = |secs: u64| tokio::time::sleep(Duration::from_secs(secs));
    let mut problems: Vec<String> = Vec::new();
    let test_started = Instant::now();

    // 0. No fault: the baseline.
    let from = Utc::now();
    let load = Load::start(&customers, &new_sale("no fault").await, &ops);
    lap(6).await;
    load.stop().await;
    phases.push(Phase { name: "no fault".into(), from, to: Utc::now(), recovered: None, note: String::new(), killed_shards: None });
    verdicts_all.push(settle("no fault".into()).await);

    // 1. Kafka: SIGKILL the broker leading the partitions of reservation.expiration; restart it.
    let topic = env.topics().reservation_expiration.clone();
    let b2 = brokers.clone();
    let leader = tokio::task::spawn_blocking(move || leader_of(&b2, &topic)).await.unwrap();
    let from = Utc::now();
    let load = Load::start(&customers, &new_sale("broker").await, &ops);
    lap(3).await;
    let killed_at = Instant::now();
    services_async(vec!["kill-kafka".into(), leader.to_string()]).await;
    lap(8).await;
    services_async(vec!["start-kafka".into(), leader.to_string()]).await;
    let restarted = killed_at.elapsed();
    lap(2).await;
    load.stop().await;
    let worst_ack = probes.lock().unwrap().iter().filter(|(at, _, _)| *at >= killed_at - Duration::from_secs(1)).map(|(_, l, _)| *l).fold(0.0, f64::max);
    let failed_acks = probes.lock().unwrap().iter().filter(|(at, _, ok)| *at >= killed_at && !ok).count();
    phases.push(Phase { name: format!("SIGKILL Kafka broker {leader} (leader of reservation.expiration), started again 8 s later"), from, to: Utc::now(), recovered: Some(restarted), note: format!("producer ack latency max {worst_ack:.2} s, {failed_acks} probe sends failed"), killed_shards: None });
    verdicts_all.push(settle("Kafka broker killed".into()).await);

    // 2. Redis: SIGKILL the master serving scheduler shard 0; the cluster promotes its replica.
    let slot = booking::keys::slot(&env.keys().sched_due(0));
    let master = master_of(&redis_ports, slot).expect("a master serves the shard's slot");
    let from = Utc::now();
    let load = Load::start(&customers, &new_sale("redis master").await, &ops);
    lap(3).await;
    let killed_at = Instant::now();
    services_async(vec!["kill-redis".into(), master.to_string()]).await;
    let rp = redis_ports.clone();
    let promoted = tokio::task::spawn_blocking(move || loop {
        match master_of(&rp, slot) {
            Some(p) if p != master => return (p, killed_at.elapsed()),
            _ if killed_at.elapsed() > Duration::from_secs(60) => panic!("no replica took over slot {slot}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    })
    .await
    .unwrap();
    // What the product's own client sees: the first write to that slot that succeeds.
    let mut conn = env.res.redis.clone();
    let written = loop {
        let r: redis::RedisResult<()> = redis::cmd("SET").arg(format!("{}probe", env.keys().sched_due(0))).arg(1).query_async(&mut conn).await;
        if r.is_ok() {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(60), "no write reached the promoted replica: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    lap(3).await;
    services_async(vec!["up".into()]).await; // the killed node comes back as a replica
    load.stop().await;
    phases.push(Phase { name: format!("SIGKILL Redis master :{master} (slot {slot}, scheduler shard 0)"), from, to: Utc::now(), recovered: Some(promoted.1), note: format!("replica :{} promoted after {:.1} s; first write through the client after {:.1} s", promoted.0, promoted.1.as_secs_f64(), written.as_secs_f64()), killed_shards: None });
    verdicts_all.push(settle("Redis master killed".into()).await);

    // 3-5. One of the two delay-schedulers, then expirers, then apis: SIGKILL, never restarted.
    for role in ["delay-scheduler", "expirer", "api"] {
        let (a, b) = (by_name(&daemons, &format!("{role}-a")), by_name(&daemons, &format!("{role}-b")));
        // The partitions (= scheduler shards, = expiration partitions: both follow partition_for
        // of the reservation id) the process about to die owns: both members share the group.
        let topic = match role {
            "delay-scheduler" => Some(env.topics().reservation_created.clone()),
            "expirer" => Some(env.topics().reservation_expiration.clone()),
            _ => None,
        };
        let killed_shards = match &topic {
            Some(t) => {
                let (da, db) = (&daemons[a], &daemons[b]);
                println!("waiting for both {role}s to own partitions of {t}");
                common::eventually(Duration::from_secs(60), || async move {
                    da.assigned(t, 0).is_some_and(|s| !s.is_empty()) && db.assigned(t, 0).is_some_and(|s| !s.is_empty())
                })
                .await;
                daemons[a].assigned(t, 0)
            }
            None => None,
        };
        let survivor_log = daemons[b].log_len();
        let schedules = new_sale(role).await;
        let from = Utc::now();
        let load = Load::start(&customers, &schedules, &ops);
        lap(3).await;
        let killed_at = Instant::now();
        daemons[a].kill9();
        let mut note = String::new();
        if let (Some(t), Some(want)) = (&topic, &killed_shards) {
            // The survivor is assigned the killed one's partitions (after the group's session
            // timeout) and drains them: the settle below needs every hold expired.
            let db = &daemons[b];
            println!("waiting for {role}-b to be assigned {want:?} of {t}");
            common::eventually(Duration::from_secs(60), || async move { db.assigned(t, survivor_log).is_some_and(|s| want.is_subset(&s)) }).await;
            note = format!("survivor assigned partitions {want:?} {:.1} s after the kill", killed_at.elapsed().as_secs_f64());
        }
        if role == "api" {
            // Admission goes on at the surviving api (it takes the lease): newcomers get ACTIVE.
            for i in 100..104 {
                let (c, token) = new_customer(i).await;
                let schedule = schedules[0].clone();
                common::eventually(Duration::from_secs(30), || {
                    let (c, token, schedule) = (c.clone(), token.clone(), schedule.clone());
                    async move {
                        matches!(c.send(|h, b| h.post(format!("{b}/v1/queue/tokens")).bearer_auth(&token).json(&json!({"scheduleId": schedule}))).await, Some((201, v)) if v["status"] == "ACTIVE")
                    }
                })
                .await;
            }
            note = format!("newcomers admitted by the surviving api within {:.1} s", killed_at.elapsed().as_secs_f64());
        }
        let holds_before = ops.holds.load(std::sync::atomic::Ordering::Relaxed);
        lap(12).await;
        let holds_after = ops.holds.load(std::sync::atomic::Ordering::Relaxed);
        if holds_after <= holds_before {
            problems.push(format!("no hold was taken in the 12 s after SIGKILL {role}-a"));
        }
        load.stop().await;
        phases.push(Phase { name: format!("SIGKILL one {role} (of two)"), from, to: Utc::now(), recovered: None, note, killed_shards });
        verdicts_all.push(settle(format!("{role} killed")).await);
    }
    probe_stop.cancel();

    println!("\ntest ran {:.0} s", test_started.elapsed().as_secs_f64());
    println!("\n| phase | expiries | lateness p50 | p99 | max | recovery | notes |\n| --- | --- | --- | --- | --- | --- | --- |");
    for p in &phases {
        // Holds taken in the phase expire up to one TTL (3 s) after it.
        let to = p.to + chrono::Duration::seconds(4);
        let mut l = lateness(&env, p.from, to, None).await;
        let n = l.len();
        let (p50, p99, max) = percentiles(&mut l);
        let rec = p.recovered.map(|d| format!("{:.1} s", d.as_secs_f64())).unwrap_or_default();
        println!("| {} ({:.0} s) | {n} | {:.0} ms | {:.0} ms | {:.0} ms | {rec} | {} |", p.name, (p.to - p.from).num_milliseconds() as f64 / 1e3, p50 * 1e3, p99 * 1e3, max * 1e3, p.note);
        if let Some(shards) = &p.killed_shards {
            let mut l = lateness(&env, p.from, to, Some(shards)).await;
            let n = l.len();
            let (p50, p99, max) = percentiles(&mut l);
            println!("| … holds of the killed process's partitions {shards:?} | {n} | {:.0} ms | {:.0} ms | {:.0} ms | | |", p50 * 1e3, p99 * 1e3, max * 1e3);
        }
    }
    println!("\n| operations | count |\n| --- | --- |");
    for (name, v) in ops.table() {
        println!("| {name} | {v} |");
    }
    println!("\n| after | invariant | held | detail |\n| --- | --- | --- | --- |");
    for (phase, verdicts, dlq) in &verdicts_all {
        for (name, ok, detail) in verdicts {
            println!("| {phase} | {name} | {} | {detail} |", if *ok { "yes" } else { "NO" });
        }
        println!("| {phase} | nothing in a dead-letter topic | {} | {dlq} messages |", if *dlq == 0 { "yes" } else { "NO" });
    }

    for d in daemons.iter_mut() {
        if let Some(c) = &d.child {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
    }
    for d in daemons.iter_mut() {
        if let Some(mut c) = d.child.take() {
            let _ = c.wait();
        }
    }
    // The brokers recover every partition they hold on a restart: leave none behind.
    {
        use rdkafka::admin::{AdminClient, AdminOptions};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let mut names: Vec<String> = env.topics().specs().into_iter().map(|(t, _)| t).collect();
        names.push(format!("{}probe", env.prefix));
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
    }
    let failed: Vec<_> = verdicts_all.iter().flat_map(|(p, v, dlq)| v.iter().filter(|(_, ok, _)| !ok).map(move |x| (p.clone(), x.clone())).chain((*dlq > 0).then(|| (p.clone(), ("dead letters", false, dlq.to_string()))))).collect();
    if !failed.is_empty() {
        print_logs(&daemons);
    }
    assert!(failed.is_empty(), "invariants broken: {failed:?}");
    assert!(problems.is_empty(), "{problems:?}");
    assert!(ops.payments.load(std::sync::atomic::Ordering::Relaxed) > 0 && ops.left_to_expire.load(std::sync::atomic::Ordering::Relaxed) > 0 && ops.cancels.load(std::sync::atomic::Ordering::Relaxed) > 0, "the load paid, cancelled and left holds to expire");
}

fn print_logs(daemons: &[Daemon]) {
    for d in daemons {
        let log = std::fs::read_to_string(Path::new(&d.log)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        println!("--- {} log (last lines) ---\n{}", d.name, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
}

/// Every Redis call of the queue, the operators' admission settings included, on the real Redis
/// Cluster: one slot per script is proven by `keys.rs`'s unit test, but a pipeline that mixes
/// slots is refused too (CROSSSLOT) and only a cluster shows it. `PATCH /v1/admin/schedules/{id}/queue`
/// once sent the schedule's settings and the walked set in one pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_and_its_admission_settings_run_on_redis_cluster() {
    use booking::keys::Keys;
    use booking::queue::{AdmissionChange, EarlyOrder, Queue, QueueConfig};
    use booking::redis_conn::RedisConn;
    use uuid::Uuid;

    let redis = RedisConn::connect(&cluster_var("CLUSTER_REDIS_URL")).await.unwrap();
    assert!(redis.is_cluster(), "CLUSTER_REDIS_URL names a Redis Cluster");
    let keys = Keys::new(format!("t{}:", Uuid::new_v4().simple()));
    let cfg = QueueConfig {
        tick: Duration::from_secs(3600),
        batch: 100,
        max_active: 100,
        idle: Duration::from_secs(300),
        active_limit: Duration::from_secs(900),
        early_order: EarlyOrder::Shuffle,
        secret: "cluster".into(),
    };
    let queue = Queue::new(redis, keys, cfg);
    let schedule = Uuid::new_v4();
    let opened = Utc::now() - chrono::Duration::hours(1);

    let paused = queue.set_admission(schedule, &AdmissionChange { paused: Some(true), batch: Some(2), max_active: None }).await.unwrap();
    assert!(paused.paused);
    assert_eq!(paused.batch, 2);
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        let (_, place) = queue.enter(schedule, opened, *u).await.unwrap();
        assert_eq!(place.status, "WAITING", "nobody is admitted while paused");
    }
    let step = queue.admit(schedule).await.unwrap();
    assert!(step.paused);
    assert_eq!(step.admitted, 0);

    let resumed = queue.set_admission(schedule, &AdmissionChange { paused: Some(false), batch: None, max_active: Some(50) }).await.unwrap();
    assert!(!resumed.paused);
    assert_eq!((resumed.batch, resumed.max_active, resumed.waiting), (2, 50, 5));
    assert_eq!(queue.admit(schedule).await.unwrap().admitted, 2, "the batch set by the operator");
    assert_eq!(queue.place_of(schedule, users[0]).await.unwrap().status, "ACTIVE");
    assert_eq!(queue.place_of(schedule, users[2]).await.unwrap().status, "WAITING");
    queue.touch(schedule, users[0]).await.unwrap();
    queue.leave(schedule, users[0]).await.unwrap();
    let view = queue.admission(schedule).await.unwrap();
    assert_eq!((view.waiting, view.active, view.admitted_total), (3, 1, 2));

    // The admission lease on the cluster: one api at a time runs the ticks.
    let lease = Duration::from_millis(800);
    assert!(queue.acquire_lease("api-a", lease).await.unwrap());
    assert!(!queue.acquire_lease("api-b", lease).await.unwrap(), "refused while api-a holds it");
    assert!(queue.acquire_lease("api-a", lease).await.unwrap(), "the holder renews");
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    assert!(queue.acquire_lease("api-b", lease).await.unwrap(), "taken over once it lapsed");
    assert!(!queue.acquire_lease("api-a", lease).await.unwrap(), "the old holder is refused");
}
