//! A lower bound for a scan, in id order, over rows whose writers commit out of id order: the
//! sequencer's scan for unstamped seat events, and the outbox relay's scan for unpublished rows.
//!
//! **Why.** Both scans walk an index in id order (`seat_events_unstamped`; the outbox's primary
//! key, since published rows are deleted: migration 0210). A row that is done (stamped,
//! published) leaves the index only for new snapshots: its old entry stays until VACUUM removes
//! it, and every later scan from the lowest id walks past it, checking each against the heap.
//! After the benchmark's queue spike (40,000 outbox rows) a relay step that found nothing read 67
//! index pages (0.45 ms) and ran hundreds of times a second; and vacuuming the table after each
//! burst (what the relay did before, issue 11's eleventh pass) cost 226 ms of database time per
//! vacuum of a 40,000-row outbox, about as much as it saved.
//! Starting the scan at a floor walks only what was written since the floor last moved, however
//! large the table and however long since the last vacuum.
//!
//! **Why it is safe — nothing below the floor is ever left pending.** It needs one rule from
//! the table's writers: *a writer holds its transaction id before it takes a row id.* (Seat
//! events are written by the statement triggers on `reservations`, after those wrote their rows:
//! migration 0160, whose error message still names `sequencer::Floor`, where this type lived
//! until issue 11's twelfth pass. Outbox rows are written by statements whose `BEFORE` statement trigger takes
//! the transaction id first: migration 0170.)
//!
//! Take a look `k` (a scan) that read committed pending rows up to id `next_id - 1`. Every lower
//! id was taken before that row committed, so before `k`'s snapshot (one sequence, handing ids
//! out in order), by a writer that already held its transaction id: every such writer's id is at
//! most `writers_below` (for the relay, the snapshot's `xmax − 1`; for the stamper, its own,
//! later, transaction id). A later look `j` whose snapshot's `xmin` is past `writers_below` sees
//! every one of those writers ended, and their rows, if committed, visible. If `j` also dealt
//! with every pending row it could see below `next_id` (read them all, and none was left pending
//! by a failure), no row below `next_id` is pending after `j` commits, and none can appear: only
//! then does the floor move there. A long-running writing transaction anywhere on the server
//! holds `xmin` back and the floor with it: the scan is then as long as it was without a floor,
//! never wrong.
//!
//! Anything that puts a row back below the floor by another path (an UPDATE by hand) breaks the
//! argument; so the relay still scans from the lowest id now and then (`outbox::Relay`), and
//! `bookingctl outbox retry` gives a retried row a new id at the end of the line.

use std::collections::VecDeque;

/// What one look at the pending rows showed, for [`Floor::after`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    /// If the look read rows: one past the highest id it read, and a transaction id at least
    /// as high as that of every writer of a lower id.
    pub read: Option<(i64, i64)>,
    /// The oldest transaction still running when the look's snapshot was taken: every
    /// transaction with a lower id had ended.
    pub xmin: i64,
    /// Every pending row the look could see with an id below this one is done (`i64::MAX` when
    /// it dealt with all it could see; `i64::MIN` when it proves nothing).
    pub done_below: i64,
}

/// The lowest id that may still be pending, moved only as the module comment says.
#[derive(Debug, Default)]
pub struct Floor {
    floor: i64,
    /// `(next_id, writers_below)` of looks whose writers may still be running, oldest first.
    candidates: VecDeque<(i64, i64)>,
}

impl Floor {
    /// Candidates kept at most (beyond this, while `xmin` is held back, the oldest are dropped:
    /// the floor then moves less, never wrongly).
    pub const MAX_CANDIDATES: usize = 256;

    /// The lowest id that may still be pending.
    pub fn get(&self) -> i64 {
        self.floor
    }

    /// Takes one look into account.
    pub fn after(&mut self, look: &Look) {
        while let Some(&(next_id, writers_below)) = self.candidates.front() {
            if look.xmin <= writers_below || next_id > look.done_below {
                break;
            }
            self.floor = self.floor.max(next_id);
            self.candidates.pop_front();
        }
        if let Some(candidate) = look.read {
            if self.candidates.len() == Self::MAX_CANDIDATES {
                self.candidates.pop_front();
            }
            self.candidates.push_back(candidate);
        }
    }

    #[cfg(test)]
    fn candidates(&self) -> usize {
        self.candidates.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{Floor, Look};

    fn look(read: Option<(i64, i64)>, xmin: i64, done_below: i64) -> Look {
        Look { read, xmin, done_below }
    }

    #[test]
    fn the_floor_moves_only_once_every_older_writer_ended_and_a_later_look_dealt_with_everything_below() {
        let mut f = Floor::default();
        f.after(&look(Some((101, 500)), 490, i64::MAX));
        assert_eq!(f.get(), 0, "a look's own rows wait for a later look");
        // Transaction 499 (at most 500) still runs: it may hold an id below 101.
        f.after(&look(Some((103, 510)), 499, i64::MAX));
        assert_eq!(f.get(), 0);
        // Everything up to 510 ended, but this look left rows pending from id 102 on.
        f.after(&look(Some((300, 520)), 515, 102));
        assert_eq!(f.get(), 101, "below 102 everything was done");
        // A full batch read up to 299: everything below 300 was seen and done.
        f.after(&look(Some((400, 530)), 525, 400));
        assert_eq!(f.get(), 300);
        f.after(&look(None, 531, i64::MAX));
        assert_eq!(f.get(), 400, "a look that found nothing still proves the older ones");
    }

    #[test]
    fn a_held_back_xmin_keeps_a_bounded_list_and_the_floor_where_it_was() {
        let mut f = Floor::default();
        for i in 0..1000 {
            f.after(&look(Some((i + 2, 1000 + i)), 999, i64::MAX));
        }
        assert_eq!(f.get(), 0);
        assert_eq!(f.candidates(), Floor::MAX_CANDIDATES);
        f.after(&look(None, 4000, i64::MAX));
        assert_eq!(f.get(), 1001, "the newest candidates kept");
    }
}
