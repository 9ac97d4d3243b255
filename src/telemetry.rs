//! Logs, metrics and the operations endpoint (`/metrics`, `/health`) every daemon serves.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use warp::Filter;

use crate::health::Health;

/// Starts structured logging; `json` selects JSON lines. `RUST_LOG` refines the filter.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Latency buckets in seconds, from 0.5 ms to 30 s: fine at the bottom because expiry lateness
/// and seat decisions are measured in milliseconds, wide at the top to still show a 10 s legacy scan.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
];

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("valid buckets")
                .install_recorder()
                .expect("installing the Prometheus recorder")
        })
        .clone()
}

/// Serves `GET /metrics` and `GET /health` on `listener` until `shutdown` is cancelled.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let routes = ops_routes(metrics, health);
    warp::serve(routes)
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
}

/// The `/metrics` and `/health` routes, also mounted by the api on its own listener.
pub fn ops_routes(
    metrics: PrometheusHandle,
    health: Arc<Health>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let m = warp::path!("metrics").and(warp::get()).map(move || {
        use warp::Reply;
        warp::reply::with_header(metrics.render(), "content-type", "text/plain; version=0.0.4")
            .into_response()
    });
    let h = warp::path!("health").and(warp::get()).then(move || {
        let health = health.clone();
        async move { health.reply().await }
    });
    m.or(h).unify()
}

/// Binds the operations listener given by a flag.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
