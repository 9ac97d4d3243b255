//! Lookups of reservations by a key read about the rows they are about, however many holds are
//! live and whatever PostgreSQL's statistics say (issue 11; `reservation::status_is`).
//!
//! The world: a venue whose statistics were taken after an earlier sale, when every reservation
//! was EXPIRED (`ANALYZE` then; autovacuum is off for the table, so nothing refreshes them),
//! and then a sale that left thousands of holds live and lapsed, as in the expiry burst. Each
//! product path runs on one connection, and the test counts the `reservations` rows it read
//! (`pg_stat_user_tables`: sequential plus index fetches), which is what a planner misled by the
//! statistics multiplies: a scan of every live hold instead of a descent of the key.

mod common;

use std::time::Duration;

use booking::catalog::{self, NewConcert, NewSchedule};
use booking::reservation::{self, HoldRequest};
use chrono::Utc;
use common::TestEnv;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

/// Live holds in the sale.
const LIVE: i64 = 3000;

struct World {
    env: TestEnv,
    /// One connection, so that every statement of a path reports to the same backend.
    pool: PgPool,
    /// Owner of the live holds.
    crowd: Uuid,
    /// A user with nothing yet.
    buyer: Uuid,
    /// The schedule of every seat.
    schedule: Uuid,
    /// Seats 1..=LIVE carry the live holds; the rest are free.
    seats: Vec<Uuid>,
    /// The live holds, in seat order.
    holds: Vec<Uuid>,
}

async fn world() -> World {
    let env = TestEnv::new().await;
    let pool = PgPoolOptions::new().max_connections(1).connect(&env.db_url).await.expect("connect");
    let crowd = booking::user::create(&pool, "crowd").await.expect("user").user_id;
    let buyer = booking::user::create(&pool, "buyer").await.expect("user").user_id;
    let concert = on_sale(&pool, "plans", 1, LIVE as i32 + 10).await;
    let schedule = concert.schedules[0].schedule_id;
    let seats: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM seats WHERE schedule_id = $1 ORDER BY seat_no")
        .bind(schedule)
        .fetch_all(&pool)
        .await
        .expect("seats");
    sqlx::query("ALTER TABLE reservations SET (autovacuum_enabled = false)").execute(&pool).await.expect("autovacuum off");
    // The earlier sale, all over: the statistics see no live hold.
    let insert = |status: &'static str, expires: &'static str| {
        format!(
            "INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
             SELECT gen_random_uuid(), $1, id, schedule_id, price, '{status}', now(), {expires}
             FROM seats WHERE schedule_id = $2 AND seat_no <= $3"
        )
    };
    sqlx::query(&insert("EXPIRED", "now() - interval '1 hour'")).bind(crowd).bind(schedule).bind(LIVE).execute(&pool).await.expect("earlier sale");
    sqlx::query("ANALYZE reservations").execute(&pool).await.expect("analyze");
    // This sale: the same seats held again, and lapsed (due for the expirer).
    sqlx::query(&insert("HELD", "now() - interval '1 second'")).bind(crowd).bind(schedule).bind(LIVE).execute(&pool).await.expect("this sale");
    let holds: Vec<Uuid> = sqlx::query_scalar(
        "SELECT r.id FROM reservations r JOIN seats s ON s.id = r.seat_id WHERE r.status = 'HELD' ORDER BY s.seat_no",
    )
    .fetch_all(&pool)
    .await
    .expect("holds");
    assert_eq!(holds.len() as i64, LIVE);
    World { env, pool, crowd, buyer, schedule, seats, holds }
}

/// A cumulative statistic (`sql`, one bigint) of this connection's backend, its own latest work
/// included: pending statistics of a backend are flushed only when it next goes idle.
async fn statistic_so_far(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()").execute(pool).await.expect("flush");
    sqlx::query_scalar(sql).fetch_one(pool).await.expect("statistics")
}

