//! `specc-bench fork`: live fork of a running count guest, at several guest memory sizes.
//!
//! In process, with the specc-vmm library (`Vmm::fork`). For each `--sizes-mib` size a count
//! guest boots, counts to 1000 and spins; the host then writes every 4 KiB page of its RAM, so
//! the fork copies the page tables of a guest that used all of its memory. `--runs` single
//! forks follow, then (at the first size) one fork to `--children` children at once. Figures:
//! - **pause**: how long the source's guest did not run (`ForkReport::pause_us`, timed by
//!   the vCPU threads: state capture, disk freeze, `fork(2)`, resume), the figure that must
//!   not grow with memory; `*_owner_p50_ms` is the same as the forking thread saw it, and
//!   `fork_<size>_<span>_p50_ms` its spans (`PauseBreakdown`); `fork_<size>_ram_*_bytes` how
//!   guest RAM was backed at the last fork (transparent huge pages, hugetlb, 4 KiB);
//! - **child ready**: fork request → the child's vCPUs run (`ChildReport::ready_us`);
//! - **child running**: fork request → the child's guest has visibly run (the child sets
//!   `go` and sees its counter pass 1000, then writes the time into its run directory and
//!   exits).
//!
//! The bench process is single-threaded apart from the VM's own threads (paused during the
//! fork) and the VMM's reaper threads (blocked in `waitpid`), the quiesced process
//! `Vmm::fork` asks for. Every child ends itself with `_exit` right after it has run; the
//! source must still count on to 2000 afterwards, unaffected by its children.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use specc_vmm::snapshot::{ForkMode, Forked};
use specc_vmm::{VmConfig, Vmm};
use vm_memory::Bytes;

use super::{Mode, Report, count, median, ms, p50_p95};

/// Arguments of `specc-bench fork`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Single-child forks per size (the shared machine's noise needs a few).
    #[arg(long, default_value_t = 15)]
    pub runs: usize,
    /// Guest memory sizes in MiB (all of it written by the host before forking).
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 2048])]
    pub sizes_mib: Vec<u64>,
    /// Children of the one many-children fork (at the first size; 0 skips it).
    #[arg(long, default_value_t = 20)]
    pub children: usize,
    /// Also fork a VM restored from a snapshot of the source, at each size: its guest RAM is
    /// a private mapping of the memory file, which gets no huge pages until the first fork
    /// promotes it to anonymous huge pages.
    #[arg(long)]
    pub restored: bool,
    /// With `--restored`: do not promote the restored VM's memory (every fork then copies
    /// 4 KiB page-table entries; the behaviour before promotion existed).
    #[arg(long)]
    pub no_promote: bool,
    /// With `--restored`: pause the restored VM before its forks (it is promoted, and
    /// forked, while paused) and resume it after them.
    #[arg(long)]
    pub paused: bool,
    /// Ask for guest RAM from the host's 2 MiB hugetlb pool (`VmConfig::hugetlb`; falls back
    /// to transparent huge pages when the pool cannot hold it). `hugetlb_<size>_bytes` says
    /// what the booted source got.
    #[arg(long)]
    pub hugetlb: bool,
    /// The fork modes to measure, each over every size (`ForkMode`): `cow` (`fork(2)` shares
    /// RAM copy-on-write) and `precopy` (RAM copied into a memfd image while the guest
    /// runs, left out of `fork(2)`); a precopy run's figures start with `precopy_`.
    #[arg(long, value_delimiter = ',', default_values_t = [ForkModeArg::Cow, ForkModeArg::Precopy])]
    pub fork_mode: Vec<ForkModeArg>,
}

/// `--fork-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ForkModeArg {
    /// `ForkMode::Cow`.
    Cow,
    /// `ForkMode::Precopy`.
    Precopy,
}

impl std::fmt::Display for ForkModeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForkModeArg::Cow => "cow",
            ForkModeArg::Precopy => "precopy",
        })
    }
}

impl ForkModeArg {
    fn mode(self) -> ForkMode {
        match self {
            ForkModeArg::Cow => ForkMode::Cow,
            ForkModeArg::Precopy => ForkMode::Precopy,
        }
    }

