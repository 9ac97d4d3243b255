//! The at-least-once consumer runner.
//!
//! Guarantees, and where they come from:
//! - `enable.auto.offset.store=false`: an offset is stored only after its handler returned `Ok` or
//!   the message was acknowledged by the dead-letter topic, so a crash at any point replays the
//!   message instead of skipping it (handlers are idempotent for that reason).
//! - A transient failure (database down…) is retried in place with exponential backoff; the offset
//!   is not stored meanwhile, and on shutdown the message is left for the next owner.
//! - A member that is retrying still serves its group. Rebalances are delivered only while the
//!   consumer is polled, and a member that does not poll holds every rebalance of the group for up
//!   to `max.poll.interval.ms` (5 minutes): a worker stuck on one message would stop a new member
//!   (a replacement, a scale-out) from getting any partition. So between attempts the runner pauses
//!   its partitions (nothing new is handed out) and keeps polling; if the group rebalances, the
//!   rest of the batch is dropped unstored, and whichever member now owns those partitions (this
//!   one included) reads them again from the committed offsets.
//! - A poison message (bad JSON, unknown type, data PostgreSQL refuses, a record the export sink
//!   answers 4xx to) goes to `<topic>.dlq` with the reason in the `dlq-reason` header, and the
//!   runner moves on. Handlers sort their failures: `From<sqlx::Error>` makes constraint and data
//!   errors poison and connection errors transient.
//! - On shutdown the in-flight message finishes, then stored offsets are committed synchronously.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientContext;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Topics;

/// A consumed message, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// Broker timestamp in ms (append time for `reservation.expiration`).
    pub timestamp_ms: Option<i64>,
}

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth retrying: the same message may succeed later (a dependency is down).
    #[error("transient: {0}")]
    Transient(String),
    /// Can never succeed: send to the dead-letter topic and move on.
    #[error("poison: {0}")]
    Poison(String),
}

/// Sorts a database failure: PostgreSQL refusing the data itself (SQLSTATE class 22 "data
/// exception", such as a NUL byte in text, or class 23 "integrity constraint violation") or a
/// value that cannot be encoded or decoded will fail the same way on every retry, so the message
/// is poison; anything else (connection lost, pool timed out, serialization failure, deadlock,
/// the server shutting down) may succeed later and is retried.
impl From<sqlx::Error> for HandleError {
    fn from(e: sqlx::Error) -> Self {
        if is_data_error(&e) {
            HandleError::Poison(format!("database refused the data: {e}"))
        } else {
            HandleError::Transient(format!("database: {e}"))
        }
    }
}

/// Whether retrying the statement with the same data can never succeed (see the `From` above).
pub fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

impl From<redis::RedisError> for HandleError {
    fn from(e: redis::RedisError) -> Self {
        HandleError::Transient(format!("redis: {e}"))
    }
}

/// What a consumer does with one message. Must be idempotent: delivery is at least once.
pub trait Handler: Send + Sync {
    fn handle(&self, msg: &Incoming) -> impl Future<Output = Result<(), HandleError>> + Send;

    /// Handles messages already fetched together (one transaction for all of them is what makes
    /// a consumer keep up with a spike). Returns one outcome per message, in order. An override
    /// must keep the order of effects: all or nothing, like one transaction. The default handles
    /// them one by one and stops at the first transient failure, leaving the rest to be retried
    /// in order after it.
    fn handle_batch(&self, msgs: &[Incoming]) -> impl Future<Output = Vec<Result<(), HandleError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(msgs.len());
            let mut failed = false;
            for m in msgs {
                if failed {
                    out.push(Err(HandleError::Transient("an earlier message of the batch failed".into())));
                    continue;
                }
                let r = self.handle(m).await;
                failed = matches!(r, Err(HandleError::Transient(_)));
                out.push(r);
            }
            out
        }
    }
}

/// Most messages handed to [`Handler::handle_batch`] at once.
pub const MAX_BATCH: usize = 500;

/// The set of `(topic, partition)` this consumer currently owns, updated on every rebalance.
pub type PartitionWatch = watch::Receiver<BTreeSet<(String, i32)>>;

/// Consumer context that publishes the current assignment (the delay scheduler drains the Redis
/// shards of the partitions it owns) and logs commit failures.
pub struct RunnerContext {
    assigned: watch::Sender<BTreeSet<(String, i32)>>,
    group: String,
}

