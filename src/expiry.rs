//! The expirer: ends holds that were not paid in time (brief §5 "Expiry", §6).
//!
//! Three paths reach the same kind of update, all with the same conditional statement
//! `UPDATE reservations SET status = 'EXPIRED' … WHERE … AND status = 'HELD' AND expires_at <=
//! clock_timestamp()`, so whichever runs first wins and the others change nothing (one EXPIRED
//! transition, one notification), and no path ever ends a hold before its `expiresAt` by
//! PostgreSQL's clock, the clock the payment checks (`reservation::check_payable`). The scheduler
//! claims by Redis's clock; if that runs ahead, a `reservation.expiration` arrives early: the
//! expirer leaves the hold HELD, puts it back into the scheduler's due set shifted by the clocks'
//! difference (durable before the message's offset is stored), and expires it itself when it is
//! due ([`ExpirationHandler`]):
//! - the consumer of `reservation.expiration` ([`ExpirationHandler`]), the normal, on-time path;
//! - the sweeper ([`sweep`]), an index range scan over HELD holds past `expires_at + grace`, the
//!   last net when Redis, Kafka or the scheduler lost something (§8-1 "fallback scheduler");
//! - the design document's old way ([`legacy_scan`], `--mode before`), kept for comparison and
//!   as the §9-2 rollback.
//!
//! The seat is freed by the same statement: a seat's status is derived from its reservations.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::kafka::{Envelope, EventType, HandleError, Handler, Incoming, Topics};
use crate::keys::Keys;
use crate::redis_conn::RedisConn;
use crate::reservation::{expired_row, status_is, Reservation, ReservationEvent, COLUMNS};

fn observe(path: &'static str, r: &Reservation) {
    let late = r.expired_at.map(|at| (at - r.expires_at).num_microseconds().unwrap_or(0) as f64 / 1e6).unwrap_or(0.0);
    metrics::histogram!("expiry_lateness_seconds", "path" => path).record(late);
    metrics::counter!("expiry_transitions_total", "path" => path).increment(1);
}

/// What [`expire`] did.
#[derive(Debug)]
pub struct Expired {
    /// Holds that turned EXPIRED.
    pub expired: usize,
    /// Holds left HELD because their `expiresAt` is still ahead by PostgreSQL's clock.
    pub early: Vec<ReservationEvent>,
    /// PostgreSQL's clock when `early` was read.
    pub db_now: DateTime<Utc>,
}

/// Expires the holds among `ids` that are still HELD and due by PostgreSQL's clock, in one
/// transaction: the conditional update of §8-2 and each one's `RESERVATION_EXPIRED`
/// notification. Holds still HELD but not yet due are left alone and returned as `early`; the
/// others were already final.
pub async fn expire(pool: &PgPool, topics: &Topics, ids: &[Uuid], path: &'static str) -> Result<Expired, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Expired { expired: 0, early: Vec::new(), db_now: Utc::now() });
    }
    let mut tx = crate::db::begin(pool).await?;
    // By primary key, however many holds are live (`status_is`: the statistics lag a burst).
    let rows: Vec<Reservation> = sqlx::query_as(&format!(
        "UPDATE reservations SET status = 'EXPIRED', expired_at = clock_timestamp()
         WHERE id = ANY($1) AND {held} AND expires_at <= clock_timestamp() RETURNING {COLUMNS}",
        held = status_is("HELD"),
    ))
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    // In the same transaction, after the update: a hold still HELD was not due when the update
    // looked (the time is the only condition left). Not asked when every id just expired (the
    // burst's case: one round trip less per batch).
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    /// A hold still HELD: id, user, seat, schedule, `expires_at`, and PostgreSQL's clock.
    type Early = (Uuid, Uuid, Uuid, Uuid, DateTime<Utc>, DateTime<Utc>);
    let early: Vec<Early> = if rows.len() == distinct {
        Vec::new()
    } else {
        sqlx::query_as(&format!(
            "SELECT id, user_id, seat_id, schedule_id, expires_at, clock_timestamp() FROM reservations
             WHERE id = ANY($1) AND {held}",
            held = status_is("HELD"),
        ))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?
    };
    commit_expired(tx, topics, &rows, path).await?;
    let db_now = early.first().map_or_else(Utc::now, |r| r.5);
    let early: Vec<ReservationEvent> = early
        .into_iter()
        .map(|(reservation_id, user_id, seat_id, schedule_id, expires_at, _)| ReservationEvent { reservation_id, user_id, seat_id, schedule_id, expires_at })
        .collect();
    let unchanged = distinct.saturating_sub(rows.len() + early.len());
    metrics::counter!("expiry_already_final_total", "path" => path).increment(unchanged as u64);
    Ok(Expired { expired: rows.len(), early, db_now })
}

