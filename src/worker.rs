//! The worker's consumers (brief §3, §5):
//! - `notification.request` → stored once by `eventId` ([`NotificationHandler`]); a separate
//!   delivery loop ([`Deliverer`]) sends stored notifications through the configured channel and
//!   records a delivery state per notification, retrying with backoff while the channel is down.
//! - `payment.completed` → the ranking (exactly once per payment, [`crate::ranking`]) and the
//!   data-platform export (once per payment, [`crate::export`]) ([`PaymentHandler`]);
//!   `payment.refunded` → the seat off the ranking and a refund line in the export, each once.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::export::Sink;
use crate::kafka::{Envelope, EventType, HandleError, Handler, Incoming};
use crate::keys::Keys;
use crate::notification::NotificationRequest;
use crate::payment::PaymentCompleted;
use crate::refund::PaymentRefunded;
use crate::vacuum::QueueVacuum;

const KNOWN_TYPES: &[&str] = &["PAYMENT_CONFIRMED", "RESERVATION_EXPIRED", "QUEUE_POSITION", "QUEUE_ACTIVATED", "PAYMENT_REFUNDED"];

/// Consumer of `notification.request`: stores each request once.
pub struct NotificationHandler {
    pub pool: PgPool,
    /// The delivery loop of this process: a stored batch goes straight to it, its delivery rows
    /// claimed in the storing statement ([`Deliverer::handoff`]). Without one (or while the loop
    /// has batches enough waiting), rows are stored due at once and a delivery loop claims them.
    pub handoff: Option<Handoff>,
}

impl Handler for NotificationHandler {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = Envelope::<NotificationRequest>::parse(&msg.payload, EventType::NotificationRequest).map_err(HandleError::Poison)?;
        let n = env.payload;
        if !KNOWN_TYPES.contains(&n.kind.as_str()) {
            return Err(HandleError::Poison(format!("unknown notification type {:?}", n.kind)));
        }
        let kind = n.kind.clone();
        let stored = crate::notification::store(&self.pool, &[(env.event_id, n)]).await?;
        let inserted = stored.len();
        if inserted == 1 {
            announce(&self.pool, &stored).await;
        }
        let outcome = if inserted == 1 { "stored" } else { "duplicate" };
        metrics::counter!("notifications_stored_total", "type" => kind, "outcome" => outcome).increment(1);
        Ok(())
    }

    /// Stores a whole batch with one statement (`UNNEST`), duplicates skipped by `eventId`.
    async fn handle_batch(&self, msgs: &[Incoming]) -> Vec<Result<(), HandleError>> {
        let mut out: Vec<Result<(), HandleError>> = Vec::with_capacity(msgs.len());
        let mut requests = Vec::with_capacity(msgs.len());
        for msg in msgs {
            match Envelope::<NotificationRequest>::parse(&msg.payload, EventType::NotificationRequest) {
                Ok(env) if KNOWN_TYPES.contains(&env.payload.kind.as_str()) => {
                    requests.push((env.event_id, env.payload));
                    out.push(Ok(()));
                }
                Ok(env) => out.push(Err(HandleError::Poison(format!("unknown notification type {:?}", env.payload.kind)))),
                Err(reason) => out.push(Err(HandleError::Poison(reason))),
            }
        }
        if requests.is_empty() {
            return out;
        }
        // A place in the delivery loop's inbox first: a batch stored claimed must reach it.
        let permit = self.handoff.as_ref().and_then(|h| h.tx.try_reserve().ok().map(|p| (h, p)));
        let claimed_at = std::time::Instant::now();
        let stored = crate::notification::store_claimed(&self.pool, &requests, permit.as_ref().map(|(h, _)| h.lease)).await;
        match stored {
            Ok(crate::notification::StoredClaimed { rows: stored, token }) => {
                if let (Some((h, permit)), Some(token)) = (permit, token) {
                    h.hand_over(permit, &requests, &stored, token, claimed_at);
                }
                announce(&self.pool, &stored).await;
                for kind in KNOWN_TYPES {
                    let total = requests.iter().filter(|(_, n)| n.kind.as_str() == *kind).count();
                    let new = stored.iter().filter(|r| r.kind.as_str() == *kind).count();
                    metrics::counter!("notifications_stored_total", "type" => *kind, "outcome" => "stored").increment(new as u64);
                    metrics::counter!("notifications_stored_total", "type" => *kind, "outcome" => "duplicate").increment((total - new) as u64);
                }
            }
            // PostgreSQL refused one of the rows: find which by storing them one by one, so the
            // poison one goes to the dead-letter topic and the others are stored.
            Err(e) if crate::kafka::is_data_error(&e) => {
                for (msg, r) in msgs.iter().zip(out.iter_mut()) {
                    if r.is_ok() {
                        *r = self.handle(msg).await;
                    }
                }
            }
            Err(e) => {
                let reason = format!("database: {e}");
                for r in out.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(HandleError::Transient(reason.clone()));
                }
            }
        }
        out
    }
}

