//! Group commit (issue 11): writes that arrive together share one statement and one commit.
//!
//! Under a spike, what every statement costs whatever its rows (the round trip, binding, the
//! executor's start over every index of the tables it writes, the statement triggers, the commit)
//! was the larger part of a payment's and of a hold's PostgreSQL CPU. So the api hands each such
//! write to one of a few writers; a writer that is free takes everything that has gathered, at
//! most [`Grouped::MAX`], runs one statement over arrays ([`Grouped::write`]) and answers each
//! request with its own row. A request is answered only after its group committed, so nothing is
//! weaker than one statement per request; alone, a request waits for nothing (a free writer takes
//! it at once). A group that fails as a whole hands every request back, for the caller to run
//! alone with the single statement's answers.
//!
//! Two requests that would touch the same lock or row in a way the statement cannot order (a
//! user's balance, a user's seat limit in a schedule, one seat) never share a group
//! ([`Grouped::exclusive`]): the second waits for the next group.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};

/// A request that can be written in a group.
pub trait Grouped: Send + Sync + Sized + 'static {
    /// What the group's statement answers for one request.
    type Row: Send + 'static;
    /// Most requests one group writes.
    const MAX: usize;
    /// Groups written at once. More than one, so that a group waiting on a lock (another path
    /// holding a row the group needs) does not hold up every request behind it.
    const WRITERS: usize;
    /// The histogram of group sizes (`<name>_count` counts the statements).
    const SIZE_METRIC: &'static str;

    /// Keys no two requests of one group may share. A false match (two different things with the
    /// same key) only defers a request to the next group.
    fn exclusive(&self) -> Vec<u128>;

    /// Writes the group in one statement and one commit: one row per request, in their order.
    fn write<'a>(pool: &'a PgPool, group: &'a [&'a Self]) -> BoxFuture<'a, sqlx::Result<Vec<Self::Row>>>;
}

type Waiting<A> = (A, oneshot::Sender<Result<<A as Grouped>::Row, A>>);

/// The writers of one kind of request; cloned handles share them.
pub struct GroupCommit<A: Grouped> {
    tx: mpsc::Sender<Waiting<A>>,
}

impl<A: Grouped> Clone for GroupCommit<A> {
    fn clone(&self) -> Self {
        GroupCommit { tx: self.tx.clone() }
    }
}

struct Inbox<A: Grouped> {
    rx: mpsc::Receiver<Waiting<A>>,
    /// Taken from the channel but not yet in a group (it shared a key with one already in it).
    held_over: VecDeque<Waiting<A>>,
}

impl<A: Grouped> GroupCommit<A> {
    /// Starts the writers on `pool`; they end when every handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel::<Waiting<A>>(4 * A::MAX);
        let inbox = Arc::new(Mutex::new(Inbox { rx, held_over: VecDeque::new() }));
        for _ in 0..A::WRITERS {
            let (inbox, pool) = (inbox.clone(), pool.clone());
            tokio::spawn(async move {
                while let Some(group) = next_group(&inbox).await {
                    let asks: Vec<&A> = group.iter().map(|(a, _)| a).collect();
                    let outcome = A::write(&pool, &asks).await;
                    metrics::histogram!(A::SIZE_METRIC).record(group.len() as f64);
                    let rows = match outcome {
                        Ok(rows) if rows.len() == group.len() => rows,
                        Ok(rows) => {
                            tracing::error!(rows = rows.len(), requests = group.len(), metric = A::SIZE_METRIC, "a group's statement answered the wrong number of rows; each request runs alone");
                            Vec::new()
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, requests = group.len(), metric = A::SIZE_METRIC, "a group failed; each request runs alone");
                            Vec::new()
                        }
                    };
                    if rows.is_empty() {
                        for (ask, done) in group {
                            let _ = done.send(Err(ask));
                        }
                    } else {
                        for ((_, done), row) in group.into_iter().zip(rows) {
                            let _ = done.send(Ok(row));
                        }
                    }
                }
            });
        }
        GroupCommit { tx }
    }

    /// Writes `ask` in a group: the statement's row for it, or the ask back if the group failed
    /// (`None`: the writer went away with it, and may or may not have committed it).
    pub async fn write(&self, ask: A) -> Result<A::Row, Option<A>> {
        let (done, wait) = oneshot::channel();
        self.tx.send((ask, done)).await.map_err(|e| Some(e.0 .0))?;
        match wait.await {
            Ok(outcome) => outcome.map_err(Some),
            Err(_) => Err(None),
        }
    }
}

/// The next group: the requests held over first, then what the channel holds, none sharing a
/// key. `None` once every handle is dropped and nothing waits.
async fn next_group<A: Grouped>(inbox: &Mutex<Inbox<A>>) -> Option<Vec<Waiting<A>>> {
    let mut inbox = inbox.lock().await;
    if inbox.held_over.is_empty() {
        let first = inbox.rx.recv().await?;
        inbox.held_over.push_back(first);
    }
    while inbox.held_over.len() < 4 * A::MAX {
        match inbox.rx.try_recv() {
            Ok(w) => inbox.held_over.push_back(w),
            Err(_) => break,
        }
    }
    let mut taken = HashSet::new();
    let (mut group, mut rest) = (Vec::new(), VecDeque::new());
    for w in inbox.held_over.drain(..) {
        let keys = w.0.exclusive();
        if group.len() < A::MAX && keys.iter().all(|k| !taken.contains(k)) {
            taken.extend(keys);
            group.push(w);
        } else {
            rest.push_back(w);
        }
    }
    inbox.held_over = rest;
    Some(group)
}
