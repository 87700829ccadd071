//! `specc-bench restore`: one full snapshot of a running count guest, then repeated restores.
//!
//! In process, with the specc-vmm library: a count guest of `--memory-mib` boots, counts to
//! 1000 and spins; the host writes every page of `--touched-mib` of its RAM (so the memory
//! file holds data, not only holes) and writes a full snapshot. Each run then restores it with
//! `snapshot_dir::restore` and times
//! - **vmm**: the call until it returns (state read and checked, memory mapped `MAP_PRIVATE`,
//!   KVM VM and vCPUs created with their state, vCPUs running);
//! - **running**: until the restored guest has visibly run: the host sets `go` and waits until
//!   the counter moves past 1000 (the test guest's stand-in for "the agent answers").
//!
//! Runs come in two sets: with the memory file in the page cache (as right after the snapshot
//! was written, or with a popular snapshot), and cold, with the file's pages evicted first
//! (`fsync` + `POSIX_FADV_DONTNEED` on that file alone, so other users of the machine keep
//! their cache). Every restored guest must finish at 2000 and power off, or the run fails.
//! A third set times the steps of a restore one by one (`restore_part_*`), to show where the
//! VMM-side time goes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use specc_vmm::VmConfig;
use specc_vmm::snapshot_dir;
use vm_memory::Bytes;

use super::{Mode, Report, count, median, ms, p50_p95};

/// Arguments of `specc-bench restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Timed restores per set (warm and cold page cache).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Guest memory the host writes before the snapshot, in MiB.
    #[arg(long, default_value_t = 64)]
    pub touched_mib: u64,
    /// Instead of the count guest: a busybox Linux guest with the agent, restored as a
    /// `specc-vmm` process until the agent answers (in the rig unless this host has
    /// hardware KVM).
    #[arg(long)]
    pub linux: bool,
}

/// Runs the scenario.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    if args.linux {
        return run_linux(&args);
    }
    let mode = Mode::detect();
    count::require_kvm()?;
    let elf = count::guest_elf("count")?;
    let dir = tempfile::tempdir()?;
    let config = count::config(
        &elf,
        args.memory_mib << 20,
        Some(dir.path().join("source.log")),
    );
    let mut vmm = count::boot_ready(&config)?;
    let touched = count::touch(vmm.memory(), args.touched_mib << 20)?;
    let snap = dir.path().join("snap");
    let t0 = Instant::now();
    let written = snapshot_dir::write(&mut vmm, &config, &snap, false)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))
        .context("writing the snapshot")?;
    let write_time = t0.elapsed();
    drop(vmm);
    let memory_file = snap.join(snapshot_dir::MEMORY_FILE);
    let allocated = std::fs::metadata(&memory_file)?.blocks() * 512;

    let mut report = Report::new("restore", mode);
    for cold in [false, true] {
        let mut vmm_side = Vec::with_capacity(args.runs);
        let mut running = Vec::with_capacity(args.runs);
        for i in 0..args.runs {
            if cold {
                evict(&memory_file)?;
                let left = resident_bytes(&memory_file)?;
                anyhow::ensure!(
                    left == 0,
                    "{left} bytes of {} stayed in the page cache after eviction (is TMPDIR \
                     on tmpfs?), so a cold restore cannot be measured here",
                    memory_file.display()
                );
            }
            let run_dir = dir
                .path()
                .join(format!("{}{i}", if cold { "cold" } else { "warm" }));
            let (v, r) = restore_once(&snap, &config, &run_dir)
                .with_context(|| format!("restore {i} (cold: {cold})"))?;
            vmm_side.push(v);
            running.push(r);
        }
        let set = if cold { "restore_cold" } else { "restore" };
        p50_p95(&mut report, &format!("{set}_vmm"), &mut vmm_side);
        p50_p95(&mut report, &format!("{set}_running"), &mut running);
    }
    let mut parts: [Vec<Duration>; 4] = Default::default();
    for i in 0..args.runs {
        let run_dir = dir.path().join(format!("parts{i}"));
        let p = restore_in_parts(&snap, &config, &run_dir)
            .with_context(|| format!("restore in parts {i}"))?;
        for (all, one) in parts.iter_mut().zip(p) {
            all.push(one);
        }
    }
    for (name, samples) in ["state_read", "cpu_check", "map_memory", "vm"]
        .iter()
        .zip(&mut parts)
    {
        report.figure(&format!("restore_part_{name}_p50_ms"), ms(median(samples)));
    }
    report.figure("runs_count", args.runs as f64);
    report.figure("guest_memory_mib", args.memory_mib as f64);
    report.figure("touched_bytes", touched as f64);
    report.figure("snapshot_write_ms", ms(write_time));
    report.figure(
        "snapshot_pause_ms",
        ms(Duration::from_micros(written.pause_us)),
    );
    report.figure("memory_data_bytes", written.memory_data_bytes as f64);
    report.figure("memory_file_allocated_bytes", allocated as f64);
    report.print(args.json)
}

