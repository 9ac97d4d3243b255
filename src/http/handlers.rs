//! Plain async functions behind the routes: parse, authenticate, call the domain, shape the reply.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use tokio_stream::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use crate::hold_gate::Turn;

use super::body::parse;
use super::Api;
use crate::error::{Error, Result};
use crate::{admin, catalog, idempotency, notification, payment, points, ranking, refund, reservation, seat_map, user};

type Body = Result<Bytes, Error>;

fn json_reply<T: Serialize>(status: StatusCode, value: &T) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

fn path_id(raw: &str, what: &'static str) -> Result<Uuid> {
    Uuid::parse_str(raw).map_err(|_| Error::NotFound(what))
}

async fn authed(api: &Api, auth: &Option<String>) -> Result<Uuid> {
    api.sessions.authenticate(&api.pool, auth.as_deref()).await
}

/// Query parameter `name` of a raw query string.
fn query_param<'a>(raw: &'a str, name: &str) -> Option<&'a str> {
    raw.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    name: String,
}

pub async fn create_user(api: Api, body: Body) -> Result<Response> {
    let b: NewUserBody = parse(&body?)?;
    let u = user::create(&api.pool, &b.name).await?;
    api.sessions.remember_token(&u.token, u.user_id);
    Ok(json_reply(StatusCode::CREATED, &u))
}

