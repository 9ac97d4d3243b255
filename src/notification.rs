//! Notifications (brief §5, design document §5).
//!
//! Producers ([`enqueue`]) put a `notification.request` in the outbox in the same transaction as
//! the change it reports. The worker's consumer ([`crate::worker::notifications`]) stores each
//! request once by `eventId`, then delivers it through the configured channel.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::kafka::{Envelope, EventType, Topics};

/// The kinds of notification and their default texts (brief §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PaymentConfirmed,
    ReservationExpired,
    QueuePosition(u64),
    QueueActivated,
    PaymentRefunded,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::PaymentConfirmed => "PAYMENT_CONFIRMED",
            Kind::ReservationExpired => "RESERVATION_EXPIRED",
            Kind::QueuePosition(_) => "QUEUE_POSITION",
            Kind::QueueActivated => "QUEUE_ACTIVATED",
            Kind::PaymentRefunded => "PAYMENT_REFUNDED",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::PaymentConfirmed => "결제 완료",
            Kind::ReservationExpired => "예약 만료",
            Kind::QueuePosition(_) => "대기 순번",
            Kind::QueueActivated => "예약 가능",
            Kind::PaymentRefunded => "환불 완료",
        }
    }

    pub fn message(self) -> String {
        match self {
            Kind::PaymentConfirmed => "결제가 완료되었습니다. 콘서트 예약이 확정되었습니다.".into(),
            Kind::ReservationExpired => "5분 이내 결제하지 않아 예약이 만료되었습니다.".into(),
            Kind::QueuePosition(n) => format!("현재 대기 순번은 {n}번입니다."),
            Kind::QueueActivated => "예약 가능한 시간입니다.".into(),
            Kind::PaymentRefunded => "환불이 완료되었습니다. 포인트가 반환되었습니다.".into(),
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

/// The outbox row of a notification request, for [`crate::outbox::enqueue_many`].
pub fn outbox_row(topics: &Topics, event_id: Uuid, request: NotificationRequest) -> crate::outbox::Row {
    let key = request.user_id.to_string();
    crate::outbox::Row::new(&topics.notification_request, &key, &Envelope::with_id(event_id, EventType::NotificationRequest, request))
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

/// A row [`store`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub kind: String,
    pub user_id: Uuid,
    /// Its commit-ordered stream position.
    pub pos: i64,
    /// Its id (`notificationId`).
    pub id: i64,
    pub event_id: Uuid,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What [`store_claimed`] wrote: the new rows, and the claim their delivery rows were born with.
#[derive(Debug, Clone)]
pub struct StoredClaimed {
    pub rows: Vec<StoredRow>,
    /// The delivery rows' `next_attempt_at`: the end of the storing worker's lease and the fencing
    /// token of its outcomes (`worker::Deliverer`). `None` when nothing new was stored.
    pub token: Option<chrono::DateTime<chrono::Utc>>,
}

/// Stores notification requests (`eventId`, request), each once by `eventId`, with their stream
/// positions; returns the rows that were new, in input order.
///
/// The positions are given here, by the table's one writer, in the inserting transaction. It
/// holds the stream's head row (`FOR UPDATE`, taken on `BEGIN`) from before its insert until its
/// commit, so two inserting transactions (two worker replicas) number their rows one after the
/// other in commit order: the prefix invariant of [`crate::sequencer`] holds without a second
/// pass. Before, the worker inserted without a position and the api's stamper updated every row
/// afterwards: each notification was written twice, and that UPDATE was 9.5 % of the database's
/// time in the spike profile (issue 11). A duplicate leaves a gap in the positions, which readers
/// never notice (they read `pos > cursor`).
pub async fn store(pool: &sqlx::PgPool, requests: &[(Uuid, NotificationRequest)]) -> Result<Vec<StoredRow>, sqlx::Error> {
    Ok(store_claimed(pool, requests, None).await?.rows)
}

/// [`store`], with the delivery of every new row claimed by the caller for `lease` (if given) in
/// the same statement: the worker hands what it stored straight to its own delivery loop, which
/// then neither claims those rows nor needs waking for them (issue 11: the claim, a second write
/// of every delivery row, was a tenth of the database's time in the queue spike). A worker that
/// dies before delivering loses nothing: the lease lapses and any worker's claim takes the rows,
/// as it takes the rows of a claim that lapsed. Without a lease the rows are due at once, as
/// [`store`] writes them.
pub async fn store_claimed(pool: &sqlx::PgPool, requests: &[(Uuid, NotificationRequest)], lease: Option<std::time::Duration>) -> Result<StoredClaimed, sqlx::Error> {
    if requests.is_empty() {
        return Ok(StoredClaimed { rows: Vec::new(), token: None });
    }
    let mut event_ids = Vec::with_capacity(requests.len());
    let (mut users, mut kinds, mut titles, mut messages, mut data) = (vec![], vec![], vec![], vec![], vec![]);
    for (id, n) in requests {
        event_ids.push(*id);
        users.push(n.user_id);
        kinds.push(n.kind.as_str());
        titles.push(n.title.as_str());
        messages.push(n.message.as_str());
        data.push(&n.data);
    }
    let mut tx = crate::db::begin_with(pool, "BEGIN; SELECT 1 FROM stream_heads WHERE stream = 'notification' FOR UPDATE").await?;
    // A new statement: its snapshot, taken after the lock was granted, sees the head the previous
    // writer (or the stamper) committed.
    //
    // With a lease, `claimed` writes the delivery rows already claimed; the statement trigger
    // `notification_deliveries_add` (which gives every other insert its delivery rows) then finds
    // them there and skips them (migration 0200). now() is the transaction's start, so every
    // claimed row has the same `next_attempt_at`: the token.
    type Row = (String, Uuid, i64, i64, Uuid, chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>);
    let stored: Vec<Row> = sqlx::query_as(
        "WITH head AS (SELECT pos FROM stream_heads WHERE stream = 'notification'),
              new AS (
                  INSERT INTO notifications (event_id, user_id, type, title, message, data, pos)
                  SELECT r.e, r.u, r.t, r.ti, r.m, r.d, (SELECT pos FROM head) + r.n
                  FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
                       WITH ORDINALITY AS r(e, u, t, ti, m, d, n)
                  ON CONFLICT (event_id) DO NOTHING
                  RETURNING pos, type, user_id, id, event_id, created_at
              ), claimed AS (
                  INSERT INTO notification_deliveries (notification_id, next_attempt_at)
                  SELECT id, now() + make_interval(secs => $7::float8) FROM new WHERE $7::float8 IS NOT NULL
                  RETURNING next_attempt_at
              ), moved AS (
                  UPDATE stream_heads SET pos = (SELECT max(pos) FROM new)
                  WHERE stream = 'notification' AND EXISTS (SELECT 1 FROM new)
              )
         SELECT type, user_id, pos, id, event_id, created_at, (SELECT max(next_attempt_at) FROM claimed) FROM new ORDER BY pos",
    )
    .bind(&event_ids)
    .bind(&users)
    .bind(&kinds)
    .bind(&titles)
    .bind(&messages)
    .bind(&data)
    .bind(lease.map(|l| l.as_secs_f64()))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let token = stored.first().and_then(|r| r.6);
    let rows = stored.into_iter().map(|(kind, user_id, pos, id, event_id, created_at, _)| StoredRow { kind, user_id, pos, id, event_id, created_at }).collect();
    Ok(StoredClaimed { rows, token })
}

/// The user's notifications after `cursor`, oldest first. The cursor is the commit-ordered
/// position given by [`store`] (or, for a row written without one, stamped by
/// [`crate::sequencer`]), not the insertion id, so a `next` cursor never skips a notification
/// that commits later; rows not stamped yet are not shown yet.
pub async fn list_after(pool: &sqlx::PgPool, user: Uuid, cursor: i64, limit: i64) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as(
        "SELECT pos AS cursor, id::text AS notification_id, event_id, type, title, message, data, created_at
         FROM notifications WHERE user_id = $1 AND pos > $2 AND pos IS NOT NULL ORDER BY pos LIMIT $3",
    )
    .bind(user)
    .bind(cursor)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The cursor of the user's latest notification (0 when none), where a new stream starts.
pub async fn last_cursor(pool: &sqlx::PgPool, user: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(max(pos), 0) FROM notifications WHERE user_id = $1 AND pos IS NOT NULL")
        .bind(user)
        .fetch_one(pool)
        .await
}

/// The PostgreSQL channel on which the worker announces stored notifications.
pub const STORED_CHANNEL: &str = "notification_new";

/// Users per NOTIFY payload: an item `user:position,` is at most 36 + 1 + 19 + 1 = 57 bytes, and
/// 100 of them (5,700 bytes) stay under PostgreSQL's 8,000-byte payload limit.
const USERS_PER_PAYLOAD: usize = 100;

/// Tells every process listening on [`STORED_CHANNEL`] (the api's stream feed, the worker's
/// delivery loop) which users have new stored notifications, up to which position: called once
/// per stored batch, after its commit, with what [`store`] returned. One statement, one
/// transaction, one commit for the whole batch (a payload per 100 users, items `user:position`
/// comma separated): PostgreSQL serializes the commits of notifying transactions, so a NOTIFY
/// per row (the old trigger) made the worker's inserts and every other such commit wait in line.
/// The positions let the api wake each user's streams without reading anything first. A lost
/// announcement loses nothing: streams and the delivery loop also poll.
pub async fn announce_stored(pool: &sqlx::PgPool, rows: &[StoredRow]) -> Result<(), sqlx::Error> {
    let mut latest = Positions::new();
    for r in rows {
        raise(&mut latest, r.user_id, r.pos);
    }
    if latest.is_empty() {
        return Ok(());
    }
    let payloads = announcement_payloads(&latest.into_iter().collect::<Vec<_>>());
    sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p")
        .bind(STORED_CHANNEL)
        .bind(&payloads)
        .execute(pool)
        .await?;
    metrics::counter!("notification_announcements_total").increment(payloads.len() as u64);
    Ok(())
}

/// A listener on [`STORED_CHANNEL`] (the worker's delivery loop, the api's stream feed), or
/// `None` when PostgreSQL cannot give one now: the caller then polls only.
pub async fn stored_listener(pool: &sqlx::PgPool, who: &str) -> Option<sqlx::postgres::PgListener> {
    let mut l = match sqlx::postgres::PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, who, "no listener connection for stored notifications; polling only");
            return None;
        }
    };
    match l.listen(STORED_CHANNEL).await {
        Ok(()) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, who, "LISTEN for stored notifications failed; polling only");
            None
        }
    }
}