/// Announces a committed batch to the api's streams and the delivery loop, once for the batch
/// ([`crate::notification::announce_stored`]). A failure is only logged: the rows are stored, and
/// both listeners poll.
async fn announce(pool: &PgPool, rows: &[crate::notification::StoredRow]) {
    if let Err(e) = crate::notification::announce_stored(pool, rows).await {
        tracing::warn!(error = %e, "announcing stored notifications failed; streams catch up by polling");
    }
}

/// How notifications reach the user's device.
#[derive(Clone, Debug)]
pub enum Channel {
    /// Writes a log line (design document §5-4).
    Log,
    /// POSTs JSON signed Stripe-style (`X-Signature: t=…,v1=…`, [`crate::webhook`]).
    Webhook(Webhook),
}

/// The webhook channel: where, how it signs, how long one request may take, how many at once.
/// Built by [`Channel::webhook`], which refuses an empty secret.
#[derive(Clone)]
pub struct Webhook {
    url: String,
    secret: String,
    timeout: Duration,
    concurrency: usize,
    client: reqwest::Client,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: settings end up in logs.
        f.debug_struct("Webhook").field("url", &self.url).field("timeout", &self.timeout).field("concurrency", &self.concurrency).finish_non_exhaustive()
    }
}

/// Why a channel cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the webhook channel needs a signing secret (--webhook-secret / WEBHOOK_SECRET): without one anyone could forge a notification")]
    NoSecret,
    #[error("--webhook-concurrency must be at least 1")]
    NoConcurrency,
    #[error("webhook client: {0}")]
    Client(#[from] reqwest::Error),
}

/// What one delivery attempt got: the receiver's HTTP status (none for the log channel or when no
/// answer came) and, when it failed, why. Kept per notification as its delivery log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// How many log-channel deliveries run at once (they are instant; this only sizes the groups of
/// outcomes written together).
const LOG_CONCURRENCY: usize = 64;

/// Most outcomes written in one statement: those that finished together, up to this many (and
/// up to the channel's concurrency).
const OUTCOME_GROUP: usize = 64;

/// The claim on a batch for the log channel, which cannot be slow.
const LOG_LEASE: Duration = Duration::from_secs(30);

