//! The transactional outbox and its relay.
//!
//! Guarantees, and where they come from:
//! - An event exists iff the change that caused it committed: [`enqueue`] writes it with the same
//!   transaction as the change.
//! - Nothing is lost while Kafka is down: a row is marked published only after the broker
//!   acknowledged it (`acks=all`, idempotent producer); until then the relay keeps retrying, and
//!   requests never wait for Kafka.
//! - Order per key: one relay publishes at a time (a transaction-scoped advisory lock, so several
//!   api or expirer replicas are safe), in `id` order, each key always to the same partition; on a
//!   failure, nothing after the first failed row is marked, so a retry resends in order.
//! - At least once, not exactly once at the wire: a crash between the broker's ack and the
//!   `published_at` commit resends the row; every consumer de-duplicates by `eventId`.
//!
//! Wake-up (issue 11): a commit that wrote outbox rows calls [`committed`], which wakes every relay
//! of this process at once. There is no NOTIFY any more: PostgreSQL serializes the commits of all
//! transactions that sent one (a global lock held through the WAL flush), which capped every
//! booking write at a fraction of what the database commits. The processes that write outbox
//! rows (api, expirer) each run a relay, so an in-process signal reaches a relay wherever a row
//! is written; the poll (`--outbox-poll-interval`) stays as the fallback for a missed signal.

use std::sync::LazyLock;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::kafka::{partition_for, Envelope, PARTITIONS};

/// Advisory lock key held by the publishing relay ("outbox" in ASCII).
const RELAY_LOCK: i64 = 0x6f7574626f78;

/// How soon a relay that found the lock taken looks again.
const BUSY_RETRY: Duration = Duration::from_millis(20);

fn observe_backlog(waiting: usize, oldest_age_s: f64) {
    metrics::gauge!("outbox_backlog").set(waiting as f64);
    metrics::gauge!("outbox_oldest_unpublished_age_seconds").set(oldest_age_s.max(0.0));
}

/// Commits seen by this process: a counter every relay of the process watches. A `watch` keeps
/// no backlog and loses no wake-up: a relay busy publishing when the counter moves sees the
/// change on its next wait, and every relay of the process (tests run several) is woken.
static COMMITTED: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Tells this process's relay that outbox rows were just committed: call it right after the
/// commit of a transaction that called [`enqueue`] (or [`crate::notification::enqueue`]). Never
/// before the commit: the relay would look before the rows are visible. Forgetting it loses
/// nothing (the relay polls), it only delays the event by up to a poll interval.
pub fn committed() {
    COMMITTED.send_modify(|n| *n = n.wrapping_add(1));
}

/// Adds an event to the outbox inside the caller's transaction (the caller calls [`committed`]
/// after its commit). A repeated `eventId` is ignored.
pub async fn enqueue<T: Serialize>(
    tx: &mut PgConnection,
    topic: &str,
    key: &str,
    envelope: &Envelope<T>,
) -> Result<(), sqlx::Error> {
    let json = serde_json::to_value(envelope).expect("envelopes serialize");
    sqlx::query(
        "INSERT INTO outbox (topic, message_key, event_id, envelope) VALUES ($1, $2, $3, $4)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(topic)
    .bind(key)
    .bind(envelope.event_id)
    .bind(json)
    .execute(tx)
    .await?;
    Ok(())
}

/// What one relay step did.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayTick {
    /// This many rows were acknowledged by Kafka and marked published.
    Published(usize),
    /// Nothing to publish.
    Idle,
    /// Another relay (another process) holds the relay lock and is publishing.
    Busy,
    /// Kafka refused or timed out; `published` rows before the failure were marked.
    Failed { published: usize },
}

/// Publishes outbox rows to Kafka.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    batch: i64,
    poll: Duration,
}

impl Relay {
    pub fn new(pool: PgPool, producer: FutureProducer, batch: i64, poll: Duration) -> Self {
        Self { pool, producer, batch, poll }
    }

