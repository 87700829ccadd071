//! specd end to end with real Linux guests (inside the rig on machines without hardware KVM):
//! a layer built by `specc build` becomes VMs through the daemon's API; exec and files work;
//! VMs from an OCI layout and from a registry take their spec's policy where the request is
//! silent; suspend ends the VMM and an exec wakes it with its files intact; fork gives
//! independent VMs; a VMM killed from outside leaves its VM failed until it is woken;
//! the daemon is killed with SIGKILL and restarted and every VM is still there and usable;
//! idle timers pause, suspend and (for ephemeral VMs) delete; the storage budget evicts the
//! lowest-priority sticky VM first.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use specc_testsuite::specd::Specd;
use specd::api::{self, CreateVm, ExecEvent, IdlePolicy, Persistence, Source, Vm, VmState};
use specd::client::Client;

/// A daemon on `state` with fast idle ticks and `budget` bytes of storage budget.
fn start(state: &Path, budget: u64) -> Specd {
    Specd::start(
        state,
        &["--tick-ms", "200", "--budget", &budget.to_string()],
    )
    .expect("starting specd")
}

struct Ran {
    stdout: String,
    stderr: String,
    code: Option<i32>,
    woke: bool,
}

fn exec(c: &Client, id: &str, script: &str) -> Ran {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let req = api::Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: None,
        stdin_b64: None,
        stdin_stream: false,
        timeout_ms: Some(60_000),
    };
    let last = c
        .exec(id, &req, |ev| match ev {
            ExecEvent::Stdout { data_b64 } => stdout.extend(b64.decode(data_b64).unwrap()),
            ExecEvent::Stderr { data_b64 } => stderr.extend(b64.decode(data_b64).unwrap()),
            _ => {}
        })
        .unwrap_or_else(|e| panic!("exec {script:?} on {id}: {e}"));
    let ExecEvent::Exit { code, woke, .. } = last else {
        panic!("exec {script:?} on {id} ended with {last:?}");
    };
    Ran {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        code,
        woke,
    }
}

/// Streaming stdin, through the API and through `specc vm exec -i`: the command answers each
/// line before the next one is written, and the end of the upload ends its input.
fn stdin_streams(c: &Client, d: &Specd, id: &str) {
    use std::io::{BufRead, Write};
    let b64 = base64::engine::general_purpose::STANDARD;
    let script = "while read l; do echo got:$l; done; echo eof";
    let req = api::Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        cwd: None,
        stdin_b64: None,
        stdin_stream: true,
        timeout_ms: Some(60_000),
    };
    let (tx, events) = std::sync::mpsc::channel::<ExecEvent>();
    let runner = std::thread::spawn({
        let (c, id, req) = (c.clone(), id.to_owned(), req.clone());
        move || {
            c.exec(&id, &req, |ev| {
                let _ = tx.send(ev.clone());
            })
        }
    });
    let Ok(ExecEvent::Started {
        stdin: Some(exec), ..
    }) = events.recv()
    else {
        panic!("no started event naming the exec: {:?}", runner.join());
    };
    let (feed, mut input) = std::io::pipe().unwrap();
    let feeder = std::thread::spawn({
        let (c, id) = (c.clone(), id.to_owned());
        let mut feed = feed;
        move || c.exec_stdin(&id, &exec, &mut feed)
    });
    let mut out = String::new();
    let until = |want: &str, out: &mut String| {
        while !out.contains(want) {
            match events.recv() {
                Ok(ExecEvent::Stdout { data_b64 }) => {
                    out.push_str(&String::from_utf8_lossy(&b64.decode(data_b64).unwrap()));
                }
                other => panic!("waiting for {want:?} (so far {out:?}): {other:?}"),
            }
        }
    };
    input.write_all(b"one\n").unwrap();
    // The answer to the first line, while the upload is still open.
    until("got:one\n", &mut out);
    input.write_all(b"two\n").unwrap();
    drop(input);
    until("eof\n", &mut out);
    feeder.join().unwrap().expect("feeding stdin");
    assert_eq!(out, "got:one\ngot:two\neof\n");
    let last = runner.join().unwrap().expect("the exec");
    assert!(
        matches!(last, ExecEvent::Exit { code: Some(0), .. }),
        "{last:?}"
    );
    // The exec is over: its stdin is gone.
    match c.exec_stdin(id, "nope", &mut &b"x"[..]) {
        Err(specd::client::ClientError::Api { status: 404, .. }) => {}
        other => panic!("stdin for no exec: {other:?}"),
    }
    let both = api::Exec {
        stdin_b64: Some(b64.encode("x")),
        ..req
    };
    match c.exec(id, &both, |_| {}) {
        Err(specd::client::ClientError::Api { status: 400, .. }) => {}
        other => panic!("stdin_b64 with stdin_stream: {other:?}"),
    }

    // The CLI passes its own stdin through, as it comes.
    let mut cli = Command::new(specc_testsuite::test_binary("specc"))
        .args(["vm", "--socket"])
        .arg(d.socket())
        .args(["exec", "-i", id, "--", "sh", "-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running specc vm exec");
    let mut input = cli.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(cli.stdout.take().unwrap()).lines();
    input.write_all(b"three\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got:three");
    drop(input);
    assert_eq!(lines.next().unwrap().unwrap(), "eof");
    let status = cli.wait().unwrap();
    assert!(status.success(), "specc vm exec -i: {status}");
}

