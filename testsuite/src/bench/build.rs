//! `specc-bench build-noop` and `specc-bench layer-overhead`: `specc build` end to end.
//!
//! Both drive the real `target/<profile>/specc build --json` (built first, in this binary's
//! profile, together with `specc-vmm`) on a generated busybox spec written under the cargo
//! target directory (the rig sees the project tree, not the host's `/tmp`). A marker unique to
//! each run goes into every step so the layer keys never match an earlier run's: the store is
//! the user's, shared with the kernel and rootfs caches.
//!
//! `build-noop` builds a 10-layer spec once (cold, in the rig where there is no hardware KVM),
//! then times fully cached rebuilds as whole processes (start-up, compile, store lookup, JSON),
//! and the same compile + store lookup in-process. `layer-overhead` builds a spec of trivial
//! layers at 512 MiB cold and reads each child layer's `finished` event: restore until the
//! agent answers, snapshot and store, against the step's own time, and the memory the snapshot
//! wrote against the guest's memory size.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use specc_rig::Placement;

use super::{Mode, Report, median, ms, p50_p95};

/// Arguments of `specc-bench build-noop`.
#[derive(Debug, clap::Args)]
pub struct NoopArgs {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Layers in the generated spec (besides the base).
    #[arg(long, default_value_t = 10)]
    pub layers: usize,
    /// Timed fully cached rebuilds.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Chain the layers (each after the previous) instead of all after the base.
    #[arg(long)]
    pub chain: bool,
}

/// Arguments of `specc-bench layer-overhead`.
#[derive(Debug, clap::Args)]
pub struct OverheadArgs {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Trivial layers (`run "true"`) over the base.
    #[arg(long, default_value_t = 3)]
    pub layers: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// Chain the layers (each after the previous) instead of all after the base.
    #[arg(long)]
    pub chain: bool,
}

/// A generated spec: `layers` layers over the busybox base, layer `i` running `step(i)` as
/// its only step; a chain (each after the previous) or a fan (each after the base).
///
/// The fan is the default of both scenarios: at the time of writing the third layer of a
/// chain (restored from a snapshot with two memory overlays) did not answer after restore in
/// every try, while fan layers restore from the base alone (docs/benchmarks.md). A fully
/// cached rebuild costs the same either way.
pub fn spec_text(
    memory_mib: u64,
    layers: usize,
    chain: bool,
    step: impl Fn(usize) -> String,
) -> String {
    let mut s = format!(
        "spec \"bench-build\" {{\n    base \"busybox\"\n    vm vcpus=1 memory=\"{memory_mib}MiB\" disk=\"64MiB\"\n"
    );
    for i in 0..layers {
        let _ = writeln!(
            s,
            "\n    layer \"l{i}\"{} {{\n        run {}\n    }}",
            if chain { "" } else { " after=\"base\"" },
            kdl_string(&step(i))
        );
    }
    s.push_str("}\n");
    s
}

/// `s` as a KDL quoted string.
fn kdl_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One event of `specc build --json` (the `output` events are skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildEvent {
    /// `cached`, `started`, `finished` or `failed`.
    pub event: String,
    /// Layer name.
    pub layer: String,
    /// Phase timings of a `finished` event.
    pub timings_ms: BTreeMap<String, u64>,
    /// Memory bytes the snapshot of a `finished` layer wrote.
    pub memory_bytes: u64,
}

/// The events in `specc build --json` output; a line that is not an event is an error (the
/// output is for machines, so anything else there is a bug worth seeing).
pub fn parse_events(stdout: &str) -> anyhow::Result<Vec<BuildEvent>> {
    let mut events = Vec::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON event line: {line}"))?;
        let Some(event) = v["event"].as_str() else {
            bail!("event line without \"event\": {line}");
        };
        if event == "output" {
            continue;
        }
        let layer = v["layer"].as_str().unwrap_or_default().to_owned();
        let timings_ms = match v.get("timings_ms") {
            Some(t) => serde_json::from_value(t.clone())
                .with_context(|| format!("timings_ms is not name -> ms: {line}"))?,
            None => BTreeMap::new(),
        };
        events.push(BuildEvent {
            event: event.to_owned(),
            layer,
            timings_ms,
            memory_bytes: v["memory_bytes"].as_u64().unwrap_or(0),
        });
    }
    Ok(events)
}

