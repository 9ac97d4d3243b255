//! Payment with points, in one transaction (brief §5):
//! the hold is locked and checked with [`reservation::check_payable`] against PostgreSQL's clock;
//! points drop by the price only if the balance covers it (conditional update, never negative);
//! the payment row, CONFIRMED, the ledger line, and the outbox rows for `payment.completed` and
//! the `PAYMENT_CONFIRMED` notification commit together or not at all. The ranking is not touched
//! here (design document §2-2, bottleneck 2): a consumer of `payment.completed` does it.

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
use crate::reservation::check_payable;

/// Payload of `payment.completed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PaymentCompleted {
    pub payment_id: Uuid,
    pub reservation_id: Uuid,
    pub user_id: Uuid,
    pub schedule_id: Uuid,
    pub seat_id: Uuid,
    pub amount: i64,
    pub paid_at: DateTime<Utc>,
}

/// What a successful payment tells the caller (also the stored idempotent answer).
pub struct Paid {
    pub status: u16,
    pub body: Value,
    /// Set when this call did the work (not a replay): the schedule whose queue place to free.
    pub schedule_id: Option<Uuid>,
}

/// Pays `reservation` for `user`, once per `key`.
pub async fn pay(pool: &PgPool, topics: &Topics, user: Uuid, key: &str, reservation: Uuid) -> Result<Paid> {
    let fp = idempotency::fingerprint(&[b"payment", reservation.as_bytes()]);
    let mut tx = pool.begin().await?;
    if let Claim::Replay { status, body } = idempotency::claim(&mut tx, user, "payment", key, &fp).await? {
        return Ok(Paid { status, body, schedule_id: None });
    }

    // Lock the hold; a concurrent payment with another key waits here and then sees CONFIRMED.
    let row: Option<(String, DateTime<Utc>, DateTime<Utc>, i64, Uuid, Uuid)> = sqlx::query_as(
        "SELECT status, expires_at, clock_timestamp(), price, schedule_id, seat_id
         FROM reservations WHERE id = $1 AND user_id = $2 FOR UPDATE",
    )
    .bind(reservation)
    .bind(user)
    .fetch_optional(&mut *tx)
    .await?;
    let (status, expires_at, now, price, schedule_id, seat_id) = row.ok_or(Error::NotFound("reservation"))?;
    if let Err(e) = check_payable(&status, expires_at, now) {
        metrics::counter!("payments_total", "outcome" => e.code()).increment(1);
        return Err(e);
    }

    // Each statement below is a round trip inside the transaction, and under a spike round trips
    // are what a payment costs (the row locks are held across them): the balance and its ledger
    // line are one statement (`points::apply`), the payment and the reservation's confirmation
    // another, the two outbox rows a third.
    let balance = points::apply(&mut tx, user, Movement::Use, price).await?;
    let Some(balance) = balance else {
        metrics::counter!("payments_total", "outcome" => "INSUFFICIENT_POINTS").increment(1);
        return Err(Error::InsufficientPoints);
    };
    let payment_id = Uuid::new_v4();
    let paid_at: DateTime<Utc> = sqlx::query_scalar(
        "WITH p AS (INSERT INTO payments (id, reservation_id, user_id, amount) VALUES ($1, $2, $3, $4) RETURNING paid_at)
         UPDATE reservations r SET status = 'CONFIRMED', confirmed_at = p.paid_at FROM p WHERE r.id = $2
         RETURNING p.paid_at",
    )
    .bind(payment_id)
    .bind(reservation)
    .bind(user)
    .bind(price)
    .fetch_one(&mut *tx)
    .await?;

    let event = PaymentCompleted { payment_id, reservation_id: reservation, user_id: user, schedule_id, seat_id, amount: price, paid_at };
    let key_str = reservation.to_string();
    let note = NotificationRequest::new(
        Kind::PaymentConfirmed,
        user,
        json!({"reservationId": reservation, "paymentId": payment_id, "scheduleId": schedule_id, "seatId": seat_id, "amount": price}),
    );
    outbox::enqueue_many(
        &mut tx,
        &[
            outbox::Row::new(&topics.payment_completed, &key_str, &Envelope::new(EventType::PaymentCompleted, event)),
            notification::outbox_row(topics, notification::event_id(Kind::PaymentConfirmed, &key_str), note),
        ],
    )
    .await?;

    let body = json!({
        "paymentId": payment_id,
        "reservationId": reservation,
        "amount": price,
        "status": "CONFIRMED",
        "balance": balance,
        "paidAt": paid_at,
    });
    idempotency::complete(&mut tx, user, "payment", key, 201, &body).await?;
    tx.commit().await?;
    outbox::committed();
    metrics::counter!("payments_total", "outcome" => "confirmed").increment(1);
    Ok(Paid { status: 201, body, schedule_id: Some(schedule_id) })
}
