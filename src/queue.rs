//! The waiting queue (brief §5), one per schedule, in Redis.
//!
//! - Fair order: an entrant gets the next number of the schedule's counter and waits in a sorted
//!   set by that number; entering again returns the same place.
//! - Admission: every tick, up to `batch` users move from waiting to active, never more than
//!   `max_active` at once. Only the instance holding the admission lease runs ticks, so several
//!   api replicas still admit at most `batch` per tick. Every step is one Lua script with Redis
//!   `TIME` as the clock, so replicas never disagree about time.
//! - An active user lapses after `idle` without a request, and after paying.
//! - Tokens are `v1.<scheduleId>.<userId>.<hmac>`: bound to the user and the schedule, signed
//!   with the server secret, so they cannot be forged or used by someone else.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use crate::redis_conn::RedisConn;
use redis::Script;
use serde::Serialize;
use serde_json::json;
use sha2::Sha256;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::kafka::Topics;
use crate::notification::{self, Kind, NotificationRequest};

/// Queue settings (api flags).
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub tick: Duration,
    pub batch: u32,
    pub max_active: u32,
    pub idle: Duration,
    pub secret: String,
}

/// A user's place, as `POST /v1/queue/tokens` and `GET /v1/queue/tokens/me` show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Place {
    pub status: &'static str,
    pub position: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_until: Option<DateTime<Utc>>,
    pub retry_after_ms: u64,
}

const ENTER: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = redis.call('ZSCORE', KEYS[2], ARGV[1])
if a and tonumber(a) > now then return {1, 0, tonumber(a), 0} end
local r = redis.call('ZRANK', KEYS[1], ARGV[1])
if r then return {0, r + 1, 0, 0} end
if a then redis.call('ZREM', KEYS[2], ARGV[1]) end
local s = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], s, ARGV[1])
redis.call('SET', KEYS[4], ARGV[2])
return {0, redis.call('ZRANK', KEYS[1], ARGV[1]) + 1, 0, s}
"#;

// Reads a user's place. With ARGV[2] > 0 an active user's idle deadline is pushed back: booking
// is activity, asking for one's place is not (or polling would keep a place forever).
const TOUCH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = redis.call('ZSCORE', KEYS[2], ARGV[1])
if a and tonumber(a) > now then
  local idle = tonumber(ARGV[2])
  if idle > 0 then
    redis.call('ZADD', KEYS[2], now + idle, ARGV[1])
    return {1, 0, now + idle}
  end
  return {1, 0, tonumber(a)}
end
local r = redis.call('ZRANK', KEYS[1], ARGV[1])
if r then return {0, r + 1, 0} end
return {2, 0, 0}
"#;

const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local opens = tonumber(redis.call('GET', KEYS[3]) or '0')
if now < opens then return {} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local room = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[2])
local n = math.min(tonumber(ARGV[1]), room)
if n <= 0 then return {} end
local popped = redis.call('ZPOPMIN', KEYS[1], n)
local out = {}
for i = 1, #popped, 2 do
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), popped[i])
  table.insert(out, popped[i])
end
return out
"#;

// Takes or renews the admission lease if free or already ours.
const LEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

// KEYS of each script, built in one place so `keys::tests` can prove each set lies in one slot.
fn enter_keys(k: &Keys, schedule: Uuid) -> Vec<String> {
    vec![k.queue_waiting(schedule), k.queue_active(schedule), k.queue_seq(schedule), k.queue_opens(schedule)]
}
fn touch_keys(k: &Keys, schedule: Uuid) -> Vec<String> {
    vec![k.queue_waiting(schedule), k.queue_active(schedule)]
}
fn admit_keys(k: &Keys, schedule: Uuid) -> Vec<String> {
    vec![k.queue_waiting(schedule), k.queue_active(schedule), k.queue_opens(schedule)]
}

/// Every queue script with the keys it is given for `schedule` (for the one-slot test).
#[cfg(test)]
pub(crate) fn script_keys(k: &Keys, schedule: Uuid) -> Vec<(String, Vec<String>)> {
    vec![
        ("queue ENTER".into(), enter_keys(k, schedule)),
        ("queue TOUCH".into(), touch_keys(k, schedule)),
        ("queue ADMIT".into(), admit_keys(k, schedule)),
        ("queue LEASE".into(), vec![k.queue_admission_lock()]),
    ]
}

/// The waiting queue service.
#[derive(Clone)]
pub struct Queue {
    redis: RedisConn,
    keys: Keys,
    cfg: QueueConfig,
}

type HmacSha256 = Hmac<Sha256>;

