//! Seat holds: take, read, cancel — and THE rule of this product:
//!
//! **A hold can be paid only while it is `HELD` and its `expiresAt` is still in the future by
//! PostgreSQL's clock** ([`check_payable`]). The expirer may be late or down; it does not matter,
//! because payment checks the clock itself on the locked row. For the same reason a hold past its
//! `expiresAt` counts as free for the next customer: [`hold`] expires it in the same transaction.
//!
//! **A user holds or owns at most `--max-seats-per-user` seats of one schedule** (issue 12), also
//! enforced by PostgreSQL in the hold's transaction: [`hold`] takes a transaction-scoped advisory
//! lock on (user, schedule) (the functions `hold_seats`, `migrations/0240_hold_seats_in_groups.sql`,
//! for holds written in a group, and `hold_seat`, `migrations/0180_hold_in_one_statement.sql`, for
//! a hold alone), then counts that user's live seats (HELD and unexpired, or CONFIRMED) before
//! inserting. Concurrent holds by one user, on any api replica, queue on that
//! lock for the few milliseconds of the insert, so they cannot overshoot; other users never wait
//! on it. Expired, cancelled (and refunded) reservations are not counted.
//!
//! A hold with an `Idempotency-Key` claims the key in the same transaction (see `idempotency`):
//! the same key returns the stored reservation and holds nothing twice.
//!
//! "At most one HELD or CONFIRMED reservation per seat" is enforced by PostgreSQL itself: the
//! partial unique index `reservations_one_active_per_seat`. Of many simultaneous requests for one
//! seat, one insert wins and the others get `SEAT_UNAVAILABLE` as soon as the winner commits;
//! nobody queues on a distributed lock.
//!
//! **Statements that find reservations by a key never let a status test pick the index**
//! ([`status_is`]): a lookup by id, user or seat costs the same whether ten holds are live or a
//! hundred thousand, whatever PostgreSQL's statistics say.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Postgres, Row as _};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::idempotency::{self, Claim};
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refunded_at: Option<DateTime<Utc>>,
}

/// The columns a [`Reservation`] is read from: every query returning one names them with this.
pub const COLUMNS: &str = "id, user_id, seat_id, schedule_id, status, price, created_at, expires_at, \
                       expired_at, confirmed_at, cancelled_at, refunded_at";

/// `status = '<status>'`, for statements that find reservations by a key (an id, a user): the
/// same test (the column is NOT NULL), written so that the planner keeps to the key's index.
///
/// Why (issue 11, found in `pg_stat_statements` of the 10,000-holds expiry burst): the status mix
/// of `reservations` swings within seconds during a sale (thousands of holds taken, then
/// expired), much faster than autovacuum's ANALYZE samples it. Planned from a sample taken when
/// no hold was live, `status = 'HELD'` looks like one row, so the partial indexes on HELD
/// (`reservations_held_by_expiry`) and on HELD or CONFIRMED (`reservations_one_active_per_seat`)
/// look like one-row indexes, and PostgreSQL prefers scanning one of them whole, filtering by id,
/// to descending the primary key: every such lookup then read every live hold (the expirer's
/// batch of 500 grew from 15 to 40 ms at 10,000 live holds, a hold's seat-limit count from a few
/// rows to all of them). PostgreSQL uses a partial index only when it can prove that the
/// statement implies the index's predicate, and it does not prove `status = 'HELD'` from
/// `status IS NOT DISTINCT FROM 'HELD'`. Lookups by seat state the live-seat index's own
/// predicate instead (`status IN ('HELD', 'CONFIRMED')`), which implies no other index's (the
/// schedule's live-reservation index, `reservations_live_by_schedule`, also requires a test of
/// `schedule_id`, for that reason; only the count of available seats has one).
/// `tests/plans.rs` checks that each lookup reads a handful of rows while the statistics say no
/// hold exists.
pub fn status_is(status: &str) -> String {
    debug_assert!(status.bytes().all(|b| b.is_ascii_uppercase()), "a status literal");
    format!("status IS NOT DISTINCT FROM '{status}'")
}

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