/// Each user's highest position.
type Positions = std::collections::HashMap<Uuid, i64>;

/// Records that `user` has news up to `pos`, keeping the highest.
fn raise(positions: &mut Positions, user: Uuid, pos: i64) {
    let p = positions.entry(user).or_insert(pos);
    *p = (*p).max(pos);
}

/// The NOTIFY payloads naming `users` (user, latest position).
fn announcement_payloads(users: &[(Uuid, i64)]) -> Vec<String> {
    users.chunks(USERS_PER_PAYLOAD).map(|c| c.iter().map(|(u, p)| format!("{u}:{p}")).collect::<Vec<_>>().join(",")).collect()
}

/// What [`next_announcement`] received: every announcement that had arrived, merged.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Announced {
    /// Each announced user with the highest position announced for them (a map: a feed that
    /// fell behind may take thousands of announcements at once).
    pub positions: Positions,
    /// An item without a position (a worker of an older version) or that did not parse, or the
    /// listener failed: the caller must find out what is new by reading.
    pub incomplete: bool,
}

/// Waits for the next announcement on `listener` and takes every one already received with it
/// (one step of the caller covers them all). Without a listener it never returns; while the
/// connection is gone (sqlx reconnects on the next call) it waits `poll` instead, so a caller
/// that also polls is not spun by failing receives.
pub async fn next_announcement(listener: &mut Option<sqlx::postgres::PgListener>, poll: std::time::Duration) -> Announced {
    let mut out = Announced::default();
    match listener.as_mut() {
        Some(l) => match l.recv().await {
            Ok(first) => {
                out.take(first.payload());
                while let Some(more) = l.next_buffered() {
                    out.take(more.payload());
                }
            }
            Err(_) => {
                tokio::time::sleep(poll).await;
                out.incomplete = true;
            }
        },
        None => std::future::pending().await,
    }
    out
}

