//! `specc-bench pause`: pause and resume of a running count guest, in place.
//!
//! In process, with the specc-vmm library: the guest boots, counts to 1000 and spins on its
//! `go` flag (running guest code all the time). Each cycle times `Vmm::pause` (kick every vCPU
//! out of `KVM_RUN`, wait until each is parked; the kvmclock is told it was stopped) and
//! `Vmm::resume` (each vCPU acknowledges and re-enters the guest), with a millisecond of
//! guest time between cycles so every pause stops a vCPU that is really in the guest. At the
//! end the guest must still count on to 2000 and power off.

use std::time::{Duration, Instant};

use super::{Mode, Report, count, p50_p95};

/// Arguments of `specc-bench pause`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Pause/resume cycles.
    #[arg(long, default_value_t = 100)]
    pub cycles: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
}

/// Runs the scenario.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.cycles > 0, "--cycles must be at least 1");
    let mode = Mode::detect();
    count::require_kvm()?;
    let elf = count::guest_elf("count")?;
    let config = count::config(&elf, args.memory_mib << 20, None);
    let mut vmm = count::boot_ready(&config)?;
    let mut pauses = Vec::with_capacity(args.cycles);
    let mut resumes = Vec::with_capacity(args.cycles);
    for i in 0..args.cycles {
        std::thread::sleep(Duration::from_millis(1));
        let t0 = Instant::now();
        vmm.pause()
            .map_err(|e| anyhow::anyhow!("pause {i}: {}", specc_vmm::error_chain(&e)))?;
        pauses.push(t0.elapsed());
        anyhow::ensure!(vmm.is_paused(), "pause {i} returned with vCPUs running");
        let t1 = Instant::now();
        vmm.resume()
            .map_err(|e| anyhow::anyhow!("resume {i}: {}", specc_vmm::error_chain(&e)))?;
        resumes.push(t1.elapsed());
    }
    count::finish(&mut vmm)?;

    let mut report = Report::new("pause", mode);
    report.figure("cycles_count", args.cycles as f64);
    report.figure("guest_memory_mib", args.memory_mib as f64);
    p50_p95(&mut report, "pause", &mut pauses);
    p50_p95(&mut report, "resume", &mut resumes);
    report.print(args.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_cycles_leave_the_guest_able_to_finish() {
        run(Args {
            json: true,
            cycles: 3,
            memory_mib: 16,
        })
        .expect("pause scenario");
    }
}
