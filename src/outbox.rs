//! The transactional outbox and its relay.
//!
//! Guarantees, and where they come from:
//! - An event exists iff the change that caused it committed: [`enqueue`] writes it with the same
//!   transaction as the change.
//! - Nothing is lost while Kafka is down: a row is deleted only after the broker acknowledged it
//!   (`acks=all`, idempotent producer), in the relay's transaction; until then the relay keeps
//!   retrying, and requests never wait for Kafka. The outbox holds only what is still to be sent
//!   (and what was set aside): a published event is read from Kafka (migration 0210).
//! - Order per key: one relay publishes at a time (a transaction-scoped advisory lock, so several
//!   api or expirer replicas are safe), in `id` order, each key always to the same partition; on a
//!   transient failure, nothing after the first failed row is deleted, so a retry resends in order.
//! - One poison row does not stop the others: a row Kafka refuses for good (message too large,
//!   unknown topic) is set aside, not retried forever: `set_aside_at` and `last_error` are set,
//!   the row stays (migration `0050_outbox_set_aside.sql`), the `outbox_set_aside`
//!   gauge and the `OutboxRowsSetAside` alert report it, and the relay goes on. `bookingctl
//!   outbox retry <id>` sends it again, from the end of the line. See [`Relay::step`] for what
//!   that means for order per key.
//! - The relay never walks what it published long ago: its scan starts at a floor below which
//!   nothing can be pending (`floor`; migration 0170 is the writers' side of the argument).
//! - A fatal error of the idempotent producer replaces the producer ([`Relay::rebuild_with`]).
//! - At least once, not exactly once at the wire: a crash between the broker's ack and the
//!   delete's commit resends the row; every consumer de-duplicates by `eventId`.
//!
//! Wake-up (issue 11): a commit that wrote outbox rows calls [`committed`], which wakes every relay
//! of this process at once. There is no NOTIFY any more: PostgreSQL serializes the commits of all
//! transactions that sent one (a global lock held through the WAL flush), which capped every
//! booking write at a fraction of what the database commits. The processes that write outbox
//! rows (api, expirer) each run a relay, so an in-process signal reaches a relay wherever a row
//! is written; the poll (`--outbox-poll-interval`) stays as the fallback for a missed signal.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::kafka::{partition_for, Envelope, PARTITIONS};
use crate::floor::{Floor, Look};

/// Advisory lock key held by the publishing relay ("outbox" in ASCII).
const RELAY_LOCK: i64 = 0x6f7574626f78;

/// How often a relay scans for pending rows from the lowest id instead of from its floor: a
/// safety net for a row put back below the floor by hand (`UPDATE outbox SET set_aside_at =
/// NULL`), which the floor's argument does not cover (`bookingctl outbox retry` gives the row a
/// new id instead). One scan from the lowest id costs what every step cost before the floor.
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);

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
    enqueue_many(tx, &[Row::new(topic, key, envelope)]).await
}

/// One outbox row to write: topic, message key, event id, envelope as JSON.
pub struct Row {
    pub topic: String,
    pub key: String,
    pub event_id: Uuid,
    pub envelope: serde_json::Value,
}

impl Row {
    pub fn new<T: Serialize>(topic: &str, key: &str, envelope: &Envelope<T>) -> Self {
        Row { topic: topic.to_string(), key: key.to_string(), event_id: envelope.event_id, envelope: serde_json::to_value(envelope).expect("envelopes serialize") }
    }
}

/// Writes every row in one statement (the batch paths: an expirer batch, an admission tick):
/// one round trip instead of one per event. Ids follow the order of `rows`, so the relay
/// publishes them in that order, as if enqueued one by one.
pub async fn enqueue_many(tx: &mut PgConnection, rows: &[Row]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    bind_rows(sqlx::query(&insert_sql(1, "")), rows).execute(tx).await?;
    Ok(())
}