pub async fn points(api: Api, auth: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let balance = points::balance(&api.pool, user).await?;
    Ok(json_reply(StatusCode::OK, &json!({ "balance": balance })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeBody {
    amount: i64,
}

pub async fn charge(api: Api, auth: Option<String>, key: Option<String>, body: Body) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let key = idempotency::validate_key(key.as_deref())?;
    let b: ChargeBody = parse(&body?)?;
    let (status, body) = points::charge(&api.pool, user, &key, b.amount).await?;
    Ok(json_reply(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), &body))
}

pub async fn history(api: Api, auth: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let items = points::history(&api.pool, user).await?;
    Ok(json_reply(StatusCode::OK, &json!({ "items": items })))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn create_concert(api: Api, auth: Option<String>, body: Body) -> Result<Response> {
    let token = user::bearer(auth.as_deref()).ok_or(Error::Unauthorized)?;
    if api.admin_token.is_empty() || !constant_time_eq(token.as_bytes(), api.admin_token.as_bytes()) {
        return Err(Error::Unauthorized);
    }
    let c: catalog::NewConcert = parse(&body?)?;
    let created = catalog::create_concert(&api.pool, c).await?;
    Ok(json_reply(StatusCode::CREATED, &created))
}

pub async fn concerts(api: Api) -> Result<Response> {
    let items = catalog::list_concerts(&api.pool).await?;
    Ok(json_reply(StatusCode::OK, &json!({ "items": items })))
}

pub async fn schedules(id: String, api: Api) -> Result<Response> {
    let id = path_id(&id, "concert")?;
    let items = catalog::schedules(&api.pool, id).await?;
    Ok(json_reply(StatusCode::OK, &json!({ "items": items })))
}

pub async fn seats(id: String, api: Api) -> Result<Response> {
    let id = path_id(&id, "schedule")?;
    let items = catalog::seats(&api.pool, id).await?;
    Ok(json_reply(StatusCode::OK, &json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EnterBody {
    schedule_id: Uuid,
}

pub async fn enter_queue(api: Api, auth: Option<String>, body: Body) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let b: EnterBody = parse(&body?)?;
    let opens_at = api.opening_times.get(&api.pool, b.schedule_id).await?;
    let (token, place) = api.queue.enter(b.schedule_id, opens_at, user).await?;
    let mut v = serde_json::to_value(&place).expect("place serializes");
    v["queueToken"] = json!(token);
    Ok(json_reply(StatusCode::CREATED, &v))
}

pub async fn queue_me(api: Api, auth: Option<String>, token: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let token = token.ok_or_else(|| Error::invalid("X-Queue-Token", "header is required"))?;
    let schedule = api.queue.verify(Some(&token), user)?;
    let place = api.queue.place_of(schedule, user).await?;
    Ok(json_reply(StatusCode::OK, &place))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HoldBody {
    seat_id: Uuid,
}

pub async fn hold(api: Api, auth: Option<String>, token: Option<String>, key: Option<String>, body: Body) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let key = key.map(|k| idempotency::validate_key(Some(&k))).transpose()?;
    let b: HoldBody = parse(&body?)?;
    // The gate comes first, before any database round trip, so that in a seat fight the one
    // contender in the hold does not queue for a pool connection behind the reads of all the
    // others; those waiting behind a successful hold are answered 409 without reading anything
    // (even one whose queue place would have been refused: nothing is held for it either way).
    // A retry with a key bypasses the gate: it must get its own stored answer, not a verdict.
    let mut contender = None;
    if key.is_none() {
        match api.hold_gate.enter(b.seat_id).await {
            Turn::Contender(c) => contender = Some(c),
            Turn::Taken => {
                metrics::counter!("holds_total", "outcome" => "unavailable").increment(1);
                return Err(Error::SeatUnavailable);
            }
            Turn::Open => {}
        }
    }
    if let Some(key) = key.as_deref() {
        if let Some(body) = reservation::replayed(&api.pool, user, b.seat_id, key).await? {
            return Ok(json_reply(StatusCode::CREATED, &body));
        }
    }
    // The queue place first (Redis; the signed token names its schedule), then the hold, which
    // checks that the seat is in that schedule: no connection waits on Redis.
    let schedule = api.queue.active_schedule(token.as_deref(), user).await?;
    let req = reservation::HoldRequest { user, seat: b.seat_id, ttl: api.hold_ttl, max_seats: api.max_seats_per_user, key: key.as_deref() };
    let held = reservation::hold(&api.pool, &api.holds, &api.topics, req, schedule).await?;
    if let (Some(c), true) = (contender.as_mut(), held.fresh.is_some()) {
        c.held();
    }
    drop(contender);
    if held.fresh.is_some() {
        // Only a successful hold keeps the queue place alive (issue 12). If Redis fails here the
        // place lapses at its old deadline, which is the safe side.
        if let Err(e) = api.queue.touch(schedule, user).await {
            tracing::warn!(error = %e, "could not extend the queue place after a hold");
        }
    }
    Ok(json_reply(StatusCode::CREATED, &held.body))
}

/// `GET /v1/users/me/reservations?status=&after=&limit=`: the caller's own, newest first.
pub async fn my_reservations(api: Api, auth: Option<String>, query: String) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let status = match query_param(&query, "status") {
        None => None,
        Some(s) if reservation::STATUSES.contains(&s) => Some(s),
        Some(_) => return Err(Error::invalid("status", format!("must be one of {}", reservation::STATUSES.join(", ")))),
    };
    let after = match query_param(&query, "after") {
        None => None,
        // Only the hyphenated form `next` gives (the description's pattern says so too).
        Some(v) if v.len() == 36 => Some(Uuid::parse_str(v).map_err(|_| Error::invalid("after", "must be a cursor from `next`"))?),
        Some(_) => return Err(Error::invalid("after", "must be a cursor from `next`")),
    };
    let limit = match query_param(&query, "limit") {
        None => 50,
        Some(v) => v.parse::<i64>().ok().filter(|n| (1..=200).contains(n)).ok_or_else(|| Error::invalid("limit", "must be 1 to 200"))?,
    };
    let items = reservation::list_mine(&api.pool, user, status, after, limit).await?;
    let next = (items.len() as i64 == limit).then(|| items.last().map(|r| r.reservation_id.to_string())).flatten();
    Ok(json_reply(StatusCode::OK, &json!({ "items": items, "next": next })))
}

/// `GET /v1/admin/schedules/{scheduleId}/queue`
pub async fn admin_queue(id: String, api: Api, auth: Option<String>) -> Result<Response> {
    admin::authorize(&api.admin_token, auth.as_deref())?;
    let schedule = path_id(&id, "schedule")?;
    let state = admin::queue_state(&api.pool, &api.queue, schedule).await?;
    Ok(json_reply(StatusCode::OK, &state))
}

/// `PATCH /v1/admin/schedules/{scheduleId}/queue`
pub async fn admin_queue_patch(id: String, api: Api, auth: Option<String>, body: Body) -> Result<Response> {
    admin::authorize(&api.admin_token, auth.as_deref())?;
    let schedule = path_id(&id, "schedule")?;
    let patch: admin::QueuePatch = parse(&body?)?;
    let state = admin::patch_queue(&api.pool, &api.queue, schedule, patch).await?;
    Ok(json_reply(StatusCode::OK, &state))
}

pub async fn get_reservation(id: String, api: Api, auth: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let id = path_id(&id, "reservation")?;
    let r = reservation::get(&api.pool, user, id).await?;
    Ok(json_reply(StatusCode::OK, &r))
}

pub async fn cancel_reservation(id: String, api: Api, auth: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let id = path_id(&id, "reservation")?;
    let r = reservation::cancel(&api.pool, &api.topics, user, id).await?;
    Ok(json_reply(StatusCode::OK, &r))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PayBody {
    reservation_id: Uuid,
}

pub async fn pay(api: Api, auth: Option<String>, key: Option<String>, body: Body) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let key = idempotency::validate_key(key.as_deref())?;
    let b: PayBody = parse(&body?)?;
    let paid = payment::pay(&api.pool, &api.payments, &api.topics, user, &key, b.reservation_id).await?;
    if let Some(schedule) = paid.schedule_id {
        // The buyer's queue place is freed for the next person; if Redis is unavailable the idle
        // timeout frees it instead, so a failure here is only logged.
        if let Err(e) = api.queue.leave(schedule, user).await {
            tracing::warn!(error = %e, "could not free queue place after payment");
        }
    }
    Ok(json_reply(StatusCode::from_u16(paid.status).unwrap_or(StatusCode::CREATED), &paid.body))
}

pub async fn refund(id: String, api: Api, auth: Option<String>, key: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let key = idempotency::validate_key(key.as_deref())?;
    let id = path_id(&id, "reservation")?;
    let r = refund::refund(&api.pool, &api.topics, user, &key, id, api.refund_cutoff).await?;
    Ok(json_reply(StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK), &r.body))
}

pub async fn notifications(api: Api, auth: Option<String>, query: String) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let after = match query_param(&query, "after") {
        None | Some("") => 0,
        Some(v) => v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| Error::invalid("after", "must be a cursor from `next`"))?,
    };
    let limit = match query_param(&query, "limit") {
        None => 50,
        Some(v) => v.parse::<i64>().ok().filter(|n| (1..=200).contains(n)).ok_or_else(|| Error::invalid("limit", "must be 1 to 200"))?,
    };
    let items = notification::list_after(&api.pool, user, after, limit).await?;
    let next = items.last().map(|n| n.cursor.to_string()).or_else(|| (after > 0).then(|| after.to_string()));
    Ok(json_reply(StatusCode::OK, &json!({ "items": items, "next": next })))
}

