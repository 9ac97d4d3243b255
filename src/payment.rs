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
/// Payments that arrive together share that statement and its commit ([`GroupCommit`],
/// [`write_group`]: the same rules, row by row); a group that fails as a whole (a key taken
/// meanwhile, see below) leaves each of its payments to run the statement alone ([`write`]).
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
pub async fn pay(pool: &PgPool, group: &GroupCommit, topics: &Topics, user: Uuid, key: &str, reservation: Uuid) -> Result<Paid> {
    let ask = Ask::new(topics, user, key, reservation);
    let fp = ask.fp.clone();
    let row: PayRow = match group.write(ask).await {
        Ok(row) => row,
        // The group's statement failed (one payment's key was taken meanwhile, the database went
        // away): this payment runs alone, with the answers the single statement gives.
        // A writer that went away with the ask (the process is stopping) may or may not have
        // committed its group: alone, a payment that did answers from its stored key.
        Err(ask) => match write(pool, &ask.unwrap_or_else(|| Ask::new(topics, user, key, reservation))).await {
            Ok(row) => row,
            // The key was stored meanwhile by a request for another hold (see above).
            Err(e) if idempotency::is_taken(&e) => (None, None, None, None, None),
            Err(e) => return Err(e.into()),
        },
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

/// Runs the payment's statements once for a hold that cannot exist (nil ids): they match no row
/// and write nothing (and [`crate::db::connect_warmed`] rolls them back anyway). So that a
/// connection's first payment does not pay for the statement's first run: the single one (a
/// payment whose group failed) and the group's.
pub fn warm(conn: &mut PgConnection) -> BoxFuture<'_, sqlx::Result<()>> {
    Box::pin(async move {
        let ask = Ask::new(&Topics::new(""), Uuid::nil(), "", Uuid::nil());
        write(&mut *conn, &ask).await?;
        write_group(&mut *conn, &[&ask]).await.map(drop)
    })
}

/// One payment as both statements take it: who pays for which hold under which key, and what it
/// writes if it goes through.
pub struct Ask {
    user: Uuid,
    key: String,
    reservation: Uuid,
    payment_id: Uuid,
    fp: Vec<u8>,
    /// The answer stored for the key (the statement adds the amount, balance and time).
    body: Value,
    /// `payment.completed` and the `PAYMENT_CONFIRMED` notification, in that order.
    events: [outbox::Row; 2],
}

impl Ask {
    fn new(topics: &Topics, user: Uuid, key: &str, reservation: Uuid) -> Self {
        let payment_id = Uuid::new_v4();
        let key_str = reservation.to_string();
        // The price, schedule, seat and time are only known inside the statement, which writes
        // them into the answer and both envelopes (the values here are placeholders it replaces).
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
        let fp = idempotency::fingerprint(&[b"payment", reservation.as_bytes()]).to_vec();
        Ask { user, key: key.to_string(), reservation, payment_id, fp, body, events }
    }
}

/// The envelope `v` of an outbox row with what the statement read of the hold (the columns of
/// `ok`): the payment's event (where `is_event` holds) gets the schedule, seat, amount and time in
/// its payload, the notification the first three in its data.
fn envelope_sql(v: &str, ok: &str, is_event: &str) -> String {
    let facts = format!("'scheduleId', {ok}.schedule_id, 'seatId', {ok}.seat_id, 'amount', {ok}.price");
    format!(
        "CASE WHEN {is_event} THEN jsonb_set({v}, '{{payload}}', ({v} -> 'payload') || jsonb_build_object({facts}, 'paidAt', {ok}.paid))
              ELSE jsonb_set({v}, '{{payload,data}}', ({v} #> '{{payload,data}}') || jsonb_build_object({facts})) END"
    )
}

/// [`pay`]'s single statement on `db`: its row, or the error that undid it.
async fn write<'e>(db: impl PgExecutor<'e>, ask: &Ask) -> sqlx::Result<PayRow> {
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
            &envelope_sql("v", "ok", "n = 1"),
        ),
    );
    let query = sqlx::query(&sql).bind(ask.user).bind(&ask.key).bind(ask.payment_id).bind(ask.reservation).bind(&ask.fp).bind(&ask.body);
    let row = outbox::bind_rows(query, &ask.events).fetch_one(db).await?;
    PayRow::from_row(&row)
}

