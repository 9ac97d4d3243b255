//! The `bench` command line: flags, scenario selection, and the run that writes the report.
//!
//! `bench --scenario all --out docs/bench/latest` runs the scenarios and writes
//! `<out>.json` and `<out>.md`; `bench report --input a.json --input b.json --out …` merges runs
//! (such as the expiry before/after runs of `scripts/bench.sh`). `src/main.rs` only calls [`main`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use crate::report::{Machine, Report, Results, RunInfo};
use crate::{bullmq, cpu, end_to_end, expiry, limits, notify_drain, queue_spike, seat_fight, sell_out, Api, Ctx};
use booking::config::duration;
use clap::{Args, Parser, Subcommand};

/// Benchmark of the booking backend: queue spike, seat fight, sell-out, payments, expiry
/// accuracy before/after, end to end over the notification stream.
#[derive(Parser, Debug)]
#[command(name = "bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Merges the JSON files of several runs into one report (`<out>.json`, `<out>.md`).
    Report {
        /// A JSON file written by a run (repeat the flag).
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        /// Output prefix.
        #[arg(long, default_value = "docs/bench/latest")]
        out: PathBuf,
    },
}

const SCENARIOS: &[&str] = &["limits", "queue-spike", "seat-fight", "sell-out", "payments", "one-schedule", "end-to-end", "expiry"];
/// Scenarios not in `all`: `notify-drain` needs the stack's worker stopped; `versus-bullmq` needs
/// Node.js with bullmq and the stack's topic prefix.
const EXTRA: &[&str] = &["notify-drain", "versus-bullmq"];

#[derive(Args, Debug)]
struct RunArgs {
    /// Base URL of the running api.
    #[arg(long, env = "BENCH_API", default_value = "http://127.0.0.1:8080")]
    api: String,

    /// The api's `/metrics` URL on its `--metrics-addr` (admission counters of the queue spike).
    #[arg(long, env = "BENCH_API_METRICS")]
    api_metrics: Option<String>,

    /// The api's --admin-token (concerts are created through the admin route).
    #[arg(long, env = "ADMIN_TOKEN", default_value = "", hide_env_values = true)]
    admin_token: String,

    /// The stack's PostgreSQL (read for lateness, statistics views and checks).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,

    /// The stack's Redis (only asked for its version).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,

    /// Kafka's version, for the report (brokers do not tell clients).
    #[arg(long, env = "KAFKA_VERSION")]
    kafka_version: Option<String>,

    /// Scenarios, comma separated: limits, queue-spike, seat-fight, sell-out, payments,
    /// one-schedule, end-to-end, expiry, or all. They run in that order; payments pays the
    /// sell-out's holds (and runs it); one-schedule is the sell-out's seats in one schedule.
    /// `versus-bullmq` (not in all) needs --stack-topic-prefix and Node.js with bullmq.
    /// `notify-drain` (not in all) runs its own worker and needs no api; stop the stack's worker
    /// first (its delivery loop shares the notifications table).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenario: Vec<String>,

    /// Name of this run; also the key of the expiry result (use `after` / `before`).
    #[arg(long, default_value = "after")]
    label: String,

    /// Queue spike: users entering one schedule's queue.
    #[arg(long, default_value_t = 100_000)]
    users: usize,

    /// Seat fight: simultaneous holds on one seat.
    #[arg(long, default_value_t = 500)]
    fighters: usize,

    /// Sell-out: schedules to fill, of `--seats` seats each.
    #[arg(long, default_value_t = 20)]
    schedules: usize,

    /// Sell-out: seats per schedule.
    #[arg(long, default_value_t = 50)]
    seats: usize,

    /// Sell-out: concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,

    /// Payments: concurrent payments.
    #[arg(long, default_value_t = 32)]
    pay_concurrency: usize,

    /// Expiry: holds whose expiries are spread over --window.
    #[arg(long, default_value_t = 10_000)]
    holds: usize,

    /// Expiry: the window the hold requests (hence the expiries) are spread over.
    #[arg(long, default_value = "2s", value_parser = duration)]
    window: Duration,

