//! The waiting queue (brief §5, issue 12 "a fair sale"), one per schedule, in Redis.
//!
//! Rules, and where each is kept:
//! - Fair order: an entrant after opening gets the next number of the schedule's counter and
//!   waits in a sorted set by that number; entering again returns the same place ([`ENTER`]).
//! - Early arrivals (before `bookingOpensAt`) wait unordered (`position: null`). The first
//!   admission tick after opening draws their order once ([`ADMIT`], run only by the lease holder,
//!   so the draw happens in one place and every replica reads the same result from Redis):
//!   shuffled (`--queue-early-order shuffle`, the default) or by arrival (`fifo`). Drawn users get
//!   negative scores, so every early user comes before every later one.
//! - Admission: every tick, up to `batch` users move from waiting to active, never more than
//!   `maxActive` at once, nothing while `paused`. Operators change those three per schedule at run
//!   time (`PATCH /v1/admin/schedules/{id}/queue`): they live in Redis, in the schedule's admission
//!   hash, and the script reads them on every tick, so a change applies within one tick on every
//!   replica. Only the instance holding the admission lease runs ticks. Every step is one Lua
//!   script with Redis `TIME` as the clock, so replicas never disagree about time.
//! - An active place lapses `--queue-idle-timeout` after activation or after the last
//!   *successful* hold ([`Queue::touch`], called by the hold handler only after a 201), and in any
//!   case `--queue-active-limit` after activation (a hard deadline the idle extension never
//!   passes). Failed attempts do not extend it ([`Queue::active_schedule`] only reads), so a bot
//!   cannot camp in the active set. Paying frees the place at once. A lapsed user queues again.
//! - The queue's notifications cannot be lost (issue 15 item 4, issue 11): the script that
//!   changes the queue appends the notification to the schedule's pending-notifications list in
//!   the same atomic step: [`ENTER`] a new entrant's `QUEUE_POSITION`
//!   (`position:user:entry:position`), [`ADMIT`] an admitted user's `QUEUE_ACTIVATED`
//!   (`user:activation`). One list, so a user's position is always written before their
//!   activation. Every admission tick, [`Queue::drain_notifications`] writes them into the outbox
//!   and removes the items only after PostgreSQL committed. A PostgreSQL outage leaves them in
//!   Redis for the next tick; a crash between commit and removal re-drains them, and the event id
//!   derived from the item (schedule, user, entry or activation number) makes the second insert a
//!   no-op. The entering request therefore never waits for PostgreSQL: it used to write the
//!   position itself after the entry, and when that write failed the client's retry found the
//!   entry made and the notification was never written.
//! - Tokens are `v1.<scheduleId>.<userId>.<hmac>`: bound to the user and the schedule, signed
//!   with the server secret, so they cannot be forged or used by someone else.
//!
//! Every key of one script carries the schedule's `{hash tag}` (see `keys`), so each script runs
//! in one Redis Cluster slot.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use crate::redis_conn::{Lua, RedisConn};
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

/// How early arrivals are ordered when booking opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EarlyOrder {
    /// By arrival, like everyone after opening.
    Fifo,
    /// A random permutation, drawn once (arriving first before opening gains nothing).
    Shuffle,
}

/// Queue settings (api flags). `batch` and `max_active` are the defaults an operator can
/// override per schedule at run time.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub tick: Duration,
    pub batch: u32,
    pub max_active: u32,
    pub idle: Duration,
    /// An active place lapses this long after activation, whatever the user does.
    pub active_limit: Duration,
    pub early_order: EarlyOrder,
    pub secret: String,
}

/// A user's place, as `POST /v1/queue/tokens` and `GET /v1/queue/tokens/me` show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Place {
    pub status: &'static str,
    /// `null` for an early arrival whose order is not drawn yet.
    pub position: Option<u64>,
    /// When booking opens; shown to early arrivals only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_until: Option<DateTime<Utc>>,
    pub retry_after_ms: u64,
}

/// A schedule's admission as operators see and steer it (`/v1/admin/schedules/{id}/queue`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// Users waiting, early arrivals included.
    pub waiting: u64,
    /// Users allowed to book now.
    pub active: u64,
    pub paused: bool,
    /// Users admitted per tick.
    pub batch: u32,
    /// The admission tick, in milliseconds (the api's `--queue-tick`).
    pub tick: u64,
    pub max_active: u32,
    /// Users admitted since the queue began.
    pub admitted_total: u64,
}

