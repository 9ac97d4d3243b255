//! The benchmark harness behind the `bench` binary (issue 7): the design document's spike
//! scenarios, driven over HTTP against a running stack, with PostgreSQL read for what HTTP cannot
//! show (expiry lateness, the statistics views for database work per expiry).
//!
//! Every scenario is a library function taking a [`Ctx`] (base URL and client, a pool on the
//! stack's database) and a small config, and returning a serializable result, so `bench/tests/bench.rs`
//! drives the very same code at a small size. [`report`] turns results into the JSON file and the
//! Markdown table with the design document's figure beside ours.
//!
//! | scenario | function | design document |
//! | --- | --- | --- |
//! | `queue-spike` | [`queue_spike::run`] | §7-2 notifications 10,000+/s |
//! | `seat-fight` | [`seat_fight::run`] | §2-2 bottleneck 1: 500 requests for one seat, 25 s |
//! | `sell-out` | [`sell_out::prepare`], then [`sell_out::run`] | — |
//! | `payments` | [`sell_out::payments`] | §2-2 bottleneck 2: 160 ms, 110 ms without ranking |
//! | `one-schedule` | [`sell_out::prepare`] and [`sell_out::run`], one schedule | — |
//! | `expiry` | [`expiry::run`] | §7-1: ±10 s before, ±100 ms after, 80 % less DB load |
//! | `end-to-end` | [`end_to_end::run`] | §7-2 |
//! | `notify-drain` | [`notify_drain::run`] | §7-2 notifications 10,000+/s, the worker alone |
//! | `limits` | [`limits::run`] | pgbench of the same database: the limits our figures are compared with |
//! | `versus-bullmq` | [`bullmq::run`] | the delay scheduler against BullMQ 5 on the same Redis |

pub mod bullmq;
pub mod cli;
pub mod client;
pub mod cpu;
pub mod end_to_end;
pub mod expiry;
pub mod limits;
pub mod notify_drain;
pub mod pg;
pub mod queue_spike;
pub mod report;
pub mod run;
pub mod seat_fight;
pub mod sell_out;
pub mod sse;
pub mod stats;
pub mod topic;

use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

pub use client::{Api, User};

/// What every scenario needs: the api, the stack's database, and whether to draw progress bars.
#[derive(Clone)]
pub struct Ctx {
    pub api: Api,
    pub pool: PgPool,
    /// Draw progress bars on stderr (off in tests).
    pub progress: bool,
    /// Makes names of created users and concerts unique to this run.
    pub run_id: String,
}

impl Ctx {
    pub fn new(api: Api, pool: PgPool, progress: bool) -> Self {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        Self { api, pool, progress, run_id }
    }

    /// A progress bar of `len` steps (hidden when progress is off).
    pub fn bar(&self, len: usize, msg: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>28} [{bar:32.cyan/blue}] {pos:>7}/{len:7} {per_sec:>12} {elapsed_precise}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(msg.to_string());
        bar
    }

    /// A spinner for a wait of unknown length.
    pub fn spinner(&self, msg: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed_precise}").expect("valid template"));
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    }

    /// Prints a line above the bars (or to stderr).
    pub fn say(&self, line: &str) {
        if self.progress {
            eprintln!("{line}");
        }
    }
}
