//! `specc-bench api-create|wake|load`: the daemon end to end, through its HTTP API, with a
//! busybox layer built by `specc build`.
//!
//! - `api-create`: `POST /v1/vms` of a cached layer until the VM answers, and until the first
//!   exec's result (the VM is exec-able).
//! - `wake`: a suspended VM, exec → wake → the exec's result (the exec does the wake).
//! - `load`: `--vms` VMs, then `--execs` exec calls at once spread over them: errors, p50, p99.
//! - `restores`: `--runs` VMs created one after another from the layer, one exec each, then
//!   deleted; does not stop at a failure: how many guests ended, in which phase, and why.
//!
//! The daemon's VMs run in the rig unless this host has hardware KVM: the whole scenario
//! re-runs itself there (the layer is built first, out here).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use specd::api::{self, CreateVm, ExecEvent, IdlePolicy, Persistence, Source, Vm};
use specd::client::Client;

use super::{Mode, Report, ms, p50_p95, percentile};

/// Arguments of the daemon scenarios.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Samples for `api-create`, `wake` and `restores`.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// VMs for `load`.
    #[arg(long, default_value_t = 50)]
    pub vms: usize,
    /// Concurrent exec calls for `load`.
    #[arg(long, default_value_t = 500)]
    pub execs: usize,
}

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// API request → exec-able VM.
    Create,
    /// Suspend → wake → first exec result.
    Wake,
    /// Many VMs, many concurrent execs.
    Load,
    /// Many restores one after another, one exec each, counting the failures.
    Restores,
}

const KEY_ENV: &str = "SPECC_BENCH_LAYER_KEY";

/// Runs one daemon scenario.
pub fn run(scenario: Scenario, args: &Args) -> anyhow::Result<()> {
    ensure!(
        args.runs > 0 && args.vms > 0,
        "need at least one run and one VM"
    );
    let key = match std::env::var(KEY_ENV) {
        Ok(k) => k,
        Err(_) => {
            let specc = super::build::specc_binary()?;
            let dir = super::build::spec_dir()?;
            build_head_key(&specc, dir.path())?
        }
    };
    let decision = specc_rig::decide()?;
    if decision.placement == specc_rig::Placement::Rig {
        eprintln!("{}", decision.line);
        // SAFETY: no other thread of this process exists yet.
        unsafe { std::env::set_var(KEY_ENV, &key) };
        let status = specc_rig::run_self_in_rig(specc_rig::RigConfig::default())?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let mode = if specc_rig::in_rig() {
        Mode::Rig
    } else {
        Mode::detect()
    };
    let state = tempfile::tempdir().context("creating the daemon's state dir")?;
    let _unpin = crate::specd::PinSweep::new(state.path());
    // Under load an agent connection waits its turn behind hundreds of others on two
    // emulated vCPUs: give it longer than the default minute before calling it an error.
    let extra: &[&str] = match scenario {
        Scenario::Load => {
            // Per-exec timings (connect, wait for the start, run) in the daemon's log: the
            // load's report splits the slow execs by where their time went.
            // SAFETY: no other thread of this process exists yet.
            unsafe { std::env::set_var("SPECD_LOG", "specd=debug") };
            &["--agent-timeout", "120"]
        }
        _ => &[],
    };
    let daemon = crate::specd::Specd::start(state.path(), extra)?;
    let c = daemon.client();
    let report = match scenario {
        Scenario::Create => api_create(&c, &key, args, mode)?,
        Scenario::Wake => wake(&c, &key, args, mode)?,
        Scenario::Load => load(&c, &key, args, mode, &daemon)?,
        Scenario::Restores => restores(&c, &key, args, mode, &daemon)?,
    };
    report.print(args.json)
}

/// The one-layer busybox spec the daemon's VMs come from, with `extra` top-level nodes (which
/// must not change its layers: the specd e2e test adds a runtime policy and expects the same
/// layer).
pub fn daemon_spec(extra: &str) -> String {
    format!(
        r#"spec "bench-daemon" {{
    base "busybox"
    vm vcpus=1 memory="128MiB" disk="64MiB"
    layer "app" after="base" {{
        run "echo ready > /root/ready"
    }}
{extra}}}
"#
    )
}