/// `reservations` rows read so far, everything this connection did included.
async fn rows_read_so_far(pool: &PgPool) -> i64 {
    statistic_so_far(pool, "SELECT seq_tup_read + COALESCE(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE relname = 'reservations'").await
}

/// Runs `work` and returns how many `reservations` rows it read.
async fn rows_read<F: std::future::Future>(pool: &PgPool, work: F) -> (i64, F::Output) {
    let before = rows_read_so_far(pool).await;
    let out = work.await;
    (rows_read_so_far(pool).await - before, out)
}

/// A concert on sale since an hour ago: `schedules` dates a month away, `seats` seats each.
async fn on_sale(pool: &PgPool, title: &str, schedules: usize, seats: i32) -> catalog::CreatedConcert {
    let schedules = (0..schedules)
        .map(|i| NewSchedule {
            starts_at: Utc::now() + chrono::Duration::days(30 + i as i64),
            booking_opens_at: Utc::now() - chrono::Duration::hours(1),
            seat_count: seats,
            price: 100,
        })
        .collect();
    catalog::create_concert(pool, NewConcert { title: title.into(), schedules }).await.expect("concert")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_by_key_read_a_handful_of_rows_while_the_statistics_say_no_hold_is_live() {
    let w = world().await;
    let (pool, topics) = (&w.pool, w.env.topics());
    // The statistics were taken before this sale: the premise of the test.
    let held_share: Option<f32> = sqlx::query_scalar(
        "SELECT most_common_freqs[array_position(most_common_vals::text::text[], 'HELD')] FROM pg_stats
         WHERE tablename = 'reservations' AND attname = 'status'",
    )
    .fetch_one(pool)
    .await
    .expect("pg_stats");
    assert_eq!(held_share, None, "the statistics should know of no HELD reservation");

    // The expirer: one due hold, then a batch (a small one: with a batch of hundreds, a table
    // this small is rightly read whole).
    let (read, out) = rows_read(pool, booking::expiry::expire(pool, topics, &w.holds[..1], "pipeline")).await;
    assert_eq!(out.expect("expire").expired, 1);
    assert!(read <= 10, "expiring one hold read {read} reservations (of {LIVE} live holds)");
    let (read, out) = rows_read(pool, booking::expiry::expire(pool, topics, &w.holds[1..21], "pipeline")).await;
    assert_eq!(out.expect("expire").expired, 20);
    assert!(read <= 2 * 20 + 10, "expiring 20 holds read {read} reservations (of {LIVE} live holds)");

    // A hold on a free seat: the look, the seat limit's count, the insert.
    let free = w.seats[LIVE as usize];
    let hold = |seat: Uuid| async move {
        let req = HoldRequest { user: w.buyer, seat, ttl: Duration::from_secs(300), max_seats: 4, key: None };
        reservation::hold(pool, &reservation::HoldGroup::start(pool.clone()), topics, req, w.schedule).await
    };
    let (read, held) = rows_read(pool, hold(free)).await;
    let held = held.expect("hold").fresh.expect("a new hold");
    assert!(read <= 10, "a hold on a free seat read {read} reservations (of {LIVE} live holds)");

    // A hold on a seat whose hold lapsed: the takeover ends that hold first.
    let lapsed_seat = w.seats[LIVE as usize - 1];
    let (read, taken) = rows_read(pool, hold(lapsed_seat)).await;
    taken.expect("takeover of a lapsed hold").fresh.expect("a new hold");
    assert!(read <= 10, "taking over a lapsed hold read {read} reservations (of {LIVE} live holds)");
    let ended: String = sqlx::query_scalar("SELECT status FROM reservations WHERE id = $1").bind(w.holds[LIVE as usize - 1]).fetch_one(pool).await.expect("status");
    assert_eq!(ended, "EXPIRED");

    // Cancelling one's own hold.
    let (read, cancelled) = rows_read(pool, reservation::cancel(pool, topics, w.buyer, held.reservation_id)).await;
    assert_eq!(cancelled.expect("cancel").status, "CANCELLED");
    assert!(read <= 10, "cancelling a hold read {read} reservations (of {LIVE} live holds)");

    // The crowd's holds are untouched by all of this but the ones expired or taken over.
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations WHERE user_id = $1 AND status = 'HELD'").bind(w.crowd).fetch_one(pool).await.expect("count");
    assert_eq!(live, LIVE - 22);
}

/// A concert's schedules with their available seats, while another concert's sale has
/// thousands of live holds: the count reads the concert's own reservations, not every live hold
/// of the sale (an ordinary refresh of the page during a sale; statistics up to date).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concerts_available_seats_are_counted_from_its_own_reservations_during_another_sale() {
    let env = TestEnv::new().await;
    let pool = PgPoolOptions::new().max_connections(1).connect(&env.db_url).await.expect("connect");
    let crowd = booking::user::create(&pool, "crowd").await.expect("user").user_id;
    let big = on_sale(&pool, "the big sale", 1, LIVE as i32 + 10).await;
    let small = on_sale(&pool, "a quiet one", 2, 10).await;
    let hold = |status: &'static str, expires: &'static str, schedule: Uuid, seats: i64| {
        let pool = &pool;
        async move {
            sqlx::query(&format!(
                "INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
                 SELECT gen_random_uuid(), $1, id, schedule_id, price, '{status}', now(), {expires}
                 FROM seats WHERE schedule_id = $2 AND seat_no <= $3"
            ))
            .bind(crowd)
            .bind(schedule)
            .bind(seats)
            .execute(pool)
            .await
            .expect("reservations");
        }
    };
    // The big sale: LIVE seats held, for minutes yet.
    hold("HELD", "now() + interval '5 minutes'", big.schedules[0].schedule_id, LIVE).await;
    // The quiet concert: in each schedule, seat 1 sold, seat 2 held, seat 3's hold lapsed.
    for s in &small.schedules {
        hold("CONFIRMED", "now() - interval '1 hour'", s.schedule_id, 1).await;
        sqlx::query("INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
                     SELECT gen_random_uuid(), $1, id, schedule_id, price, 'HELD', now(),
                            CASE seat_no WHEN 2 THEN now() + interval '5 minutes' ELSE now() - interval '1 second' END
                     FROM seats WHERE schedule_id = $2 AND seat_no IN (2, 3)")
            .bind(crowd)
            .bind(s.schedule_id)
            .execute(&pool)
            .await
            .expect("holds");
    }
    sqlx::query("ANALYZE reservations").execute(&pool).await.expect("analyze");

    let (read, listed) = rows_read(&pool, catalog::schedules(&pool, small.concert_id)).await;
    let listed = listed.expect("schedules");
    assert_eq!(listed.iter().map(|s| s.available_seats).collect::<Vec<_>>(), vec![8, 8], "10 seats, one sold and one held (the lapsed hold counts as free)");
    assert!(read <= 20, "listing a quiet concert's 2 schedules read {read} reservations (another concert has {LIVE} live holds)");

    let (read, listed) = rows_read(&pool, catalog::schedules(&pool, big.concert_id)).await;
    assert_eq!(listed.expect("schedules")[0].available_seats, 10);
    assert!(read <= LIVE + 20, "listing the big sale's schedule read {read} reservations (it has {LIVE} live holds)");
}

/// Leaf pages of `seat_events_unstamped` this connection's backend has read so far.
async fn unstamped_index_pages_so_far(pool: &PgPool) -> i64 {
    statistic_so_far(pool, "SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes WHERE indexrelname = 'seat_events_unstamped'").await
}

/// The live streams' feed finds unstamped seat events above a floor of what it knows stamped,
/// instead of walking, on every poll, the index entries of everything stamped since the last
/// VACUUM; and the floor never passes a seat event whose transaction took its id before a stamp
/// and committed after it (`floor::Floor`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seat_feed_looks_above_what_it_stamped_and_never_skips_a_late_commit() {
    const SEATS: i64 = 9_000;
    let env = TestEnv::new().await;
    // One connection for the feed, so that its reads report to one backend.
    let feed_pool = PgPoolOptions::new().max_connections(1).connect(&env.db_url).await.expect("connect");
    let pool = &env.pool;
    sqlx::query("ALTER TABLE seat_events SET (autovacuum_enabled = false)").execute(pool).await.expect("autovacuum off");
    let crowd = booking::user::create(pool, "crowd").await.expect("user").user_id;
    let concert = on_sale(pool, "feed", 1, SEATS as i32 + 100).await;
    let schedule = concert.schedules[0].schedule_id;
    let hold_seats = |from: i64, to: i64| {
        format!(
            "INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
             SELECT gen_random_uuid(), '{crowd}', id, schedule_id, price, 'HELD', now(), now() + interval '5 minutes'
             FROM seats WHERE schedule_id = '{schedule}' AND seat_no BETWEEN {from} AND {to}"
        )
    };
    let mut feed = booking::sequencer::Feed::new(feed_pool.clone(), Default::default(), Default::default(), Default::default());
    let stamped = |seat_no: i64| {
        let pool = pool.clone();
        async move {
            let pos: Option<i64> = sqlx::query_scalar(
                "SELECT e.pos FROM seat_events e JOIN seats s ON s.id = e.seat_id WHERE s.schedule_id = $1 AND s.seat_no = $2",
            )
            .bind(schedule)
            .bind(seat_no)
            .fetch_one(&pool)
            .await
            .expect("seat event");
            pos.is_some()
        }
    };

    // A late writer takes its seat event's id first and stays open…
    let mut late = booking::db::begin(pool).await.expect("begin");
    sqlx::query(&hold_seats(SEATS + 1, SEATS + 1)).execute(&mut *late).await.expect("late hold");
    // …while a sale's worth of seat events (higher ids) commit and are stamped, round after round.
    sqlx::query(&hold_seats(1, SEATS)).execute(pool).await.expect("holds");
    feed.step().await.expect("step");
    for seat in SEATS + 2..SEATS + 5 {
        sqlx::query(&hold_seats(seat, seat)).execute(pool).await.expect("hold");
        feed.step().await.expect("step");
    }
    assert!(stamped(SEATS).await && stamped(SEATS + 4).await);
    late.commit().await.expect("commit");
    feed.step().await.expect("step");
    assert!(stamped(SEATS + 1).await, "the seat event committed after later ones were stamped got its position");

    // With nothing left running, a few more rounds let the floor pass the whole sale: a look at
    // the streams then reads a page or two of the unstamped index, not one per few hundred
    // seat events stamped since the last VACUUM.
    let mut next = SEATS + 5;
    let mut pages = i64::MAX;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        sqlx::query(&hold_seats(next, next)).execute(pool).await.expect("hold");
        feed.step().await.expect("step");
        let before = unstamped_index_pages_so_far(&feed_pool).await;
        feed.step().await.expect("an idle step: the probe alone");
        pages = unstamped_index_pages_so_far(&feed_pool).await - before;
        next += 1;
        if pages <= 3 || next > SEATS + 90 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pages <= 3, "an idle look at the streams read {pages} pages of the unstamped index after {SEATS} seat events were stamped");
}

