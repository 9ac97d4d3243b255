//! `bookingctl scheduler …`: where each hold's expiry is in the delay scheduler's Redis sets,
//! beside the reservation's state in PostgreSQL (the truth), and re-arming what Redis forgot.
//!
//! Re-arming goes through [`Scheduler::schedule`], the daemon's own script: `ZADD NX`, skipped for
//! tombstoned and in-flight members, so it is safe to run at any time and any number of times.

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::Serialize;
use uuid::Uuid;

use super::{fmt_time, opt, Ops, OpsError, Report, Table};
use crate::kafka::{partition_for, PARTITIONS};
use crate::scheduler::{Scheduler, SchedulerConfig};

/// Where a hold's expiry is in Redis.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum Place {
    /// Waiting in shard `shard`'s due set; published at `due_at`.
    #[serde(rename_all = "camelCase")]
    Due { shard: i32, due_at: DateTime<Utc> },
    /// Claimed by a scheduler, not yet acknowledged by Kafka; claimed again after `lease_until`.
    #[serde(rename_all = "camelCase")]
    InFlight { shard: i32, since: DateTime<Utc>, lease_until: DateTime<Utc> },
    /// Paid or cancelled: removed, with a tombstone so a late `reservation.created` cannot re-add it.
    Tombstoned,
    /// Nowhere in Redis.
    Absent,
}

impl Place {
    fn describe(&self) -> String {
        match self {
            Place::Due { shard, due_at } => format!("due at {} on shard {shard}", fmt_time(due_at)),
            Place::InFlight { shard, since, lease_until } => {
                format!("in flight on shard {shard} since {}, lease until {}", fmt_time(since), fmt_time(lease_until))
            }
            Place::Tombstoned => "tombstoned (paid or cancelled)".into(),
            Place::Absent => "absent".into(),
        }
    }
}

/// The reservation as PostgreSQL has it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PgState {
    pub status: String,
    pub expires_at: DateTime<Utc>,
}

/// `scheduler find`: both sides, and what is wrong between them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Found {
    pub reservation_id: Uuid,
    pub redis: Place,
    pub postgres: Option<PgState>,
    pub warnings: Vec<String>,
}

impl Report for Found {
    fn table(&self) -> String {
        let mut t = Table::new(&["reservation", "redis", "postgres"]);
        let pg = self.postgres.as_ref().map_or("not found".to_string(), |p| format!("{} (expires {})", p.status, fmt_time(&p.expires_at)));
        t.row(&[self.reservation_id.to_string(), self.redis.describe(), pg]);
        let mut out = t.to_string();
        for w in &self.warnings {
            out.push_str(&format!("WARNING: {w}\n"));
        }
        out
    }
}

/// Score of `member` in `key` (ms), if present.
async fn score(conn: &mut crate::redis_conn::RedisConn, key: &str, member: &str) -> Result<Option<i64>, OpsError> {
    let s: Option<f64> = conn.zscore(key, member).await?;
    Ok(s.map(|s| s as i64))
}

fn ms(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t).unwrap_or_default()
}

/// Where `reservation`'s expiry is. Every shard is looked at: the shard is the partition the
/// `reservation.created` arrived on, which every producer sets with [`partition_for`], but a
/// member found elsewhere is still worth showing.
pub async fn find(ops: &Ops, reservation: Uuid) -> Result<Found, OpsError> {
    let mut conn = ops.redis()?;
    let member = reservation.to_string();
    let home = partition_for(&member, PARTITIONS);
    let mut shards: Vec<i32> = vec![home];
    shards.extend((0..PARTITIONS).filter(|s| *s != home));
    let mut place = Place::Absent;
    for shard in shards {
        if let Some(until) = score(&mut conn, &ops.keys.sched_inflight(shard), &member).await? {
            let lease = chrono::Duration::from_std(ops.lease).unwrap_or_default();
            place = Place::InFlight { shard, since: ms(until) - lease, lease_until: ms(until) };
            break;
        }
        if let Some(due) = score(&mut conn, &ops.keys.sched_due(shard), &member).await? {
            place = Place::Due { shard, due_at: ms(due) };
            break;
        }
    }
    // A cancellation leaves a tombstone in every shard (each shard's script reads only its slot).
    let mut tombstone = false;
    for shard in 0..PARTITIONS {
        tombstone |= conn.exists::<_, bool>(ops.keys.sched_cancelled(shard, reservation)).await?;
    }
    if place == Place::Absent && tombstone {
        place = Place::Tombstoned;
    }
    let postgres: Option<PgState> = sqlx::query_as::<_, (String, DateTime<Utc>)>("SELECT status, expires_at FROM reservations WHERE id = $1")
        .bind(reservation)
        .fetch_optional(&ops.pool)
        .await?
        .map(|(status, expires_at)| PgState { status, expires_at });
    let warnings = disagreements(&place, tombstone, postgres.as_ref());
    Ok(Found { reservation_id: reservation, redis: place, postgres, warnings })
}

