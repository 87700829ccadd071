//! What the `specc build` end-to-end tests share: the binaries, a guest made on the host, and
//! `specc build --json` as a list of events.
//!
//! Tests that must run next to the build VMs (a server the guest fetches from, a kill of the
//! builder, a small file system under the store) run their body inside the rig on machines
//! without hardware KVM; [`prepare_on_host`] first makes everything slow to make (specc,
//! specc-vmm, the agent, the guest kernel, the busybox image) at native speed.

// Not every test file uses every helper.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use specc_guestkit::rootfs;

/// The disk size the tests' specs use (`disk="256MiB"`), so the image
/// `specc_testsuite::prepare_busybox_guest` made is the one `specc build` finds cached.
pub const DISK: &str = "256MiB";

/// On the host (not inside the rig): builds specc and specc-vmm beside this test binary, and
/// the guest kernel, agent and 256 MiB busybox image into the caches the rig sees.
pub fn prepare_on_host() {
    if specc_rig::in_rig() {
        return;
    }
    specc_testsuite::cargo_build("specc");
    // Also specc-vmm, the kernel, the agent and the image.
    specc_testsuite::prepare_busybox_guest();
}

/// `target/<profile>/specc`, beside this test binary's directory.
pub fn specc_binary() -> PathBuf {
    specc_testsuite::test_binary("specc")
}

/// `specc ARGS`, with the agent already built named, so that inside the rig no cargo runs.
pub fn specc(args: &[&str]) -> Command {
    let mut cmd = Command::new(specc_binary());
    cmd.args(args);
    if let Some(agent) = rootfs::installed_agent_binary() {
        cmd.env("SPECC_AGENT_BIN", agent);
    }
    cmd
}

/// `specc run SPEC -- sh -c SCRIPT` (the spec's VM, restored from its built head or booted);
/// asserts it succeeded and returns its stdout.
pub fn run_ok(spec: &Path, script: &str) -> String {
    let out = specc(&["run"])
        .arg(spec)
        .args(["--", "sh", "-c", script])
        .output()
        .expect("running specc run");
    assert!(
        out.status.success(),
        "specc run failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A string unique to this run, for commands whose layer keys must be new.
pub fn marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// The JSON events of a `specc build --json` run's stdout (output events left out).
pub fn events(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] != "output")
        .collect()
}

/// The event names of `layer`, in order.
pub fn events_of(events: &[serde_json::Value], layer: &str) -> Vec<String> {
    events
        .iter()
        .filter(|v| v["layer"] == layer)
        .filter_map(|v| v["event"].as_str().map(str::to_owned))
        .collect()
}

/// Runs `specc build --json FILE` with `env`; panics with its output unless it succeeds.
pub fn build_ok(spec: &Path, env: &[(&str, &Path)]) -> Vec<serde_json::Value> {
    let out = build(spec, env);
    assert!(
        out.status.success(),
        "specc build failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    events(&out.stdout)
}

/// Runs `specc build --json FILE` with `env`.
pub fn build(spec: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = specc(&["build", "--json"]);
    cmd.arg(spec);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running specc build")
}

/// Process ids of every process whose command name is `name` (`specc-vmm`, `passt`).
pub fn processes_named(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        // comm is cut at 15 bytes.
        let mut want = name.to_owned();
        want.truncate(15);
        if comm.trim() == want {
            pids.push(pid);
        }
    }
    pids
}

/// Process ids of every passt: Debian's `passt` execs `passt.avx2` on CPUs with AVX2.
pub fn passt_processes() -> Vec<u32> {
    let mut pids = processes_named("passt");
    pids.extend(processes_named("passt.avx2"));
    pids
}

/// Makes `home` a `$SPECC_HOME` of its own (an empty store), sharing the user's guest caches
/// (kernels, root filesystems, key inputs) through symlinks so nothing is rebuilt.
pub fn isolated_home(home: &Path) {
    let user = specc_plan::store::specc_home();
    std::fs::create_dir_all(home).unwrap();
    for shared in ["kernels", "rootfs", "cache"] {
        let from = user.join(shared);
        std::fs::create_dir_all(&from).unwrap();
        std::os::unix::fs::symlink(&from, home.join(shared)).unwrap();
    }
}

/// The names of the files under `dir`, recursively, relative to it (empty when absent).
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

/// `specc store verify` with `SPECC_HOME=home`: panics unless it passes; returns its report.
pub fn store_verify(home: &Path) -> String {
    let out = specc(&["store", "verify"])
        .env("SPECC_HOME", home)
        .output()
        .expect("running specc store verify");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "specc store verify failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The key each layer's events carry.
pub fn keys_of(events: &[serde_json::Value]) -> std::collections::BTreeMap<String, String> {
    events
        .iter()
        .filter_map(|v| {
            Some((
                v["layer"].as_str()?.to_owned(),
                v["key"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Runs a host shell command (mount, mkfs, ...); fails the test with its stderr.
pub fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("running sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serves `body` for every GET on the loopback (HTTP/1.1, `Connection: close`: busybox's wget
/// and apt's HTTP client both read it); returns the port and the request lines seen. Inside
/// the rig, call [`loopback_up`] first.
pub fn serve(body: String) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listening on the loopback");
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            // The rest of the head, up to the blank line.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim() != "" {
                line.clear();
            }
            log.lock().unwrap().push(first.trim().to_owned());
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, seen)
}

/// Inside the rig, brings the loopback up: the rig boots with it down (specc brings it up with
/// passt's stand-in interface, but a test's server listens first).
pub fn loopback_up() {
    if specc_rig::in_rig() {
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("running ip");
        assert!(up.success(), "ip link set lo up: {up}");
    }
}
