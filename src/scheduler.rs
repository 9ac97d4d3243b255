//! The delay scheduler (brief §6, design document §4-3 method 2).
//!
//! Each hold's expiry lives in a Redis sorted set (score = `expiresAt` in ms, member = reservation
//! id, payload beside it in a hash). The sets are sharded by the Kafka partition of
//! `reservation.created`: the consumer that owns partition *p* drains shard *p*, so several
//! schedulers split the load and the shards can live on different Redis Cluster slots.
//!
//! Guarantees, and where they come from:
//! - **Nothing lost.** [`Scheduler::claim`] is one Lua script: with Redis `TIME` as the only
//!   clock it moves at most `batch` due members into an in-flight set with a lease deadline. A
//!   member leaves the in-flight set only after Kafka acknowledged its `reservation.expiration`
//!   ([`Scheduler::step`]); a lease that runs out is claimed again. Killing the process at any
//!   instruction therefore leaves every hold either due, in flight, or published.
//! - **Redis can forget.** PostgreSQL is the truth: [`Scheduler::rearm`] re-adds every HELD hold
//!   (`ZADD NX`, in batches) of each shard this member gains and every `--rearm-interval`, in a
//!   task beside the shard loops so draining never waits for it; the expirer's sweeper is the
//!   last net.
//! - **Redis Cluster.** Every key a script touches carries the shard's hash tag (`keys.rs`),
//!   the paid/cancelled tombstone included, so each script runs on one slot.
//! - **On time.** [`drive`] sleeps until the earliest due member (or `poll`, whichever is sooner)
//!   and wakes at once when a newly scheduled hold is due before its planned wake-up; a hold
//!   scheduled while a step runs (after its claim looked) is remembered by the [`Wake`], so the
//!   loop never sleeps past it. Each shard loop has its own [`Wake`]: a cancelled loop still
//!   finishing a step cannot take or overwrite the wake-ups of its replacement.
//! - **Failures come back at once.** A member whose `reservation.expiration` could not be queued
//!   (QueueFull) or was refused goes straight back to the due set ([`Scheduler::step`]); only a
//!   scheduler that dies mid-publish leaves members to wait out the lease, which is a margin over
//!   the producer's message timeout ([`crate::kafka::MESSAGE_TIMEOUT`]) so a send still waiting for
//!   Kafka's answer is never claimed twice.
//! - **Never early by PostgreSQL's clock.** Scores are `expiresAt` rounded up to the millisecond;
//!   if Redis's clock runs ahead anyway, the expirer refuses to end the hold early and puts it back
//!   here with the clocks' difference added ([`put_back_early`]).
//! - **No useless expirations.** A payment or cancellation removes the member and leaves a
//!   tombstone, so a `reservation.created` consumed late does not put it back.
//! - Duplicates are possible (a lease running out during a slow publish); the expirer's
//!   conditional update makes them harmless.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use crate::redis_conn::{Lua, RedisConn};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::kafka::{partition_for, Envelope, EventType, HandleError, Handler, Incoming, PartitionWatch, Topics, PARTITIONS};
use crate::keys::Keys;
use crate::reservation::ReservationEvent;

/// Tunables (delay-scheduler flags).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub batch_size: u32,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub rearm_interval: Duration,
}

/// What one step did on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Claimed members were published and acknowledged (`failed` stayed in flight for a retry).
    Published { claimed: usize, reclaimed: usize, published: usize, failed: usize },
    /// Nothing due; the earliest member (due or lease) is this far away, if any.
    Idle { next_due: Option<Duration> },
}

/// Members claimed by one call of the claim script.
#[derive(Debug, Default)]
pub struct Claimed {
    pub now_ms: i64,
    pub reclaimed: usize,
    pub members: Vec<(String, Option<String>)>,
    pub next_due_ms: Option<i64>,
    pub due_size: u64,
    pub inflight_size: u64,
}

// KEYS: due, inflight, payload. ARGV: batch, lease_ms.
static CLAIM: Lua = Lua::new(r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local batch = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local out = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, batch)
for _, m in ipairs(expired) do
  redis.call('ZADD', KEYS[2], now + lease, m)
  table.insert(out, m)
end
local reclaimed = #out
if batch - reclaimed > 0 then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch - reclaimed)
  for _, m in ipairs(due) do
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZADD', KEYS[2], now + lease, m)
    table.insert(out, m)
  end