/// The `specc` binary beside this one, with `specc` and `specc-vmm` built first in this
/// binary's profile (the builder runs `specc-vmm` from the same directory).
pub(crate) fn specc_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let profile_dir = exe.parent().context("this executable has no directory")?;
    let target_dir = profile_dir
        .parent()
        .context("this executable is not in a cargo target directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the testsuite crate has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "-q", "-j2", "-p", "specc", "-p", "specc-vmm"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => bail!(
            "specc-bench runs from {}, not a debug or release profile directory: cannot build \
             specc and specc-vmm beside it (profile `{other}`)",
            profile_dir.display()
        ),
    }
    eprintln!("specc-bench: building specc and specc-vmm ({profile})");
    let status = cmd
        .status()
        .with_context(|| format!("running {} build", Path::new(&cargo).display()))?;
    let missing: Vec<String> = ["specc", "specc-vmm"]
        .iter()
        .map(|b| profile_dir.join(b))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    ensure!(
        status.success() && missing.is_empty(),
        "cargo build -p specc -p specc-vmm ({profile}) ended with {status}; missing: {}",
        if missing.is_empty() {
            "none (but the build failed)".to_owned()
        } else {
            missing.join(", ")
        }
    );
    Ok(profile_dir.join("specc"))
}

/// A fresh directory for the spec inside the target directory, which the rig shares.
pub(crate) fn spec_dir() -> anyhow::Result<tempfile::TempDir> {
    let exe = std::env::current_exe()?;
    let tmp = exe
        .parent()
        .and_then(Path::parent)
        .context("this executable is not in a cargo target directory")?
        .join("tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    tempfile::Builder::new()
        .prefix("bench-build-")
        .tempdir_in(&tmp)
        .with_context(|| format!("creating a directory in {}", tmp.display()))
}

/// Unique per run: process id and wall-clock nanoseconds.
fn marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{}-{nanos}", std::process::id())
}

/// Where the build VMs run: in the rig unless this host offers hardware KVM.
fn build_mode() -> anyhow::Result<Mode> {
    let decision = specc_rig::decide()?;
    Ok(
        if decision.placement == Placement::Rig || specc_rig::in_rig() {
            Mode::Rig
        } else {
            Mode::detect()
        },
    )
}

/// What one `specc build` run printed: its events, or its events and why it failed.
type BuildResult = Result<Vec<BuildEvent>, (Vec<BuildEvent>, String)>;

/// Runs `specc build --json SPEC` from the project root (so the rig shares the project tree);
/// returns its wall time and events, and fails unless it succeeded. `quiet` swallows its
/// stderr (the rig's progress); `extra` are more `specc build` arguments.
fn specc_build(
    specc: &Path,
    spec: &Path,
    quiet: bool,
    extra: &[&str],
) -> anyhow::Result<(Duration, Vec<BuildEvent>)> {
    let (wall, result) = specc_build_status(specc, spec, quiet, extra)?;
    match result {
        Ok(events) => Ok((wall, events)),
        Err((_, error)) => Err(anyhow::anyhow!(error)),
    }
}

