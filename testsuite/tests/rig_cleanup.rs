//! No QEMU outlives the process that started the rig, whether that process is killed outright
//! (a crash) or interrupted (Ctrl-C).
//!
//! The test binary plays both parts: run with `RIG_CLEANUP_ROLE=host` it starts a rig running
//! `sleep` and waits; the test proper starts that, kills it, and watches QEMU go.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use specc_rig::{Rig, RigCommand, RigConfig};

const ROLE: &str = "RIG_CLEANUP_ROLE";
const TEST: &str = "killing_the_rig_host_leaves_no_qemu";

fn qemu_child_of(parent: u32) -> Option<u32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if field("PPid:") == Some(parent.to_string().as_str())
            && field("Name:").is_some_and(|n| n.starts_with("qemu-system"))
        {
            return Some(pid);
        }
    }
    None
}

/// Waits for `cond` with a hang guard (not a performance bound: the rig boots in seconds).
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "gave up waiting for {what} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_host_and_check(signal: libc::c_int) {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().expect("own path");
    let mut command = Command::new(exe);
    command
        .args(["--exact", TEST, "--nocapture"])
        .env(ROLE, "host")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // A shell without job control starts its background commands with SIGINT ignored, and that
    // is inherited: the rig host would then never see the Ctrl-C this test sends, and the test
    // would wait forever. Give the host the disposition an interactive launch has.
    // SAFETY: signal(2) is async-signal-safe, and the closure touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut host = command.spawn().expect("spawn the rig host");
    let host_pid = host.id();
    let mut qemu = None;
    // The rig kernel may still need building on a cold cache.
    wait_for("QEMU to start", Duration::from_secs(1800), || {
        qemu = qemu_child_of(host_pid);
        qemu.is_some() || host.try_wait().ok().flatten().is_some()
    });
    let qemu = qemu.unwrap_or_else(|| panic!("the rig host exited without starting QEMU"));
    // Let QEMU get well into booting, so the kill lands mid-run.
    std::thread::sleep(Duration::from_millis(500));
    let pid = libc::pid_t::try_from(host_pid).expect("pid");
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal the rig host");
    let signalled = Instant::now();
    while host.try_wait().expect("reap the rig host").is_none() {
        if signalled.elapsed() > Duration::from_secs(60) {
            let _ = host.kill();
            panic!("the rig host did not end within 60 s of signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for(
        "QEMU to die with its parent",
        Duration::from_secs(30),
        || {
            !std::path::Path::new(&format!("/proc/{qemu}")).exists()
                || fs::read_to_string(format!("/proc/{qemu}/status"))
                    .is_ok_and(|s| s.contains("State:\tZ"))
        },
    );
}

#[test]
fn killing_the_rig_host_leaves_no_qemu() {
    if std::env::var_os(ROLE).is_some_and(|v| v == "host") {
        let cmd = RigCommand::new(["sleep", "1000"]).expect("cwd");
        let outcome = Rig::new(RigConfig::default()).run(&cmd);
        panic!("the rig host should have been killed, but the run ended: {outcome:?}");
    }
    kill_host_and_check(libc::SIGKILL);
    kill_host_and_check(libc::SIGINT);
}
