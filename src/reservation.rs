//! Seat holds: take, read, cancel — and THE rule of this product:
//!
//! **A hold can be paid only while it is `HELD` and its `expiresAt` is still in the future by
//! PostgreSQL's clock** ([`check_payable`]). The expirer may be late or down; it does not matter,
//! because payment checks the clock itself on the locked row. For the same reason a hold past its
//! `expiresAt` counts as free for the next customer: [`hold`] expires it in the same transaction.
//!
//! "At most one HELD or CONFIRMED reservation per seat" is enforced by PostgreSQL itself: the
//! partial unique index `reservations_one_active_per_seat`. Of many simultaneous requests for one
//! seat, one insert wins and the others get `SEAT_UNAVAILABLE` as soon as the winner commits;
//! nobody queues on a distributed lock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::kafka::{Envelope, EventType, Topics};
use crate::notification::{self, Kind, NotificationRequest};
use crate::outbox;

/// A reservation as its owner sees it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    #[sqlx(rename = "id")]
    pub reservation_id: Uuid,
    #[serde(skip)]
    pub user_id: Uuid,
    pub seat_id: Uuid,
    pub schedule_id: Uuid,
    pub status: String,
    pub price: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancelled_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, user_id, seat_id, schedule_id, status, price, created_at, expires_at, \
                       expired_at, confirmed_at, cancelled_at";

/// Payload of `reservation.created`, `reservation.expiration` and `reservation.cancelled`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReservationEvent {
    pub reservation_id: Uuid,
    pub user_id: Uuid,
    pub seat_id: Uuid,
    pub schedule_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

impl From<&Reservation> for ReservationEvent {
    fn from(r: &Reservation) -> Self {
        Self {
            reservation_id: r.reservation_id,
            user_id: r.user_id,
            seat_id: r.seat_id,
            schedule_id: r.schedule_id,
            expires_at: r.expires_at,
        }
    }
}

/// THE RULE (see the module comment): may a reservation in `status`, expiring at `expires_at`,
/// be paid at `now`?
pub fn check_payable(status: &str, expires_at: DateTime<Utc>, now: DateTime<Utc>) -> Result<()> {
    match status {
        "HELD" if expires_at > now => Ok(()),
        "HELD" | "EXPIRED" => Err(Error::ReservationExpired),
        _ => Err(Error::NotHeld),
    }
}

/// Looks up the schedule a seat belongs to.
pub async fn seat_schedule(pool: &PgPool, seat: Uuid) -> Result<Uuid> {
    let s: Option<Uuid> = sqlx::query_scalar("SELECT schedule_id FROM seats WHERE id = $1")
        .bind(seat)
        .fetch_optional(pool)
        .await?;
    s.ok_or(Error::NotFound("seat"))
}