/// Builds a one-layer busybox spec in `dir` with `specc build` (VMs in the rig unless this
/// host has hardware KVM); returns the key of its layer `app`. Shared with the specd e2e test.
pub fn build_head_key(specc: &Path, dir: &Path) -> anyhow::Result<String> {
    let spec = dir.join("daemon.kdl");
    std::fs::write(&spec, daemon_spec(""))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the testsuite crate has no parent")?;
    eprintln!("specc-bench: building the layer the daemon starts VMs from");
    let out = Command::new(specc)
        .current_dir(root)
        .args(["build", "--json"])
        .arg(&spec)
        .output()
        .context("running specc build")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "specc build failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["layer"] == "app" && (v["event"] == "finished" || v["event"] == "cached"))
        .find_map(|v| v["key"].as_str().map(str::to_owned))
        .with_context(|| format!("no key for layer app in:\n{stdout}"))
}

fn create(c: &Client, key: &str, name: &str) -> anyhow::Result<Vm> {
    let req = CreateVm {
        source: Source::Layer { key: key.into() },
        name: Some(name.into()),
        persistence: Some(Persistence::Persistent),
        idle: Some(IdlePolicy::default()),
        ports: Some(vec![]),
        net: false,
    };
    Ok(c.call("POST", "/v1/vms", Some(&req))?)
}

/// Runs `true`; returns whether the exec woke the VM.
fn exec_true(c: &Client, id: &str) -> anyhow::Result<bool> {
    let req = api::Exec {
        argv: vec!["true".into()],
        env: vec![],
        cwd: None,
        stdin_b64: None,
        stdin_stream: false,
        timeout_ms: Some(60_000),
    };
    match c.exec(id, &req, |_| {})? {
        ExecEvent::Exit {
            code: Some(0),
            woke,
            ..
        } => Ok(woke),
        other => bail!("exec on {id} ended with {other:?}"),
    }
}

/// For a VM whose execs failed: what its VMM sees (the `inspect` control request), then
/// whether it recovers when every device's interrupt is raised again (a lost interrupt), or
/// else when every queue is signalled again (a lost notification). Prints all of it. With
/// `calls` false only what the kernel says about the VMM process: each control call to a VMM
/// stuck as a whole waits out its bound (minutes per VM); a VMM whose status request goes
/// unanswered gets no further calls.
fn diagnose_stuck_vm(c: &Client, id: &str, run_vms: &Path, calls: bool) {
    use specc_vmm::control::{Client as Vmm, Request};
    // The VMM's run directory is `<id>-<generation>`: the one whose control socket exists.
    let prefix = format!("{id}-");
    let Some(sock) = std::fs::read_dir(run_vms)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join("control.sock"))
        .find(|p| p.exists())
    else {
        eprintln!(
            "--- VM {id}: no VMM control socket under {}",
            run_vms.display()
        );
        return;
    };
    // A VMM that is stuck as a whole never replies: bound each call, and say so.
    let call = |r: &Request| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (sock, r) = (sock.clone(), r.clone());
        std::thread::spawn(move || {
            let _ = tx.send(
                Vmm::connect(&sock, Duration::from_secs(10))
                    .and_then(|mut v| v.call(&r))
                    .map_err(|e| specc_vmm::error_chain(&e)),
            );
        });
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| Err("the VMM did not reply within 30 s".to_owned()))
    };
    let show = |what: &str, r: Result<serde_json::Value, String>| match r {
        Ok(v) => eprintln!("--- VM {id}: {what} ---\n{v}"),
        Err(e) => eprintln!("--- VM {id}: {what} failed: {e}"),
    };
    // An exec that does not come back within a minute still runs on in its thread; the VM is
    // deleted at the end of the run and the exec then fails.
    let try_exec = || {
        let (tx, rx) = std::sync::mpsc::channel();
        let (c, id) = (c.clone(), id.to_owned());
        std::thread::spawn(move || {
            let _ = tx.send(exec_true(&c, &id).map_err(|e| format!("{e:#}")));
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(_)) => "an exec succeeds".to_owned(),
            Ok(Err(e)) => format!("an exec fails: {e}"),
            Err(_) => "an exec does not return within 60 s".to_owned(),
        }
    };
    // First what the rig's kernel says about the VMM process: a VMM blocked as a whole shows
    // here (thread states, where each one sleeps) even when its control thread cannot answer.
    match peer_pid(&sock) {
        Some(pid) => eprintln!("--- VM {id}: VMM pid {pid} ---\n{}", process_report(pid)),
        None => eprintln!("--- VM {id}: no pid behind {}", sock.display()),
    }
    if !calls {
        return;
    }
    // Status needs only the VMM's main thread; inspect also pauses the vCPUs and reads guest
    // memory: which one answers says how much of the VMM still runs.
    let status = call(&Request::Status);
    let answered = status.is_ok();
    show("status", status);
    if !answered {
        // Its main thread does not answer: neither would inspect or a kick.
        return;
    }
    show("inspect", call(&Request::Inspect));
    for (what, interrupts, queues) in [("interrupts", true, false), ("queues", false, true)] {
        show(
            &format!("kick {what}"),
            call(&Request::Kick { interrupts, queues }),
        );
        let outcome = try_exec();
        eprintln!("--- VM {id}: after kicking {what}, {outcome}");
        show(
            &format!("inspect after kicking {what}"),
            call(&Request::Inspect),
        );
        if outcome == "an exec succeeds" {
            break;
        }
    }
}