/// The insert of [`enqueue_many`] as SQL, for a statement that writes its own change and its
/// events in one round trip (a payment, a hold: on those paths round trips are what a spike
/// costs). The rows are the four array parameters starting at `$first` (bind them with
/// [`bind_rows`]); `guard` is a `WHERE` clause that must hold for anything to be written (empty
/// for none), e.g. "the change of this statement happened".
pub fn insert_sql(first: usize, guard: &str) -> String {
    insert_sql_joined(first, "", guard, "v")
}

/// [`insert_sql`] for rows that take a value only the statement knows: each row is joined with
/// `join` (", r" for a CTE `r` of one row; no row there, nothing written) and its envelope is
/// the expression `envelope` of `v` (the bound envelope) and the joined columns.
pub fn insert_sql_joined(first: usize, join: &str, guard: &str, envelope: &str) -> String {
    let (t, k, e, v) = (first, first + 1, first + 2, first + 3);
    // WITH ORDINALITY + ORDER BY: the bigserial ids are drawn in the rows' order.
    format!(
        "INSERT INTO outbox (topic, message_key, event_id, envelope)
         SELECT t, k, e, {envelope} FROM unnest(${t}::text[], ${k}::text[], ${e}::uuid[], ${v}::jsonb[]) WITH ORDINALITY AS x(t, k, e, v, n){join}
         {guard}
         ORDER BY n
         ON CONFLICT (event_id) DO NOTHING"
    )
}

/// Binds `rows` as the four array parameters of [`insert_sql`] (the next four of `query`).
pub fn bind_rows<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    rows: &'q [Row],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
    let envelopes: Vec<&serde_json::Value> = rows.iter().map(|r| &r.envelope).collect();
    query.bind(topics).bind(keys).bind(ids).bind(envelopes)
}

/// What one relay step did.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayTick {
    /// This many rows were acknowledged by Kafka and deleted.
    Published(usize),
    /// Nothing to publish.
    Idle,
    /// Another relay (another process) holds the relay lock and is publishing.
    Busy,
    /// Kafka refused or timed out; `published` rows before the failure were deleted.
    Failed { published: usize },
}

/// Whether Kafka's refusal of one message can never turn into an acceptance by retrying the same
/// bytes to the same topic: the message is too large for the producer or the broker, the topic
/// does not exist (topics are created by us, never by the broker) or is not ours to write, or the
/// record is invalid. Everything else (timeouts, a full local queue, a broker down, leadership
/// moving, the transport, a fatal producer error) is worth retrying in order.
pub fn is_permanent(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::UnknownPartition
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::PolicyViolation
        )
    )
}

/// Builds a fresh producer after the old one hit a fatal error.
pub type ProducerFactory = Arc<dyn Fn() -> Result<FutureProducer, KafkaError> + Send + Sync>;

/// How often the `outbox_set_aside` gauge is refreshed at most (a count over the small partial
/// index `outbox_set_aside`), besides right after a row was set aside.
const SET_ASIDE_OBSERVE_EVERY: Duration = Duration::from_secs(5);
/// The `outbox_set_aside` gauge counts up to this many rows (more means "at least").
const SET_ASIDE_GAUGE_CAP: i64 = 10_000;

/// Publishes outbox rows to Kafka.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    producer: Arc<Mutex<FutureProducer>>,
    rebuild: Option<ProducerFactory>,
    batch: i64,
    poll: Duration,
    set_aside_observed: Arc<Mutex<Option<Instant>>>,
    /// Where the scan for pending rows starts (`floor`), and when it last started at the lowest id.
    floor: Arc<Mutex<(Floor, Option<Instant>)>>,
    full_scan_every: Duration,
}

impl Relay {
    pub fn new(pool: PgPool, producer: FutureProducer, batch: i64, poll: Duration) -> Self {
        Self {
            pool,
            producer: Arc::new(Mutex::new(producer)),
            rebuild: None,
            batch,
            poll,
            set_aside_observed: Arc::new(Mutex::new(None)),
            floor: Arc::new(Mutex::new((Floor::default(), None))),
            full_scan_every: FULL_SCAN_EVERY,
        }
    }