/// THE RULE as an SQL condition, for a statement that pays only if it holds ([`check_payable`]
/// then names what failed): `status`, `expires_at` and `now` are SQL expressions.
pub fn payable_sql(status: &str, expires_at: &str, now: &str) -> String {
    format!("({status} = 'HELD' AND {expires_at} > {now})")
}

/// How a hold is asked for.
#[derive(Debug, Clone, Copy)]
pub struct HoldRequest<'a> {
    pub user: Uuid,
    pub seat: Uuid,
    pub ttl: Duration,
    /// Most live seats one user may have in one schedule.
    pub max_seats: u32,
    /// `Idempotency-Key`, if the client sent one.
    pub key: Option<&'a str>,
}

/// What a hold answers: the reservation as stored (or as first answered, for a replayed key).
pub struct Held {
    pub body: serde_json::Value,
    /// The reservation this call created; `None` for a replay (nothing was held by this call).
    pub fresh: Option<Reservation>,
}

/// Holds `req.seat` for `user` for `ttl` in `schedule` (the queue token's), or fails with
/// `NOT_FOUND`, `QUEUE_TOKEN_MISMATCH`, `SEAT_UNAVAILABLE` or `SEAT_LIMIT_REACHED`.
///
/// Round trips and statements are what a hold costs under a spike, so a hold without a key is one
/// row of a group ([`HoldGroup`]): the holds that arrive together are written by one call of
/// `hold_seats` (migrations/0240_hold_seats_in_groups.sql) and one commit. Hold by hold, that is
/// the seat's look (most losers of a seat fight leave there, without any lock), then the seat
/// limit's lock, and the count, the insert and its outbox row; the count reads a snapshot taken
/// after the lock was granted, so a concurrent hold of the same user cannot race it. PostgreSQL's
/// clock stamps the hold: `createdAt` is `now()` and `expiresAt` that plus the TTL, which the
/// function writes into the event (`payload.expiresAt`; the placeholder bound here is replaced).
/// If the group fails as a whole, the hold runs alone: one call of `hold_seat`
/// (migrations/0180_hold_in_one_statement.sql), the same rules for one hold.
///
/// A hold with a key, or one whose seat is still blocked by a hold past its expiry (rare), opens a
/// transaction for the key's claim or the stale hold's end, then calls `hold_seat` inside it.
pub async fn hold(pool: &PgPool, group: &HoldGroup, topics: &Topics, req: HoldRequest<'_>, schedule: Uuid) -> Result<Held> {
    let ask = HoldAsk::new(topics, &req, schedule);
    if req.key.is_some() {
        return hold_alone(pool, topics, req.key, ask).await;
    }
    let (id, user, seat) = (ask.id, ask.user, ask.seat);
    let row = match group.write(ask).await {
        Ok(row) => row,
        Err(Some(ask)) => hold_seat(&ask, true).fetch_one(pool).await?,
        // The writer went away with the hold (the process is stopping): whether it committed is
        // unknown, and this request ends with the process.
        Err(None) => return Err(sqlx::Error::PoolClosed.into()),
    };
    // A stale hold takes the slow path, which ends it first (a new ask: nothing was written).
    if row.get::<&str, _>(0) == "stale" {
        return hold_alone(pool, topics, None, HoldAsk::new(topics, &req, schedule)).await;
    }
    let r = held(&row, id, user, seat, schedule)?;
    outbox::committed();
    metrics::counter!("holds_total", "outcome" => "held").increment(1);
    Ok(Held { body: serde_json::to_value(&r).expect("reservations serialize"), fresh: Some(r) })
}

