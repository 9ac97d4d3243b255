//! The live seat map of a schedule (issue 13): a snapshot, then one event per seat change.
//!
//! Changes are captured by triggers on `reservations` (`seat_events_on_insert` and
//! `seat_events_on_update`, statement-level since migration 0130; one row-level trigger before):
//! every status change of a reservation, whatever code made it — hold, payment, cancellation,
//! expiry by the expirer, the sweeper or a stale hold taken over, refund — writes a `seat_events`
//! row in the same transaction. A trigger rather than a call in each path, so that a path added
//! later cannot forget it and a rolled-back change never produces an event. Positions are
//! stamped after commit by [`crate::sequencer`], which is what makes `Last-Event-ID` resumes
//! gap-free with several writers and several api replicas.
//!
//! Fan-out (the shape of mini-redis's pub/sub): one `broadcast` channel per watched schedule in
//! [`SeatHub`], created on the first subscriber and dropped with the last. The api's one
//! [`crate::sequencer::Feed`] reads each change once and publishes it there; watchers never query
//! PostgreSQL after they started.
//!
//! A snapshot is exact at its position: it is read in one statement with the head position from
//! `seat_state`, which the stamping transaction keeps in step with the stamped events. It shows
//! status transitions: a hold past `expiresAt` stays HELD until the expirer (or the next hold)
//! ends it, which the event then reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

/// One seat change as streamed (`event: seat`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct SeatEvent {
    #[serde(skip)]
    pub pos: i64,
    #[serde(skip)]
    pub schedule_id: Uuid,
    pub seat_id: Uuid,
    pub seat_no: i32,
    pub status: String,
}

/// A seat in a snapshot.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct SeatStatus {
    pub seat_id: Uuid,
    pub seat_no: i32,
    pub status: String,
}

/// The whole map of a schedule at position `pos` (`event: snapshot`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    #[serde(skip)]
    pub pos: i64,
    pub schedule_id: Uuid,
    pub items: Vec<SeatStatus>,
}

/// The map of `schedule` exactly as of the current head position; `None` for an unknown schedule.
pub async fn snapshot(pool: &PgPool, schedule: Uuid) -> Result<Option<Snapshot>, sqlx::Error> {
    // One statement, one MVCC snapshot: the head and seat_state are read at the same instant, and
    // both only change together in the stamping transaction.
    let rows: Vec<(i64, Uuid, i32, String)> = sqlx::query_as(
        "SELECT h.pos, s.id, s.seat_no, COALESCE(st.status, 'AVAILABLE')
         FROM stream_heads h
         CROSS JOIN seats s
         LEFT JOIN seat_state st ON st.seat_id = s.id
         WHERE h.stream = 'seat' AND s.schedule_id = $1
         ORDER BY s.seat_no",
    )
    .bind(schedule)
    .fetch_all(pool)
    .await?;
    let Some(pos) = rows.first().map(|r| r.0) else { return Ok(None) };
    let items = rows.into_iter().map(|(_, seat_id, seat_no, status)| SeatStatus { seat_id, seat_no, status }).collect();
    Ok(Some(Snapshot { pos, schedule_id: schedule, items }))
}

/// What a resume from `Last-Event-ID` gets.
#[derive(Debug)]
pub enum Replay {
    /// The events of the schedule after the id, in order (possibly none).
    Events(Vec<SeatEvent>),
    /// The id is older than what is kept (or not one this database handed out): start over
    /// from a snapshot.
    TooOld,
}

/// The events of `schedule` after position `after`, at most `limit`, or [`Replay::TooOld`] when
/// some of them may have been pruned. Read in one repeatable-read transaction so the prune
/// watermark and the rows agree.
pub async fn replay(pool: &PgPool, schedule: Uuid, after: i64, limit: i64) -> Result<Replay, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let (head, pruned_upto): (i64, i64) = sqlx::query_as("SELECT pos, pruned_upto FROM stream_heads WHERE stream = 'seat'")
        .fetch_one(&mut *tx)
        .await?;
    if after < pruned_upto || after > head {
        return Ok(Replay::TooOld);
    }
    let events = sqlx::query_as(
        "SELECT e.pos, e.schedule_id, e.seat_id, s.seat_no, e.status
         FROM seat_events e JOIN seats s ON s.id = e.seat_id
         WHERE e.schedule_id = $1 AND e.pos > $2 AND e.pos IS NOT NULL
         ORDER BY e.pos LIMIT $3",
    )
    .bind(schedule)
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Replay::Events(events))
}