impl Channel {
    /// The webhook channel. Refuses an empty `secret`: an unsigned webhook could be forged.
    pub fn webhook(url: &str, secret: &str, timeout: Duration, concurrency: usize) -> Result<Self, ChannelError> {
        if secret.is_empty() {
            return Err(ChannelError::NoSecret);
        }
        if concurrency == 0 {
            return Err(ChannelError::NoConcurrency);
        }
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Channel::Webhook(Webhook { url: url.to_string(), secret: secret.to_string(), timeout, concurrency, client }))
    }

    /// Deliveries in flight at once.
    fn concurrency(&self) -> usize {
        match self {
            Channel::Log => LOG_CONCURRENCY,
            Channel::Webhook(w) => w.concurrency,
        }
    }

    /// Longest one delivery can take.
    fn timeout(&self) -> Duration {
        match self {
            Channel::Log => Duration::ZERO,
            Channel::Webhook(w) => w.timeout,
        }
    }

    /// How long a step's claim on its rows lasts: a crashed worker's undelivered rows come back
    /// after this. Several request timeouts, so a step gets through its claim in normal weather;
    /// rows it cannot start in time are handed back (see [`Deliverer::step`]).
    fn lease(&self) -> Duration {
        match self {
            Channel::Log => LOG_LEASE,
            Channel::Webhook(w) => (w.timeout * 4).max(Duration::from_secs(10)),
        }
    }

    async fn deliver(&self, n: &Value) -> Attempt {
        match self {
            Channel::Log => {
                tracing::info!(target: "notification", notification = %n, "notification delivered");
                Attempt { status: None, error: None }
            }
            Channel::Webhook(w) => {
                let body = serde_json::to_vec(n).expect("json values serialize");
                let sig = crate::webhook::sign(w.secret.as_bytes(), chrono::Utc::now().timestamp(), &body);
                let sent = w
                    .client
                    .post(&w.url)
                    .header("content-type", "application/json")
                    .header(crate::webhook::HEADER, sig)
                    .header("x-event-id", n["eventId"].as_str().unwrap_or_default())
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(resp) if resp.status().is_success() => Attempt { status: Some(resp.status().as_u16()), error: None },
                    Ok(resp) => Attempt { status: Some(resp.status().as_u16()), error: Some(format!("webhook answered {}", resp.status())) },
                    Err(e) => Attempt { status: e.status().map(|s| s.as_u16()), error: Some(error_chain(&e)) },
                }
            }
        }
    }
}

/// An error with its causes ("error sending request: … connection refused"), for the delivery log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Delivered rows leave `notification_deliveries_pending`; their old entries go with VACUUM
/// (`vacuum`). One count per process, whatever the number of deliverers.
static DELIVERIES_VACUUM: std::sync::LazyLock<QueueVacuum> =
    std::sync::LazyLock::new(|| QueueVacuum::new("notification_deliveries"));

