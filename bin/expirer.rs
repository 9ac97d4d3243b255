//! `expirer`: turns unpaid holds EXPIRED and frees their seats (brief §5, §6).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use booking::app::{self, ExpirerMode, ExpirerSettings, Resources};
use booking::config::{duration, Common};
use clap::Parser;

/// The expirer: consumes `reservation.expiration` (or, in `before` mode, scans the table the old
/// way), and sweeps holds every other path missed.
#[derive(Parser, Debug)]
#[command(name = "expirer", version)]
struct Cli {
    #[command(flatten)]
    common: Common,

    /// Address serving /metrics and /health.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9103")]
    metrics_addr: SocketAddr,

    /// Kafka consumer group of the expirers.
    #[arg(long, env = "EXPIRER_GROUP", default_value = "expirer")]
    group: String,

    /// `after`: consume reservation.expiration (method 2); `before`: the old periodic scan.
    #[arg(long, env = "EXPIRER_MODE", value_enum, default_value = "after")]
    mode: ExpirerMode,

    /// How often the sweeper looks for holds the pipeline missed.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "30s", value_parser = duration)]
    sweep_interval: Duration,

    /// How far past its expiry a hold must be before the sweeper takes it.
    #[arg(long, env = "SWEEP_GRACE", default_value = "10s", value_parser = duration)]
    sweep_grace: Duration,

    /// Most holds one sweep expires.
    #[arg(long, env = "SWEEP_BATCH", default_value_t = 1000)]
    sweep_batch: i64,

    /// Scan interval of `--mode before`.
    #[arg(long, env = "LEGACY_INTERVAL", default_value = "10s", value_parser = duration)]
    legacy_interval: Duration,

    /// Most outbox rows the relay publishes per batch.
    #[arg(long, env = "OUTBOX_BATCH", default_value_t = 500)]
    outbox_batch: i64,

    /// Fallback poll of the outbox: the relay is woken at once by every commit of this process
    /// that wrote outbox rows; the poll finds rows whose wake-up went elsewhere or was missed.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    outbox_poll_interval: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (metrics, shutdown) = booking::telemetry::start(booking::telemetry::Daemon::Expirer, cli.common.log_json, &cli.common.topic_prefix);
    let res = Resources::connect(&cli.common, "expirer").await.context("connecting")?;
    let ops = booking::telemetry::bind(cli.metrics_addr).await.context("binding --metrics-addr")?;
    tracing::info!(metrics = %cli.metrics_addr, mode = ?cli.mode, "expirer started");
    let settings = ExpirerSettings {
        mode: cli.mode,
        sweep_interval: cli.sweep_interval,
        sweep_grace: cli.sweep_grace,
        sweep_batch: cli.sweep_batch,
        legacy_interval: cli.legacy_interval,
        outbox_batch: cli.outbox_batch,
        outbox_poll: cli.outbox_poll_interval,
    };
    app::run_expirer(res, settings, &cli.group, ops, metrics, shutdown).await?;
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