/// A global stream permit, or `STREAMS_AT_CAPACITY`.
fn stream_permit(api: &Api) -> Result<tokio::sync::OwnedSemaphorePermit> {
    api.stream_permits.clone().try_acquire_owned().map_err(|_| Error::StreamsAtCapacity)
}

/// The SSE reply around a channel fed by a task of its own; the task ends when the client goes
/// away (the channel closes) or the server shuts down.
fn sse_reply(events: tokio::sync::mpsc::Receiver<warp::sse::Event>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).map(Ok::<_, Infallible>);
    warp::sse::reply(warp::sse::keep_alive().interval(Duration::from_secs(15)).stream(stream)).into_response()
}

/// Server-Sent Events: every notification of the user as it becomes visible, with its
/// commit-ordered position as the event id; `Last-Event-ID` resumes after it, on any replica,
/// with no gap and no repeat. The stream reads PostgreSQL only when the feed says this user has
/// something new (no periodic poll).
pub async fn notification_stream(api: Api, auth: Option<String>, last_event_id: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let last = match last_event_id.as_deref().map(str::parse::<i64>) {
        Some(Ok(n)) if n >= 0 => Some(n),
        Some(_) => return Err(Error::invalid("Last-Event-ID", "must be an event id from this stream")),
        None => None,
    };
    // Registered before the first read, so a notification stamped in between still wakes us.
    let sub = api.notifications.subscribe(user, api.max_streams_per_user).map_err(|_| Error::TooManyStreams)?;
    let permit = stream_permit(&api)?;
    let last = match last {
        Some(n) => n,
        None => notification::last_cursor(&api.pool, user).await?,
    };
    let (tx, events) = tokio::sync::mpsc::channel::<warp::sse::Event>(16);
    tokio::spawn(feed_notifications(api, user, last, sub, permit, tx));
    Ok(sse_reply(events))
}

