//! `specc-bench boot`: cold boot of the busybox guest to agent-ready, repeated.
//!
//! Kernel, rootfs and agent are prepared (and cached) first, outside the timing. Each run starts
//! a fresh `specc-vmm` process with a fresh disk diff and times process start to the agent's
//! first answer over vsock (VMM setup and guest boot together; `specc-vmm --timings` shows the
//! VMM's own setup alone). Where `/dev/kvm` is not hardware KVM the whole scenario re-runs
//! itself inside the rig, and reports mode "rig".

use std::time::{Duration, Instant};

use anyhow::Context;
use specc_guestkit::kernel::{KernelKind, ensure_kernel};
use specc_guestkit::rootfs::{self, Base, RootfsOptions};
use specc_machine::{DEFAULT_CMDLINE, Disk, Machine, MachineConfig};
use specc_rig::{Placement, RigConfig};

use super::{Mode, Report, median, ms};

/// Arguments of `specc-bench boot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Timed boots.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
}

/// Runs the scenario.
pub fn run(args: Args) -> anyhow::Result<()> {
    let kernel = ensure_kernel(KernelKind::Guest, &|l| eprintln!("kernel: {l}"))?;
    let agent = rootfs::agent_binary()?;
    let image = rootfs::ensure_rootfs(
        &Base::Busybox,
        &RootfsOptions {
            disk_bytes: 256 << 20,
            agent_path: agent.clone(),
        },
    )?;
    let decision = specc_rig::decide()?;
    if decision.placement == Placement::Rig {
        eprintln!("{}", decision.line);
        // SAFETY: no other thread exists yet that could read the environment.
        unsafe { std::env::set_var("SPECC_AGENT_BIN", &agent) };
        let status = specc_rig::run_self_in_rig(RigConfig::default())?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let mode = if specc_rig::in_rig() {
        Mode::Rig
    } else {
        Mode::detect()
    };

    let mut ready = Vec::with_capacity(args.runs);
    let mut rss_kib = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let dir = tempfile::tempdir()?;
        let config = MachineConfig {
            kernel: kernel.vmlinux.clone(),
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 1,
            mem_bytes: args.memory_mib << 20,
            disk: Disk {
                layers: vec![image.path.clone()],
                top: dir.path().join("disk.diff"),
            },
            net: false,
        };
        let t0 = Instant::now();
        let mut vm = Machine::start(&config, dir.path())?;
        let mut client = vm
            .connect_agent(Duration::from_secs(300))
            .with_context(|| format!("boot {i}"))?;
        ready.push(t0.elapsed());
        if let Some(kib) = vm.pid().and_then(vmm_rss_kib) {
            rss_kib.push(kib);
        }
        let status = vm.power_off(&mut client, Duration::from_secs(30))?;
        anyhow::ensure!(status.success(), "boot {i}: specc-vmm ended with {status}");
    }

    let mut report = Report::new("boot", mode);
    report.figure("runs_count", args.runs as f64);
    report.figure("agent_ready_p50_ms", ms(median(&mut ready)));
    report.figure("agent_ready_p95_ms", ms(percentile(&mut ready, 95)));
    if !rss_kib.is_empty() {
        rss_kib.sort_unstable();
        report.figure(
            "vmm_rss_at_ready_p50_mib",
            rss_kib[rss_kib.len() / 2] as f64 / 1024.0,
        );
    }
    report.figure("guest_memory_mib", args.memory_mib as f64);
    report.print(args.json)
}

/// The `p`th percentile (nearest rank) of `samples`.
fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    let rank = (samples.len() * p).div_ceil(100).max(1);
    samples[rank - 1]
}

/// Resident set of a process, in KiB (guest pages the guest touched included).
fn vmm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let mut v: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut v, 95), Duration::from_millis(10));
        assert_eq!(percentile(&mut v, 50), Duration::from_millis(5));
    }
}