    /// What this mode's figure names start with (none for `cow`, the names of old runs).
    fn prefix(self) -> &'static str {
        match self {
            ForkModeArg::Cow => "",
            ForkModeArg::Precopy => "precopy_",
        }
    }
}

/// The file a child writes into its run directory once its guest has run.
const RUNNING_FILE: &str = "bench-running";

/// What one fork call gave.
struct Outcome {
    pause: Duration,
    owner: Duration,
    ready: Vec<Duration>,
    running: Vec<Duration>,
    promotion: Option<specc_vmm::promote::PromotionReport>,
    precopy: Option<specc_vmm::promote::PromotionReport>,
    asked: ForkMode,
    mode: ForkMode,
    phases: specc_vmm::snapshot::PauseBreakdown,
    memory: Option<specc_vmm::vstate::memory::Usage>,
    collapse: Option<specc_vmm::snapshot::CollapseReport>,
}

/// The pause's spans over several forks, for their medians.
#[derive(Default)]
struct Phases {
    spans: [Vec<Duration>; 8],
}

impl Phases {
    const NAMES: [&'static str; 8] = [
        "vcpu_stop",
        "devices_stop",
        "promotion_swap",
        "final_copy",
        "capture",
        "fork",
        "devices_resume",
        "vcpu_resume",
    ];

    fn add(&mut self, p: &specc_vmm::snapshot::PauseBreakdown) {
        let us = [
            p.vcpu_stop_us,
            p.devices_stop_us,
            p.promotion_swap_us,
            p.final_copy_us,
            p.capture_us,
            p.fork_us,
            p.devices_resume_us,
            p.vcpu_resume_us,
        ];
        for (v, us) in self.spans.iter_mut().zip(us) {
            v.push(Duration::from_micros(us));
        }
    }

    /// `<prefix>_<span>_p50_ms` for every span, and the fork(2) span's least.
    fn report(&mut self, report: &mut Report, prefix: &str) {
        for (name, v) in Self::NAMES.iter().zip(&mut self.spans) {
            if v.is_empty() {
                continue;
            }
            report.figure(&format!("{prefix}_{name}_p50_ms"), ms(median(v)));
            if *name == "fork"
                && let Some(min) = v.iter().min()
            {
                report.figure(&format!("{prefix}_{name}_min_ms"), ms(*min));
            }
        }
    }
}

/// A precopy fork's copy over several forks, for their p50/p95.
#[derive(Default)]
struct Precopies {
    precopy: Vec<Duration>,
    copy: Vec<Duration>,
    devices_stopped: Vec<Duration>,
    final_pages: Vec<u64>,
    copied_bytes: u64,
}

impl Precopies {
    /// Adds one fork's; an error if a fork asked to precopy fell back to copy-on-write.
    fn add(&mut self, o: &Outcome) -> anyhow::Result<()> {
        anyhow::ensure!(
            o.mode == o.asked,
            "a {:?} fork was made {:?} (the VMM's log says why)",
            o.asked,
            o.mode
        );
        if let Some(p) = &o.precopy {
            let d = Duration::from_micros;
            self.precopy.push(d(p.precopy_us));
            self.copy.push(d(p.copy_us));
            self.devices_stopped.push(d(p.devices_stopped_us));
            self.final_pages.push(p.final_pages);
            self.copied_bytes = p.copied_bytes;
        }
        Ok(())
    }

    /// `precopy_<label>_{precopy,copy,devices_stopped}_{p50,p95}_ms` (the whole copy before
    /// the pause, its bulk part, the time the device workers waited for the comparison),
    /// `..._final_pages_p50_count` (pages copied in the pause) and `..._copied_bytes`.
    fn report(&mut self, report: &mut Report, label: &str) {
        if self.precopy.is_empty() {
            return;
        }
        p50_p95(report, &format!("{label}_precopy"), &mut self.precopy);
        p50_p95(report, &format!("{label}_copy"), &mut self.copy);
        p50_p95(
            report,
            &format!("{label}_devices_stopped"),
            &mut self.devices_stopped,
        );
        self.final_pages.sort_unstable();
        report.figure(
            &format!("{label}_final_pages_p50_count"),
            self.final_pages[self.final_pages.len() / 2] as f64,
        );
        report.figure(&format!("{label}_copied_bytes"), self.copied_bytes as f64);
    }
}

