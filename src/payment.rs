//! Payment with points, in one transaction (brief §5):
//! the hold is locked and checked with [`reservation::check_payable`] against PostgreSQL's clock;
//! points drop by the price only if the balance covers it (conditional update, never negative);
//! the payment row, CONFIRMED, the ledger line, and the outbox rows for `payment.completed` and
//! the `PAYMENT_CONFIRMED` notification commit together or not at all. The ranking is not touched
//! here (design document §2-2, bottleneck 2): a consumer of `payment.completed` does it.

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{FromRow as _, PgConnection, PgExecutor, PgPool};
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

/// The row of [`pay`]'s statement: the hold's status and `expires_at` (none: no such hold of this
/// user), PostgreSQL's clock once the hold was locked, and, when it paid, the schedule and the
/// answer it stored for the key.
type PayRow = (Option<String>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<Uuid>, Option<Value>);

/// Pays `reservation` for `user`, once per `key`.
///
/// Under a spike a payment costs its round trips and its row writes, so it is one statement,
/// committed on its own (it was `BEGIN`, the key's claim with the hold's lock, the writes and
/// `COMMIT`; the key's row was written twice, claimed and then completed). The statement locks
/// the hold, checks THE RULE on the locked row against PostgreSQL's clock
/// ([`reservation::payable_sql`]), and only then takes the points, writes the payment, confirms
/// the hold, stores the key with its answer and writes the outbox rows of `payment.completed` and
/// the `PAYMENT_CONFIRMED` notification. Everything after the check hangs on the points' update
/// (`u`): a balance that does not cover the price writes nothing.
///
/// What makes the key safe without a claim first, each case ending in one answer:
/// - the same key for the same hold, at once: the second waits on the hold's lock, then finds it
///   CONFIRMED, writes nothing, and replays the answer the first stored (read after its wait);
/// - the same key for another hold: the key's insert waits on the first request's uncommitted row
///   (the primary key), then fails with a unique violation once that commits: the whole
///   statement is undone, and the stored answer says `IDEMPOTENCY_KEY_REUSED`;
/// - a failed payment stores no key, so its retry runs afresh.
///
/// No lock is taken in another order by any path, so none of these can deadlock: a payment locks
/// the hold, then the user's balance, then the key.
pub async fn pay(pool: &PgPool, topics: &Topics, user: Uuid, key: &str, reservation: Uuid) -> Result<Paid> {
    let fp = idempotency::fingerprint(&[b"payment", reservation.as_bytes()]);
    let row: PayRow = match write(pool, topics, user, key, reservation, &fp).await {
        Ok(row) => row,
        // The key was stored meanwhile by a request for another hold (see above).
        Err(e) if idempotency::is_taken(&e) => (None, None, None, None, None),
        Err(e) => return Err(e.into()),
    };
    let (status, expires_at, now, schedule_id, answer) = row;
    if let (Some(body), Some(schedule_id)) = (answer, schedule_id) {
        outbox::committed();
        metrics::counter!("payments_total", "outcome" => "confirmed").increment(1);
        return Ok(Paid { status: 201, body, schedule_id: Some(schedule_id) });
    }
    // Nothing was written. A key already used answers as it did the first time (read now, after
    // any wait on the hold's lock or the key); otherwise say what stopped this payment.
    if let Some((code, body)) = idempotency::answered(pool, user, "payment", key, &fp).await? {
        return Ok(Paid { status: code, body, schedule_id: None });
    }
    let (Some(status), Some(expires_at), Some(now)) = (status, expires_at, now) else {
        return Err(Error::NotFound("reservation"));
    };
    let outcome = match check_payable(&status, expires_at, now) {
        Err(e) => e,
        Ok(()) => Error::InsufficientPoints,
    };
    metrics::counter!("payments_total", "outcome" => outcome.code()).increment(1);
    Err(outcome)
}

