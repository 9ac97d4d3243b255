//! Ranking of schedules by confirmed seats (design document §2-2: moved out of the payment path).
//!
//! A Redis sorted set scheduleId -> confirmed seats, incremented by the worker's consumer of
//! `payment.completed` and decremented by its consumer of `payment.refunded`. Exactly once per
//! payment and per refund, even when a message is replayed: one Lua script adds the payment id to
//! a "counted" (or "refunded") set and changes the score only if it was not there. A seat counts
//! while its payment is counted and not refunded, whichever of the two messages comes first (they
//! travel on different topics, so their order is not guaranteed).
//!
//! The counted and refunded sets are sorted by time and pruned after [`Retention::remember`]
//! (longer than the topics' retention, so no replay can outlive its member); the worker
//! reconciles the ranking with PostgreSQL periodically (see [`reconcile`]).

use std::time::Duration;

use crate::redis_conn::{Lua, RedisConn};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Result;
use crate::keys::Keys;

// KEYS: ranking, counted, refunded (ZSETs payment id -> ms). ARGV: payment, schedule, paid at
// (ms). A payment refunded before it was counted is never counted.
static COUNT_ONCE: Lua = Lua::new(r#"
if redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[1]) == 1 then
  if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    redis.call('ZINCRBY', KEYS[1], 1, ARGV[2])
  end
  return 1
end
return 0
"#);

// KEYS: ranking, counted, refunded. ARGV: payment, schedule, refunded at (ms), paid at (ms, or -1
// when unknown), horizon (ms). Only a counted payment is taken off the score; one paid before the
// horizon was counted long ago and its member pruned (see `prune`), so it counts as counted.
static UNCOUNT_ONCE: Lua = Lua::new(r#"
if redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1]) == 1 then
  local paid = tonumber(ARGV[4])
  if redis.call('ZSCORE', KEYS[2], ARGV[1]) or (paid >= 0 and paid < tonumber(ARGV[5])) then
    -- A schedule with no seat sold left is dropped rather than listed with zero.
    if tonumber(redis.call('ZINCRBY', KEYS[1], -1, ARGV[2])) <= 0 then
      redis.call('ZREM', KEYS[1], ARGV[2])
    end
  end
  return 1
end
return 0
"#);

/// The keys of both scripts: ranking, counted, refunded.
fn count_once_keys(keys: &Keys) -> Vec<String> {
    vec![keys.ranking(), keys.ranking_counted(), keys.ranking_refunded()]
}

/// Every ranking script with its keys (for the one-slot test in `keys`).
#[cfg(test)]
pub(crate) fn script_keys(keys: &Keys) -> Vec<(String, Vec<String>)> {
    vec![("ranking COUNT_ONCE".into(), count_once_keys(keys)), ("ranking UNCOUNT_ONCE".into(), count_once_keys(keys))]
}

/// How long the ranking remembers which payments and refunds it applied (issue 15, item 10), and
/// how far back the periodic reconcile looks (item 11).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Members of the counted and refunded sets older than this are pruned. It must outlive the
    /// retention of `payment.completed` and `payment.refunded` (7 days): a message replayed after
    /// its member was pruned would count again.
    pub remember: Duration,
    /// The periodic reconcile re-applies every payment and refund of this last stretch of time.
    pub window: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { remember: Duration::from_secs(8 * 24 * 3600), window: Duration::from_secs(5 * 60) }
    }
}

impl Retention {
    /// Payments before this were counted long ago and may have left the counted set.
    fn horizon(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::from_std(self.remember).unwrap_or(chrono::Duration::MAX)
    }
}

/// Counts one confirmed seat for `schedule`; returns false if this payment was already counted.
pub async fn record(redis: &RedisConn, keys: &Keys, payment: Uuid, schedule: Uuid, paid_at: DateTime<Utc>) -> Result<bool, redis::RedisError> {
    Ok(record_many(redis, keys, &[(payment, schedule, paid_at)]).await? == 1)
}

/// Counts confirmed seats in one round trip per 500 (the consumer's batch, the reconcile): `(payment, schedule,
/// paid at)` each, every one once as [`record`] does; returns how many were not counted before.
pub async fn record_many(redis: &RedisConn, keys: &Keys, payments: &[(Uuid, Uuid, DateTime<Utc>)]) -> Result<usize, redis::RedisError> {
    let mut counted = 0;
    // One pipeline per 500, like the reconcile's (`reapply` says why EVAL and not EVALSHA).
    for chunk in payments.chunks(500) {
        let mut pipe = redis::pipe();
        for (payment, schedule, paid_at) in chunk {
            pipe.cmd("EVAL").arg(COUNT_ONCE.text()).arg(3).arg(count_once_keys(keys))
                .arg(payment.to_string()).arg(schedule.to_string()).arg(paid_at.timestamp_millis());
        }
        let done: Vec<i64> = pipe.query_async(&mut redis.clone()).await?;
        counted += done.iter().filter(|d| **d == 1).count();
    }
    Ok(counted)
}