/// One restore of `snap` into a fresh run directory: (until `restore` returned, until the
/// guest counted past 1000). The guest is then run to its end and checked.
fn restore_once(
    snap: &Path,
    config: &VmConfig,
    run_dir: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    std::fs::create_dir_all(run_dir)?;
    let mut rc = config.clone();
    rc.serial.log = Some(run_dir.join("console.log"));
    let t0 = Instant::now();
    let mut vmm = snapshot_dir::restore(snap, &rc)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))?;
    let vmm_side = t0.elapsed();
    vmm.memory().write_obj(1u64, count::GO)?;
    count::wait_until(vmm.memory(), count::COUNTER, "count past 1000", |v| {
        v > 1000
    })?;
    let running = t0.elapsed();
    count::finish(&mut vmm)?;
    Ok((vmm_side, running))
}

/// The steps of `snapshot_dir::restore`, timed one by one through the same public pieces:
/// reading and checking `vmstate`, the CPU compatibility check, mapping the memory file, and
/// `restore_captured` (KVM VM and vCPUs created, state loaded, vCPUs running).
fn restore_in_parts(
    snap: &Path,
    config: &VmConfig,
    run_dir: &Path,
) -> anyhow::Result<[Duration; 4]> {
    std::fs::create_dir_all(run_dir)?;
    let mut rc = config.clone();
    rc.serial.log = Some(run_dir.join("console.log"));
    let t0 = Instant::now();
    let saved =
        snapshot_dir::read(snap).map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))?;
    let t1 = Instant::now();
    specc_snapshot::CpuFingerprint::host().check_compatible(&saved.host_cpu)?;
    let t2 = Instant::now();
    let image = snapshot_dir::resolved_memory(snap, &saved);
    let mem = snapshot_dir::map_image(&image, saved.mem_bytes, rc.hugepages)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))?;
    let t3 = Instant::now();
    let mut vmm = specc_vmm::restore_captured(&rc, Some(mem), &saved.state)
        .map_err(|e| anyhow::anyhow!(specc_vmm::error_chain(&e)))?;
    let t4 = Instant::now();
    count::finish(&mut vmm)?;
    Ok([t1 - t0, t2 - t1, t3 - t2, t4 - t3])
}