    /// How often a step scans from the lowest id instead of the floor (default [`FULL_SCAN_EVERY`]).
    pub fn full_scan_every(mut self, every: Duration) -> Self {
        self.full_scan_every = every;
        self
    }

    /// The lowest id this relay may still find pending (its scan starts there).
    pub fn floor(&self) -> i64 {
        self.floor.lock().expect("floor lock").0.get()
    }

    /// Where this step's scan starts: the floor, or the lowest id once per `full_scan_every`.
    fn scan_from(&self) -> i64 {
        let mut state = self.floor.lock().expect("floor lock");
        match state.1 {
            Some(at) if at.elapsed() < self.full_scan_every => state.0.get(),
            _ => {
                state.1 = Some(Instant::now());
                0
            }
        }
    }

    /// How to build a new producer when the idempotent producer reports a fatal error (librdkafka
    /// then fails every further send of that instance: it must be replaced). Without a factory
    /// the relay logs the fatal error and publishes nothing until the process is restarted.
    pub fn rebuild_with(mut self, factory: ProducerFactory) -> Self {
        self.rebuild = Some(factory);
        self
    }

    /// The producer in use (a replacement after a fatal error).
    pub fn producer(&self) -> FutureProducer {
        self.producer.lock().expect("producer lock").clone()
    }

