//! `specc-bench api-create|wake|load`: the daemon end to end, through its HTTP API, with a
//! busybox layer built by `specc build`.
//!
//! - `api-create`: `POST /v1/vms` of a cached layer until the VM answers, and until the first
//!   exec's result (the VM is exec-able).
//! - `wake`: a suspended VM, exec → wake → the exec's result (the exec does the wake).
//! - `load`: `--vms` VMs, then `--execs` exec calls at once spread over them: errors, p50, p99.
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
    /// Samples for `api-create` and `wake`.
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
        Scenario::Load => &["--agent-timeout", "120"],
        _ => &[],
    };
    let daemon = crate::specd::Specd::start(state.path(), extra)?;
    let c = daemon.client();
    let report = match scenario {
        Scenario::Create => api_create(&c, &key, args, mode)?,
        Scenario::Wake => wake(&c, &key, args, mode)?,
        Scenario::Load => load(&c, &key, args, mode, &daemon)?,
    };
    report.print(args.json)
}

/// Builds a one-layer busybox spec in `dir` with `specc build` (VMs in the rig unless this
/// host has hardware KVM); returns the key of its layer `app`. Shared with the specd e2e test.
pub fn build_head_key(specc: &Path, dir: &Path) -> anyhow::Result<String> {
    let spec = dir.join("daemon.kdl");
    std::fs::write(
        &spec,
        r#"spec "bench-daemon" {
    base "busybox"
    vm vcpus=1 memory="128MiB" disk="64MiB"
    layer "app" after="base" {
        run "echo ready > /root/ready"
    }
}
"#,
    )?;
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
        persistence: Persistence::Persistent,
        idle: IdlePolicy::default(),
        ports: vec![],
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
    let results: Vec<Result<Duration, String>> = std::thread::scope(|s| {
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
                        .map_err(|e| format!("{e:#}"));
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    r
                })
            })
            .collect();
        let results = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("exec thread panicked".into()))
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
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = errors.first() {
        eprintln!(
            "specc-bench: {} exec errors, the first: {e}\n--- specd log (end) ---\n{}",
            errors.len(),
            daemon.log_tail(40)
        );
    }
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
            .figure("exec_p99_ms", ms(percentile(&mut ok, 99)));
    }
    Ok(r)
}
