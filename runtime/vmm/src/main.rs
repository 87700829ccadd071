//! `specc-vmm CONFIG.json` (or `-` for stdin): boots one VM (or restores it from a snapshot
//! with `--restore DIR`) and runs it until it ends, serving the control socket the
//! configuration names. The exit status says how (docs/vmm.md): 0 guest power-off or stopped
//! on request, 1 VMM error, 2 guest crash (triple fault), 3 KVM could not run the guest, 124
//! timeout.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use specc_vmm::control::{self, After, Pending, Reply, Request};
use specc_vmm::snapshot::Forked;
use specc_vmm::{VmConfig, VmExit, Vmm, error_chain};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Boot and run one VM from a JSON configuration.
#[derive(Debug, Parser)]
#[command(name = "specc-vmm", version)]
struct Args {
    /// The VM configuration (JSON); `-` reads it from stdin.
    config: PathBuf,
    /// Print setup time and RSS figures as one JSON line on stderr when the VM ends.
    #[arg(long)]
    timings: bool,
    /// Restore the VM from this snapshot directory (or state file) instead of booting it.
    #[arg(long, value_name = "DIR|VMSTATE")]
    restore: Option<PathBuf>,
    /// With --restore: guest memory from this memory image (JSON: base file and overlays,
    /// absolute paths) instead of the one the snapshot records.
    #[arg(long, value_name = "FILE", requires = "restore")]
    memory_image: Option<PathBuf>,
}

/// How the process ends.
enum Ending {
    /// The guest ended.
    Exit(VmExit),
    /// A control request ended the VM (stop, or a snapshot with `then: exit`).
    Stopped,
}

/// Runs the VM, serving control requests between waits. A fork child continues here with
/// its own VM and configuration.
fn serve(mut vmm: Vmm, mut config: VmConfig) -> anyhow::Result<(Vmm, VmConfig, Ending)> {
    'vm: loop {
        let (tx, rx) = std::sync::mpsc::channel::<Pending>();
        if let Some(path) = &config.control {
            control::serve(path, tx, vmm.waker()).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        }
        loop {
            if let Some(exit) = vmm.wait_timeout(None) {
                return Ok((vmm, config, Ending::Exit(exit)));
            }
            while let Ok(p) = rx.try_recv() {
                let stop = matches!(
                    p.request,
                    Request::Stop
                        | Request::Snapshot {
                            then: After::Exit,
                            ..
                        }
                );
                let reply = match p.request {
                    Request::Fork { children, mode } => {
                        match vmm.fork_with(&config, &children, mode.unwrap_or(config.fork_mode)) {
                            Ok(Forked::Source(report)) => {
                                Reply::ok(serde_json::to_value(report).unwrap_or_default())
                            }
                            Ok(Forked::Child { config: c, .. }) => {
                                // The request and its reply channel are the source's.
                                std::mem::forget(p.reply);
                                std::mem::forget(rx);
                                config = *c;
                                continue 'vm;
                            }
                            Err(e) => Reply::err(error_chain(&e)),
                        }
                    }
                    other => specc_vmm::handle_request(&mut vmm, &config, other),
                };
                let failed = !reply.ok;
                let _ = p.reply.send(reply);
                if stop && !failed {
                    // Give the control thread a moment to write the reply out.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    return Ok((vmm, config, Ending::Stopped));
                }
            }
        }
    }
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident KiB of the mappings that start at one of `starts` (the guest RAM regions), from
/// /proc/self/smaps: what the guest touched, as opposed to what the VMM itself uses.
fn guest_rss_kib(starts: &[u64]) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, _)) = first.split_once('-')
            && let Ok(lo) = u64::from_str_radix(lo, 16)
        {
            in_guest = starts.contains(&lo);
        } else if in_guest && line.starts_with("Rss:") {
            total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

fn run(args: &Args, start: Instant) -> anyhow::Result<VmExit> {
    let text = if args.config.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the configuration from stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.config)
            .with_context(|| format!("reading {}", args.config.display()))?
    };
    let config: VmConfig = serde_json::from_str(&text).context("parsing the VM configuration")?;
    let vmm = match &args.restore {
        None => specc_vmm::boot(&config).map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
        Some(path) => {
            let vmstate = if path.is_dir() {
                path.join(specc_vmm::snapshot_dir::VMSTATE_FILE)
            } else {
                path.clone()
            };
            let memory = match &args.memory_image {
                None => None,
                Some(f) => Some(
                    serde_json::from_slice(
                        &std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
                    )
                    .with_context(|| format!("parsing the memory image {}", f.display()))?,
                ),
            };
            specc_vmm::snapshot_dir::restore_with(&vmstate, &config, memory)
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?
        }
    };
    let (vmm, config, ending) = serve(vmm, config)?;
    let exit = match ending {
        Ending::Exit(e) => e,
        Ending::Stopped => return Ok(VmExit::PowerOff),
    };
    if args.timings {
        let setup_us = vmm
            .first_kvm_run()
            .map(|t| t.duration_since(start).as_micros());
        let starts: Vec<u64> = vmm
            .memory()
            .iter()
            .filter_map(|r| vmm.memory().get_host_address(r.start_addr()).ok())
            .map(|p| p as u64)
            .collect();
        let rss = rss_kib();
        let guest = guest_rss_kib(&starts);
        let line = serde_json::json!({
            "setup_us": setup_us,
            "total_us": start.elapsed().as_micros(),
            "rss_kib": rss,
            "guest_rss_kib": guest,
            "vmm_overhead_kib": rss.zip(guest).map(|(r, g)| r.saturating_sub(g)),
            "guest_mem_bytes": config.mem_bytes,
            "kvm": vmm.kvm_flavor(),
            "exit": exit,
        });
        eprintln!("{line}");
    }
    Ok(exit)
}

fn main() {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPECC_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    match run(&args, start) {
        Ok(exit) => {
            match &exit {
                VmExit::PowerOff => {}
                VmExit::InternalError(r) => eprintln!("specc-vmm: {r}"),
                other => eprintln!("specc-vmm: VM ended: {other:?}"),
            }
            std::process::exit(exit.exit_code());
        }
        Err(e) => {
            eprintln!("specc-vmm: {e:#}");
            std::process::exit(1);
        }
    }
}