/// A schedule's queue as Redis holds it, read by one script (one slot): what the admin view
/// shows, and what `bookingctl status` lists without going through an api.
pub struct Stored {
    /// Waiting, early arrivals included.
    pub waiting: u64,
    /// Active places not lapsed yet (by Redis's clock).
    pub active: u64,
    pub paused: bool,
    /// The operators' batch and maxActive; `None` where the api's flags apply.
    pub batch: Option<u32>,
    pub max_active: Option<u32>,
    pub admitted: u64,
}

/// Reads [`Stored`] for `schedule`.
pub async fn stored(redis: &RedisConn, keys: &Keys, schedule: Uuid) -> Result<Stored, redis::RedisError> {
    let (waiting, active, paused, batch, max_active, admitted): (u64, u64, i64, i64, i64, u64) =
        STATE.script().key(state_keys(keys, schedule)).invoke_async(&mut redis.clone()).await?;
    Ok(Stored { waiting, active, paused: paused == 1, batch: u32::try_from(batch).ok(), max_active: u32::try_from(max_active).ok(), admitted })
}

/// A change of a schedule's admission; absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct AdmissionChange {
    pub paused: Option<bool>,
    pub batch: Option<u32>,
    pub max_active: Option<u32>,
}

/// Schedules stepped at once by an admission tick.
const TICK_CONCURRENCY: usize = 8;

/// What one admission step did for one schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub paused: bool,
    pub admitted: u64,
}

// KEYS: waiting, active, seq, opens, early, active-limit, pending-notifications. ARGV: user,
// opens (ms). Returns {state, position, until-or-opens, new sequence}: state 1 active, 0 waiting,
// 3 early. A new waiting entry's QUEUE_POSITION is appended to the pending list here, in the same
// atomic step (an early arrival has no position until the draw, so nothing to announce yet).
static ENTER: Lua = Lua::new(r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = redis.call('ZSCORE', KEYS[2], ARGV[1])
if a and tonumber(a) > now then return {1, 0, tonumber(a), 0} end
local early = redis.call('ZCARD', KEYS[5])
local r = redis.call('ZRANK', KEYS[1], ARGV[1])
if r then return {0, early + r + 1, 0, 0} end
redis.call('SET', KEYS[4], ARGV[2])
local opens = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[5], ARGV[1]) then return {3, 0, opens, 0} end
if a then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
end
local s = redis.call('INCR', KEYS[3])
if now < opens then
  redis.call('ZADD', KEYS[5], s, ARGV[1])
  return {3, 0, opens, s}
end
redis.call('ZADD', KEYS[1], s, ARGV[1])
local pos = early + redis.call('ZRANK', KEYS[1], ARGV[1]) + 1
redis.call('RPUSH', KEYS[7], 'position:' .. ARGV[1] .. ':' .. s .. ':' .. pos)
return {0, pos, 0, s}
"#);

