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

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::kafka::{partition_for, Envelope, PARTITIONS};

/// Advisory lock key held by the publishing relay ("outbox" in ASCII).
const RELAY_LOCK: i64 = 0x6f7574626f78;

/// Adds an event to the outbox inside the caller's transaction. A repeated `eventId` is ignored.
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
    /// Nothing to publish (or another replica holds the relay lock).
    Idle,
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
            return Ok(RelayTick::Idle);
        }
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
            "SELECT id, topic, message_key, envelope::text FROM outbox
             WHERE published_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(self.batch)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            self.observe_backlog(&mut tx).await?;
            return Ok(RelayTick::Idle);
        }
        // Queue every send first (librdkafka batches them), then await the acks in order.
        let mut pending = Vec::with_capacity(rows.len());
        for (id, topic, key, payload) in &rows {
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
        self.observe_backlog(&mut tx).await?;
        tx.commit().await?;
        metrics::counter!("outbox_published_total").increment(done.len() as u64);
        if failed {
            metrics::counter!("outbox_publish_failures_total").increment(1);
            Ok(RelayTick::Failed { published: done.len() })
        } else {
            Ok(RelayTick::Published(done.len()))
        }
    }

    async fn observe_backlog(&self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        let (n, age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8
             FROM outbox WHERE published_at IS NULL",
        )
        .fetch_one(tx)
        .await?;
        metrics::gauge!("outbox_backlog").set(n as f64);
        metrics::gauge!("outbox_oldest_unpublished_age_seconds").set(age.unwrap_or(0.0).max(0.0));
        Ok(())
    }

    /// Runs until `shutdown`: woken by `NOTIFY outbox_new`, polling every `poll` as a fallback,
    /// backing off while Kafka or PostgreSQL is unavailable.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if listener.is_none() {
                match PgListener::connect_with(&self.pool).await {
                    Ok(mut l) => match l.listen("outbox_new").await {
                        Ok(()) => listener = Some(l),
                        Err(e) => tracing::warn!(error = %e, "outbox LISTEN failed"),
                    },
                    Err(e) => tracing::warn!(error = %e, "outbox listener connect failed"),
                }
            }
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
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = notified => if r.is_err() { listener = None },
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Publish what is already queued before leaving, best effort and bounded.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.step()).await;
        tracing::info!("outbox relay stopped");
    }
}