impl ClientContext for RunnerContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): publishes the consumer lag of
    /// each owned partition, the figure the design document (§8-1) pages on.
    fn stats(&self, stats: rdkafka::Statistics) {
        let owned = self.assigned.borrow().clone();
        for (topic, t) in &stats.topics {
            for (&partition, p) in &t.partitions {
                if partition < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let end = if p.ls_offset >= 0 { p.ls_offset } else { p.hi_offset };
                let lag = if !owned.contains(&(topic.clone(), partition)) {
                    0 // not ours (any more): clear a stale figure; the owner reports the real one
                } else if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else if p.committed_offset < 0 && end >= 0 && p.lo_offset >= 0 {
                    end - p.lo_offset // nothing committed yet: everything from the start is due
                } else {
                    continue;
                };
                metrics::gauge!("kafka_consumer_lag", "group" => self.group.clone(), "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(lag as f64);
            }
        }
    }
}

impl ConsumerContext for RunnerContext {
    fn post_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // librdkafka keeps a partition's pause across a revoke and a new assignment: one
                // paused by a retry that a rebalance cut short must not stay paused for good.
                if let Err(e) = c.resume(tpl) {
                    tracing::warn!(error = %e, "resuming the assigned partitions failed");
                }
                let set = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
                tracing::info!(?set, "partitions assigned");
                self.assigned.send_replace(set);
            }
            Rebalance::Revoke(_) => {
                tracing::info!("partitions revoked");
                self.assigned.send_replace(BTreeSet::new());
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _offsets: &rdkafka::TopicPartitionList) {
        if let Err(e) = result {
            if !matches!(e, KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) {
                tracing::warn!(error = %e, "offset commit failed");
            }
        }
    }
}

fn incoming(msg: &rdkafka::message::BorrowedMessage<'_>) -> Incoming {
    Incoming {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: msg.payload().unwrap_or_default().to_vec(),
        timestamp_ms: msg.timestamp().to_millis(),
    }
}

/// Consumer settings for at-least-once processing in `group`.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // The heart of at-least-once: offsets are stored by us, after the work is done.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Short on purpose, though it has a price. A fetch is a long poll and the broker should
        // answer it as soon as data arrives, but measured here (issue 11) a longer wait shows up
        // in the latency of a burst: payment → PAYMENT_CONFIRMED on the stream p99 93–187 ms in
        // three runs at 10 ms, 118 ms at 100 ms, 231 and 281 ms in two runs at 500 ms (librdkafka
        // keeps one fetch in flight per broker: likely a partition that just returned data waits
        // for the others' fetch). The price: every idle consumer sends ~100 fetches a second per broker (the four
        // daemons cost an idle broker about a sixth of a core; 3 % at 500 ms).
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", "10")
        .set("statistics.interval.ms", "5000")
        .set("socket.keepalive.enable", "true");
    c
}

/// How the handling of one message ended.
enum Settled {
    /// Handled, or acknowledged by the dead-letter topic: its offset may be stored.
    Done,
    /// Shutdown came first: the offset stays unstored.
    Shutdown,
    /// The group rebalanced: the rest of the batch is dropped unstored, for the partitions' owners
    /// to read again from the committed offsets.
    Rebalanced,
}

/// Runs one consumer group member over some topics with a [`Handler`].
pub struct ConsumerRunner {
    consumer: StreamConsumer<RunnerContext>,
    dlq: FutureProducer,
    name: String,
    assigned: PartitionWatch,
}

impl ConsumerRunner {
    /// Creates the consumer and subscribes it to `topics`.
    pub fn new(
        config: &ClientConfig,
        topics: &[&str],
        dlq: FutureProducer,
        name: &str,
    ) -> Result<Self, KafkaError> {
        let (tx, rx) = watch::channel(BTreeSet::new());
        let group = config.get("group.id").unwrap_or_default().to_string();
        let consumer: StreamConsumer<RunnerContext> =
            config.create_with_context(RunnerContext { assigned: tx, group })?;
        consumer.subscribe(topics)?;
        Ok(Self { consumer, dlq, name: name.to_string(), assigned: rx })
    }

    /// Watches the partitions this member owns.
    pub fn assignment(&self) -> PartitionWatch {
        self.assigned.clone()
    }

