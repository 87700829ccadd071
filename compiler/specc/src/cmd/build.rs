//! `specc build FILE`: build every uncached layer of the spec into the store (each layer a
//! snapshot of a VM that ran its steps), optionally exporting the head as an OCI layout.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use specc_build::builder::{BuildError, Builder, Event};
use specc_machine::DEFAULT_CMDLINE;
use specc_rig::Placement;
use specc_store::Store;

use super::common::{CompileArgs, Format, print_diagnostics, rekey_if_agent_changed};
use super::run::{prepare_guest, rerun_in_rig};

/// Arguments of `specc build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file.
    pub file: PathBuf,
    /// One JSON event per line on stdout (layer cached/started/output/finished/failed).
    #[arg(long)]
    pub json: bool,
    /// Build VMs at a time (default: one per core, at most what memory allows).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Export the head layer's snapshot as an OCI image layout here.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Say, for each layer to rebuild, which input changed since its previous build.
    #[arg(long)]
    pub explain: bool,
    /// Seconds a build VM may take to answer after boot or restore.
    #[arg(long, default_value_t = 300)]
    pub agent_timeout: u64,
    #[command(flatten)]
    pub compile: CompileArgs,
}

fn default_jobs(mem_bytes: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024);
    // Half of what is free, so the host keeps its page cache for the snapshot files.
    let by_memory = usize::try_from(avail / 2 / mem_bytes.max(1)).unwrap_or(usize::MAX);
    cores.min(by_memory).max(1)
}

/// Runs `specc build`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let decision = specc_rig::decide()?;
    let opts = args.compile.options()?;
    let mut compiled = specc_plan::compile(&args.file, &opts)?;
    print_diagnostics(&compiled.diagnostics, &compiled.files, Format::Human)?;
    let Some(spec) = &compiled.spec else {
        return Ok(ExitCode::from(1));
    };
    let store = Store::open_default().context("opening the store")?;
    let uncached = |spec: &specc_plan::ir::Spec| {
        spec.layers
            .iter()
            .filter(|l| store.layer(&l.key).ok().flatten().is_none())
            .count()
    };
    let t0 = Instant::now();
    // Only a build that has something to do makes the guest (building the agent, kernel and
    // root filesystem if needed), and then keys by what it really made.
    let guest = if uncached(spec) > 0 {
        let guest = prepare_guest(spec, &args.file)?;
        compiled = rekey_if_agent_changed(&args.file, &opts, compiled, &guest.rootfs.key)?;
        Some(guest)
    } else {
        None
    };
    let Some(spec) = compiled.spec else {
        print_diagnostics(&compiled.diagnostics, &compiled.files, Format::Human)?;
        return Ok(ExitCode::from(1));
    };
    let uncached = uncached(&spec);
    let record = specc_build::explain::record_path(&specc_plan::store::specc_home(), &args.file);
    let inputs = specc_build::explain::inputs(&spec);
    // Inside the rig this command is a re-run: the host already explained.
    if args.explain && !specc_rig::in_rig() {
        explain(&spec, &store, &record, &inputs, args.json);
    }
    if let (Some(guest), true) = (guest, uncached > 0) {
        if decision.placement == Placement::Rig {
            // Inside, the scratch files of a killed host's rig cannot be told from a live
            // one's; out here they can.
            specc_build::builder::remove_dead_scratch(&store);
            return rerun_in_rig(&decision, &guest);
        }
        if spec.vm.network {
            super::run::prepare_rig_network()?;
        }
        let builder = Builder {
            kernel: guest.kernel,
            rootfs: guest.rootfs.path,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            vcpus: u8::try_from(spec.vm.vcpus).context("at most 254 vCPUs")?,
            mem_bytes: spec.vm.memory,
            net: spec.vm.network,
            jobs: args.jobs.unwrap_or_else(|| default_jobs(spec.vm.memory)),
            agent_timeout: Duration::from_secs(args.agent_timeout),
        };
        let out = Mutex::new(std::io::stdout());
        let json = args.json;
        let events = move |e: Event| print_event(&out, json, &e);
        let result = builder.build(&spec, &store, &events);
        // Recorded whatever happened: what was built is what the next --explain compares to.
        if let Err(e) = specc_build::explain::save(&record, &inputs) {
            eprintln!("specc: warning: recording the build's inputs failed: {e}");
        }
        if let Err(e) = result {
            report_failure(&e, &compiled.files);
            return Ok(ExitCode::from(1));
        }
    } else {
        let out = Mutex::new(std::io::stdout());
        for l in &spec.layers {
            print_event(
                &out,
                args.json,
                &Event::Cached {
                    layer: l.name.clone(),
                    key: l.key.to_hex(),
                },
            );
        }
    }
    if let Some(dir) = &args.output {
        let head = &spec.layers[spec.head().0];
        let meta = specc_store::oci::ArtifactMeta {
            vm: specc_store::oci::VmShape {
                vcpus: spec.vm.vcpus,
                memory_mib: spec.vm.memory >> 20,
                disk_bytes: spec.vm.disk,
                kernel_cmdline: DEFAULT_CMDLINE.to_owned(),
            },
            cpu_fingerprint: serde_json::to_value(specc_snapshot::CpuFingerprint::host())
                .unwrap_or_default(),
            ref_name: Some(spec.name.clone()),
            runtime: Some(runtime_policy(&spec)),
            ..Default::default()
        };
        specc_store::oci::export_artifact(&store, &head.key, &meta, dir)
            .with_context(|| format!("exporting the artifact to {}", dir.display()))?;
        if !args.json {
            eprintln!("specc: artifact written to {}", dir.display());
        }
    }
    if !args.json {
        eprintln!(
            "specc: {} built in {:.0} ms",
            spec.name,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The spec's `expose`, `idle` and `persistence` as the artifact carries them for `specd`.
/// specd proxies TCP and picks each host port itself, so a UDP port or a fixed host port is
/// said to be dropped rather than dropped in silence.
fn runtime_policy(spec: &specc_plan::ir::Spec) -> specc_store::oci::RuntimePolicy {
    use specc_plan::ir::Persistence as P;
    use specc_store::oci::RuntimePersistence as R;
    let mut ports = Vec::new();
    for p in &spec.expose {
        if p.protocol == specc_syntax::value::Protocol::Udp {
            eprintln!(
                "specc: warning: expose {}/udp: specd proxies TCP only; the artifact leaves it out",
                p.guest
            );
            continue;
        }
        if let Some(host) = p.host.filter(|h| *h != p.guest) {
            eprintln!(
                "specc: warning: expose \"{host}:{}\": specd picks host ports itself; the \
                 artifact exposes guest port {} on whichever it picks",
                p.guest, p.guest
            );
        }
        if !ports.contains(&p.guest) {
            ports.push(p.guest);
        }
    }
    specc_store::oci::RuntimePolicy {
        ports,
        pause_after_s: spec.idle.pause_after.map(|d| d.as_secs()),
        suspend_after_s: spec.idle.suspend_after.map(|d| d.as_secs()),
        persistence: match spec.persistence {
            P::Ephemeral => R::Ephemeral,
            P::Sticky { priority } => R::Sticky { priority },
            P::Persistent => R::Persistent,
        },
    }
}

/// Prints, for each layer the store lacks, why (against the previous build's record).
fn explain(
    spec: &specc_plan::ir::Spec,
    store: &Store,
    record: &std::path::Path,
    inputs: &std::collections::BTreeMap<String, specc_build::explain::LayerInputs>,
    json: bool,
) {
    let before = specc_build::explain::load(record);
    for l in &spec.layers {
        if store.layer(&l.key).ok().flatten().is_some() {
            continue;
        }
        let why = match (before.get(&l.name), inputs.get(&l.name)) {
            (Some(b), Some(n)) => specc_build::explain::why(b, n).unwrap_or_else(|| {
                "its inputs are as last built, but the store no longer has it (gc?)".into()
            }),
            _ => "never built before".into(),
        };
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "explain", "layer": l.name, "why": why})
            );
        } else {
            eprintln!("[{}] rebuild: {why}", l.name);
        }
    }
}