async fn feed_notifications(
    api: Api,
    user: Uuid,
    mut last: i64,
    mut sub: notification::UserSubscription,
    _permit: tokio::sync::OwnedSemaphorePermit,
    tx: tokio::sync::mpsc::Sender<warp::sse::Event>,
) {
    const PAGE: i64 = 100;
    loop {
        // Mark the current wake-up seen before reading, so one arriving during the read is kept;
        // its value is the newest position the feed has told this user of.
        let told = *sub.rx.borrow_and_update();
        match notification::list_after(&api.pool, user, last, PAGE).await {
            Ok(items) if !items.is_empty() => {
                let full = items.len() as i64 == PAGE;
                for n in items {
                    last = n.cursor;
                    let Ok(ev) = warp::sse::Event::default().id(n.cursor.to_string()).event(n.kind.clone()).json_data(&n) else { continue };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                // Read again only when there may be more: a full page, or news beyond what was
                // read. Otherwise wait for the next wake-up (one read per wake-up, not two).
                if full || told > last {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "notification stream read failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = tx.closed() => return,
                    _ = api.shutdown.cancelled() => return,
                }
            }
        }
        tokio::select! {
            r = sub.rx.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
            _ = api.shutdown.cancelled() => return,
        }
    }
}

fn seat_sse(id: i64, kind: &str, data: &impl Serialize) -> Option<warp::sse::Event> {
    warp::sse::Event::default().id(id.to_string()).event(kind).json_data(data).ok()
}

/// Server-Sent Events: the live seat map of a schedule. First a `snapshot` (the whole map, with
/// its position as id), then one `seat` event per change. `Last-Event-ID` resumes after that
/// position on any replica; an id that can no longer be replayed gets a fresh snapshot.
pub async fn seat_stream(id: String, api: Api, last_event_id: Option<String>) -> Result<Response> {
    let schedule = path_id(&id, "schedule")?;
    let permit = stream_permit(&api)?;
    // Subscribed before the first read: whatever the feed publishes from now on reaches us, and
    // what it published before is already visible to the read below.
    let sub = api.seat_map.subscribe(schedule);
    // An id that is not a number cannot be resumed: treat it as too old (fresh snapshot), the
    // way a browser's EventSource expects a stream to recover.
    let resume = last_event_id.as_deref().and_then(|v| v.trim().parse::<i64>().ok()).filter(|n| *n >= 0);
    let mut first = Vec::new();
    let last = match resume {
        Some(after) => {
            catalog::schedule_opens_at(&api.pool, schedule).await?;
            catch_up(&api, schedule, after, &mut first).await?
        }
        None => {
            let snap = seat_map::snapshot(&api.pool, schedule).await?.ok_or(Error::NotFound("schedule"))?;
            first.extend(seat_sse(snap.pos, "snapshot", &snap));
            snap.pos
        }
    };
    metrics::counter!("seat_map_streams_opened_total", "start" => if resume.is_some() { "resume" } else { "snapshot" }).increment(1);
    let (tx, events) = tokio::sync::mpsc::channel::<warp::sse::Event>(64);
    tokio::spawn(feed_seats(api, schedule, last, first, sub, permit, tx));
    Ok(sse_reply(events))
}

/// Appends to `out` the schedule's events after `after` (or a fresh snapshot when they can no
/// longer be replayed); returns the position the stream is now at.
async fn catch_up(api: &Api, schedule: Uuid, after: i64, out: &mut Vec<warp::sse::Event>) -> Result<i64> {
    let mut last = after;
    loop {
        match seat_map::replay(&api.pool, schedule, last, 1000).await? {
            seat_map::Replay::TooOld => {
                let snap = seat_map::snapshot(&api.pool, schedule).await?.ok_or(Error::NotFound("schedule"))?;
                out.extend(seat_sse(snap.pos, "snapshot", &snap));
                metrics::counter!("seat_map_resets_total").increment(1);
                return Ok(snap.pos);
            }
            seat_map::Replay::Events(events) => {
                let full = events.len() == 1000;
                for e in events {
                    last = e.pos;
                    out.extend(seat_sse(e.pos, "seat", &e));
                }
                if !full {
                    return Ok(last);
                }
            }
        }
    }
}

async fn feed_seats(
    api: Api,
    schedule: Uuid,
    mut last: i64,
    first: Vec<warp::sse::Event>,
    mut sub: seat_map::Subscription,
    _permit: tokio::sync::OwnedSemaphorePermit,
    tx: tokio::sync::mpsc::Sender<warp::sse::Event>,
) {
    for ev in first {
        if tx.send(ev).await.is_err() {
            return;
        }
    }
    loop {
        let next = tokio::select! {
            r = sub.recv() => r,
            _ = tx.closed() => return,
            _ = api.shutdown.cancelled() => return,
        };
        match next {
            // Already sent by the initial read (or a catch-up): positions only grow.
            Ok(e) if e.pos <= last => {}
            Ok(e) => {
                last = e.pos;
                let Some(ev) = seat_sse(e.pos, "seat", &*e) else { continue };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // This watcher alone fell behind: it catches up from PostgreSQL, the others go on.
                metrics::counter!("seat_map_lagged_total").increment(1);
                let mut out = Vec::new();
                match catch_up(&api, schedule, last, &mut out).await {
                    Ok(at) => last = at,
                    Err(e) => {
                        tracing::warn!(error = %e, "seat map catch-up failed; closing the stream so the client resumes");
                        return;
                    }
                }
                for ev in out {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

pub async fn rankings(api: Api, query: String) -> Result<Response> {
    let limit = match query_param(&query, "limit") {
        None => 10,
        Some(v) => v.parse::<usize>().ok().filter(|n| (1..=100).contains(n)).ok_or_else(|| Error::invalid("limit", "must be 1 to 100"))?,
    };
    let items = ranking::top(&api.redis, &api.keys, &api.pool, limit).await?;
    Ok(json_reply(StatusCode::OK, &json!({ "items": items })))
}