/// Takes the seat of a refunded `payment` off `schedule`'s count; returns false if this refund
/// was already applied. `paid_at` comes with the refund message (older messages lack it: then
/// only a payment still in the counted set is taken off).
pub async fn unrecord(
    redis: &RedisConn,
    keys: &Keys,
    retention: &Retention,
    payment: Uuid,
    schedule: Uuid,
    refunded_at: DateTime<Utc>,
    paid_at: Option<DateTime<Utc>>,
) -> Result<bool, redis::RedisError> {
    let mut conn = redis.clone();
    let removed: i64 = UNCOUNT_ONCE.script()
        .key(count_once_keys(keys))
        .arg(payment.to_string())
        .arg(schedule.to_string())
        .arg(refunded_at.timestamp_millis())
        .arg(paid_at.map(|t| t.timestamp_millis()).unwrap_or(-1))
        .arg(retention.horizon(Utc::now()).timestamp_millis())
        .invoke_async(&mut conn)
        .await?;
    Ok(removed == 1)
}

/// What one reconcile did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// The ranking was missing (its `built` marker gone) and was rebuilt from PostgreSQL.
    pub rebuilt: bool,
    /// Payments and refunds the reconcile applied that Redis had not: increments lost with a
    /// partial loss (AOF `everysec`, a failover to a lagging replica), or a consumer running more
    /// than [`SETTLE`] behind.
    pub corrections: usize,
}

/// Payments younger than this are left to the consumer, which is normally that close behind.
pub const SETTLE: Duration = Duration::from_secs(30);

/// How far back a reconcile with the marker present looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The last [`Retention::window`]: a partial loss drops the last seconds of increments, and a
    /// running worker reconciles every few seconds.
    Window,
    /// Everything the ranking remembers ([`Retention::remember`]): a loss found only after the
    /// worker was down for longer than the window, or older than it for any reason. The worker
    /// does this at start and then every `--ranking-full-reconcile-interval`.
    Remembered,
}

/// Keeps the ranking equal to PostgreSQL, whatever the `built` marker says (issue 15, item 11).
///
/// - Marker missing (Redis lost the ranking): rebuilt. The ranking and the counted set are
///   deleted first (so a stale copy is never added to), then every payment of the retention is
///   counted once with the consumer's own script and older ones are added per schedule.
/// - Marker present: every payment and refund of the last `window` (but [`SETTLE`]), or of the
///   whole retention for [`Reach::Remembered`], is applied again with the count-once scripts. A
///   lost increment lost its counted member with it (the script's writes reach the AOF and the
///   replica together), so exactly the lost ones count again; each is a correction.
pub async fn reconcile(redis: &RedisConn, keys: &Keys, pool: &PgPool, retention: &Retention, reach: Reach) -> Result<Reconciled> {
    let mut conn = redis.clone();
    let built: bool = redis::cmd("EXISTS").arg(keys.ranking_built()).query_async(&mut conn).await?;
    let now = Utc::now();
    let horizon = retention.horizon(now);
    if !built {
        let _: () = redis::cmd("DEL").arg(keys.ranking()).arg(keys.ranking_counted()).query_async(&mut conn).await?;
        let mut out = Reconciled { rebuilt: true, corrections: 0 };
        out.corrections += reapply(redis, keys, pool, retention, horizon, now).await?;
        // Older payments: their messages are past Kafka's retention, so no replay can count them
        // again; they are added per schedule, without members.
        let old: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT r.schedule_id, count(*) FROM payments p JOIN reservations r ON r.id = p.reservation_id
             WHERE p.paid_at <= $1 AND r.status = 'CONFIRMED' GROUP BY r.schedule_id",
        )
        .bind(horizon)
        .fetch_all(pool)
        .await?;
        for (schedule, n) in old {
            let _: () = redis::cmd("ZINCRBY").arg(keys.ranking()).arg(n).arg(schedule.to_string()).query_async(&mut conn).await?;
        }
        let _: () = redis::cmd("SET").arg(keys.ranking_built()).arg(1).query_async(&mut conn).await?;
        return Ok(out);
    }
    let since = match reach {
        Reach::Window => (now - chrono::Duration::from_std(retention.window).unwrap_or(chrono::Duration::MAX)).max(horizon),
        Reach::Remembered => horizon,
    };
    let corrections = reapply(redis, keys, pool, retention, since, now - chrono::Duration::from_std(SETTLE).expect("small")).await?;
    Ok(Reconciled { rebuilt: false, corrections })
}

