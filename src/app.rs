//! Wiring of each daemon: connects the resources named by the flags, then runs the daemon's
//! tasks until shutdown. The `run_*` entry points take ready resources, so tests start the same
//! daemons against their own database, key prefix and topics.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::producer::{FutureProducer, Producer};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Common;
use crate::expiry::{self, ExpirationHandler};
use crate::health::Health;
use crate::kafka::{self, consumer_config, ConsumerRunner, Topics};
use crate::keys::Keys;
use crate::outbox::Relay;
use crate::queue::{Queue, QueueConfig};
use crate::redis_conn::RedisConn;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerHandler};

/// Why a daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Connections shared by a daemon's tasks.
#[derive(Clone)]
pub struct Resources {
    pub pool: PgPool,
    pub redis: RedisConn,
    pub producer: FutureProducer,
    pub brokers: String,
    pub keys: Keys,
    pub topics: Topics,
    pub replication_factor: i32,
}

impl Resources {
    /// Connects everything named by the common flags and applies pending migrations.
    pub async fn connect(c: &Common, client_id: &str) -> Result<Self, StartError> {
        Self::connect_warmed(c, client_id, &[]).await
    }

    /// Like [`Resources::connect`], and each PostgreSQL connection runs `warm` when opened (see
    /// [`crate::db::connect_warmed`]).
    pub async fn connect_warmed(c: &Common, client_id: &str, warm: &'static [crate::db::Warm]) -> Result<Self, StartError> {
        let pool = if warm.is_empty() {
            let pool = crate::db::connect(&c.database_url, c.db_max_connections).await?;
            crate::db::migrate(&pool).await?;
            pool
        } else {
            // The warm-ups run against the schema, so it is migrated first, on a connection of its
            // own: the pool opens its first connection at once, and that one would stay cold.
            let first = crate::db::connect(&c.database_url, 1).await?;
            crate::db::migrate(&first).await?;
            first.close().await;
            crate::db::connect_warmed(&c.database_url, c.db_max_connections, warm).await?
        };
        let redis = RedisConn::connect(&c.redis_url).await?;
        let producer = kafka::producer(&c.kafka_brokers, client_id)?;
        Ok(Self {
            pool,
            redis,
            producer,
            brokers: c.kafka_brokers.clone(),
            keys: Keys::new(c.redis_prefix.clone()),
            topics: Topics::new(&c.topic_prefix),
            replication_factor: c.replication_factor,
        })
    }

    /// Health checks over these connections.
    pub fn health(&self) -> Arc<Health> {
        Arc::new(Health::new(Some(self.pool.clone()), Some(self.redis.clone()), Some((self.producer.clone(), &self.topics))))
    }

    /// Creates the topics, retrying until Kafka answers or `shutdown`.
    pub async fn ensure_topics(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = Duration::from_millis(200);
        loop {
            match kafka::bootstrap_topics(&self.brokers, &self.topics, self.replication_factor).await {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "creating topics failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Builds producers like the one of [`Resources::connect`], for the outbox relay to replace
    /// its producer after a fatal error.
    pub fn producer_factory(&self, client_id: &str) -> crate::outbox::ProducerFactory {
        let (brokers, client_id) = (self.brokers.clone(), client_id.to_string());
        Arc::new(move || kafka::producer(&brokers, &client_id))
    }

    /// Relays the outbox once the topics exist: a row for a topic not created yet would be
    /// refused as "unknown topic" and set aside. Kafka being down delays both alike.
    async fn relay_outbox(self, relay: Relay, shutdown: CancellationToken) {
        if self.ensure_topics(&shutdown).await {
            relay.run(shutdown).await;
        }
    }

    /// Flushes the producer so every acknowledged-in-memory message reaches the broker.
    pub fn flush(&self) {
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "producer flush failed");
        }
    }
}

/// What each of the api's PostgreSQL connections runs once when opened: the statements of a
/// sale's spike, the hold and the payment (see [`crate::db::connect_warmed`]).
pub const API_WARM: &[crate::db::Warm] = &[crate::reservation::warm, crate::payment::warm];

/// Settings of the api daemon.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub hold_ttl: Duration,
    /// Refunds close this long before a schedule starts.
    pub refund_cutoff: Duration,
    /// Most live seats one user may have in one schedule (`--max-seats-per-user`).
    pub max_seats_per_user: u32,
    pub admin_token: String,
    pub queue: QueueConfig,
    pub outbox_batch: i64,
    pub outbox_poll: Duration,
    /// The live streams' feed and caps.
    pub streams: crate::sequencer::StreamSettings,
}