impl Announced {
    fn take(&mut self, payload: &str) {
        for item in payload.split(',').filter(|i| !i.trim().is_empty()) {
            match parse_item(item) {
                Some((user, Some(pos))) => raise(&mut self.positions, user, pos),
                _ => self.incomplete = true,
            }
        }
    }
}

/// One `user[:position]` item of an announcement.
fn parse_item(item: &str) -> Option<(Uuid, Option<i64>)> {
    let mut parts = item.trim().splitn(2, ':');
    let user = Uuid::parse_str(parts.next()?).ok()?;
    match parts.next() {
        None => Some((user, None)),
        Some(p) => Some((user, Some(p.parse().ok()?))),
    }
}

/// The users named by an announcement of [`announce_stored`].
pub fn announced_users(payload: &str) -> impl Iterator<Item = Uuid> + '_ {
    payload.split(',').filter_map(|item| parse_item(item).map(|(u, _)| u))
}

/// The users with notifications stamped at `after < pos <= upto` (the feed's read).
pub async fn users_between(pool: &sqlx::PgPool, after: i64, upto: i64) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT user_id, max(pos) FROM notifications WHERE pos > $1 AND pos <= $2 GROUP BY user_id")
        .bind(after)
        .bind(upto)
        .fetch_all(pool)
        .await
}

