//! `bookingctl`: what operators see and do during a sale (dead letters, pending expiries, the
//! queue, the outbox). Parses flags, connects, asks before changes, prints; the work is in
//! `booking::ops`.

use std::time::Duration;

use anyhow::Context;
use booking::config::{duration, Common};
use booking::kafka::Topics;
use booking::keys::Keys;
use booking::ops::dlq::{Position, ReplayRequest};
use booking::ops::queue::{AdminApi, QueueChange};
use booking::ops::{self, confirm, progress, Groups, Ops, Report};
use booking::redis_conn::RedisConn;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use uuid::Uuid;

/// Operate a running sale: status, the delay scheduler's pending expiries, dead letters, the
/// outbox, the waiting queue. Reads the same flags and environment as the daemons. Commands that
/// change something ask first (or need --yes when standard input is not a terminal) and log who
/// ran them and what changed.
#[derive(Parser, Debug)]
#[command(name = "bookingctl", version)]
struct Cli {
    #[command(flatten)]
    common: Common,

    /// Print JSON instead of tables.
    #[arg(long, env = "BOOKINGCTL_JSON", global = true, default_value_t = false)]
    json: bool,

    /// Change without asking (required when standard input is not a terminal).
    #[arg(long, short = 'y', env = "BOOKINGCTL_YES", global = true, default_value_t = false)]
    yes: bool,

    /// Consumer group of the delay schedulers (their --group).
    #[arg(long, env = "SCHEDULER_GROUP", default_value = "delay-scheduler")]
    scheduler_group: String,

    /// Consumer group of the expirers (their --group).
    #[arg(long, env = "EXPIRER_GROUP", default_value = "expirer")]
    expirer_group: String,

    /// Prefix of the worker's consumer groups (its --group-prefix).
    #[arg(long, env = "WORKER_GROUP_PREFIX", default_value = "worker-")]
    worker_group_prefix: String,

    /// The delay scheduler's --lease (tells when an in-flight hold was claimed).
    #[arg(long, env = "LEASE", default_value = "15s", value_parser = duration)]
    lease: Duration,

    /// Base URL of the api, for the queue commands.
    #[arg(long, env = "BOOKING_API_URL", default_value = "http://127.0.0.1:8080")]
    api_url: String,

    /// The api's admin bearer token, for the queue commands.
    #[arg(long, env = "ADMIN_TOKEN", default_value = "", hide_env_values = true)]
    admin_token: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One screen: each dependency up or down, outbox backlog, consumer lag per topic and group,
    /// scheduler due / in flight / next due per shard, queue sizes per schedule, DLQ sizes.
    Status,
    /// The delay scheduler's pending expiries.
    #[command(subcommand)]
    Scheduler(SchedulerCmd),
    /// Dead letters: list, show, replay.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// The transactional outbox.
    #[command(subcommand)]
    Outbox(OutboxCmd),
    /// The waiting queue of a schedule (through the api's admin routes).
    #[command(subcommand)]
    Queue(QueueCmd),
}

#[derive(Subcommand, Debug)]
enum SchedulerCmd {
    /// Where a hold's expiry is (due, in flight, tombstoned, absent), beside its PostgreSQL state.
    Find {
        /// The reservation id.
        reservation_id: Uuid,
    },
    /// The pending expiries, earliest first.
    List {
        /// Only this shard (the partition of reservation.created).
        #[arg(long, env = "BOOKINGCTL_SHARD")]
        shard: Option<i32>,
        /// Only those due before T (RFC 3339, or a duration from now such as `5m`); holds in flight
        /// (claimed, being published) were due already and are always listed.
        #[arg(long, env = "BOOKINGCTL_DUE_BEFORE", value_parser = time_ahead)]
        due_before: Option<DateTime<Utc>>,
        /// Most rows shown.
        #[arg(long, env = "BOOKINGCTL_LIMIT", default_value_t = 50)]
        limit: usize,
    },
    /// Re-adds every HELD hold to Redis (only the missing ones change) and reports how many were missing.
    Rearm,
}