/// Stored batches whose delivery rows the worker's consumer claimed as it stored them, on their
/// way to the delivery loop of the same process ([`Deliverer::handoff`]).
#[derive(Clone)]
pub struct Handoff {
    tx: tokio::sync::mpsc::Sender<Handed>,
    lease: Duration,
    /// The highest stream position handed over: an announcement of nothing beyond it needs no claim.
    handed_up_to: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// One handed-over batch: its rows, the claim's token, and an instant no later than the claim's
/// start (the lease is counted from there).
struct Handed {
    rows: Vec<Claimed>,
    token: chrono::DateTime<chrono::Utc>,
    claimed_at: std::time::Instant,
}

/// The delivery loop's end of a [`Handoff`].
pub struct Inbox {
    rx: tokio::sync::mpsc::Receiver<Handed>,
    handed_up_to: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// Batches waiting in an [`Inbox`] at most; past this the consumer stores rows due at once and
/// the loop's claim finds them (so a slow channel never holds up storing).
const HANDOFF_BATCHES: usize = 4;

impl Handoff {
    fn hand_over(&self, permit: tokio::sync::mpsc::Permit<'_, Handed>, requests: &[(Uuid, NotificationRequest)], stored: &[crate::notification::StoredRow], token: chrono::DateTime<chrono::Utc>, claimed_at: std::time::Instant) {
        let by_event: std::collections::HashMap<Uuid, &NotificationRequest> = requests.iter().map(|(e, n)| (*e, n)).collect();
        let rows: Vec<Claimed> = stored
            .iter()
            .filter_map(|r| {
                let n = by_event.get(&r.event_id)?;
                Some((r.id, r.event_id, r.user_id, r.kind.clone(), n.title.clone(), n.message.clone(), n.data.clone(), r.created_at))
            })
            .collect();
        if let Some(top) = stored.iter().map(|r| r.pos).max() {
            self.handed_up_to.fetch_max(top, std::sync::atomic::Ordering::SeqCst);
        }
        permit.send(Handed { rows, token, claimed_at });
    }
}

/// Delivers stored notifications that are still PENDING, oldest first.
pub struct Deliverer {
    pub pool: PgPool,
    pub channel: Channel,
    pub batch: i64,
    pub max_backoff: Duration,
}

/// What became of one claimed row.
enum Outcome {
    Tried(i64, Attempt),
    /// Not started: its send could not have finished within the claim.
    HandedBack(i64),
}

type Claimed = (i64, Uuid, Uuid, String, String, String, Value, chrono::DateTime<chrono::Utc>);

impl Deliverer {
    /// Delivers one batch; returns (delivered, failed).
    ///
    /// No transaction is open while a receiver answers, and a crash re-sends only what was in
    /// flight:
    /// 1. Claim: one short transaction takes up to `batch` due rows (`SKIP LOCKED`, so several
    ///    workers share the work) and pushes their `next_attempt_at` a lease ahead
    ///    ([`Channel::lease`]); that value is the claim's fencing token.
    /// 2. Deliver, `concurrency` at a time. A row whose send could no longer finish within the
    ///    lease is handed back unsent, so a lapsed claim never overlaps another worker's.
    /// 3. Record each outcome as soon as it is known, in its own autocommit statement (outcomes
    ///    that finished together share one), fenced on the token: the delivery log (attempts,
    ///    last status, last error), DELIVERED, or a retry after an exponential backoff.
    ///
    /// A crash between a send and its record re-sends that row once its lease lapses (at least
    /// once; receivers de-duplicate by `eventId`); rows claimed but not yet sent are sent then,
    /// for the first time.
    pub async fn step(&self) -> Result<(usize, usize), sqlx::Error> {
        let lease = self.channel.lease();
        let claimed_at = std::time::Instant::now();
        let mut rows: Vec<(Claimed, chrono::DateTime<chrono::Utc>)> = sqlx::query_as::<_, (i64, Uuid, Uuid, String, String, String, Value, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>(
            "WITH due AS (
                 SELECT notification_id FROM notification_deliveries WHERE status = 'PENDING' AND next_attempt_at <= now()
                 ORDER BY notification_id LIMIT $1 FOR UPDATE SKIP LOCKED),
             claimed AS (
                 UPDATE notification_deliveries d SET next_attempt_at = now() + make_interval(secs => $2)
                 FROM due WHERE d.notification_id = due.notification_id
                 RETURNING d.notification_id, d.next_attempt_at)
             SELECT n.id, n.event_id, n.user_id, n.type, n.title, n.message, n.data, n.created_at, c.next_attempt_at
             FROM claimed c JOIN notifications n ON n.id = c.notification_id",
        )
        .bind(self.batch)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(id, e, u, k, t, m, d, c, token)| ((id, e, u, k, t, m, d, c), token))
        .collect();
        let Some(token) = rows.first().map(|r| r.1) else { return Ok((0, 0)) };
        rows.sort_by_key(|r| r.0 .0);
        self.deliver(rows.into_iter().map(|r| r.0).collect(), token, claimed_at).await
    }

    /// Steps 2 and 3 of [`Deliverer::step`] for rows claimed at `claimed_at` (or earlier) with
    /// `token`: by a claim of this loop, or by the consumer that stored them ([`Handoff`]).
    async fn deliver(&self, rows: Vec<Claimed>, token: chrono::DateTime<chrono::Utc>, claimed_at: std::time::Instant) -> Result<(usize, usize), sqlx::Error> {
        use futures_util::StreamExt;
        let lease = self.channel.lease();
        // Start a send only if it can finish (timeout) with a margin before the claim lapses.
        let start_by = lease.saturating_sub(self.channel.timeout() + Duration::from_secs(2));
        let channel = &self.channel;
        let mut outcomes = futures_util::stream::iter(rows)
            .map(|(id, event_id, user_id, kind, title, message, data, created_at)| async move {
                if claimed_at.elapsed() > start_by {
                    return Outcome::HandedBack(id);
                }
                let n = json!({"notificationId": id.to_string(), "eventId": event_id, "userId": user_id, "type": kind,
                               "title": title, "message": message, "data": data, "createdAt": created_at});
                Outcome::Tried(id, channel.deliver(&n).await)
            })
            .buffer_unordered(self.channel.concurrency())
            // A group is at most `concurrency` outcomes, so at any instant at most twice the
            // concurrency is sent but not yet recorded: what a crash can re-send.
            .ready_chunks(self.channel.concurrency().min(OUTCOME_GROUP));
        let (mut delivered, mut failed) = (0, 0);
        while let Some(group) = outcomes.next().await {
            let (d, f) = self.record(&group, token).await?;
            delivered += d;
            failed += f;
        }
        Ok((delivered, failed))
    }

