//! One contender per seat per api process: the seat fight (issue 11).
//!
//! When hundreds of requests for one seat arrive together, every one of them reads the seat as
//! free before the winner commits, and each then runs a whole hold transaction only to be refused
//! by the unique index, queueing for pool connections behind the others (measured: 500 requests
//! on one seat all answered only after 0.7 s). The gate lets one request per seat into the hold;
//! the ones arriving meanwhile wait for its outcome and wake together. When it held the seat, they
//! are answered SEAT_UNAVAILABLE at once, without a database round trip; when it did not, they go
//! to the database as if there were no gate.
//!
//! PostgreSQL still decides who gets a seat (the unique index on live reservations): the gate
//! only saves work, and with several api replicas each sends its own contender. A verdict is
//! trusted only by requests that were already waiting, and for [`VERDICT_TTL`] at most, so a seat
//! that comes back (cancelled, expired) is seen by the next request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use uuid::Uuid;

/// How long a successful hold answers the requests that waited for it.
pub const VERDICT_TTL: Duration = Duration::from_millis(500);

/// What the contender in flight for a seat did.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    InFlight,
    Held(Instant),
    NotHeld,
}

#[derive(Clone, Default)]
pub struct HoldGate {
    seats: Arc<Mutex<HashMap<Uuid, watch::Sender<Outcome>>>>,
}

/// What [`HoldGate::enter`] decided for a request.
pub enum Turn {
    /// This request is the seat's contender: report with [`Turn::held`] (or drop it for "not
    /// held").
    Contender(Contender),
    /// A contender that was in flight when this request arrived held the seat a moment ago.
    Taken,
    /// The contender in flight did not hold the seat: go to the database like any request.
    Open,
}

/// The one request of this process in a hold of its seat; everyone who arrived meanwhile waits
/// for its outcome, and all of them wake together (one broadcast, not a chain of hand-offs).
pub struct Contender {
    gate: HoldGate,
    seat: Uuid,
    outcome: Outcome,
}

impl HoldGate {
    /// Becomes the seat's contender, or waits for the one in flight and says what it did.
    pub async fn enter(&self, seat: Uuid) -> Turn {
        let mut rx = {
            let mut seats = self.seats.lock().expect("hold gate");
            match seats.get(&seat) {
                Some(tx) => tx.subscribe(),
                None => {
                    seats.insert(seat, watch::channel(Outcome::InFlight).0);
                    return Turn::Contender(Contender { gate: self.clone(), seat, outcome: Outcome::NotHeld });
                }
            }
        };
        // A closed channel without an outcome cannot happen (the contender always sends on drop);
        // treat it as "not held" to stay on the safe side: the database decides.
        match rx.wait_for(|o| *o != Outcome::InFlight).await.map(|o| *o) {
            Ok(Outcome::Held(at)) if at.elapsed() < VERDICT_TTL => Turn::Taken,
            _ => Turn::Open,
        }
    }

    /// Seats with a contender in flight.
    pub fn contested(&self) -> usize {
        self.seats.lock().expect("hold gate").len()
    }
}

impl Contender {
    /// This request held the seat: the requests waiting for it are answered SEAT_UNAVAILABLE.
    pub fn held(&mut self) {
        self.outcome = Outcome::Held(Instant::now());
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        // Leave the map first: a request arriving from now on goes to the database (whose
        // committed rows already show this hold) rather than trusting a verdict.
        if let Some(tx) = self.gate.seats.lock().expect("hold gate").remove(&self.seat) {
            tx.send_replace(self.outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn waiter(gate: &HoldGate, seat: Uuid) -> tokio::task::JoinHandle<&'static str> {
        let g = gate.clone();
        let h = tokio::spawn(async move {
            match g.enter(seat).await {
                Turn::Contender(_) => "contender",
                Turn::Taken => "taken",
                Turn::Open => "open",
            }
        });
        // Let it subscribe before the contender finishes.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        h
    }

    #[tokio::test]
    async fn those_waiting_for_a_successful_hold_are_told_taken_and_later_ones_go_to_the_database() {
        let gate = HoldGate::default();
        let seat = Uuid::new_v4();
        let Turn::Contender(mut first) = gate.enter(seat).await else { panic!("the first request contends") };
        let waiters = vec![waiter(&gate, seat).await, waiter(&gate, seat).await];
        first.held();
        drop(first);
        for w in waiters {
            assert_eq!(w.await.unwrap(), "taken");
        }
        assert_eq!(gate.contested(), 0);
        assert!(matches!(gate.enter(seat).await, Turn::Contender(_)), "a later request contends afresh");
    }

    #[tokio::test]
    async fn a_contender_that_held_nothing_lets_the_waiting_ones_try() {
        let gate = HoldGate::default();
        let seat = Uuid::new_v4();
        let Turn::Contender(first) = gate.enter(seat).await else { panic!() };
        let w = waiter(&gate, seat).await;
        drop(first);
        assert_eq!(w.await.unwrap(), "open");
    }
}
