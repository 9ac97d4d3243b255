//! One contender per seat per api process: the seat fight (issue 11).
//!
//! When hundreds of requests for one seat arrive together, every one of them reads the seat as
//! free before the winner commits, and each then runs a whole hold transaction only to be refused
//! by the unique index, queueing for pool connections behind the others (measured: 500 requests
//! on one seat all answered only after 0.7 s). The gate lets one request per seat into the hold
//! at a time; the others wait for its outcome. When it held the seat, those already waiting are
//! answered SEAT_UNAVAILABLE at once, without a database round trip; when it did not, the next
//! one goes in.
//!
//! PostgreSQL still decides who gets a seat (the unique index on live reservations): the gate
//! only saves work, and with several api replicas each sends one contender at a time. A verdict is
//! trusted for [`VERDICT_TTL`] only and only by requests that were already waiting, so a seat that
//! comes back (cancelled, expired) is seen by the next request within that time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// How long a successful hold answers the requests queued behind it.
pub const VERDICT_TTL: Duration = Duration::from_millis(500);

#[derive(Clone, Default)]
pub struct HoldGate {
    seats: Arc<Mutex<HashMap<Uuid, Arc<Entry>>>>,
}

#[derive(Default)]
struct Entry {
    /// When an earlier contender held the seat (`None`: nobody yet, or it failed).
    turn: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// Requests holding or waiting for a turn; the entry leaves the map with the last one.
    users: Mutex<usize>,
}

/// A request's turn at a seat: while it lives, no other request of this process holds that seat.
pub struct Turn {
    gate: HoldGate,
    seat: Uuid,
    entry: Arc<Entry>,
    held_at: tokio::sync::OwnedMutexGuard<Option<Instant>>,
}

impl HoldGate {
    /// Waits for this request's turn at `seat`.
    pub async fn enter(&self, seat: Uuid) -> Turn {
        let entry = {
            let mut seats = self.seats.lock().expect("hold gate");
            let e = seats.entry(seat).or_default().clone();
            *e.users.lock().expect("hold gate") += 1;
            e
        };
        let held_at = entry.turn.clone().lock_owned().await;
        Turn { gate: self.clone(), seat, entry, held_at }
    }

    /// Seats with a request holding or waiting.
    pub fn contested(&self) -> usize {
        self.seats.lock().expect("hold gate").len()
    }

    #[cfg(test)]
    fn users(&self, seat: Uuid) -> usize {
        self.seats.lock().unwrap().get(&seat).map_or(0, |e| *e.users.lock().unwrap())
    }
}

impl Turn {
    /// An earlier request of this process held the seat a moment ago.
    pub fn taken(&self) -> bool {
        self.held_at.is_some_and(|t| t.elapsed() < VERDICT_TTL)
    }

    /// This request held the seat: tell the ones waiting behind it.
    pub fn held(&mut self) {
        *self.held_at = Some(Instant::now());
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut seats = self.gate.seats.lock().expect("hold gate");
        let mut users = self.entry.users.lock().expect("hold gate");
        *users -= 1;
        if *users == 0 {
            seats.remove(&self.seat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_of_a_successful_hold_see_it_taken_and_the_entry_leaves_with_the_last() {
        let gate = HoldGate::default();
        let seat = Uuid::new_v4();
        let mut first = gate.enter(seat).await;
        assert!(!first.taken());
        let g = gate.clone();
        let follower = tokio::spawn(async move { g.enter(seat).await.taken() });
        while gate.users(seat) < 2 {
            tokio::task::yield_now().await;
        }
        first.held();
        drop(first);
        assert!(follower.await.unwrap(), "the request waiting behind a hold sees the seat taken");
        assert_eq!(gate.contested(), 0);
        // A later request starts afresh: the database decides again.
        assert!(!gate.enter(seat).await.taken());
    }

    #[tokio::test]
    async fn a_failed_contender_lets_the_next_one_try() {
        let gate = HoldGate::default();
        let seat = Uuid::new_v4();
        let first = gate.enter(seat).await;
        let g = gate.clone();
        let follower = tokio::spawn(async move { g.enter(seat).await.taken() });
        while gate.users(seat) < 2 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert!(!follower.await.unwrap());
    }
}
