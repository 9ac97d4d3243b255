//! Ranking of schedules by confirmed seats (design document §2-2: moved out of the payment path).
//!
//! A Redis sorted set scheduleId -> confirmed seats, incremented by the worker's consumer of
//! `payment.completed` and decremented by its consumer of `payment.refunded`. Exactly once per
//! payment and per refund, even when a message is replayed: one Lua script adds the payment id to
//! a "counted" (or "refunded") set and changes the score only if it was not there. A seat counts
//! while its payment is counted and not refunded, whichever of the two messages comes first (they
//! travel on different topics, so their order is not guaranteed).

use crate::redis_conn::RedisConn;
use redis::Script;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Result;
use crate::keys::Keys;

// KEYS: ranking, counted, refunded. A payment refunded before it was counted is never counted.
const COUNT_ONCE: &str = r#"
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then
    redis.call('ZINCRBY', KEYS[1], 1, ARGV[2])
  end
  return 1
end
return 0
"#;

// KEYS: ranking, counted, refunded. Only a counted payment is taken off the score.
const UNCOUNT_ONCE: &str = r#"
if redis.call('SADD', KEYS[3], ARGV[1]) == 1 then
  if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
    -- A schedule with no seat sold left is dropped rather than listed with zero.
    if tonumber(redis.call('ZINCRBY', KEYS[1], -1, ARGV[2])) <= 0 then
      redis.call('ZREM', KEYS[1], ARGV[2])
    end
  end
  return 1
end
return 0
"#;

/// The keys of both scripts: ranking, counted, refunded.
fn count_once_keys(keys: &Keys) -> Vec<String> {
    vec![keys.ranking(), keys.ranking_counted(), keys.ranking_refunded()]
}

/// Every ranking script with its keys (for the one-slot test in `keys`).
#[cfg(test)]
pub(crate) fn script_keys(keys: &Keys) -> Vec<(String, Vec<String>)> {
    vec![("ranking COUNT_ONCE".into(), count_once_keys(keys)), ("ranking UNCOUNT_ONCE".into(), count_once_keys(keys))]
}

/// Counts one confirmed seat for `schedule`; returns false if this payment was already counted.
pub async fn record(redis: &RedisConn, keys: &Keys, payment: Uuid, schedule: Uuid) -> Result<bool, redis::RedisError> {
    let mut conn = redis.clone();
    let added: i64 = Script::new(COUNT_ONCE)
        .key(count_once_keys(keys))
        .arg(payment.to_string())
        .arg(schedule.to_string())
        .invoke_async(&mut conn)
        .await?;
    Ok(added == 1)
}

/// Takes the seat of a refunded `payment` off `schedule`'s count; returns false if this refund
/// was already applied.
pub async fn unrecord(redis: &RedisConn, keys: &Keys, payment: Uuid, schedule: Uuid) -> Result<bool, redis::RedisError> {
    let mut conn = redis.clone();
    let removed: i64 = Script::new(UNCOUNT_ONCE)
        .key(count_once_keys(keys))
        .arg(payment.to_string())
        .arg(schedule.to_string())
        .invoke_async(&mut conn)
        .await?;
    Ok(removed == 1)
}

/// Rebuilds the ranking from PostgreSQL if Redis lost it (the `built` marker is missing): every
/// confirmed payment is counted with the same count-once script the consumer uses, so payments
/// counted meanwhile by the consumer are not counted twice. Returns the payments newly counted,
/// or `None` when the ranking was intact.
pub async fn reconcile(redis: &RedisConn, keys: &Keys, pool: &PgPool) -> Result<Option<usize>> {
    let mut conn = redis.clone();
    let built: bool = redis::cmd("EXISTS").arg(keys.ranking_built()).query_async(&mut conn).await?;
    if built {
        return Ok(None);
    }
    let rows: Vec<(Uuid, Uuid, bool)> = sqlx::query_as(
        "SELECT p.id, r.schedule_id, r.status = 'REFUNDED' FROM payments p JOIN reservations r ON r.id = p.reservation_id",
    )
    .fetch_all(pool)
    .await?;
    let mut added = 0;
    for (payment, schedule, refunded) in rows {
        // A refund first, so the payment is never counted (the scripts allow either order).
        if refunded {
            unrecord(redis, keys, payment, schedule).await?;
        }
        if record(redis, keys, payment, schedule).await? {
            added += 1;
        }
    }
    let _: () = redis::cmd("SET").arg(keys.ranking_built()).arg(1).query_async(&mut conn).await?;
    Ok(Some(added))
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