/// The slow path of [`hold`], in a transaction of its own. It takes the seat limit's lock first
/// (sent with `BEGIN`, its answer dropped: a failure aborts the transaction and the next
/// statement reports it), before the key's claim, so that a keyed retry and its original take the
/// two in the same order. `hold_seat` takes it again, at no cost.
async fn hold_alone(pool: &PgPool, topics: &Topics, key: Option<&str>, ask: HoldAsk) -> Result<Held> {
    let (seat, user) = (ask.seat, ask.user);
    let conn = pool.acquire().await?;
    let mut tx = crate::db::begin_on(conn, format!("BEGIN; SELECT pg_advisory_xact_lock({})", ask.lock)).await?;
    if let Some(key) = key {
        let fp = idempotency::fingerprint(&[b"reservation", seat.as_bytes()]);
        if let Claim::Replay { body, .. } = idempotency::claim(&mut tx, user, "reservation", key, &fp).await? {
            metrics::counter!("holds_total", "outcome" => "replayed").increment(1);
            return Ok(Held { body, fresh: None });
        }
    }
    // A hold past its expiry no longer blocks the seat: end it here, as the expirer would.
    let stale: Vec<Reservation> = sqlx::query_as(&format!(
        "UPDATE reservations SET status = 'EXPIRED', expired_at = clock_timestamp()
         WHERE id = (SELECT id FROM reservations WHERE seat_id = $1 AND status IN ('HELD', 'CONFIRMED'))
           AND {held} AND expires_at <= clock_timestamp()
         RETURNING {COLUMNS}",
        held = status_is("HELD"),
    ))
    .bind(seat)
    .fetch_all(&mut *tx)
    .await?;
    for r in &stale {
        expired_effects(&mut tx, topics, r).await?;
        metrics::counter!("expiry_transitions_total", "path" => "hold_takeover").increment(1);
    }
    // A retry with a key does not stop at the seat's state: its own earlier hold would look like
    // someone else's.
    let row = hold_seat(&ask, false).fetch_one(&mut *tx).await?;
    let r = held(&row, ask.id, user, seat, ask.schedule)?;
    let body = serde_json::to_value(&r).expect("reservations serialize");
    if let Some(key) = key {
        idempotency::complete(&mut tx, user, "reservation", key, 201, &body).await?;
    }
    tx.commit().await?;
    outbox::committed();
    metrics::counter!("holds_total", "outcome" => "held").increment(1);
    Ok(Held { body, fresh: Some(r) })
}

/// One hold as `hold_seat` and `hold_seats` take it: the new reservation's id, who holds which
/// seat of which schedule, the seat limit's lock, and the `reservation.created` row it writes.
pub struct HoldAsk {
    id: Uuid,
    user: Uuid,
    seat: Uuid,
    schedule: Uuid,
    lock: i64,
    ttl_us: i64,
    max_live: i64,
    event: outbox::Row,
}

impl HoldAsk {
    fn new(topics: &Topics, req: &HoldRequest<'_>, schedule: Uuid) -> Self {
        let id = Uuid::new_v4();
        let placeholder = ReservationEvent { reservation_id: id, user_id: req.user, seat_id: req.seat, schedule_id: schedule, expires_at: DateTime::<Utc>::UNIX_EPOCH };
        HoldAsk {
            id,
            user: req.user,
            seat: req.seat,
            schedule,
            lock: seat_limit_lock(req.user, schedule),
            ttl_us: i64::try_from(req.ttl.as_micros()).unwrap_or(i64::MAX),
            max_live: i64::from(req.max_seats),
            event: outbox::Row::new(&topics.reservation_created, &id.to_string(), &Envelope::new(EventType::ReservationCreated, placeholder)),
        }
    }
}

/// Group commit of holds (issue 11, [`crate::group_commit`]). Measured with pgbench on a copy of
/// the schema, PostgreSQL spent 300 to 450 µs of CPU per hold called alone, 110 µs per hold in
/// calls of 8 and 80 µs in calls of 16 (migration 0240 says where it went). Never two holds of one
/// seat in a group (the insert would wait on itself), nor two of one user in one schedule (the
/// seat limit's count would not see the other).
pub type HoldGroup = crate::group_commit::GroupCommit<HoldAsk>;

impl crate::group_commit::Grouped for HoldAsk {
    type Row = sqlx::postgres::PgRow;
    const MAX: usize = 64;
    // Two, so that a group waiting on a seat limit's lock (a keyed hold of the same user) or on a
    // seat another api process is inserting does not hold up every hold behind it.
    const WRITERS: usize = 2;
    const SIZE_METRIC: &'static str = "hold_group_size";

    fn exclusive(&self) -> Vec<u128> {
        vec![self.seat.as_u128(), u128::from(self.lock as u64)]
    }

