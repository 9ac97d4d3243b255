//! The expirer: ends holds that were not paid in time (brief §5 "Expiry", §6).
//!
//! Three paths reach the same kind of update, all with the same conditional statement
//! `UPDATE reservations SET status = 'EXPIRED' … WHERE … AND status = 'HELD'`, so whichever runs
//! first wins and the others change nothing (one EXPIRED transition, one notification):
//! - the consumer of `reservation.expiration` ([`ExpirationHandler`]), the normal, on-time path;
//! - the sweeper ([`sweep`]), an index range scan over HELD holds past `expires_at + grace`, the
//!   last net when Redis, Kafka or the scheduler lost something (§8-1 "fallback scheduler");
//! - the design document's old way ([`legacy_scan`], `--mode before`), kept for comparison and
//!   as the §9-2 rollback.
//! The seat is freed by the same statement: a seat's status is derived from its reservations.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::kafka::{Envelope, EventType, HandleError, Handler, Incoming, Topics};
use crate::reservation::{expired_effects, Reservation, ReservationEvent};

const COLUMNS: &str = "id, user_id, seat_id, schedule_id, status, price, created_at, expires_at, \
                       expired_at, confirmed_at, cancelled_at";

fn observe(path: &'static str, r: &Reservation) {
    let late = r.expired_at.map(|at| (at - r.expires_at).num_microseconds().unwrap_or(0) as f64 / 1e6).unwrap_or(0.0);
    metrics::histogram!("expiry_lateness_seconds", "path" => path).record(late);
    metrics::counter!("expiry_transitions_total", "path" => path).increment(1);
}

/// Expires the holds among `ids` that are still HELD, in one transaction: the conditional update
/// of §8-2 and each one's `RESERVATION_EXPIRED` notification. Returns how many changed; the
/// others were already final.
pub async fn expire(pool: &PgPool, topics: &Topics, ids: &[Uuid], path: &'static str) -> Result<usize, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let rows: Vec<Reservation> = sqlx::query_as(&format!(
        "UPDATE reservations SET status = 'EXPIRED', expired_at = clock_timestamp()
         WHERE id = ANY($1) AND status = 'HELD' RETURNING {COLUMNS}"
    ))
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    commit_expired(tx, topics, &rows, path).await?;
    let unchanged = ids.len().saturating_sub(rows.len());
    metrics::counter!("expiry_already_final_total", "path" => path).increment(unchanged as u64);
    Ok(rows.len())
}

/// Writes the effects of holds that just turned EXPIRED, commits, then records their lateness.
async fn commit_expired(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    topics: &Topics,
    rows: &[Reservation],
    path: &'static str,
) -> Result<(), sqlx::Error> {
    for r in rows {
        expired_effects(&mut tx, topics, r).await?;
    }
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
}

impl Handler for ExpirationHandler {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = Envelope::<ReservationEvent>::parse(&msg.payload, EventType::ReservationExpiration).map_err(HandleError::Poison)?;
        // How long the message took from its due time to reach us (broker append time).
        if let Some(ts) = msg.timestamp_ms {
            let late = (ts - env.payload.expires_at.timestamp_millis()) as f64 / 1000.0;
            metrics::histogram!("expiry_message_lateness_seconds").record(late);
        }
        expire(&self.pool, &self.topics, &[env.payload.reservation_id], "pipeline").await?;
        Ok(())
    }

    /// Expires every hold of the batch in one transaction (one commit instead of one per hold:
    /// what keeps the expirer on time when thousands of holds fall due in the same second).
    async fn handle_batch(&self, msgs: &[Incoming]) -> Vec<Result<(), HandleError>> {
        let mut out: Vec<Result<(), HandleError>> = Vec::with_capacity(msgs.len());
        let mut ids = Vec::new();
        for msg in msgs {
            match Envelope::<ReservationEvent>::parse(&msg.payload, EventType::ReservationExpiration) {
                Ok(env) => {
                    if let Some(ts) = msg.timestamp_ms {
                        let late = (ts - env.payload.expires_at.timestamp_millis()) as f64 / 1000.0;
                        metrics::histogram!("expiry_message_lateness_seconds").record(late);
                    }
                    ids.push(env.payload.reservation_id);
                    out.push(Ok(()));
                }
                Err(reason) => out.push(Err(HandleError::Poison(reason))),
            }
        }
        if let Err(e) = expire(&self.pool, &self.topics, &ids, "pipeline").await {
            if crate::kafka::is_data_error(&e) {
                // One hold's data is refused: expire them one by one, so only that one is poison.
                for (msg, r) in msgs.iter().zip(out.iter_mut()) {
                    if r.is_ok() {
                        *r = self.handle(msg).await;
                    }
                }
                return out;
            }
            let reason = format!("database: {e}");
            for r in out.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(HandleError::Transient(reason.clone()));
            }
        }
        out
    }
}

/// Expires, in one statement, at most `limit` HELD holds whose expiry passed more than `grace`
/// ago. The partial index `reservations_held_by_expiry` makes this a range scan over exactly the
/// overdue rows; `SKIP LOCKED` lets several expirers sweep side by side.
pub async fn sweep(pool: &PgPool, topics: &Topics, grace: Duration, limit: i64) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
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
        n += expire(pool, topics, &[id], "legacy").await?;
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