    /// Expiry: wait for PostgreSQL's statistics to settle before each snapshot (backends flush
    /// within 10 s once idle).
    #[arg(long, default_value = "11s", value_parser = duration)]
    stats_settle: Duration,

    /// Expiry and end to end: longest wait past the last hold's expiresAt.
    #[arg(long, default_value = "60s", value_parser = duration)]
    expiry_timeout: Duration,

    /// Expiry: the delay-scheduler's /metrics URL (splits the lateness by stage).
    #[arg(long)]
    scheduler_metrics: Option<String>,

    /// Expiry: the expirer's /metrics URL.
    #[arg(long)]
    expirer_metrics: Option<String>,

    /// End to end: users with an open notification stream, one payment and one expiry each.
    #[arg(long, default_value_t = 100)]
    e2e_users: usize,

    /// Queue spike: longest wait for the notification backlog.
    #[arg(long, default_value = "180s", value_parser = duration)]
    drain_timeout: Duration,

    /// Notify-drain: notification requests produced to Kafka before the worker starts.
    #[arg(long, env = "BENCH_NOTIFICATIONS", default_value_t = 100_000)]
    notifications: usize,

    /// Notify-drain: distinct user ids the notifications are spread over.
    #[arg(long, default_value_t = 10_000)]
    drain_users: usize,

    /// Kafka brokers: notify-drain's, and the stack's, to read its topics back (queue-spike,
    /// versus-bullmq).
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,

    /// Notify-drain: a topic prefix no other process uses (its topics are created).
    #[arg(long)]
    topic_prefix: Option<String>,

    /// Notify-drain: the worker binary (default: `worker` next to this binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,

    /// Notify-drain: an extra flag for the worker (repeat; e.g. `--worker-arg=--delivery-batch=1000`).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    worker_args: Vec<String>,

    /// Notify-drain: the worker's --metrics-addr.
    #[arg(long, default_value = "127.0.0.1:0")]
    worker_metrics_addr: String,

    /// Notify-drain: the worker's log file.
    #[arg(long, default_value = "notify-drain-worker.log")]
    worker_log: PathBuf,

    /// Limits: seconds of each pgbench run.
    #[arg(long, default_value = "5s", value_parser = duration)]
    limits_duration: Duration,

    /// Limits: the pgbench binary.
    #[arg(long, env = "PGBENCH", default_value = "pgbench")]
    pgbench: String,

    /// Versus-bullmq: numbers of holds (and of BullMQ jobs), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    bullmq_n: Vec<usize>,

    /// Versus-bullmq: from the end of writing the holds to the first due time, at least (the
    /// window starts this long after the writing began, plus 5 ms per hold).
    #[arg(long, default_value = "5s", value_parser = duration)]
    bullmq_lead: Duration,

    /// The running stack's --topic-prefix: versus-bullmq's holds' outbox rows go to its topics,
    /// and queue-spike reads its notification requests back from them.
    #[arg(long, env = "BENCH_STACK_TOPIC_PREFIX")]
    stack_topic_prefix: Option<String>,

    /// Versus-bullmq: the Node.js binary.
    #[arg(long, env = "BENCH_NODE", default_value = "node")]
    node: String,

    /// Versus-bullmq: the BullMQ script (bullmq must be resolvable, e.g. through NODE_PATH).
    #[arg(long, env = "BENCH_BULLMQ_SCRIPT", default_value = "bench/bullmq/delayed.cjs")]
    bullmq_script: PathBuf,

    /// Versus-bullmq: BullMQ Worker concurrency.
    #[arg(long, default_value_t = 100)]
    bullmq_concurrency: usize,

    /// Concurrent requests for setup, entries and holds.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,

    /// Output prefix: writes <out>.json and <out>.md.
    #[arg(long, default_value = "docs/bench/latest")]
    out: PathBuf,

    /// A note on how the stack was started (repeat the flag); shown in the report.
    #[arg(long = "note")]
    notes: Vec<String>,

