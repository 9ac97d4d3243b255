//! The HTTP API (brief §4) on warp.
//!
//! `filters` has one function per route (the route in its doc comment), `handlers` the plain async
//! functions behind them. Handlers return `Result<Response, Error>`; errors travel as replies and
//! are rendered in one place ([`crate::error::Error::to_response`]). `recover` only turns warp's
//! own rejections (no route, wrong method, body too large) into the same JSON shape.

mod body;
pub mod filters;
pub mod handlers;
mod web;

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::kafka::Topics;
use crate::keys::Keys;
use crate::queue::Queue;

/// The OpenAPI 3 description served at `/openapi.yaml`.
pub const OPENAPI: &str = include_str!("openapi.yaml");

/// Everything a request handler may use, behind one `Arc`: warp hands every request its own
/// handle, and cloning the fields one by one (a dozen reference counts and the strings of the
/// keys and topics) was 5 % of the api's CPU in the queue spike's profile (issue 11).
pub type Api = Arc<ApiState>;

/// The fields of [`Api`].
pub struct ApiState {
    pub pool: PgPool,
    pub redis: crate::redis_conn::RedisConn,
    pub keys: Keys,
    pub topics: Topics,
    pub queue: Queue,
    pub hold_ttl: Duration,
    /// Refunds close this long before a schedule starts.
    pub refund_cutoff: Duration,
    /// Most live seats (HELD or CONFIRMED) one user may have in one schedule.
    pub max_seats_per_user: u32,
    pub admin_token: String,
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    /// Wakes a user's open notification streams (fan-out by user; counts the per-user cap).
    pub notifications: crate::notification::NotificationHub,
    /// One channel per watched schedule for the live seat map.
    pub seat_map: crate::seat_map::SeatHub,
    /// One permit per open stream (seat map or notifications): the global cap.
    pub stream_permits: Arc<tokio::sync::Semaphore>,
    /// Most open notification streams per user on this api.
    pub max_streams_per_user: usize,
    /// Ends open notification streams so a graceful shutdown does not wait on them.
    pub shutdown: CancellationToken,
    /// Group commit of payments.
    pub payments: crate::payment::GroupCommit,
    /// Group commit of holds without a key.
    pub holds: crate::reservation::HoldGroup,
    /// Tokens already resolved by this process.
    pub sessions: crate::user::Sessions,
    /// Schedules' booking opening times already read by this process.
    pub opening_times: crate::catalog::OpeningTimes,
    /// One hold per seat at a time in this process (the seat fight).
    pub hold_gate: crate::hold_gate::HoldGate,
}

/// Serves the API on `listener` until `shutdown`; in-flight requests finish first.
pub async fn serve(api: Api, listener: tokio::net::TcpListener) {
    let shutdown = api.shutdown.clone();
    warp::serve(filters::routes(api))
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
}

/// Route label for metrics: ids replaced by `{id}` so the label set stays small.
pub fn route_label(path: &str) -> String {
    path.split('/')
        .map(|seg| if uuid::Uuid::parse_str(seg).is_ok() { "{id}" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// Records request counts and latency by route, method and status.
pub fn with_metrics() -> warp::log::Log<impl Fn(warp::log::Info<'_>) + Clone> {
    warp::log::custom(|info| {
        let route = route_label(info.path());
        let route = if known_route(&route) { route } else { "other".to_string() };
        let labels = [
            ("route", route),
            ("method", info.method().to_string()),
            ("status", info.status().as_u16().to_string()),
        ];
        metrics::counter!("http_requests_total", &labels).increment(1);
        metrics::histogram!("http_request_duration_seconds", &labels).record(info.elapsed().as_secs_f64());
    })
}

/// Every route served, as `route_label` names it (the OpenAPI test compares this list with the
/// description's paths).
pub const ROUTES: &[&str] = &[
        "/v1/users", "/v1/users/me/points", "/v1/users/me/points/charges", "/v1/users/me/points/history",
        "/v1/admin/concerts", "/v1/concerts", "/v1/concerts/{id}/schedules", "/v1/schedules/{id}/seats",
        "/v1/schedules/{id}/seats/stream",
        "/v1/queue/tokens", "/v1/queue/tokens/me", "/v1/reservations", "/v1/reservations/{id}",
        "/v1/payments", "/v1/users/me/notifications", "/v1/users/me/notifications/stream",
        "/v1/rankings/schedules", "/health", "/openapi.yaml",
        "/v1/reservations/{id}/refund",
        "/", "/app.js", "/style.css",
        "/v1/users/me/reservations", "/v1/admin/schedules/{id}/queue",
];

/// The methods a route answers (the `Allow` header of a 405).
pub fn allowed_methods(route: &str) -> Option<&'static str> {
    Some(match route {
        "/v1/users" | "/v1/users/me/points/charges" | "/v1/admin/concerts" | "/v1/queue/tokens"
        | "/v1/reservations" | "/v1/payments" | "/v1/reservations/{id}/refund" => "POST",
        "/v1/reservations/{id}" => "GET, DELETE",
        "/v1/admin/schedules/{id}/queue" => "GET, PATCH",
        r if ROUTES.contains(&r) => "GET",
        _ => return None,
    })
}

fn known_route(route: &str) -> bool {
    ROUTES.contains(&route)
}

