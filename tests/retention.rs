//! Retention (issue 15, item 10): bookkeeping that would otherwise grow without bound is pruned
//! after its retention, in batches, and never what is still needed.

mod common;

use std::time::Duration;

use booking::queue::{EarlyOrder, Queue, QueueConfig};
use booking::retention::{Settings, Table};
use common::TestEnv;
use uuid::Uuid;

async fn count(env: &TestEnv, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&env.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_bookkeeping_rows_are_pruned_in_batches_and_recent_ones_stay() {
    let env = TestEnv::new().await;
    let pool = &env.pool;
    // Idempotency keys and processed events: 3 old, 1 recent each.
    let user = Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, name, token_hash) VALUES ($1, 'u', $2)").bind(user).bind(user.as_bytes().to_vec()).execute(pool).await.unwrap();
    for (i, age) in ["2 hours", "2 hours", "2 hours", "0 seconds"].iter().enumerate() {
        sqlx::query(&format!(
            "INSERT INTO idempotency_keys (user_id, scope, key, request_hash, status_code, response, created_at)
             VALUES ($1, 'payment', $2, '\\x00', 201, '{{}}', now() - interval '{age}')"
        ))
        .bind(user)
        .bind(format!("k{i}"))
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(&format!("INSERT INTO processed_events (consumer, event_id, created_at) VALUES ('export', $1, now() - interval '{age}')"))
            .bind(Uuid::new_v4())
            .execute(pool)
            .await
            .unwrap();
    }

    let hour = Duration::from_secs(3600);
    let s = Settings { idempotency_keys: hour, processed_events: hour, interval: hour, batch: 2 };
    let done = booking::retention::step(pool, &s).await.unwrap();
    assert_eq!(done, vec![(Table::IdempotencyKeys, 3), (Table::ProcessedEvents, 3)], "batches of 2 until a short one");
    assert_eq!(count(&env, "SELECT count(*) FROM idempotency_keys").await, 1);
    assert_eq!(count(&env, "SELECT count(*) FROM processed_events").await, 1);
    // A second step finds nothing more.
    let again = booking::retention::step(pool, &s).await.unwrap();
    assert!(again.iter().all(|(_, n)| *n == 0), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_queue_leaves_the_admission_walk_and_comes_back_with_its_next_entrant() {
    let env = TestEnv::new().await;
    let q = Queue::new(
        env.res.redis.clone(),
        env.keys().clone(),
        QueueConfig {
            tick: Duration::from_secs(3600),
            batch: 10,
            max_active: 10,
            idle: Duration::from_millis(300),
            active_limit: Duration::from_secs(900),
            early_order: EarlyOrder::Fifo,
            secret: "s".into(),
        },
    );
    let listed = || async {
        let mut conn = env.res.redis.clone();
        let m: Vec<String> = redis::cmd("SMEMBERS").arg(env.keys().queue_schedules()).query_async(&mut conn).await.unwrap();
        m
    };
    let (schedule, opened) = (Uuid::new_v4(), chrono::Utc::now() - chrono::Duration::minutes(1));
    q.enter(schedule, opened, Uuid::new_v4()).await.unwrap();
    assert_eq!(listed().await, vec![schedule.to_string()]);
    let admitted = q.tick(&env.pool, env.topics()).await.unwrap();
    assert_eq!(admitted.iter().map(|(_, a)| a.admitted).sum::<u64>(), 1);
    assert_eq!(listed().await, vec![schedule.to_string()], "someone is active: still walked");

    // The active place lapses (idle, no hold): nobody is left, so the queue leaves the walk.
    common::eventually(Duration::from_secs(10), || async {
        q.tick(&env.pool, env.topics()).await.unwrap();
        listed().await.is_empty()
    })
    .await;
    let a = q.admission(schedule).await.unwrap();
    assert_eq!((a.waiting, a.active), (0, 0));

    // The next entrant brings it back, and is admitted.
    q.enter(schedule, opened, Uuid::new_v4()).await.unwrap();
    assert_eq!(listed().await, vec![schedule.to_string()]);
    let admitted = q.tick(&env.pool, env.topics()).await.unwrap();
    assert_eq!(admitted, vec![(schedule, booking::queue::Admitted { paused: false, admitted: 1 })]);
}