/// The Linux variant: a busybox guest (our kernel, the agent as PID 1) boots as a
/// `specc-vmm` process, is snapshotted and ends (`After::Exit`); each run then starts a
/// `specc-vmm --restore` process with a fresh disk diff and times
/// - **vmm**: the VMM's own `snapshot_dir::restore` (state read, memory mapped, KVM VM and
///   vCPUs running), as the VMM logs it (`restore_us` in its debug log);
/// - **agent**: process start until the agent answered over vsock (what a caller waits for);
/// - **restored**: until the agent also handled `Restored` (clock, entropy, hostname), the
///   point from which a restored VM is usable as a fresh one.
///
/// The snapshot is the one of a guest that booted and answered once, so the restored guest
/// runs its agent's loop at once. Without hardware KVM the whole scenario re-runs inside the
/// rig (mode `rig`).
fn run_linux(args: &Args) -> anyhow::Result<()> {
    use specc_guestkit::kernel::{KernelKind, ensure_kernel};
    use specc_guestkit::rootfs::{self, Base, RootfsOptions};
    use specc_machine::{After, DEFAULT_CMDLINE, Disk, Machine, MachineConfig};

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
    if decision.placement == specc_rig::Placement::Rig {
        eprintln!("{}", decision.line);
        // SAFETY: no other thread exists yet that could read the environment.
        unsafe { std::env::set_var("SPECC_AGENT_BIN", &agent) };
        let status = specc_rig::run_self_in_rig(specc_rig::RigConfig::default())?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let mode = if specc_rig::in_rig() {
        Mode::Rig
    } else {
        Mode::detect()
    };
    // The restored VMMs log their restore time; nothing else of theirs at debug level.
    // SAFETY: no other thread of this process reads the environment (the VMMs are processes).
    unsafe {
        std::env::set_var(
            "SPECC_VMM_LOG",
            "warn,specc_vmm::snapshot_dir=debug,specc_vmm::promote=debug",
        )
    };
    let dir = tempfile::tempdir()?;
    let config = MachineConfig {
        kernel: kernel.vmlinux.clone(),
        cmdline: DEFAULT_CMDLINE.into(),
        vcpus: 1,
        mem_bytes: args.memory_mib << 20,
        disk: Disk {
            layers: vec![image.path.clone()],
            top: dir.path().join("source/disk.diff"),
        },
        net: false,
    };
    let mut source = Machine::start(&config, &dir.path().join("source"))?;
    let boot = Instant::now();
    let mut client = source
        .connect_agent(Duration::from_secs(300))
        .context("the source VM's agent")?;
    let boot_time = boot.elapsed();
    let snap = dir.path().join("snap");
    let written = source
        .snapshot(&snap, false, After::Exit)
        .context("snapshot of the source VM")?;
    drop(client);
    let status = source.wait_timeout(Duration::from_secs(60))?;
    anyhow::ensure!(
        status.success(),
        "the snapshotted source ended with {status}"
    );

    let mut vmm_side = Vec::with_capacity(args.runs);
    let mut agent_side = Vec::with_capacity(args.runs);
    let mut restored = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let run_dir = dir.path().join(format!("restore{i}"));
        let rc = MachineConfig {
            disk: Disk {
                layers: Vec::new(),
                top: run_dir.join("disk.diff"),
            },
            ..config.clone()
        };
        let t0 = Instant::now();
        let mut vm = Machine::restore(&snap, &rc, &run_dir)?;
        client = vm
            .connect_agent(Duration::from_secs(120))
            .with_context(|| format!("restore {i}: the agent"))?;
        agent_side.push(t0.elapsed());
        Machine::announce_restored(&mut client, &format!("restored{i}"))
            .with_context(|| format!("restore {i}: Restored"))?;
        restored.push(t0.elapsed());
        let status = vm.power_off(&mut client, Duration::from_secs(60))?;
        anyhow::ensure!(
            status.success(),
            "restore {i}: specc-vmm ended with {status}"
        );
        let log = std::fs::read_to_string(run_dir.join("vmm.log"))?;
        vmm_side.push(
            logged_restore(&log)
                .with_context(|| format!("restore {i}: no restore_us in the VMM's log:\n{log}"))?,
        );
    }
    let mut report = Report::new("restore", mode);
    restored_linux_forks(&snap, &config, &dir.path().join("forked"), &mut report)?;
    p50_p95(&mut report, "restore_linux_vmm", &mut vmm_side);
    p50_p95(&mut report, "restore_linux_agent", &mut agent_side);
    p50_p95(&mut report, "restore_linux_restored", &mut restored);
    report.figure("linux_boot_to_agent_ms", ms(boot_time));
    report.figure("snapshot_pause_ms", written.pause_us as f64 / 1000.0);
    report.figure("memory_data_bytes", written.memory_data_bytes as f64);
    report.figure("guest_memory_mib", args.memory_mib as f64);
    report.figure("runs_count", args.runs as f64);
    report.print(args.json)
}

