//! Notifications (brief §5, design document §5).
//!
//! Producers ([`enqueue`]) put a `notification.request` in the outbox in the same transaction as
//! the change it reports. The worker's consumer ([`crate::worker::notifications`]) stores each
//! request once by `eventId`, then delivers it through the configured channel.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::kafka::{Envelope, EventType, Topics};

/// The kinds of notification and their default texts (brief §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PaymentConfirmed,
    ReservationExpired,
    QueuePosition(u64),
    QueueActivated,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::PaymentConfirmed => "PAYMENT_CONFIRMED",
            Kind::ReservationExpired => "RESERVATION_EXPIRED",
            Kind::QueuePosition(_) => "QUEUE_POSITION",
            Kind::QueueActivated => "QUEUE_ACTIVATED",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::PaymentConfirmed => "결제 완료",
            Kind::ReservationExpired => "예약 만료",
            Kind::QueuePosition(_) => "대기 순번",
            Kind::QueueActivated => "예약 가능",
        }
    }

    pub fn message(self) -> String {
        match self {
            Kind::PaymentConfirmed => "결제가 완료되었습니다. 콘서트 예약이 확정되었습니다.".into(),
            Kind::ReservationExpired => "5분 이내 결제하지 않아 예약이 만료되었습니다.".into(),
            Kind::QueuePosition(n) => format!("현재 대기 순번은 {n}번입니다."),
            Kind::QueueActivated => "예약 가능한 시간입니다.".into(),
        }
    }
}

/// Payload of `notification.request` (§5-2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRequest {
    pub user_id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub message: String,
    #[serde(default)]
    pub data: Value,
}

impl NotificationRequest {
    pub fn new(kind: Kind, user_id: Uuid, data: Value) -> Self {
        Self {
            user_id,
            kind: kind.type_name().to_string(),
            title: kind.title().to_string(),
            message: kind.message(),
            data,
        }
    }
}

/// A stable event id for a notification about `subject` (a reservation, a queue entry…), so the
/// same fact reported twice is stored once.
pub fn event_id(kind: Kind, subject: &str) -> Uuid {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}:{subject}", kind.type_name()).as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Writes a `notification.request` to the outbox inside the caller's transaction.
pub async fn enqueue(
    tx: &mut PgConnection,
    topics: &Topics,
    event_id: Uuid,
    request: NotificationRequest,
) -> Result<(), sqlx::Error> {
    let key = request.user_id.to_string();
    let env = Envelope::with_id(event_id, EventType::NotificationRequest, request);
    crate::outbox::enqueue(tx, &topics.notification_request, &key, &env).await
}

/// A stored notification as the user's list and stream show it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Stored {
    #[serde(skip)]
    pub cursor: i64,
    pub notification_id: String,
    pub event_id: Uuid,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    pub title: String,
    pub message: String,
    pub data: Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The user's notifications after `cursor`, oldest first.
pub async fn list_after(pool: &sqlx::PgPool, user: Uuid, cursor: i64, limit: i64) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id AS cursor, id::text AS notification_id, event_id, type, title, message, data, created_at
         FROM notifications WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(user)
    .bind(cursor)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The cursor of the user's latest notification (0 when none), where a new stream starts.
pub async fn last_cursor(pool: &sqlx::PgPool, user: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM notifications WHERE user_id = $1")
        .bind(user)
        .fetch_one(pool)
        .await
}

/// The PostgreSQL channel on which the worker announces stored notifications.
pub const STORED_CHANNEL: &str = "notification_new";

/// Users per NOTIFY payload: 200 × 37 bytes stays under PostgreSQL's 8,000-byte payload limit.
const USERS_PER_PAYLOAD: usize = 200;

/// Tells every process listening on [`STORED_CHANNEL`] (the api's stream hubs, the worker's
/// delivery loop) which users have new stored notifications: called once per stored batch,
/// after its commit. One statement, one transaction, one commit for the whole batch (a payload
/// per 200 users, comma separated): PostgreSQL serializes the commits of notifying transactions,
/// so a NOTIFY per row (the old trigger) made the worker's inserts and every other such commit
/// wait in line. A lost announcement loses nothing: streams and the delivery loop also poll.
pub async fn announce_stored(pool: &sqlx::PgPool, users: &[Uuid]) -> Result<(), sqlx::Error> {
    let mut users = users.to_vec();
    users.sort_unstable();
    users.dedup();
    if users.is_empty() {
        return Ok(());
    }
    let payloads: Vec<String> = users
        .chunks(USERS_PER_PAYLOAD)
        .map(|c| c.iter().map(Uuid::to_string).collect::<Vec<_>>().join(","))
        .collect();
    sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p")
        .bind(STORED_CHANNEL)
        .bind(&payloads)
        .execute(pool)
        .await?;
    metrics::counter!("notification_announcements_total").increment(payloads.len() as u64);
    Ok(())
}

/// The users named by an announcement of [`announce_stored`].
pub fn announced_users(payload: &str) -> impl Iterator<Item = Uuid> + '_ {
    // An item may carry `:<id>` after the user (the form of the old per-row trigger).
    payload.split(',').filter_map(|item| Uuid::parse_str(item.split(':').next().unwrap_or_default().trim()).ok())
}

/// Relays the worker's announcements ([`announce_stored`]) to open streams in this process, as
/// "user X has something new". Streams re-read from PostgreSQL, so a missed signal only
/// delays an event until the stream's next periodic read.
pub async fn run_hub(pool: sqlx::PgPool, tx: tokio::sync::broadcast::Sender<Uuid>, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "notification hub connect failed");
                tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue }
            }
        };
        if let Err(e) = listener.listen(STORED_CHANNEL).await {
            tracing::warn!(error = %e, "notification hub LISTEN failed");
            continue;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(n) => {
                        for user in announced_users(n.payload()) {
                            let _ = tx.send(user);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "notification hub lost its connection");
                        break;
                    }
                }
            }
        }
    }
}
