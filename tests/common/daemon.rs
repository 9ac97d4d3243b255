//! The daemons as real processes, for the tests that kill them (chaos, cluster): started from the
//! binaries cargo built, logging to a file, killed with SIGKILL or stopped with SIGTERM.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Daemon {
    pub name: String,
    pub bin: &'static str,
    pub args: Vec<String>,
    pub metrics_port: u16,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Daemon {
    pub fn new(name: impl Into<String>, bin: &'static str, args: Vec<String>, metrics_port: u16, dir: &std::path::Path) -> Self {
        let name = name.into();
        Daemon { log: dir.join(format!("{name}.log")), name, bin, args, metrics_port, child: None }
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let out = log.try_clone().unwrap();
        self.child = Some(Command::new(self.bin).args(&self.args).stdout(out).stderr(log).spawn().unwrap());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn sigterm(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
    }

    /// Waits for SIGTERM to have ended the process.
    pub fn wait(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Waits until `/health` answers 200. A process that exits meanwhile (a refused flag, a
    /// failed connection) fails the test at once with the end of its log, rather than after the
    /// whole timeout with nothing to go on.
    pub async fn healthy(&mut self, timeout: Duration) {
        let url = format!("http://127.0.0.1:{}/health", self.metrics_port);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if reqwest::get(&url).await.map(|r| r.status() == 200).unwrap_or(false) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{} exited ({status}) before it was healthy:\n{}", self.name, self.log_tail(30));
            }
            assert!(tokio::time::Instant::now() < deadline, "{} not healthy within {timeout:?}:\n{}", self.name, self.log_tail(30));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `n` lines of the process's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(n).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map(|m| m.len() as usize).unwrap_or(0)
    }

    /// The partitions of `topic` in the last assignment this process logged after byte `from` of
    /// its log (the consumer logs its whole set on every rebalance), if any.
    pub fn assigned(&self, topic: &str, from: usize) -> Option<BTreeSet<i32>> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let line = log.get(from..)?.lines().rev().find(|l| l.contains("partitions assigned"))?;
        let needle = format!("\"{topic}\", ");
        Some(line.match_indices(&needle).filter_map(|(i, _)| line[i + needle.len()..].split(')').next()?.trim().parse().ok()).collect())
    }
}

/// A test that fails part-way (a deadline not met) leaves no daemon running behind it, and says
/// what each one was doing: the end of its log is the only record of a run in CI.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log (last lines) ---\n{}", self.name, self.log_tail(25));
        }
    }
}