/// Longest an early hold is timed in-process by the expirer; past that only the scheduler's
/// copy (put back by [`ExpirationHandler`]) brings it back.
const MAX_EARLY_WAIT: Duration = Duration::from_secs(600);

/// Expires early holds when PostgreSQL's clock reaches their `expiresAt`, measured from `db_now`
/// (PostgreSQL's clock when they were found early). Best effort and in memory: their durable
/// copy is the one put back into the scheduler, and whichever comes first expires the hold (the
/// other changes nothing).
fn expire_when_due(pool: PgPool, topics: Topics, mut pending: Vec<ReservationEvent>, mut db_now: DateTime<Utc>) {
    tokio::spawn(async move {
        while let Some(next) = pending.iter().map(|e| e.expires_at).min() {
            let wait = (next - db_now).to_std().unwrap_or_default();
            if wait > MAX_EARLY_WAIT {
                return;
            }
            tokio::time::sleep(wait).await;
            let due: Vec<Uuid> = pending.iter().filter(|e| e.expires_at <= next).map(|e| e.reservation_id).collect();
            pending.retain(|e| e.expires_at > next);
            match expire(&pool, &topics, &due, "pipeline").await {
                Ok(out) => {
                    // Still early (the clocks moved apart): wait again from PostgreSQL's clock.
                    db_now = out.db_now;
                    pending.extend(out.early);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiring early holds on time failed; the scheduler's copy will");
                    return;
                }
            }
        }
    });
}

/// Writes the effects of holds that just turned EXPIRED, commits, then records their lateness.
async fn commit_expired(
    mut tx: crate::db::Tx,
    topics: &Topics,
    rows: &[Reservation],
    path: &'static str,
) -> Result<(), sqlx::Error> {
    // One statement for the whole batch's notifications.
    let effects: Vec<_> = rows.iter().map(|r| expired_row(topics, r)).collect();
    crate::outbox::enqueue_many(&mut tx, &effects).await?;
    tx.commit().await?;
    if !rows.is_empty() {
        crate::outbox::committed();
    }
    for r in rows {
        observe(path, r);
    }
    Ok(())
}

/// Consumer of `reservation.expiration`.
pub struct ExpirationHandler {
    pub pool: PgPool,
    pub topics: Topics,
    /// The scheduler's Redis and keys, to put early holds back.
    pub redis: RedisConn,
    pub keys: Keys,
}

impl ExpirationHandler {
    /// Holds whose expiration arrived before their `expiresAt` (by PostgreSQL's clock) go back
    /// into the scheduler's due set, before the message's offset is stored: a crash from here on
    /// loses nothing. They are also timed here, to expire exactly on time.
    async fn put_back(&self, out: &Expired) -> Result<(), redis::RedisError> {
        if out.early.is_empty() {
            return Ok(());
        }
        for ev in &out.early {
            tracing::info!(reservation = %ev.reservation_id, expires_at = %ev.expires_at, db_now = %out.db_now, "expiration arrived early; the hold goes back to the scheduler");
            crate::scheduler::put_back_early(&self.redis, &self.keys, ev, out.db_now).await?;
        }
        metrics::counter!("expiry_early_total").increment(out.early.len() as u64);
        expire_when_due(self.pool.clone(), self.topics.clone(), out.early.clone(), out.db_now);
        Ok(())
    }
}

