//! Latency summaries and throughputs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most samples kept in a summary for the charts: beyond this, evenly spaced ranks of the sorted
/// samples (a quantile sketch that keeps the distribution's shape, min and max).
pub const KEPT_SAMPLES: usize = 2000;

/// Distribution of a set of measurements in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Sorted samples for the charts (all of them, or [`KEPT_SAMPLES`] evenly spaced ranks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples_ms: Vec<f64>,
}

/// The `p`-th percentile (0–100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Summary {
    /// Summarizes values in milliseconds.
    pub fn from_ms(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        let n = v.len();
        let samples = if n <= KEPT_SAMPLES {
            v.iter().map(|x| round3(*x)).collect()
        } else {
            (0..KEPT_SAMPLES).map(|i| round3(v[i * (n - 1) / (KEPT_SAMPLES - 1)])).collect()
        };
        Self {
            count: n,
            min_ms: round3(v[0]),
            p50_ms: round3(percentile(&v, 50.0)),
            p90_ms: round3(percentile(&v, 90.0)),
            p99_ms: round3(percentile(&v, 99.0)),
            max_ms: round3(v[n - 1]),
            mean_ms: round3(v.iter().sum::<f64>() / n as f64),
            samples_ms: samples,
        }
    }

    /// Summarizes durations.
    pub fn from_durations(v: &[Duration]) -> Self {
        Self::from_ms(v.iter().map(|d| d.as_secs_f64() * 1000.0).collect())
    }

    /// "p50 a / p99 b / max c ms", for tables.
    pub fn short(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!("p50 {} / p99 {} / max {} ms", fmt_ms(self.p50_ms), fmt_ms(self.p99_ms), fmt_ms(self.max_ms))
    }
}

/// A millisecond figure with sensible precision.
pub fn fmt_ms(ms: f64) -> String {
    let a = ms.abs();
    if a >= 100.0 {
        format!("{ms:.0}")
    } else if a >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// A count done in some time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    pub count: usize,
    pub seconds: f64,
    pub per_second: f64,
}

impl Throughput {
    pub fn new(count: usize, took: Duration) -> Self {
        let seconds = took.as_secs_f64();
        let per_second = if seconds > 0.0 { count as f64 / seconds } else { 0.0 };
        Self { count, seconds: round3(seconds), per_second: (per_second * 10.0).round() / 10.0 }
    }
}

/// Rounds a count per second for display: `12,345/s`.
pub fn fmt_rate(per_second: f64) -> String {
    format!("{}/s", group(per_second.round() as i64))
}

/// `12345` → `12,345`.
pub fn group(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}