/// The floor's argument (the test above) needs every seat event written by the triggers on
/// `reservations`, after the statement's own writes: a direct insert is refused, and a change of
/// a reservation still writes its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seat_events_are_written_by_the_reservation_triggers_only() {
    let env = TestEnv::new().await;
    let pool = &env.pool;
    let user = booking::user::create(pool, "direct").await.expect("user").user_id;
    let schedule = on_sale(pool, "direct", 1, 2).await.schedules[0].schedule_id;
    let direct = sqlx::query("INSERT INTO seat_events (schedule_id, seat_id, status) SELECT schedule_id, id, 'HELD' FROM seats WHERE schedule_id = $1")
        .bind(schedule)
        .execute(pool)
        .await;
    let code = direct.as_ref().err().and_then(|e| e.as_database_error()).and_then(|e| e.code()).map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("55000"), "a direct insert into seat_events is refused: {direct:?}");
    sqlx::query(
        "INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
         SELECT gen_random_uuid(), $2, id, schedule_id, price, 'HELD', now(), now() + interval '5 minutes'
         FROM seats WHERE schedule_id = $1",
    )
    .bind(schedule)
    .bind(user)
    .execute(pool)
    .await
    .expect("holds");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM seat_events WHERE schedule_id = $1").bind(schedule).fetch_one(pool).await.unwrap();
    assert_eq!(events, 2, "each hold wrote its seat event through the trigger");
}