fn print_event(out: &Mutex<std::io::Stdout>, json: bool, e: &Event) {
    let mut out = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if json {
        if let Ok(line) = serde_json::to_string(e) {
            let _ = writeln!(out, "{line}");
        }
        return;
    }
    let _ = match e {
        Event::Cached { layer, key } => writeln!(out, "[{layer}] cached {}", &key[..12]),
        Event::Started { layer, key } => writeln!(out, "[{layer}] building {}", &key[..12]),
        Event::Output { layer, text, .. } => {
            let mut r = Ok(());
            for line in text.lines() {
                r = writeln!(out, "[{layer}] | {line}");
            }
            r
        }
        Event::Finished {
            layer,
            timings_ms,
            memory_bytes,
            ..
        } => writeln!(
            out,
            "[{layer}] done: vm {} ms, steps {} ms, snapshot {} ms, store {} ms, {} KiB memory",
            timings_ms.get("vm").unwrap_or(&0),
            timings_ms.get("steps").unwrap_or(&0),
            timings_ms.get("snapshot").unwrap_or(&0),
            timings_ms.get("store").unwrap_or(&0),
            memory_bytes >> 10
        ),
        Event::Failed { layer, error, .. } => writeln!(out, "[{layer}] failed: {error}"),
    };
}

/// The failure, with the failing step's place in the spec when there is one.
fn report_failure(e: &BuildError, files: &specc_syntax::Files) {
    eprintln!("error: {}", specc_build::builder::error_chain(e));
    if let BuildError::Step {
        source_ref, source, ..
    } = e
    {
        let file = files.get(source_ref.file);
        let at = file.line_col(source_ref.span.start);
        eprintln!("  --> {}:{}:{}", file.name(), at.line, at.col);
        if let specc_build::steps::StepError::Failed { tail, .. } = source.as_ref()
            && !tail.trim().is_empty()
        {
            eprintln!("  last output:");
            let lines: Vec<&str> = tail.lines().collect();
            for line in &lines[lines.len().saturating_sub(10)..] {
                eprintln!("  | {line}");
            }
        }
    }
}