/// What an operator should know when Redis and PostgreSQL do not tell the same story.
fn disagreements(place: &Place, tombstone: bool, pg: Option<&PgState>) -> Vec<String> {
    let mut w = Vec::new();
    let Some(pg) = pg else {
        if *place != Place::Absent {
            w.push("pending in Redis but no such reservation in PostgreSQL: its expiration will change nothing".into());
        }
        return w;
    };
    let held = pg.status == "HELD";
    match place {
        Place::Absent if held => w.push(
            "HELD in PostgreSQL but nowhere in Redis: no expiration will be published; run `bookingctl scheduler rearm` \
             (otherwise the expirer's sweeper ends it after its grace)"
                .into(),
        ),
        Place::Tombstoned if held => w.push(
            "HELD in PostgreSQL but tombstoned in Redis: no expiration will be published; the expirer's sweeper will end it".into(),
        ),
        Place::Due { due_at, .. } if held && due_at.timestamp_millis() != crate::scheduler::due_ms(pg.expires_at) => {
            w.push(format!("due in Redis at {} but expires at {} in PostgreSQL", fmt_time(due_at), fmt_time(&pg.expires_at)))
        }
        Place::Due { .. } | Place::InFlight { .. } if !held => w.push(format!(
            "{} in PostgreSQL but still pending in Redis: its expiration will change nothing",
            pg.status
        )),
        _ => {}
    }
    if tombstone && matches!(place, Place::Due { .. } | Place::InFlight { .. }) {
        w.push("tombstoned and pending at once: the cancellation raced the claim; the expirer's conditional update decides".into());
    }
    w
}

/// One pending expiry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub reservation_id: String,
    pub shard: i32,
    /// `due` or `inFlight`.
    pub state: &'static str,
    /// When it is due, or when its lease runs out.
    pub at: DateTime<Utc>,
}

/// `scheduler list`.
#[derive(Debug, Clone, Serialize)]
pub struct PendingList(pub Vec<Pending>);

impl Report for PendingList {
    fn table(&self) -> String {
        let mut t = Table::new(&["due / lease until", "shard", "state", "reservation"]);
        for p in &self.0 {
            t.row(&[fmt_time(&p.at), p.shard.to_string(), p.state.to_string(), p.reservation_id.clone()]);
        }
        t.to_string()
    }
}

/// The pending expiries (due and in flight), earliest first, of one shard or all, at most
/// `limit`; with `due_before`, only the due ones before it, and every in-flight one (already due).
pub async fn list(ops: &Ops, shard: Option<i32>, due_before: Option<DateTime<Utc>>, limit: usize) -> Result<PendingList, OpsError> {
    if let Some(s) = shard {
        if !(0..PARTITIONS).contains(&s) {
            return Err(OpsError::Usage(format!("--shard must be between 0 and {}", PARTITIONS - 1)));
        }
    }
    let mut conn = ops.redis()?;
    let max = due_before.map_or("+inf".to_string(), |t| t.timestamp_millis().to_string());
    let mut out = Vec::new();
    for s in shard.map_or((0..PARTITIONS).collect::<Vec<_>>(), |s| vec![s]) {
        // An in-flight hold was due when it was claimed, and its score is the lease's deadline,
        // not its due time: it is listed whatever `due_before` says.
        for (key, state, max) in [(ops.keys.sched_due(s), "due", max.as_str()), (ops.keys.sched_inflight(s), "inFlight", "+inf")] {
            let members: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(max)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn)
                .await?;
            out.extend(members.into_iter().map(|(m, sc)| Pending { reservation_id: m, shard: s, state, at: ms(sc as i64) }));
        }
    }
    out.sort_by_key(|p| p.at);
    out.truncate(limit);
    Ok(PendingList(out))
}

