//! `specc-bench density`: host memory per additional forked VM while the guests are idle.
//!
//! In process, with the specc-vmm library: a `--memory-mib` guest boots, the host writes every
//! page of `--touched-mib` of its RAM (standing in for a guest that has used that much), and
//! one `Vmm::fork` makes `--children` children, which stay alive. Once all of them run, each
//! child VMM process's `/proc/PID/smaps_rollup` is read:
//! - **private** (`Private_Clean + Private_Dirty`, the unique set size): memory that exists
//!   only because this child exists and is freed when it ends: the marginal cost of one more
//!   fork, the figure the goal is about;
//! - **PSS**: private plus each shared page divided by its number of sharers; it includes a
//!   1/(children+1) share of the guest RAM the source populated, so it shrinks as forks are
//!   added and is not a per-fork cost;
//! - **RSS**: everything mapped and resident, shared guest RAM included in full.
//!
//! Kernel memory of a VM (KVM's vCPU and MMU structures) is not in smaps; the system-wide
//! `PageTables + SecPageTables` and `MemAvailable` deltas across the fork are reported beside
//! them (system-wide, so other processes on the machine add noise to them).
//!
//! The guest is the `halt` test guest (it halts with interrupts off, so its vCPU sleeps in
//! the kernel: an idle guest); the `count` guest spins on its `go` flag and would keep a host
//! core busy per child; `child_cpu_while_idle_max_ms` shows the children's CPU use while their
//! memory is read. Children are killed with SIGKILL at the end (they also die with their
//! parent, and end themselves after `CHILD_LIFETIME`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use specc_vmm::snapshot::Forked;
use vm_memory::GuestAddress;

use super::{Mode, Report, count};

/// Arguments of `specc-bench density`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Forked children kept alive.
    #[arg(long, default_value_t = 10)]
    pub children: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// Guest memory the host writes before the fork, in MiB.
    #[arg(long, default_value_t = 256)]
    pub touched_mib: u64,
    /// Fork a VM restored from a snapshot of the booted one instead: the fork first promotes
    /// its memory (a private mapping of the memory file) to anonymous huge pages.
    #[arg(long)]
    pub restored: bool,
}

/// A child ends itself after this long, should the bench not get to kill it.
const CHILD_LIFETIME: Duration = Duration::from_secs(300);

/// How long the children may settle after they all run, before their memory is read.
const SETTLE: Duration = Duration::from_millis(300);

/// The halt guest's first result word, 1 once it is about to halt.
const HALT_STARTED: GuestAddress = GuestAddress(0x20_0000);

/// Memory figures of one process, in KiB, from `smaps_rollup`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Rollup {
    rss: u64,
    pss: u64,
    private: u64,
}

/// Children still alive; killed on drop, so an error midway leaves none behind.
struct Children(Vec<i32>);

