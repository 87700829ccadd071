//! `specc-vmm CONFIG.json` (or `-` for stdin): boots one VM and runs it until it ends. The exit
//! status says how (docs/vmm.md): 0 guest power-off, 1 VMM error, 2 guest crash (triple
//! fault), 3 KVM could not run the guest, 124 timeout.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use specc_vmm::{VmConfig, VmExit, error_chain};

/// Boot and run one VM from a JSON configuration.
#[derive(Debug, Parser)]
#[command(name = "specc-vmm", version)]
struct Args {
    /// The VM configuration (JSON); `-` reads it from stdin.
    config: PathBuf,
    /// Print setup time and RSS figures as one JSON line on stderr when the VM ends.
    #[arg(long)]
    timings: bool,
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
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
    let mut vmm = specc_vmm::boot(&config).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let exit = vmm.wait();
    if args.timings {
        let setup_us = vmm
            .first_kvm_run()
            .map(|t| t.duration_since(start).as_micros());
        let line = serde_json::json!({
            "setup_us": setup_us,
            "total_us": start.elapsed().as_micros(),
            "vmm_rss_kib": rss_kib(),
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