/// `<prefix>_ram_*_bytes`: how the memory of the last fork was backed.
fn report_memory(report: &mut Report, prefix: &str, o: &Outcome) {
    if let Some(m) = &o.memory {
        report.figure(
            &format!("{prefix}_ram_resident_bytes"),
            m.resident_bytes as f64,
        );
        report.figure(&format!("{prefix}_ram_thp_bytes"), m.thp_bytes as f64);
        report.figure(
            &format!("{prefix}_ram_hugetlb_bytes"),
            m.hugetlb_bytes as f64,
        );
        report.figure(
            &format!("{prefix}_ram_4k_bytes"),
            m.small_page_bytes() as f64,
        );
        report.figure(
            &format!("{prefix}_other_anon_bytes"),
            m.other_anon_bytes as f64,
        );
    }
}

/// Runs the scenario.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(!args.sizes_mib.is_empty(), "--sizes-mib names no size");
    let mode = Mode::detect();
    count::require_kvm()?;
    let elf = count::guest_elf("count")?;
    let dir = tempfile::tempdir()?;
    let mut report = Report::new("fork", mode);
    for &fm in &args.fork_mode {
        let pfx = fm.prefix();
        let mut pause_p50 = Vec::new();
        for (k, &mib) in args.sizes_mib.iter().enumerate() {
            let label = size_label(mib);
            let mut config = count::config(&elf, mib << 20, None);
            config.hugetlb = args.hugetlb;
            let mut vmm = count::boot_ready(&config)?;
            let touched = count::touch(vmm.memory(), u64::MAX)?;
            report.figure(&format!("{pfx}touched_{label}_bytes"), touched as f64);
            let mut pauses = Vec::with_capacity(args.runs);
            let mut ready = Vec::with_capacity(args.runs);
            let mut running = Vec::with_capacity(args.runs);
            let mut phases = Phases::default();
            let mut owner = Vec::with_capacity(args.runs);
            let mut collapsed = 0usize;
            let mut precopies = Precopies::default();
            for r in 0..args.runs {
                let dirs = vec![dir.path().join(format!("{pfx}{label}-run{r}"))];
                let o = fork_once(&mut vmm, &config, &dirs, fm.mode())
                    .with_context(|| format!("fork {r} at {mib} MiB"))?;
                pauses.push(o.pause);
                ready.extend(o.ready.iter().copied());
                running.extend(o.running.iter().copied());
                phases.add(&o.phases);
                owner.push(o.owner);
                precopies.add(&o)?;
                if let Some(c) = &o.collapse {
                    collapsed += 1;
                    report.figure(
                        &format!("{pfx}collapse_{label}_last_ms"),
                        c.us as f64 / 1000.0,
                    );
                }
                if r + 1 == args.runs {
                    report_memory(&mut report, &format!("{pfx}fork_{label}"), &o);
                }
            }
            phases.report(&mut report, &format!("{pfx}fork_{label}"));
            precopies.report(&mut report, &format!("{pfx}{label}"));
            report.figure(
                &format!("{pfx}fork_{label}_owner_p50_ms"),
                ms(median(&mut owner)),
            );
            report.figure(&format!("{pfx}collapse_{label}_count"), collapsed as f64);
            pause_p50.push((mib, median(&mut pauses), pauses.iter().min().copied()));
            p50_p95(
                &mut report,
                &format!("{pfx}fork_pause_{label}"),
                &mut pauses,
            );
            // The least of the runs: the fork's own cost with the least interference from the
            // other work on a shared machine.
            if let Some(min) = pauses.iter().min() {
                report.figure(&format!("{pfx}fork_pause_{label}_min_ms"), ms(*min));
            }
            p50_p95(
                &mut report,
                &format!("{pfx}child_ready_{label}"),
                &mut ready,
            );
            p50_p95(
                &mut report,
                &format!("{pfx}child_running_{label}"),
                &mut running,
            );
            if k == 0 && args.children > 0 {
                let n = args.children;
                let dirs: Vec<PathBuf> = (0..n)
                    .map(|i| dir.path().join(format!("{pfx}{label}-many{i}")))
                    .collect();
                let o = fork_once(&mut vmm, &config, &dirs, fm.mode())
                    .with_context(|| format!("fork to {n} children at {mib} MiB"))?;
                report.figure(&format!("{pfx}fork{n}_pause_ms"), ms(o.pause));
                let last = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
                report.figure(&format!("{pfx}fork{n}_all_ready_ms"), ms(last(&o.ready)));
                report.figure(
                    &format!("{pfx}fork{n}_all_running_ms"),
                    ms(last(&o.running)),
                );
            }
            if args.restored {
                restored_forks(
                    vmm,
                    &config,
                    dir.path(),
                    &label,
                    args.runs,
                    (!args.no_promote, args.paused, fm),
                    &mut report,
                )?;
            } else {
                count::finish(&mut vmm).context("the source after its forks")?;
            }
        }
        if let (Some((small, a, amin)), Some((big, b, bmin))) =
            (pause_p50.first(), pause_p50.last())
            && small != big
        {
            let name = format!(
                "{pfx}fork_pause_{}_to_{}",
                size_label(*big),
                size_label(*small)
            );
            let ratio = |x: &Duration, y: &Duration| x.as_secs_f64() / y.as_secs_f64().max(1e-9);
            report.figure(&format!("{name}_p50_ratio"), ratio(b, a));
            if let (Some(amin), Some(bmin)) = (amin, bmin) {
                report.figure(&format!("{name}_min_ratio"), ratio(bmin, amin));
            }
        }
    }
    report.figure("runs_count", args.runs as f64);
    report.print(args.json)
}

