//! The fault tests' hand on `scripts/services.sh` (issue 15, item 14).
//!
//! Two guards against faulting the wrong services:
//! - the script is found at run time, in the checkout cargo runs the test from
//!   (`CARGO_MANIFEST_DIR` in the test's environment), not at the path compiled into the binary,
//!   which is another clone's when a target directory is shared;
//! - before acting, [`check`] asks the script which services it would act on (`services.sh env`,
//!   with this process's `BOOKING_*` settings) and whether its data directory really runs them
//!   (`services.sh status`), and fails loudly unless those are the ones the test's daemons use
//!   (`DATABASE_URL`, `REDIS_URL`, `KAFKA_BROKERS`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The checkout the tests run from: cargo's `CARGO_MANIFEST_DIR` at run time; the compile-time
/// one only when the binary is run by hand (and then [`check`] still guards).
pub fn repo_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn script() -> PathBuf {
    repo_dir().join("scripts/services.sh")
}

/// `host:port` of a URL or broker list.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// Whether `script`, run with this process's environment plus `extra`, acts on the services this
/// process's daemons use; when `running`, also that its data directory runs all three now.
pub fn check_with(script: &std::path::Path, extra: &[(&str, &str)], running: bool) -> Result<(), String> {
    let out = Command::new("bash").arg(script).arg("env").envs(extra.iter().copied()).stderr(Stdio::inherit()).output().map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} env failed", script.display()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut wrong = Vec::new();
    for name in ["DATABASE_URL", "REDIS_URL", "KAFKA_BROKERS"] {
        let ours = std::env::var(name).map_err(|_| format!("{name} is not set: run the tests through scripts/test.sh"))?;
        let theirs = text.lines().find_map(|l| l.strip_prefix(&format!("export {name}="))).unwrap_or_default();
        if authority(theirs) != authority(&ours) {
            wrong.push(format!("{name}: the script's {theirs:?}, the daemons' {ours:?}"));
        }
    }
    if !wrong.is_empty() {
        return Err(format!("{} would act on other services than the ones this test's daemons use ({})", script.display(), wrong.join("; ")));
    }
    if running {
        let status = Command::new("bash").arg(script).arg("status").envs(extra.iter().copied()).output().map_err(|e| format!("{}: {e}", script.display()))?;
        if !status.status.success() {
            return Err(format!(
                "{} does not run the services this test's daemons use (another checkout's or another data directory's script?):\n{}",
                script.display(),
                String::from_utf8_lossy(&status.stdout)
            ));
        }
    }
    Ok(())
}

/// Runs `services.sh <cmd>` (`stop-kafka`, `start-redis`…) after [`check_with`]; panics loudly if
/// the script would act on services other than this test's (before a `stop-*`, also unless they
/// all run from the script's data directory).
pub fn run(cmd: &str) {
    let script = script();
    if let Err(e) = check_with(&script, &[], cmd.starts_with("stop-")) {
        panic!("refusing to run services.sh {cmd}: {e}");
    }
    // A restart in the middle of a fault test competes with the load and the daemons for two
    // cores; the script's 90 s default is for a developer's idle machine. CI once ran out of it.
    let timeout = std::env::var("BOOKING_SERVICES_TIMEOUT").unwrap_or_else(|_| "240".into());
    let ok = Command::new("bash")
        .arg(&script)
        .arg(cmd)
        .env("BOOKING_SERVICES_TIMEOUT", timeout)
        .stdout(Stdio::null())
        .status()
        .expect("services.sh runs")
        .success();
    assert!(ok, "services.sh {cmd}");
}