    /// Publishes at most one batch.
    pub async fn step(&self) -> Result<RelayTick, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(RelayTick::Busy);
        }
        // The newest id rides along (an index lookup, evaluated once) for the backlog gauge, so a
        // step never counts the unpublished rows (a scan as long as the backlog).
        let rows: Vec<(i64, String, String, String, f64, i64)> = sqlx::query_as(
            "SELECT id, topic, message_key, envelope::text,
                    EXTRACT(EPOCH FROM now() - created_at)::float8, (SELECT max(id) FROM outbox)
             FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(self.batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            observe_backlog(0, 0.0);
            return Ok(RelayTick::Idle);
        }
        // Queue every send first (librdkafka batches them), then await the acks in order.
        let mut pending = Vec::with_capacity(rows.len());
        for (id, topic, key, payload, _, _) in &rows {
            let record = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(payload.as_str())
                .partition(partition_for(key, PARTITIONS));
            // send_result queues at once (librdkafka batches the whole set); acks are awaited below.
            pending.push((*id, self.producer.send_result(record).map_err(|(e, _)| e)));
        }
        let mut done = Vec::with_capacity(rows.len());
        let mut failed = false;
        for (id, queued) in pending {
            let result = match queued {
                Ok(fut) => match fut.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("delivery cancelled".to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) if !failed => done.push(id),
                Ok(()) => {}
                Err(e) => {
                    if !failed {
                        tracing::warn!(error = %e, "outbox publish failed; will retry");
                    }
                    failed = true;
                }
            }
        }
        if !done.is_empty() {
            sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
                .bind(&done)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        // What is still waiting: the rest of this batch (after a failure), plus, when the batch
        // was full, every id after it (an estimate: ids of rolled-back inserts are gaps).
        let waiting = rows.len() - done.len();
        let (last_id, max_id) = rows.last().map(|r| (r.0, r.5)).unwrap_or_default();
        let full = rows.len() as i64 >= self.batch;
        let behind = if full { (max_id - last_id).max(0) as usize } else { 0 };
        let age = match rows.get(done.len()) {
            Some(first_waiting) => first_waiting.4,
            // Everything fetched went out; the next row (if any) is no older than the last one.
            None if full => rows.last().map(|r| r.4).unwrap_or(0.0),
            None => 0.0,
        };
        observe_backlog(waiting + behind, age);
        metrics::counter!("outbox_published_total").increment(done.len() as u64);
        if failed {
            metrics::counter!("outbox_publish_failures_total").increment(1);
            Ok(RelayTick::Failed { published: done.len() })
        } else {
            Ok(RelayTick::Published(done.len()))
        }
    }

    /// Runs until `shutdown`: woken by [`committed`] in this process, polling every `poll` as a
    /// fallback, backing off while Kafka or PostgreSQL is unavailable.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut woken = COMMITTED.subscribe();
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // Seen before the step: a commit during the step wakes the wait below at once.
            woken.mark_unchanged();
            let wait = match self.step().await {
                Ok(RelayTick::Published(n)) if n as i64 >= self.batch => {
                    backoff = Duration::from_millis(200);
                    continue;
                }
                Ok(RelayTick::Published(_)) => {
                    backoff = Duration::from_millis(200);
                    // New rows may have been committed while we published.
                    continue;
                }
                Ok(RelayTick::Idle) => self.poll,
                // The other relay may have looked just before our rows committed and be about to
                // go idle: look again shortly instead of after a whole poll interval.
                Ok(RelayTick::Busy) => self.poll.min(BUSY_RETRY),
                Ok(RelayTick::Failed { .. }) => {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay step failed");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // The sender is a static: it is never dropped, so this only returns on a change.
                _ = woken.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Publish what is already queued before leaving, best effort and bounded.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.step()).await;
        tracing::info!("outbox relay stopped");
    }
}
