//! Commit-ordered positions for everything a live stream serves (issue 17), and the api's feed
//! that hands newly visible events to the open streams.
//!
//! **The invariant:** the positions a reader can see always form a prefix — once any reader has
//! seen position `p`, no row with a position below `p` ever becomes visible. A client resuming
//! with `Last-Event-ID: p` (to this api or another replica) therefore gets every later event
//! exactly once, in order.
//!
//! Where it comes from, seat events: rows are written with no position (by a trigger on
//! `reservations`, inside the booking transactions). [`stamp`] is the single sequencer: it locks
//! the stream's row in `stream_heads` (`FOR UPDATE`, so one stamping transaction at a time whatever
//! the number of api replicas running it), then, in a *new* statement — whose snapshot sees
//! everything committed before the lock was granted, including the previous stamper's commit —
//! gives the committed, unstamped rows the positions `head + 1 …`, and commits. A writer's
//! transaction that is still open is invisible to the stamper and simply gets a later position
//! once it commits. Stamping transactions commit one after another in position order, and a
//! PostgreSQL snapshot that sees a transaction as committed also sees every transaction that
//! committed before it started; so readers see a prefix. Bookings never touch `stream_heads`:
//! they do not serialize on the sequencer, only the (cheap, batched) stamping does.
//!
//! Notifications have one writer, the worker, which stores whole batches: it takes the same lock
//! in its inserting transaction and writes each row with its position at once
//! ([`crate::notification::store`]), the same argument in one transaction instead of two, and
//! each row written once. The stamper still stamps a notification written without a position.
//!
//! Cost: a seat event is served one stamping round after its commit (the [`Feed`] polls every
//! `--stream-poll-interval`, 20 ms by default), and each stamped row is written a second time. A
//! notification is served as soon as the worker's announcement (which names each user's latest
//! position) reaches the feed: the feed wakes those users' streams without reading anything.
//!
//! Within one stamping batch rows are ordered by insertion id. For one seat that is commit order:
//! two changes of a seat are serialized by PostgreSQL (the row lock of the reservation, or the
//! partial unique index a new hold waits on), so the later change's trigger runs after the
//! earlier one committed.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::floor::{Floor, Look};
use crate::notification::NotificationHub;
use crate::seat_map::SeatHub;

/// The streams that carry commit-ordered positions, as named in `stream_heads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Seat,
    Notification,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Seat => "seat",
            Stream::Notification => "notification",
        }
    }
}

/// What one [`stamp`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Rows given a position.
    pub stamped: i64,
    /// The stream's head after the commit (everything at or below it is visible to every new
    /// snapshot).
    pub head: i64,
    /// One past the highest id stamped, if any row was.
    pub next_id: Option<i64>,
    /// The stamping transaction's own id, if it wrote anything (a stamp that found nothing does
    /// not take one).
    pub xid: Option<i64>,
    /// The oldest transaction still running when the stamping statement's snapshot was taken:
    /// every transaction with a lower id had ended.
    pub xmin: i64,
}

/// Gives the next positions to at most `limit` committed, unstamped rows of `stream` with an id
/// of at least `from` (a [`Floor`]; 0 for all), in one transaction holding the stream's head row.
///
/// Three round trips: `BEGIN` with the lock, one statement, `COMMIT`.
pub async fn stamp(pool: &PgPool, stream: Stream, limit: i64, from: i64) -> Result<Stamp, sqlx::Error> {
    // The sequencer lock rides on BEGIN: a second stamper (another replica) waits here until the
    // first commits. (The stream's name is one of two constants, never input.)
    let mut tx = crate::db::begin_with(pool, format!("BEGIN; SELECT 1 FROM stream_heads WHERE stream = '{}' FOR UPDATE", stream.name())).await?;
    // A separate statement on purpose: its snapshot is taken after the lock was granted, so it
    // sees the head and the rows the previous stamper committed. It reads the head, stamps the
    // pending rows after it and moves the head, all in that one snapshot.
    let stamped_cte = match stream {
        Stream::Seat => {
            "stamped AS (
                 UPDATE seat_events e SET pos = pending.pos FROM pending WHERE e.id = pending.id
                 RETURNING e.pos, e.seat_id, e.schedule_id, e.status
             ), state AS (
                 INSERT INTO seat_state (seat_id, schedule_id, status, pos)
                 SELECT DISTINCT ON (seat_id) seat_id, schedule_id, status, pos FROM stamped
                 ORDER BY seat_id, pos DESC
                 ON CONFLICT (seat_id) DO UPDATE SET status = excluded.status, pos = excluded.pos
             )"
        }
        Stream::Notification => {
            "stamped AS (
                 UPDATE notifications n SET pos = pending.pos FROM pending WHERE n.id = pending.id
                 RETURNING n.pos
             )"
        }
    };
    let table = match stream {
        Stream::Seat => "seat_events",
        Stream::Notification => "notifications",
    };
    let sql = format!(
        "WITH head AS (SELECT pos FROM stream_heads WHERE stream = $1),
              pending AS (
                  SELECT id, (SELECT pos FROM head) + row_number() OVER (ORDER BY id) AS pos
                  FROM (SELECT id FROM {table} WHERE pos IS NULL AND id >= $3 ORDER BY id LIMIT $2) p
              ), {stamped_cte}, moved AS (
                  UPDATE stream_heads SET pos = (SELECT pos FROM head) + (SELECT count(*) FROM stamped)
                  WHERE stream = $1 AND EXISTS (SELECT 1 FROM stamped)
                  RETURNING pos
              )
         SELECT (SELECT count(*) FROM stamped), COALESCE((SELECT pos FROM moved), (SELECT pos FROM head)),
                (SELECT max(id) + 1 FROM pending),
                pg_current_xact_id_if_assigned()::text::bigint, pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    );
    let (stamped, head, next_id, xid, xmin): (i64, i64, Option<i64>, Option<i64>, i64) =
        sqlx::query_as(&sql).bind(stream.name()).bind(limit).bind(from).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    if stamped > 0 {
        metrics::counter!("stream_positions_stamped_total", "stream" => stream.name()).increment(stamped as u64);
    }
    Ok(Stamp { stamped, head, next_id, xid, xmin })
}

