//! One function per route; each names its route in its doc comment.

use std::convert::Infallible;


use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::body;
use super::handlers as h;
use super::Api;
use crate::error::Error;

type Route = BoxedFilter<(Response,)>;
type Auth = Option<String>;

fn with_api(api: &Api) -> impl Filter<Extract = (Api,), Error = Infallible> + Clone {
    let api = api.clone();
    warp::any().map(move || api.clone())
}

fn auth() -> impl Filter<Extract = (Auth,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
}

fn done(r: Result<Response, Error>) -> Response {
    r.unwrap_or_else(|e| e.to_response())
}

/// Every route, with request metrics and JSON rejections.
pub fn routes(api: Api) -> BoxedFilter<(Response,)> {
    let health = crate::telemetry::health_route(api.health.clone()).boxed();
    let all = create_user(&api)
        .or(points(&api)).unify()
        .or(charge(&api)).unify()
        .or(history(&api)).unify()
        .or(create_concert(&api)).unify()
        .or(concerts(&api)).unify()
        .or(schedules(&api)).unify()
        .or(seats(&api)).unify()
        .or(seat_stream(&api)).unify()
        .or(enter_queue(&api)).unify()
        .or(queue_me(&api)).unify()
        .or(hold(&api)).unify()
        .or(get_reservation(&api)).unify()
        .or(cancel_reservation(&api)).unify()
        .or(pay(&api)).unify()
        .or(refund(&api)).unify()
        .or(notifications(&api)).unify()
        .or(notification_stream(&api)).unify()
        .or(rankings(&api)).unify()
        .or(my_reservations(&api)).unify()
        .or(admin_queue(&api)).unify()
        .or(admin_queue_patch(&api)).unify()
        .or(openapi()).unify()
        .or(super::web::routes()).unify()
        .or(health).unify()
        .or(unmatched()).unify()
        .boxed();
    all.recover(recover)
        .unify()
        .with(super::with_metrics())
        .map(Reply::into_response)
        .boxed()
}

/// POST /v1/users
fn create_user(api: &Api) -> Route {
    warp::path!("v1" / "users").and(warp::post()).and(with_api(api)).and(body::limited())
        .then(h::create_user).map(done).boxed()
}

/// GET /v1/users/me/points
fn points(api: &Api) -> Route {
    warp::path!("v1" / "users" / "me" / "points").and(warp::get()).and(with_api(api)).and(auth())
        .then(h::points).map(done).boxed()
}

/// POST /v1/users/me/points/charges
fn charge(api: &Api) -> Route {
    warp::path!("v1" / "users" / "me" / "points" / "charges").and(warp::post()).and(with_api(api)).and(auth())
        .and(warp::header::optional::<String>("idempotency-key")).and(body::limited())
        .then(h::charge).map(done).boxed()
}

/// GET /v1/users/me/points/history
fn history(api: &Api) -> Route {
    warp::path!("v1" / "users" / "me" / "points" / "history").and(warp::get()).and(with_api(api)).and(auth())
        .then(h::history).map(done).boxed()
}

/// POST /v1/admin/concerts
fn create_concert(api: &Api) -> Route {
    warp::path!("v1" / "admin" / "concerts").and(warp::post()).and(with_api(api)).and(auth()).and(body::limited())
        .then(h::create_concert).map(done).boxed()
}

/// GET /v1/concerts
fn concerts(api: &Api) -> Route {
    warp::path!("v1" / "concerts").and(warp::get()).and(with_api(api)).then(h::concerts).map(done).boxed()
}

/// GET /v1/concerts/{concertId}/schedules
fn schedules(api: &Api) -> Route {
    warp::path!("v1" / "concerts" / String / "schedules").and(warp::get()).and(with_api(api))
        .then(h::schedules).map(done).boxed()
}

/// GET /v1/schedules/{scheduleId}/seats
fn seats(api: &Api) -> Route {
    warp::path!("v1" / "schedules" / String / "seats").and(warp::get()).and(with_api(api))
        .then(h::seats).map(done).boxed()
}

/// GET /v1/schedules/{scheduleId}/seats/stream (Server-Sent Events)
fn seat_stream(api: &Api) -> Route {
    warp::path!("v1" / "schedules" / String / "seats" / "stream").and(warp::get()).and(with_api(api))
        .and(warp::header::optional::<String>("last-event-id"))
        .then(h::seat_stream).map(done).boxed()
}

/// POST /v1/queue/tokens
fn enter_queue(api: &Api) -> Route {
    warp::path!("v1" / "queue" / "tokens").and(warp::post()).and(with_api(api)).and(auth()).and(body::limited())
        .then(h::enter_queue).map(done).boxed()
}

/// GET /v1/queue/tokens/me
fn queue_me(api: &Api) -> Route {
    warp::path!("v1" / "queue" / "tokens" / "me").and(warp::get()).and(with_api(api)).and(auth())
        .and(warp::header::optional::<String>("x-queue-token"))
        .then(h::queue_me).map(done).boxed()
}