#[derive(Subcommand, Debug)]
enum DlqCmd {
    /// Dead letters, oldest first: time, key, reason, original topic, partition and offset.
    List {
        /// Only this topic (source or .dlq name, topic prefix optional).
        #[arg(long, env = "BOOKINGCTL_TOPIC")]
        topic: Option<String>,
        /// Only those dead-lettered since T (RFC 3339, or a duration ago such as `1h`).
        #[arg(long, env = "BOOKINGCTL_SINCE", value_parser = time_ago)]
        since: Option<DateTime<Utc>>,
    },
    /// One dead letter, pretty-printed.
    Show {
        /// The topic (source or .dlq name, topic prefix optional).
        topic: String,
        /// Its position in the dead-letter topic: PARTITION:OFFSET, or OFFSET when unique.
        offset: Position,
    },
    /// Re-produces dead letters to their source topic with the original key, once each.
    Replay {
        /// Only this topic (source or .dlq name, topic prefix optional); needed with --offset.
        #[arg(long, env = "BOOKINGCTL_TOPIC")]
        topic: Option<String>,
        /// Positions to replay: PARTITION:OFFSET (or OFFSET when unique), repeatable.
        #[arg(long, env = "BOOKINGCTL_OFFSETS", num_args = 1.., value_delimiter = ',')]
        offset: Vec<Position>,
        /// Replay every dead letter of the topic (of every topic without --topic).
        #[arg(long, env = "BOOKINGCTL_ALL", default_value_t = false)]
        all: bool,
        /// Show what would be replayed; change nothing.
        #[arg(long, env = "BOOKINGCTL_DRY_RUN", default_value_t = false)]
        dry_run: bool,
        /// Replay again what was replayed before.
        #[arg(long, env = "BOOKINGCTL_FORCE", default_value_t = false)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum OutboxCmd {
    /// The backlog, the age of its oldest event, and how many rows are set aside.
    Status,
    /// The rows the relay set aside because Kafka refused them for good, with Kafka's error.
    Stuck {
        /// Most rows shown.
        #[arg(long, env = "BOOKINGCTL_LIMIT", default_value_t = 100)]
        limit: i64,
    },
    /// Puts a set-aside row back in line for the relay.
    Retry {
        /// The outbox row id (from `outbox stuck`).
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
enum QueueCmd {
    /// The admin queue view of a schedule.
    Show {
        /// The schedule id.
        schedule_id: Uuid,
    },
    /// Stops admission (active users keep their place).
    Pause {
        /// The schedule id.
        schedule_id: Uuid,
    },
    /// Resumes admission.
    Resume {
        /// The schedule id.
        schedule_id: Uuid,
    },
    /// Changes how many users one tick admits (and the most active at once).
    Set {
        /// The schedule id.
        schedule_id: Uuid,
        /// Users admitted per tick.
        #[arg(long, env = "BOOKINGCTL_BATCH")]
        batch: Option<u32>,
        /// Most users active at once.
        #[arg(long, env = "BOOKINGCTL_MAX_ACTIVE")]
        max_active: Option<u32>,
    },
}

/// RFC 3339, or a humantime duration from now.
fn time_ahead(s: &str) -> Result<DateTime<Utc>, String> {
    time(s, 1)
}

/// RFC 3339, or a humantime duration before now.
fn time_ago(s: &str) -> Result<DateTime<Utc>, String> {
    time(s, -1)
}

fn time(s: &str, sign: i32) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = duration(s).map_err(|e| format!("{s:?} is neither an RFC 3339 time nor a duration: {e}"))?;
    let d = chrono::Duration::from_std(d).map_err(|e| e.to_string())?;
    Ok(if sign > 0 { Utc::now() + d } else { Utc::now() - d })
}

fn emit<R: Report>(r: &R, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("reports serialize"));
    } else {
        print!("{}", r.table());
    }
}

