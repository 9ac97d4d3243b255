//! The worker's consumers (brief §3, §5):
//! - `notification.request` → stored once by `eventId` ([`NotificationHandler`]); a separate
//!   delivery loop ([`Deliverer`]) sends stored notifications through the configured channel and
//!   records a delivery state per notification, retrying with backoff while the channel is down.
//! - `payment.completed` → the ranking (exactly once per payment, [`crate::ranking`]) and the
//!   data-platform export (once per payment, [`crate::export`]) ([`PaymentHandler`]).

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::export::Sink;
use crate::kafka::{Envelope, EventType, HandleError, Handler, Incoming};
use crate::keys::Keys;
use crate::notification::NotificationRequest;
use crate::payment::PaymentCompleted;

const KNOWN_TYPES: &[&str] = &["PAYMENT_CONFIRMED", "RESERVATION_EXPIRED", "QUEUE_POSITION", "QUEUE_ACTIVATED"];

/// Consumer of `notification.request`: stores each request once.
pub struct NotificationHandler {
    pub pool: PgPool,
}

impl Handler for NotificationHandler {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = Envelope::<NotificationRequest>::parse(&msg.payload, EventType::NotificationRequest).map_err(HandleError::Poison)?;
        let n = env.payload;
        if !KNOWN_TYPES.contains(&n.kind.as_str()) {
            return Err(HandleError::Poison(format!("unknown notification type {:?}", n.kind)));
        }
        let inserted = sqlx::query(
            "INSERT INTO notifications (event_id, user_id, type, title, message, data)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(env.event_id)
        .bind(n.user_id)
        .bind(&n.kind)
        .bind(&n.title)
        .bind(&n.message)
        .bind(&n.data)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            announce(&self.pool, &[n.user_id]).await;
        }
        let outcome = if inserted == 1 { "stored" } else { "duplicate" };
        metrics::counter!("notifications_stored_total", "type" => n.kind.clone(), "outcome" => outcome).increment(1);
        Ok(())
    }

    /// Stores a whole batch with one statement (`UNNEST`), duplicates skipped by `eventId`.
    async fn handle_batch(&self, msgs: &[Incoming]) -> Vec<Result<(), HandleError>> {
        let mut out: Vec<Result<(), HandleError>> = Vec::with_capacity(msgs.len());
        let (mut ids, mut users, mut kinds, mut titles, mut messages, mut data) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for msg in msgs {
            match Envelope::<NotificationRequest>::parse(&msg.payload, EventType::NotificationRequest) {
                Ok(env) if KNOWN_TYPES.contains(&env.payload.kind.as_str()) => {
                    let n = env.payload;
                    ids.push(env.event_id);
                    users.push(n.user_id);
                    kinds.push(n.kind);
                    titles.push(n.title);
                    messages.push(n.message);
                    data.push(n.data);
                    out.push(Ok(()));
                }
                Ok(env) => out.push(Err(HandleError::Poison(format!("unknown notification type {:?}", env.payload.kind)))),
                Err(reason) => out.push(Err(HandleError::Poison(reason))),
            }
        }
        if ids.is_empty() {
            return out;
        }
        let stored: Result<Vec<(String, Uuid)>, sqlx::Error> = sqlx::query_as(
            "INSERT INTO notifications (event_id, user_id, type, title, message, data)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
             ON CONFLICT (event_id) DO NOTHING RETURNING type, user_id",
        )
        .bind(&ids)
        .bind(&users)
        .bind(&kinds)
        .bind(&titles)
        .bind(&messages)
        .bind(&data)
        .fetch_all(&self.pool)
        .await;
        match stored {
            Ok(stored) => {
                let stored_users: Vec<Uuid> = stored.iter().map(|(_, u)| *u).collect();
                announce(&self.pool, &stored_users).await;
                for kind in KNOWN_TYPES {
                    let total = kinds.iter().filter(|k| k.as_str() == *kind).count();
                    let new = stored.iter().filter(|(k, _)| k.as_str() == *kind).count();
                    metrics::counter!("notifications_stored_total", "type" => *kind, "outcome" => "stored").increment(new as u64);
                    metrics::counter!("notifications_stored_total", "type" => *kind, "outcome" => "duplicate").increment((total - new) as u64);
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
async fn announce(pool: &PgPool, users: &[Uuid]) {
    if let Err(e) = crate::notification::announce_stored(pool, users).await {
        tracing::warn!(error = %e, "announcing stored notifications failed; streams catch up by polling");
    }
}

/// How notifications reach the user's device.
#[derive(Clone, Debug)]
pub enum Channel {
    /// Writes a log line (design document §5-4).
    Log,
    /// POSTs JSON with an `X-Signature: sha256=<hmac>` header over the body.
    Webhook { url: String, secret: String, client: reqwest::Client },
}

impl Channel {
    async fn deliver(&self, n: &Value) -> Result<(), String> {
        match self {
            Channel::Log => {
                tracing::info!(target: "notification", notification = %n, "notification delivered");
                Ok(())
            }
            Channel::Webhook { url, secret, client } => {
                let body = serde_json::to_vec(n).expect("json values serialize");
                let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
                mac.update(&body);
                let sig = hex::encode(mac.finalize().into_bytes());
                let resp = client
                    .post(url)
                    .header("content-type", "application/json")
                    .header("x-signature", format!("sha256={sig}"))
                    .header("x-event-id", n["eventId"].as_str().unwrap_or_default())
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("webhook answered {}", resp.status()))
                }
            }
        }
    }
}

/// Delivers stored notifications that are still PENDING, oldest first.
pub struct Deliverer {
    pub pool: PgPool,
    pub channel: Channel,
    pub batch: i64,
    pub max_backoff: Duration,
}

impl Deliverer {
    /// Delivers one batch; returns (delivered, failed). Rows are locked with `SKIP LOCKED` so
    /// several workers share the work; a failed row is retried after an exponential backoff.
    pub async fn step(&self) -> Result<(usize, usize), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, Uuid, Uuid, String, String, String, Value, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT id, event_id, user_id, type, title, message, data, created_at FROM notifications
             WHERE delivery = 'PENDING' AND next_attempt_at <= now()
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch)
        .fetch_all(&mut *tx)
        .await?;
        let (mut delivered, mut failed) = (Vec::new(), Vec::new());
        for (id, event_id, user_id, kind, title, message, data, created_at) in rows {
            let n = json!({"notificationId": id.to_string(), "eventId": event_id, "userId": user_id, "type": kind,
                           "title": title, "message": message, "data": data, "createdAt": created_at});
            match self.channel.deliver(&n).await {
                Ok(()) => delivered.push(id),
                Err(e) => {
                    tracing::warn!(notification = id, error = %e, "delivery failed; will retry");
                    failed.push(id);
                }
            }
        }
        // The delivery state of the whole batch in two statements.
        sqlx::query("UPDATE notifications SET delivery = 'DELIVERED', delivered_at = now(), attempts = attempts + 1 WHERE id = ANY($1)")
            .bind(&delivered)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE notifications SET attempts = attempts + 1,
                    next_attempt_at = now() + make_interval(secs => least(0.2 * power(2, attempts), $2))
             WHERE id = ANY($1)",
        )
        .bind(&failed)
        .bind(self.max_backoff.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::counter!("notifications_delivered_total").increment(delivered.len() as u64);
        metrics::counter!("notifications_delivery_failures_total").increment(failed.len() as u64);
        Ok((delivered.len(), failed.len()))
    }

    /// Runs until `shutdown`, woken by new notifications and polling every `poll`.
    pub async fn run(self, poll: Duration, shutdown: CancellationToken) {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await.ok();
        if let Some(l) = listener.as_mut() {
            let _ = l.listen(crate::notification::STORED_CHANNEL).await;
        }
        loop {
            let busy = match self.step().await {
                Ok((ok, failed)) => ok + failed > 0 && failed == 0,
                Err(e) => {
                    tracing::warn!(error = %e, "delivery step failed");
                    false
                }
            };
            if busy {
                continue;
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => {
                        // While PostgreSQL is down recv fails at once: wait a poll instead.
                        if l.recv().await.is_err() {
                            tokio::time::sleep(poll).await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notified => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}

/// Keeps the ranking whole: every `interval`, rebuilds it from PostgreSQL if Redis lost it.
pub async fn run_ranking_reconciler(pool: PgPool, redis: crate::redis_conn::RedisConn, keys: Keys, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match crate::ranking::reconcile(&redis, &keys, &pool).await {
            Ok(Some(n)) => {
                metrics::counter!("ranking_rebuilds_total").increment(1);
                tracing::info!(counted = n, "ranking rebuilt from PostgreSQL");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "ranking reconcile failed"),
        }
    }
}

/// Consumer of `payment.completed`: ranking and export, each once per payment.
pub struct PaymentHandler {
    pub pool: PgPool,
    pub redis: crate::redis_conn::RedisConn,
    pub keys: Keys,
    pub sink: Sink,
}

impl Handler for PaymentHandler {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = Envelope::<PaymentCompleted>::parse(&msg.payload, EventType::PaymentCompleted).map_err(HandleError::Poison)?;
        let p = &env.payload;
        if crate::ranking::record(&self.redis, &self.keys, p.payment_id, p.schedule_id).await? {
            metrics::counter!("ranking_increments_total").increment(1);
        }
        let mut tx = self.pool.begin().await?;
        let fresh = sqlx::query("INSERT INTO processed_events (consumer, event_id) VALUES ('export', $1) ON CONFLICT DO NOTHING")
            .bind(p.payment_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if fresh {
            let record = serde_json::to_value(p).expect("payments serialize");
            self.sink.send(&record).await.map_err(|e| HandleError::Transient(e.to_string()))?;
            tx.commit().await?;
            metrics::counter!("exports_total").increment(1);
        }
        Ok(())
    }
}
