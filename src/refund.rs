//! Refunds (issue 13): a paid seat comes back.
//!
//! `POST /v1/reservations/{id}/refund`, owner only, once per `Idempotency-Key`, allowed while the
//! reservation is CONFIRMED and its schedule starts more than the refund cutoff from now (by
//! PostgreSQL's clock, like every other time rule). In one transaction:
//! - the reservation becomes REFUNDED: the partial unique index `reservations_one_active_per_seat`
//!   counts only HELD and CONFIRMED rows, so this same UPDATE makes the seat AVAILABLE again;
//! - the price goes back to the balance, with a `REFUND` ledger line;
//! - the outbox gets `payment.refunded` (key reservationId) and a `PAYMENT_REFUNDED` notification.
//!
//! Either all of it commits or none; a retry with the same key replays the stored answer. The
//! ranking and the data-platform export are changed by the worker's consumer of
//! `payment.refunded`, each once per refund (see [`crate::ranking::unrecord`] and
//! [`crate::worker::PaymentHandler`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::idempotency::{self, Claim};
use crate::kafka::{Envelope, EventType, Topics};
use crate::notification::{self, Kind, NotificationRequest};
use crate::outbox;
use crate::points::{self, Movement};

/// Payload of `payment.refunded`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRefunded {
    pub payment_id: Uuid,
    pub reservation_id: Uuid,
    pub user_id: Uuid,
    pub schedule_id: Uuid,
    pub seat_id: Uuid,
    pub amount: i64,
    pub refunded_at: DateTime<Utc>,
    /// When the refunded payment was made: the ranking takes a payment older than its memory
    /// off without finding it in its counted set (see `ranking::unrecord`). Absent from messages
    /// written before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<DateTime<Utc>>,
}

/// What a refund tells the caller (also the stored idempotent answer).
pub struct Refunded {
    pub status: u16,
    pub body: Value,
}

/// Refunds `reservation` for `user`, once per `key`; `cutoff` is how long before the show
/// refunds close.
pub async fn refund(pool: &PgPool, topics: &Topics, user: Uuid, key: &str, reservation: Uuid, cutoff: Duration) -> Result<Refunded> {
    let fp = idempotency::fingerprint(&[b"refund", reservation.as_bytes()]);
    let mut tx = crate::db::begin(pool).await?;
    if let Claim::Replay { status, body } = idempotency::claim(&mut tx, user, "refund", key, &fp).await? {
        return Ok(Refunded { status, body });
    }

    // Lock the reservation: a concurrent refund with another key waits here, then sees REFUNDED.
    // Someone else's reservation is "not found", as for every other reservation route.
    let row: Option<(String, Uuid, Uuid, bool)> = sqlx::query_as(
        "SELECT r.status, r.schedule_id, r.seat_id,
                s.starts_at > clock_timestamp() + make_interval(secs => $3::float8)
         FROM reservations r JOIN schedules s ON s.id = r.schedule_id
         WHERE r.id = $1 AND r.user_id = $2 FOR UPDATE OF r",
    )
    .bind(reservation)
    .bind(user)
    .bind(cutoff.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let (status, schedule_id, seat_id, window_open) = row.ok_or(Error::NotFound("reservation"))?;
    if status != "CONFIRMED" {
        metrics::counter!("refunds_total", "outcome" => "NOT_CONFIRMED").increment(1);
        return Err(Error::NotConfirmed);
    }
    if !window_open {
        metrics::counter!("refunds_total", "outcome" => "REFUND_WINDOW_CLOSED").increment(1);
        return Err(Error::RefundWindowClosed);
    }

    let (payment_id, amount, paid_at): (Uuid, i64, DateTime<Utc>) = sqlx::query_as("SELECT id, amount, paid_at FROM payments WHERE reservation_id = $1")
        .bind(reservation)
        .fetch_one(&mut *tx)
        .await?;
    let refunded_at: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE reservations SET status = 'REFUNDED', refunded_at = clock_timestamp() WHERE id = $1 RETURNING refunded_at",
    )
    .bind(reservation)
    .fetch_one(&mut *tx)
    .await?;
    let balance = points::apply(&mut tx, user, Movement::Refund, amount).await?.expect("a credit always applies");

    let key_str = reservation.to_string();
    let event = PaymentRefunded { payment_id, reservation_id: reservation, user_id: user, schedule_id, seat_id, amount, refunded_at, paid_at: Some(paid_at) };
    let note = NotificationRequest::new(
        Kind::PaymentRefunded,
        user,
        json!({"reservationId": reservation, "paymentId": payment_id, "scheduleId": schedule_id, "seatId": seat_id, "amount": amount}),
    );
    // A reservation is refunded at most once, so its id names the notification for good.
    outbox::enqueue_many(
        &mut tx,
        &[
            outbox::Row::new(&topics.payment_refunded, &key_str, &Envelope::new(EventType::PaymentRefunded, event)),
            notification::outbox_row(topics, notification::event_id(Kind::PaymentRefunded, &key_str), note),
        ],
    )
    .await?;

    let body = json!({
        "reservationId": reservation,
        "status": "REFUNDED",
        "refundedAmount": amount,
        "balance": balance,
        "refundedAt": refunded_at,
    });
    idempotency::complete(&mut tx, user, "refund", key, 200, &body).await?;
    tx.commit().await?;
    outbox::committed();
    metrics::counter!("refunds_total", "outcome" => "refunded").increment(1);
    Ok(Refunded { status: 200, body })
}