    /// Writes a group of outcomes in one statement; returns (delivered, failed).
    async fn record(&self, group: &[Outcome], token: chrono::DateTime<chrono::Utc>) -> Result<(usize, usize), sqlx::Error> {
        let (mut ids, mut statuses, mut errors, mut back) = (vec![], vec![], vec![], vec![]);
        for o in group {
            match o {
                Outcome::Tried(id, a) => {
                    if let Some(e) = &a.error {
                        tracing::warn!(notification = id, status = a.status, error = %e, "delivery failed; will retry");
                    }
                    ids.push(*id);
                    statuses.push(a.status.map(i32::from));
                    errors.push(a.error.clone());
                }
                Outcome::HandedBack(id) => back.push(*id),
            }
        }
        let delivered = errors.iter().filter(|e| e.is_none()).count();
        let failed = errors.len() - delivered;
        if !ids.is_empty() {
            // Fenced on the claim's token: if the claim lapsed and another worker took the row,
            // this writes nothing rather than overwrite that worker's state. `= ANY($1)` keeps the
            // plan a primary-key lookup per id whatever the statistics say: joined to the UNNEST
            // alone, a plan made when few rows were PENDING may scan every PENDING row, and under
            // a burst thousands are.
            sqlx::query(
                "UPDATE notification_deliveries d SET
                     attempts = d.attempts + 1,
                     last_attempt_at = now(),
                     last_status = o.status,
                     last_error = o.error,
                     status = CASE WHEN o.error IS NULL THEN 'DELIVERED' ELSE d.status END,
                     delivered_at = CASE WHEN o.error IS NULL THEN now() ELSE d.delivered_at END,
                     next_attempt_at = CASE WHEN o.error IS NULL THEN d.next_attempt_at
                                       ELSE now() + make_interval(secs => least(0.2 * power(2, d.attempts), $4)) END
                 FROM UNNEST($1::bigint[], $2::int[], $3::text[]) AS o(id, status, error)
                 WHERE d.notification_id = o.id AND d.notification_id = ANY($1)
                   AND d.status = 'PENDING' AND d.next_attempt_at = $5",
            )
            .bind(&ids)
            .bind(&statuses)
            .bind(&errors)
            .bind(self.max_backoff.as_secs_f64())
            .bind(token)
            .execute(&self.pool)
            .await?;
        }
        if !back.is_empty() {
            sqlx::query("UPDATE notification_deliveries SET next_attempt_at = now() WHERE notification_id = ANY($1) AND status = 'PENDING' AND next_attempt_at = $2")
                .bind(&back)
                .bind(token)
                .execute(&self.pool)
                .await?;
        }
        DELIVERIES_VACUUM.done(&self.pool, delivered as u64);
        metrics::counter!("notifications_delivered_total").increment(delivered as u64);
        metrics::counter!("notifications_delivery_failures_total").increment(failed as u64);
        Ok((delivered, failed))
    }