impl Stamp {
    /// What this stamp of at most `limit` rows showed, for the seat events' [`Floor`] (its
    /// argument is in `floor`). The stamping transaction's own id bounds the writers of every
    /// row below those it stamped: it was assigned after its snapshot, which saw them committed.
    /// A stamp that hit its limit is taken to prove nothing about what is left.
    pub fn look(&self, limit: i64) -> Look {
        Look {
            read: self.next_id.zip(self.xid),
            xmin: self.xmin,
            done_below: if self.stamped < limit { i64::MAX } else { i64::MIN },
        }
    }
}

/// One look at both streams: their heads and whether anything waits to be stamped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Probe {
    pub seat_head: i64,
    pub seat_pending: bool,
    pub notification_head: i64,
    pub notification_pending: bool,
}

/// Reads both heads and the pending flags in one query (what an idle feed costs per poll).
/// Seat events below `seat_floor` (a [`Floor`]) are known stamped.
pub async fn probe(pool: &PgPool, seat_floor: i64) -> Result<Probe, sqlx::Error> {
    let (seat_head, seat_pending, notification_head, notification_pending): (i64, bool, i64, bool) = sqlx::query_as(
        "SELECT (SELECT pos FROM stream_heads WHERE stream = 'seat'),
                EXISTS (SELECT 1 FROM seat_events WHERE pos IS NULL AND id >= $1),
                (SELECT pos FROM stream_heads WHERE stream = 'notification'),
                EXISTS (SELECT 1 FROM notifications WHERE pos IS NULL)",
    )
    .bind(seat_floor)
    .fetch_one(pool)
    .await?;
    Ok(Probe { seat_head, seat_pending, notification_head, notification_pending })
}

/// Deletes seat events older than `retention` (by stamped position, oldest first, at most
/// `limit`) and records the highest deleted position, so a resume from before it gets a fresh
/// snapshot instead of a gap. Returns how many rows went.
pub async fn prune_seat_events(pool: &PgPool, retention: Duration, limit: i64) -> Result<u64, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    let (upto, n): (Option<i64>, i64) = sqlx::query_as(
        "WITH gone AS (
             DELETE FROM seat_events WHERE id IN (
                 SELECT id FROM seat_events
                 WHERE pos IS NOT NULL AND created_at < clock_timestamp() - make_interval(secs => $1::float8 / 1000)
                 ORDER BY pos LIMIT $2)
             RETURNING pos)
         SELECT max(pos), count(*) FROM gone",
    )
    .bind(retention.as_millis() as i64)
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    let Some(upto) = upto else { return Ok(0) };
    // Written before the rows disappear from any reader's view (same commit).
    sqlx::query("UPDATE stream_heads SET pruned_upto = GREATEST(pruned_upto, $1) WHERE stream = 'seat'")
        .bind(upto)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(n as u64)
}

/// Settings of the api's stream feed and the caps on open streams.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// How often the feed looks for new positions (and stamps pending rows).
    pub poll: Duration,
    /// Most rows one stamping transaction handles.
    pub stamp_batch: i64,
    /// How long seat events stay replayable for `Last-Event-ID`.
    pub seat_event_retention: Duration,
    /// Most open notification streams per user on one api.
    pub max_streams_per_user: usize,
    /// Most open streams (seat map and notifications) on one api.
    pub max_streams: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(20),
            stamp_batch: 5000,
            seat_event_retention: Duration::from_secs(3600),
            max_streams_per_user: 5,
            max_streams: 20_000,
        }
    }
}

