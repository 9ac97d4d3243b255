//! The two commands and the fault tests' guard (issue 15, items 13 and 14).
//!
//! - `scripts/test.sh` and `scripts/run.sh` stop at the first failing step, with that step's own
//!   message as the last line: here `services.sh up` fails because the Kafka port is taken. They
//!   run against a private, empty data directory and private ports, so nothing is started; a
//!   stand-in `cargo` on `PATH` shows whether the run wrongly went on.
//! - A fault test refuses to act through a `services.sh` that would touch other services than its
//!   daemons use, or whose data directory does not run them (another clone's, item 14).

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Sandbox {
    dir: PathBuf,
    /// Held for the whole test: the port `services.sh up` finds taken.
    _taken: TcpListener,
    taken_port: u16,
}

impl Sandbox {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("scripts-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        // A stand-in cargo: if a script gets past the failed step, it says so and "succeeds".
        let cargo = dir.join("bin/cargo");
        std::fs::write(&cargo, "#!/bin/sh\necho \"stand-in cargo ran: $*\"\nexit 0\n").unwrap();
        std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        Sandbox { dir, _taken: taken, taken_port }
    }

    /// Runs `script args…` with stdout and stderr merged in order; returns (success, last line).
    fn run(&self, script: &str, args: &[&str]) -> (bool, String, String) {
        let repo = common::services::repo_dir();
        let path = format!("{}:{}", self.dir.join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("bash")
            .arg("-c")
            .arg("\"$0\" \"$@\" 2>&1")
            .arg(repo.join(script))
            .args(args)
            .env("PATH", path)
            .env("CARGO_TARGET_DIR", self.dir.join("target"))
            .env("BOOKING_DATA_DIR", self.dir.join("data"))
            .env("BOOKING_KAFKA_PORT", self.taken_port.to_string())
            .env("BOOKING_KAFKA_CONTROLLER_PORT", free_port().to_string())
            .env("BOOKING_PG_PORT", free_port().to_string())
            .env("BOOKING_REDIS_PORT", free_port().to_string())
            .env("LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().to_string();
        (out.status.success(), last, text)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_stopped_at_services_up(sb: &Sandbox, script: &str) {
    let (ok, last, all) = sb.run(script, &["--help"]);
    println!("{script}:\n{all}");
    assert!(!ok, "{script} exits non-zero when services.sh up fails");
    assert!(!all.contains("stand-in cargo ran"), "{script} went on past the failed step:\n{all}");
    let want = format!("port 127.0.0.1:{} is already used by another process", sb.taken_port);
    assert!(last.contains("ERROR") && last.contains(&want), "{script}'s last line is services.sh's own message, got {last:?}");
}

#[test]
fn test_sh_stops_when_the_services_do_not_start_with_their_message_last() {
    assert_stopped_at_services_up(&Sandbox::new(), "scripts/test.sh");
}

#[test]
fn run_sh_stops_when_the_services_do_not_start_with_their_message_last() {
    assert_stopped_at_services_up(&Sandbox::new(), "scripts/run.sh");
}

fn check(extra: &[(&str, &str)], running: bool) -> Result<(), String> {
    common::services::check_with(&common::services::script(), extra, running)
}

fn port_of(var: &str) -> String {
    std::env::var(var).unwrap().rsplit(':').next().unwrap().split('/').next().unwrap().to_string()
}

#[test]
fn a_fault_test_refuses_a_services_script_that_would_act_on_other_services() {
    // The services this test's daemons use, as scripts/test.sh started them: accepted.
    check(&[], true).expect("this checkout's services.sh runs the services the tests use");

    // Other ports (another stack): refused before anything is stopped.
    let other = free_port().to_string();
    let err = check(&[("BOOKING_KAFKA_PORT", &other)], false).unwrap_err();
    assert!(err.contains("KAFKA_BROKERS") && err.contains(&other), "{err}");

    // The same ports but another data directory, where nothing runs (another clone's
    // services.sh: its `stop-kafka` would say "not running" and leave the real broker up, and
    // the test would pass without an outage): refused.
    let empty = std::env::temp_dir().join(format!("no-services-{}", uuid::Uuid::new_v4().simple()));
    let (pg, redis, kafka) = (port_of("DATABASE_URL"), port_of("REDIS_URL"), port_of("KAFKA_BROKERS"));
    let env = [
        ("BOOKING_DATA_DIR", empty.to_str().unwrap()),
        ("BOOKING_PG_PORT", pg.as_str()),
        ("BOOKING_REDIS_PORT", redis.as_str()),
        ("BOOKING_KAFKA_PORT", kafka.as_str()),
    ];
    check(&env, false).expect("same addresses");
    let err = check(&env, true).unwrap_err();
    assert!(err.contains("does not run the services"), "{err}");
    let _ = std::fs::remove_dir_all(&empty);
}