/// The pid of the process listening on the unix socket `sock`.
fn peer_pid(sock: &Path) -> Option<i32> {
    specd::daemon::peer_pid(&std::os::unix::net::UnixStream::connect(sock).ok()?)
}

/// The process state of task `stat` (the letter after the command's closing parenthesis),
/// and its minor and major fault counts (fields 10 and 12 of proc(5)).
fn stat_state(stat: &str) -> (String, String, String) {
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| f.get(i).copied().unwrap_or("?").to_owned();
    // After the comm: state is field 3 of proc(5), so index 0 here; minflt 10, majflt 12.
    (at(0), at(7), at(9))
}

/// What the kernel says about process `pid` and each of its threads: `status` (State, VmRSS,
/// Threads), then per thread its name, state, faults, wait channel, system call and kernel
/// stack (the last two only where the kernel has them).
fn process_report(pid: i32) -> String {
    let read = |p: String| {
        std::fs::read_to_string(&p)
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|e| format!("({p}: {e})"))
    };
    let mut out = String::new();
    let status = read(format!("/proc/{pid}/status"));
    for key in ["State:", "VmRSS:", "Threads:"] {
        if let Some(l) = status.lines().find(|l| l.starts_with(key)) {
            out.push_str(l);
            out.push('\n');
        }
    }
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    for tid in tids {
        let t = format!("/proc/{pid}/task/{tid}");
        let (state, minflt, majflt) = stat_state(&read(format!("{t}/stat")));
        out.push_str(&format!(
            "tid {tid} {:<16} state {state} minflt {minflt} majflt {majflt} wchan {} syscall {}\n",
            read(format!("{t}/comm")),
            read(format!("{t}/wchan")),
            read(format!("{t}/syscall")),
        ));
        if let Ok(stack) = std::fs::read_to_string(format!("{t}/stack")) {
            for l in stack.lines() {
                out.push_str("    ");
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// The rig-wide picture once VMs stop answering: memory available, every task in
/// uninterruptible sleep (state D) and where it sleeps, and the kernel's hung-task and 9p
/// messages (plus its last lines).
fn host_report() -> String {
    let mut out = String::new();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    for key in [
        "MemAvailable:",
        "MemFree:",
        "Cached:",
        "Dirty:",
        "Writeback:",
    ] {
        if let Some(l) = meminfo.lines().find(|l| l.starts_with(key)) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "loadavg {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
    ));
    let mut blocked = 0;
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        for t in std::fs::read_dir(p.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let (state, _, majflt) = stat_state(&stat);
            if state != "D" {
                continue;
            }
            blocked += 1;
            let r = |f: &str| {
                std::fs::read_to_string(t.path().join(f))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            };
            if blocked <= 60 {
                out.push_str(&format!(
                    "D pid {pid} tid {} {} majflt {majflt} wchan {} syscall {}\n",
                    t.file_name().to_string_lossy(),
                    r("comm"),
                    r("wchan"),
                    r("syscall"),
                ));
            }
        }
    }
    out.push_str(&format!("{blocked} tasks in state D\n"));
    match Command::new("dmesg").output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let lines: Vec<&str> = text.lines().collect();
            let notable: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| {
                    [
                        "hung_task",
                        "blocked for more than",
                        "9p",
                        "9pnet",
                        "Call Trace",
                        "oom",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                })
                .collect();
            out.push_str(&format!(
                "dmesg: {} lines, {} notable:\n",
                lines.len(),
                notable.len()
            ));
            for l in notable.iter().take(80) {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("dmesg (end):\n");
            out.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
            out.push('\n');
        }
        Err(e) => out.push_str(&format!("(dmesg: {e})\n")),
    }
    out
}

