//! Logs, metrics and the operations endpoint (`/metrics`, `/health`) every daemon serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use warp::Filter;

use crate::health::{Check, Health};
use crate::kafka::Topics;

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

/// What every daemon does first: structured logs, the Prometheus recorder with this daemon's
/// metrics described, and a shutdown token cancelled by SIGTERM/SIGINT.
pub fn start(daemon: Daemon, log_json: bool, topic_prefix: &str) -> (PrometheusHandle, tokio_util::sync::CancellationToken) {
    init_logging(log_json);
    let metrics = install_metrics();
    describe_metrics(daemon, topic_prefix);
    (metrics, crate::shutdown::on_signal())
}

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

/// The daemon a process runs; selects the series [`describe_metrics`] registers at zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    Api,
    DelayScheduler,
    Expirer,
    Worker,
}

/// The expirer's paths to an expired hold (`expiry_*{path}`); the api has one more,
/// `hold_takeover`: it ends a stale hold when the seat is held again.
const EXPIRY_PATHS: &[&str] = &["pipeline", "sweeper", "legacy"];
/// `payments_total{outcome}`: a confirmation or the refusal's error code (`payment.rs`).
const PAYMENT_OUTCOMES: &[&str] = &["confirmed", "RESERVATION_EXPIRED", "NOT_HELD", "INSUFFICIENT_POINTS"];
/// `notifications_stored_total{type}`: the worker's known notification types.
const NOTIFICATION_TYPES: &[&str] = &["PAYMENT_CONFIRMED", "RESERVATION_EXPIRED", "QUEUE_POSITION", "QUEUE_ACTIVATED", "PAYMENT_REFUNDED"];
/// `refunds_total{outcome}`: a refund or the refusal's error code (`refund.rs`).
const REFUND_OUTCOMES: &[&str] = &["refunded", "NOT_CONFIRMED", "REFUND_WINDOW_CLOSED"];

