//! `specd` started on the host serves host clients, whatever the host's KVM: on hardware KVM
//! it runs directly; without it, it places itself in the rig and bridges its API socket out
//! (docs/rig.md, "The bridge"). From the host: `specc vm create` from a built layer, `specc vm
//! exec -i` with its output streaming while its stdin is still open (two concurrent
//! connections), `specc vm ls --json`; then SIGTERM stops the daemon, and its rig with it. In
//! the rig the VM is suspended by that stop, and an exec after a restart wakes it.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use specc_testsuite::specd::{PinSweep, specd_binary};
use specc_testsuite::{cargo_build, test_binary};
use specd::api::{Vm, VmState};

/// Hang guards, not performance bounds: the rig kernel may still need building on a cold
/// cache, and everything in the rig is emulated.
const START_LIMIT: Duration = Duration::from_secs(1800);
const STEP_LIMIT: Duration = Duration::from_secs(600);

/// The daemon process; SIGKILLed (its rig goes with it) if the test fails.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- specd log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vm(socket: &Path, args: &[&str]) -> Output {
    Command::new(test_binary("specc"))
        .arg("vm")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running specc vm")
}

fn vm_ok(socket: &Path, args: &[&str]) -> String {
    let o = vm(socket, args);
    assert!(
        o.status.success(),
        "specc vm {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        (field("PPid:") == Some(parent.to_string().as_str())
            && field("Name:").is_some_and(|n| n.starts_with("qemu-system")))
        .then_some(pid)
    })
}

fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(true, |s| s.contains("State:\tZ"))
}

/// The next line of `lines`, or a panic naming `what` if none comes within [`STEP_LIMIT`].
fn next_line(lines: &mpsc::Receiver<String>, what: &str) -> String {
    lines
        .recv_timeout(STEP_LIMIT)
        .unwrap_or_else(|e| panic!("no line from specc vm exec while waiting for {what}: {e}"))
}

#[test]
fn specd_on_the_host_serves_host_clients() {
    for p in ["specc-vmm", "specc", "specd"] {
        cargo_build(p);
    }
    let in_rig = specc_rig::decide()
        .expect("deciding the placement")
        .placement
        == specc_rig::Placement::Rig;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let key = specc_testsuite::bench::daemon::build_head_key(&test_binary("specc"), dir.path())
        .expect("building the layer");

    // A host state directory, the default socket under it.
    let state = dir.path().join("specd");
    std::fs::create_dir_all(&state).expect("state dir");
    let socket = state.join("run/specd.sock");
    let _unpin = PinSweep::new(&state);
    let mut d = start(&state, &socket);
    let qemu = qemu_child_of(d.child.id());
    if in_rig {
        assert!(
            d.log()
                .lines()
                .next()
                .is_some_and(|l| l.contains("inside the rig")),
            "the first line should say the daemon runs in the rig:\n{}",
            d.log()
        );
        assert!(
            qemu.is_some(),
            "specd placed itself in the rig, but has no QEMU child"
        );
    } else {
        assert!(
            qemu.is_none(),
            "specd on hardware KVM should not start a rig"
        );
    }

    let created: Vm = serde_json::from_str(&vm_ok(
        &socket,
        &["--json", "create", "--layer", &key, "--name", "hosted"],
    ))
    .expect("create --json");
    assert_eq!(created.state, VmState::Running);

    // Each line is answered while the upload of stdin (a second connection) stays open, so
    // neither direction waits for the other's end.
    let mut exec = Command::new(test_binary("specc"))
        .arg("vm")
        .arg("--socket")
        .arg(&socket)
        .args(["exec", "-i", &created.id, "--", "sh", "-c"])
        .arg("echo kept > /tmp/kept; hostname; while read l; do echo got:$l; done; echo eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running specc vm exec");
    let mut input = exec.stdin.take().expect("stdin");
    let (tx, lines) = mpsc::channel();
    let out = BufReader::new(exec.stdout.take().expect("stdout"));
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    assert_eq!(next_line(&lines, "the hostname"), "hosted");
    input.write_all(b"one\n").expect("writing stdin");
    assert_eq!(next_line(&lines, "the first answer"), "got:one");
    input.write_all(b"two\n").expect("writing stdin");
    assert_eq!(next_line(&lines, "the second answer"), "got:two");
    drop(input);
    assert_eq!(next_line(&lines, "the end of stdin"), "eof");
    let status = exec.wait().expect("reaping specc vm exec");
    assert!(status.success(), "specc vm exec: {status}");

    let listed: Vec<Vm> =
        serde_json::from_str(&vm_ok(&socket, &["--json", "ls"])).expect("ls --json");
    assert!(
        listed
            .iter()
            .any(|v| v.id == created.id && v.state == VmState::Running),
        "{listed:?}"
    );
    if !in_rig {
        // On hardware KVM a VM outlives its daemon; this one must not outlive the test.
        vm_ok(&socket, &["rm", &created.id]);
    }

    stop(&mut d);
    assert!(!socket.exists(), "the API socket outlived the daemon");
    if let Some(q) = qemu {
        assert!(gone(q), "the rig's QEMU {q} outlived specd");
        // The rig's VMs cannot outlive it: the daemon suspended this one before it stopped.
        assert!(
            d.log().contains("suspended") && d.log().contains(&created.id),
            "no suspend of {} in the log:\n{}",
            created.id,
            d.log()
        );
        // The next daemon finds it suspended, and an exec wakes it with its memory intact.
        let mut d = start(&state, &socket);
        let events = vm_ok(
            &socket,
            &["--json", "exec", &created.id, "--", "cat", "/tmp/kept"],
        );
        assert!(
            events.contains("\"woke\":true") && events.contains("a2VwdAo="),
            "exec after the restart: {events}"
        );
        vm_ok(&socket, &["rm", &created.id]);
        stop(&mut d);
    }
}

/// Starts `specd --state STATE` (its log in `STATE/specd.log`) and waits until `socket`
/// answers.
fn start(state: &Path, socket: &Path) -> Daemon {
    let log = state.join("specd.log");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log file");
    let child = Command::new(specd_binary().expect("the specd binary"))
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup"))
        .stderr(log_file)
        .spawn()
        .expect("starting specd");
    let mut d = Daemon { child, log };
    let t0 = Instant::now();
    while !vm(socket, &["ls"]).status.success() {
        if let Some(status) = d.child.try_wait().expect("try_wait") {
            panic!("specd exited ({status}) before answering");
        }
        assert!(
            t0.elapsed() < START_LIMIT,
            "specd did not answer within {START_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d
}

/// SIGTERM, then waits for a successful exit.
fn stop(d: &mut Daemon) {
    let pid = libc::pid_t::try_from(d.child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM specd");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            t0.elapsed() < STEP_LIMIT,
            "specd did not stop within {STEP_LIMIT:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "specd after SIGTERM: {status}\n{}",
        d.log()
    );
}