/// Snapshots `vmm` (which then runs on), restores the snapshot, writes every page of the
/// restored VM's RAM from the host and forks it `runs` times: `fork_pause_restored_<label>`.
/// A restored VM's RAM is a `MAP_PRIVATE` mapping of the memory file, and the pages written
/// since the restore are 4 KiB anonymous copies in that file-backed mapping (no transparent
/// huge pages there), so `fork(2)` would copy one page-table entry per touched 4 KiB page.
/// With `promote`, the first fork first moves that RAM into anonymous huge pages (copied
/// while the guest runs, swapped in during the pause): its pause is
/// `fork_pause_restored_<label>_first_ms`, the copy's figures `promote_<label>_*`, and the
/// p50/p95/min are of the forks after it.
fn restored_forks(
    mut vmm: Vmm,
    config: &VmConfig,
    dir: &Path,
    label: &str,
    runs: usize,
    (promote, paused, fm): (bool, bool, ForkModeArg),
    report: &mut Report,
) -> anyhow::Result<()> {
    let pfx = fm.prefix();
    // A precopy fork copies RAM into its image instead of promoting it.
    let promote = promote && fm == ForkModeArg::Cow;
    let snap = dir.join(format!("{pfx}{label}-snap"));
    specc_vmm::snapshot_dir::write(&mut vmm, config, &snap, false)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))
        .context("snapshot of the source")?;
    vmm.resume()?;
    // The booted source ends first: its page tables would be copied by every fork of the
    // restored VM in this process, which a VMM process (one VM each) never does.
    count::finish(&mut vmm).context("the source after its forks")?;
    drop(vmm);
    let mut restored = specc_vmm::snapshot_dir::restore(&snap, config)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))
        .context("restoring the source's snapshot")?;
    restored.set_promote_on_fork(promote);
    count::touch(restored.memory(), u64::MAX)?;
    if paused {
        restored.pause()?;
    }
    let mut pauses = Vec::with_capacity(runs);
    let mut owner = Vec::with_capacity(runs);
    let mut phases = Phases::default();
    let mut collapsed = 0usize;
    let mut precopies = Precopies::default();
    for r in 0..runs {
        let dirs = vec![dir.join(format!("{pfx}{label}-restored-run{r}"))];
        let o = fork_once(&mut restored, config, &dirs, fm.mode())
            .with_context(|| format!("fork {r} of the restored VM at {label}"))?;
        anyhow::ensure!(
            restored.is_paused() == paused,
            "fork {r} of the restored VM changed whether it is paused"
        );
        precopies.add(&o)?;
        if r + 1 == runs {
            report_memory(report, &format!("{pfx}fork_restored_{label}"), &o);
        }
        anyhow::ensure!(
            o.promotion.is_some() == (promote && r == 0),
            "fork {r} of the restored VM: promotion {:?} (expected only on the first fork{})",
            o.promotion,
            if promote {
                ""
            } else {
                ": none with --no-promote or --fork-mode precopy"
            }
        );
        if o.collapse.is_some() {
            collapsed += 1;
        }
        if let Some(p) = &o.promotion {
            report.figure(
                &format!("{pfx}fork_pause_restored_{label}_first_ms"),
                ms(o.pause),
            );
            let mut first = Phases::default();
            first.add(&o.phases);
            first.report(report, &format!("{pfx}fork_restored_{label}_first"));
            let f = |name: &str, us: u64| {
                (
                    format!("{pfx}promote_{label}_{name}_ms"),
                    us as f64 / 1000.0,
                )
            };
            for (name, v) in [
                f("precopy", p.precopy_us),
                f("copy", p.copy_us),
                f("swap", p.swap_us),
            ] {
                report.figure(&name, v);
            }
            report.figure(
                &format!("{pfx}promote_{label}_copied_bytes"),
                p.copied_bytes as f64,
            );
            report.figure(
                &format!("{pfx}promote_{label}_huge_bytes"),
                p.huge_bytes as f64,
            );
            report.figure(
                &format!("{pfx}promote_{label}_devices_stopped_ms"),
                p.devices_stopped_us as f64 / 1000.0,
            );
            report.figure(
                &format!("{pfx}promote_{label}_rounds_count"),
                f64::from(p.rounds),
            );
            report.figure(
                &format!("{pfx}promote_{label}_final_pages_count"),
                p.final_pages as f64,
            );
            report.figure(
                &format!("{pfx}promote_{label}_precopy_rounds_pages_count"),
                p.round_pages as f64,
            );
        } else {
            pauses.push(o.pause);
            owner.push(o.owner);
            phases.add(&o.phases);
        }
    }
    if !owner.is_empty() {
        report.figure(
            &format!("{pfx}fork_restored_{label}_owner_p50_ms"),
            ms(median(&mut owner)),
        );
    }
    if paused {
        restored.resume()?;
    }
    phases.report(report, &format!("{pfx}fork_restored_{label}"));
    precopies.report(report, &format!("{pfx}restored_{label}"));
    report.figure(
        &format!("{pfx}collapse_restored_{label}_count"),
        collapsed as f64,
    );
    p50_p95(
        report,
        &format!("{pfx}fork_pause_restored_{label}"),
        &mut pauses,
    );
    if let Some(min) = pauses.iter().min() {
        report.figure(
            &format!("{pfx}fork_pause_restored_{label}_min_ms"),
            ms(*min),
        );
    }
    count::finish(&mut restored).context("the restored VM after its forks")?;
    drop(restored);
    std::fs::remove_dir_all(&snap)?;
    Ok(())
}