/// POST /v1/reservations
fn hold(api: &Api) -> Route {
    warp::path!("v1" / "reservations").and(warp::post()).and(with_api(api)).and(auth())
        .and(warp::header::optional::<String>("x-queue-token"))
        .and(warp::header::optional::<String>("idempotency-key")).and(body::limited())
        .then(h::hold).map(done).boxed()
}

/// GET /v1/users/me/reservations?status=&after=cursor
fn my_reservations(api: &Api) -> Route {
    warp::path!("v1" / "users" / "me" / "reservations").and(warp::get()).and(with_api(api)).and(auth())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .then(h::my_reservations).map(done).boxed()
}

/// GET /v1/admin/schedules/{scheduleId}/queue
fn admin_queue(api: &Api) -> Route {
    warp::path!("v1" / "admin" / "schedules" / String / "queue").and(warp::get()).and(with_api(api)).and(auth())
        .then(h::admin_queue).map(done).boxed()
}

/// PATCH /v1/admin/schedules/{scheduleId}/queue
fn admin_queue_patch(api: &Api) -> Route {
    warp::path!("v1" / "admin" / "schedules" / String / "queue").and(warp::patch()).and(with_api(api)).and(auth())
        .and(body::limited())
        .then(h::admin_queue_patch).map(done).boxed()
}

/// GET /v1/reservations/{id}
fn get_reservation(api: &Api) -> Route {
    warp::path!("v1" / "reservations" / String).and(warp::get()).and(with_api(api)).and(auth())
        .then(h::get_reservation).map(done).boxed()
}

/// DELETE /v1/reservations/{id}
fn cancel_reservation(api: &Api) -> Route {
    warp::path!("v1" / "reservations" / String).and(warp::delete()).and(with_api(api)).and(auth())
        .then(h::cancel_reservation).map(done).boxed()
}

/// POST /v1/payments
fn pay(api: &Api) -> Route {
    warp::path!("v1" / "payments").and(warp::post()).and(with_api(api)).and(auth())
        .and(warp::header::optional::<String>("idempotency-key")).and(body::limited())
        .then(h::pay).map(done).boxed()
}

/// POST /v1/reservations/{reservationId}/refund
fn refund(api: &Api) -> Route {
    warp::path!("v1" / "reservations" / String / "refund").and(warp::post()).and(with_api(api)).and(auth())
        .and(warp::header::optional::<String>("idempotency-key"))
        .then(h::refund).map(done).boxed()
}

/// GET /v1/users/me/notifications?after=cursor
fn notifications(api: &Api) -> Route {
    warp::path!("v1" / "users" / "me" / "notifications").and(warp::get()).and(with_api(api)).and(auth())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .then(h::notifications).map(done).boxed()
}

/// GET /v1/users/me/notifications/stream (Server-Sent Events)
fn notification_stream(api: &Api) -> Route {
    warp::path!("v1" / "users" / "me" / "notifications" / "stream").and(warp::get()).and(with_api(api)).and(auth())
        .and(warp::header::optional::<String>("last-event-id"))
        .then(h::notification_stream).map(done).boxed()
}

/// GET /v1/rankings/schedules?limit=10
fn rankings(api: &Api) -> Route {
    warp::path!("v1" / "rankings" / "schedules").and(warp::get()).and(with_api(api))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .then(h::rankings).map(done).boxed()
}

/// GET /openapi.yaml
fn openapi() -> Route {
    warp::path!("openapi.yaml").and(warp::get())
        .map(|| warp::reply::with_header(super::OPENAPI, "content-type", "application/yaml").into_response())
        .boxed()
}

/// Remembers the path of a request no route took, so `recover` can tell 404 from 405 and name the
/// allowed methods.
#[derive(Debug)]
struct Unmatched(String);
impl warp::reject::Reject for Unmatched {}

fn unmatched() -> Route {
    warp::path::full()
        .and_then(|p: warp::path::FullPath| async move { Err::<Response, _>(warp::reject::custom(Unmatched(p.as_str().to_string()))) })
        .boxed()
}

/// Turns warp's own rejections into the error JSON of the brief.
async fn recover(r: Rejection) -> Result<Response, Rejection> {
    let allow = r.find::<Unmatched>().and_then(|u| super::allowed_methods(&super::route_label(&u.0)));
    let (status, code, message) = if let Some(e) = r.find::<warp::reject::InvalidHeader>() {
        (StatusCode::BAD_REQUEST, "INVALID_INPUT", format!("{}: invalid header value", e.name()))
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "request body is larger than 64 KiB".to_string())
    } else if r.find::<warp::reject::InvalidQuery>().is_some() {
        (StatusCode::BAD_REQUEST, "INVALID_INPUT", "invalid query string".to_string())
    } else if let Some(methods) = allow {
        let body = serde_json::json!({"error": {"code": "METHOD_NOT_ALLOWED", "message": format!("this route answers {methods}")}});
        let reply = warp::reply::with_status(warp::reply::json(&body), StatusCode::METHOD_NOT_ALLOWED);
        return Ok(warp::reply::with_header(reply, "allow", methods).into_response());
    } else {
        (StatusCode::NOT_FOUND, "NOT_FOUND", "no such route".to_string())
    };
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    Ok(warp::reply::with_status(warp::reply::json(&body), status).into_response())
}

