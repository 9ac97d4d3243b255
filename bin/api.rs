//! `api`: the HTTP booking API, its outbox relay and the waiting-queue admission.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use booking::app::{self, ApiSettings, Resources};
use booking::config::{duration, Common};
use booking::queue::{EarlyOrder, QueueConfig};
use clap::Parser;

/// The HTTP booking API (brief §4): users, points, catalog, waiting queue, holds, payments.
#[derive(Parser, Debug)]
#[command(name = "api", version)]
struct Cli {
    #[command(flatten)]
    common: Common,

    /// Address the HTTP API listens on.
    #[arg(long = "listen", env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Address serving /metrics and /health for Prometheus (the public --listen serves /health only).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9101")]
    metrics_addr: SocketAddr,

    /// How long a seat hold lasts before it expires.
    #[arg(long, env = "HOLD_TTL", default_value = "5m", value_parser = duration)]
    hold_ttl: Duration,

    /// Refunds close this long before a schedule starts (a refund needs the show to start later
    /// than now plus this).
    #[arg(long, env = "REFUND_CUTOFF", default_value = "24h", value_parser = duration)]
    refund_cutoff: Duration,

    /// Bearer token for the admin routes (empty disables them).
    #[arg(long, env = "ADMIN_TOKEN", default_value = "", hide_env_values = true)]
    admin_token: String,

    /// How often the waiting queue admits users.
    #[arg(long, env = "QUEUE_TICK", default_value = "1s", value_parser = duration)]
    queue_tick: Duration,

    /// How many users one tick admits per schedule.
    #[arg(long, env = "QUEUE_BATCH", default_value_t = 100)]
    queue_batch: u32,

    /// Most users active (allowed to book) at once per schedule.
    #[arg(long, env = "QUEUE_MAX_ACTIVE", default_value_t = 500)]
    queue_max_active: u32,

    /// An active user lapses after this long without a successful hold (failed attempts and
    /// status polls do not count).
    #[arg(long, env = "QUEUE_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    queue_idle_timeout: Duration,

    /// An active user also lapses this long after becoming active, whatever they do.
    #[arg(long, env = "QUEUE_ACTIVE_LIMIT", default_value = "15m", value_parser = duration)]
    queue_active_limit: Duration,

    /// How users who enter before booking opens are ordered when it opens: `shuffle` (a random
    /// order drawn once) or `fifo` (arrival order).
    #[arg(long, env = "QUEUE_EARLY_ORDER", value_enum, default_value = "shuffle")]
    queue_early_order: EarlyOrder,

    /// Most seats one user may hold or own (HELD and CONFIRMED) per schedule; one more hold gets
    /// 409 SEAT_LIMIT_REACHED.
    #[arg(long, env = "MAX_SEATS_PER_USER", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    max_seats_per_user: u32,

    /// Secret that signs queue tokens (set the same value on every replica).
    #[arg(long, env = "QUEUE_SECRET", hide_env_values = true)]
    queue_secret: String,

    /// Most outbox rows the relay publishes per batch.
    #[arg(long, env = "OUTBOX_BATCH", default_value_t = 500)]
    outbox_batch: i64,

    /// Fallback poll of the outbox: the relay is woken at once by every commit of this process
    /// that wrote outbox rows; the poll finds rows whose wake-up went elsewhere or was missed.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    outbox_poll_interval: Duration,

    /// How often the live streams' feed stamps new seat events and notifications with their
    /// commit-ordered position and hands them to open streams (one small query per poll, whatever
    /// the number of streams; a seat event reaches watchers within about one poll of its commit).
    /// Notifications do not wait for it: the worker's announcement wakes the feed at once.
    #[arg(long, env = "STREAM_POLL_INTERVAL", default_value = "20ms", value_parser = duration)]
    stream_poll_interval: Duration,

    /// How long seat-map events stay replayable for a reconnect with `Last-Event-ID` (an older id
    /// gets a fresh snapshot).
    #[arg(long, env = "SEAT_EVENT_RETENTION", default_value = "1h", value_parser = duration)]
    seat_event_retention: Duration,

    /// Most notification streams one user may have open on this api (more get 429 TOO_MANY_STREAMS).
    #[arg(long, env = "MAX_STREAMS_PER_USER", default_value_t = 5)]
    max_streams_per_user: usize,

    /// Most open streams (seat maps and notifications together) on this api (more get 503
    /// STREAMS_AT_CAPACITY).
    #[arg(long, env = "MAX_STREAMS", default_value_t = 20_000)]
    max_streams: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (metrics, shutdown) = booking::telemetry::start(booking::telemetry::Daemon::Api, cli.common.log_json, &cli.common.topic_prefix);
    let res = Resources::connect_warmed(&cli.common, "api", app::API_WARM).await.context("connecting")?;
    let listener = tokio::net::TcpListener::bind(cli.listen).await.context("binding --listen")?;
    let ops = booking::telemetry::bind(cli.metrics_addr).await.context("binding --metrics-addr")?;
    tracing::info!(listen = %cli.listen, metrics = %cli.metrics_addr, "api started");
    let settings = ApiSettings {
        hold_ttl: cli.hold_ttl,
        refund_cutoff: cli.refund_cutoff,
        max_seats_per_user: cli.max_seats_per_user,
        admin_token: cli.admin_token,
        queue: QueueConfig {
            tick: cli.queue_tick,
            batch: cli.queue_batch,
            max_active: cli.queue_max_active,
            idle: cli.queue_idle_timeout,
            active_limit: cli.queue_active_limit,
            early_order: cli.queue_early_order,
            secret: cli.queue_secret,
        },
        outbox_batch: cli.outbox_batch,
        outbox_poll: cli.outbox_poll_interval,
        streams: booking::sequencer::StreamSettings {
            poll: cli.stream_poll_interval,
            seat_event_retention: cli.seat_event_retention,
            max_streams_per_user: cli.max_streams_per_user,
            max_streams: cli.max_streams,
            ..Default::default()
        },
    };
    app::run_api(res, settings, listener, Some(ops), metrics, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
