//! `delay-scheduler`: keeps each hold's expiry in Redis and publishes `reservation.expiration`
//! when it is due (brief §6).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use booking::app::{self, Resources};
use booking::config::{duration, Common};
use booking::scheduler::SchedulerConfig;
use clap::Parser;

/// The delay scheduler: Redis sorted sets fed by `reservation.created`, drained into
/// `reservation.expiration` on time.
#[derive(Parser, Debug)]
#[command(name = "delay-scheduler", version)]
struct Cli {
    #[command(flatten)]
    common: Common,

    /// Address serving /metrics and /health.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9102")]
    metrics_addr: SocketAddr,

    /// Kafka consumer group of the schedulers.
    #[arg(long, env = "SCHEDULER_GROUP", default_value = "delay-scheduler")]
    group: String,

    /// Longest sleep between two claims (the loop wakes earlier for the earliest due hold).
    #[arg(long, env = "POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    poll_interval: Duration,

    /// Most holds claimed by one claim.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500)]
    batch_size: u32,

    /// How long a claimed hold stays in flight before another claim takes it again. It must
    /// exceed the producer's message timeout (10 s): a send still waiting for Kafka's answer is
    /// then never claimed and published twice. A send that fails goes back at once, so only a
    /// scheduler that died mid-publish makes its holds wait this out: keep the margin small.
    #[arg(long, env = "LEASE", default_value = "15s", value_parser = duration)]
    lease: Duration,

    /// How often every HELD hold is re-added from PostgreSQL (also done at start).
    #[arg(long, env = "REARM_INTERVAL", default_value = "5m", value_parser = duration)]
    rearm_interval: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.lease > booking::kafka::MESSAGE_TIMEOUT, "--lease must exceed the producer's message timeout ({:?})", booking::kafka::MESSAGE_TIMEOUT);
    let (metrics, shutdown) = booking::telemetry::start(booking::telemetry::Daemon::DelayScheduler, cli.common.log_json, &cli.common.topic_prefix);
    let res = Resources::connect(&cli.common, "delay-scheduler").await.context("connecting")?;
    let ops = booking::telemetry::bind(cli.metrics_addr).await.context("binding --metrics-addr")?;
    tracing::info!(metrics = %cli.metrics_addr, "delay-scheduler started");
    let cfg = SchedulerConfig {
        batch_size: cli.batch_size,
        lease: cli.lease,
        poll_interval: cli.poll_interval,
        rearm_interval: cli.rearm_interval,
    };
    app::run_scheduler(res, cfg, &cli.group, ops, metrics, shutdown).await?;
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