    /// A handoff from this process's notification consumer to this loop, and the loop's end.
    pub fn handoff(&self) -> (Handoff, Inbox) {
        let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF_BATCHES);
        let handed_up_to = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN));
        (Handoff { tx, lease: self.channel.lease(), handed_up_to: handed_up_to.clone() }, Inbox { rx, handed_up_to })
    }

    /// Runs until `shutdown`, woken by new notifications and polling every `poll`.
    pub async fn run(self, poll: Duration, shutdown: CancellationToken) {
        self.run_with(None, poll, shutdown).await
    }

    /// [`Deliverer::run`], also delivering what `inbox` hands over. A claim runs at start, every
    /// `poll`, after an announcement of rows not handed over, and while claims find work; a
    /// handed-over batch is delivered without one.
    pub async fn run_with(self, mut inbox: Option<Inbox>, poll: Duration, shutdown: CancellationToken) {
        let mut listener = crate::notification::stored_listener(&self.pool, "delivery").await;
        let mut claim = true;
        // Failed deliveries come due again after their backoff: until a claim has run, every
        // announcement triggers one, as before the handoff.
        let mut retries_waiting = false;
        let mut next_poll = tokio::time::Instant::now() + poll;
        loop {
            if claim {
                next_poll = tokio::time::Instant::now() + poll;
                match self.step().await {
                    Ok((ok, failed)) => {
                        retries_waiting = failed > 0;
                        if ok + failed > 0 && failed == 0 {
                            continue;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "delivery step failed"),
                }
            }
            let handed = async {
                match inbox.as_mut() {
                    Some(i) => i.rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            claim = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(batch) = handed => {
                    match self.deliver(batch.rows, batch.token, batch.claimed_at).await {
                        Ok((_, failed)) => retries_waiting |= failed > 0,
                        Err(e) => tracing::warn!(error = %e, "recording handed-over deliveries failed; their claim lapses and they are sent again"),
                    }
                    false
                }
                announced = crate::notification::next_announcement(&mut listener, poll) => {
                    let handed_up_to = inbox.as_ref().map_or(i64::MIN, |i| i.handed_up_to.load(std::sync::atomic::Ordering::SeqCst));
                    retries_waiting || announced.incomplete || announced.positions.values().any(|&p| p > handed_up_to)
                }
                _ = tokio::time::sleep_until(next_poll) => true,
            };
        }
    }
}

/// How often the ranking is reconciled with PostgreSQL (see [`run_ranking_reconciler`]).
#[derive(Debug, Clone, Copy)]
pub struct ReconcileEvery {
    /// Interval of the reconciles over the last `--ranking-reconcile-window`
    /// (`--ranking-reconcile-interval`).
    pub window: Duration,
    /// Interval of the reconciles over everything the ranking remembers
    /// (`--ranking-full-reconcile-interval`); the first reconcile after start is one of them, so
    /// a loss that happened while this worker was down for longer than the window is found.
    pub full: Duration,
}

/// Keeps the ranking equal to PostgreSQL: rebuilds it if Redis lost it, else re-applies the last
/// stretch of payments and refunds every `every.window` and all it remembers every `every.full`
/// and at start (see [`crate::ranking::reconcile`]); also prunes what the ranking remembers past
/// its retention.
pub async fn run_ranking_reconciler(pool: PgPool, redis: crate::redis_conn::RedisConn, keys: Keys, retention: crate::ranking::Retention, every: ReconcileEvery, shutdown: CancellationToken) {
    use crate::ranking::Reach;
    let mut tick = tokio::time::interval(every.window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let reach = match last_full {
            Some(t) if t.elapsed() < every.full => Reach::Window,
            _ => Reach::Remembered,
        };
        let result = crate::ranking::reconcile(&redis, &keys, &pool, &retention, reach).await;
        if reach == Reach::Remembered && result.is_ok() {
            last_full = Some(tokio::time::Instant::now());
        }
        match result {
            Ok(r) if r.rebuilt => {
                metrics::counter!("ranking_rebuilds_total").increment(1);
                tracing::info!(counted = r.corrections, "ranking rebuilt from PostgreSQL");
            }
            Ok(r) => {
                metrics::counter!("ranking_corrections_total").increment(r.corrections as u64);
                if r.corrections > 0 {
                    tracing::warn!(corrections = r.corrections, "ranking had drifted from PostgreSQL; corrected");
                }
            }
            Err(e) => tracing::warn!(error = %e, "ranking reconcile failed"),
        }
        if let Err(e) = crate::ranking::prune(&redis, &keys, &retention).await {
            tracing::warn!(error = %e, "pruning the ranking's memory failed");
        }
    }
}

/// Consumer of `payment.completed` and `payment.refunded`: ranking and export, each once per
/// payment and once per refund.
pub struct PaymentHandler {
    pub pool: PgPool,
    pub redis: crate::redis_conn::RedisConn,
    pub keys: Keys,
    pub sink: Sink,
    pub ranking: crate::ranking::Retention,
}

/// A message of the payments consumer, parsed.
enum PaymentEvent {
    Completed(PaymentCompleted),
    Refunded(PaymentRefunded),
}

impl PaymentEvent {
    /// Reads `payment.refunded` by its `eventType`; anything else as a payment, so that a wrong
    /// type or bad JSON is dead-lettered there.
    fn parse(msg: &Incoming) -> Result<Self, HandleError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Kind {
            event_type: String,
        }
        match serde_json::from_slice::<Kind>(&msg.payload) {
            Ok(k) if k.event_type == EventType::PaymentRefunded.as_str() => {
                Envelope::<PaymentRefunded>::parse(&msg.payload, EventType::PaymentRefunded).map(|e| Self::Refunded(e.payload)).map_err(HandleError::Poison)
            }
            _ => Envelope::<PaymentCompleted>::parse(&msg.payload, EventType::PaymentCompleted).map(|e| Self::Completed(e.payload)).map_err(HandleError::Poison),
        }
    }

    /// The export line and what makes it once: (`processed_events` consumer, id, record). A
    /// refund is its own line, marked `"eventType":"payment.refunded"` (a payment is refunded at
    /// most once, so its id names the refund).
    fn export(&self) -> (&'static str, Uuid, Value) {
        match self {
            Self::Completed(p) => ("export", p.payment_id, serde_json::to_value(p).expect("payments serialize")),
            Self::Refunded(p) => {
                let mut record = serde_json::to_value(p).expect("refunds serialize");
                record["eventType"] = json!(EventType::PaymentRefunded.as_str());
                ("export-refund", p.payment_id, record)
            }
        }
    }
}

