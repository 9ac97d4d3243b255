//! Concerts, schedules and seats. A seat's status is not stored on the seat: it is read from its
//! reservations (SOLD if one is CONFIRMED, HELD if one is HELD and not yet past `expires_at`,
//! AVAILABLE otherwise), so freeing a seat is the same write as ending its reservation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Default number of seats per schedule (brief §4).
pub const DEFAULT_SEATS: i32 = 50;
const MAX_SEATS: i32 = 10_000;
const MAX_SCHEDULES: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewConcert {
    pub title: String,
    pub schedules: Vec<NewSchedule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewSchedule {
    pub starts_at: DateTime<Utc>,
    pub booking_opens_at: DateTime<Utc>,
    #[serde(default = "default_seats")]
    pub seat_count: i32,
    pub price: i64,
}

fn default_seats() -> i32 {
    DEFAULT_SEATS
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedConcert {
    pub concert_id: Uuid,
    pub title: String,
    pub schedules: Vec<Schedule>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    pub schedule_id: Uuid,
    pub starts_at: DateTime<Utc>,
    pub booking_opens_at: DateTime<Utc>,
    pub seat_count: i32,
    pub available_seats: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct ConcertSummary {
    pub concert_id: Uuid,
    pub title: String,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Seat {
    pub seat_id: Uuid,
    pub seat_no: i32,
    pub price: i64,
    pub status: String,
}

/// Creates a concert, its schedules and their seats in one transaction.
pub async fn create_concert(pool: &PgPool, c: NewConcert) -> Result<CreatedConcert> {
    let title = Error::display_text("title", &c.title, 200)?.to_string();
    if c.schedules.is_empty() || c.schedules.len() > MAX_SCHEDULES {
        return Err(Error::invalid("schedules", format!("must hold 1 to {MAX_SCHEDULES} schedules")));
    }
    for (i, s) in c.schedules.iter().enumerate() {
        if !(1..=MAX_SEATS).contains(&s.seat_count) {
            return Err(Error::invalid(&format!("schedules[{i}].seatCount"), format!("must be 1 to {MAX_SEATS}")));
        }
        if !(0..=100_000_000).contains(&s.price) {
            return Err(Error::invalid(&format!("schedules[{i}].price"), "must be 0 to 100000000"));
        }
        if s.booking_opens_at > s.starts_at {
            return Err(Error::invalid(&format!("schedules[{i}].bookingOpensAt"), "must not be after startsAt"));
        }
    }
    let concert_id = Uuid::new_v4();
    let mut tx = crate::db::begin(pool).await?;
    sqlx::query("INSERT INTO concerts (id, title) VALUES ($1, $2)")
        .bind(concert_id)
        .bind(&title)
        .execute(&mut *tx)
        .await?;
    let mut schedules = Vec::new();
    for s in c.schedules {
        let schedule_id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO schedules (id, concert_id, starts_at, booking_opens_at, seat_count)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(schedule_id)
        .bind(concert_id)
        .bind(s.starts_at)
        .bind(s.booking_opens_at)
        .bind(s.seat_count)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO seats (id, schedule_id, seat_no, price)
             SELECT gen_random_uuid(), $1, n, $2 FROM generate_series(1, $3) AS n",
        )
        .bind(schedule_id)
        .bind(s.price)
        .bind(s.seat_count)
        .execute(&mut *tx)
        .await?;
        schedules.push(Schedule {
            schedule_id,
            starts_at: s.starts_at,
            booking_opens_at: s.booking_opens_at,
            seat_count: s.seat_count,
            available_seats: s.seat_count as i64,
        });
    }
    tx.commit().await?;
    Ok(CreatedConcert { concert_id, title, schedules })
}

pub async fn list_concerts(pool: &PgPool) -> Result<Vec<ConcertSummary>> {
    Ok(sqlx::query_as("SELECT id AS concert_id, title FROM concerts ORDER BY created_at DESC, id LIMIT 500")
        .fetch_all(pool)
        .await?)
}

/// Schedules of a concert with the seats still available (a stale hold counts as available).
///
/// The count states the live-reservation predicate (`status IN ('HELD', 'CONFIRMED')`) so that it
/// ranges over the schedule's own live reservations (`reservations_live_by_schedule`), not over
/// every live hold of every schedule, which is what a sale elsewhere would make it read.
pub async fn schedules(pool: &PgPool, concert: Uuid) -> Result<Vec<Schedule>> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM concerts WHERE id = $1)")
        .bind(concert)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Err(Error::NotFound("concert"));
    }
    Ok(sqlx::query_as(
        "SELECT s.id AS schedule_id, s.starts_at, s.booking_opens_at, s.seat_count,
                s.seat_count - (SELECT count(*) FROM reservations r
                                WHERE r.schedule_id = s.id AND r.status IN ('HELD', 'CONFIRMED')
                                  AND (r.status = 'CONFIRMED' OR r.expires_at > now())) AS available_seats
         FROM schedules s WHERE s.concert_id = $1 ORDER BY s.starts_at, s.id",
    )
    .bind(concert)
    .fetch_all(pool)
    .await?)
}