// Reads a user's place. With ARGV[2] > 0 an active user's idle deadline is pushed back, never
// past the hard deadline: a successful hold is activity; asking for one's place, or a failed
// attempt, is not (or polling would keep a place forever).
// KEYS: waiting, active, early, active-limit, opens. Returns {state, position, until-or-opens}.
static TOUCH: Lua = Lua::new(r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = redis.call('ZSCORE', KEYS[2], ARGV[1])
if a and tonumber(a) > now then
  local idle = tonumber(ARGV[2])
  if idle > 0 then
    local untl = now + idle
    local hard = redis.call('ZSCORE', KEYS[4], ARGV[1])
    if hard and tonumber(hard) < untl then untl = tonumber(hard) end
    redis.call('ZADD', KEYS[2], untl, ARGV[1])
    return {1, 0, untl}
  end
  return {1, 0, tonumber(a)}
end
local early = redis.call('ZCARD', KEYS[3])
local r = redis.call('ZRANK', KEYS[1], ARGV[1])
if r then return {0, early + r + 1, 0} end
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return {3, 0, tonumber(redis.call('GET', KEYS[5]) or '0')}
end
return {2, 0, 0}
"#);

// One admission step for one schedule.
// KEYS: waiting, active, opens, early, active-limit, admission, pending-notifications.
// ARGV: batch, max active (flag defaults), idle ms, active limit ms, shuffle (1/0), seed.
// Returns {paused, admitted}.
static ADMIT: Lua = Lua::new(r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local opens = tonumber(redis.call('GET', KEYS[3]) or '0')
if now < opens then return {0, 0} end
-- The one draw of the early arrivals' order: here, by the lease holder, once (the early set is
-- deleted with it). Scores -n..-1 put all of them before every later arrival (scores >= 1).
local early = redis.call('ZRANGE', KEYS[4], 0, -1)
if #early > 0 then
  if ARGV[5] == '1' then
    math.randomseed(tonumber(ARGV[6]))
    for i = #early, 2, -1 do
      local j = math.random(i)
      early[i], early[j] = early[j], early[i]
    end
  end
  local n = #early
  for i = 1, n do redis.call('ZADD', KEYS[1], i - n - 1, early[i]) end
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[6], 'drawn', now)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local cfg = redis.call('HMGET', KEYS[6], 'paused', 'batch', 'maxActive')
if cfg[1] == '1' then return {1, 0} end
local batch = tonumber(cfg[2] or ARGV[1])
local maxa = tonumber(cfg[3] or ARGV[2])
local n = math.min(batch, maxa - redis.call('ZCARD', KEYS[2]))
if n <= 0 then return {0, 0} end
local popped = redis.call('ZPOPMIN', KEYS[1], n)
local idle, lim = tonumber(ARGV[3]), tonumber(ARGV[4])
local first = math.min(idle, lim)
local count = 0
for i = 1, #popped, 2 do
  local u = popped[i]
  redis.call('ZADD', KEYS[2], now + first, u)
  redis.call('ZADD', KEYS[5], now + lim, u)
  local k = redis.call('HINCRBY', KEYS[6], 'admitted', 1)
  redis.call('RPUSH', KEYS[7], u .. ':' .. k)
  count = count + 1
end
return {0, count}
"#);

// A schedule's admission state, counted by Redis's clock.
// KEYS: waiting, active, early, admission. Returns {waiting, active, paused, batch, maxActive, admitted}
// (batch and maxActive -1 when the flags apply).
static STATE: Lua = Lua::new(r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cfg = redis.call('HMGET', KEYS[4], 'paused', 'batch', 'maxActive', 'admitted')
return {
  redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[3]),
  redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf'),
  cfg[1] == '1' and 1 or 0,
  tonumber(cfg[2] or '-1'),
  tonumber(cfg[3] or '-1'),
  tonumber(cfg[4] or '0'),
}
"#);