    fn write<'a>(pool: &'a PgPool, group: &'a [&'a Self]) -> BoxFuture<'a, sqlx::Result<Vec<sqlx::postgres::PgRow>>> {
        Box::pin(hold_seats(group).fetch_all(pool))
    }
}

/// The call of `hold_seat` for one hold (see [`hold`]).
fn hold_seat(ask: &HoldAsk, stop_if_taken: bool) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
    let query = sqlx::query("SELECT outcome, live, price, created_at, expires_at FROM hold_seat($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)")
        .bind(ask.id)
        .bind(ask.user)
        .bind(ask.seat)
        .bind(ask.schedule)
        .bind(stop_if_taken)
        .bind(ask.ttl_us)
        .bind(ask.max_live)
        .bind(ask.lock);
    outbox::bind_rows(query, std::slice::from_ref(&ask.event))
}

/// The call of `hold_seats` for a group: one row per hold, in their order, with the columns of
/// [`hold_seat`]'s.
fn hold_seats<'q>(asks: &'q [&'q HoldAsk]) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    let col = |f: fn(&HoldAsk) -> Uuid| asks.iter().map(|a| f(a)).collect::<Vec<Uuid>>();
    let num = |f: fn(&HoldAsk) -> i64| asks.iter().map(|a| f(a)).collect::<Vec<i64>>();
    sqlx::query(
        "SELECT outcome, live, price, created_at, expires_at
         FROM hold_seats($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ORDER BY n",
    )
    .bind(col(|a| a.id))
    .bind(col(|a| a.user))
    .bind(col(|a| a.seat))
    .bind(col(|a| a.schedule))
    .bind(num(|a| a.lock))
    .bind(num(|a| a.ttl_us))
    .bind(num(|a| a.max_live))
    .bind(asks.iter().map(|a| a.event.topic.as_str()).collect::<Vec<_>>())
    .bind(asks.iter().map(|a| a.event.key.as_str()).collect::<Vec<_>>())
    .bind(asks.iter().map(|a| a.event.event_id).collect::<Vec<_>>())
    .bind(asks.iter().map(|a| &a.event.envelope).collect::<Vec<_>>())
}

/// Calls `hold_seat` and `hold_seats` once for a seat that cannot exist (the nil id): they answer
/// `no_seat` and write nothing (and [`crate::db::connect_warmed`] rolls them back anyway). So that
/// a connection's first hold does not pay for the calls' first run.
pub fn warm(conn: &mut PgConnection) -> BoxFuture<'_, sqlx::Result<()>> {
    Box::pin(async move {
        let event = outbox::Row { topic: String::new(), key: String::new(), event_id: Uuid::nil(), envelope: serde_json::Value::Null };
        let ask = HoldAsk { id: Uuid::nil(), user: Uuid::nil(), seat: Uuid::nil(), schedule: Uuid::nil(), lock: 0, ttl_us: 0, max_live: 0, event };
        hold_seat(&ask, true).fetch_one(&mut *conn).await?;
        hold_seats(&[&ask]).fetch_all(&mut *conn).await.map(drop)
    })
}