end
local payloads = {}
if #out > 0 then payloads = redis.call('HMGET', KEYS[3], unpack(out)) end
local nd = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local nl = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local next = false
if nd[2] then next = nd[2] end
if nl[2] and (not next or tonumber(nl[2]) < tonumber(next)) then next = nl[2] end
return {now, reclaimed, out, payloads, next, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"#);

// KEYS: inflight, payload, due. ARGV: members. A member the expirer put back in the due set
// meanwhile ([`put_back_early`]) keeps its payload.
static ACK: Lua = Lua::new(r#"
for _, m in ipairs(ARGV) do
  redis.call('ZREM', KEYS[1], m)
  if not redis.call('ZSCORE', KEYS[3], m) then redis.call('HDEL', KEYS[2], m) end
end
return #ARGV
"#);

// Members whose publish failed go straight back to the due set (with their due score), so the
// next claim retries them instead of waiting for the lease. Only members still in flight: a
// cancellation meanwhile removed them for good.
// KEYS: due, inflight. ARGV: member, score pairs. Returns how many went back.
static RELEASE: Lua = Lua::new(r#"
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    n = n + 1
  end
end
return n
"#);

// A hold whose expiration reached the expirer before its expiresAt by PostgreSQL's clock, put
// back on Redis's clock: score = expiresAt + (Redis TIME - PostgreSQL's now), so it is claimed
// when PostgreSQL's clock reaches expiresAt. Measuring the difference here, after PostgreSQL was
// read, can only overstate it (later, never earlier).
// KEYS: due, inflight, payload, tombstone. ARGV: member, expiresAt ms, PostgreSQL now ms, payload.
// Returns the score, or -1 when the hold was paid or cancelled meanwhile.
static PUT_BACK: Lua = Lua::new(r#"
if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = tonumber(ARGV[2]) + now - tonumber(ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return score
"#);

// KEYS: due, inflight, payload, tombstone. ARGV: member, tombstone TTL (s). Returns 1 if it was
// pending. The tombstone is written in the same script, so no scheduling (`REARM`) of this shard can slip in
// between the removal and the marker.
static CANCEL: Lua = Lua::new(r#"
redis.call('SET', KEYS[4], 1, 'EX', ARGV[2])
local a = redis.call('ZREM', KEYS[1], ARGV[1])
local b = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if a + b > 0 then return 1 end
return 0
"#);

// Schedules holds of one shard (one, a consumer's batch, or a chunk of a re-arm): each is added
// to the due set unless it was paid or cancelled (its tombstone) or is in flight; its payload is
// kept. KEYS: due, inflight, payload, then one tombstone per member. ARGV: member, score, payload per
// member. Returns {added, earliest added score or false}.
static REARM: Lua = Lua::new(r#"
local added, earliest = 0, false
for i = 1, #KEYS - 3 do
  local m, score = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1])
  if redis.call('EXISTS', KEYS[3 + i]) == 0 and not redis.call('ZSCORE', KEYS[2], m) then
    if redis.call('ZADD', KEYS[1], 'NX', score, m) == 1 then
      added = added + 1
      if not earliest or score < earliest then earliest = score end
    end
    redis.call('HSETNX', KEYS[3], m, ARGV[3 * i])
  end
end
return {added, earliest}
"#);

/// Holds read from PostgreSQL per page of a re-arm; each page becomes one `REARM` call per shard.
const REARM_PAGE: i64 = 3000;

// KEYS of each script, built in one place so `keys::tests` can prove each set lies in one slot
// (the shard's hash tag).
fn shard_keys(k: &Keys, shard: i32) -> Vec<String> {
    vec![k.sched_due(shard), k.sched_inflight(shard), k.sched_payload(shard)]
}
fn schedule_keys(k: &Keys, shard: i32, reservation: Uuid) -> Vec<String> {
    let mut v = shard_keys(k, shard);
    v.push(k.sched_cancelled(shard, reservation));
    v
}
fn ack_keys(k: &Keys, shard: i32) -> Vec<String> {
    vec![k.sched_inflight(shard), k.sched_payload(shard), k.sched_due(shard)]
}
fn release_keys(k: &Keys, shard: i32) -> Vec<String> {
    vec![k.sched_due(shard), k.sched_inflight(shard)]
}
fn rearm_keys(k: &Keys, shard: i32, reservations: &[Uuid]) -> Vec<String> {
    let mut v = shard_keys(k, shard);
    v.extend(reservations.iter().map(|r| k.sched_cancelled(shard, *r)));
    v
}

/// Every scheduler script with the keys it is given on `shard` (for the one-slot test in `keys`).
#[cfg(test)]
pub(crate) fn script_keys(k: &Keys, shard: i32, reservations: &[Uuid]) -> Vec<(String, Vec<String>)> {
    vec![
        (format!("scheduler CLAIM shard {shard}"), shard_keys(k, shard)),
        (format!("scheduler ACK shard {shard}"), ack_keys(k, shard)),
        (format!("scheduler RELEASE shard {shard}"), release_keys(k, shard)),
        (format!("scheduler PUT_BACK shard {shard}"), schedule_keys(k, shard, reservations[0])),
        (format!("scheduler CANCEL shard {shard}"), schedule_keys(k, shard, reservations[0])),
        (format!("scheduler REARM shard {shard}"), rearm_keys(k, shard, reservations)),
    ]
}

/// How long a paid or cancelled hold's tombstone lives: the retention of `reservation.created`,
/// after which no late copy of that message can arrive.
const TOMBSTONE_TTL_SECS: u64 = 24 * 3600;

/// The wake-up of one shard loop: when it plans to wake, the earliest due time offered since its
/// last step began, and a way to bring the wake-up forward.
pub struct Wake {
    /// When the sleeping loop wakes (ms since the epoch); `i64::MIN` while it steps.
    planned_ms: AtomicI64,
    /// The earliest due time offered since the loop's current step began (`i64::MAX`: none).
    /// The step's claim may have looked before such a member was added, so the loop never
    /// sleeps past it.
    offered_ms: AtomicI64,
    notify: Notify,
}

impl Default for Wake {
    fn default() -> Self {
        Self { planned_ms: AtomicI64::new(i64::MIN), offered_ms: AtomicI64::new(i64::MAX), notify: Notify::new() }
    }
}

impl Wake {
    /// A member due at `due_ms` was just added: wakes the sleeping loop if that comes before its
    /// planned wake-up; during a step it is remembered for the sleep that follows.
    ///
    /// Both sides use sequentially consistent order: either this sees the loop's new plan (and
    /// wakes it if earlier), or the loop sees this offer when it reads `offered_ms` after
    /// storing its plan.
    pub fn offer(&self, due_ms: i64) {
        self.offered_ms.fetch_min(due_ms, Ordering::SeqCst);
        if due_ms < self.planned_ms.load(Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }
}

/// The scheduler service: Redis sets, the Kafka producer, and the wake-ups of its shard loops.
pub struct Scheduler {
    redis: RedisConn,
    keys: Keys,
    producer: FutureProducer,
    topics: Topics,
    cfg: SchedulerConfig,
    /// The wake-up of each shard's current loop (replaced when a new loop starts).
    wakes: Vec<std::sync::Mutex<Arc<Wake>>>,
}

impl Scheduler {
    pub fn new(redis: RedisConn, keys: Keys, producer: FutureProducer, topics: Topics, cfg: SchedulerConfig) -> Self {
        let wakes = (0..PARTITIONS).map(|_| std::sync::Mutex::new(Arc::new(Wake::default()))).collect();
        Self { redis, keys, producer, topics, cfg, wakes }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The wake-up of `shard`'s current loop.
    fn wake(&self, shard: i32) -> Option<Arc<Wake>> {
        self.wakes.get(shard as usize).map(|w| w.lock().expect("wake lock").clone())
    }

    /// Adds a hold to shard `shard` (unless it was paid or cancelled, or is in flight).
    pub async fn schedule(&self, shard: i32, ev: &ReservationEvent) -> Result<bool, redis::RedisError> {
        Ok(self.schedule_many(shard, std::slice::from_ref(ev)).await? == 1)
    }

    /// Removes a paid or cancelled hold from every shard and leaves a tombstone in each (a
    /// shard's script can only read keys of its own slot).
    pub async fn cancel(&self, reservation: Uuid) -> Result<bool, redis::RedisError> {
        Ok(self.cancel_many(&[reservation]).await? == 1)
    }

    /// Adds holds of one shard in one round trip (`REARM`, [`Scheduler::schedule`]'s rule for
    /// each); returns how many were added. The shard's loop is woken for the earliest.
    pub async fn schedule_many(&self, shard: i32, evs: &[ReservationEvent]) -> Result<usize, redis::RedisError> {
        if evs.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = evs.iter().map(|e| e.reservation_id).collect();
        let script = REARM.script();
        let mut inv = script.key(rearm_keys(&self.keys, shard, &ids));
        for ev in evs {
            inv.arg(ev.reservation_id.to_string()).arg(due_ms(ev.expires_at)).arg(serde_json::to_string(ev).expect("events serialize"));
        }
        let (added, earliest): (usize, Option<i64>) = inv.invoke_async(&mut self.redis.clone()).await?;
        if let (Some(due_ms), Some(w)) = (earliest, self.wake(shard)) {
            w.offer(due_ms);
        }
        Ok(added)
    }

    /// [`Scheduler::cancel`] for many holds: one pipeline per shard (each shard's keys share
    /// one slot, so a cluster sends it to one node) instead of one round trip per hold and
    /// shard. Returns how many were pending.
    pub async fn cancel_many(&self, reservations: &[Uuid]) -> Result<usize, redis::RedisError> {
        if reservations.is_empty() {
            return Ok(0);
        }
        let mut removed: HashMap<Uuid, bool> = HashMap::new();
        for shard in 0..PARTITIONS {
            let mut pipe = redis::pipe();
            for r in reservations {
                // EVAL with the text: a pipeline cannot answer NOSCRIPT by loading the script.
                pipe.cmd("EVAL").arg(CANCEL.text()).arg(4).arg(schedule_keys(&self.keys, shard, *r)).arg(r.to_string()).arg(TOMBSTONE_TTL_SECS);
            }
            let done: Vec<i64> = pipe.query_async(&mut self.redis.clone()).await?;
            for (r, d) in reservations.iter().zip(done) {
                *removed.entry(*r).or_default() |= d == 1;
            }
        }
        let n = removed.values().filter(|r| **r).count();
        metrics::counter!("scheduler_cancelled_total").increment(n as u64);
        Ok(n)
    }

    /// Atomically claims due members of `shard` (and members whose lease ran out).
    pub async fn claim(&self, shard: i32) -> Result<Claimed, redis::RedisError> {
        let mut conn = self.redis.clone();
        type Raw = (i64, i64, Vec<String>, Vec<Option<String>>, Option<String>, u64, u64);
        let (now_ms, reclaimed, members, payloads, next, due_size, inflight_size): Raw = CLAIM.script()
            .key(shard_keys(&self.keys, shard))
            .arg(self.cfg.batch_size)
            .arg(self.cfg.lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        let members = members.into_iter().zip(payloads.into_iter().chain(std::iter::repeat(None))).collect();
        Ok(Claimed {
            now_ms,
            reclaimed: reclaimed as usize,
            members,
            next_due_ms: next.and_then(|s| s.parse::<f64>().ok()).map(|f| f as i64),
            due_size,
            inflight_size,
        })
    }

    /// Puts members whose publish failed back into the due set at once, with their due scores.
    pub async fn release(&self, shard: i32, members: &[(String, i64)]) -> Result<(), redis::RedisError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut conn = self.redis.clone();
        let script = RELEASE.script();
        let mut inv = script.key(release_keys(&self.keys, shard));
        for (member, score) in members {
            inv.arg(member).arg(*score);
        }
        let _: i64 = inv.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Removes published members from the in-flight set.
    pub async fn ack(&self, shard: i32, members: &[String]) -> Result<(), redis::RedisError> {
        if members.is_empty() {
            return Ok(());
        }
        let mut conn = self.redis.clone();
        let _: i64 = ACK.script()
            .key(ack_keys(&self.keys, shard))
            .arg(members)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// One unit of work on `shard`: claim, publish `reservation.expiration`, ack what Kafka
    /// acknowledged. Members whose publish failed (not queued, refused, timed out) are counted in
    /// `failed` and go straight back to the due set, so the next claim retries them; the loop
    /// ([`drive`]) waits a little before that step.
    pub async fn step(&self, shard: i32) -> Result<Tick, redis::RedisError> {
        let claimed = self.claim(shard).await?;
        let s = shard.to_string();
        metrics::gauge!("scheduler_due_size", "shard" => s.clone()).set(claimed.due_size as f64);
        metrics::gauge!("scheduler_inflight_size", "shard" => s.clone()).set(claimed.inflight_size as f64);
        if claimed.members.is_empty() {
            let next_due = claimed.next_due_ms.map(|d| Duration::from_millis((d - claimed.now_ms).max(0) as u64));
            return Ok(Tick::Idle { next_due });
        }
        metrics::counter!("scheduler_claimed_total").increment((claimed.members.len() - claimed.reclaimed) as u64);
        metrics::counter!("scheduler_reclaimed_total").increment(claimed.reclaimed as u64);

        let mut sends = Vec::with_capacity(claimed.members.len());
        let mut orphans = Vec::new();
        let mut retry: Vec<(String, i64)> = Vec::new();
        for (member, payload) in &claimed.members {
            let Some(ev) = payload.as_deref().and_then(|p| serde_json::from_str::<ReservationEvent>(p).ok()) else {
                // Payload gone: the hold was cancelled while in flight. Nothing to publish.
                orphans.push(member.clone());
                continue;
            };
            let env = Envelope::new(EventType::ReservationExpiration, ev.clone());
            let body = serde_json::to_string(&env).expect("envelopes serialize");
            let record = FutureRecord::to(&self.topics.reservation_expiration)
                .key(member.as_str())
                .payload(&body)
                .partition(partition_for(member, PARTITIONS));
            // send_result queues at once, so the whole batch goes out together.
            match self.producer.send_result(record) {
                Ok(fut) => sends.push((member.clone(), ev.expires_at, fut)),
                Err((e, _)) => {
                    tracing::warn!(error = %e, reservation = %member, "expiration not queued; back to the due set");
                    retry.push((member.clone(), due_ms(ev.expires_at)));
                }
            }
        }
        self.ack(shard, &orphans).await?;
        let mut acked = Vec::with_capacity(sends.len());
        for (member, expires_at, fut) in sends {
            match fut.await {
                Ok(Ok(_)) => {
                    acked.push(member);
                    metrics::histogram!("scheduler_publish_lateness_seconds").record(lateness_secs(expires_at));
                }
                Ok(Err((e, _))) => {
                    tracing::warn!(error = %e, reservation = %member, "expiration publish failed; back to the due set");
                    retry.push((member, due_ms(expires_at)));
                }
                Err(_) => retry.push((member, due_ms(expires_at))),
            }
        }
        // Only now, after Kafka acknowledged them, do the members leave the in-flight set.
        //
        // The loop claims again only after this: on purpose, though a member falling due
        // meanwhile waits. Waiting makes the claims batch by themselves (the longer Kafka takes,
        // the more the next claim takes at once). Claiming without waiting, the acknowledgements
        // settled beside the loop, was measured twice on the 10,000-hold burst and lost both
        // times: many small produce requests and scripts cost the saturated machine more than
        // the wait, and the expirer fell behind (docs/design.md, seventeenth and nineteenth
        // passes).
        self.ack(shard, &acked).await?;
        self.release(shard, &retry).await?;
        let (published, failed) = (acked.len(), retry.len());
        metrics::counter!("scheduler_published_total").increment(published as u64);
        metrics::counter!("scheduler_publish_failures_total").increment(failed as u64);
        Ok(Tick::Published { claimed: claimed.members.len(), reclaimed: claimed.reclaimed, published, failed })
    }

    /// Re-adds every HELD hold of the given shards from PostgreSQL (`NX`: existing members keep
    /// their state; paid or cancelled ones stay out by their tombstone). Pages of [`REARM_PAGE`]
    /// holds, earliest expiry first, each page one `REARM` script per shard: 100,000 holds take
    /// about a hundred round trips, not 100,000.
    pub async fn rearm(&self, pool: &PgPool, shards: &BTreeSet<i32>) -> Result<usize, HandleError> {
        self.rearm_reporting(pool, shards, |_| {}).await
    }

    /// [`Scheduler::rearm`], telling `walked` how many HELD holds each page read (an operator's
    /// progress bar: `bookingctl scheduler rearm`).
    pub async fn rearm_reporting(&self, pool: &PgPool, shards: &BTreeSet<i32>, mut walked: impl FnMut(u64)) -> Result<usize, HandleError> {
        let mut added = 0usize;
        // Keyset pagination on (expires_at, id), written so that the partial index on HELD holds'
        // expires_at serves each page as a range scan (no sort of every HELD hold per page).
        let mut after: (DateTime<Utc>, Uuid) = (DateTime::UNIX_EPOCH, Uuid::nil());
        loop {
            let rows: Vec<(Uuid, Uuid, Uuid, Uuid, DateTime<Utc>)> = sqlx::query_as(
                "SELECT id, user_id, seat_id, schedule_id, expires_at FROM reservations
                 WHERE status = 'HELD' AND expires_at >= $1 AND (expires_at > $1 OR id > $2)
                 ORDER BY expires_at, id LIMIT $3",
            )
            .bind(after.0)
            .bind(after.1)
            .bind(REARM_PAGE)
            .fetch_all(pool)
            .await?;
            let Some(last) = rows.last() else { break };
            after = (last.4, last.0);
            let full = rows.len() as i64 == REARM_PAGE;
            let page = rows.len() as u64;
            let mut by_shard: HashMap<i32, Vec<ReservationEvent>> = HashMap::new();
            for (reservation_id, user_id, seat_id, schedule_id, expires_at) in rows {
                let shard = partition_for(&reservation_id.to_string(), PARTITIONS);
                if shards.contains(&shard) {
                    by_shard.entry(shard).or_default().push(ReservationEvent { reservation_id, user_id, seat_id, schedule_id, expires_at });
                }
            }
            for (shard, evs) in by_shard {
                added += self.schedule_many(shard, &evs).await?;
            }
            walked(page);
            if !full {
                break;
            }
        }
        metrics::counter!("scheduler_rearmed_total").increment(added as u64);
        Ok(added)
    }

    /// The shards (partitions of `reservation.created`) in an assignment.
    fn owned(&self, assignment: &mut PartitionWatch) -> BTreeSet<i32> {
        assignment
            .borrow_and_update()
            .iter()
            .filter(|(t, _)| *t == self.topics.reservation_created)
            .map(|(_, p)| *p)
            .filter(|p| (0..PARTITIONS).contains(p))
            .collect()
    }

    /// Re-arms beside the shard loops, never in their way: each shard this member gains is
    /// re-armed at once, and every owned shard again every `--rearm-interval`. A failed re-arm is
    /// retried after a second.
    pub async fn run_rearm(self: Arc<Self>, pool: PgPool, mut assignment: PartitionWatch, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.cfg.rearm_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await; // the first tick is immediate; gained shards are re-armed anyway
        let mut armed: BTreeSet<i32> = BTreeSet::new();
        loop {
            let owned = self.owned(&mut assignment);
            armed.retain(|s| owned.contains(s));
            let todo: BTreeSet<i32> = owned.difference(&armed).copied().collect();
            let mut retry = false;
            if !todo.is_empty() {
                let started = std::time::Instant::now();
                match self.rearm(&pool, &todo).await {
                    Ok(n) => {
                        metrics::histogram!("scheduler_rearm_seconds").record(started.elapsed().as_secs_f64());
                        tracing::info!(rearmed = n, shards = ?todo, took_ms = started.elapsed().as_millis() as u64, "re-armed holds from PostgreSQL");
                        armed.extend(todo);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "re-arm failed; retrying");
                        retry = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = assignment.changed() => if r.is_err() { break },
                _ = every.tick() => armed.clear(),
                _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
            }
        }
    }

    /// The loop of one shard until `cancel`.
    pub async fn run_shard(self: Arc<Self>, shard: i32, cancel: CancellationToken) {
        // A fresh wake-up for this loop: a cancelled predecessor may still be finishing a step
        // with the old one, and must neither take this loop's notifications nor plan for it.
        let wake = Arc::new(Wake::default());
        *self.wakes[shard as usize].lock().expect("wake lock") = wake.clone();
        let me = self.clone();
        drive(move || { let me = me.clone(); async move { me.step(shard).await } }, self.cfg.poll_interval, &wake, cancel).await;
    }

    /// Runs the shard loops of the partitions of `reservation.created` this member owns,
    /// starting and stopping them as the assignment changes; re-arming runs beside them
    /// ([`Scheduler::run_rearm`]), so a gained shard starts draining at once.
    pub async fn run(self: Arc<Self>, pool: PgPool, mut assignment: PartitionWatch, shutdown: CancellationToken) {
        let rearm = tokio::spawn(self.clone().run_rearm(pool, assignment.clone(), shutdown.clone()));
        let mut loops: HashMap<i32, (CancellationToken, tokio::task::JoinHandle<()>)> = HashMap::new();
        loop {
            let owned = self.owned(&mut assignment);
            loops.retain(|shard, (token, _)| {
                let keep = owned.contains(shard);
                if !keep {
                    token.cancel();
                }
                keep
            });
            for shard in owned {
                loops.entry(shard).or_insert_with(|| {
                    let token = shutdown.child_token();
                    let handle = tokio::spawn(self.clone().run_shard(shard, token.clone()));
                    (token, handle)
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = assignment.changed() => if r.is_err() { break },
            }
        }
        for (_, (token, handle)) in loops {
            token.cancel();
            let _ = handle.await;
        }
        let _ = rearm.await;
    }
}

/// A hold's score: `expiresAt` in ms, rounded up, so the claim (which compares with whole
/// milliseconds of Redis `TIME`) is never a fraction of a millisecond early.
pub fn due_ms(expires_at: DateTime<Utc>) -> i64 {
    let ms = expires_at.timestamp_millis();
    if expires_at.timestamp_subsec_micros().is_multiple_of(1000) { ms } else { ms + 1 }
}

/// Puts a hold back into its shard's due set to be expired when PostgreSQL's clock reaches its
/// `expiresAt` (see `PUT_BACK`): the expirer's answer to a `reservation.expiration` that arrived
/// early. `db_now` is PostgreSQL's clock, read just before. Returns false if the hold was paid or
/// cancelled meanwhile (its tombstone).
pub async fn put_back_early(redis: &RedisConn, keys: &Keys, ev: &ReservationEvent, db_now: DateTime<Utc>) -> Result<bool, redis::RedisError> {
    let member = ev.reservation_id.to_string();
    let shard = partition_for(&member, PARTITIONS);
    let mut conn = redis.clone();
    let score: i64 = PUT_BACK.script()
        .key(schedule_keys(keys, shard, ev.reservation_id))
        .arg(&member)
        .arg(due_ms(ev.expires_at))
        .arg(db_now.timestamp_millis())
        .arg(serde_json::to_string(ev).expect("events serialize"))
        .invoke_async(&mut conn)
        .await?;
    Ok(score >= 0)
}

fn lateness_secs(expires_at: DateTime<Utc>) -> f64 {
    (Utc::now() - expires_at).num_microseconds().unwrap_or(0) as f64 / 1e6
}

/// The loop around a step: after work, step again at once; when idle, sleep until the earliest
/// due member or `poll`, whichever is sooner, or until `wake` says an earlier member arrived.
pub async fn drive<F, Fut, E>(mut step: F, poll: Duration, wake: &Wake, cancel: CancellationToken)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Tick, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        if cancel.is_cancelled() {
            break;
        }
        // Stepping: nothing to wake; members added meanwhile are collected in `offered_ms`.
        wake.planned_ms.store(i64::MIN, Ordering::SeqCst);
        wake.offered_ms.store(i64::MAX, Ordering::SeqCst);
        let outcome = step().await;
        // Cancelled during the step (the shard moved): leave now, planning nothing.
        if cancel.is_cancelled() {
            break;
        }
        let sleep = match outcome {
            Ok(Tick::Published { failed: 0, .. }) => {
                backoff = Duration::from_millis(100);
                continue;
            }
            Ok(Tick::Published { .. }) => poll.min(Duration::from_millis(500)),
            Ok(Tick::Idle { next_due }) => {
                backoff = Duration::from_millis(100);
                next_due.map_or(poll, |d| d.min(poll))
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduler step failed");
                backoff = (backoff * 2).min(poll.max(Duration::from_secs(1)));
                backoff
            }
        };
        let now = Utc::now().timestamp_millis();
        let mut wake_at = now.saturating_add(sleep.as_millis() as i64);
        wake.planned_ms.store(wake_at, Ordering::SeqCst);
        // A member added during the step, after its claim looked, may be due sooner.
        let offered = wake.offered_ms.load(Ordering::SeqCst);
        if offered < wake_at {
            wake_at = offered;
            wake.planned_ms.store(wake_at, Ordering::SeqCst);
        }
        let sleep = Duration::from_millis(wake_at.saturating_sub(now).max(0) as u64);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notify.notified() => {}
        }
    }
}

/// Consumer of `reservation.created`, `payment.completed` and `reservation.cancelled`.
pub struct SchedulerHandler {
    pub scheduler: Arc<Scheduler>,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct HasReservation {
    reservation_id: Uuid,
}

/// What a message asks of the scheduler.
enum Order {
    /// A new hold: schedule its expiry in its shard (the message's partition).
    Schedule(i32, ReservationEvent),
    /// A paid or cancelled hold: take it off and leave a tombstone.
    Cancel(Uuid),
}

impl SchedulerHandler {
    fn order(&self, msg: &Incoming) -> Result<Order, HandleError> {
        let topics = &self.scheduler.topics;
        if msg.topic == topics.reservation_created {
            let env = Envelope::<ReservationEvent>::parse(&msg.payload, EventType::ReservationCreated).map_err(HandleError::Poison)?;
            Ok(Order::Schedule(msg.partition, env.payload))
        } else if msg.topic == topics.payment_completed {
            let env = Envelope::<HasReservation>::parse(&msg.payload, EventType::PaymentCompleted).map_err(HandleError::Poison)?;
            Ok(Order::Cancel(env.payload.reservation_id))
        } else if msg.topic == topics.reservation_cancelled {
            let env = Envelope::<HasReservation>::parse(&msg.payload, EventType::ReservationCancelled).map_err(HandleError::Poison)?;
            Ok(Order::Cancel(env.payload.reservation_id))
        } else {
            Err(HandleError::Poison(format!("unexpected topic {}", msg.topic)))
        }
    }
}

impl Handler for SchedulerHandler {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        match self.order(msg)? {
            Order::Schedule(shard, ev) => {
                self.scheduler.schedule(shard, &ev).await?;
                metrics::counter!("scheduler_scheduled_total").increment(1);
            }
            Order::Cancel(reservation) => {
                self.scheduler.cancel(reservation).await?;
            }
        }
        Ok(())
    }

    /// A batch costs one round trip per shard for its new holds and one per shard for its paid
    /// or cancelled ones, where one message at a time cost one per hold and three per payment.
    /// Any order of the two is safe: a cancellation leaves a tombstone that a later schedule of
    /// the same hold respects, and both scripts are idempotent, so a batch retried after a failure
    /// changes nothing twice.
    async fn handle_batch(&self, msgs: &[Incoming]) -> Vec<Result<(), HandleError>> {
        let mut out: Vec<Result<(), HandleError>> = Vec::with_capacity(msgs.len());
        let (mut by_shard, mut cancels): (HashMap<i32, Vec<ReservationEvent>>, Vec<Uuid>) = (HashMap::new(), Vec::new());
        for msg in msgs {
            match self.order(msg) {
                Ok(Order::Schedule(shard, ev)) => by_shard.entry(shard).or_default().push(ev),
                Ok(Order::Cancel(reservation)) => cancels.push(reservation),
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            }
            out.push(Ok(()));
        }
        let scheduled: usize = by_shard.values().map(Vec::len).sum();
        let done: Result<usize, redis::RedisError> = async {
            for (shard, evs) in &by_shard {
                self.scheduler.schedule_many(*shard, evs).await?;
            }
            self.scheduler.cancel_many(&cancels).await
        }
        .await;
        match done {
            Ok(_) => metrics::counter!("scheduler_scheduled_total").increment(scheduled as u64),
            Err(e) => {
                let reason = format!("redis: {e}");
                for r in out.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(HandleError::Transient(reason.clone()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// A step that records when it ran and replays scripted outcomes.
    fn scripted(outcomes: Vec<Tick>, calls: Arc<Mutex<Vec<Instant>>>) -> impl FnMut() -> std::future::Ready<Result<Tick, String>> {
        let mut outcomes = outcomes.into_iter();
        move || {
            calls.lock().unwrap().push(Instant::now());
            std::future::ready(Ok(outcomes.next().unwrap_or(Tick::Idle { next_due: None })))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_wakes_at_the_earliest_due_time_not_at_the_next_poll() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let step = scripted(vec![Tick::Idle { next_due: Some(Duration::from_millis(300)) }], calls.clone());
        let wake = Wake::default();
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            c.cancel();
        });
        drive(step, Duration::from_secs(1), &wake, cancel).await;
        let calls = calls.lock().unwrap();
        assert_eq!(calls[0] - start, Duration::ZERO);
        assert_eq!(calls[1] - start, Duration::from_millis(300), "second step at the due time");
        assert_eq!(calls[2] - start, Duration::from_millis(1300), "then the poll interval bounds the sleep");
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_steps_again_at_once_after_publishing() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let busy = Tick::Published { claimed: 10, reclaimed: 0, published: 10, failed: 0 };
        let step = scripted(vec![busy.clone(), busy], calls.clone());
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.cancel();
        });
        let start = Instant::now();
        drive(step, Duration::from_secs(1), &Wake::default(), cancel).await;
        let calls = calls.lock().unwrap();
        assert!(calls.len() >= 3);
        assert!(calls[..3].iter().all(|t| *t - start == Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_member_wakes_the_sleeping_loop_at_once() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let step = scripted(vec![], calls.clone());
        let wake = Arc::new(Wake::default());
        let cancel = CancellationToken::new();
        let (w, c) = (wake.clone(), cancel.clone());
        let start = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Due in 50 ms: earlier than the loop's planned wake-up (poll = 1 s).
            w.offer(Utc::now().timestamp_millis() + 50);
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.cancel();
        });
        drive(step, Duration::from_secs(1), &wake, cancel).await;
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1] - start, Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_member_does_not_wake_the_loop() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let step = scripted(vec![], calls.clone());
        let wake = Arc::new(Wake::default());
        let cancel = CancellationToken::new();
        let (w, c) = (wake.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            w.offer(Utc::now().timestamp_millis() + 60_000);
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.cancel();
        });
        drive(step, Duration::from_secs(1), &wake, cancel).await;
        assert_eq!(calls.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_added_while_a_step_runs_wakes_the_loop_at_its_due_time() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let wake = Arc::new(Wake::default());
        let (w, recorded) = (wake.clone(), calls.clone());
        let mut first = true;
        let step = move || {
            recorded.lock().unwrap().push(Instant::now());
            if std::mem::take(&mut first) {
                // The step's claim already looked when a hold due in 50 ms is scheduled.
                w.offer(Utc::now().timestamp_millis() + 50);
            }
            std::future::ready(Ok::<_, String>(Tick::Idle { next_due: None }))
        };
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c.cancel();
        });
        let start = Instant::now();
        drive(step, Duration::from_secs(1), &wake, cancel).await;
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 2, "the loop stepped again before the next poll: {calls:?}");
        let second = calls[1] - start;
        assert!(second >= Duration::from_millis(40) && second <= Duration::from_millis(60), "second step at the due time, not a poll later: {second:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_cancelled_during_its_step_does_not_plan_the_wake_up_of_its_replacement() {
        let wake = Arc::new(Wake::default());
        // The old loop is in a 200 ms step (which will find a member due 100 ms later) when its
        // shard moves away and back, and the replacement starts on the same shard.
        let old_cancel = CancellationToken::new();
        let old = tokio::spawn({
            let (w, c) = (wake.clone(), old_cancel.clone());
            async move {
                let step = || async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, String>(Tick::Idle { next_due: Some(Duration::from_millis(100)) })
                };
                drive(step, Duration::from_secs(1), &w, c).await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        old_cancel.cancel();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let new = tokio::spawn({
            let (w, c, step) = (wake.clone(), cancel.clone(), scripted(vec![], calls.clone()));
            async move { drive(step, Duration::from_secs(1), &w, c).await }
        });
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        old.await.unwrap();
        // Due before the replacement's planned wake-up (a poll after it started): it must wake.
        wake.offer(Utc::now().timestamp_millis() + 500);
        tokio::time::sleep(Duration::from_millis(600)).await;
        cancel.cancel();
        new.await.unwrap();
        let calls = calls.lock().unwrap();
        assert!(calls.len() >= 2, "the replacement was woken by the offer: {calls:?}");
        assert_eq!(calls[1] - start, Duration::from_millis(300), "woken when the member was offered");
    }

    #[test]
    fn scores_round_expiry_up_to_the_millisecond() {
        let t = DateTime::parse_from_rfc3339("2030-01-01T00:00:00.123001Z").unwrap().with_timezone(&Utc);
        assert_eq!(due_ms(t), t.timestamp_millis() + 1);
        let exact = DateTime::parse_from_rfc3339("2030-01-01T00:00:00.123Z").unwrap().with_timezone(&Utc);
        assert_eq!(due_ms(exact), exact.timestamp_millis());
    }
}
