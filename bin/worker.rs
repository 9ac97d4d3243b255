//! `worker`: stores and delivers notifications, updates the ranking, exports payments.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use booking::app::{self, Resources, WorkerSettings};
use booking::config::{duration, Common};
use booking::export::Sink;
use booking::worker::Channel;
use clap::Parser;

/// The worker: consumer groups for `notification.request` and `payment.completed`.
#[derive(Parser, Debug)]
#[command(name = "worker", version)]
struct Cli {
    #[command(flatten)]
    common: Common,

    /// Address serving /metrics and /health.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9104")]
    metrics_addr: SocketAddr,

    /// Prefix of the worker's consumer groups (`<prefix>notifications`, `<prefix>payments`).
    #[arg(long, env = "WORKER_GROUP_PREFIX", default_value = "worker-")]
    group_prefix: String,

    /// Notification channel: `log`, or `webhook` (needs --webhook-url).
    #[arg(long, env = "NOTIFY_CHANNEL", default_value = "log", value_parser = ["log", "webhook"])]
    channel: String,

    /// Webhook receiving notifications (channel `webhook`).
    #[arg(long, env = "WEBHOOK_URL")]
    webhook_url: Option<String>,

    /// Secret signing webhook requests, Stripe-style: `X-Signature: t=<unix>,v1=<hex
    /// HMAC-SHA256(secret, "<t>.<body>")>` (docs/webhooks.md). Required with
    /// `--channel webhook`: the worker refuses to start the channel without one.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,

    /// Longest one webhook request may take before it counts as a failed attempt.
    #[arg(long, env = "WEBHOOK_TIMEOUT", default_value = "5s", value_parser = duration)]
    webhook_timeout: Duration,

    /// Webhook requests in flight at once. A crash re-sends at most twice this many: those in
    /// flight and those whose outcome was being recorded.
    #[arg(long, env = "WEBHOOK_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    webhook_concurrency: u16,

    /// Data-platform sink: `file:PATH` (JSON lines) or an http(s) URL.
    #[arg(long, env = "EXPORT_SINK", default_value = "file:payments-export.jsonl")]
    export_sink: String,

    /// Fallback poll of pending deliveries.
    #[arg(long, env = "DELIVERY_POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    delivery_poll_interval: Duration,

    /// How often the worker reconciles the ranking with PostgreSQL: rebuilt if Redis lost it
    /// (flush, restart without data), else the payments and refunds of the last
    /// --ranking-reconcile-window applied again, each one Redis had lost counted as a correction.
    #[arg(long, env = "RANKING_RECONCILE_INTERVAL", default_value = "10s", value_parser = duration)]
    ranking_reconcile_interval: Duration,

    /// How far back each reconcile looks (a partial loss drops the last seconds of increments;
    /// every payment of the window is applied again, in pipelines of 500, every interval).
    #[arg(long, env = "RANKING_RECONCILE_WINDOW", default_value = "5m", value_parser = duration)]
    ranking_reconcile_window: Duration,

    /// How often a reconcile looks back over everything the ranking remembers
    /// (--ranking-retention) instead of the window; the first reconcile after start always does,
    /// so increments lost while this worker was down for longer than the window are found too.
    #[arg(long, env = "RANKING_FULL_RECONCILE_INTERVAL", default_value = "1h", value_parser = duration)]
    ranking_full_reconcile_interval: Duration,

    /// How long the ranking remembers the payments and refunds it applied. Keep it longer than
    /// the retention of payment.completed and payment.refunded (7 days): a replay of a message
    /// whose payment was forgotten would count again.
    #[arg(long, env = "RANKING_RETENTION", default_value = "8d", value_parser = duration)]
    ranking_retention: Duration,

    /// No longer used: the outbox relay deletes a row as soon as Kafka has it. Still accepted, so
    /// that a deployment that sets it starts; a warning says it is ignored.
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = duration, hide = true)]
    outbox_retention: Option<Duration>,

    /// How long a stored Idempotency-Key answer is kept (a retry after that is a new request).
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION", default_value = "2d", value_parser = duration)]
    idempotency_key_retention: Duration,

    /// How long consumers remember the events they handled. Keep it longer than the topics'
    /// retention (7 days): a replayed event forgotten here would be handled twice.
    #[arg(long, env = "PROCESSED_EVENT_RETENTION", default_value = "8d", value_parser = duration)]
    processed_event_retention: Duration,

    /// Time between two prunings of the tables above.
    #[arg(long, env = "PRUNE_INTERVAL", default_value = "1m", value_parser = duration)]
    prune_interval: Duration,

    /// Most pending notifications one delivery step claims; each outcome is committed as soon as
    /// it is known, so no transaction waits on the channel.
    #[arg(long, env = "DELIVERY_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
    delivery_batch: i64,

    /// Longest wait between two delivery attempts of one notification.
    #[arg(long, env = "DELIVERY_MAX_BACKOFF", default_value = "30s", value_parser = duration)]
    delivery_max_backoff: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (metrics, shutdown) = booking::telemetry::start(booking::telemetry::Daemon::Worker, cli.common.log_json, &cli.common.topic_prefix);
    if cli.outbox_retention.is_some() {
        tracing::warn!("--outbox-retention (OUTBOX_RETENTION) is ignored: the outbox relay deletes each row once Kafka has it");
    }
    let channel = match cli.channel.as_str() {
        "webhook" => {
            let url = cli.webhook_url.as_deref().ok_or_else(|| anyhow!("--webhook-url is required with --channel webhook"))?;
            let secret = cli.webhook_secret.as_deref().unwrap_or_default();
            Channel::webhook(url, secret, cli.webhook_timeout, cli.webhook_concurrency.into()).context("--channel webhook")?
        }
        _ => Channel::Log,
    };
    let sink = Sink::parse(&cli.export_sink).map_err(|e| anyhow!(e))?;
    let res = Resources::connect(&cli.common, "worker").await.context("connecting")?;
    let ops = booking::telemetry::bind(cli.metrics_addr).await.context("binding --metrics-addr")?;
    tracing::info!(metrics = %cli.metrics_addr, channel = %cli.channel, "worker started");
    let settings = WorkerSettings {
        channel,
        sink,
        delivery_poll: cli.delivery_poll_interval,
        delivery_batch: cli.delivery_batch,
        delivery_max_backoff: cli.delivery_max_backoff,
        ranking_reconcile: booking::worker::ReconcileEvery { window: cli.ranking_reconcile_interval, full: cli.ranking_full_reconcile_interval },
        ranking_retention: booking::ranking::Retention { remember: cli.ranking_retention, window: cli.ranking_reconcile_window },
        retention: booking::retention::Settings {
            idempotency_keys: cli.idempotency_key_retention,
            processed_events: cli.processed_event_retention,
            interval: cli.prune_interval,
            ..Default::default()
        },
    };
    app::run_worker(res, settings, &cli.group_prefix, ops, metrics, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// A deployment that still sets the retired flag starts (and is told it is ignored).
    #[test]
    fn the_retired_outbox_retention_flag_is_still_accepted() {
        use clap::Parser;
        let base = ["worker", "--database-url", "postgres://db", "--redis-url", "redis://r", "--kafka-brokers", "k:9092"];
        let cli = super::Cli::try_parse_from(base.iter().chain(&["--outbox-retention", "3d"])).expect("accepted");
        assert_eq!(cli.outbox_retention, Some(std::time::Duration::from_secs(3 * 24 * 3600)));
        assert!(super::Cli::try_parse_from(base).expect("optional").outbox_retention.is_none());
    }
}