/// Applies again every refund, then every payment, of (`from`, `to`]: returns how many changed
/// Redis. Refunds first, so a refunded payment is never counted (the scripts allow either order).
async fn reapply(redis: &RedisConn, keys: &Keys, pool: &PgPool, retention: &Retention, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<usize> {
    let refunds: Vec<(Uuid, Uuid, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT p.id, r.schedule_id, p.paid_at, r.refunded_at FROM reservations r JOIN payments p ON p.reservation_id = r.id
         WHERE r.status = 'REFUNDED' AND r.refunded_at > $1 AND r.refunded_at <= $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let horizon = retention.horizon(Utc::now()).timestamp_millis();
    let mut changed = 0;
    // Pipelined, 500 scripts per round trip (every key is in the `{ranking}` slot, so a cluster
    // sends each pipeline to one node). EVAL with the script's text: Redis caches it by its
    // hash after the first call, and a pipeline cannot answer NOSCRIPT by loading it.
    for chunk in refunds.chunks(500) {
        let mut pipe = redis::pipe();
        for (payment, schedule, paid_at, refunded_at) in chunk {
            pipe.cmd("EVAL").arg(UNCOUNT_ONCE.text()).arg(3).arg(count_once_keys(keys))
                .arg(payment.to_string()).arg(schedule.to_string()).arg(refunded_at.timestamp_millis()).arg(paid_at.timestamp_millis()).arg(horizon);
        }
        let done: Vec<i64> = pipe.query_async(&mut redis.clone()).await?;
        changed += done.iter().filter(|d| **d == 1).count();
    }
    let payments: Vec<(Uuid, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT p.id, r.schedule_id, p.paid_at FROM payments p JOIN reservations r ON r.id = p.reservation_id
         WHERE p.paid_at > $1 AND p.paid_at <= $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    changed += record_many(redis, keys, &payments).await?;
    Ok(changed)
}

/// Forgets the payments and refunds older than the retention; returns how many members left.
pub async fn prune(redis: &RedisConn, keys: &Keys, retention: &Retention) -> Result<u64, redis::RedisError> {
    let mut conn = redis.clone();
    let horizon = retention.horizon(Utc::now()).timestamp_millis();
    let (a, b): (u64, u64) = redis::pipe()
        .cmd("ZREMRANGEBYSCORE").arg(keys.ranking_counted()).arg("-inf").arg(format!("({horizon}"))
        .cmd("ZREMRANGEBYSCORE").arg(keys.ranking_refunded()).arg("-inf").arg(format!("({horizon}"))
        .query_async(&mut conn)
        .await?;
    let (counted, refunded): (u64, u64) =
        redis::pipe().cmd("ZCARD").arg(keys.ranking_counted()).cmd("ZCARD").arg(keys.ranking_refunded()).query_async(&mut conn).await?;
    metrics::gauge!("ranking_remembered_payments", "set" => "counted").set(counted as f64);
    metrics::gauge!("ranking_remembered_payments", "set" => "refunded").set(refunded as f64);
    Ok(a + b)
}

/// One line of the ranking.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub schedule_id: Uuid,
    pub concert_title: String,
    pub sold_seats: i64,
    pub seat_count: i32,
}

/// The `limit` schedules with the most confirmed seats, most first.
pub async fn top(redis: &RedisConn, keys: &Keys, pool: &PgPool, limit: usize) -> Result<Vec<Entry>> {
    let mut conn = redis.clone();
    let raw: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
        .arg(keys.ranking())
        .arg(0)
        .arg(limit.saturating_sub(1))
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let ids: Vec<Uuid> = raw.iter().filter_map(|(s, _)| Uuid::parse_str(s).ok()).collect();
    let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT s.id, c.title, s.seat_count FROM schedules s JOIN concerts c ON c.id = s.concert_id
         WHERE s.id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(raw
        .into_iter()
        .filter_map(|(s, score)| {
            let id = Uuid::parse_str(&s).ok()?;
            let (_, title, seats) = rows.iter().find(|r| r.0 == id)?;
            Some(Entry { schedule_id: id, concert_title: title.clone(), sold_seats: score as i64, seat_count: *seats })
        })
        .collect())
}
