//! Plain async functions behind the routes: parse, authenticate, call the domain, shape the reply.

use std::collections::VecDeque;
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

use super::body::parse;
use super::Api;
use crate::error::{Error, Result};
use crate::{catalog, idempotency, notification, payment, points, queue, ranking, reservation, user};

type Body = Result<Bytes, Error>;

fn json_reply<T: Serialize>(status: StatusCode, value: &T) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

fn path_id(raw: &str, what: &'static str) -> Result<Uuid> {
    Uuid::parse_str(raw).map_err(|_| Error::NotFound(what))
}

async fn authed(api: &Api, auth: &Option<String>) -> Result<Uuid> {
    user::authenticate(&api.pool, auth.as_deref()).await
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
    let opens_at = catalog::schedule_opens_at(&api.pool, b.schedule_id).await?;
    let (token, place, new_entry) = api.queue.enter(b.schedule_id, opens_at, user).await?;
    if let Some(seq) = new_entry {
        queue::notify_position(&api.pool, &api.topics, b.schedule_id, user, seq, place.position).await?;
        metrics::counter!("queue_entries_total").increment(1);
    }
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

pub async fn hold(api: Api, auth: Option<String>, token: Option<String>, body: Body) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let b: HoldBody = parse(&body?)?;
    let schedule = reservation::seat_schedule(&api.pool, b.seat_id).await?;
    api.queue.require_active(token.as_deref(), user, schedule).await?;
    let r = reservation::hold(&api.pool, &api.topics, user, b.seat_id, api.hold_ttl).await?;
    Ok(json_reply(StatusCode::CREATED, &r))
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
    let paid = payment::pay(&api.pool, &api.topics, user, &key, b.reservation_id).await?;
    if let Some(schedule) = paid.schedule_id {
        // The buyer's queue place is freed for the next person; if Redis is unavailable the idle
        // timeout frees it instead, so a failure here is only logged.
        if let Err(e) = api.queue.leave(schedule, user).await {
            tracing::warn!(error = %e, "could not free queue place after payment");
        }
    }
    Ok(json_reply(StatusCode::from_u16(paid.status).unwrap_or(StatusCode::CREATED), &paid.body))
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

struct StreamState {
    api: Api,
    user: Uuid,
    last: i64,
    buf: VecDeque<notification::Stored>,
    rx: tokio::sync::broadcast::Receiver<Uuid>,
}

/// Server-Sent Events: every notification of the user as it is stored, with its cursor as the
/// event id; `Last-Event-ID` resumes after that cursor, so a reconnect has no gap and no repeat.
pub async fn notification_stream(api: Api, auth: Option<String>, last_event_id: Option<String>) -> Result<Response> {
    let user = authed(&api, &auth).await?;
    let rx = api.notifications.subscribe();
    let last = match last_event_id.as_deref().map(str::parse::<i64>) {
        Some(Ok(n)) if n >= 0 => n,
        Some(_) => return Err(Error::invalid("Last-Event-ID", "must be an event id from this stream")),
        None => notification::last_cursor(&api.pool, user).await?,
    };
    let state = StreamState { api, user, last, buf: VecDeque::new(), rx };
    // The reader runs as its own task and hands events over a small channel; it stops when the
    // client goes away (the channel closes) or the server shuts down.
    let (tx, events) = tokio::sync::mpsc::channel::<warp::sse::Event>(16);
    tokio::spawn(feed_stream(state, tx));
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).map(Ok::<_, Infallible>);
    Ok(warp::sse::reply(warp::sse::keep_alive().interval(Duration::from_secs(15)).stream(stream)).into_response())
}

async fn feed_stream(mut st: StreamState, tx: tokio::sync::mpsc::Sender<warp::sse::Event>) {
    loop {
        while let Some(n) = st.buf.pop_front() {
            st.last = n.cursor;
            let Ok(ev) = warp::sse::Event::default().id(n.cursor.to_string()).event(n.kind.clone()).json_data(&n) else { continue };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        if st.api.shutdown.is_cancelled() || tx.is_closed() {
            return;
        }
        match notification::list_after(&st.api.pool, st.user, st.last, 100).await {
            Ok(v) if !v.is_empty() => {
                st.buf.extend(v);
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "notification stream read failed"),
        }
        let user = st.user;
        let rx = &mut st.rx;
        let wait_for_user = async {
            loop {
                match rx.recv().await {
                    Ok(u) if u == user => return,
                    Ok(_) => continue,
                    // Lagged: our signal may be among the lost ones; re-read to be sure.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        let shutdown = st.api.shutdown.clone();
        tokio::select! {
            _ = wait_for_user => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => return,
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