fn delete(c: &Client, id: &str) -> anyhow::Result<()> {
    c.request("DELETE", &format!("/v1/vms/{id}"), None)?;
    Ok(())
}

fn api_create(c: &Client, key: &str, args: &Args, mode: Mode) -> anyhow::Result<Report> {
    let (mut created, mut first_exec) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let t0 = Instant::now();
        let vm = create(c, key, &format!("bench-{i}"))?;
        created.push(t0.elapsed());
        exec_true(c, &vm.id)?;
        first_exec.push(t0.elapsed());
        delete(c, &vm.id)?;
    }
    let mut r = Report::new("api-create", mode);
    r.figure("runs_count", args.runs as f64);
    p50_p95(&mut r, "create_to_agent", &mut created);
    p50_p95(&mut r, "create_to_exec_result", &mut first_exec);
    Ok(r)
}

/// One VM after another: create (the restore, until the agent answers), one exec, delete.
/// A failure is counted by phase and printed with the VM's state and `error` (the daemon
/// records there why a VMM ended: exit status, console and VMM log tails).
fn restores(
    c: &Client,
    key: &str,
    args: &Args,
    mode: Mode,
    daemon: &crate::specd::Specd,
) -> anyhow::Result<Report> {
    let (mut create_errors, mut exec_errors) = (0usize, 0usize);
    let (mut created, mut first_exec) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    for i in 0..args.runs {
        let t = Instant::now();
        let vm = match create(c, key, &format!("restore-{i}")) {
            Ok(vm) => vm,
            Err(e) => {
                create_errors += 1;
                eprintln!(
                    "specc-bench restores: run {i}: create failed after {:.1} s: {e:#}\n{}",
                    t.elapsed().as_secs_f64(),
                    daemon.log_tail(20)
                );
                continue;
            }
        };
        created.push(t.elapsed());
        match exec_true(c, &vm.id) {
            Ok(_) => first_exec.push(t.elapsed()),
            Err(e) => {
                exec_errors += 1;
                let now: anyhow::Result<Vm> = c
                    .call("GET", &format!("/v1/vms/{}", vm.id), None::<&()>)
                    .map_err(Into::into);
                let (state, error) = match now {
                    Ok(v) => (format!("{:?}", v.state), v.error.unwrap_or_default()),
                    Err(e) => (format!("unknown ({e:#})"), String::new()),
                };
                eprintln!(
                    "specc-bench restores: run {i}: VM {} exec failed {:.1} s after the \
                     create: {e:#}; state {state}; error:\n{error}",
                    vm.id,
                    t.elapsed().as_secs_f64()
                );
            }
        }
        if let Err(e) = delete(c, &vm.id) {
            eprintln!("specc-bench restores: run {i}: delete failed: {e:#}");
        }
        if (i + 1) % 10 == 0 {
            eprintln!(
                "specc-bench restores: {} runs in {:.0} s, {create_errors} create and \
                 {exec_errors} exec failures",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let mut r = Report::new("restores", mode);
    r.figure("runs_count", args.runs as f64)
        .figure("create_errors_count", create_errors as f64)
        .figure("exec_errors_count", exec_errors as f64);
    if !created.is_empty() {
        p50_p95(&mut r, "create_to_agent", &mut created);
    }
    if !first_exec.is_empty() {
        p50_p95(&mut r, "create_to_exec_result", &mut first_exec);
    }
    Ok(r)
}

fn wake(c: &Client, key: &str, args: &Args, mode: Mode) -> anyhow::Result<Report> {
    let vm = create(c, key, "bench-wake")?;
    let (mut suspend, mut woke) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let t0 = Instant::now();
        let _: Vm = c.call("POST", &format!("/v1/vms/{}/suspend", vm.id), None::<&()>)?;
        suspend.push(t0.elapsed());
        let t1 = Instant::now();
        ensure!(
            exec_true(c, &vm.id)?,
            "run {i}: the exec did not wake the VM"
        );
        woke.push(t1.elapsed());
    }
    delete(c, &vm.id)?;
    let mut r = Report::new("wake", mode);
    r.figure("runs_count", args.runs as f64);
    p50_p95(&mut r, "suspend", &mut suspend);
    p50_p95(&mut r, "wake_to_exec_result", &mut woke);
    Ok(r)
}

/// One stderr line about the host the load runs on: memory available, and the daemon's
/// threads and resident memory (a load that stalls shows where it stands).
fn progress(what: &str, daemon: &crate::specd::Specd) {
    let field = |file: &str, key: &str| -> String {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with(key))
                    .map(|l| l[key.len()..].trim().to_owned())
            })
            .unwrap_or_else(|| "?".into())
    };
    let status = format!("/proc/{}/status", daemon.pid());
    eprintln!(
        "specc-bench load: {what}; MemAvailable {}, specd threads {}, specd RSS {}",
        field("/proc/meminfo", "MemAvailable:"),
        field(&status, "Threads:"),
        field(&status, "VmRSS:"),
    );
}