    /// Count CPU of api/worker/expirer/delay-scheduler processes only when their command line
    /// contains this (e.g. the stack's --topic-prefix); others count as "other".
    #[arg(long)]
    cpu_marker: Option<String>,

    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Parses the command line and runs the scenarios, or merges reports.
pub async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Report { inputs, out }) => {
            let reports = inputs.iter().map(|p| Report::read(p)).collect::<Result<Vec<_>>>()?;
            let report = Report::merge(reports);
            report.write(&out)?;
            eprintln!("wrote {} and {}", out.with_extension("json").display(), out.with_extension("md").display());
            Ok(())
        }
        None => run(cli.run).await,
    }
}

async fn run(a: RunArgs) -> Result<()> {
    let mut chosen: Vec<&str> = Vec::new();
    for s in &a.scenario {
        match s.trim() {
            "all" => chosen.extend(SCENARIOS),
            s if SCENARIOS.contains(&s) || EXTRA.contains(&s) => chosen.push(SCENARIOS.iter().chain(EXTRA).find(|x| **x == s).expect("listed")),
            other => bail!("unknown scenario {other:?}: use {}, {} or all", SCENARIOS.join(", "), EXTRA.join(", ")),
        }
    }
    let wants = |s: &str| chosen.contains(&s);
    let db = a.database_url.clone().context("--database-url (or DATABASE_URL) is required")?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&db).await.context("connecting to PostgreSQL")?;
    let api = Api::new(&a.api, &a.admin_token)?.with_metrics(a.api_metrics.clone());
    if chosen.iter().any(|s| SCENARIOS.contains(s)) {
        api.health().await.with_context(|| format!("is the api running at {}?", a.api))?;
    }
    let ctx = Ctx::new(api, pool.clone(), !a.quiet);
    let machine = Machine::detect(&pool, a.redis_url.as_deref(), a.kafka_version.as_deref()).await;
    let started = chrono::Utc::now();
    let load_start = cpu::load_average();
    let marker = a.cpu_marker.as_deref();
    let mut results = Results::default();
    let mut failures = Vec::new();
    let c = a.concurrency;

    if wants("limits") {
        let mut clients = vec![c, a.clients, a.pay_concurrency];
        clients.sort_unstable();
        clients.dedup();
        let cfg = limits::Config { clients, seconds: a.limits_duration.as_secs().max(1), database_url: db.clone(), pgbench: a.pgbench.clone() };
        match limits::run(&ctx, &cfg).await {
            Ok(l) => results.limits = Some(l),
            Err(e) => failures.push(format!("limits: {e:#}")),
        }
    }
    if wants("queue-spike") {
        let cfg = queue_spike::Config {
            users: a.users,
            concurrency: c,
            pollers: (c / 4).max(1),
            drain_timeout_s: a.drain_timeout.as_secs_f64(),
            kafka_brokers: a.kafka_brokers.clone(),
            stack_topic_prefix: a.stack_topic_prefix.clone(),
        };
        let cpu0 = cpu::snapshot(marker);
        let r = queue_spike::run(&ctx, &cfg).await;
        results.cpu.insert("queue-spike".into(), cpu0.usage_since(marker));
        match r {
            Ok(r) => results.queue_spike = Some(r),
            Err(e) => failures.push(format!("queue-spike: {e:#}")),
        }
    }
    if wants("seat-fight") {
        settle(&ctx, "seat-fight").await;
        let cpu0 = cpu::snapshot(marker);
        let r = seat_fight::run(&ctx, &seat_fight::Config { fighters: a.fighters, concurrency: c }).await;
        results.cpu.insert("seat-fight".into(), cpu0.usage_since(marker));
        match r {
            Ok(r) => results.seat_fight = Some(r),
            Err(e) => failures.push(format!("seat-fight: {e:#}")),
        }
    }
    if wants("sell-out") || wants("payments") {
        let cfg = sell_out::Config { schedules: a.schedules, seats_per_schedule: a.seats, clients: a.clients };
        let r = prepare_sell_out(&ctx, &cfg, "sell-out").await;
        let cpu0 = cpu::snapshot(marker);
        let r = match r {
            Ok(prepared) => sell_out::run(&ctx, &cfg, prepared).await,
            Err(e) => Err(e),
        };
        results.cpu.insert("sell-out".into(), cpu0.usage_since(marker));
        match r {
            Ok(sold) => {
                results.sell_out = Some(sold.result.clone());
                if wants("payments") {
                    let pc = sell_out::PaymentsConfig { concurrency: a.pay_concurrency, ranking_timeout_s: 30.0 };
                    settle(&ctx, "payments").await;
                    let cpu0 = cpu::snapshot(marker);
                    let r = sell_out::payments(&ctx, &pc, &sold).await;
                    results.cpu.insert("payments".into(), cpu0.usage_since(marker));
                    match r {
                        Ok(p) => results.payments = Some(p),
                        Err(e) => failures.push(format!("payments: {e:#}")),
                    }
                }
            }
            Err(e) => failures.push(format!("sell-out: {e:#}")),
        }
    }
    if wants("one-schedule") {
        // The sell-out's seats, all in one schedule: a sale of one date, where every hold is
        // of the same schedule (issue 11, migration 0230).
        let cfg = sell_out::Config { schedules: 1, seats_per_schedule: a.schedules * a.seats, clients: a.clients };
        let r = prepare_sell_out(&ctx, &cfg, "one-schedule").await;
        let cpu0 = cpu::snapshot(marker);
        let r = match r {
            Ok(prepared) => sell_out::run(&ctx, &cfg, prepared).await,
            Err(e) => Err(e),
        };
        results.cpu.insert("one-schedule".into(), cpu0.usage_since(marker));
        match r {
            Ok(sold) => results.one_schedule = Some(sold.result),
            Err(e) => failures.push(format!("one-schedule: {e:#}")),
        }
    }
    if wants("end-to-end") {
        let cfg = end_to_end::Config { users: a.e2e_users, pay_concurrency: 4, concurrency: c, timeout_s: a.expiry_timeout.as_secs_f64() };
        let cpu0 = cpu::snapshot(marker);
        let r = end_to_end::run(&ctx, &cfg).await;
        results.cpu.insert("end-to-end".into(), cpu0.usage_since(marker));
        match r {
            Ok(r) => results.end_to_end = Some(r),
            Err(e) => failures.push(format!("end-to-end: {e:#}")),
        }
    }
    if wants("expiry") {
        let cfg = expiry::Config {
            label: a.label.clone(),
            holds: a.holds,
            window_ms: a.window.as_millis() as u64,
            concurrency: c,
            stats_settle_ms: a.stats_settle.as_millis() as u64,
            timeout_s: a.expiry_timeout.as_secs_f64(),
            scheduler_metrics: a.scheduler_metrics.clone(),
            expirer_metrics: a.expirer_metrics.clone(),
        };
        let cpu0 = cpu::snapshot(marker);
        let r = expiry::run(&ctx, &cfg).await;
        results.cpu.insert(format!("expiry {}", a.label), cpu0.usage_since(marker));
        match r {
            Ok(r) => {
                results.expiry.insert(a.label.clone(), r);
            }
            Err(e) => failures.push(format!("expiry: {e:#}")),
        }
    }

    if wants("versus-bullmq") {
        let prefix = a.stack_topic_prefix.clone().context("versus-bullmq needs --stack-topic-prefix (the stack's --topic-prefix)")?;
        let redis = a.redis_url.clone().context("versus-bullmq needs --redis-url (BullMQ runs on the same Redis)")?;
        for &n in &a.bullmq_n {
            let cfg = bullmq::Config {
                n,
                window_ms: a.window.as_millis() as u64,
                lead_ms: (a.bullmq_lead.as_millis() as u64) + 5 * n as u64,
                concurrency: c,
                stack_topic_prefix: prefix.clone(),
                database_url: db.clone(),
                timeout_s: a.expiry_timeout.as_secs_f64(),
                scheduler_metrics: a.scheduler_metrics.clone(),
                node: a.node.clone(),
                script: a.bullmq_script.clone(),
                redis_url: redis.clone(),
                bullmq_prefix: format!("bench{}.bull", ctx.run_id),
                bullmq_concurrency: a.bullmq_concurrency,
                kafka_brokers: a.kafka_brokers.clone(),
            };
            let cpu0 = cpu::snapshot(marker);
            let r = bullmq::run(&ctx, &cfg).await;
            results.cpu.insert(format!("versus-bullmq {n}"), cpu0.usage_since(marker));
            if let Some(e) = &r.ours_error {
                failures.push(format!("versus-bullmq {n} (ours): {e}"));
            }
            results.versus_bullmq.insert(format!("{n:06}"), r);
        }
    }
    if wants("notify-drain") {
        let brokers = a.kafka_brokers.clone().context("notify-drain needs --kafka-brokers (or KAFKA_BROKERS)")?;
        let prefix = a.topic_prefix.clone().unwrap_or_else(|| format!("benchdrain{}.", ctx.run_id));
        let redis = a.redis_url.clone().context("notify-drain needs --redis-url (the worker's ranking)")?;
        let bin = match &a.worker_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.with_file_name("worker"),
        };
        let mut args = vec![
            format!("--database-url={db}"),
            format!("--redis-url={redis}"),
            format!("--kafka-brokers={brokers}"),
            format!("--metrics-addr={}", a.worker_metrics_addr),
            "--db-max-connections=10".into(),
            format!("--export-sink=file:{}", std::env::temp_dir().join(format!("notify-drain-{}.jsonl", ctx.run_id)).display()),
        ];
        args.extend(a.worker_args.iter().cloned());
        let worker = notify_drain::Worker::Process { bin, args, log: a.worker_log.clone() };
        let cfg = notify_drain::Config {
            notifications: a.notifications,
            users: a.drain_users,
            kafka_brokers: brokers,
            topic_prefix: prefix,
            replication_factor: 1,
            timeout_s: a.drain_timeout.as_secs_f64(),
        };
        match notify_drain::run(&ctx, &cfg, worker, marker).await {
            Ok(r) => {
                if let Some(c) = r.cpu.clone() {
                    results.cpu.insert("notify-drain (worker start → all delivered)".into(), c);
                }
                results.notify_drain = Some(r)
            }
            Err(e) => failures.push(format!("notify-drain: {e:#}")),
        }
    }

    let mut notes = a.notes.clone();
    notes.extend(failures.iter().map(|f| format!("FAILED {f}")));
    let run = RunInfo {
        label: a.label.clone(),
        scenarios: chosen.iter().map(|s| s.to_string()).collect(),
        api: a.api.clone(),
        started_at: Some(started),
        finished_at: Some(chrono::Utc::now()),
        notes,
        load_average_start: load_start,
        load_average_end: cpu::load_average(),
    };
    let report = Report { machine, runs: vec![run], results, ..Default::default() }.finish();
    report.write(&a.out)?;
    eprintln!("wrote {} and {}", a.out.with_extension("json").display(), a.out.with_extension("md").display());
    for f in &report.figures {
        eprintln!("  {:<62} {}", f.what, f.ours);
    }
    if !failures.is_empty() {
        bail!("{} scenario(s) failed:\n{}", failures.len(), failures.join("\n"));
    }
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

/// Prepares a sell-out after the previous scenario's aftermath, then waits again for its own
/// setup's (the bookers' queue notifications) before its clock starts.
async fn prepare_sell_out(ctx: &Ctx, cfg: &sell_out::Config, scenario: &str) -> Result<sell_out::Prepared> {
    settle(ctx, scenario).await;
    let prepared = sell_out::prepare(ctx, cfg).await?;
    let waited = cpu::settle(Duration::from_secs(10)).await;
    ctx.say(&format!("{scenario}: bookers ACTIVE; holds started once the machine was quiet again, {:.1} s later", waited.as_secs_f64()));
    Ok(prepared)
}

/// Waits for the machine to be quiet before a scenario of the spike (see [`cpu::settle`]), so
/// that none measures the previous one's aftermath.
async fn settle(ctx: &Ctx, scenario: &str) {
    let waited = cpu::settle(Duration::from_secs(10)).await;
    ctx.say(&format!("{scenario}: started once the machine was quiet, {:.1} s after the previous scenario", waited.as_secs_f64()));
}