/// Describes every metric of the catalogue (README "Metrics") and registers, at zero, the
/// counters `daemon` produces, with the label values known at start.
///
/// The exporter renders a metric only once it was touched, so without this a counter that has
/// not counted yet is absent: a dashboard panel stays empty, and worse, an alert on
/// `increase(x[10m]) > 0` misses the first event, because a series born at 1 has no increase.
/// Gauges are not registered (a made-up 0 would be a lie: `dependency_up 0` pages); they are set
/// by the code that measures them. Histograms are only described: an empty histogram is not
/// rendered by the exporter, and recording a fake sample would distort it.
pub fn describe_metrics(daemon: Daemon, topic_prefix: &str) {
    use metrics::{describe_counter, describe_gauge, describe_histogram};

    // HTTP (api).
    describe_counter!("http_requests_total", "HTTP requests served, by route, method and status");
    describe_histogram!("http_request_duration_seconds", Unit::Seconds, "HTTP request latency, by route, method and status");
    // Booking (api).
    describe_counter!("holds_total", "Seat hold attempts, by outcome (held, unavailable, limit: the seats-per-user limit, replayed: an Idempotency-Key retry answered from its stored reply)");
    describe_counter!("payments_total", "Payments confirmed, or refused by error code (outcome)");
    describe_counter!("cancellations_total", "Holds cancelled by their user");
    describe_counter!("refunds_total", "Refunds made, or refused by error code (outcome)");
    describe_counter!("users_created_total", "Users created");
    describe_counter!("points_charged_total", "Points charged to balances");
    // Waiting queue (api).
    describe_gauge!("queue_waiting", "Users waiting in the queue, by schedule");
    describe_gauge!("queue_active", "Users admitted and allowed to book, by schedule");
    describe_counter!("queue_entries_total", "Users entering a waiting queue (first entry per user and schedule)");
    describe_counter!("queue_admitted_total", "Users admitted from the waiting queue");
    describe_gauge!("queue_admission_paused", "1 while an operator has paused admission of the schedule's queue, by schedule");
    describe_gauge!("seat_map_channels", "Schedules with at least one open seat-map stream on this api");
    describe_counter!("seat_map_streams_opened_total", "Seat-map streams opened, by start (snapshot, resume from Last-Event-ID)");
    describe_counter!("seat_map_resets_total", "Seat-map streams told to start over from a snapshot (their position was pruned)");
    describe_counter!("seat_map_lagged_total", "Seat-map streams that fell behind the feed and caught up from PostgreSQL");
    describe_histogram!("queue_admission_tick_seconds", Unit::Seconds, "One admission tick over every listed schedule (8 schedules stepped at once), on the api holding the admission lease");
    describe_gauge!("queue_schedules", "Schedules whose queue the admission tick walks (an idle queue leaves the walk)");
    // Outbox (api, expirer).
    describe_gauge!("outbox_backlog", "Outbox events not yet published to Kafka");
    describe_gauge!("outbox_oldest_unpublished_age_seconds", Unit::Seconds, "Age of the oldest unpublished outbox event (0 when none)");
    describe_counter!("outbox_published_total", "Outbox events published to Kafka");
    describe_counter!("outbox_publish_failures_total", "Outbox relay batches in which a publish failed");
    describe_gauge!("outbox_set_aside", "Outbox events set aside because Kafka refused them for good (message too large, unknown topic); counted up to 10,000");
    describe_counter!("outbox_set_aside_total", "Outbox events set aside because Kafka refused them for good");
    describe_counter!("queue_vacuums_total", "VACUUMs of a table read as a queue (notification_deliveries) run by the process that marked its rows done, by table");
    describe_histogram!("payment_group_size", "Payments written by one statement and one commit (payment::GroupCommit)");
    describe_histogram!("hold_group_size", "Holds written by one statement and one commit (reservation::HoldGroup)");
    describe_histogram!("outbox_relay_step_seconds", Unit::Seconds, "Time of one relay step that held the relay lock, by outcome (published: read, send, Kafka's acks, delete, commit; idle: found nothing; failed: Kafka refused or timed out)");
    describe_counter!("outbox_producer_rebuilds_total", "Outbox producers replaced after a fatal error of the idempotent producer");
    // Delay scheduler.
    describe_gauge!("scheduler_due_size", "Holds waiting in the scheduler's Redis set for their expiry, by shard");
    describe_gauge!("scheduler_inflight_size", "Holds claimed but not yet acknowledged by Kafka, by shard");
    describe_counter!("scheduler_scheduled_total", "reservation.created messages scheduled (added to the Redis set)");
    describe_counter!("scheduler_claimed_total", "Due holds claimed for the first time");
    describe_counter!("scheduler_reclaimed_total", "Holds claimed again after their lease ran out");
    describe_counter!("scheduler_published_total", "reservation.expiration messages acknowledged by Kafka");
    describe_counter!("scheduler_publish_failures_total", "reservation.expiration sends that failed (not queued, refused, timed out); the hold went straight back to the due set");
    describe_counter!("scheduler_rearmed_total", "HELD holds missing from Redis, added back from PostgreSQL");
    describe_counter!("scheduler_cancelled_total", "Holds removed from the scheduler because they were paid or cancelled");
    describe_histogram!("scheduler_rearm_seconds", Unit::Seconds, "Time one re-arm of shards from PostgreSQL took");
    describe_histogram!("scheduler_publish_lateness_seconds", Unit::Seconds, "Kafka acknowledgement time of reservation.expiration minus expiresAt");
    // Expiry (expirer; hold_takeover in the api).
    describe_histogram!("expiry_lateness_seconds", Unit::Seconds, "expiredAt minus expiresAt, by path (pipeline, sweeper, legacy)");
    describe_histogram!("expiry_message_lateness_seconds", Unit::Seconds, "Broker append time of reservation.expiration minus expiresAt");
    describe_counter!("expiry_transitions_total", "Expiry updates that turned a HELD hold EXPIRED, by path");
    describe_counter!("expiry_already_final_total", "Expiry updates that found the hold already final, by path");
    describe_counter!("expiry_early_total", "reservation.expiration messages that arrived before expiresAt by PostgreSQL's clock; the hold was put back to the scheduler");
    describe_counter!("sweeper_caught_total", "Holds only the sweeper caught (the pipeline missed them; should stay 0)");
    // Worker.
    describe_counter!("notifications_stored_total", "Notification requests consumed, by type and outcome (stored, duplicate)");
    describe_counter!("notification_announcements_total", "NOTIFY payloads announcing stored notifications to the api's streams (one per stored batch of up to 100 users)");
    describe_counter!("notifications_delivered_total", "Notifications delivered on the channel");
    describe_counter!("notifications_delivery_failures_total", "Notification delivery attempts that failed (retried with backoff)");
    describe_counter!("ranking_increments_total", "Ranking increments from payment.completed");
    describe_counter!("ranking_decrements_total", "Ranking decrements from payment.refunded");
    describe_counter!("ranking_rebuilds_total", "Rankings rebuilt from PostgreSQL because Redis had lost them");
    describe_counter!("ranking_corrections_total", "Payments and refunds the periodic reconcile applied that the ranking had lost (or the consumer had not reached after 30 s)");
    describe_gauge!("ranking_remembered_payments", "Members of the ranking's counted and refunded sets, by set (pruned after --ranking-retention)");
    describe_counter!("retention_pruned_rows_total", "Rows deleted past their retention, by table (outbox, idempotency_keys, processed_events)");
    describe_gauge!("retained_rows", "Rows of the tables under retention, by table (the planner's estimate)");
    describe_counter!("exports_total", "Payments exported to the data platform");
    // Kafka consumers.
    describe_counter!("kafka_messages_processed_total", "Messages handled successfully, by consumer and topic");
    describe_histogram!("kafka_batch_messages", "Messages handed to the handler at once (what was already fetched), by consumer");
    describe_histogram!("kafka_batch_seconds", "Time to handle one batch, by consumer: batch size over batch time is what it keeps up with");
    describe_counter!("kafka_handler_retries_total", "Transient handler failures retried, by consumer");
    describe_counter!("kafka_consume_errors_total", "Errors receiving from Kafka, by consumer");
    describe_counter!("kafka_dead_letters_total", "Messages sent to <topic>.dlq, by source topic");
    describe_histogram!("stream_feed_step_seconds", Unit::Seconds, "Time of one step of the api's stream feed that found something (probe, stamp, fan-out)");
    describe_counter!("stream_positions_stamped_total", "Stream events given their commit-ordered position by the sequencer, by stream (`seat`, `notification`)");
    describe_gauge!("kafka_consumer_lag", "Messages behind the partition end, by group, topic and partition (rdkafka statistics)");
    // Every daemon.
    describe_gauge!("dependency_up", "1 when the last health check of the dependency succeeded, else 0");
    describe_counter!("health_checks_total", "Dependency checks actually run (a burst of /health probes shares one; its answer is reused for 1 s)");

    let zero = |name: &'static str| metrics::counter!(name).increment(0);
    zero("health_checks_total");
    let topics = Topics::new(topic_prefix);
    let consumer = |name: &'static str, consumed: &[&String]| {
        metrics::counter!("kafka_handler_retries_total", "consumer" => name).increment(0);
        metrics::counter!("kafka_consume_errors_total", "consumer" => name).increment(0);
        for topic in consumed {
            metrics::counter!("kafka_messages_processed_total", "consumer" => name, "topic" => (*topic).clone()).increment(0);
            metrics::counter!("kafka_dead_letters_total", "topic" => (*topic).clone()).increment(0);
        }
    };
    match daemon {
        Daemon::Api => {
            for outcome in ["held", "unavailable", "limit", "replayed"] {
                metrics::counter!("holds_total", "outcome" => outcome).increment(0);
            }
            for outcome in PAYMENT_OUTCOMES {
                metrics::counter!("payments_total", "outcome" => *outcome).increment(0);
            }
            for outcome in REFUND_OUTCOMES {
                metrics::counter!("refunds_total", "outcome" => *outcome).increment(0);
            }
            for name in ["cancellations_total", "users_created_total", "points_charged_total", "queue_entries_total", "queue_admitted_total"] {
                zero(name);
            }
            zero("outbox_published_total");
            zero("outbox_publish_failures_total");
            zero("outbox_set_aside_total");
            zero("outbox_producer_rebuilds_total");
            metrics::counter!("expiry_transitions_total", "path" => "hold_takeover").increment(0);
            for start in ["snapshot", "resume"] {
                metrics::counter!("seat_map_streams_opened_total", "start" => start).increment(0);
            }
            zero("seat_map_resets_total");
            zero("seat_map_lagged_total");
            metrics::gauge!("seat_map_channels").set(0.0);
        }
        Daemon::DelayScheduler => {
            for name in [
                "scheduler_scheduled_total",
                "scheduler_claimed_total",
                "scheduler_reclaimed_total",
                "scheduler_published_total",
                "scheduler_publish_failures_total",
                "scheduler_rearmed_total",
                "scheduler_cancelled_total",
            ] {
                zero(name);
            }
            // The consumer names are those given to `ConsumerRunner::new` in `app.rs`.
            consumer("delay-scheduler", &[&topics.reservation_created, &topics.payment_completed, &topics.reservation_cancelled]);
        }
        Daemon::Expirer => {
            zero("outbox_published_total");
            zero("outbox_publish_failures_total");
            zero("outbox_set_aside_total");
            zero("outbox_producer_rebuilds_total");
            zero("sweeper_caught_total");
            zero("expiry_early_total");
            for path in EXPIRY_PATHS {
                metrics::counter!("expiry_transitions_total", "path" => *path).increment(0);
            }
            // The sweeper expires in one statement and counts no "already final".
            for path in ["pipeline", "legacy"] {
                metrics::counter!("expiry_already_final_total", "path" => path).increment(0);
            }
            consumer("expirer", &[&topics.reservation_expiration]);
        }
        Daemon::Worker => {
            for kind in NOTIFICATION_TYPES {
                for outcome in ["stored", "duplicate"] {
                    metrics::counter!("notifications_stored_total", "type" => *kind, "outcome" => outcome).increment(0);
                }
            }
            for name in ["notification_announcements_total", "notifications_delivered_total", "notifications_delivery_failures_total", "ranking_increments_total", "ranking_decrements_total", "ranking_rebuilds_total", "ranking_corrections_total", "exports_total"] {
                zero(name);
            }
            metrics::counter!("queue_vacuums_total", "table" => "notification_deliveries").increment(0);
            for table in crate::retention::Table::ALL {
                metrics::counter!("retention_pruned_rows_total", "table" => table.name()).increment(0);
            }
            consumer("worker-notifications", &[&topics.notification_request]);
            consumer("worker-payments", &[&topics.payment_completed, &topics.payment_refunded]);
        }
    }
}