// Takes or renews the admission lease if free or already ours.
static LEASE: Lua = Lua::new(r#"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#);

// KEYS of each script, built in one place so `keys::tests` can prove each set lies in one slot.
fn enter_keys(k: &Keys, schedule: Uuid) -> Vec<String> {
    vec![
        k.queue_waiting(schedule),
        k.queue_active(schedule),
        k.queue_seq(schedule),
        k.queue_opens(schedule),
        k.queue_early(schedule),
        k.queue_active_limit(schedule),
        k.queue_pending_notifications(schedule),
    ]
}
fn touch_keys(k: &Keys, schedule: Uuid) -> Vec<String> {
    vec![k.queue_waiting(schedule), k.queue_active(schedule), k.queue_early(schedule), k.queue_active_limit(schedule), k.queue_opens(schedule)]
}
fn admit_keys(k: &Keys, schedule: Uuid) -> Vec<String> {
    vec![
        k.queue_waiting(schedule),
        k.queue_active(schedule),
        k.queue_opens(schedule),
        k.queue_early(schedule),
        k.queue_active_limit(schedule),
        k.queue_admission(schedule),
        k.queue_pending_notifications(schedule),
    ]
}
fn state_keys(k: &Keys, schedule: Uuid) -> Vec<String> {
    vec![k.queue_waiting(schedule), k.queue_active(schedule), k.queue_early(schedule), k.queue_admission(schedule)]
}

/// Every queue script with the keys it is given for `schedule` (for the one-slot test).
#[cfg(test)]
pub(crate) fn script_keys(k: &Keys, schedule: Uuid) -> Vec<(String, Vec<String>)> {
    vec![
        ("queue ENTER".into(), enter_keys(k, schedule)),
        ("queue TOUCH".into(), touch_keys(k, schedule)),
        ("queue ADMIT".into(), admit_keys(k, schedule)),
        ("queue STATE".into(), state_keys(k, schedule)),
        ("queue LEASE".into(), vec![k.queue_admission_lock()]),
    ]
}

/// Most pending notifications written to PostgreSQL in one transaction.
const DRAIN_BATCH: isize = 500;

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
    /// token and the place. A new entrant's `QUEUE_POSITION` is left pending by the script and
    /// written by the admission tick.
    pub async fn enter(&self, schedule: Uuid, opens_at: DateTime<Utc>, user: Uuid) -> Result<(String, Place)> {
        let mut conn = self.redis.clone();
        let (state, pos, until, seq): (i64, u64, i64, u64) = ENTER.script()
            .key(enter_keys(&self.keys, schedule))
            .arg(user.to_string())
            .arg(opens_at.timestamp_millis())
            .invoke_async(&mut conn)
            .await?;
        // Listed after the entry exists, never before: see `forget_if_idle`.
        let _: () = redis::cmd("SADD").arg(self.keys.queue_schedules()).arg(schedule.to_string()).query_async(&mut conn).await?;
        let place = self.place(state, pos, until);
        // A new entry with a place (an early arrival has none until the draw).
        if seq > 0 && place.position.is_some() {
            metrics::counter!("queue_entries_total").increment(1);
        }
        Ok((self.token(schedule, user), place))
    }

    fn place(&self, state: i64, pos: u64, until: i64) -> Place {
        let base = Place { status: "WAITING", position: None, opens_at: None, active_until: None, retry_after_ms: 0 };
        match state {
            1 => Place { status: "ACTIVE", position: Some(0), active_until: DateTime::from_timestamp_millis(until), ..base },
            0 => Place { position: Some(pos), retry_after_ms: self.retry_after(pos), ..base },
            3 => {
                // Early: ask again around the opening, or after a tick once it has passed.
                let tick = self.cfg.tick.as_millis().max(1) as u64;
                let to_open = (until - Utc::now().timestamp_millis()).max(0) as u64;
                Place { opens_at: DateTime::from_timestamp_millis(until), retry_after_ms: to_open.clamp(tick.min(1000), 30_000), ..base }
            }
            _ => Place { status: "EXPIRED", position: Some(0), ..base },
        }
    }

    /// The place of `user` in `schedule`'s queue, without counting as activity.
    pub async fn place_of(&self, schedule: Uuid, user: Uuid) -> Result<Place> {
        self.read_place(schedule, user, 0).await
    }

    /// Records a successful hold: an active user's idle timer restarts (never past the place's
    /// hard deadline). Returns the place.
    pub async fn touch(&self, schedule: Uuid, user: Uuid) -> Result<Place> {
        self.read_place(schedule, user, self.cfg.idle.as_millis() as u64).await
    }

    async fn read_place(&self, schedule: Uuid, user: Uuid, idle_ms: u64) -> Result<Place> {
        let mut conn = self.redis.clone();
        let (state, pos, until): (i64, u64, i64) = TOUCH.script()
            .key(touch_keys(&self.keys, schedule))
            .arg(user.to_string())
            .arg(idle_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(self.place(state, pos, until))
    }

    /// Requires an ACTIVE token (403 otherwise) and returns the schedule it is for: a hold checks
    /// that its seat is in that schedule (`QUEUE_TOKEN_MISMATCH` otherwise). The schedule comes
    /// from the signed token, so this needs no database read and a hold asks Redis before it
    /// borrows a database connection, never while it holds one.
    pub async fn active_schedule(&self, token: Option<&str>, user: Uuid) -> Result<Uuid> {
        let schedule = self.verify(token, user)?;
        // Only reads: a failed attempt must not keep the place alive (issue 12).
        match self.place_of(schedule, user).await?.status {
            "ACTIVE" => Ok(schedule),
            _ => Err(Error::QueueTokenNotActive),
        }
    }

    /// Frees the active place of `user` (after payment).
    pub async fn leave(&self, schedule: Uuid, user: Uuid) -> Result<()> {
        let mut conn = self.redis.clone();
        let _: () = redis::pipe()
            .cmd("ZREM").arg(self.keys.queue_active(schedule)).arg(user.to_string()).ignore()
            .cmd("ZREM").arg(self.keys.queue_active_limit(schedule)).arg(user.to_string()).ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Tries to take or keep the admission lease for `holder`.
    pub async fn acquire_lease(&self, holder: &str, lease: Duration) -> Result<bool> {
        let mut conn = self.redis.clone();
        let got: i64 = LEASE.script()
            .key(self.keys.queue_admission_lock())
            .arg(holder)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(got == 1)
    }

    /// One admission step for `schedule` (Redis only): the early draw if due, lapsed places
    /// removed, then up to `batch` users admitted and their `QUEUE_ACTIVATED` recorded as pending.
    pub async fn admit(&self, schedule: Uuid) -> Result<Admitted> {
        let mut conn = self.redis.clone();
        let seed = u32::from_le_bytes(Uuid::new_v4().as_bytes()[..4].try_into().expect("4 bytes"));
        let (paused, admitted): (i64, u64) = ADMIT.script()
            .key(admit_keys(&self.keys, schedule))
            .arg(self.cfg.batch)
            .arg(self.cfg.max_active)
            .arg(self.cfg.idle.as_millis() as u64)
            .arg(self.cfg.active_limit.as_millis() as u64)
            .arg(if self.cfg.early_order == EarlyOrder::Shuffle { 1 } else { 0 })
            .arg(seed)
            .invoke_async(&mut conn)
            .await?;
        Ok(Admitted { paused: paused == 1, admitted })
    }

    /// Writes `schedule`'s pending queue notifications (see [`Keys::queue_pending_notifications`])
    /// into the outbox, in their order, then removes exactly those items from Redis. Returns how
    /// many were written.
    pub async fn drain_notifications(&self, pool: &PgPool, topics: &Topics, schedule: Uuid) -> Result<usize> {
        let mut conn = self.redis.clone();
        let key = self.keys.queue_pending_notifications(schedule);
        let items: Vec<String> = redis::cmd("LRANGE").arg(&key).arg(0).arg(DRAIN_BATCH - 1).query_async(&mut conn).await?;
        if items.is_empty() {
            return Ok(0);
        }
        let mut rows = Vec::with_capacity(items.len());
        for item in &items {
            // Each item is unique (an entry number or an activation number), and its event id is
            // derived from it: a re-drain after a crash between the commit and the removal below
            // yields the same id, which the worker ignores (and the outbox too, while the first
            // row is unsent).
            match pending_notification(schedule, item) {
                Some((id, req)) => rows.push(notification::outbox_row(topics, id, req)),
                None => tracing::warn!(item, "dropping a malformed pending queue notification"),
            }
        }
        let written = rows.len();
        // One statement, committed on its own.
        let mut db = pool.acquire().await?;
        crate::outbox::enqueue_many(&mut db, &rows).await?;
        crate::outbox::committed();
        // Removed one by one, by value: another drainer (a lease that changed hands) may have
        // removed some already, and a position-based trim could drop entries not yet written.
        let mut pipe = redis::pipe();
        for item in &items {
            pipe.cmd("LREM").arg(&key).arg(1).arg(item).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(written)
    }

    /// One admission tick over every schedule with a queue. A failure for one schedule (Redis
    /// or PostgreSQL) is logged and does not stop the others; what was admitted stays pending in
    /// Redis until its notification is committed. Returns what each schedule's step did.
    pub async fn tick(&self, pool: &PgPool, topics: &Topics) -> Result<Vec<(Uuid, Admitted)>> {
        use futures_util::StreamExt;
        let mut conn = self.redis.clone();
        let schedules: Vec<String> = redis::cmd("SMEMBERS").arg(self.keys.queue_schedules()).query_async(&mut conn).await?;
        // The schedules are independent (each one's keys share a slot of their own), so their
        // steps run side by side, a bounded number at once (bounded: a step may write to
        // PostgreSQL, and the requests need the pool too). Walked one after another, each step's
        // few round trips made a tick of 300 schedules last 224 ms on one Redis and 261 ms on the
        // cluster (a quiet machine), longer than the tick itself; 8 at once: 52 and 71 ms.
        let steps = futures_util::stream::iter(schedules).map(|s| self.step_schedule(pool, topics, s)).buffer_unordered(TICK_CONCURRENCY);
        let out: Vec<(Uuid, Admitted)> = steps.filter_map(|step| async move { step }).collect().await;
        let listed: u64 = redis::cmd("SCARD").arg(self.keys.queue_schedules()).query_async(&mut conn).await?;
        metrics::gauge!("queue_schedules").set(listed as f64);
        Ok(out)
    }

    /// Waiting, active, early and pending-activation entries of `schedule`'s queue.
    async fn sizes(&self, schedule: Uuid) -> Result<[u64; 4]> {
        let mut conn = self.redis.clone();
        let (w, a, e, p): (u64, u64, u64, u64) = redis::pipe()
            .cmd("ZCARD").arg(self.keys.queue_waiting(schedule))
            .cmd("ZCARD").arg(self.keys.queue_active(schedule))
            .cmd("ZCARD").arg(self.keys.queue_early(schedule))
            .cmd("LLEN").arg(self.keys.queue_pending_notifications(schedule))
            .query_async(&mut conn)
            .await?;
        Ok([w, a, e, p])
    }

    /// One schedule's part of a tick: its admission step, its pending notifications written, its
    /// gauges, and its removal from the walk once idle. Failures are logged, not returned: one
    /// schedule's trouble must not stop the others.
    async fn step_schedule(&self, pool: &PgPool, topics: &Topics, s: String) -> Option<(Uuid, Admitted)> {
        let mut admitted = None;
        let Ok(schedule) = Uuid::parse_str(&s) else { return None };
        match self.admit(schedule).await {
            Ok(a) => {
                metrics::counter!("queue_admitted_total").increment(a.admitted);
                metrics::gauge!("queue_admission_paused", "schedule" => s.clone()).set(if a.paused { 1.0 } else { 0.0 });
                admitted = Some((schedule, a));
            }
            Err(e) => tracing::warn!(error = %e, %schedule, "admission step failed"),
        }
        // A backlog left by an outage drains a batch at a time, a bounded number per tick.
        for _ in 0..20 {
            match self.drain_notifications(pool, topics, schedule).await {
                Ok(n) if n as isize == DRAIN_BATCH => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, %schedule, "queue notifications not written yet; kept pending in Redis"),
            }
            break;
        }
        match self.sizes(schedule).await {
            Ok([waiting, active, early, pending]) => {
                metrics::gauge!("queue_waiting", "schedule" => s.clone()).set(waiting as f64);
                metrics::gauge!("queue_active", "schedule" => s.clone()).set(active as f64);
                if waiting + active + early + pending == 0 {
                    if let Err(e) = self.forget_if_idle(schedule).await {
                        tracing::warn!(error = %e, %schedule, "could not drop an idle queue from the walk");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, %schedule, "queue sizes"),
        }
        admitted
    }

    /// Takes an idle queue out of the set every tick walks (issue 15, item 10: the set must not
    /// grow with every schedule ever sold), without ever losing a queue that has entrants.
    ///
    /// The set is in another hash slot than the queue, so no script can do both. Instead:
    /// remove, then look again, and list it back if anyone is there. `enter` lists a schedule
    /// after its entry exists, so an entrant is either seen by the second look, or lists the
    /// schedule again after the removal. Nothing else is lost: the admission settings stay in
    /// their hash and apply when the queue is listed again.
    async fn forget_if_idle(&self, schedule: Uuid) -> Result<()> {
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("SREM").arg(self.keys.queue_schedules()).arg(schedule.to_string()).query_async(&mut conn).await?;
        if self.sizes(schedule).await?.iter().any(|n| *n > 0) {
            let _: () = redis::cmd("SADD").arg(self.keys.queue_schedules()).arg(schedule.to_string()).query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// The admission of `schedule` as operators see it.
    pub async fn admission(&self, schedule: Uuid) -> Result<Admission> {
        let Stored { waiting, active, paused, batch, max_active, admitted } = stored(&self.redis, &self.keys, schedule).await?;
        Ok(Admission {
            waiting,
            active,
            paused,
            batch: batch.unwrap_or(self.cfg.batch),
            tick: self.cfg.tick.as_millis() as u64,
            max_active: max_active.unwrap_or(self.cfg.max_active),
            admitted_total: admitted,
        })
    }

    /// Changes the admission of `schedule` for every replica: the settings live in Redis and the
    /// admission script reads them on its next tick.
    pub async fn set_admission(&self, schedule: Uuid, change: &AdmissionChange) -> Result<Admission> {
        let mut conn = self.redis.clone();
        let key = self.keys.queue_admission(schedule);
        let mut pipe = redis::pipe();
        if let Some(p) = change.paused {
            pipe.cmd("HSET").arg(&key).arg("paused").arg(if p { 1 } else { 0 }).ignore();
            metrics::gauge!("queue_admission_paused", "schedule" => schedule.to_string()).set(if p { 1.0 } else { 0.0 });
        }
        if let Some(b) = change.batch {
            pipe.cmd("HSET").arg(&key).arg("batch").arg(b).ignore();
        }
        if let Some(m) = change.max_active {
            pipe.cmd("HSET").arg(&key).arg("maxActive").arg(m).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
        // A command of its own: `queue:schedules` is in another slot than the schedule's keys,
        // and Redis Cluster refuses a pipeline that crosses slots.
        let _: () = redis::cmd("SADD").arg(self.keys.queue_schedules()).arg(schedule.to_string()).query_async(&mut conn).await?;
        self.admission(schedule).await
    }

    /// Runs admission ticks while holding the lease, until `shutdown`. Each tick also writes the
    /// queue's pending notifications through the outbox (see [`Queue::drain_notifications`]).
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
            let started = std::time::Instant::now();
            if let Err(e) = self.tick(&pool, &topics).await {
                tracing::warn!(error = %e, "admission tick failed");
            }
            metrics::histogram!("queue_admission_tick_seconds").record(started.elapsed().as_secs_f64());
        }
    }
}

/// The notification a pending item stands for, with its event id: `position:user:entry:position`
/// (`QUEUE_POSITION`, appended by [`ENTER`]) or `user:activation` (`QUEUE_ACTIVATED`, by [`ADMIT`]).
fn pending_notification(schedule: Uuid, item: &str) -> Option<(Uuid, NotificationRequest)> {
    if let Some(rest) = item.strip_prefix("position:") {
        let mut parts = rest.split(':');
        let (user, entry, position) = (parts.next()?, parts.next()?, parts.next()?);
        let (user, position): (Uuid, u64) = (Uuid::parse_str(user).ok()?, position.parse().ok()?);
        entry.parse::<u64>().ok()?;
        let kind = Kind::QueuePosition(position);
        let req = NotificationRequest::new(kind, user, json!({"scheduleId": schedule, "position": position}));
        return Some((notification::event_id(kind, &format!("{schedule}:{user}:{entry}")), req));
    }
    let user = Uuid::parse_str(item.split_once(':')?.0).ok()?;
    let req = NotificationRequest::new(Kind::QueueActivated, user, json!({"scheduleId": schedule}));
    Some((notification::event_id(Kind::QueueActivated, &format!("{schedule}:{item}")), req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_item_names_its_notification_and_the_same_item_always_the_same_event() {
        let (schedule, user) = (Uuid::new_v4(), Uuid::new_v4());
        let (id, req) = pending_notification(schedule, &format!("position:{user}:7:123")).unwrap();
        assert_eq!((req.kind.as_str(), req.user_id, req.message.as_str()), ("QUEUE_POSITION", user, "현재 대기 순번은 123번입니다."));
        assert_eq!(req.data, json!({"scheduleId": schedule, "position": 123}));
        assert_eq!(id, pending_notification(schedule, &format!("position:{user}:7:123")).unwrap().0);
        assert_ne!(id, pending_notification(schedule, &format!("position:{user}:8:123")).unwrap().0, "another entry, another event");

        let (id, req) = pending_notification(schedule, &format!("{user}:4")).unwrap();
        assert_eq!((req.kind.as_str(), req.user_id), ("QUEUE_ACTIVATED", user));
        assert_ne!(id, pending_notification(schedule, &format!("{user}:5")).unwrap().0);

        for bad in ["", "position:", &format!("position:{user}:7"), &format!("position:{user}:x:1"), "not-a-user:1"] {
            assert!(pending_notification(schedule, bad).is_none(), "{bad:?}");
        }
    }
}
