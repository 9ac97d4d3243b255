//! The report: results of one or more runs (merged), the machine they ran on, and the figures
//! set beside the design document's (§2-2, §7-1, §7-2), as JSON and as a Markdown table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::cpu::CpuUsage;
use super::end_to_end::EndToEnd;
use super::expiry::Expiry;
use super::notify_drain::NotifyDrain;
use super::queue_spike::QueueSpike;
use super::seat_fight::SeatFight;
use super::sell_out::{Payments, SellOutResult};
use super::stats::{fmt_ms, fmt_rate, group, Summary};

/// Where the numbers were taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub os: String,
    pub kernel: String,
    pub rustc: String,
    pub postgres: String,
    pub redis: String,
    pub kafka: String,
    pub git_rev: String,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

impl Machine {
    /// Reads the machine and the versions of the services (`kafka` as given, since the broker
    /// does not tell its version to clients).
    pub async fn detect(pool: &sqlx::PgPool, redis_url: Option<&str>, kafka: Option<&str>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
            .unwrap_or_else(|| std::env::consts::OS.into());
        let redis = match redis_url {
            Some(url) => redis_version(url).await.unwrap_or_else(|| "unknown".into()),
            None => "not asked (--redis-url)".into(),
        };
        Self {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model: cpuinfo.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())).unwrap_or_default(),
            memory_gib: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            os,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            rustc: first_line("rustc", &["--version"]),
            postgres: super::pg::server_version(pool).await,
            redis,
            kafka: kafka.unwrap_or("unknown").to_string(),
            git_rev: first_line("git", &["rev-parse", "--short", "HEAD"]),
        }
    }
}

async fn redis_version(url: &str) -> Option<String> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("redis_version:").map(|v| v.trim().to_string()))
}

/// One invocation of the bench.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunInfo {
    pub label: String,
    pub scenarios: Vec<String>,
    pub api: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// How the stack was started (flags), as the caller describes it.
    pub notes: Vec<String>,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started and ended.
    #[serde(default)]
    pub load_average_start: String,
    #[serde(default)]
    pub load_average_end: String,
}

/// Every scenario's result (absent when not run). Expiry results are keyed by label.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_spike: Option<QueueSpike>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seat_fight: Option<SeatFight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sell_out: Option<SellOutResult>,
    /// The sell-out's seats in one schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_schedule: Option<SellOutResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payments: Option<Payments>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expiry: BTreeMap<String, Expiry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_to_end: Option<EndToEnd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_drain: Option<NotifyDrain>,
    /// pgbench of the same database in the same run (issue 11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::limits::Limits>,
    /// The delay scheduler against BullMQ on the same Redis, by N (issue 11).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versus_bullmq: BTreeMap<String, crate::bullmq::Comparison>,
    /// CPU seconds by process during each scenario (key: scenario, `expiry <label>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cpu: BTreeMap<String, CpuUsage>,
}

impl Results {
    /// Fills what `self` lacks from `other` (later runs win for the same scenario).
    pub fn merge(&mut self, other: Results) {
        if other.queue_spike.is_some() {
            self.queue_spike = other.queue_spike;
        }
        if other.seat_fight.is_some() {
            self.seat_fight = other.seat_fight;
        }
        if other.sell_out.is_some() {
            self.sell_out = other.sell_out;
        }
        if other.one_schedule.is_some() {
            self.one_schedule = other.one_schedule;
        }
        if other.payments.is_some() {
            self.payments = other.payments;
        }
        self.expiry.extend(other.expiry);
        if other.end_to_end.is_some() {
            self.end_to_end = other.end_to_end;
        }
        if other.notify_drain.is_some() {
            self.notify_drain = other.notify_drain;
        }
        if other.limits.is_some() {
            self.limits = other.limits;
        }
        self.versus_bullmq.extend(other.versus_bullmq);
        self.cpu.extend(other.cpu);
    }
}

/// A line of the comparison table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    pub what: String,
    pub ours: String,
    pub document: String,
    /// Section of the design document ("—" when it has no figure).
    pub reference: String,
    /// The size we measured it at.
    pub size: String,
}