/// The non-empty VMM logs of the daemon's VMs, last lines, to stderr.
fn dump_vmm_logs(run_vms: &Path) {
    let Ok(rd) = std::fs::read_dir(run_vms) else {
        return;
    };
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path().join("vmm.log")).unwrap_or_default();
        if text.trim().is_empty() {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "--- {} vmm.log (end) ---\n{}",
            e.file_name().to_string_lossy(),
            lines[lines.len().saturating_sub(8)..].join("\n")
        );
    }
}

fn load(
    c: &Client,
    key: &str,
    args: &Args,
    mode: Mode,
    daemon: &crate::specd::Specd,
) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for i in 0..args.vms {
        ids.push(
            create(c, key, &format!("load-{i}"))
                .with_context(|| format!("creating VM {i}:\n{}", daemon.log_tail(30)))?
                .id,
        );
        if (i + 1) % 10 == 0 {
            progress(
                &format!(
                    "{} VMs created in {:.1} s",
                    i + 1,
                    t0.elapsed().as_secs_f64()
                ),
                daemon,
            );
        }
    }
    let created = t0.elapsed();
    let t1 = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let finished = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<Duration, (Duration, String, String)>> = std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = Instant::now();
            let (mut before, mut dumped) = (usize::MAX, false);
            while !finished.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= Duration::from_secs(15) {
                    last = Instant::now();
                    let n = done.load(std::sync::atomic::Ordering::Relaxed);
                    if n == before && !dumped {
                        // Stalled: what the VMMs said is the best clue to where.
                        dumped = true;
                        dump_vmm_logs(&daemon.state().join("run/vms"));
                        eprintln!("--- rig: execs stalled ---\n{}", host_report());
                    }
                    before = n;
                    progress(
                        &format!(
                            "{n}/{} execs done after {:.0} s",
                            args.execs,
                            t1.elapsed().as_secs_f64()
                        ),
                        daemon,
                    );
                }
            }
        });
        let handles: Vec<_> = (0..args.execs)
            .map(|i| {
                let (c, id, done) = (c.clone(), ids[i % ids.len()].clone(), &done);
                s.spawn(move || {
                    let t = Instant::now();
                    let r = exec_true(&c, &id)
                        .map(|_| t.elapsed())
                        .map_err(|e| (t.elapsed(), format!("{e:#}"), id.clone()));
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    r
                })
            })
            .collect();
        let results = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err((Duration::ZERO, "exec thread panicked".into(), String::new()))
                })
            })
            .collect();
        finished.store(true, std::sync::atomic::Ordering::Relaxed);
        results
    });
    let all = t1.elapsed();
    let mut ok: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let mut errors: Vec<&(Duration, String, String)> =
        results.iter().filter_map(|r| r.as_ref().err()).collect();
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.0);
        eprintln!("specc-bench: {} exec errors:", errors.len());
        for (t, e, _) in &errors {
            eprintln!("  after {:.1} s: {e}", t.as_secs_f64());
        }
        eprintln!("--- specd log (end) ---\n{}", daemon.log_tail(40));
        // Where the failing VMs stand: their guest consoles (kernel and agent messages).
        eprintln!("--- rig: at the diagnosis ---\n{}", host_report());
        let mut failed: Vec<&str> = errors.iter().map(|e| e.2.as_str()).collect();
        failed.sort_unstable();
        failed.dedup();
        for (n, id) in failed.into_iter().filter(|id| !id.is_empty()).enumerate() {
            let console = c
                .request("GET", &format!("/v1/vms/{id}/logs?lines=40"), None)
                .and_then(|r| r.bytes())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("(no console: {e})"));
            eprintln!("--- VM {id}: console (end) ---\n{console}");
            // A VMM that ended by itself (a guest that triple-faulted, say) left its reason
            // in the VM's error: its exit status, console and VMM log tails (with a crash
            // report); there is no VMM left to diagnose.
            let vm: Result<Vm, _> = c.call("GET", &format!("/v1/vms/{id}"), None::<&()>);
            if let Ok(vm) = &vm
                && matches!(vm.state, api::VmState::Failed | api::VmState::Stopped)
            {
                eprintln!(
                    "--- VM {id}: {:?}, error ---\n{}",
                    vm.state,
                    vm.error.as_deref().unwrap_or("(none)")
                );
                continue;
            }
            // The control calls of the first failing VM say whether the rest is alike.
            diagnose_stuck_vm(c, id, &daemon.state().join("run/vms"), n == 0);
        }
    }
    let phases = exec_phases(&daemon.log());
    for id in &ids {
        delete(c, id)?;
    }
    let mut r = Report::new("load", mode);
    r.figure("vms_count", args.vms as f64)
        .figure("execs_count", args.execs as f64)
        .figure("errors_count", errors.len() as f64)
        .figure("create_all_s", created.as_secs_f64())
        .figure("execs_all_s", all.as_secs_f64());
    if !ok.is_empty() {
        r.figure("exec_p50_ms", ms(super::median(&mut ok)))
            .figure("exec_p99_ms", ms(percentile(&mut ok, 99)))
            .figure(
                "exec_max_ms",
                ms(ok.iter().max().copied().unwrap_or_default()),
            );
    }
    // The daemon used to bound the wait for the first answer at the exec's timeout plus 30 s
    // from the request: how many execs waited longer than that for the start alone.
    let old_bound = Duration::from_secs(90);
    r.figure(
        "start_over_90s_count",
        phases.start.iter().filter(|d| **d > old_bound).count() as f64,
    );
    for (name, mut v) in [("connect", phases.connect), ("start", phases.start)] {
        if !v.is_empty() {
            let max = v.iter().max().copied().unwrap_or_default();
            r.figure(&format!("{name}_p99_ms"), ms(percentile(&mut v, 99)))
                .figure(&format!("{name}_max_ms"), ms(max));
        }
    }
    Ok(r)
}