/// Outcome of one [`Feed::step`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStep {
    pub stamped: i64,
    pub seat_events: usize,
    pub notified_users: usize,
}

/// The api's one reader of the streams: stamps pending rows, reads what became visible past the
/// last position it handed out, and fans it out in memory (seat events to the schedule's
/// channel, "something new" to each user's watch). Streams never poll PostgreSQL themselves, so
/// the database work of idle streams is this feed's one query per poll, whatever their number.
pub struct Feed {
    pub pool: PgPool,
    pub seats: SeatHub,
    pub notifications: NotificationHub,
    pub settings: StreamSettings,
    seat_last: Option<i64>,
    notification_last: Option<i64>,
    /// Only seat events have one: a notification can be inserted (and take its id) by a
    /// transaction that has no transaction id yet, which the floor's argument needs. They are
    /// rarely unstamped anyway (the worker writes them with their positions).
    seat_floor: Floor,
}

impl Feed {
    pub fn new(pool: PgPool, seats: SeatHub, notifications: NotificationHub, settings: StreamSettings) -> Self {
        Self { pool, seats, notifications, settings, seat_last: None, notification_last: None, seat_floor: Floor::default() }
    }

    /// One round: probe, stamp what is pending, fan out what became visible.
    pub async fn step(&mut self) -> Result<FeedStep, sqlx::Error> {
        let mut out = FeedStep::default();
        let mut p = probe(&self.pool, self.seat_floor.get()).await?;
        // A stamp returns the head after its commit: no second probe needed.
        if p.seat_pending {
            let s = stamp(&self.pool, Stream::Seat, self.settings.stamp_batch, self.seat_floor.get()).await?;
            self.seat_floor.after(&s.look(self.settings.stamp_batch));
            out.stamped += s.stamped;
            p.seat_head = p.seat_head.max(s.head);
        }
        if p.notification_pending {
            let s = stamp(&self.pool, Stream::Notification, self.settings.stamp_batch, 0).await?;
            out.stamped += s.stamped;
            p.notification_head = p.notification_head.max(s.head);
        }
        // Seat events: read only when someone on this api watches; otherwise just move on.
        let seat_last = *self.seat_last.get_or_insert(p.seat_head);
        if p.seat_head > seat_last {
            if self.seats.is_empty() {
                self.seat_last = Some(p.seat_head);
            } else {
                let events = crate::seat_map::events_between(&self.pool, seat_last, p.seat_head).await?;
                out.seat_events = events.len();
                self.seat_last = Some(p.seat_head);
                self.seats.publish(events);
            }
        }
        let note_last = *self.notification_last.get_or_insert(p.notification_head);
        if p.notification_head > note_last {
            if !self.notifications.is_empty() {
                let users = crate::notification::users_between(&self.pool, note_last, p.notification_head).await?;
                out.notified_users = self.notifications.wake(users);
            }
            self.notification_last = Some(p.notification_head);
        }
        Ok(out)
    }

    async fn timed_step(&mut self, tick: &mut tokio::time::Interval) {
        let started = std::time::Instant::now();
        let step = self.step().await;
        if matches!(step, Ok(s) if s.stamped > 0 || s.seat_events > 0 || s.notified_users > 0) {
            metrics::histogram!("stream_feed_step_seconds").record(started.elapsed().as_secs_f64());
        }
        match step {
            Ok(s) if s.stamped >= self.settings.stamp_batch => tick.reset_immediately(),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "stream feed step failed"),
        }
    }

    /// Runs [`Feed::step`] when the worker announces stored notifications, and every `poll`
    /// (sooner while stamping batches are full) until `shutdown`; prunes old seat events once a
    /// minute.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The worker announces each stored batch after its commit (one NOTIFY per batch, see
        // `notification::announce_stored`), naming each user with their latest position. Those
        // streams are woken at once, with no read: the batch committed before it was announced,
        // and the positions it took are a prefix (see the module comment), so whatever a woken
        // stream reads up to that position is final. The poll stays as the fallback (a lost
        // announcement, PostgreSQL restarting, an announcement without positions) and for seat
        // events; telling a stream again what the announcement told it does not wake it.
        let mut listener = crate::notification::stored_listener(&self.pool, "stream feed").await;
        loop {
            let announced = crate::notification::next_announcement(&mut listener, self.settings.poll);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.timed_step(&mut tick).await,
                announced = announced => {
                    if announced.incomplete || announced.positions.is_empty() {
                        self.timed_step(&mut tick).await;
                        // The next poll a whole interval after this step.
                        tick.reset();
                    } else {
                        self.notifications.wake(announced.positions);
                    }
                }
                _ = prune.tick() => {
                    if let Err(e) = prune_seat_events(&self.pool, self.settings.seat_event_retention, 10_000).await {
                        tracing::warn!(error = %e, "pruning seat events failed");
                    }
                }
            }
        }
    }
}