/// A user's `watch` of the latest position, and how many streams of that user are open.
type UserStreams = (tokio::sync::watch::Sender<i64>, usize);

/// Fan-out by user: one `watch` per user with open streams on this api, holding the latest
/// position the feed saw for that user. A stream wakes only for its own user's news, a `watch`
/// cannot lag (it keeps the latest value), and the entry is removed with the user's last stream.
/// The per-user cap on open streams is counted here.
#[derive(Clone, Default)]
pub struct NotificationHub {
    users: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Uuid, UserStreams>>>,
}

/// Why a notification stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyStreams;

impl NotificationHub {
    /// Registers a stream of `user`, unless the user already has `cap` open on this api.
    pub fn subscribe(&self, user: Uuid, cap: usize) -> Result<UserSubscription, TooManyStreams> {
        let mut map = self.users.lock().expect("notification hub lock");
        let entry = map.entry(user).or_insert_with(|| (tokio::sync::watch::channel(0).0, 0));
        if entry.1 >= cap {
            if entry.1 == 0 {
                map.remove(&user);
            }
            return Err(TooManyStreams);
        }
        entry.1 += 1;
        let rx = entry.0.subscribe();
        Ok(UserSubscription { rx, hub: self.clone(), user })
    }

    /// Wakes the streams of the given users (user, latest position) that have not been told of
    /// that position yet; returns how many users were woken. The same news can come twice (from
    /// the worker's announcement, then from the feed's read), and a stream reads the database
    /// only once for it.
    pub fn wake(&self, users: impl IntoIterator<Item = (Uuid, i64)>) -> usize {
        let map = self.users.lock().expect("notification hub lock");
        let mut n = 0;
        for (user, pos) in users {
            if let Some((tx, _)) = map.get(&user) {
                let newer = tx.send_if_modified(|seen| {
                    let newer = pos > *seen;
                    if newer {
                        *seen = pos;
                    }
                    newer
                });
                n += usize::from(newer);
            }
        }
        n
    }