/// Per-exec timings from the daemon's debug log (`exec` lines).
#[derive(Debug, Default)]
struct Phases {
    /// Request → agent connection made (wake, vsock connect, `Hello`).
    connect: Vec<Duration>,
    /// Exec request sent → `ExecStarted`.
    start: Vec<Duration>,
}

fn exec_phases(log: &str) -> Phases {
    let field = |line: &str, key: &str| -> Option<Duration> {
        let rest = &line[line.find(key)? + key.len()..];
        let end = rest.find(' ').unwrap_or(rest.len());
        rest[..end].parse::<f64>().ok().map(Duration::from_secs_f64)
    };
    let mut p = Phases::default();
    for line in log.lines().map(strip_ansi) {
        if !line.contains(" exec ") {
            continue;
        }
        if let (Some(c), Some(s)) = (field(&line, " connect_s="), field(&line, " start_s=")) {
            p.connect.push(c);
            p.start.push(s);
        }
    }
    p
}

/// `line` without ANSI escape sequences (the daemon's log may be coloured).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_state_reads_state_and_faults_after_a_command_with_spaces_and_parens() {
        let stat = "4242 (vcpu 0 (x)) D 1 4242 4242 0 -1 4194624 17 3 5 0 9 2";
        assert_eq!(
            stat_state(stat),
            ("D".to_owned(), "17".to_owned(), "5".to_owned())
        );
        assert_eq!(stat_state("").0, "?");
    }

    #[test]
    fn exec_phases_reads_the_daemons_exec_lines_coloured_or_not() {
        let log = "2026-12-01T21:00:00Z DEBUG specd::daemon: exec vm=\"a\" pid=7 connect_s=0.5 start_s=91.25 run_s=0.1 ok=true\n\
                   2026-12-01T21:00:01Z DEBUG specd::daemon: exec not started vm=\"b\" connect_s=1 wait_s=120\n\
                   \u{1b}[2m2026\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m specd::daemon: exec \u{1b}[3mconnect_s\u{1b}[0m\u{1b}[2m=\u{1b}[0m2 \u{1b}[3mstart_s\u{1b}[0m\u{1b}[2m=\u{1b}[0m3.5\n\
                   2026-12-01T21:00:02Z INFO specd::daemon: created vm=\"c\"\n";
        let p = exec_phases(log);
        assert_eq!(
            p.connect,
            [Duration::from_millis(500), Duration::from_secs(2)]
        );
        assert_eq!(
            p.start,
            [Duration::from_millis(91_250), Duration::from_millis(3500)]
        );
    }
}