impl Queue {
    pub fn new(redis: RedisConn, keys: Keys, cfg: QueueConfig) -> Self {
        Self { redis, keys, cfg }
    }

    fn sign(&self, schedule: Uuid, user: Uuid) -> String {
        let mut mac = HmacSha256::new_from_slice(self.cfg.secret.as_bytes()).expect("any key length");
        mac.update(format!("v1.{schedule}.{user}").as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// The token of `user` for `schedule`.
    pub fn token(&self, schedule: Uuid, user: Uuid) -> String {
        format!("v1.{schedule}.{user}.{}", self.sign(schedule, user))
    }

    /// Checks a token's signature and owner and returns its schedule.
    pub fn verify(&self, token: Option<&str>, user: Uuid) -> Result<Uuid> {
        let token = token.ok_or(Error::QueueTokenNotActive)?;
        let parts: Vec<&str> = token.split('.').collect();
        let [ver, sid, uid, sig] = parts.as_slice() else { return Err(Error::QueueTokenMismatch) };
        let (Ok(schedule), Ok(owner)) = (Uuid::parse_str(sid), Uuid::parse_str(uid)) else {
            return Err(Error::QueueTokenMismatch);
        };
        // Constant-time comparison of the signature through the MAC's own verifier.
        let mut mac = HmacSha256::new_from_slice(self.cfg.secret.as_bytes()).expect("any key length");
        mac.update(format!("v1.{schedule}.{owner}").as_bytes());
        let sig_ok = hex::decode(sig).map(|s| mac.verify_truncated_left(&s).is_ok()).unwrap_or(false);
        if *ver != "v1" || !sig_ok || sig.len() != 32 || owner != user {
            return Err(Error::QueueTokenMismatch);
        }
        Ok(schedule)
    }

    fn retry_after(&self, position: u64) -> u64 {
        let tick = self.cfg.tick.as_millis().max(1) as u64;
        let ticks_away = position.div_ceil(self.cfg.batch.max(1) as u64);
        (ticks_away * tick).clamp(tick.min(1000), 30_000)
    }

    /// Enters `user` in the queue of `schedule` (existing entrants keep their place). Returns the
    /// token, the place, and the arrival number when this call created the entry.
    pub async fn enter(&self, schedule: Uuid, opens_at: DateTime<Utc>, user: Uuid) -> Result<(String, Place, Option<u64>)> {
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("SADD").arg(self.keys.queue_schedules()).arg(schedule.to_string()).query_async(&mut conn).await?;
        let (state, pos, until, seq): (i64, u64, i64, u64) = Script::new(ENTER)
            .key(enter_keys(&self.keys, schedule))
            .arg(user.to_string())
            .arg(opens_at.timestamp_millis())
            .invoke_async(&mut conn)
            .await?;
        let place = self.place(state, pos, until);
        Ok((self.token(schedule, user), place, (seq > 0).then_some(seq)))
    }

    fn place(&self, state: i64, pos: u64, until: i64) -> Place {
        match state {
            1 => Place { status: "ACTIVE", position: 0, active_until: DateTime::from_timestamp_millis(until), retry_after_ms: 0 },
            0 => Place { status: "WAITING", position: pos, active_until: None, retry_after_ms: self.retry_after(pos) },
            _ => Place { status: "EXPIRED", position: 0, active_until: None, retry_after_ms: 0 },
        }
    }

    /// The place of `user` in `schedule`'s queue, without counting as activity.
    pub async fn place_of(&self, schedule: Uuid, user: Uuid) -> Result<Place> {
        self.read_place(schedule, user, 0).await
    }

    /// The place of `user` in `schedule`'s queue; an active user's idle timer restarts.
    pub async fn touch(&self, schedule: Uuid, user: Uuid) -> Result<Place> {
        self.read_place(schedule, user, self.cfg.idle.as_millis() as u64).await
    }

    async fn read_place(&self, schedule: Uuid, user: Uuid, idle_ms: u64) -> Result<Place> {
        let mut conn = self.redis.clone();
        let (state, pos, until): (i64, u64, i64) = Script::new(TOUCH)
            .key(touch_keys(&self.keys, schedule))
            .arg(user.to_string())
            .arg(idle_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(self.place(state, pos, until))
    }

    /// Requires an ACTIVE token for `schedule` (403 otherwise).
    pub async fn require_active(&self, token: Option<&str>, user: Uuid, schedule: Uuid) -> Result<()> {
        let token_schedule = self.verify(token, user)?;
        if token_schedule != schedule {
            return Err(Error::QueueTokenMismatch);
        }
        match self.touch(schedule, user).await?.status {
            "ACTIVE" => Ok(()),
            _ => Err(Error::QueueTokenNotActive),
        }
    }

    /// Frees the active place of `user` (after payment).
    pub async fn leave(&self, schedule: Uuid, user: Uuid) -> Result<()> {
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("ZREM").arg(self.keys.queue_active(schedule)).arg(user.to_string()).query_async(&mut conn).await?;
        Ok(())
    }

    /// Tries to take or keep the admission lease for `holder`.
    pub async fn acquire_lease(&self, holder: &str, lease: Duration) -> Result<bool> {
        let mut conn = self.redis.clone();
        let got: i64 = Script::new(LEASE)
            .key(self.keys.queue_admission_lock())
            .arg(holder)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(got == 1)
    }

    /// One admission tick over every schedule with a queue: returns `(schedule, admitted users)`.
    pub async fn admit_tick(&self) -> Result<Vec<(Uuid, Vec<Uuid>)>> {
        let mut conn = self.redis.clone();
        let schedules: Vec<String> = redis::cmd("SMEMBERS").arg(self.keys.queue_schedules()).query_async(&mut conn).await?;
        let mut out = Vec::new();
        for s in schedules {
            let Ok(schedule) = Uuid::parse_str(&s) else { continue };
            let admitted: Vec<String> = Script::new(ADMIT)
                .key(admit_keys(&self.keys, schedule))
                .arg(self.cfg.batch)
                .arg(self.cfg.max_active)
                .arg(self.cfg.idle.as_millis() as u64)
                .invoke_async(&mut conn)
                .await?;
            let (waiting, active): (u64, u64) = redis::pipe()
                .cmd("ZCARD").arg(self.keys.queue_waiting(schedule))
                .cmd("ZCARD").arg(self.keys.queue_active(schedule))
                .query_async(&mut conn)
                .await?;
            metrics::gauge!("queue_waiting", "schedule" => s.clone()).set(waiting as f64);
            metrics::gauge!("queue_active", "schedule" => s.clone()).set(active as f64);
            let users: Vec<Uuid> = admitted.iter().filter_map(|u| Uuid::parse_str(u).ok()).collect();
            metrics::counter!("queue_admitted_total").increment(users.len() as u64);
            if !users.is_empty() {
                out.push((schedule, users));
            }
        }
        Ok(out)
    }

    /// Runs admission ticks while holding the lease, until `shutdown`. Admitted users get a
    /// `QUEUE_ACTIVATED` notification through the outbox.
    pub async fn run_admission(self, pool: PgPool, topics: Topics, shutdown: CancellationToken) {
        let holder = Uuid::new_v4().to_string();
        let lease = (self.cfg.tick * 3).max(Duration::from_secs(1));
        let mut interval = tokio::time::interval(self.cfg.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = interval.tick() => {}
            }
            match self.acquire_lease(&holder, lease).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "admission lease failed");
                    continue;
                }
            }
            match self.admit_tick().await {
                Ok(batches) => {
                    for (schedule, users) in batches {
                        if let Err(e) = notify_activated(&pool, &topics, schedule, &users).await {
                            tracing::warn!(error = %e, "queue activation notifications failed");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "admission tick failed"),
            }
        }
    }
}

/// Writes `QUEUE_POSITION` for a new entrant.
pub async fn notify_position(pool: &PgPool, topics: &Topics, schedule: Uuid, user: Uuid, seq: u64, position: u64) -> Result<()> {
    let mut conn = pool.acquire().await?;
    let req = NotificationRequest::new(Kind::QueuePosition(position), user, json!({"scheduleId": schedule, "position": position}));
    let id = notification::event_id(Kind::QueuePosition(position), &format!("{schedule}:{user}:{seq}"));
    notification::enqueue(&mut conn, topics, id, req).await?;
    crate::outbox::committed();
    Ok(())
}

async fn notify_activated(pool: &PgPool, topics: &Topics, schedule: Uuid, users: &[Uuid]) -> Result<()> {
    let mut tx = pool.begin().await?;
    let stamp = Utc::now().timestamp_millis();
    for user in users {
        let req = NotificationRequest::new(Kind::QueueActivated, *user, json!({"scheduleId": schedule}));
        let id = notification::event_id(Kind::QueueActivated, &format!("{schedule}:{user}:{stamp}"));
        notification::enqueue(&mut tx, topics, id, req).await?;
    }
    tx.commit().await?;
    crate::outbox::committed();
    Ok(())
}