/// Runs the api: HTTP on `listener`, the outbox relay, queue admission and the feed of the live streams.
pub async fn run_api(res: Resources, s: ApiSettings, listener: TcpListener, ops: Option<TcpListener>, metrics: PrometheusHandle, shutdown: CancellationToken) {
    let queue = Queue::new(res.redis.clone(), res.keys.clone(), s.queue.clone());
    let notifications = crate::notification::NotificationHub::default();
    let seat_map = crate::seat_map::SeatHub::default();
    let health = res.health();
    let api = Arc::new(crate::http::ApiState {
        pool: res.pool.clone(),
        redis: res.redis.clone(),
        keys: res.keys.clone(),
        topics: res.topics.clone(),
        queue: queue.clone(),
        hold_ttl: s.hold_ttl,
        refund_cutoff: s.refund_cutoff,
        max_seats_per_user: s.max_seats_per_user,
        admin_token: s.admin_token.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        notifications: notifications.clone(),
        seat_map: seat_map.clone(),
        stream_permits: Arc::new(tokio::sync::Semaphore::new(s.streams.max_streams)),
        max_streams_per_user: s.streams.max_streams_per_user,
        shutdown: shutdown.clone(),
        sessions: Default::default(),
        payments: crate::payment::GroupCommit::start(res.pool.clone()),
        holds: crate::reservation::HoldGroup::start(res.pool.clone()),
        opening_times: Default::default(),
        hold_gate: Default::default(),
    });
    let relay = Relay::new(res.pool.clone(), res.producer.clone(), s.outbox_batch, s.outbox_poll).rebuild_with(res.producer_factory("api"));
    let tasks = vec![
        // Topics are created in the background: the api takes bookings even while Kafka is down.
        tokio::spawn(res.clone().relay_outbox(relay, shutdown.clone())),
        tokio::spawn(queue.run_admission(res.pool.clone(), res.topics.clone(), shutdown.clone())),
        tokio::spawn(crate::sequencer::Feed::new(res.pool.clone(), seat_map, notifications, s.streams.clone()).run(shutdown.clone())),
        tokio::spawn(serve_ops_opt(ops, metrics, health, shutdown.clone())),
    ];
    crate::http::serve(api, listener).await;
    for t in tasks {
        let _ = t.await;
    }
    res.flush();
    tracing::info!("api stopped");
}

async fn serve_ops_opt(ops: Option<TcpListener>, metrics: PrometheusHandle, health: Arc<Health>, shutdown: CancellationToken) {
    if let Some(l) = ops {
        crate::telemetry::serve_ops(l, metrics, health, shutdown).await;
    }
}

/// Runs the delay scheduler: the consumer that feeds and cancels, and the shard loops.
pub async fn run_scheduler(res: Resources, cfg: SchedulerConfig, group: &str, ops: TcpListener, metrics: PrometheusHandle, shutdown: CancellationToken) -> Result<(), StartError> {
    let health = res.health();
    let ops_task = tokio::spawn(crate::telemetry::serve_ops(ops, metrics, health, shutdown.clone()));
    if res.ensure_topics(&shutdown).await {
        let t = &res.topics;
        let runner = ConsumerRunner::new(
            &consumer_config(&res.brokers, group),
            &[&t.reservation_created, &t.payment_completed, &t.reservation_cancelled],
            res.producer.clone(),
            "delay-scheduler",
        )?;
        let scheduler = Arc::new(Scheduler::new(res.redis.clone(), res.keys.clone(), res.producer.clone(), res.topics.clone(), cfg));
        let loops = tokio::spawn(scheduler.clone().run(res.pool.clone(), runner.assignment(), shutdown.clone()));
        let handler = SchedulerHandler { scheduler };
        runner.run(&handler, shutdown.clone()).await;
        let _ = loops.await;
    }
    res.flush();
    let _ = ops_task.await;
    tracing::info!("delay-scheduler stopped");
    Ok(())
}

/// How the expirer finds holds to expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExpirerMode {
    /// Method 2: consume `reservation.expiration`, with the sweeper as a safety net.
    After,
    /// The design document's old way: scan every `--legacy-interval`, update row by row.
    Before,
}

/// Settings of the expirer daemon.
#[derive(Clone, Debug)]
pub struct ExpirerSettings {
    pub mode: ExpirerMode,
    pub sweep_interval: Duration,
    pub sweep_grace: Duration,
    pub sweep_batch: i64,
    pub legacy_interval: Duration,
    pub outbox_batch: i64,
    pub outbox_poll: Duration,
}

