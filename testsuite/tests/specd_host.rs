//! `specd` started on the host serves host clients, whatever the host's KVM: on hardware KVM
//! it runs directly; without it, it places itself in the rig and bridges its API socket out
//! (docs/rig.md, "The bridge"). From the host: `specc vm create` from a built layer, `specc vm
//! exec -i` with its output streaming while its stdin is still open (two concurrent
//! connections), `specc vm ls --json`; an exposed port asked on this host's 127.0.0.1 (in the
//! rig too: the bridge mirrors it), also when the VM is suspended (the connection wakes it),
//! and a fork child's own port, whose host listener goes with the child; `/v1/health` names
//! the mode the VMs run in. Then SIGTERM stops the daemon, and its rig with it. In the rig the
//! VMs are suspended by that stop, and after a restart an exec wakes one and a connection to
//! the other's port wakes that one.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use specc_testsuite::specd::{PinSweep, specd_binary};
use specc_testsuite::{cargo_build, test_binary};
use specd::api::{ForkVm, Forked, Health, Vm, VmState};

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

/// One request/response over this host's 127.0.0.1:`host_port`: `ask` up, a half-close (the
/// guest service reads to EOF), then all it writes until it closes. None when the connection
/// gives nothing back (the guest service is not listening yet: the daemon then drops the
/// connection) or cannot be made.
fn ask_port(host_port: u16, ask: &[u8]) -> Option<String> {
    use std::io::Read;
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", host_port)).ok()?;
    tcp.set_read_timeout(Some(STEP_LIMIT)).ok()?;
    tcp.write_all(ask).ok()?;
    tcp.shutdown(std::net::Shutdown::Write).ok()?;
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).ok()?;
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
}

/// [`ask_port`] until the guest service answers; panics after [`STEP_LIMIT`].
fn ask_port_until_served(host_port: u16, ask: &[u8]) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(answer) = ask_port(host_port, ask) {
            return answer;
        }
        assert!(
            t0.elapsed() < STEP_LIMIT,
            "nothing answered on this host's 127.0.0.1:{host_port} within {STEP_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn show(socket: &Path, id: &str) -> Vm {
    serde_json::from_str(&vm_ok(socket, &["--json", "show", id])).expect("show --json")
}

/// The one exposed port of `vm`: its host port, which must answer on this host.
fn only_port(vm: &Vm) -> u16 {
    assert_eq!(vm.ports.len(), 1, "{vm:?}");
    assert_eq!(vm.ports[0].unreachable, None, "{vm:?}");
    vm.ports[0].host
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

    // The daemon says where its VMs run: in the rig, not "hardware KVM" (the rig's /dev/kvm
    // looks like it from inside).
    let client = specd::client::Client::new(&socket);
    let health: Health = client
        .call("GET", "/v1/health", None::<&()>)
        .expect("GET /v1/health");
    assert_eq!(health.mode == "rig", in_rig, "{health:?}");

    // An exposed port, asked on THIS host's loopback under the number the API reports: in
    // the rig, host listener → bridge → the daemon's listener on the rig's loopback (which
    // wakes the VM) → vsock → the guest. The guest service reads to EOF (the client's
    // half-close must arrive as one, with the way back open), answers upper-cased with its
    // hostname, then closes; a loop keeps it listening, in a session of its own so that the
    // exec that starts it can end.
    const GUEST_PORT: u16 = 8080;
    let web: Vm = serde_json::from_str(&vm_ok(
        &socket,
        &[
            "--json", "create", "--layer", &key, "--name", "web", "--port", "8080",
        ],
    ))
    .expect("create --json");
    assert_eq!(web.ports[0].guest, GUEST_PORT);
    let web_port = only_port(&web);
    vm_ok(
        &socket,
        &[
            "exec",
            &web.id,
            "--",
            "sh",
            "-c",
            &format!(
                "setsid sh -c 'while true; do nc -l -p {GUEST_PORT} -e sh -c \
                 \"tr a-z A-Z; echo; hostname\"; done' </dev/null >/dev/null 2>&1 &"
            ),
        ],
    );
    let t0 = Instant::now();
    assert_eq!(ask_port_until_served(web_port, b"hello"), "HELLO\nweb\n");
    eprintln!("first answer on 127.0.0.1:{web_port}: {:?}", t0.elapsed());
    // Suspended, the VM has no process; a connection from this host wakes it and is served.
    vm_ok(&socket, &["suspend", &web.id]);
    assert_eq!(show(&socket, &web.id).state, VmState::Suspended);
    let t0 = Instant::now();
    let answer = ask_port(web_port, b"again").expect("a connection to a suspended VM is served");
    eprintln!("answer from the suspended VM: {:?}", t0.elapsed());
    assert_eq!(answer, "AGAIN\nweb\n");
    assert_eq!(show(&socket, &web.id).state, VmState::Running);

    // A fork child has the source's service running and a host port of its own, mirrored
    // too; when it is deleted, that host listener goes.
    let forked: Forked = client
        .call(
            "POST",
            &format!("/v1/vms/{}/fork", web.id),
            Some(&ForkVm {
                count: 1,
                mode: None,
            }),
        )
        .expect("fork");
    let child = &forked.vms[0];
    let child_port = only_port(child);
    assert_ne!(child_port, web_port);
    let answer = ask_port_until_served(child_port, b"forked");
    assert!(answer.starts_with("FORKED\n"), "{answer:?}");
    vm_ok(&socket, &["rm", &child.id]);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", child_port)).is_ok() {
        assert!(
            t0.elapsed() < STEP_LIMIT,
            "127.0.0.1:{child_port} still listens after its VM was deleted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ask_port(web_port, b"still"), Some("STILL\nweb\n".into()));

    if !in_rig {
        // On hardware KVM a VM outlives its daemon; these must not outlive the test.
        vm_ok(&socket, &["rm", &created.id]);
        vm_ok(&socket, &["rm", &web.id]);
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
        // The recovered VM's port answers on this host again, on the same number, and the
        // connection wakes it.
        let recovered = show(&socket, &web.id);
        assert_eq!(recovered.state, VmState::Suspended);
        assert_eq!(only_port(&recovered), web_port);
        assert_eq!(ask_port_until_served(web_port, b"back"), "BACK\nweb\n");
        vm_ok(&socket, &["rm", &created.id]);
        vm_ok(&socket, &["rm", &web.id]);
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