fn fig(what: &str, ours: String, document: &str, reference: &str, size: String) -> Figure {
    Figure { what: what.into(), ours, document: document.into(), reference: reference.into(), size }
}

/// One of our figures beside what the machine's PostgreSQL does at the same concurrency.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Ratio {
    pub what: String,
    pub ours: String,
    pub limit: String,
    /// ours ÷ limit for rates; limit ÷ ours for times (so 1.0 is "as fast as the database").
    pub ratio: f64,
    pub goal: String,
}

/// Our rates and times beside the pgbench limits of the same run.
pub fn ratios(r: &Results) -> Vec<Ratio> {
    let Some(l) = &r.limits else { return Vec::new() };
    let mut out = Vec::new();
    let rate = |what: &str, ours: f64, clients: usize, goal: &str, out: &mut Vec<Ratio>| {
        if let Some(lim) = l.get("insert", clients) {
            out.push(Ratio {
                what: what.into(),
                ours: fmt_rate(ours),
                limit: format!("{} (insert-and-commit, {} clients)", fmt_rate(lim.tps), lim.clients),
                ratio: if lim.tps > 0.0 { (ours / lim.tps * 1000.0).round() / 1000.0 } else { 0.0 },
                goal: goal.into(),
            });
        }
    };
    if let Some(q) = &r.queue_spike {
        let c = q.config.as_ref().map(|c| c.concurrency).unwrap_or(64);
        rate("Queue: new entrants per second", q.entry.per_second, c, "≥ 4,000/s, p99 ≤ 50 ms", &mut out);
        rate("Notifications stored per second during the queue spike", q.notifications.stored_per_second, c, "≥ 5,000/s", &mut out);
    }
    if let Some(s) = &r.sell_out {
        let c = s.config.as_ref().map(|c| c.clients).unwrap_or(64);
        rate("Holds per second across schedules", s.throughput.per_second, c, "≥ 2,000/s", &mut out);
    }
    if let Some(s) = &r.one_schedule {
        let c = s.config.as_ref().map(|c| c.clients).unwrap_or(64);
        rate("Holds per second in one schedule", s.throughput.per_second, c, "—", &mut out);
    }
    if let Some(p) = &r.payments {
        let c = p.config.as_ref().map(|c| c.concurrency).unwrap_or(64);
        rate("Payments per second", p.throughput.per_second, c, "≥ 1,500/s, p99 ≤ 50 ms at 64 clients", &mut out);
    }
    if let Some(f) = &r.seat_fight {
        let c = f.config.as_ref().map(|c| c.concurrency).unwrap_or(64);
        if let Some(lim) = l.get("insert", c).filter(|l| l.tps > 0.0) {
            // The database alone would commit one row per request in fighters ÷ tps.
            let floor_ms = f.fighters as f64 / lim.tps * 1000.0;
            out.push(Ratio {
                what: format!("{} holds on one seat: all decided", f.fighters),
                ours: format!("{} ms", fmt_ms(f.all_decided_ms)),
                limit: format!("{} ms ({} one-row commits at {})", fmt_ms(floor_ms), f.fighters, fmt_rate(lim.tps)),
                ratio: if f.all_decided_ms > 0.0 { (floor_ms / f.all_decided_ms * 1000.0).round() / 1000.0 } else { 0.0 },
                goal: "≤ 150 ms".into(),
            });
        }
    }
    out
}

/// The whole report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub generated_at: Option<DateTime<Utc>>,
    pub machine: Machine,
    pub runs: Vec<RunInfo>,
    pub results: Results,
    /// Derived from `results` by [`figures`] (kept in the JSON for readers of the file alone).
    pub figures: Vec<Figure>,
    /// Derived from `results` by [`ratios`].
    #[serde(default)]
    pub ratios: Vec<Ratio>,
}

impl Report {
    /// Recomputes the figures and the time stamp.
    pub fn finish(mut self) -> Self {
        self.figures = figures(&self.results);
        self.ratios = ratios(&self.results);
        self.generated_at = Some(Utc::now());
        self
    }

