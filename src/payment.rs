//! Payment with points, in one transaction (brief §5):
//! the hold is locked and checked with [`reservation::check_payable`] against PostgreSQL's clock;
//! points drop by the price only if the balance covers it (conditional update, never negative);
//! the payment row, CONFIRMED, the ledger line, and the outbox rows for `payment.completed` and
//! the `PAYMENT_CONFIRMED` notification commit together or not at all. The ranking is not touched
//! here (design document §2-2, bottleneck 2): a consumer of `payment.completed` does it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::idempotency;
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

/// The claim row of [`pay`]: whether the key was fresh, the hold's status and `expires_at`,
/// PostgreSQL's clock, the hold's price, schedule and seat, and `now()` (the payment time).
type ClaimRow = (bool, Option<String>, Option<DateTime<Utc>>, DateTime<Utc>, Option<i64>, Option<Uuid>, Option<Uuid>, DateTime<Utc>);

/// Pays `reservation` for `user`, once per `key`.
///
/// Under a spike a payment costs its round trips, and the hold's row lock is held across them,
/// so the transaction is four: `BEGIN`; the key's claim with the hold's lock; one statement that
/// writes everything; `COMMIT` (it was eight, one per step).
pub async fn pay(pool: &PgPool, topics: &Topics, user: Uuid, key: &str, reservation: Uuid) -> Result<Paid> {
    let fp = idempotency::fingerprint(&[b"payment", reservation.as_bytes()]);
    let mut tx = crate::db::begin(pool).await?;

    // Lock the hold, then claim the key (see `idempotency`), in one statement: a concurrent
    // payment of this hold with another key waits on the lock and then sees CONFIRMED; a
    // concurrent retry with this key waits on the lock too, then finds the key taken and replays.
    // The claim reads the locked row (`lockfirst`), so every payment takes the two in the same
    // order and two of them cannot deadlock. `now()` is the transaction's timestamp: `paid_at`.
    let row: ClaimRow = sqlx::query_as(&format!(
        "WITH r AS MATERIALIZED (SELECT status, expires_at, price, schedule_id, seat_id FROM reservations
                                 WHERE id = $4 AND user_id = $1 FOR UPDATE),
              k AS ({claim})
         SELECT EXISTS (SELECT 1 FROM k), r.status, r.expires_at, clock_timestamp(), r.price, r.schedule_id, r.seat_id, now()
         FROM (SELECT 1) AS one LEFT JOIN r ON true",
        claim = idempotency::claim_sql("$1", "'payment'", "$2", "$3", "(SELECT count(*) FROM r) AS lockfirst"),
    ))
    .bind(user)
    .bind(key)
    .bind(&fp)
    .bind(reservation)
    .fetch_one(&mut *tx)
    .await?;
    let (fresh, status, expires_at, now, price, schedule_id, seat_id, paid_at) = row;
    if !fresh {
        let (status, body) = idempotency::stored(&mut tx, user, "payment", key, &fp).await?;
        return Ok(Paid { status, body, schedule_id: None });
    }
    let (Some(status), Some(expires_at), Some(price), Some(schedule_id), Some(seat_id)) = (status, expires_at, price, schedule_id, seat_id) else {
        return Err(Error::NotFound("reservation"));
    };
    if let Err(e) = check_payable(&status, expires_at, now) {
        metrics::counter!("payments_total", "outcome" => e.code()).increment(1);
        return Err(e);
    }

    let payment_id = Uuid::new_v4();
    let event = PaymentCompleted { payment_id, reservation_id: reservation, user_id: user, schedule_id, seat_id, amount: price, paid_at };
    let key_str = reservation.to_string();
    let note = NotificationRequest::new(
        Kind::PaymentConfirmed,
        user,
        json!({"reservationId": reservation, "paymentId": payment_id, "scheduleId": schedule_id, "seatId": seat_id, "amount": price}),
    );
    let events = [
        outbox::Row::new(&topics.payment_completed, &key_str, &Envelope::new(EventType::PaymentCompleted, event)),
        notification::outbox_row(topics, notification::event_id(Kind::PaymentConfirmed, &key_str), note),
    ];
    // The balance is only known inside the statement: the stored answer gets it there.
    let mut body = json!({
        "paymentId": payment_id,
        "reservationId": reservation,
        "amount": price,
        "status": "CONFIRMED",
        "balance": 0,
        "paidAt": paid_at,
    });

    // Everything else in one statement, each part only if the balance covered the price (`u`
    // has its row): the points and their ledger line (`points::apply_sql`), the payment, the
    // hold's confirmation, the outbox rows of `payment.completed` and the notification, and the
    // key's stored answer.
    let sql = format!(
        "WITH {points},
              p AS (INSERT INTO payments (id, reservation_id, user_id, amount, paid_at) SELECT $3, $4, $1, $2, $5 FROM u),
              c AS (UPDATE reservations SET status = 'CONFIRMED', confirmed_at = $5 WHERE id = $4 AND EXISTS (SELECT 1 FROM u)),
              i AS ({stored}),
              o AS ({outbox})
         SELECT balance FROM u",
        points = points::apply_sql(Movement::Use, "$1", "$2"),
        stored = idempotency::complete_sql("$1", "'payment'", "$7", "201", "jsonb_set($6::jsonb, '{balance}', to_jsonb(u.balance))", "u"),
        outbox = outbox::insert_sql(8, "WHERE EXISTS (SELECT 1 FROM u)"),
    );
    let query = sqlx::query(&sql).bind(user).bind(price).bind(payment_id).bind(reservation).bind(paid_at).bind(&body).bind(key);
    let balance: Option<i64> = outbox::bind_rows(query, &events).fetch_optional(&mut *tx).await?.map(|r| r.get(0));
    let Some(balance) = balance else {
        metrics::counter!("payments_total", "outcome" => "INSUFFICIENT_POINTS").increment(1);
        return Err(Error::InsufficientPoints);
    };
    body["balance"] = json!(balance);
    tx.commit().await?;
    outbox::committed();
    metrics::counter!("payments_total", "outcome" => "confirmed").increment(1);
    Ok(Paid { status: 201, body, schedule_id: Some(schedule_id) })
}