/// `256mib`, `2gib`.
fn size_label(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}gib", mib / 1024)
    } else {
        format!("{mib}mib")
    }
}

/// Forks `vmm` into one child per directory and waits until every child's guest has run.
/// In a child this never returns.
fn fork_once(
    vmm: &mut Vmm,
    config: &VmConfig,
    dirs: &[PathBuf],
    mode: ForkMode,
) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let forked = vmm
        .fork_with(config, dirs, mode)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))?;
    let report = match forked {
        Forked::Child { index, .. } => child(vmm, &dirs[index], t0),
        Forked::Source(report) => report,
    };
    let mut ready = Vec::with_capacity(dirs.len());
    for (i, c) in report.children.iter().enumerate() {
        if let Some(e) = &c.error {
            anyhow::bail!("child {i} failed: {e}");
        }
        let us = c
            .ready_us
            .with_context(|| format!("child {i} reported no ready time"))?;
        ready.push(Duration::from_micros(us));
    }
    let mut running = Vec::with_capacity(dirs.len());
    for d in dirs {
        running.push(wait_running(d)?);
    }
    // A child tearing down its copy of guest memory contends with the source's next fork
    // (shared anon_vma locks, page refcounts); measure each fork on a quiet source.
    for c in &report.children {
        wait_gone(c.pid)?;
    }
    Ok(Outcome {
        pause: Duration::from_micros(report.pause_us),
        owner: Duration::from_micros(report.owner_us),
        ready,
        running,
        promotion: report.promotion,
        precopy: report.precopy,
        asked: mode,
        mode: report.mode,
        phases: report.phases,
        memory: report.memory,
        collapse: report.collapse,
    })
}