/// Seats of a schedule with their status.
pub async fn seats(pool: &PgPool, schedule: Uuid) -> Result<Vec<Seat>> {
    let seats: Vec<Seat> = sqlx::query_as(
        "SELECT s.id AS seat_id, s.seat_no, s.price,
                CASE WHEN r.status = 'CONFIRMED' THEN 'SOLD'
                     WHEN r.status = 'HELD' AND r.expires_at > now() THEN 'HELD'
                     ELSE 'AVAILABLE' END AS status
         FROM seats s
         LEFT JOIN reservations r ON r.seat_id = s.id AND r.status IN ('HELD', 'CONFIRMED')
         WHERE s.schedule_id = $1 ORDER BY s.seat_no",
    )
    .bind(schedule)
    .fetch_all(pool)
    .await?;
    if seats.is_empty() {
        return Err(Error::NotFound("schedule"));
    }
    Ok(seats)
}

/// Per schedule, its booking opening time and the instant this process read it.
type KnownOpenings = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Uuid, (DateTime<Utc>, std::time::Instant)>>>;

/// Booking opening times recently read by this process: the queue entry, the busiest route of a
/// sale, reads a schedule's `booking_opens_at` for every entrant. No route changes it, but an
/// operator may move an opening in the database during an incident, so a read is trusted for
/// [`OPENING_TIME_TTL`] only: one query per schedule per second per process instead of one per
/// entrant, and a moved opening reaches every replica within that second.
#[derive(Clone, Default)]
pub struct OpeningTimes {
    known: KnownOpenings,
}

/// How long a read opening time is trusted.
pub const OPENING_TIME_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl OpeningTimes {
    /// [`schedule_opens_at`], from memory when read less than [`OPENING_TIME_TTL`] ago.
    pub async fn get(&self, pool: &PgPool, schedule: Uuid) -> Result<DateTime<Utc>> {
        if let Some((at, read)) = self.known.lock().expect("opening times lock").get(&schedule) {
            if read.elapsed() < OPENING_TIME_TTL {
                return Ok(*at);
            }
        }
        let at = schedule_opens_at(pool, schedule).await?;
        let mut known = self.known.lock().expect("opening times lock");
        if known.len() >= 100_000 {
            known.clear();
        }
        known.insert(schedule, (at, std::time::Instant::now()));
        Ok(at)
    }
}

pub async fn schedule_opens_at(pool: &PgPool, schedule: Uuid) -> Result<DateTime<Utc>> {
    let at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT booking_opens_at FROM schedules WHERE id = $1")
            .bind(schedule)
            .fetch_optional(pool)
            .await?;
    at.ok_or(Error::NotFound("schedule"))
}