/// Every buyer of a sale holds seats of the same schedule, so a hold must not lock the schedule's
/// row: concurrent `FOR KEY SHARE` locks of one row (what a foreign key check takes) need a
/// MultiXact each (migration 0230). The hold locks its own seat's row instead, through one key
/// over the seat and its schedule, which refuses a reservation whose schedule is not its seat's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_leave_their_schedules_row_unlocked_and_a_reservation_names_its_seats_own_schedule() {
    let env = TestEnv::new().await;
    let (pool, topics) = (&env.pool, env.topics());
    let concert = on_sale(pool, "one row", 2, 4).await;
    let group = reservation::HoldGroup::start(pool.clone());
    let (schedule, other) = (concert.schedules[0].schedule_id, concert.schedules[1].schedule_id);
    let seats: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM seats WHERE schedule_id = $1 ORDER BY seat_no").bind(schedule).fetch_all(pool).await.unwrap();
    // A row lock writes the locker into the row's xmax (a MultiXact when there are several).
    // Creating the seats locked the schedule (their own key); nothing after that may.
    let xmax = || async { sqlx::query_scalar::<_, String>("SELECT xmax::text FROM schedules WHERE id = $1").bind(schedule).fetch_one(pool).await.unwrap() };
    let before = xmax().await;
    for (i, seat) in seats.iter().enumerate() {
        let user = booking::user::create(pool, &format!("buyer {i}")).await.expect("user").user_id;
        let req = HoldRequest { user, seat: *seat, ttl: Duration::from_secs(300), max_seats: 4, key: None };
        let held = reservation::hold(pool, &group, topics, req, schedule).await.expect("hold");
        assert!(held.fresh.is_some(), "hold {i}");
    }
    assert_eq!(xmax().await, before, "four holds locked their schedule's row");
    let locked: String = sqlx::query_scalar("SELECT xmax::text FROM seats WHERE id = $1").bind(seats[0]).fetch_one(pool).await.unwrap();
    assert_ne!(locked, "0", "the hold checked its seat's row");

    // A reservation of a seat under another schedule is refused, whoever writes it.
    let user = booking::user::create(pool, "mismatch").await.expect("user").user_id;
    let seat_elsewhere: Uuid = sqlx::query_scalar("SELECT id FROM seats WHERE schedule_id = $1 LIMIT 1").bind(other).fetch_one(pool).await.unwrap();
    let wrong = sqlx::query(
        "INSERT INTO reservations (id, user_id, seat_id, schedule_id, price, status, created_at, expires_at)
         VALUES (gen_random_uuid(), $1, $2, $3, 100, 'HELD', now(), now() + interval '5 minutes')",
    )
    .bind(user)
    .bind(seat_elsewhere)
    .bind(schedule)
    .execute(pool)
    .await;
    let code = wrong.as_ref().err().and_then(|e| e.as_database_error()).and_then(|e| e.code()).map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("23503"), "a reservation whose schedule is not its seat's: {wrong:?}");
}