    /// Merges several reports (e.g. the runs of `scripts/bench.sh`) into one.
    pub fn merge(reports: Vec<Report>) -> Report {
        let mut out = Report::default();
        for r in reports {
            if out.machine.cpus == 0 {
                out.machine = r.machine;
            }
            out.runs.extend(r.runs);
            out.results.merge(r.results);
        }
        out.finish()
    }

    pub fn read(path: &Path) -> Result<Report> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes `<prefix>.json` and `<prefix>.md`.
    pub fn write(&self, prefix: &Path) -> Result<()> {
        if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let json = prefix.with_extension("json");
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n").with_context(|| format!("writing {}", json.display()))?;
        let md = prefix.with_extension("md");
        std::fs::write(&md, markdown(self)).with_context(|| format!("writing {}", md.display()))?;
        Ok(())
    }
}

fn pct_less(before: f64, after: f64) -> String {
    if before <= 0.0 {
        return "n/a".into();
    }
    let p = (1.0 - after / before) * 100.0;
    if p >= 0.0 {
        format!("{p:.0} % less")
    } else {
        format!("{:.0} % more", -p)
    }
}

/// The comparison with the design document, from whatever scenarios ran.
pub fn figures(r: &Results) -> Vec<Figure> {
    let mut out = Vec::new();
    if let Some(f) = &r.seat_fight {
        let size = format!("{} simultaneous requests, one seat", f.fighters);
        out.push(fig(
            "Seat fight: time until every request has its answer",
            format!("{} ms", fmt_ms(f.all_decided_ms)),
            "25 s (500 × 50 ms behind a distributed lock)",
            "§2-2 bottleneck 1",
            size.clone(),
        ));
        out.push(fig("Seat fight: decision latency per request", f.latency.short(), "up to 25 s of waiting", "§2-2 bottleneck 1", size.clone()));
        out.push(fig(
            "Seat fight: winners",
            format!("{} winner, {} × 409, {} other; {} active reservation(s) in PostgreSQL", f.winners, f.losers, f.others, f.db_active_reservations),
            "1 winner",
            "§2-2 bottleneck 1",
            size,
        ));
    }
    if let Some(s) = &r.sell_out {
        let size = s.config.as_ref().map(|c| format!("{} schedules × {} seats, {} clients", c.schedules, c.seats_per_schedule, c.clients)).unwrap_or_default();
        out.push(fig(
            "Sell-out: holds per second (latency of every attempt)",
            format!("{} ({}, {} conflicts)", fmt_rate(s.throughput.per_second), s.latency.short(), group(s.conflicts as i64)),
            "—",
            "—",
            size,
        ));
    }
    if let Some(s) = &r.one_schedule {
        let size = s.config.as_ref().map(|c| format!("1 schedule × {} seats, {} clients", c.seats_per_schedule, c.clients)).unwrap_or_default();
        out.push(fig(
            "One-schedule sale: holds per second (latency of every attempt)",
            format!("{} ({}, {} conflicts)", fmt_rate(s.throughput.per_second), s.latency.short(), group(s.conflicts as i64)),
            "—",
            "—",
            size,
        ));
    }
    if let Some(p) = &r.payments {
        let size = p.config.as_ref().map(|c| format!("{} payments, {} concurrent", p.payments, c.concurrency)).unwrap_or_default();
        out.push(fig(
            "Payment latency (ranking by a Kafka consumer)",
            format!("p50 {} / p99 {} ms ({} confirmed, {})", fmt_ms(p.latency.p50_ms), fmt_ms(p.latency.p99_ms), p.confirmed, fmt_rate(p.throughput.per_second)),
            "160 ms; 110 ms without the synchronous ranking",
            "§2-2 bottleneck 2",
            size.clone(),
        ));
        out.push(fig(
            "Ranking shows every payment",
            p.ranking_caught_up_ms.map(|ms| format!("{} ms after the last payment's answer", fmt_ms(ms))).unwrap_or_else(|| "not within the wait".into()),
            "inside the payment (50 ms of its 160 ms)",
            "§2-2 bottleneck 2",
            size,
        ));
    }
    let rate_of = |e: &Expiry| format!("{} (worked off at {:.0} expiries/s)", e.lateness.short(), e.expiries_per_second);
    let size_of = |e: &Expiry| format!("{} holds, expiries spread over {} ms", group(e.holds as i64), e.expiry_spread_ms);
    if let Some(a) = r.expiry.get("after") {
        out.push(fig("Expiry lateness, delay-scheduler pipeline (after)", rate_of(a), "±100 ms", "§7-1", size_of(a)));
    }
    if let Some(b) = r.expiry.get("before") {
        out.push(fig("Expiry lateness, 10 s polling scan (before)", rate_of(b), "up to 10 s (±10 s)", "§7-1", size_of(b)));
    }
    for (label, e) in &r.expiry {
        if label != "after" && label != "before" {
            out.push(fig(&format!("Expiry lateness ({label})"), e.lateness.short(), "—", "—", size_of(e)));
        }
    }
    if let (Some(a), Some(b)) = (r.expiry.get("after"), r.expiry.get("before")) {
        out.push(fig(
            "Database work per expiry: `reservations` rows read (seq + index)",
            format!(
                "after {:.2}, before {:.2}: {}",
                a.rows_read_per_expiry,
                b.rows_read_per_expiry,
                pct_less(b.rows_read_per_expiry, a.rows_read_per_expiry)
            ),
            "80 % less DB load (no 10 s full scans)",
            "§7-1",
            format!("{} / {} expiries", group(a.expired as i64), group(b.expired as i64)),
        ));
        out.push(fig(
            "Database work per expiry: whole-database tuples returned + fetched",
            format!(
                "after {:.1}, before {:.1}: {}",
                a.db_tuples_per_expiry,
                b.db_tuples_per_expiry,
                pct_less(b.db_tuples_per_expiry, a.db_tuples_per_expiry)
            ),
            "80 % less DB load",
            "§7-1",
            "every process, incl. notifications".into(),
        ));
    }
    if let Some(q) = &r.queue_spike {
        let n = &q.notifications;
        out.push(fig(
            "Notifications stored per second (outbox → Kafka → worker)",
            format!("{} (peak second {}; outbox → stored {})", fmt_rate(n.stored_per_second), group(n.peak_second), n.outbox_to_stored.short()),
            "10,000+ per second",
            "§7-2",
            format!("burst of {} queue notifications", group(n.stored as i64)),
        ));
    }
    if let Some(d) = &r.notify_drain {
        let size = format!("backlog of {} requests produced to Kafka, then one worker started", group(d.stored as i64));
        out.push(fig(
            "Notifications consumed + stored per second (the worker alone, from Kafka)",
            format!("{} (peak second {}){}", fmt_rate(d.stored_per_second), group(d.peak_stored_second), if d.drained { "" } else { "; NOT drained" }),
            "10,000+ per second",
            "§7-2",
            size.clone(),
        ));
        out.push(fig(
            "Notifications delivered per second (the worker alone, log channel)",
            format!(
                "{} (peak second {}; all delivered {} after the worker started)",
                fmt_rate(d.delivered_per_second),
                group(d.peak_delivered_second),
                d.all_delivered_after_start_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "never".into())
            ),
            "10,000+ per second",
            "§7-2",
            size,
        ));
    }
    if let Some(q) = &r.queue_spike {
        let users = q.config.as_ref().map(|c| c.users).unwrap_or(q.entry.count);
        out.push(fig(
            "Queue spike: entries per second (entry latency)",
            format!("{} ({})", fmt_rate(q.entry.per_second), q.entry_latency.short()),
            "—",
            "§2-1",
            format!("{} users, {} concurrent", group(users as i64), q.config.as_ref().map(|c| c.concurrency).unwrap_or(0)),
        ));
        out.push(fig("Queue spike: position query latency", q.position_latency.short(), "—", "—", format!("{} queries", group(q.position_latency.count as i64))));
        out.push(fig(
            "Queue spike: admission rate",
            if q.admission.after_last_entry_ms > 0.0 {
                format!("{} ({} admitted, the last {} ms after the last entry)", fmt_rate(q.admission.per_second), group(q.admission.active as i64), q.admission.after_last_entry_ms)
            } else {
                format!("{} ({} admitted, keeping pace with the entries)", fmt_rate(q.admission.per_second), group(q.admission.active as i64))
            },
            "—",
            "—",
            format!("{} users", group(users as i64)),
        ));
    }
    if let Some(e) = &r.end_to_end {
        let size = format!("{} users with open streams", e.streams);
        out.push(fig(
            "Payment answer → PAYMENT_CONFIRMED on the SSE stream",
            format!(
                "p50 {} / p99 {} ms ({} missing; min {} ms: an event can beat the answer, which is sent after the commit)",
                fmt_ms(e.payment_to_stream.p50_ms),
                fmt_ms(e.payment_to_stream.p99_ms),
                e.payment_events_missing,
                fmt_ms(e.payment_to_stream.min_ms)
            ),
            "— (the payment answer pays +10 ms for the Kafka publish)",
            "§7-2",
            size.clone(),
        ));
        out.push(fig(
            "Hold's expiresAt → RESERVATION_EXPIRED on the SSE stream",
            format!("{} ({} missing)", e.expiry_to_stream.short(), e.expiry_events_missing),
            "—",
            "—",
            size,
        ));
    }
    out
}

