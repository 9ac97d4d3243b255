//! Re-arming many HELD holds (issue 14): the batched re-arm of 100,000 holds, timed, and the shard
//! loops draining while it runs. It takes some 20 s, so `scripts/test.sh` runs it; the figures
//! it prints are those of `docs/bench/cluster.md`:
//!
//! ```sh
//! cargo test --test rearm -- --nocapture                   # on REDIS_URL / KAFKA_BROKERS
//! REARM_HOLDS=20000 cargo test --test rearm                # another size
//! ```
//!
//! Point `REDIS_URL` and `KAFKA_BROKERS` (and `TOPIC_REPLICATION_FACTOR=3`) at the cluster
//! topology to measure it there (`scripts/services.sh env --topology cluster`).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use booking::kafka::PARTITIONS;
use booking::reservation::ReservationEvent;
use booking::scheduler::{Scheduler, SchedulerConfig};
use chrono::Utc;
use common::TestEnv;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn due_members(env: &TestEnv) -> u64 {
    let mut conn = env.res.redis.clone();
    let mut n = 0;
    for shard in 0..PARTITIONS {
        let c: u64 = redis::cmd("ZCARD").arg(env.keys().sched_due(shard)).query_async(&mut conn).await.unwrap();
        n += c;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rearming_100000_holds_is_batched_and_draining_starts_at_once() {
    let n: i64 = std::env::var("REARM_HOLDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let env = TestEnv::new().await;
    let pool = &env.pool;
    let (user, concert, schedule) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    sqlx::query("INSERT INTO users (id, name, token_hash) VALUES ($1, 'rearm', $2)").bind(user).bind(user.as_bytes().to_vec()).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO concerts (id, title) VALUES ($1, 'rearm')").bind(concert).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO schedules (id, concert_id, starts_at, booking_opens_at, seat_count) VALUES ($1, $2, now() + interval '1 day', now(), $3)").bind(schedule).bind(concert).bind(n as i32).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO seats (id, schedule_id, seat_no, price) SELECT gen_random_uuid(), $1, g, 1000 FROM generate_series(1, $2) g").bind(schedule).bind(n as i32).execute(pool).await.unwrap();
    sqlx::query(
        "INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, expires_at)
         SELECT gen_random_uuid(), $1, s.id, s.schedule_id, 1000, 'HELD', now() + interval '1 hour' + s.seat_no * interval '1 millisecond'
         FROM seats s WHERE s.schedule_id = $2",
    )
    .bind(user)
    .bind(schedule)
    .execute(pool)
    .await
    .unwrap();

    let cfg = SchedulerConfig { batch_size: 500, lease: Duration::from_secs(30), poll_interval: Duration::from_secs(1), rearm_interval: Duration::from_secs(3600) };
    let scheduler = Arc::new(Scheduler::new(env.res.redis.clone(), env.keys().clone(), env.res.producer.clone(), env.topics().clone(), cfg));
    let all: BTreeSet<i32> = (0..PARTITIONS).collect();

    // 1. Into empty sets: every hold is added, a few hundred round trips in all.
    let t = Instant::now();
    let added = scheduler.rearm(pool, &all).await.unwrap();
    let first = t.elapsed();
    assert_eq!(added as i64, n, "every HELD hold re-armed");
    assert_eq!(due_members(&env).await as i64, n);
    // 2. Again (the periodic case): nothing changes.
    let t = Instant::now();
    assert_eq!(scheduler.rearm(pool, &all).await.unwrap(), 0, "NX: nothing added twice");
    let again = t.elapsed();

    // 3. Redis forgot everything; the member starts with the shards assigned: a hold already due
    // is published while the re-arm of the others still runs beside the shard loops.
    let mut conn = env.res.redis.clone();
    for shard in 0..PARTITIONS {
        let _: () = redis::cmd("DEL").arg(env.keys().sched_due(shard)).arg(env.keys().sched_payload(shard)).query_async(&mut conn).await.unwrap();
    }
    let due_now = ReservationEvent { reservation_id: Uuid::new_v4(), user_id: user, seat_id: Uuid::new_v4(), schedule_id: schedule, expires_at: Utc::now() - chrono::Duration::seconds(1) };
    let shard = booking::kafka::partition_for(&due_now.reservation_id.to_string(), PARTITIONS);
    scheduler.schedule(shard, &due_now).await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(BTreeSet::new());
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(scheduler.clone().run(pool.clone(), rx, shutdown.clone()));
    tx.send((0..PARTITIONS).map(|p| (env.topics().reservation_created.clone(), p)).collect()).unwrap();
    let got = env.read_topic(&env.topics().reservation_expiration, 1, Duration::from_secs(60)).await;
    let published = started.elapsed();
    let armed_then = due_members(&env).await;
    assert_eq!(got.len(), 1, "the due hold was published");
    common::eventually(Duration::from_secs(300), || async { due_members(&env).await as i64 == n }).await;
    let rearmed = started.elapsed();
    shutdown.cancel();
    let _ = run.await;

    println!("\n| re-arm of {n} HELD holds ({}) | time |\n| --- | --- |", if env.res.redis.is_cluster() { "Redis Cluster" } else { "one Redis" });
    println!("| into empty sets ({} pages of 3000, one script per shard per page) | {:.2} s ({:.0} holds/s) |", (n + 2999) / 3000, first.as_secs_f64(), n as f64 / first.as_secs_f64());
    println!("| again, nothing to add | {:.2} s |", again.as_secs_f64());
    println!("| after Redis forgot: first due hold published | {:.3} s (with {armed_then} of {n} re-armed by then) |", published.as_secs_f64());
    println!("| after Redis forgot: re-arm complete | {:.2} s |", rearmed.as_secs_f64());
}