/// The reservation `hold_seat` or `hold_seats` took, from its row, or why it took none (see its
/// `outcome`).
fn held(row: &sqlx::postgres::PgRow, id: Uuid, user: Uuid, seat: Uuid, schedule: Uuid) -> Result<Reservation> {
    let refused = match row.get::<&str, _>(0) {
        "no_seat" => return Err(Error::NotFound("seat")),
        "other_schedule" => return Err(Error::QueueTokenMismatch),
        "limit" => Some(("limit", Error::SeatLimitReached)),
        "held" => None,
        _ => Some(("unavailable", Error::SeatUnavailable)),
    };
    if let Some((outcome, e)) = refused {
        metrics::counter!("holds_total", "outcome" => outcome).increment(1);
        return Err(e);
    }
    let (price, created_at, expires_at): (i64, DateTime<Utc>, DateTime<Utc>) = (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
    Ok(Reservation {
        reservation_id: id,
        user_id: user,
        seat_id: seat,
        schedule_id: schedule,
        status: "HELD".into(),
        price,
        created_at,
        expires_at,
        expired_at: None,
        confirmed_at: None,
        cancelled_at: None,
        refunded_at: None,
    })
}

/// The answer a hold with `key` already got, if one committed: a retry whose first answer was
/// lost gets it back even when its queue place has lapsed since, or was freed by the payment
/// (issue 12: a lost answer does not lose the seat). Read before the queue check for that reason;
/// a key first seen here goes on to [`hold`], which claims it in its transaction.
pub async fn replayed(pool: &PgPool, user: Uuid, seat: Uuid, key: &str) -> Result<Option<serde_json::Value>> {
    let fp = idempotency::fingerprint(&[b"reservation", seat.as_bytes()]);
    let answer = idempotency::answered(pool, user, "reservation", key, &fp).await?;
    if answer.is_some() {
        metrics::counter!("holds_total", "outcome" => "replayed").increment(1);
    }
    Ok(answer.map(|(_, body)| body))
}

/// Advisory lock key of (user, schedule) for the seat limit: 64 bits of a hash of both ids.
fn seat_limit_lock(user: Uuid, schedule: Uuid) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"seat-limit");
    h.update(user.as_bytes());
    h.update(schedule.as_bytes());
    i64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// The effects of a hold turning EXPIRED, written in the transaction that expired it: the
/// `RESERVATION_EXPIRED` notification (its event id is derived from the reservation, so it can
/// exist only once).
pub async fn expired_effects(tx: &mut PgConnection, topics: &Topics, r: &Reservation) -> Result<(), sqlx::Error> {
    crate::outbox::enqueue_many(tx, &[expired_row(topics, r)]).await
}

/// The outbox row of a hold's `RESERVATION_EXPIRED` notification (its id derived from the hold,
/// so every path that expires it writes the same event).
pub fn expired_row(topics: &Topics, r: &Reservation) -> crate::outbox::Row {
    let req = NotificationRequest::new(
        Kind::ReservationExpired,
        r.user_id,
        json!({"reservationId": r.reservation_id, "scheduleId": r.schedule_id, "seatId": r.seat_id}),
    );
    let id = notification::event_id(Kind::ReservationExpired, &r.reservation_id.to_string());
    notification::outbox_row(topics, id, req)
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

/// Statuses `GET /v1/users/me/reservations?status=` accepts.
pub const STATUSES: &[&str] = &["HELD", "CONFIRMED", "EXPIRED", "CANCELLED", "REFUNDED"];

/// A page of `user`'s reservations, newest first: at most `limit` after the reservation `after`
/// (the previous page's last id), optionally of one `status`. Someone else's id as `after` is
/// refused like an unknown one.
pub async fn list_mine(pool: &PgPool, user: Uuid, status: Option<&str>, after: Option<Uuid>, limit: i64) -> Result<Vec<Reservation>> {
    if let Some(after) = after {
        let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM reservations WHERE id = $1 AND user_id = $2)")
            .bind(after)
            .bind(user)
            .fetch_one(pool)
            .await?;
        if !known {
            return Err(Error::invalid("after", "must be a cursor from `next`"));
        }
    }
    // Keyset paging on (created_at, id): stable while new reservations arrive.
    let rows: Vec<Reservation> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM reservations
         WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
           AND ($3::uuid IS NULL OR (created_at, id) < (SELECT created_at, id FROM reservations WHERE id = $3))
         ORDER BY created_at DESC, id DESC LIMIT $4"
    ))
    .bind(user)
    .bind(status)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Cancels a live hold of `user`; the seat is free again at commit.
pub async fn cancel(pool: &PgPool, topics: &Topics, user: Uuid, id: Uuid) -> Result<Reservation> {
    let mut tx = crate::db::begin(pool).await?;
    let r: Option<Reservation> = sqlx::query_as(&format!(
        "UPDATE reservations SET status = 'CANCELLED', cancelled_at = clock_timestamp()
         WHERE id = $1 AND user_id = $2 AND {held} AND expires_at > clock_timestamp()
         RETURNING {COLUMNS}",
        held = status_is("HELD"),
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