fn row(md: &mut String, cells: &[&str]) {
    let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    let _ = writeln!(md, "| {} |", cells.join(" | "));
}

fn summary_row(md: &mut String, name: &str, s: &Summary) {
    row(md, &[name, &group(s.count as i64), &fmt_ms(s.p50_ms), &fmt_ms(s.p90_ms), &fmt_ms(s.p99_ms), &fmt_ms(s.max_ms), &fmt_ms(s.mean_ms)]);
}

/// The report as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark: the design document's spike, measured\n");
    let _ = writeln!(
        md,
        "Generated {} by `scripts/bench.sh` (the `bench` binary, `bench/src/`). Every figure below was measured \
         on the machine described here, with the whole stack (PostgreSQL, Redis, Kafka and the four daemons) \
         and the load generator on it at once.\n",
        r.generated_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default()
    );
    let m = &r.machine;
    let _ = writeln!(md, "## Machine\n");
    row(&mut md, &["", ""]);
    row(&mut md, &["---", "---"]);
    row(&mut md, &["CPU", &format!("{} × {}", m.cpus, m.cpu_model)]);
    row(&mut md, &["memory", &format!("{} GiB", m.memory_gib)]);
    row(&mut md, &["OS / kernel", &format!("{} / {}", m.os, m.kernel)]);
    row(&mut md, &["rustc", &m.rustc]);
    row(&mut md, &["PostgreSQL", &m.postgres]);
    row(&mut md, &["Redis", &m.redis]);
    row(&mut md, &["Kafka", &m.kafka]);
    row(&mut md, &["commit", &m.git_rev]);
    let _ = writeln!(md, "\n## Runs and configuration\n");
    row(&mut md, &["run", "scenarios", "stack", "load average at start → end"]);
    row(&mut md, &["---", "---", "---", "---"]);
    for run in &r.runs {
        row(&mut md, &[&run.label, &run.scenarios.join(", "), &run.notes.join("; "), &format!("{} → {}", run.load_average_start, run.load_average_end)]);
    }

    let _ = writeln!(md, "\n## The design document's figures beside ours\n");
    row(&mut md, &["what", "ours", "design document", "§", "size"]);
    row(&mut md, &["---", "---", "---", "---", "---"]);
    for f in &r.figures {
        row(&mut md, &[&f.what, &f.ours, &f.document, &f.reference, &f.size]);
    }

    if let Some(l) = &r.results.limits {
        let _ = writeln!(md, "\n## Against the machine's own limits (pgbench in the same run)\n");
        let _ = writeln!(
            md,
            "`pgbench` against the same database, at the same concurrency, just before the scenarios: a one-row \
             insert-and-commit (a JSON row of an envelope's size) and a one-row primary-key read. The ratio is \
             ours ÷ limit for rates, limit ÷ ours for times: 1.0 would be the database's own speed for one \
             row per request. The absolute figures move with the machine's load; the ratios are what we track.\n"
        );
        row(&mut md, &["what", "ours", "limit", "ratio", "goal"]);
        row(&mut md, &["---", "---:", "---", "---:", "---"]);
        for x in &r.ratios {
            row(&mut md, &[&x.what, &x.ours, &x.limit, &format!("{:.2}", x.ratio), &x.goal]);
        }
        let _ = writeln!(md);
        row(&mut md, &["pgbench", "clients", "transactions/s", "average latency"]);
        row(&mut md, &["---", "---:", "---:", "---:"]);
        for x in &l.runs {
            let kind = if x.kind == "insert" { "one-row insert-and-commit" } else { "one-row read" };
            row(&mut md, &[kind, &x.clients.to_string(), &fmt_rate(x.tps), &format!("{:.1} ms", x.latency_avg_ms)]);
        }
    }
    if !r.results.versus_bullmq.is_empty() {
        let _ = writeln!(md, "\n## Delay scheduler against BullMQ 5, same Redis, same workload\n");
        let _ = writeln!(
            md,
            "N holds whose `expiresAt` fall in one window, inserted straight into PostgreSQL through the real \
             outbox path (no HTTP), so the whole pipeline runs: outbox → `reservation.created` → delay-scheduler \
             → `reservation.expiration` → expirer; lateness = `expired_at − expiresAt` from PostgreSQL. BullMQ: \
             N delayed jobs due in the same window on the same Redis, one Worker process; lateness = job start − \
             due time. Our two stages split each hold's lateness at the broker append time of its \
             `reservation.expiration` (`LogAppendTime`, read back from the topic); their percentiles do not add up.\n"
        );
        row(&mut md, &["N", "window", "ours: expired_at − expiresAt", "ours: Kafka append − expiresAt (scheduler stage)", "ours: expired_at − Kafka append (expirer stage)", "BullMQ: start − due", "BullMQ version"]);
        row(&mut md, &["---:", "---:", "---", "---", "---", "---", "---"]);
        for c in r.results.versus_bullmq.values() {
            row(&mut md, &[
                &group(c.n as i64),
                &format!("{} ms", c.window_ms),
                &c.ours.as_ref().map(|o| format!("{} ({} of {} expired)", o.lateness.short(), o.expired, o.holds)).unwrap_or_else(|| "not run".into()),
                // Exact from the topic's append times when it was read back; else the scheduler's
                // own histogram (its Kafka acknowledgement time, bucket bounds).
                &c.ours.as_ref().and_then(|o| o.append_lateness.as_ref().map(|s| s.short()).or_else(|| o.scheduler_stage.clone())).unwrap_or_else(|| "—".into()),
                &c.ours.as_ref().and_then(|o| o.expirer_stage.as_ref().map(|s| s.short())).unwrap_or_else(|| "—".into()),
                &c.bullmq.as_ref().map(|b| format!("{} ({} of {} started)", b.lateness.short(), b.started, b.jobs)).unwrap_or_else(|| c.bullmq_error.clone().unwrap_or_else(|| "not run".into())),
                &c.bullmq.as_ref().map(|b| b.version.clone()).unwrap_or_default(),
            ]);
        }
    }
    let _ = writeln!(md, "\n## Latencies in detail (ms)\n");
    row(&mut md, &["measure", "count", "p50", "p90", "p99", "max", "mean"]);
    row(&mut md, &["---", "---:", "---:", "---:", "---:", "---:", "---:"]);
    let res = &r.results;
    if let Some(q) = &res.queue_spike {
        summary_row(&mut md, "queue entry", &q.entry_latency);
        summary_row(&mut md, "queue position query", &q.position_latency);
        summary_row(&mut md, "notification: outbox row → stored", &q.notifications.outbox_to_stored);
    }
    if let Some(f) = &res.seat_fight {
        summary_row(&mut md, "seat fight: every request", &f.latency);
        summary_row(&mut md, "seat fight: losers (409)", &f.loser_latency);
    }
    if let Some(s) = &res.sell_out {
        summary_row(&mut md, "sell-out: every attempt", &s.latency);
        summary_row(&mut md, "sell-out: successful holds", &s.hold_latency);
    }
    if let Some(s) = &res.one_schedule {
        summary_row(&mut md, "one-schedule sale: every attempt", &s.latency);
    }
    if let Some(p) = &res.payments {
        summary_row(&mut md, "payment", &p.latency);
    }
    for (label, e) in &res.expiry {
        summary_row(&mut md, &format!("expiry lateness ({label})"), &e.lateness);
    }
    if let Some(e) = &res.end_to_end {
        summary_row(&mut md, "payment answer → SSE event", &e.payment_to_stream);
        summary_row(&mut md, "expiresAt → SSE event", &e.expiry_to_stream);
        summary_row(&mut md, "  of which expiresAt → expired_at", &e.expiry_lateness);
        summary_row(&mut md, "  of which expired_at → SSE event", &e.expired_to_stream);
    }

    if let Some(d) = &res.notify_drain {
        let _ = writeln!(md, "\n## Notification drain (the worker alone)\n");
        let _ = writeln!(
            md,
            "- {} `notification.request` envelopes produced straight to Kafka at {} while no worker ran; then one worker started (`{}`).\n\
             - Stored {} (duplicates {}), delivered {}{}. Worker start → all stored {}, → all delivered {} (includes start-up and the consumer group join).\n\
             - Consumed + stored {} (first → last row's `created_at`, peak second {}); delivered {} (first row stored → last delivered, peak second {}).",
            group(d.produced.count as i64),
            fmt_rate(d.produced.per_second),
            d.worker,
            group(d.stored as i64),
            d.duplicates,
            group(d.delivered as i64),
            if d.drained { "" } else { " (NOT drained within the wait)" },
            d.all_stored_after_start_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "never".into()),
            d.all_delivered_after_start_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "never".into()),
            fmt_rate(d.stored_per_second),
            group(d.peak_stored_second),
            fmt_rate(d.delivered_per_second),
            group(d.peak_delivered_second),
        );
    }

    if let Some(q) = &res.queue_spike {
        let _ = writeln!(md, "\n## Queue spike\n");
        let n = &q.notifications;
        let _ = writeln!(
            md,
            "- {} users created at {}; {} entries at {} ({} errors); {} position queries during the entries, {} errors.\n\
             - Admission: {} ACTIVE, {} (measured by {}), all admitted {:.2} s after the first entry, {} ms after the last.\n\
             - Notifications: {} of {} stored{}; stored at {} (peak second {}), published by the relay at {}; {} delivered by the log channel during the wait ({}).",
            group(q.user_creation.count as i64),
            fmt_rate(q.user_creation.per_second),
            group(q.entry.count as i64),
            fmt_rate(q.entry.per_second),
            q.entry_errors,
            group(q.position_queries_during_entry as i64),
            q.position_errors,
            group(q.admission.active as i64),
            fmt_rate(q.admission.per_second),
            q.admission.measured_by,
            q.admission.all_admitted_after_s,
            q.admission.after_last_entry_ms,
            group(n.stored as i64),
            group(n.expected as i64),
            if n.drained { "" } else { " (NOT drained within the wait)" },
            fmt_rate(n.stored_per_second),
            group(n.peak_second),
            fmt_rate(n.published_per_second),
            group(n.delivered as i64),
            fmt_rate(n.delivered_per_second),
        );
    }
    if !res.expiry.is_empty() {
        let _ = writeln!(md, "\n## Expiry: before and after\n");
        row(&mut md, &["", "holds", "TTL", "hold phase", "spread", "expired", "expired/s", "early", "lateness p50 / p99 / max", "reservations rows read / expiry", "scans / expiry", "db tuples / expiry", "db commits / expiry", "clean stats"]);
        row(&mut md, &["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---"]);
        for (label, e) in &res.expiry {
            row(
                &mut md,
                &[
                    label,
                    &group(e.holds as i64),
                    &format!("{:.1} s", e.ttl_ms / 1000.0),
                    &format!("{} ms", e.hold_phase_ms),
                    &format!("{} ms", e.expiry_spread_ms),
                    &group(e.expired as i64),
                    &format!("{:.0}", e.expiries_per_second),
                    &e.early.to_string(),
                    &format!("{} / {} / {} ms", fmt_ms(e.lateness.p50_ms), fmt_ms(e.lateness.p99_ms), fmt_ms(e.lateness.max_ms)),
                    &format!("{:.2}", e.rows_read_per_expiry),
                    &format!("{:.2}", e.scans_per_expiry),
                    &format!("{:.1}", e.db_tuples_per_expiry),
                    &format!("{:.2}", e.db_commits_per_expiry),
                    if e.stats_clean { "yes" } else { "no" },
                ],
            );
        }
        if res.expiry.values().any(|e| !e.stages.is_empty()) {
            let _ = writeln!(md, "\nWhere the lateness accrues, from the daemons' own histograms over the same holds (percentiles are histogram bucket bounds):\n");
            row(&mut md, &["run", "stage", "count", "mean", "p50 ≤", "p99 ≤"]);
            row(&mut md, &["---", "---", "---:", "---:", "---:", "---:"]);
            let bound = |x: Option<f64>| x.map(|v| format!("{} ms", fmt_ms(v))).unwrap_or_else(|| "> 30 s".into());
            for (label, e) in &res.expiry {
                for s in &e.stages {
                    row(&mut md, &[label, &s.stage, &group(s.count as i64), &format!("{} ms", fmt_ms(s.mean_ms)), &bound(s.p50_at_most_ms), &bound(s.p99_at_most_ms)]);
                }
            }
        }
        let _ = writeln!(
            md,
            "\nDatabase work is counted between two snapshots of `pg_stat_user_tables` / `pg_stat_database`: \
             after every hold was taken (and the counters settled) and after every hold expired (settled again). \
             Rows read = `seq_tup_read + idx_tup_fetch` on `reservations`; whole-database figures include every \
             process (e.g. the worker storing the expiry notifications)."
        );
    }
    if !res.cpu.is_empty() {
        let _ = writeln!(md, "\n## Where the CPU went (CPU seconds during each scenario)\n");
        let names = ["api", "worker", "expirer", "delay-scheduler", "postgres", "redis-server", "java", "bench"];
        let mut head = vec!["scenario", "wall s", "machine busy"];
        head.extend(names.iter().map(|n| if *n == "java" { "kafka (java)" } else { n }));
        head.push("other");
        row(&mut md, &head);
        row(&mut md, &head.iter().enumerate().map(|(i, _)| if i == 0 { "---" } else { "---:" }).collect::<Vec<_>>());
        for (scenario, c) in &res.cpu {
            let busy_pct = if c.wall_s > 0.0 { c.machine_busy_s / (c.wall_s * r.machine.cpus.max(1) as f64) * 100.0 } else { 0.0 };
            let mut cells = vec![scenario.clone(), format!("{:.1}", c.wall_s), format!("{:.1} ({busy_pct:.0} %)", c.machine_busy_s)];
            cells.extend(names.iter().map(|n| c.by_process_s.get(*n).map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into())));
            cells.push(format!("{:.1}", c.other_s));
            row(&mut md, &cells.iter().map(String::as_str).collect::<Vec<_>>());
        }
        let _ = writeln!(
            md,
            "\n\"other\" is busy time outside the stack's processes: other work on the same machine (such as \
             compilers of concurrent sessions), short-lived processes and the kernel. `postgres` counts every \
             PostgreSQL process (all databases). The sell-out's and the one-schedule sale's rows cover their holds \
             only: their setup (schedules, bookers queued until ACTIVE, and the notifications that starts) runs \
             before, and the holds start once the machine is quiet again."
        );
    }
    let _ = writeln!(md, "\n## Charts\n");
    let _ = writeln!(md, "![Expiry lateness, before vs after](expiry-lateness.png)\n");
    let _ = writeln!(md, "![Latency histograms](latencies.png)");
    md
}