/// How often `dependency_up` is refreshed when nothing calls `/health`.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` and `GET /health` on `listener` until `shutdown` is cancelled, and keeps
/// `dependency_up` current by checking the dependencies every [`HEALTH_PROBE_INTERVAL`] (so the
/// gauge exists, and the `DependencyDown` alert works, even where no probe calls `/health`).
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let probe = tokio::spawn(probe_health(health.clone(), shutdown.clone()));
    let routes = ops_routes(metrics, health);
    warp::serve(routes)
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
    let _ = probe.await;
}

async fn probe_health(health: Arc<Health>, shutdown: CancellationToken) {
    loop {
        let checks = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = health.check() => c,
        };
        for (name, c) in checks {
            metrics::gauge!("dependency_up", "dependency" => name).set(if c == Check::Ok { 1.0 } else { 0.0 });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_PROBE_INTERVAL) => {}
        }
    }
}

/// The `/metrics` and `/health` routes of the operations listener (`--metrics-addr`).
pub fn ops_routes(
    metrics: PrometheusHandle,
    health: Arc<Health>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    let m = warp::path!("metrics").and(warp::get()).map(move || {
        use warp::Reply;
        warp::reply::with_header(metrics.render(), "content-type", "text/plain; version=0.0.4")
            .into_response()
    });
    m.or(health_route(health)).unify()
}

/// `/health` alone: the api also serves it on its public listener, for load balancers. Its body
/// names each dependency's state only, never a driver's error text (that goes to the log).
/// `/metrics` is not public (issue 15, item 12): series name schedules, queues and error rates
/// an outsider has no business reading.
pub fn health_route(health: Arc<Health>) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    warp::path!("health").and(warp::get()).then(move || {
        let health = health.clone();
        async move { health.reply().await }
    })
}

/// Binds the operations listener given by a flag.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