/// Like [`specc_build`], returning a failed build's events and error instead of failing.
fn specc_build_status(
    specc: &Path,
    spec: &Path,
    quiet: bool,
    extra: &[&str],
) -> anyhow::Result<(Duration, BuildResult)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the testsuite crate has no parent directory")?;
    let t = Instant::now();
    let out = Command::new(specc)
        .args(["build", "--json"])
        .args(extra)
        .arg(spec)
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(if quiet {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .output()
        .with_context(|| format!("running {}", specc.display()))?;
    let wall = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events = parse_events(&stdout)?;
    if out.status.success() {
        return Ok((wall, Ok(events)));
    }
    let error = format!(
        "specc build {} ended with {}:\n{stdout}\n{}",
        spec.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((wall, Err((events, error))))
}

/// Every layer of `names` appears exactly once as `want` (or, for the base, which an earlier
/// run may have built with the same shape, as `cached`).
fn check_events(events: &[BuildEvent], names: &[String], want: &str) -> anyhow::Result<()> {
    for name in names {
        let seen: Vec<&str> = events
            .iter()
            .filter(|e| &e.layer == name && e.event != "started")
            .map(|e| e.event.as_str())
            .collect();
        let ok = seen == [want] || (name == "base" && seen == ["cached"]);
        ensure!(
            ok,
            "layer `{name}`: expected `{want}`, got {seen:?} (all events: {events:?})"
        );
    }
    Ok(())
}

/// Attempts at a cold build before the scenario gives up.
const COLD_ATTEMPTS: usize = 4;

/// A cold build of every layer of `names`: wall time over all attempts, the `finished` events
/// (and the base's `cached` one), and the layers that failed on the way.
struct ColdBuild {
    wall: Duration,
    events: Vec<BuildEvent>,
    failed: Vec<String>,
}

/// Builds the spec cold. A failed layer (at the time of writing, a restored build VM now and
/// then never answers, and a `specc` opening the store on the host while the rig builds
/// removes the build's temporary files: docs/benchmarks.md) is retried by running `specc
/// build` again, which rebuilds only what is missing; every failure is counted in a figure.
fn cold_build(
    specc: &Path,
    spec: &Path,
    names: &[String],
    extra: &[&str],
) -> anyhow::Result<ColdBuild> {
    let mut cold = ColdBuild {
        wall: Duration::ZERO,
        events: Vec::new(),
        failed: Vec::new(),
    };
    let args: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--agent-timeout", "60"])
        .collect();
    for attempt in 1..=COLD_ATTEMPTS {
        let (wall, result) = specc_build_status(specc, spec, false, &args)?;
        cold.wall += wall;
        let (events, error) = match result {
            Ok(events) => (events, None),
            Err((events, error)) => (events, Some(error)),
        };
        for e in events {
            match e.event.as_str() {
                "finished" => cold.events.push(e),
                "cached" if e.layer == "base" && attempt == 1 => cold.events.push(e),
                "failed" => cold.failed.push(e.layer),
                _ => {}
            }
        }
        match error {
            None => {
                check_events(&cold.events, names, "finished")?;
                return Ok(cold);
            }
            Some(error) => eprintln!(
                "specc-bench: cold build attempt {attempt} of {COLD_ATTEMPTS} failed: {error}"
            ),
        }
    }
    bail!(
        "the cold build failed {COLD_ATTEMPTS} times; failed layers: {:?}",
        cold.failed
    )
}

fn layer_names(layers: usize) -> Vec<String> {
    std::iter::once("base".to_owned())
        .chain((0..layers).map(|i| format!("l{i}")))
        .collect()
}

/// Runs `build-noop`.
pub fn run_noop(args: NoopArgs) -> anyhow::Result<()> {
    ensure!(
        args.runs > 0 && args.layers > 0,
        "need at least one layer and one run"
    );
    let specc = specc_binary()?;
    let mode = build_mode()?;
    let dir = spec_dir()?;
    let marker = marker();
    let spec = dir.path().join("noop.kdl");
    std::fs::write(
        &spec,
        spec_text(128, args.layers, args.chain, |i| {
            format!("echo {marker}-{i} > /root/l{i}")
        }),
    )?;
    let names = layer_names(args.layers);

    eprintln!(
        "specc-bench: cold build of {} layers (slow in the rig)",
        args.layers
    );
    let cold = cold_build(&specc, &spec, &names, &[])?;

    let mut process = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let (wall, events) =
            specc_build(&specc, &spec, true, &[]).with_context(|| format!("cached rebuild {i}"))?;
        check_events(&events, &names, "cached").with_context(|| format!("cached rebuild {i}"))?;
        process.push(wall);
    }

    // What the process does before it knows there is nothing to build, without its start-up.
    // Keyed the way every `specc` command keys (kernel and root filesystem input digests).
    let opts = specc_plan::Options {
        resolver: Some(specc_build::keys::default_resolver()),
        ..specc_plan::Options::with_default_cache()
    };
    let mut inprocess = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let t = Instant::now();
        let compiled = specc_plan::compile(&spec, &opts)?;
        let Some(planned) = compiled.spec else {
            bail!(
                "the generated spec does not compile: {:?}",
                compiled.diagnostics
            );
        };
        let store = specc_store::Store::open_default().context("opening the store")?;
        for l in &planned.layers {
            ensure!(
                store.layer(&l.key)?.is_some(),
                "in-process run {i}: layer `{}` is not in the store",
                l.name
            );
        }
        inprocess.push(t.elapsed());
    }

    let mut report = Report::new("build-noop", mode);
    report
        .figure("layers_count", names.len() as f64)
        .figure("runs_count", args.runs as f64)
        .figure("cold_build_s", cold.wall.as_secs_f64())
        .figure("cold_build_failed_layers_count", cold.failed.len() as f64);
    p50_p95(&mut report, "noop", &mut process);
    p50_p95(&mut report, "noop_inprocess", &mut inprocess);
    report.print(args.json)
}

