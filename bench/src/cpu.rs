//! Where the CPU went during a scenario (Linux `/proc`): CPU seconds of the stack's processes by
//! name, and of everything else on the machine (other work competing with the benchmark).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc` times (100 on Linux).
const TICKS: f64 = 100.0;

/// Process names (`comm`) reported on their own; `java` is Kafka here.
const GROUPS: &[&str] = &["api", "worker", "expirer", "delay-scheduler", "postgres", "redis-server", "java", "bench"];

/// A point-in-time reading.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    busy: f64,
    by_name: BTreeMap<String, f64>,
}

/// CPU used between two snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuUsage {
    pub wall_s: f64,
    /// CPU seconds the whole machine was busy.
    pub machine_busy_s: f64,
    /// CPU seconds by process name (`java` is Kafka); processes alive at both readings.
    pub by_process_s: BTreeMap<String, f64>,
    /// Busy time not accounted to the stack's processes (other work on the machine, short-lived
    /// processes such as compilers, the kernel).
    pub other_s: f64,
}

fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0.0 };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal …: busy = all − idle − iowait.
    let total: f64 = v.iter().take(8).sum();
    (total - v[3] - v[4]) / TICKS
}

/// Daemons of the stack: counted only when their command line contains the marker (when one is
/// given), so another stack's daemons on the same machine count as "other".
const DAEMONS: &[&str] = &["api", "worker", "expirer", "delay-scheduler"];

/// Reads every process's CPU time, keyed by pid and name.
pub fn snapshot(marker: Option<&str>) -> Snapshot {
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let mut comm = stat[open + 1..close].to_string();
            if let Some(m) = marker.filter(|_| DAEMONS.contains(&comm.as_str())) {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if !String::from_utf8_lossy(&cmdline).contains(m) {
                    comm = format!("other {comm}");
                }
            }
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            // After the comm: state is field 3; utime and stime are fields 14 and 15.
            let (Some(u), Some(s)) = (fields.get(11).and_then(|x| x.parse::<f64>().ok()), fields.get(12).and_then(|x| x.parse::<f64>().ok())) else {
                continue;
            };
            let key = format!("{pid}:{comm}");
            by_name.insert(key, (u + s) / TICKS);
        }
    }
    Snapshot { at: Instant::now(), busy: machine_busy(), by_name }
}

impl Snapshot {
    /// What was used since `self`.
    pub fn usage_since(&self, marker: Option<&str>) -> CpuUsage {
        let now = snapshot(marker);
        let mut by_process: BTreeMap<String, f64> = BTreeMap::new();
        for (key, t) in &now.by_name {
            // A process that started during the window (keys carry the pid) counts from zero.
            let before = self.by_name.get(key).copied().unwrap_or(0.0);
            let comm = key.split_once(':').map(|(_, c)| c).unwrap_or(key);
            if let Some(g) = GROUPS.iter().find(|g| **g == comm) {
                *by_process.entry((*g).to_string()).or_default() += t - before;
            }
        }
        let busy = now.busy - self.busy;
        let known: f64 = by_process.values().sum();
        let round = |x: f64| (x * 100.0).round() / 100.0;
        CpuUsage {
            wall_s: round(now.at.duration_since(self.at).as_secs_f64()),
            machine_busy_s: round(busy),
            by_process_s: by_process.into_iter().map(|(k, v)| (k, round(v))).collect(),
            other_s: round((busy - known).max(0.0)),
        }
    }
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Waits until the machine is quiet (less than [`QUIET_CORES`] of CPU busy over
/// [`QUIET_WINDOW`]), for at most `max`, and says how long that took.
///
/// Why: a scenario that starts the moment the previous one's last answer came back may also
/// measure the previous one's aftermath (the sell-out's holds still flowing through the relay,
/// Kafka, the delay scheduler and the seat streams). In the runs of issue 11's fourteenth pass
/// the machine was quiet 0.3 s after the sell-out, so this changes little today; it keeps each
/// scenario's figures its own whatever runs before it.
pub async fn settle(max: std::time::Duration) -> std::time::Duration {
    let started = Instant::now();
    let mut before = machine_busy();
    while started.elapsed() < max {
        tokio::time::sleep(QUIET_WINDOW).await;
        let now = machine_busy();
        if (now - before) / QUIET_WINDOW.as_secs_f64() < QUIET_CORES {
            break;
        }
        before = now;
    }
    started.elapsed()
}

/// A quiet machine: the idle stack (consumers polling, Kafka's and PostgreSQL's housekeeping)
/// stays well under this, a pipeline still catching up well over it.
const QUIET_CORES: f64 = 0.5;
const QUIET_WINDOW: std::time::Duration = std::time::Duration::from_millis(250);