    /// Consumes until `shutdown` is cancelled, then commits stored offsets.
    pub async fn run<H: Handler>(self, handler: &H, shutdown: CancellationToken) {
        let name = self.name.as_str();
        // Changes on every rebalance this member takes part in (see `post_rebalance`).
        let mut rebalanced = self.assigned.clone();
        // Messages a retry's polling already received: they open the next batch.
        let mut carried: Vec<Incoming> = Vec::new();
        loop {
            let mut batch = std::mem::take(&mut carried);
            if batch.is_empty() {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = self.consumer.recv() => m,
                };
                match msg {
                    Ok(m) => batch.push(incoming(&m)),
                    Err(e) => {
                        tracing::warn!(consumer = name, error = %e, "consume error");
                        metrics::counter!("kafka_consume_errors_total", "consumer" => name.to_string()).increment(1);
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                        }
                    }
                }
            }
            // No rebalance is served until the next poll, which only a retry does.
            rebalanced.mark_unchanged();
            // Take whatever else is already fetched (without waiting) into the same batch.
            while batch.len() < MAX_BATCH {
                match futures_util::FutureExt::now_or_never(self.consumer.recv()) {
                    Some(Ok(m)) => batch.push(incoming(&m)),
                    _ => break,
                }
            }
            let started = std::time::Instant::now();
            let results = handler.handle_batch(&batch).await;
            // How big the batches are and how long one takes: under a burst, what a consumer
            // keeps up with is batch size ÷ batch time.
            metrics::histogram!("kafka_batch_messages", "consumer" => name.to_string()).record(batch.len() as f64);
            metrics::histogram!("kafka_batch_seconds", "consumer" => name.to_string()).record(started.elapsed().as_secs_f64());
            let mut stopped = false;
            // Offsets are stored in order, and only up to the first message that is not done: a
            // later message's offset must never be committed past an unhandled earlier one.
            for (msg, result) in batch.iter().zip(results) {
                let outcome = match self.settle(msg, result, &shutdown).await {
                    Some(settled) => settled,
                    None => self.retry(handler, msg, &shutdown, &mut rebalanced, &mut carried).await,
                };
                match outcome {
                    Settled::Done => {
                        if let Err(e) = self.consumer.store_offset(&msg.topic, msg.partition, msg.offset) {
                            tracing::warn!(consumer = name, error = %e, "storing offset failed");
                        }
                    }
                    // Shut down mid-retry: the offset stays unstored so the message is seen again.
                    Settled::Shutdown => {
                        stopped = true;
                        break;
                    }
                    // The group rebalanced during the retry: this message and the rest of the
                    // batch stay unstored, for whoever owns their partitions now.
                    Settled::Rebalanced => {
                        tracing::info!(consumer = name, topic = %msg.topic, offset = msg.offset, "rebalanced while retrying; the rest of the batch is left to the partitions' owners");
                        break;
                    }
                }
            }
            if stopped {
                break;
            }
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            if !matches!(e, KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) {
                tracing::warn!(consumer = name, error = %e, "final commit failed");
            }
        }
        tracing::info!(consumer = name, "consumer stopped, offsets committed");
    }

    /// What one attempt's result settles for `msg`: done (handled, or acknowledged by the
    /// dead-letter topic), or shutdown during the dead-lettering; `None` for a transient failure,
    /// which is to be retried.
    async fn settle(&self, msg: &Incoming, result: Result<(), HandleError>, shutdown: &CancellationToken) -> Option<Settled> {
        let name = self.name.as_str();
        match result {
            Ok(()) => {
                metrics::counter!("kafka_messages_processed_total", "consumer" => name.to_string(), "topic" => msg.topic.clone()).increment(1);
                Some(Settled::Done)
            }
            Err(HandleError::Poison(reason)) => {
                tracing::warn!(consumer = name, topic = %msg.topic, offset = msg.offset, %reason, "dead-lettering message");
                Some(if self.dead_letter(msg, &reason, shutdown).await { Settled::Done } else { Settled::Shutdown })
            }
            Err(HandleError::Transient(e)) => {
                tracing::warn!(consumer = name, topic = %msg.topic, offset = msg.offset, error = %e, "transient failure, retrying");
                metrics::counter!("kafka_handler_retries_total", "consumer" => name.to_string()).increment(1);
                None
            }
        }
    }

    /// Retries one message after a transient failure, with exponential backoff, until it
    /// succeeded or was dead-lettered, shutdown came, or the group rebalanced. Between attempts
    /// every owned partition is paused and the consumer is polled, so the group's rebalances are
    /// served (see the module comment).
    async fn retry<H: Handler>(&self, handler: &H, msg: &Incoming, shutdown: &CancellationToken, rebalanced: &mut PartitionWatch, early: &mut Vec<Incoming>) -> Settled {
        let name = self.name.as_str();
        let paused = self.consumer.assignment().ok();
        if let Some(tpl) = &paused {
            // Pausing also drops what was fetched and not handed out yet; it is fetched again
            // from the next offset after the batch when the partitions are resumed.
            if let Err(e) = self.consumer.pause(tpl) {
                tracing::warn!(consumer = name, error = %e, "pausing partitions for a retry failed");
            }
        }
        let mut backoff = Duration::from_millis(100);
        let outcome = loop {
            if let Some(stop) = self.serve_group_for(backoff, shutdown, rebalanced, early).await {
                break stop;
            }
            if let Some(settled) = self.settle(msg, handler.handle(msg).await, shutdown).await {
                break settled;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
        // After a rebalance the assignment is new and was resumed when it was assigned.
        if let (Some(tpl), Settled::Done) = (&paused, &outcome) {
            if let Err(e) = self.consumer.resume(tpl) {
                tracing::warn!(consumer = name, error = %e, "resuming partitions after a retry failed");
            }
        }
        outcome
    }

    /// Polls the consumer for `wait` (its partitions are paused, so what it serves is the group's
    /// rebalances), or less: `Some` if shutdown came or the group rebalanced meanwhile.
    ///
    /// A message received here goes to `early`, to open the next batch: after a rebalance it comes
    /// from the new assignment (`early` then holds nothing older); without one it could only come
    /// from a partition the pause missed, and it is still later in its partition than every
    /// message of the current batch, so handling it after the batch keeps the partition's order.
    async fn serve_group_for(&self, wait: Duration, shutdown: &CancellationToken, rebalanced: &mut PartitionWatch, early: &mut Vec<Incoming>) -> Option<Settled> {
        let until = tokio::time::sleep(wait);
        tokio::pin!(until);
        loop {
            // A rebalance is delivered inside a poll, before any message of the new assignment.
            if rebalanced.has_changed().unwrap_or(false) {
                early.clear();
                return Some(Settled::Rebalanced);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Some(Settled::Shutdown),
                _ = &mut until => return None,
                // (`changed` marks the change seen, and a closed channel means the consumer is
                // gone: either way this retry is over.)
                _ = rebalanced.changed() => {
                    early.clear();
                    return Some(Settled::Rebalanced);
                }
                m = self.consumer.recv() => match m {
                    Ok(m) => {
                        let m = incoming(&m);
                        if rebalanced.has_changed().unwrap_or(false) {
                            early.clear();
                            early.push(m);
                            return Some(Settled::Rebalanced);
                        }
                        early.push(m);
                    }
                    Err(e) => {
                        tracing::warn!(consumer = self.name.as_str(), error = %e, "consume error while retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Some(Settled::Shutdown),
                            _ = &mut until => return None,
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                },
            }
        }
    }

    async fn dead_letter(&self, msg: &Incoming, reason: &str, shutdown: &CancellationToken) -> bool {
        let dlq_topic = Topics::dlq(&msg.topic);
        let source = format!("{}/{}/{}", msg.topic, msg.partition, msg.offset);
        let mut backoff = Duration::from_millis(100);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header { key: "dlq-reason", value: Some(reason) })
                .insert(Header { key: "dlq-source", value: Some(source.as_str()) })
                .insert(Header { key: "dlq-consumer", value: Some(self.name.as_str()) });
            let mut record = FutureRecord::to(&dlq_topic).payload(&msg.payload).headers(headers);
            if let Some(k) = &msg.key {
                record = record.key(k);
            }
            match self.dlq.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    metrics::counter!("kafka_dead_letters_total", "topic" => msg.topic.clone()).increment(1);
                    return true;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic = %dlq_topic, "dead-letter publish failed, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