    /// True when no notification stream is open on this api.
    pub fn is_empty(&self) -> bool {
        self.users.lock().expect("notification hub lock").is_empty()
    }

    /// Open streams of `user` on this api.
    pub fn open_streams(&self, user: Uuid) -> usize {
        self.users.lock().expect("notification hub lock").get(&user).map_or(0, |e| e.1)
    }
}

/// One open stream of a user; dropping it frees its place under the cap.
pub struct UserSubscription {
    pub rx: tokio::sync::watch::Receiver<i64>,
    hub: NotificationHub,
    user: Uuid,
}

impl Drop for UserSubscription {
    fn drop(&mut self) {
        let mut map = self.hub.users.lock().expect("notification hub lock");
        if let Some(e) = map.get_mut(&self.user) {
            e.1 -= 1;
            if e.1 == 0 {
                map.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod hub_tests {
    use super::*;

    #[tokio::test]
    async fn a_user_gets_at_most_cap_streams_and_only_their_own_wake_ups() {
        let hub = NotificationHub::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let s1 = hub.subscribe(a, 2).unwrap();
        let s2 = hub.subscribe(a, 2).unwrap();
        assert_eq!(hub.subscribe(a, 2).err(), Some(TooManyStreams));
        let mut sb = hub.subscribe(b, 2).unwrap();
        sb.rx.borrow_and_update();
        assert_eq!(hub.wake([(a, 7)]), 1);
        assert!(s2.rx.has_changed().unwrap());
        assert!(!sb.rx.has_changed().unwrap(), "b is not woken by a's notification");
        drop(s1);
        let s3 = hub.subscribe(a, 2).unwrap();
        drop((s2, s3, sb));
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn news_already_told_does_not_wake_a_stream_again() {
        let hub = NotificationHub::default();
        let a = Uuid::new_v4();
        let mut s = hub.subscribe(a, 1).unwrap();
        assert_eq!(hub.wake([(a, 7)]), 1);
        assert_eq!(*s.rx.borrow_and_update(), 7);
        assert_eq!(hub.wake([(a, 7)]), 0, "the feed's read of what the announcement told");
        assert_eq!(hub.wake([(a, 5)]), 0, "an older announcement arriving late");
        assert!(!s.rx.has_changed().unwrap());
        assert_eq!(hub.wake([(a, 9)]), 1);
        assert_eq!(*s.rx.borrow_and_update(), 9);
    }

    #[test]
    fn every_announcement_payload_fits_postgresqls_limit_whatever_the_positions() {
        let users: Vec<(Uuid, i64)> = (0..1000).map(|_| (Uuid::new_v4(), i64::MAX)).collect();
        let payloads = announcement_payloads(&users);
        assert!(payloads.iter().all(|p| p.len() < 8000), "longest {}", payloads.iter().map(String::len).max().unwrap());
        let mut back = Announced::default();
        payloads.iter().for_each(|p| back.take(p));
        assert_eq!(back.positions.len(), 1000);
    }

    #[test]
    fn announcements_merge_to_each_users_highest_position_and_flag_what_they_do_not_say() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut got = Announced::default();
        got.take(&format!("{a}:3,{b}:8"));
        got.take(&format!("{a}:12"));
        assert_eq!(got, Announced { positions: [(a, 12), (b, 8)].into_iter().collect(), incomplete: false });
        got.take(&b.to_string());
        assert!(got.incomplete, "a user without a position (an older worker) means: read");
        let mut garbled = Announced::default();
        garbled.take(&format!("{a}:x"));
        assert!(garbled.incomplete && garbled.positions.is_empty());
        assert_eq!(announced_users(&format!("{a}:3,{b}")).collect::<Vec<_>>(), vec![a, b]);
    }
}