async fn connect(cli: &Cli) -> Ops {
    let c = &cli.common;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&c.database_url)
        .expect("a valid --database-url");
    // No migrations here: the schema belongs to the daemons (they apply it at start), and an
    // operator's tool must not change it behind their back. The tables bookingctl writes
    // (dlq_replays, ops_audit) arrive with the daemons of the same version.
    let redis = match tokio::time::timeout(Duration::from_secs(3), RedisConn::connect(&c.redis_url)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".to_string()),
    };
    Ops {
        pool,
        redis,
        producer: booking::kafka::producer(&c.kafka_brokers, "bookingctl").expect("a Kafka producer"),
        brokers: c.kafka_brokers.clone(),
        keys: Keys::new(c.redis_prefix.clone()),
        topics: Topics::new(&c.topic_prefix),
        groups: Groups {
            scheduler: cli.scheduler_group.clone(),
            expirer: cli.expirer_group.clone(),
            worker_prefix: cli.worker_group_prefix.clone(),
        },
        lease: cli.lease,
        actor: ops::actor(),
        api: AdminApi::new(&cli.api_url, &cli.admin_token),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,booking::ops=info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let ops = connect(&cli).await;
    let (json, yes, prefix) = (cli.json, cli.yes, cli.common.topic_prefix.as_str());
    match &cli.command {
        Command::Status => emit(&ops::status::status(&ops).await, json),
        Command::Scheduler(SchedulerCmd::Find { reservation_id }) => emit(&ops::scheduler::find(&ops, *reservation_id).await?, json),
        Command::Scheduler(SchedulerCmd::List { shard, due_before, limit }) => {
            emit(&ops::scheduler::list(&ops, *shard, *due_before, *limit).await?, json)
        }
        Command::Scheduler(SchedulerCmd::Rearm) => {
            let n = ops::scheduler::held_count(&ops).await?;
            confirm(&format!("Re-arm the {n} HELD holds in Redis (only missing ones are added)?"), yes)?;
            emit(&ops::scheduler::rearm(&ops, &progress(n.max(0) as u64, "re-arming")).await?, json)
        }
        Command::Dlq(DlqCmd::List { topic, since }) => {
            emit(&ops::dlq::list(&ops, prefix, topic.as_deref(), *since, &progress(0, "reading")).await?, json)
        }
        Command::Dlq(DlqCmd::Show { topic, offset }) => emit(&ops::dlq::show(&ops, prefix, topic, *offset).await?, json),
        Command::Dlq(DlqCmd::Replay { topic, offset, all, dry_run, force }) => {
            let req = ReplayRequest { topic: topic.clone(), offsets: offset.clone(), all: *all, dry_run: *dry_run, force: *force };
            let plan = ops::dlq::plan(&ops, prefix, &req).await?;
            if *dry_run || plan.replayed == 0 {
                emit(&plan, json);
            } else {
                eprint!("{}", plan.table());
                confirm(&format!("Replay {} dead letter(s) to their source topics?", plan.replayed), yes)?;
                emit(&ops::dlq::replay(&ops, prefix, &req, &progress(plan.replayed as u64, "replaying")).await?, json)
            }
        }
        Command::Outbox(OutboxCmd::Status) => emit(&ops::outbox::status(&ops).await?, json),
        Command::Outbox(OutboxCmd::Stuck { limit }) => emit(&ops::outbox::stuck(&ops, *limit).await?, json),
        Command::Outbox(OutboxCmd::Retry { id }) => {
            confirm(&format!("Put set-aside outbox row {id} back in line?"), yes)?;
            emit(&ops::outbox::retry(&ops, *id).await?, json)
        }
        Command::Queue(QueueCmd::Show { schedule_id }) => emit(&ops::queue::show(&ops, *schedule_id).await?, json),
        Command::Queue(q) => {
            let (schedule, change, what) = match q {
                QueueCmd::Pause { schedule_id } => (schedule_id, QueueChange { paused: Some(true), ..Default::default() }, "Pause admission".to_string()),
                QueueCmd::Resume { schedule_id } => (schedule_id, QueueChange { paused: Some(false), ..Default::default() }, "Resume admission".to_string()),
                QueueCmd::Set { schedule_id, batch, max_active } => (
                    schedule_id,
                    QueueChange { batch: *batch, max_active: *max_active, ..Default::default() },
                    format!("Set batch={} maxActive={}", ops_opt(batch), ops_opt(max_active)),
                ),
                QueueCmd::Show { .. } => unreachable!("handled above"),
            };
            confirm(&format!("{what} of schedule {schedule}?"), yes)?;
            emit(&ops::queue::change(&ops, *schedule, &change).await.context("changing the queue")?, json)
        }
    }
    Ok(())
}

fn ops_opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("unchanged".into(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