/// Runs the payment's statement once for a hold that cannot exist (nil ids): it matches no row
/// and writes nothing (and [`crate::db::connect_warmed`] rolls it back anyway). So that a
/// connection's first payment does not pay for the statement's first run.
pub fn warm(conn: &mut PgConnection) -> BoxFuture<'_, sqlx::Result<()>> {
    Box::pin(async move {
        let topics = Topics::new("");
        write(conn, &topics, Uuid::nil(), "", Uuid::nil(), &[]).await.map(drop)
    })
}

/// [`pay`]'s statement on `db`: its row, or the error that undid it.
async fn write<'e>(db: impl PgExecutor<'e>, topics: &Topics, user: Uuid, key: &str, reservation: Uuid, fp: &[u8]) -> sqlx::Result<PayRow> {
    let payment_id = Uuid::new_v4();
    let key_str = reservation.to_string();
    // The price, schedule, seat and time are only known inside the statement, which writes them
    // into the answer and both envelopes (the values here are placeholders it replaces).
    let event = PaymentCompleted {
        payment_id,
        reservation_id: reservation,
        user_id: user,
        schedule_id: Uuid::nil(),
        seat_id: Uuid::nil(),
        amount: 0,
        paid_at: DateTime::<Utc>::UNIX_EPOCH,
    };
    let note = NotificationRequest::new(Kind::PaymentConfirmed, user, json!({"reservationId": reservation, "paymentId": payment_id}));
    let events = [
        outbox::Row::new(&topics.payment_completed, &key_str, &Envelope::new(EventType::PaymentCompleted, event)),
        notification::outbox_row(topics, notification::event_id(Kind::PaymentConfirmed, &key_str), note),
    ];
    let body = json!({"paymentId": payment_id, "reservationId": reservation, "status": "CONFIRMED"});
    let facts = "'scheduleId', ok.schedule_id, 'seatId', ok.seat_id, 'amount', ok.price";
    let sql = format!(
        "WITH r AS MATERIALIZED (SELECT status, expires_at, price, schedule_id, seat_id FROM reservations
                                 WHERE id = $4 AND user_id = $1 FOR UPDATE),
              t AS MATERIALIZED (SELECT r.*, clock_timestamp() AS at FROM r),
              ok AS MATERIALIZED (SELECT price, schedule_id, seat_id, {paid_at} AS paid FROM t WHERE {payable}),
              {points},
              p AS (INSERT INTO payments (id, reservation_id, user_id, amount, paid_at) SELECT $3, $4, $1, ok.price, now() FROM ok, u),
              c AS (UPDATE reservations SET status = 'CONFIRMED', confirmed_at = now() WHERE id = $4 AND EXISTS (SELECT 1 FROM u)),
              k AS ({stored} RETURNING response),
              o AS ({outbox})
         SELECT t.status, t.expires_at, t.at, ok.schedule_id, k.response
         FROM (SELECT 1) AS one LEFT JOIN t ON true LEFT JOIN ok ON true LEFT JOIN k ON true",
        paid_at = crate::db::rfc3339_sql("now()"),
        payable = crate::reservation::payable_sql("status", "expires_at", "at"),
        points = points::apply_sql(Movement::Use, "$1", "(SELECT price FROM ok)"),
        stored = idempotency::store_sql(
            "$1",
            "'payment'",
            "$2",
            "$5",
            "201",
            "$6::jsonb || jsonb_build_object('amount', ok.price, 'balance', u.balance, 'paidAt', ok.paid)",
            "ok, u"
        ),
        // Rows in the order of `events`: the event's payload and the notification's data get
        // what the statement read.
        outbox = outbox::insert_sql_joined(
            7,
            ", ok, u",
            "",
            &format!(
                "CASE WHEN n = 1 THEN jsonb_set(v, '{{payload}}', (v -> 'payload') || jsonb_build_object({facts}, 'paidAt', ok.paid))
                      ELSE jsonb_set(v, '{{payload,data}}', (v #> '{{payload,data}}') || jsonb_build_object({facts})) END"
            ),
        ),
    );
    let query = sqlx::query(&sql).bind(user).bind(key).bind(payment_id).bind(reservation).bind(fp).bind(&body);
    let row = outbox::bind_rows(query, &events).fetch_one(db).await?;
    PayRow::from_row(&row)
}