/// Holds `seat` for `user` for `ttl`, or fails with `SEAT_UNAVAILABLE`.
pub async fn hold(pool: &PgPool, topics: &Topics, user: Uuid, seat: Uuid, ttl: Duration) -> Result<Reservation> {
    // Fast path: most losers of a seat fight see the winner's committed row and leave at once,
    // without touching any lock. The unique index below stays the actual guarantee.
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM reservations WHERE seat_id = $1
                         AND (status = 'CONFIRMED' OR (status = 'HELD' AND expires_at > now())))",
    )
    .bind(seat)
    .fetch_one(pool)
    .await?;
    if taken {
        metrics::counter!("holds_total", "outcome" => "unavailable").increment(1);
        return Err(Error::SeatUnavailable);
    }

    let mut tx = pool.begin().await?;
    let price: Option<(Uuid, i64)> = sqlx::query_as("SELECT schedule_id, price FROM seats WHERE id = $1")
        .bind(seat)
        .fetch_optional(&mut *tx)
        .await?;
    let (schedule, price) = price.ok_or(Error::NotFound("seat"))?;

    // A hold past its expiry no longer blocks the seat: end it here, as the expirer would.
    let stale: Vec<Reservation> = sqlx::query_as(&format!(
        "UPDATE reservations SET status = 'EXPIRED', expired_at = clock_timestamp()
         WHERE seat_id = $1 AND status = 'HELD' AND expires_at <= clock_timestamp()
         RETURNING {COLUMNS}"
    ))
    .bind(seat)
    .fetch_all(&mut *tx)
    .await?;
    for r in &stale {
        expired_effects(&mut tx, topics, r).await?;
        metrics::counter!("expiry_transitions_total", "path" => "hold_takeover").increment(1);
    }

    let ttl_ms = ttl.as_millis() as i64;
    let created: Option<Reservation> = sqlx::query_as(&format!(
        "INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, expires_at)
         VALUES ($1, $2, $3, $4, $5, 'HELD', now() + make_interval(secs => $6::float8 / 1000))
         ON CONFLICT (seat_id) WHERE status IN ('HELD', 'CONFIRMED') DO NOTHING
         RETURNING {COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(user)
    .bind(seat)
    .bind(schedule)
    .bind(price)
    .bind(ttl_ms)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(r) = created else {
        metrics::counter!("holds_total", "outcome" => "unavailable").increment(1);
        return Err(Error::SeatUnavailable);
    };
    let key = r.reservation_id.to_string();
    outbox::enqueue(&mut tx, &topics.reservation_created, &key, &Envelope::new(EventType::ReservationCreated, ReservationEvent::from(&r))).await?;
    tx.commit().await?;
    outbox::committed();
    metrics::counter!("holds_total", "outcome" => "held").increment(1);
    Ok(r)
}

/// The effects of a hold turning EXPIRED, written in the transaction that expired it: the
/// `RESERVATION_EXPIRED` notification (its event id is derived from the reservation, so it can
/// exist only once).
pub async fn expired_effects(tx: &mut PgConnection, topics: &Topics, r: &Reservation) -> Result<(), sqlx::Error> {
    let req = NotificationRequest::new(
        Kind::ReservationExpired,
        r.user_id,
        json!({"reservationId": r.reservation_id, "scheduleId": r.schedule_id, "seatId": r.seat_id}),
    );
    let id = notification::event_id(Kind::ReservationExpired, &r.reservation_id.to_string());
    notification::enqueue(tx, topics, id, req).await
}

/// A reservation of `user` (someone else's is "not found").
pub async fn get(pool: &PgPool, user: Uuid, id: Uuid) -> Result<Reservation> {
    let r: Option<Reservation> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM reservations WHERE id = $1 AND user_id = $2"))
        .bind(id)
        .bind(user)
        .fetch_optional(pool)
        .await?;
    r.ok_or(Error::NotFound("reservation"))
}

/// Cancels a live hold of `user`; the seat is free again at commit.
pub async fn cancel(pool: &PgPool, topics: &Topics, user: Uuid, id: Uuid) -> Result<Reservation> {
    let mut tx = pool.begin().await?;
    let r: Option<Reservation> = sqlx::query_as(&format!(
        "UPDATE reservations SET status = 'CANCELLED', cancelled_at = clock_timestamp()
         WHERE id = $1 AND user_id = $2 AND status = 'HELD' AND expires_at > clock_timestamp()
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(user)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(r) = r else {
        drop(tx);
        get(pool, user, id).await?; // 404 for a missing or foreign reservation
        return Err(Error::NotHeld);
    };
    let key = r.reservation_id.to_string();
    outbox::enqueue(&mut tx, &topics.reservation_cancelled, &key, &Envelope::new(EventType::ReservationCancelled, ReservationEvent::from(&r))).await?;
    tx.commit().await?;
    outbox::committed();
    metrics::counter!("cancellations_total").increment(1);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration as D;

    #[test]
    fn a_hold_is_payable_only_before_its_expiry() {
        let now = Utc::now();
        assert!(check_payable("HELD", now + D::milliseconds(1), now).is_ok());
        assert!(matches!(check_payable("HELD", now, now), Err(Error::ReservationExpired)));
        assert!(matches!(check_payable("HELD", now - D::seconds(10), now), Err(Error::ReservationExpired)));
        assert!(matches!(check_payable("EXPIRED", now + D::seconds(10), now), Err(Error::ReservationExpired)));
        assert!(matches!(check_payable("CONFIRMED", now + D::seconds(10), now), Err(Error::NotHeld)));
        assert!(matches!(check_payable("CANCELLED", now + D::seconds(10), now), Err(Error::NotHeld)));
    }
}