/// Runs the expirer in its mode, plus an outbox relay for the notifications it writes.
pub async fn run_expirer(res: Resources, s: ExpirerSettings, group: &str, ops: TcpListener, metrics: PrometheusHandle, shutdown: CancellationToken) -> Result<(), StartError> {
    let health = res.health();
    let ops_task = tokio::spawn(crate::telemetry::serve_ops(ops, metrics, health, shutdown.clone()));
    let relay = Relay::new(res.pool.clone(), res.producer.clone(), s.outbox_batch, s.outbox_poll).rebuild_with(res.producer_factory("expirer"));
    let relay_task = tokio::spawn(res.clone().relay_outbox(relay, shutdown.clone()));
    match s.mode {
        ExpirerMode::Before => {
            let (pool, topics) = (res.pool.clone(), res.topics.clone());
            expiry::every(s.legacy_interval, "legacy-scan", shutdown.clone(), move || {
                let (pool, topics) = (pool.clone(), topics.clone());
                async move { expiry::legacy_scan(&pool, &topics).await }
            })
            .await;
        }
        ExpirerMode::After => {
            let (pool, topics) = (res.pool.clone(), res.topics.clone());
            let (grace, batch) = (s.sweep_grace, s.sweep_batch);
            let sweeper = tokio::spawn(expiry::every(s.sweep_interval, "sweeper", shutdown.clone(), move || {
                let (pool, topics) = (pool.clone(), topics.clone());
                async move { expiry::sweep(&pool, &topics, grace, batch).await }
            }));
            if res.ensure_topics(&shutdown).await {
                let runner = ConsumerRunner::new(
                    &consumer_config(&res.brokers, group),
                    &[&res.topics.reservation_expiration],
                    res.producer.clone(),
                    "expirer",
                )?;
                let handler = ExpirationHandler { pool: res.pool.clone(), topics: res.topics.clone(), redis: res.redis.clone(), keys: res.keys.clone() };
                runner.run(&handler, shutdown.clone()).await;
            }
            let _ = sweeper.await;
        }
    }
    let _ = relay_task.await;
    res.flush();
    let _ = ops_task.await;
    tracing::info!("expirer stopped");
    Ok(())
}

/// Settings of the worker daemon.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub channel: crate::worker::Channel,
    pub sink: crate::export::Sink,
    pub delivery_poll: Duration,
    pub delivery_batch: i64,
    pub delivery_max_backoff: Duration,
    /// How often the ranking is checked against PostgreSQL (rebuilt if Redis lost it).
    pub ranking_reconcile: crate::worker::ReconcileEvery,
    /// What the ranking remembers and how far back its reconcile looks.
    pub ranking_retention: crate::ranking::Retention,
    /// Retention of the outbox, idempotency keys and processed events.
    pub retention: crate::retention::Settings,
}

/// Runs the worker: the notification and payment consumer groups and the delivery loop.
pub async fn run_worker(res: Resources, s: WorkerSettings, group_prefix: &str, ops: TcpListener, metrics: PrometheusHandle, shutdown: CancellationToken) -> Result<(), StartError> {
    use crate::worker::{Deliverer, NotificationHandler, PaymentHandler};
    let health = res.health();
    let ops_task = tokio::spawn(crate::telemetry::serve_ops(ops, metrics, health, shutdown.clone()));
    let deliverer = Deliverer { pool: res.pool.clone(), channel: s.channel.clone(), batch: s.delivery_batch, max_backoff: s.delivery_max_backoff };
    let (handoff, inbox) = deliverer.handoff();
    let delivery = tokio::spawn(deliverer.run_with(Some(inbox), s.delivery_poll, shutdown.clone()));
    let reconciler = tokio::spawn(crate::worker::run_ranking_reconciler(res.pool.clone(), res.redis.clone(), res.keys.clone(), s.ranking_retention, s.ranking_reconcile, shutdown.clone()));
    let pruner = tokio::spawn(crate::retention::run(res.pool.clone(), s.retention.clone(), shutdown.clone()));
    if res.ensure_topics(&shutdown).await {
        let notes = ConsumerRunner::new(
            &consumer_config(&res.brokers, &format!("{group_prefix}notifications")),
            &[&res.topics.notification_request],
            res.producer.clone(),
            "worker-notifications",
        )?;
        let pays = ConsumerRunner::new(
            &consumer_config(&res.brokers, &format!("{group_prefix}payments")),
            &[&res.topics.payment_completed, &res.topics.payment_refunded],
            res.producer.clone(),
            "worker-payments",
        )?;
        let nh = NotificationHandler { pool: res.pool.clone(), handoff: Some(handoff) };
        let ph = PaymentHandler { pool: res.pool.clone(), redis: res.redis.clone(), keys: res.keys.clone(), sink: s.sink.clone(), ranking: s.ranking_retention };
        tokio::join!(notes.run(&nh, shutdown.clone()), pays.run(&ph, shutdown.clone()));
    }
    let _ = delivery.await;
    let _ = reconciler.await;
    let _ = pruner.await;
    res.flush();
    let _ = ops_task.await;
    tracing::info!("worker stopped");
    Ok(())
}