impl Drop for Children {
    fn drop(&mut self) {
        // Grandchildren first: child 0 forked them and reaps them while it lives.
        for &pid in self.0.iter().rev() {
            if pid > 0 {
                // SAFETY: kill has no memory-safety preconditions. The pid is a child this
                // bench forked (directly, or through child 0) that idles until killed, so it
                // still names that process: child 0 is unreaped until the VMM's reaper sees it
                // die, and child 0, which reaps the others, is signalled last.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Runs the scenario.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.children > 0, "--children must be at least 1");
    let mode = Mode::detect();
    count::require_kvm()?;
    let elf = count::guest_elf("halt")?;
    let dir = tempfile::tempdir()?;
    let config = count::config(&elf, args.memory_mib << 20, None);
    let mut vmm = specc_vmm::boot(&config).context("booting the halt guest")?;
    count::wait_until(vmm.memory(), HALT_STARTED, "start", |v| v == 1)?;
    let touched = count::touch(vmm.memory(), args.touched_mib << 20)?;
    if args.restored {
        let snap = dir.path().join("snap");
        specc_vmm::snapshot_dir::write(&mut vmm, &config, &snap, false)
            .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))
            .context("snapshot of the halt guest")?;
        drop(vmm);
        vmm = specc_vmm::snapshot_dir::restore(&snap, &config)
            .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))
            .context("restoring the halt guest")?;
    }
    let source_pid = std::process::id();
    let source_before = rollup(source_pid)?;
    let meminfo_before = meminfo()?;

    let dirs: Vec<PathBuf> = (0..args.children)
        .map(|i| dir.path().join(format!("child{i}")))
        .collect();
    let report = match vmm
        .fork(&config, &dirs)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))?
    {
        Forked::Child { .. } => idle_child(),
        Forked::Source(r) => r,
    };
    let children = Children(report.children.iter().map(|c| c.pid).collect());
    for (i, c) in report.children.iter().enumerate() {
        if let Some(e) = &c.error {
            anyhow::bail!("child {i} failed: {e}");
        }
    }
    let cpu_before = children
        .0
        .iter()
        .map(|&p| cpu_ticks(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(SETTLE);
    let mut busy = Vec::with_capacity(children.0.len());
    for (&pid, before) in children.0.iter().zip(&cpu_before) {
        busy.push(cpu_ticks(pid)? - before);
    }
    let mut per_child = Vec::with_capacity(children.0.len());
    for &pid in &children.0 {
        per_child.push(rollup(u32::try_from(pid)?).with_context(|| format!("child {pid}"))?);
    }
    let meminfo_after = meminfo()?;
    let source_after = rollup(source_pid)?;
    let pids = children.0.clone();
    drop(children);
    for pid in pids {
        wait_dead(pid)?;
    }
    let n = args.children as f64;

    let mut out = Report::new("density", mode);
    out.figure("restored_count", f64::from(u8::from(args.restored)));
    if let Some(p) = &report.promotion {
        out.figure("promote_copied_bytes", p.copied_bytes as f64);
        out.figure("promote_precopy_ms", p.precopy_us as f64 / 1000.0);
    }
    out.figure("fork_pause_ms", report.pause_us as f64 / 1000.0);
    out.figure("children_count", n);
    out.figure("guest_memory_mib", args.memory_mib as f64);
    out.figure("touched_bytes", touched as f64);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let pick = |f: fn(&Rollup) -> u64| {
        let mut v: Vec<u64> = per_child.iter().map(f).collect();
        v.sort_unstable();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (p50, max) = pick(|r| r.private);
    out.figure("host_private_per_fork_p50_mib", mib(p50));
    out.figure("host_private_per_fork_max_mib", mib(max));
    let (p50, _) = pick(|r| r.pss);
    out.figure("pss_per_fork_p50_mib", mib(p50));
    let (p50, _) = pick(|r| r.rss);
    out.figure("rss_per_fork_p50_mib", mib(p50));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy.sort_unstable();
    out.figure(
        "child_cpu_while_idle_max_ms",
        busy.last().copied().unwrap_or(0) as f64 * 1000.0 / hz,
    );
    out.figure("idle_window_ms", SETTLE.as_millis() as f64);
    out.figure("source_private_before_mib", mib(source_before.private));
    out.figure("source_private_after_mib", mib(source_after.private));
    let delta = |k: &str| -> f64 {
        let get = |m: &[(String, u64)]| m.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
        get(&meminfo_after) as f64 - get(&meminfo_before) as f64
    };
    out.figure(
        "system_page_tables_per_fork_kib",
        (delta("PageTables") + delta("SecPageTables")) / n,
    );
    out.figure(
        "system_memavailable_drop_per_fork_mib",
        -delta("MemAvailable") / 1024.0 / n,
    );
    drop(vmm);
    out.print(args.json)
}

/// In a fork child: stay alive, idle, until killed (or the parent dies, or the lifetime
/// ends).
fn idle_child() -> ! {
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets this process's parent-death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let start = Instant::now();
    while start.elapsed() < CHILD_LIFETIME {
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: ends the child without running destructors over the source's state.
    unsafe { libc::_exit(0) }
}

/// `Rss`, `Pss` and `Private_Clean + Private_Dirty` of `pid`.
fn rollup(pid: u32) -> anyhow::Result<Rollup> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse_rollup(&text))
}

/// Waits until `pid` has died (its `/proc` entry is gone or a zombie); the children are not
/// this process's to wait for (the VMM's reaper thread or child 0 reaps them).
fn wait_dead(pid: i32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/stat");
    let start = Instant::now();
    loop {
        match std::fs::read_to_string(&path) {
            Err(_) => return Ok(()),
            Ok(stat)
                if stat
                    .rfind(')')
                    .and_then(|i| stat[i + 1..].split_whitespace().next())
                    == Some("Z") =>
            {
                return Ok(());
            }
            Ok(_) => {}
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "fork child {pid} still runs 10 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// User plus system CPU time of process `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: i32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&text).with_context(|| format!("malformed {path}"))
}

/// Fields 14 and 15 (utime, stime) of a `stat` line; the command name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn parse_rollup(text: &str) -> Rollup {
    let mut r = Rollup::default();
    for (k, v) in kib_lines(text) {
        match k.as_str() {
            "Rss" => r.rss = v,
            "Pss" => r.pss = v,
            "Private_Clean" | "Private_Dirty" => r.private += v,
            _ => {}
        }
    }
    r
}

fn meminfo() -> anyhow::Result<Vec<(String, u64)>> {
    Ok(kib_lines(&std::fs::read_to_string("/proc/meminfo")?))
}

/// `Name:   123 kB` lines.
fn kib_lines(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let mut f = rest.split_whitespace();
            let v = f.next()?.parse().ok()?;
            (f.next() == Some("kB")).then(|| (k.trim().to_owned(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_children_are_measured_and_killed() {
        count::in_own_process(
            "bench::density::tests::idle_children_are_measured_and_killed",
            "SPECC_BENCH_DENSITY_PROBE",
            || {
                run(Args {
                    json: true,
                    children: 2,
                    memory_mib: 32,
                    touched_mib: 8,
                    restored: false,
                })
            },
        );
    }

    #[test]
    fn idle_children_of_a_restored_vm_are_measured_and_killed() {
        count::in_own_process(
            "bench::density::tests::idle_children_of_a_restored_vm_are_measured_and_killed",
            "SPECC_BENCH_DENSITY_RESTORED_PROBE",
            || {
                run(Args {
                    json: true,
                    children: 2,
                    memory_mib: 32,
                    touched_mib: 8,
                    restored: true,
                })
            },
        );
    }

    #[test]
    fn smaps_rollup_private_is_clean_plus_dirty() {
        let text = "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0   [rollup]\n\
                    Rss:              524900 kB\nPss:               52000 kB\n\
                    Pss_Anon:          50000 kB\nShared_Clean:       1000 kB\n\
                    Shared_Dirty:     520000 kB\nPrivate_Clean:       300 kB\n\
                    Private_Dirty:      3600 kB\nSwap:                  0 kB\n";
        assert_eq!(
            parse_rollup(text),
            Rollup {
                rss: 524_900,
                pss: 52_000,
                private: 3_900
            }
        );
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 1000";
        assert_eq!(parse_cpu_ticks(stat), Some(12));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
        assert!(cpu_ticks(i32::try_from(std::process::id()).expect("pid")).is_ok());
    }

    #[test]
    fn this_process_has_a_rollup() {
        let r = rollup(std::process::id()).expect("own smaps_rollup");
        assert!(r.rss > 0 && r.pss > 0 && r.private > 0, "{r:?}");
        assert!(
            meminfo()
                .expect("meminfo")
                .iter()
                .any(|(k, _)| k == "MemAvailable")
        );
    }
}