/// Every stamped seat event with `after < pos <= upto`, in position order (the feed's read).
pub async fn events_between(pool: &PgPool, after: i64, upto: i64) -> Result<Vec<SeatEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.pos, e.schedule_id, e.seat_id, s.seat_no, e.status
         FROM seat_events e JOIN seats s ON s.id = e.seat_id
         WHERE e.pos > $1 AND e.pos <= $2 ORDER BY e.pos",
    )
    .bind(after)
    .bind(upto)
    .fetch_all(pool)
    .await
}

/// Capacity of one schedule's channel. A watcher further behind than this gets `Lagged` and
/// catches up from PostgreSQL on its own, without disturbing the others.
const CHANNEL_CAPACITY: usize = 4096;

/// One broadcast channel per watched schedule (mini-redis's pub/sub map).
#[derive(Clone, Default)]
pub struct SeatHub {
    channels: Arc<Mutex<HashMap<Uuid, broadcast::Sender<Arc<SeatEvent>>>>>,
}

impl SeatHub {
    /// Subscribes to `schedule`'s changes, creating its channel on the first subscriber.
    pub fn subscribe(&self, schedule: Uuid) -> Subscription {
        let mut map = self.channels.lock().expect("seat hub lock");
        let rx = map.entry(schedule).or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0).subscribe();
        metrics::gauge!("seat_map_channels").set(map.len() as f64);
        Subscription { rx: Some(rx), hub: self.clone(), schedule }
    }

    /// Hands `events` (in position order) to the schedules' subscribers on this api.
    pub fn publish(&self, events: Vec<SeatEvent>) {
        let map = self.channels.lock().expect("seat hub lock");
        for e in events {
            if let Some(tx) = map.get(&e.schedule_id) {
                // No receivers left is fine: the last one is removing the channel right now.
                let _ = tx.send(Arc::new(e));
            }
        }
    }

    /// True when nobody on this api watches any schedule.
    pub fn is_empty(&self) -> bool {
        self.channels.lock().expect("seat hub lock").is_empty()
    }

    /// How many schedules have a channel (for tests and metrics).
    pub fn channels(&self) -> usize {
        self.channels.lock().expect("seat hub lock").len()
    }
}

/// A watcher's receiver; dropping the last one of a schedule drops its channel.
pub struct Subscription {
    rx: Option<broadcast::Receiver<Arc<SeatEvent>>>,
    hub: SeatHub,
    schedule: Uuid,
}

impl Subscription {
    /// The next change of the schedule, or `Lagged` when this watcher fell behind.
    pub async fn recv(&mut self) -> Result<Arc<SeatEvent>, broadcast::error::RecvError> {
        self.rx.as_mut().expect("receiver until drop").recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.hub.channels.lock().expect("seat hub lock");
        // Drop our receiver under the lock, so a concurrent subscribe cannot get a channel that
        // is being removed.
        self.rx.take();
        if map.get(&self.schedule).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.schedule);
        }
        metrics::gauge!("seat_map_channels").set(map.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(schedule: Uuid, pos: i64) -> SeatEvent {
        SeatEvent { pos, schedule_id: schedule, seat_id: Uuid::nil(), seat_no: 1, status: "HELD".into() }
    }

    #[tokio::test]
    async fn a_schedule_has_one_channel_while_watched_and_none_after_its_last_watcher() {
        let hub = SeatHub::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut w1 = hub.subscribe(a);
        let mut w2 = hub.subscribe(a);
        assert_eq!(hub.channels(), 1);
        hub.publish(vec![ev(a, 1), ev(b, 2), ev(a, 3)]);
        assert_eq!(w1.recv().await.unwrap().pos, 1);
        assert_eq!(w1.recv().await.unwrap().pos, 3);
        assert_eq!(w2.recv().await.unwrap().pos, 1);
        drop(w1);
        assert_eq!(hub.channels(), 1);
        drop(w2);
        assert_eq!(hub.channels(), 0);
        assert!(hub.is_empty());
    }
}