impl PaymentHandler {
    /// The ranking's part of `events`: each payment counted once, each refund taken off once
    /// (the scripts remember what they applied, so a batch retried after a failure counts
    /// nothing twice). Payments go in one round trip.
    async fn rank(&self, events: &[&PaymentEvent]) -> Result<(), redis::RedisError> {
        let mut payments = Vec::new();
        for e in events {
            match e {
                PaymentEvent::Completed(p) => payments.push((p.payment_id, p.schedule_id, p.paid_at)),
                PaymentEvent::Refunded(p) => {
                    if crate::ranking::unrecord(&self.redis, &self.keys, &self.ranking, p.payment_id, p.schedule_id, p.refunded_at, p.paid_at).await? {
                        metrics::counter!("ranking_decrements_total").increment(1);
                    }
                }
            }
        }
        let counted = crate::ranking::record_many(&self.redis, &self.keys, &payments).await?;
        metrics::counter!("ranking_increments_total").increment(counted as u64);
        Ok(())
    }

    /// Hands each of `records` (message index, consumer, id, line) to the export sink once,
    /// setting `out[index]` for those that failed: in one transaction, the `processed_events`
    /// rows of all of them are inserted, the fresh ones are sent in order, and the rows of the
    /// ones the sink did not accept are taken back before the commit. So, as for one message,
    /// a row commits only after the sink accepted its record (see [`crate::export`]). A record
    /// the sink refuses for good is dead-lettered and the rest go on; at a transient failure
    /// that record and every later message are left for the runner to retry in order.
    async fn export_all(&self, records: &[(usize, &'static str, Uuid, Value)], out: &mut [Result<(), HandleError>]) -> Result<(), sqlx::Error> {
        let mut tx = crate::db::begin(&self.pool).await?;
        let consumers: Vec<&str> = records.iter().map(|r| r.1).collect();
        let ids: Vec<Uuid> = records.iter().map(|r| r.2).collect();
        let inserted: Vec<(String, Uuid)> = sqlx::query_as(
            "INSERT INTO processed_events (consumer, event_id) SELECT * FROM unnest($1::text[], $2::uuid[])
             ON CONFLICT DO NOTHING RETURNING consumer, event_id",
        )
        .bind(&consumers)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut fresh: std::collections::HashSet<(String, Uuid)> = inserted.into_iter().collect();
        // A message twice in one batch is exported once: its first copy took the row.
        let mut rest: Vec<&(usize, &'static str, Uuid, Value)> = records.iter().filter(|r| fresh.remove(&(r.1.to_string(), r.2))).collect();
        let (mut exported, mut taken_back) = (0, Vec::new());
        while !rest.is_empty() {
            let (accepted, failure) = self.sink.send_all(&rest.iter().map(|r| &r.3).collect::<Vec<_>>()).await;
            exported += accepted;
            let Some(e) = failure else { break };
            let failed = rest[accepted];
            if e.is_permanent() {
                out[failed.0] = Err(HandleError::Poison(e.to_string()));
                taken_back.push(failed);
                rest.drain(..=accepted);
            } else {
                taken_back.extend(&rest[accepted..]);
                for r in out[failed.0..].iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(HandleError::Transient(e.to_string()));
                }
                break;
            }
        }
        if !taken_back.is_empty() {
            sqlx::query("DELETE FROM processed_events WHERE (consumer, event_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))")
                .bind(taken_back.iter().map(|r| r.1).collect::<Vec<_>>())
                .bind(taken_back.iter().map(|r| r.2).collect::<Vec<_>>())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        metrics::counter!("exports_total").increment(exported as u64);
        Ok(())
    }
}

impl Handler for PaymentHandler {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let event = PaymentEvent::parse(msg)?;
        self.rank(&[&event]).await?;
        let record = event.export();
        let mut out = [Ok(())];
        self.export_all(&[(0, record.0, record.1, record.2)], &mut out).await?;
        let [result] = out;
        result
    }

    /// A batch costs one ranking round trip, one transaction and (for a file) one `fsync`,
    /// where one message at a time cost each of those per payment: the ranking lagged seconds
    /// behind a spike of payments (issue 11, tenth pass).
    async fn handle_batch(&self, msgs: &[Incoming]) -> Vec<Result<(), HandleError>> {
        let mut out: Vec<Result<(), HandleError>> = Vec::with_capacity(msgs.len());
        let mut events = Vec::with_capacity(msgs.len());
        for (i, msg) in msgs.iter().enumerate() {
            match PaymentEvent::parse(msg) {
                Ok(e) => {
                    events.push((i, e));
                    out.push(Ok(()));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if events.is_empty() {
            return out;
        }
        let fail_all = |out: &mut Vec<Result<(), HandleError>>, reason: String| {
            for r in out.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(HandleError::Transient(reason.clone()));
            }
        };
        if let Err(e) = self.rank(&events.iter().map(|(_, e)| e).collect::<Vec<_>>()).await {
            fail_all(&mut out, format!("redis: {e}"));
            return out;
        }
        let records: Vec<_> = events.iter().map(|(i, e)| {
            let (consumer, id, record) = e.export();
            (*i, consumer, id, record)
        }).collect();
        match self.export_all(&records, &mut out).await {
            Ok(()) => {}
            // PostgreSQL refused a row: find which by handling the messages one by one, so the
            // poison one is dead-lettered and the others exported.
            Err(e) if crate::kafka::is_data_error(&e) => {
                for (msg, r) in msgs.iter().zip(out.iter_mut()) {
                    if r.is_ok() {
                        *r = self.handle(msg).await;
                    }
                }
            }
            // Nothing committed (a sink that accepted some records before will see them again:
            // the documented window of `crate::export`).
            Err(e) => fail_all(&mut out, format!("database: {e}")),
        }
        out
    }
}