impl Handler for ExpirationHandler {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = Envelope::<ReservationEvent>::parse(&msg.payload, EventType::ReservationExpiration).map_err(HandleError::Poison)?;
        // How long the message took from its due time to reach us (broker append time).
        if let Some(ts) = msg.timestamp_ms {
            let late = (ts - env.payload.expires_at.timestamp_millis()) as f64 / 1000.0;
            metrics::histogram!("expiry_message_lateness_seconds").record(late);
        }
        let out = expire(&self.pool, &self.topics, &[env.payload.reservation_id], "pipeline").await?;
        self.put_back(&out).await?;
        Ok(())
    }

    /// Expires every hold of the batch in one transaction (one commit instead of one per hold:
    /// what keeps the expirer on time when thousands of holds fall due in the same second).
    async fn handle_batch(&self, msgs: &[Incoming]) -> Vec<Result<(), HandleError>> {
        let mut out: Vec<Result<(), HandleError>> = Vec::with_capacity(msgs.len());
        let mut ids = Vec::new();
        // The hold of each message (None: poison).
        let mut hold_of = Vec::with_capacity(msgs.len());
        for msg in msgs {
            match Envelope::<ReservationEvent>::parse(&msg.payload, EventType::ReservationExpiration) {
                Ok(env) => {
                    if let Some(ts) = msg.timestamp_ms {
                        let late = (ts - env.payload.expires_at.timestamp_millis()) as f64 / 1000.0;
                        metrics::histogram!("expiry_message_lateness_seconds").record(late);
                    }
                    ids.push(env.payload.reservation_id);
                    hold_of.push(Some(env.payload.reservation_id));
                    out.push(Ok(()));
                }
                Err(reason) => {
                    hold_of.push(None);
                    out.push(Err(HandleError::Poison(reason)));
                }
            }
        }
        match expire(&self.pool, &self.topics, &ids, "pipeline").await {
            Ok(done) => {
                if let Err(e) = self.put_back(&done).await {
                    // Only the early ones are retried (the update is idempotent; they come back
                    // early and are put back then).
                    let early: std::collections::HashSet<Uuid> = done.early.iter().map(|e| e.reservation_id).collect();
                    for (r, hold) in out.iter_mut().zip(&hold_of) {
                        if hold.is_some_and(|h| early.contains(&h)) {
                            *r = Err(HandleError::Transient(format!("redis: {e}")));
                        }
                    }
                }
            }
            Err(e) if crate::kafka::is_data_error(&e) => {
                // One hold's data is refused: expire them one by one, so only that one is poison.
                for (msg, r) in msgs.iter().zip(out.iter_mut()) {
                    if r.is_ok() {
                        *r = self.handle(msg).await;
                    }
                }
            }
            Err(e) => {
                let reason = format!("database: {e}");
                for r in out.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(HandleError::Transient(reason.clone()));
                }
            }
        }
        out
    }
}

/// Expires, in one statement, at most `limit` HELD holds whose expiry passed more than `grace`
/// ago. The partial index `reservations_held_by_expiry` makes this a range scan over exactly the
/// overdue rows; `SKIP LOCKED` lets several expirers sweep side by side.
pub async fn sweep(pool: &PgPool, topics: &Topics, grace: Duration, limit: i64) -> Result<usize, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    let rows: Vec<Reservation> = sqlx::query_as(&format!(
        "UPDATE reservations SET status = 'EXPIRED', expired_at = clock_timestamp()
         WHERE id IN (SELECT id FROM reservations
                      WHERE status = 'HELD' AND expires_at < now() - make_interval(secs => $1::float8 / 1000)
                      ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
           AND status = 'HELD'
         RETURNING {COLUMNS}"
    ))
    .bind(grace.as_millis() as i64)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    commit_expired(tx, topics, &rows, "sweeper").await?;
    for r in &rows {
        tracing::warn!(reservation = %r.reservation_id, "sweeper caught a hold the pipeline missed");
    }
    metrics::counter!("sweeper_caught_total").increment(rows.len() as u64);
    Ok(rows.len())
}

/// The design document's "before" (§1-2, §4-1): find every HELD hold past its expiry, then
/// update them one by one, each in its own transaction.
pub async fn legacy_scan(pool: &PgPool, topics: &Topics) -> Result<usize, sqlx::Error> {
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM reservations WHERE status = 'HELD' AND expires_at < now()")
        .fetch_all(pool)
        .await?;
    let mut n = 0;
    for id in ids {
        n += expire(pool, topics, &[id], "legacy").await?.expired;
    }
    Ok(n)
}

/// Runs `work` every `interval` until `shutdown`, logging failures.
pub async fn every<F, Fut>(interval: Duration, name: &'static str, shutdown: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, sqlx::Error>>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let started = Utc::now();
        match work().await {
            Ok(n) if n > 0 => tracing::info!(task = name, expired = n, took_ms = (Utc::now() - started).num_milliseconds(), "expired holds"),
            Ok(_) => {}
            Err(e) => tracing::warn!(task = name, error = %e, "expiry task failed"),
        }
    }
}