/// In a fork child: run the guest on, record when it visibly ran, end the process.
fn child(vmm: &Vmm, dir: &Path, t0: Instant) -> ! {
    let outcome = (|| -> anyhow::Result<Duration> {
        vmm.memory().write_obj(1u64, count::GO)?;
        count::wait_until(vmm.memory(), count::COUNTER, "count past 1000", |v| {
            v > 1000
        })?;
        Ok(t0.elapsed())
    })();
    let text = match &outcome {
        Ok(d) => format!("ok {}", d.as_micros()),
        Err(e) => format!("error {e:#}"),
    };
    // Written under a temporary name and renamed: the source never reads half a line.
    let tmp = dir.join(format!("{RUNNING_FILE}.tmp"));
    let _ = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, dir.join(RUNNING_FILE)));
    // SAFETY: ends the child at once, without running destructors or atexit handlers over
    // state (the bench's temporary directory, stdout) that belongs to the source process.
    unsafe { libc::_exit(i32::from(outcome.is_err())) }
}

/// Waits for a child's [`RUNNING_FILE`] and returns the time it recorded.
fn wait_running(dir: &Path) -> anyhow::Result<Duration> {
    let path = dir.join(RUNNING_FILE);
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return match text.strip_prefix("ok ") {
                Some(us) => Ok(Duration::from_micros(us.trim().parse()?)),
                None => Err(anyhow::anyhow!("child in {}: {text}", dir.display())),
            };
        }
        anyhow::ensure!(
            start.elapsed() < count::GUEST_TIMEOUT + Duration::from_secs(5),
            "the child in {} never reported that its guest ran",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until process `pid` has ended and been reaped (its `/proc` entry is gone).
fn wait_gone(pid: i32) -> anyhow::Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let start = Instant::now();
    while proc.exists() {
        anyhow::ensure!(
            start.elapsed() < count::GUEST_TIMEOUT,
            "fork child {pid} did not end after its guest ran"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forks_at_two_sizes_and_to_several_children_all_run() {
        count::in_own_process(
            "bench::fork::tests::forks_at_two_sizes_and_to_several_children_all_run",
            "SPECC_BENCH_FORK_PROBE",
            || {
                run(Args {
                    json: true,
                    runs: 2,
                    sizes_mib: vec![16, 32],
                    children: 3,
                    restored: true,
                    no_promote: false,
                    paused: false,
                    hugetlb: false,
                    fork_mode: vec![ForkModeArg::Cow, ForkModeArg::Precopy],
                })
            },
        );
    }

    #[test]
    fn sizes_are_labelled_in_their_largest_whole_unit() {
        assert_eq!(size_label(256), "256mib");
        assert_eq!(size_label(2048), "2gib");
        assert_eq!(size_label(1536), "1536mib");
    }

    #[test]
    fn a_child_report_is_read_back_or_its_error_surfaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(RUNNING_FILE), "ok 1500").expect("write");
        assert_eq!(
            wait_running(dir.path()).expect("ok"),
            Duration::from_micros(1500)
        );
        std::fs::write(dir.path().join(RUNNING_FILE), "error guest stuck").expect("write");
        let e = wait_running(dir.path()).expect_err("error").to_string();
        assert!(e.contains("guest stuck"), "{e}");
    }
}