/// [`write`] for many payments in one statement and one commit: one row per ask, in their order.
/// The asks are of distinct users (each user's balance row changes once per statement: the
/// [`GroupCommit`] sees to it). Every rule is [`write`]'s, row by row: a hold that is not this
/// user's, not payable or not covered by the balance writes nothing and answers as it would
/// alone. The locks come in one order, holds by id, then balances by id, then keys, so two
/// groups, or a group and a single payment, never wait on each other in a cycle. Any error
/// undoes the whole group, and [`pay`] runs each of its payments alone.
async fn write_group<'e>(db: impl PgExecutor<'e>, asks: &[&Ask]) -> sqlx::Result<Vec<PayRow>> {
    // Each CTE carries the ask's columns along, so every later one reads a single relation, not
    // a join back to the asks (with the planner's one-row guesses for CTEs, those joins were
    // nested loops, quadratic in the group).
    let sql = format!(
        "WITH b AS MATERIALIZED (SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::bytea[], $6::jsonb[],
                                                      $7::text[], $8::text[], $9::uuid[], $10::jsonb[], $11::text[], $12::text[], $13::uuid[], $14::jsonb[])
                                 WITH ORDINALITY AS b(user_id, key, payment_id, reservation_id, fp, body, t1, k1, e1, v1, t2, k2, e2, v2, i)),
              r AS MATERIALIZED (SELECT b.*, res.status, res.expires_at, res.price, res.schedule_id, res.seat_id
                                 FROM b JOIN reservations res ON res.id = b.reservation_id AND res.user_id = b.user_id
                                 ORDER BY res.id FOR UPDATE OF res),
              t AS MATERIALIZED (SELECT r.*, clock_timestamp() AS at FROM r),
              ok AS MATERIALIZED (SELECT t.*, t.price AS amount, {paid_at} AS paid FROM t WHERE {payable}),
              {points},
              p AS (INSERT INTO payments (id, reservation_id, user_id, amount, paid_at) SELECT payment_id, reservation_id, user_id, price, now() FROM u),
              c AS (UPDATE reservations SET status = 'CONFIRMED', confirmed_at = now() FROM u WHERE reservations.id = u.reservation_id),
              k AS ({stored} RETURNING user_id, key, response),
              o AS (INSERT INTO outbox (topic, message_key, event_id, envelope)
                    SELECT x.topic, x.key, x.event_id, {envelope} FROM u CROSS JOIN LATERAL (VALUES (1, u.t1, u.k1, u.e1, u.v1), (2, u.t2, u.k2, u.e2, u.v2))
                           AS x(n, topic, key, event_id, v)
                    ORDER BY u.i, x.n
                    ON CONFLICT (event_id) DO NOTHING)
         SELECT t.status, t.expires_at, t.at, t.schedule_id, k.response
         FROM b LEFT JOIN t ON t.i = b.i LEFT JOIN k ON k.user_id = b.user_id AND k.key = b.key
         ORDER BY b.i",
        paid_at = crate::db::rfc3339_sql("now()"),
        payable = crate::reservation::payable_sql("status", "expires_at", "at"),
        points = points::apply_each_sql(Movement::Use, "ok"),
        stored = idempotency::store_sql(
            "u.user_id",
            "'payment'",
            "u.key",
            "u.fp",
            "201",
            "u.body || jsonb_build_object('amount', u.price, 'balance', u.balance, 'paidAt', u.paid)",
            "u"
        ),
        envelope = envelope_sql("x.v", "u", "x.n = 1"),
    );
    let col = |f: fn(&Ask) -> Uuid| asks.iter().map(|a| f(a)).collect::<Vec<Uuid>>();
    let events = |n: usize| {
        let rows: Vec<&outbox::Row> = asks.iter().map(|a| &a.events[n]).collect();
        (
            rows.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>(),
            rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            rows.iter().map(|r| r.event_id).collect::<Vec<_>>(),
            rows.iter().map(|r| &r.envelope).collect::<Vec<_>>(),
        )
    };
    let ((t1, k1, e1, v1), (t2, k2, e2, v2)) = (events(0), events(1));
    let rows = sqlx::query(&sql)
        .bind(col(|a| a.user))
        .bind(asks.iter().map(|a| a.key.as_str()).collect::<Vec<_>>())
        .bind(col(|a| a.payment_id))
        .bind(col(|a| a.reservation))
        .bind(asks.iter().map(|a| a.fp.as_slice()).collect::<Vec<_>>())
        .bind(asks.iter().map(|a| &a.body).collect::<Vec<_>>())
        .bind(t1).bind(k1).bind(e1).bind(v1)
        .bind(t2).bind(k2).bind(e2).bind(v2)
        .fetch_all(db)
        .await?;
    rows.iter().map(PayRow::from_row).collect()
}

/// Group commit of payments (issue 11, [`crate::group_commit`]): concurrent payments share one
/// statement ([`write_group`]) and one commit. The profile of 64 clients paying put a fifth of
/// the machine's CPU into what every statement costs whatever its rows. At most one payment per
/// user in a group (each user's balance row changes once per statement); the second waits for
/// the next.
pub type GroupCommit = crate::group_commit::GroupCommit<Ask>;

impl crate::group_commit::Grouped for Ask {
    type Row = PayRow;
    const MAX: usize = 64;
    // Two, so that a group waiting on a lock (a hold a refund or the expirer has at that moment)
    // does not hold up every payment behind it.
    const WRITERS: usize = 2;
    const SIZE_METRIC: &'static str = "payment_group_size";

    fn exclusive(&self) -> Vec<u128> {
        vec![self.user.as_u128()]
    }

    fn write<'a>(pool: &'a PgPool, group: &'a [&'a Self]) -> BoxFuture<'a, sqlx::Result<Vec<PayRow>>> {
        Box::pin(write_group(pool, group))
    }
}