/// Restores the snapshot once more and forks that VM twice, one child each: the first fork
/// promotes the restored VM's memory to anonymous huge pages (`fork_restored_linux_first_ms`,
/// and the promotion's own figures from its `ForkReport`), the second forks huge pages
/// (`fork_restored_linux_second_ms`). Each child's agent must answer, and the source's after
/// both forks.
fn restored_linux_forks(
    snap: &Path,
    config: &specc_machine::MachineConfig,
    run_dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    use specc_machine::{Disk, Machine, MachineConfig};
    let rc = MachineConfig {
        disk: Disk {
            layers: Vec::new(),
            top: run_dir.join("disk.diff"),
        },
        ..config.clone()
    };
    let mut vm = Machine::restore(snap, &rc, run_dir)?;
    let mut client = vm
        .connect_agent(Duration::from_secs(120))
        .context("forked source: the agent")?;
    Machine::announce_restored(&mut client, "forked-source").context("forked source")?;
    let mut promotion = None;
    for (k, name) in ["first", "second"].iter().enumerate() {
        let dirs = vec![run_dir.join(format!("child{k}"))];
        let (fork, children) = vm
            .fork_with_report(&dirs, None)
            .with_context(|| format!("{name} fork of the restored VM"))?;
        report.figure(
            &format!("fork_restored_linux_{name}_ms"),
            fork.pause_us as f64 / 1000.0,
        );
        promotion = promotion.or(fork.promotion);
        for c in children {
            let mut m = c
                .machine
                .with_context(|| format!("{name} fork: the child failed: {:?}", c.report))?;
            let mut a = m
                .connect_agent(Duration::from_secs(120))
                .with_context(|| format!("{name} fork: the child's agent"))?;
            Machine::announce_restored(&mut a, &format!("child{k}"))
                .with_context(|| format!("{name} fork: the child"))?;
            m.power_off(&mut a, Duration::from_secs(60))?;
        }
    }
    Machine::announce_restored(&mut client, "forked-source-after")
        .context("the forked source after its forks")?;
    let status = vm.power_off(&mut client, Duration::from_secs(60))?;
    anyhow::ensure!(status.success(), "the forked source ended with {status}");
    let p = promotion.context("neither fork of the restored VM promoted its memory")?;
    for (field, us) in [
        ("precopy", p.precopy_us),
        ("copy", p.copy_us),
        ("devices_stopped", p.devices_stopped_us),
        ("swap", p.swap_us),
    ] {
        report.figure(&format!("promote_linux_{field}_ms"), us as f64 / 1000.0);
    }
    report.figure("promote_linux_copied_bytes", p.copied_bytes as f64);
    Ok(())
}

/// The VMM-side restore time a `specc-vmm --restore` logged (`restore_us=N`; the log may
/// carry ANSI colour codes around the field name and the `=`).
fn logged_restore(log: &str) -> Option<Duration> {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain.lines().find_map(|l| {
        let (_, rest) = l.split_once("restore_us=")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok().map(Duration::from_micros)
    })
}

/// Drops `path`'s pages from the page cache (written back first, as dirty pages stay).
fn evict(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    // SAFETY: fadvise on a descriptor we own; it only changes caching.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(
        rc == 0,
        "posix_fadvise: {}",
        std::io::Error::from_raw_os_error(rc)
    );
    Ok(())
}

/// How much of `path` is in the page cache (mincore over a read-only mapping).
fn resident_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let len = usize::try_from(f.metadata()?.len())?;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh read-only shared mapping of a file we opened; unmapped below, never
    // dereferenced (mincore only reads the page tables' view of it).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    anyhow::ensure!(
        p != libc::MAP_FAILED,
        "mmap {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: p..p+len is the mapping above; vec has one byte per page of it.
    let rc = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping created above.
    unsafe { libc::munmap(p, len) };
    anyhow::ensure!(rc == 0, "mincore {}: {err}", path.display());
    Ok(vec.iter().filter(|b| **b & 1 != 0).count() as u64 * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn one_restore_of_each_kind_runs_the_guest_to_its_end() {
        run(Args {
            json: true,
            runs: 1,
            memory_mib: 16,
            touched_mib: 2,
            linux: false,
        })
        .expect("restore scenario");
    }

    #[test]
    fn the_vmms_restore_time_is_read_from_its_log() {
        let log = "2026-12-01T10:00:00Z DEBUG specc_vmm::snapshot_dir: restore: running \
                   restore_us=12345\n";
        assert_eq!(logged_restore(log), Some(Duration::from_micros(12345)));
        assert_eq!(logged_restore("nothing here"), None);
        let coloured = "\u{1b}[2m2026\u{1b}[0m \u{1b}[3mrestore_us\u{1b}[0m\u{1b}[2m=\u{1b}[0m77 x";
        assert_eq!(logged_restore(coloured), Some(Duration::from_micros(77)));
    }

    #[test]
    fn evict_leaves_a_written_file_out_of_the_page_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(&vec![7u8; 1 << 20]).expect("write");
        drop(f);
        assert_eq!(resident_bytes(&p).expect("resident"), 1 << 20);
        evict(&p).expect("evict");
        assert_eq!(
            resident_bytes(&p).expect("resident"),
            0,
            "evicted (a TMPDIR on tmpfs cannot drop a file's only copy: use a disk-backed one)"
        );
        assert_eq!(std::fs::read(&p).expect("read back"), vec![7u8; 1 << 20]);
    }
}