/// Runs `layer-overhead`.
pub fn run_overhead(args: OverheadArgs) -> anyhow::Result<()> {
    ensure!(args.layers > 0, "need at least one layer over the base");
    let specc = specc_binary()?;
    let mode = build_mode()?;
    let dir = spec_dir()?;
    let marker = marker();
    let spec = dir.path().join("overhead.kdl");
    // A shell comment keeps the step `true` while making its key unique to this run.
    std::fs::write(
        &spec,
        spec_text(args.memory_mib, args.layers, args.chain, |i| {
            format!("true # {marker}-{i}")
        }),
    )?;
    let names = layer_names(args.layers);

    eprintln!(
        "specc-bench: cold build of {} layers at {} MiB (slow in the rig)",
        args.layers, args.memory_mib
    );
    // One build VM at a time: siblings of a fan would otherwise share the cores and inflate
    // each other's phases.
    let cold = cold_build(&specc, &spec, &names, &["--jobs", "1"])?;
    let events = &cold.events;

    let phase = |e: &BuildEvent, name: &str| {
        e.timings_ms
            .get(name)
            .map(|&v| Duration::from_millis(v))
            .with_context(|| format!("layer `{}`: no `{name}` timing in {e:?}", e.layer))
    };
    let (mut vm, mut steps, mut snapshot, mut store, mut overhead) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut memory = Vec::new();
    for e in events
        .iter()
        .filter(|e| e.event == "finished" && e.layer != "base")
    {
        let (v, st, sn, so) = (
            phase(e, "vm")?,
            phase(e, "steps")?,
            phase(e, "snapshot")?,
            phase(e, "store")?,
        );
        vm.push(v);
        steps.push(st);
        snapshot.push(sn);
        store.push(so);
        overhead.push(v + sn + so);
        memory.push(e.memory_bytes);
    }
    ensure!(
        overhead.len() == args.layers,
        "expected {} child layers finished, got {}",
        args.layers,
        overhead.len()
    );
    memory.sort_unstable();
    let guest = args.memory_mib << 20;

    let mut report = Report::new("layer-overhead", mode);
    report
        .figure("layers_count", args.layers as f64)
        .figure("cold_build_s", cold.wall.as_secs_f64())
        .figure("cold_build_failed_layers_count", cold.failed.len() as f64)
        .figure("guest_memory_bytes", guest as f64);
    p50_p95(&mut report, "overhead", &mut overhead);
    report
        .figure("vm_p50_ms", ms(median(&mut vm)))
        .figure("steps_p50_ms", ms(median(&mut steps)))
        .figure("snapshot_p50_ms", ms(median(&mut snapshot)))
        .figure("store_p50_ms", ms(median(&mut store)))
        .figure("layer_memory_p50_bytes", memory[memory.len() / 2] as f64)
        .figure("layer_memory_max_bytes", memory[memory.len() - 1] as f64)
        .figure(
            "layer_memory_max_ratio",
            memory[memory.len() - 1] as f64 / guest as f64,
        );
    if let Some(base) = events
        .iter()
        .find(|e| e.event == "finished" && e.layer == "base")
    {
        report
            .figure("base_memory_bytes", base.memory_bytes as f64)
            .figure("base_memory_ratio", base.memory_bytes as f64 / guest as f64);
    }
    report.print(args.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_spec_compiles_to_a_chain_with_distinct_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = dir.path().join("s.kdl");
        std::fs::write(
            &spec,
            spec_text(512, 3, true, |i| format!("true # \"m\"-{i} \\ x")),
        )
        .expect("write");
        let planned = compile(&spec);
        let names: Vec<&str> = planned.layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["base", "l0", "l1", "l2"]);
        assert_eq!(planned.vm.memory, 512 << 20);
        for w in planned.layers.windows(2) {
            assert_eq!(w[1].parents.len(), 1);
            assert_eq!(planned.layers[w[1].parents[0].0].name, w[0].name);
            assert_ne!(w[0].key, w[1].key);
        }
        let step = format!("{:?}", planned.layers[1].steps[0].kind);
        assert!(step.contains(r#"true # \"m\"-0 \\ x"#), "{step}");
    }

    #[test]
    fn generated_fan_has_every_layer_after_the_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = dir.path().join("s.kdl");
        std::fs::write(&spec, spec_text(128, 4, false, |i| format!("echo {i}"))).expect("write");
        let planned = compile(&spec);
        assert_eq!(planned.layers.len(), 5);
        for l in &planned.layers[1..] {
            assert_eq!(l.parents.len(), 1, "{}", l.name);
            assert_eq!(planned.layers[l.parents[0].0].name, "base");
        }
    }

    fn compile(spec: &Path) -> specc_plan::ir::Spec {
        let compiled = specc_plan::compile(spec, &specc_plan::Options::default()).expect("compile");
        compiled
            .spec
            .unwrap_or_else(|| panic!("{:?}", compiled.diagnostics))
    }

    #[test]
    fn events_parse_and_output_lines_are_skipped() {
        let out = concat!(
            r#"{"event":"cached","layer":"base","key":"aa"}"#,
            "\n",
            r#"{"event":"started","layer":"l0","key":"bb"}"#,
            "\n",
            r#"{"event":"output","layer":"l0","stderr":false,"text":"hi"}"#,
            "\n",
            r#"{"event":"finished","layer":"l0","key":"bb","timings_ms":{"vm":5,"steps":1,"snapshot":2,"store":3},"memory_bytes":4096}"#,
            "\n",
        );
        let events = parse_events(out).expect("parse");
        assert_eq!(events.len(), 3);
        assert_eq!(events[2].timings_ms["vm"], 5);
        assert_eq!(events[2].memory_bytes, 4096);
        let names = vec!["base".to_owned(), "l0".to_owned()];
        check_events(&events, &names, "finished").expect("base cached, l0 finished");
        assert!(check_events(&events, &names, "cached").is_err());
        assert!(parse_events("specc: running in the rig\n").is_err());
    }
}