/// `scheduler rearm`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rearmed {
    /// HELD holds in PostgreSQL when the re-arm started.
    pub held: i64,
    /// Of those, missing from Redis and added back now.
    pub missing: usize,
}

impl Report for Rearmed {
    fn table(&self) -> String {
        format!("{} HELD holds in PostgreSQL; {} were missing from Redis and are re-armed\n", self.held, self.missing)
    }
}

/// The number of HELD holds `rearm` walks (for the confirmation question).
pub async fn held_count(ops: &Ops) -> Result<i64, OpsError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM reservations WHERE status = 'HELD'").fetch_one(&ops.pool).await?)
}

/// Re-adds every HELD hold to its shard and reports how many were missing: the scheduler's own
/// re-arm ([`Scheduler::rearm`], `ZADD NX` in pages, tombstones respected) over every shard, at
/// once instead of at its next `--rearm-interval`.
pub async fn rearm(ops: &Ops, pb: &indicatif::ProgressBar) -> Result<Rearmed, OpsError> {
    let redis = ops.redis()?;
    let held = held_count(ops).await?;
    // Only `rearm` is used: the loop settings below are never read.
    let cfg = SchedulerConfig {
        batch_size: 1,
        lease: ops.lease,
        poll_interval: std::time::Duration::from_secs(1),
        rearm_interval: std::time::Duration::from_secs(3600),
    };
    let scheduler = Scheduler::new(redis, ops.keys.clone(), ops.producer.clone(), ops.topics.clone(), cfg);
    pb.set_length(held.max(0) as u64);
    pb.set_message("re-arming HELD holds");
    let missing = scheduler
        .rearm_reporting(&ops.pool, &(0..PARTITIONS).collect(), |n| pb.inc(n))
        .await
        .map_err(|e| OpsError::Scheduler(e.to_string()))?;
    pb.finish_and_clear();
    let report = Rearmed { held, missing };
    ops.audit("scheduler rearm", serde_json::json!({"held": held, "readded": missing})).await;
    Ok(report)
}

/// One shard's figures for `status`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    pub shard: i32,
    pub due: Option<u64>,
    pub in_flight: Option<u64>,
    pub next_due: Option<DateTime<Utc>>,
}

/// A shard's pipeline reply: due count, in-flight count, and the first due member with its score.
type ShardCounts = (u64, u64, Vec<(String, f64)>);

/// Due, in flight and next due of every shard (counts are `None` when Redis is unreachable).
pub async fn shards(ops: &Ops) -> Vec<ShardStatus> {
    let mut out = Vec::new();
    for shard in 0..PARTITIONS {
        let mut st = ShardStatus { shard, due: None, in_flight: None, next_due: None };
        if let Ok(mut conn) = ops.redis() {
            let r: Result<ShardCounts, _> = redis::pipe()
                .zcard(ops.keys.sched_due(shard))
                .zcard(ops.keys.sched_inflight(shard))
                .zrange_withscores(ops.keys.sched_due(shard), 0, 0)
                .query_async(&mut conn)
                .await;
            if let Ok((due, inflight, first)) = r {
                st = ShardStatus { shard, due: Some(due), in_flight: Some(inflight), next_due: first.first().map(|(_, s)| ms(*s as i64)) };
            }
        }
        out.push(st);
    }
    out
}

pub(crate) fn shard_rows(t: &mut Table, shards: &[ShardStatus]) {
    for s in shards {
        t.row(&[s.shard.to_string(), opt(&s.due), opt(&s.in_flight), s.next_due.as_ref().map_or("-".into(), fmt_time)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(status: &str, at: i64) -> PgState {
        PgState { status: status.into(), expires_at: ms(at) }
    }

    #[test]
    fn a_held_hold_nowhere_in_redis_is_flagged_and_a_due_one_is_not() {
        assert_eq!(disagreements(&Place::Absent, false, Some(&pg("HELD", 5))).len(), 1);
        assert!(disagreements(&Place::Due { shard: 0, due_at: ms(5) }, false, Some(&pg("HELD", 5))).is_empty());
        assert!(disagreements(&Place::Tombstoned, true, Some(&pg("CONFIRMED", 5))).is_empty());
        assert_eq!(disagreements(&Place::Due { shard: 0, due_at: ms(5) }, false, Some(&pg("CONFIRMED", 5))).len(), 1);
    }
}