fn create(c: &Client, key: &str, name: &str, persistence: Persistence, idle: IdlePolicy) -> Vm {
    create_with_ports(c, key, name, persistence, idle, vec![])
}

fn create_with_ports(
    c: &Client,
    key: &str,
    name: &str,
    persistence: Persistence,
    idle: IdlePolicy,
    ports: Vec<u16>,
) -> Vm {
    let req = CreateVm {
        source: Source::Layer { key: key.into() },
        name: Some(name.into()),
        persistence: Some(persistence),
        idle: Some(idle),
        ports: Some(ports),
        net: false,
    };
    c.call("POST", "/v1/vms", Some(&req))
        .unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// `true`, no timeout: for calls whose answer is the point, not the command.
fn true_exec() -> api::Exec {
    api::Exec {
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        stdin_b64: None,
        stdin_stream: false,
        timeout_ms: None,
    }
}

fn show(c: &Client, id: &str) -> Option<Vm> {
    c.call("GET", &format!("/v1/vms/{id}"), None::<&()>).ok()
}

fn post(c: &Client, id: &str, op: &str) -> Vm {
    c.call("POST", &format!("/v1/vms/{id}/{op}"), None::<&()>)
        .unwrap_or_else(|e| panic!("{op} {id}: {e}"))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// Waits until `id` is in `state` (None: gone); panics after `limit`.
fn wait_state(c: &Client, id: &str, state: Option<VmState>, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let now = show(c, id).map(|v| v.state);
        if now == state {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "{id} is {now:?}, expected {state:?} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One request/response over the daemon's host side of an exposed port: `ask` up, a
/// half-close (the guest service reads to EOF), then all it writes until it closes. None when the connection gives nothing back
/// (the guest service is not listening yet: the daemon then drops the connection).
fn ask_port(host_port: u16, ask: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", host_port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    tcp.write_all(ask).ok()?;
    tcp.shutdown(std::net::Shutdown::Write).ok()?;
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).ok()?;
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
}

/// [`ask_port`] until the guest service answers; panics after `limit`.
fn ask_port_until_served(host_port: u16, ask: &[u8], limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(answer) = ask_port(host_port, ask) {
            return answer;
        }
        assert!(
            t0.elapsed() < limit,
            "nothing answered on host port {host_port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where the host side leaves the built layer's key for the run inside the rig.
fn key_file() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("specd-test-layer-key")
}

/// Where the host side exports the artifact of a spec with the test layer's steps and a
/// runtime policy of its own.
fn layout_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("specd-test-layout")
}

/// `specc build -o` of the test layer's spec with `expose`, `idle` and `persistence` added.
fn export_policy_layout(dir: &Path) {
    let spec = dir.join("policy.kdl");
    std::fs::write(
        &spec,
        specc_testsuite::bench::daemon::daemon_spec(
            "    expose 8080\n    idle pause-after=\"1h\" suspend-after=\"2h\"\n    \
             persistence \"sticky\" priority=3\n",
        ),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(layout_dir());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(specc_testsuite::test_binary("specc"))
        .current_dir(root)
        .arg("build")
        .arg(&spec)
        .arg("-o")
        .arg(layout_dir())
        .output()
        .expect("running specc build -o");
    assert!(
        out.status.success(),
        "specc build -o: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A VM created from an OCI layout takes the policy its spec wrote into the artifact where the
/// request is silent, and the request's where it is not.
fn create_from_layout(c: &Client) {
    let layout = Source::Layout {
        path: layout_dir().to_string_lossy().into_owned(),
    };
    let silent = CreateVm {
        source: layout.clone(),
        name: Some("from-layout".into()),
        persistence: None,
        idle: None,
        ports: None,
        net: false,
    };
    let v: Vm = c
        .call("POST", "/v1/vms", Some(&silent))
        .unwrap_or_else(|e| panic!("create from the layout: {e}"));
    assert_eq!(v.source, layout);
    assert_eq!(v.persistence, Persistence::Sticky { priority: 3 });
    assert_eq!(
        (v.idle.pause_after_s, v.idle.suspend_after_s),
        (Some(3600), Some(7200))
    );
    assert_eq!(
        v.ports.iter().map(|p| p.guest).collect::<Vec<_>>(),
        [8080],
        "{v:?}"
    );
    assert_eq!(exec(c, &v.id, "cat /root/ready").stdout, "ready\n");
    let told = CreateVm {
        persistence: Some(Persistence::Persistent),
        idle: Some(IdlePolicy::default()),
        ports: Some(vec![]),
        name: Some("told".into()),
        ..silent
    };
    let w: Vm = c
        .call("POST", "/v1/vms", Some(&told))
        .unwrap_or_else(|e| panic!("create from the layout: {e}"));
    assert_eq!(
        (w.persistence, w.idle, w.ports.len()),
        (Persistence::Persistent, IdlePolicy::default(), 0)
    );
    // The same artifact through a registry the daemon pulls it from: Debian's docker-registry,
    // started here (in the rig, on the rig's loopback: the daemon's own network).
    let registry = specc_testsuite::registry::Registry::start();
    let reference = registry.reference("specd-test/app:v1");
    specc_store::registry::push(
        &layout_dir(),
        &reference,
        &specc_store::registry::Options::default(),
    )
    .expect("pushing the layout");
    let pulled = CreateVm {
        source: Source::Registry {
            reference: reference.clone(),
        },
        name: Some("from-registry".into()),
        persistence: None,
        idle: None,
        ports: Some(vec![]),
        net: false,
    };
    let r: Vm = c
        .call("POST", "/v1/vms", Some(&pulled))
        .unwrap_or_else(|e| panic!("create from {reference}: {e}\n{}", registry.log()));
    assert_eq!(
        (&r.source, r.persistence, r.ports.len()),
        (&pulled.source, Persistence::Sticky { priority: 3 }, 0)
    );
    assert_eq!(exec(c, &r.id, "cat /root/ready").stdout, "ready\n");
    for id in [&v.id, &w.id, &r.id] {
        c.request("DELETE", &format!("/v1/vms/{id}"), None).unwrap();
    }
}

#[test]
fn daemon_lifecycle_with_linux_guests() {
    if !specc_rig::in_rig() {
        for p in ["specc-vmm", "specc", "specd"] {
            specc_testsuite::cargo_build(p);
        }
        // Built out here: `specc build` prepares the kernel, rootfs and agent on the host and
        // runs its VMs in the rig itself.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let key = specc_testsuite::bench::daemon::build_head_key(
            &specc_testsuite::test_binary("specc"),
            dir.path(),
        )
        .expect("building the layer");
        std::fs::write(key_file(), key).unwrap();
        export_policy_layout(dir.path());
    }
    if specc_rig::testing::run_in_rig_unless_hardware("daemon_lifecycle_with_linux_guests")
        .ran_in_rig()
    {
        return;
    }
    let key = std::fs::read_to_string(key_file()).expect("the layer key from the host side");
    if specc_rig::in_rig() {
        // The rig's init leaves the loopback interface down; exposed ports listen on it.
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("running ip");
        assert!(up.success(), "ip link set lo up: {up}");
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("specd");
    std::fs::create_dir_all(&state).unwrap();
    let d = start(&state, u64::MAX >> 1);
    let c = d.client();
    let store = specc_store::Store::open_default().expect("opening the store");
    // A failed run leaves VMs behind in a state directory that goes away: their pins would
    // keep the layer from `specc gc` forever.
    let _unpin = specc_testsuite::specd::PinSweep::new(&state);

    // Create, exec (streams, stderr apart, exit code), files.
    let a = create(
        &c,
        &key,
        "alpha",
        Persistence::Persistent,
        IdlePolicy::default(),
    );
    assert_eq!(a.state, VmState::Running);
    // The daemon pins the layer its VM restores from, so `specc gc` keeps it.
    let pins = store.pins().expect("the store's pins");
    assert!(
        pins.iter()
            .any(|(name, p)| name.ends_with(&a.id) && p.layers == [key.clone()]),
        "no pin for {}: {pins:?}",
        a.id
    );
    let r = exec(
        &c,
        &a.id,
        "cat /root/ready; hostname; echo oops >&2; exit 3",
    );
    assert_eq!(r.code, Some(3));
    assert!(r.stdout.contains("alpha"), "hostname: {}", r.stdout);
    assert_eq!(r.stderr, "oops\n");
    c.request(
        "PUT",
        &format!("/v1/vms/{}/files?path=/root/data&mode=600", a.id),
        Some(("application/octet-stream", b"kept across suspend\n")),
    )
    .unwrap();
    let back = c
        .request(
            "GET",
            &format!("/v1/vms/{}/files?path=/root/data", a.id),
            None,
        )
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(back, b"kept across suspend\n");
    let listing: Vec<api::DirEntry> = c
        .call(
            "GET",
            &format!("/v1/vms/{}/dir?path=/root", a.id),
            None::<&()>,
        )
        .unwrap();
    assert!(
        listing.iter().any(|e| e.name == "data" && e.size == 20),
        "{listing:?}"
    );

    stdin_streams(&c, &d, &a.id);
    create_from_layout(&c);

    // Suspend ends the VMM; an exec wakes it, with the file and a process's memory intact.
    exec(&c, &a.id, "echo 41 > /tmp/counter");
    let pid = show(&c, &a.id).unwrap().pid.expect("pid");
    let s = post(&c, &a.id, "suspend");
    assert_eq!(s.state, VmState::Suspended);
    assert!(s.pid.is_none());
    assert!(!alive(pid), "VMM {pid} still runs after suspend");
    let r = exec(&c, &a.id, "cat /root/data /tmp/counter");
    assert!(r.woke, "the exec should have woken the VM");
    assert_eq!(r.stdout, "kept across suspend\n41\n");
    assert_eq!(show(&c, &a.id).unwrap().state, VmState::Running);

    // Fork: two children with their own hostnames and files.
    let f: api::Forked = c
        .call(
            "POST",
            &format!("/v1/vms/{}/fork", a.id),
            Some(&api::ForkVm {
                count: 2,
                mode: None,
            }),
        )
        .unwrap();
    assert_eq!(f.vms.len(), 2);
    // The VMM's report of the fork: the default mode, and each child by its VM id.
    assert_eq!(f.report.mode, api::ForkMode::Precopy, "{:?}", f.report);
    assert!(f.report.precopy.is_some(), "{:?}", f.report);
    assert_eq!(f.report.pause_us, f.pause_us);
    let reported: Vec<&str> = f.report.children.iter().map(|c| c.id.as_str()).collect();
    let ids: Vec<&str> = f.vms.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(reported, ids, "{:?}", f.report);
    let (b, cc) = (&f.vms[0], &f.vms[1]);
    exec(&c, &b.id, "echo mine > /root/only-b");
    let hb = exec(&c, &b.id, "hostname").stdout;
    let hc = exec(
        &c,
        &cc.id,
        "hostname; test -e /root/only-b && echo LEAK; cat /root/data",
    );
    assert_ne!(hb, hc.stdout.lines().next().unwrap_or("").to_owned() + "\n");
    assert!(!hc.stdout.contains("LEAK"), "{}", hc.stdout);
    assert!(hc.stdout.contains("kept across suspend"), "{}", hc.stdout);
    assert!(!exec(&c, &a.id, "ls /root").stdout.contains("only-b"));
    // The other mode, asked for: a copy-on-write fork of a fork child.
    let g: api::Forked = c
        .call(
            "POST",
            &format!("/v1/vms/{}/fork", cc.id),
            Some(&api::ForkVm {
                count: 1,
                mode: Some(api::ForkMode::Cow),
            }),
        )
        .unwrap();
    assert_eq!(
        (g.report.mode, g.report.precopy.is_none(), g.vms.len()),
        (api::ForkMode::Cow, true, 1),
        "{:?}",
        g.report
    );
    let r = exec(&c, &g.vms[0].id, "cat /root/data");
    assert_eq!(r.stdout, "kept across suspend\n");

    // kill -9 of the daemon: every VM keeps running and is attached again after a restart.
    let before: Vec<Vm> = c.call("GET", "/v1/vms", None::<&()>).unwrap();
    d.kill9().unwrap();
    let d = start(&state, u64::MAX >> 1);
    let c = d.client();
    let after: Vec<Vm> = c.call("GET", "/v1/vms", None::<&()>).unwrap();
    assert_eq!(after.len(), before.len(), "{after:?}");
    for (x, y) in before.iter().zip(&after) {
        assert_eq!(
            (&x.id, x.state, x.pid),
            (&y.id, y.state, y.pid),
            "{after:?}"
        );
        let r = exec(&c, &y.id, "cat /root/data");
        assert_eq!(r.stdout, "kept across suspend\n", "{}", y.id);
    }
    // A suspended VM survives a restart too.
    post(&c, &b.id, "suspend");
    d.kill9().unwrap();
    let d = start(&state, u64::MAX >> 1);
    let c = d.client();
    assert_eq!(show(&c, &b.id).unwrap().state, VmState::Suspended);

    // Compaction: more suspend/wake cycles of `a` than the chain may hold. A counter in /tmp
    // (memory) goes up every cycle, a process started before lives on, and the chain's
    // memory diffs stay bounded. `a` has fork children, whose disk stacks name layers in its
    // directory: `b`, suspended meanwhile, still wakes with its files afterwards.
    let sleeper = exec(
        &c,
        &a.id,
        "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
    );
    let sleeper = sleeper.stdout.trim().to_owned();
    let cycles = specd::policy::MAX_CHAIN_DIFFS + 2;
    for n in 0..cycles {
        assert_eq!(post(&c, &a.id, "suspend").state, VmState::Suspended);
        let r = exec(
            &c,
            &a.id,
            &format!(
                "test $(cat /tmp/counter) = {} && echo $(( $(cat /tmp/counter) + 1 )) > /tmp/counter && kill -0 {sleeper} && cat /root/data",
                41 + n
            ),
        );
        assert!(r.woke, "cycle {n}: the exec should have woken the VM");
        assert_eq!(
            (r.code, r.stdout.as_str()),
            (Some(0), "kept across suspend\n"),
            "cycle {n}: {}",
            r.stderr
        );
    }
    let memory_diffs = std::fs::read_dir(state.join("vms").join(&a.id))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("memory.diff").is_file())
        .count();
    assert!(
        memory_diffs <= specd::policy::MAX_CHAIN_DIFFS + 1,
        "{memory_diffs} memory diffs after {cycles} more suspends"
    );
    let metrics =
        String::from_utf8(c.request("GET", "/metrics", None).unwrap().bytes().unwrap()).unwrap();
    // The figures, for the record (never asserted on).
    for line in metrics
        .lines()
        .filter(|l| l.contains("compact") && !l.starts_with('#'))
    {
        eprintln!("{line}");
    }
    assert!(
        !metrics.contains("specd_compactions_total{result=\"merged\"} 0")
            && metrics.contains("specd_compactions_total{result=\"error\"} 0"),
        "{metrics}"
    );
    assert!(exec(&c, &b.id, "cat /root/only-b /root/data").stdout == "mine\nkept across suspend\n");

    // A VMM that ends by itself (killed here; a guest that crashes alike) is noticed within a
    // tick: the VM is failed with the reason, an exec answers 409 at once instead of running
    // in an older state unasked, and an explicit wake returns it to its last snapshot (the
    // counter as the last suspend left it, not the one bump since).
    let pid = show(&c, &a.id).unwrap().pid.expect("pid");
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_state(&c, &a.id, Some(VmState::Failed), Duration::from_secs(10));
    let failed = show(&c, &a.id).unwrap();
    let why = failed.error.clone().unwrap_or_default();
    assert!(why.contains("SIGKILL"), "{failed:?}");
    assert_eq!(failed.pid, None);
    match c.exec(&a.id, &true_exec(), |_| {}) {
        Err(specd::client::ClientError::Api {
            status: 409,
            message,
        }) => assert!(
            message.contains("has failed") && message.contains("wake it"),
            "{message}"
        ),
        other => panic!("exec on a failed VM: {other:?}"),
    }
    assert_eq!(show(&c, &a.id).unwrap().state, VmState::Failed);
    let woken = post(&c, &a.id, "wake");
    assert_eq!((woken.state, woken.error), (VmState::Running, None));
    let r = exec(
        &c,
        &a.id,
        &format!("cat /tmp/counter; kill -0 {sleeper} && cat /root/data"),
    );
    assert_eq!(
        r.stdout,
        format!("{}\nkept across suspend\n", 40 + cycles),
        "{}",
        r.stderr
    );
    let metrics =
        String::from_utf8(c.request("GET", "/metrics", None).unwrap().bytes().unwrap()).unwrap();
    assert!(metrics.contains("specd_vmm_ended_total 1"), "{metrics}");

    // An exposed port: host TCP → the daemon → vsock → the guest's service, which reads to
    // EOF (the client's half-close must arrive as one, with the way back open) and answers
    // upper-cased, with its hostname, then closes. A loop keeps it listening; it runs in a
    // session of its own so that the exec that started it can end.
    const GUEST_PORT: u16 = 8080;
    let web = create_with_ports(
        &c,
        &key,
        "web",
        Persistence::Persistent,
        IdlePolicy::default(),
        vec![GUEST_PORT],
    );
    let host_port = web
        .ports
        .iter()
        .find(|p| p.guest == GUEST_PORT)
        .map(|p| p.host)
        .expect("the exposed port's mapping");
    let started = exec(
        &c,
        &web.id,
        &format!(
            "setsid sh -c 'while true; do nc -l -p {GUEST_PORT} -e sh -c \
             \"tr a-z A-Z; echo; hostname\"; done' \
             </dev/null >/dev/null 2>&1 &"
        ),
    );
    assert_eq!(started.code, Some(0), "{}", started.stderr);
    let answer = ask_port_until_served(host_port, b"hello", Duration::from_secs(60));
    assert_eq!(answer, "HELLO\nweb\n");
    // Suspended, the VM has no process; a new connection wakes it and is served.
    let pid = show(&c, &web.id).unwrap().pid.expect("pid");
    assert_eq!(post(&c, &web.id, "suspend").state, VmState::Suspended);
    assert!(!alive(pid), "VMM {pid} still runs after suspend");
    let answer = ask_port(host_port, b"again").expect("a connection to a suspended VM is served");
    assert_eq!(answer, "AGAIN\nweb\n");
    assert_eq!(show(&c, &web.id).unwrap().state, VmState::Running);

    // Stop keeps only the disk: the VMM exits and the memory files go; exec answers 409 until
    // start cold-boots the VM from its own disk (written files are there, /tmp is not).
    exec(
        &c,
        &web.id,
        "echo on-disk > /root/persist; echo in-ram > /tmp/volatile",
    );
    let pid = show(&c, &web.id).unwrap().pid.expect("pid");
    let stopped = post(&c, &web.id, "stop");
    assert_eq!((stopped.state, stopped.pid), (VmState::Stopped, None));
    assert!(!alive(pid), "VMM {pid} still runs after stop");
    match c.exec(&web.id, &true_exec(), |_| {}) {
        Err(specd::client::ClientError::Api {
            status: 409,
            message,
        }) => {
            assert!(message.contains("start it first"), "{message}");
        }
        other => panic!("exec on a stopped VM: {other:?}"),
    }
    let memory_files: Vec<PathBuf> = std::fs::read_dir(state.join("vms").join(&web.id))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("memory"))
        })
        .collect();
    assert!(
        memory_files.is_empty(),
        "memory kept after stop: {memory_files:?}"
    );
    // Durable: a restarted daemon finds it stopped.
    d.kill9().unwrap();
    let d = start(&state, u64::MAX >> 1);
    let c = d.client();
    assert_eq!(show(&c, &web.id).unwrap().state, VmState::Stopped);
    let booted = post(&c, &web.id, "start");
    assert_eq!(booted.state, VmState::Running);
    let r = exec(
        &c,
        &web.id,
        "cat /root/persist /root/ready; test -e /tmp/volatile && echo RAM-SURVIVED; hostname",
    );
    assert_eq!(r.stdout, "on-disk\nready\nweb\n");
    // A booted VM suspends (its memory is written whole) and wakes like any other.
    exec(&c, &web.id, "echo booted > /tmp/mark");
    assert_eq!(post(&c, &web.id, "suspend").state, VmState::Suspended);
    let r = exec(&c, &web.id, "cat /tmp/mark /root/persist");
    assert!(r.woke, "the exec should have woken the VM");
    assert_eq!(r.stdout, "booted\non-disk\n");

    // Idle timers: pause, then suspend; an ephemeral VM is deleted instead.
    let idle = IdlePolicy {
        pause_after_s: Some(1),
        suspend_after_s: Some(4),
    };
    // The VM whose pause is watched is created last: under load a create takes longer than
    // the whole pause window of a VM created before it.
    let eph = create(&c, &key, "fleeting", Persistence::Ephemeral, idle);
    let e = create(&c, &key, "idler", Persistence::Persistent, idle);
    wait_state(&c, &e.id, Some(VmState::Paused), Duration::from_secs(20));
    wait_state(&c, &e.id, Some(VmState::Suspended), Duration::from_secs(60));
    wait_state(&c, &eph.id, None, Duration::from_secs(60));
    let r = exec(&c, &e.id, "cat /root/ready");
    assert!(r.woke && r.code == Some(0));

    // Storage budget: the lowest-priority sticky VM at rest goes first.
    let lo = create(
        &c,
        &key,
        "low",
        Persistence::Sticky { priority: 1 },
        IdlePolicy::default(),
    );
    let hi = create(
        &c,
        &key,
        "high",
        Persistence::Sticky { priority: 7 },
        IdlePolicy::default(),
    );
    exec(
        &c,
        &lo.id,
        "dd if=/dev/urandom of=/root/fill bs=1M count=4 2>/dev/null",
    );
    post(&c, &hi.id, "suspend");
    post(&c, &lo.id, "suspend");
    let vms: Vec<Vm> = c.call("GET", "/v1/vms", None::<&()>).unwrap();
    let total: u64 = vms.iter().map(|v| v.disk_bytes).sum();
    let lo_bytes = vms.iter().find(|v| v.id == lo.id).unwrap().disk_bytes;
    d.kill9().unwrap();
    let d = start(&state, total - lo_bytes / 2);
    let c = d.client();
    wait_state(&c, &lo.id, None, Duration::from_secs(10));
    assert_eq!(show(&c, &hi.id).map(|v| v.state), Some(VmState::Suspended));
    assert!(
        show(&c, &a.id).is_some(),
        "persistent VMs are never evicted"
    );
    let metrics =
        String::from_utf8(c.request("GET", "/metrics", None).unwrap().bytes().unwrap()).unwrap();
    assert!(metrics.contains("specd_evictions_total 1"), "{metrics}");
    assert!(
        metrics.contains("specd_vms{state=\"suspended\"}"),
        "{metrics}"
    );

    // Delete everything: the VMs' processes end and their files go.
    let vms: Vec<Vm> = c.call("GET", "/v1/vms", None::<&()>).unwrap();
    for v in &vms {
        c.request("DELETE", &format!("/v1/vms/{}", v.id), None)
            .unwrap();
        if let Some(pid) = v.pid {
            let t0 = Instant::now();
            while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(!alive(pid), "VMM {pid} of {} survived its deletion", v.id);
        }
    }
    let left: Vec<_> = std::fs::read_dir(state.join("vms")).unwrap().collect();
    assert!(left.is_empty(), "files left: {left:?}");
    let pins = store.pins().expect("the store's pins");
    assert!(
        !pins.keys().any(|n| vms.iter().any(|v| n.ends_with(&v.id))),
        "pins left: {pins:?}"
    );
    drop(d);
}