    /// Publishes at most one batch.
    ///
    /// Per row, Kafka's answer decides:
    /// - acknowledged: deleted (the outbox keeps only what is still to be sent);
    /// - refused for good ([`is_permanent`]): set aside (`set_aside_at`, `last_error`) and counted
    ///   in `outbox_set_aside_total`, so one poison row does not stop every later event;
    /// - a transient failure (Kafka down, timeout): this row and every later row of the batch
    ///   stay pending and are sent again, in order, by the next step.
    ///
    /// Order per key after a set-aside row: the later events of the same key are published
    /// without waiting for it (holding them back would turn one poison row into a stuck key, and
    /// the row may never become publishable). If an operator retries it, it arrives after them;
    /// consumers tolerate that: they de-duplicate by `eventId` and apply conditional, state-based
    /// changes (a tombstone stops a late `reservation.created`, an expiry only ends a HELD hold).
    pub async fn step(&self) -> Result<RelayTick, sqlx::Error> {
        let mut tx = crate::db::begin(&self.pool).await?;
        // In the same round trip, for this transaction only: no sequential scan. The scan below
        // must walk the primary key from the floor; the outbox holds few live rows and, until
        // VACUUM, every row deleted since, so the planner, seeing a small table, may read all of
        // its pages instead: after a burst, every step (tests/outbox.rs).
        let (locked, _): (bool, String) = sqlx::query_as("SELECT pg_try_advisory_xact_lock($1), set_config('enable_seqscan', 'off', true)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(RelayTick::Busy);
        }
        // The scan starts at the floor (`floor`): below it nothing can be pending, and the
        // index entries of rows it deleted there are never walked again. The snapshot's bounds ride
        // along for the floor, in a row of their own so that a step that finds nothing still
        // reports them; so does the newest id (an index lookup, evaluated once) for the backlog
        // gauge, so a step never counts the unpublished rows (a scan as long as the backlog).
        let from = self.scan_from();
        type Pending = (Option<i64>, Option<String>, Option<String>, Option<String>, Option<f64>, Option<i64>, i64, i64);
        let found: Vec<Pending> = sqlx::query_as(
            "SELECT o.id, o.topic, o.message_key, o.envelope, o.age, o.newest, snap.xmin, snap.xmax
             FROM (SELECT pg_snapshot_xmin(s)::text::bigint AS xmin, pg_snapshot_xmax(s)::text::bigint AS xmax
                   FROM pg_current_snapshot() AS s) AS snap
             LEFT JOIN LATERAL (
                 SELECT id, topic, message_key, envelope::text AS envelope,
                        EXTRACT(EPOCH FROM now() - created_at)::float8 AS age, (SELECT max(id) FROM outbox) AS newest
                 FROM outbox WHERE set_aside_at IS NULL AND id >= $2 ORDER BY id LIMIT $1
             ) AS o ON true",
        )
        .bind(self.batch)
        .bind(from)
        .fetch_all(&mut *tx)
        .await?;
        let (xmin, xmax) = found.first().map(|r| (r.6, r.7)).unwrap_or_default();
        let rows: Vec<(i64, String, String, String, f64, i64)> = found
            .into_iter()
            .filter_map(|r| Some((r.0?, r.1?, r.2?, r.3?, r.4.unwrap_or(0.0), r.5.unwrap_or(0))))
            .collect();
        // Every writer of an id below the last one read held its transaction id before this
        // snapshot (migration 0170), so below its xmax.
        let read = rows.last().map(|r| (r.0 + 1, xmax - 1));
        if rows.is_empty() {
            self.floor.lock().expect("floor lock").0.after(&Look { read, xmin, done_below: i64::MAX });
            observe_backlog(0, 0.0);
            self.observe_set_aside(&mut tx, false).await?;
            // Ended here, not by the drop: a dropped transaction's ROLLBACK is only sent when its
            // connection is next used, and until then it keeps the relay lock, turning this
            // relay's next step (and every other relay's) away as Busy.
            tx.rollback().await?;
            return Ok(RelayTick::Idle);
        }
        let producer = self.producer();
        // Queue every send first (librdkafka batches them), then await the acks in order.
        let mut pending = Vec::with_capacity(rows.len());
        for (id, topic, key, payload, _, _) in &rows {
            let record = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(payload.as_str())
                .partition(partition_for(key, PARTITIONS));
            // send_result queues at once (librdkafka batches the whole set); acks are awaited below.
            pending.push((*id, producer.send_result(record).map_err(|(e, _)| e)));
        }
        let mut done = Vec::with_capacity(rows.len());
        let (mut aside_ids, mut aside_errors) = (Vec::new(), Vec::new());
        // Index in `rows` of the first row still waiting (the first transient failure).
        let mut first_waiting = None;
        for (i, (id, queued)) in pending.into_iter().enumerate() {
            let result = match queued {
                Ok(fut) => match fut.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(e) => Err(e),
            };
            match result {
                _ if first_waiting.is_some() => {}
                Ok(()) => done.push(id),
                // After a transient failure nothing more is decided: the rest is sent again in
                // order, and a permanent refusal among it is found again then.
                Err(e) if is_permanent(&e) => {
                    tracing::error!(outbox_id = id, error = %e, "Kafka refuses this outbox row for good; setting it aside");
                    aside_ids.push(id);
                    aside_errors.push(e.to_string());
                }
                Err(e) => {
                    tracing::warn!(outbox_id = id, error = %e, "outbox publish failed; will retry");
                    first_waiting = Some(i);
                }
            }
        }
        let failed = first_waiting.is_some();
        if !done.is_empty() {
            // Deleted, not marked: no second version of the row, no index entry (migration 0210).
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind(&done)
                .execute(&mut *tx)
                .await?;
        }
        if !aside_ids.is_empty() {
            sqlx::query(
                "UPDATE outbox o SET set_aside_at = now(), last_error = a.error
                 FROM UNNEST($1::bigint[], $2::text[]) AS a(id, error) WHERE o.id = a.id",
            )
            .bind(&aside_ids)
            .bind(&aside_errors)
            .execute(&mut *tx)
            .await?;
        }
        self.observe_set_aside(&mut tx, !aside_ids.is_empty()).await?;
        tx.commit().await?;
        // Done below: the first row left pending by a failure; or, after a full batch, the end
        // of what was read; or everything this step could see.
        let done_below = match first_waiting {
            Some(i) => rows[i].0,
            None if rows.len() as i64 >= self.batch => rows.last().map_or(i64::MIN, |r| r.0 + 1),
            None => i64::MAX,
        };
        self.floor.lock().expect("floor lock").0.after(&Look { read, xmin, done_below });
        // What is still waiting: the rest of this batch (after a failure), plus, when the batch
        // was full, every id after it (an estimate: ids of rolled-back inserts are gaps).
        let waiting = first_waiting.map_or(0, |i| rows.len() - i);
        let (last_id, max_id) = rows.last().map(|r| (r.0, r.5)).unwrap_or_default();
        let full = rows.len() as i64 >= self.batch;
        let behind = if full { (max_id - last_id).max(0) as usize } else { 0 };
        let age = match first_waiting.and_then(|i| rows.get(i)) {
            Some(first_waiting) => first_waiting.4,
            // Everything fetched went out; the next row (if any) is no older than the last one.
            None if full => rows.last().map(|r| r.4).unwrap_or(0.0),
            None => 0.0,
        };
        observe_backlog(waiting + behind, age);
        metrics::counter!("outbox_published_total").increment(done.len() as u64);
        metrics::counter!("outbox_set_aside_total").increment(aside_ids.len() as u64);
        if failed {
            metrics::counter!("outbox_publish_failures_total").increment(1);
            self.replace_producer_if_fatal(&producer);
            Ok(RelayTick::Failed { published: done.len() })
        } else {
            Ok(RelayTick::Published(done.len()))
        }
    }

    /// The idempotent producer's fatal errors (a broken sequence, a fenced producer id) make
    /// librdkafka fail every later send of that instance: build a new one (a new producer id), so
    /// the relay carries on. Nothing is lost: the rows that failed are still pending.
    fn replace_producer_if_fatal(&self, producer: &FutureProducer) {
        let Some((code, reason)) = producer.client().fatal_error() else { return };
        tracing::error!(?code, %reason, "the outbox producer hit a fatal error; building a new one");
        let Some(factory) = &self.rebuild else {
            tracing::error!("no producer factory configured: the relay cannot publish until restarted");
            return;
        };
        match factory() {
            Ok(fresh) => {
                *self.producer.lock().expect("producer lock") = fresh;
                metrics::counter!("outbox_producer_rebuilds_total").increment(1);
            }
            Err(e) => tracing::error!(error = %e, "building a new outbox producer failed; will try again"),
        }
    }

    /// Refreshes the `outbox_set_aside` gauge, at most every [`SET_ASIDE_OBSERVE_EVERY`] unless
    /// `now` (a row was just set aside).
    async fn observe_set_aside(&self, tx: &mut PgConnection, now: bool) -> Result<(), sqlx::Error> {
        {
            let mut last = self.set_aside_observed.lock().expect("observed lock");
            if !now && last.is_some_and(|t| t.elapsed() < SET_ASIDE_OBSERVE_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        // Counted through the partial index `outbox_set_aside`, in id order and capped: a plain
        // count(*) is planned as a (parallel) sequential scan of the whole outbox until the
        // table has statistics (no ANALYZE yet: PostgreSQL then guesses that 99.5 % of rows have
        // a value), which the spike profile showed at 37 ms a call on a young table.
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE set_aside_at IS NOT NULL ORDER BY id LIMIT $1) s",
        )
        .bind(SET_ASIDE_GAUGE_CAP)
        .fetch_one(tx)
        .await?;
        metrics::gauge!("outbox_set_aside").set(n as f64);
        Ok(())
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
            let started = Instant::now();
            let step = self.step().await;
            // Every step that held the relay lock is timed, by outcome: which of the relays (the
            // api's, the expirer's) wins the lock for a given commit is a race, so recording only
            // publishing steps would make a daemon's series appear or not by chance; an idle step's
            // time is the cost of looking, worth seeing on its own.
            let outcome = match &step {
                Ok(RelayTick::Published(_)) => Some("published"),
                Ok(RelayTick::Idle) => Some("idle"),
                Ok(RelayTick::Failed { .. }) => Some("failed"),
                Ok(RelayTick::Busy) | Err(_) => None,
            };
            if let Some(outcome) = outcome {
                metrics::histogram!("outbox_relay_step_seconds", "outcome" => outcome).record(started.elapsed().as_secs_f64());
            }
            let wait = match step {
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
