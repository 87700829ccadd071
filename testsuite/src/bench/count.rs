//! The `count` test guest of specc-vmm (`runtime/vmm/test-guests/count.S`), driven in process
//! by the restore, fork, pause and density scenarios.
//!
//! The guest counts to 1000 in memory, raises `ready`, spins until the host sets `go`, then
//! counts on to 2000 with a register as the loop counter and powers off. A copy that reaches
//! 2000 after a restore or a fork therefore got both its memory and its registers back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use specc_vmm::config::SerialConfig;
use specc_vmm::vstate::memory::MemoryBacking;
use specc_vmm::{VmConfig, VmExit, Vmm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The guest's counter.
pub const COUNTER: GuestAddress = GuestAddress(0x20_0000);
/// 1 once the guest has counted to 1000.
pub const READY: GuestAddress = GuestAddress(0x20_0008);
/// Set by the host to let the guest count on.
pub const GO: GuestAddress = GuestAddress(0x20_0010);
/// Guest RAM below this holds the guest's code, page tables and results; the host writes
/// only above it.
pub const TOUCH_FROM: u64 = 0x40_0000;

/// How long any wait on the guest may take before the scenario fails (the guest runs under
/// an instruction emulator on PVM hosts, and the machine is shared).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The assembled test guest `name` (`count`, `halt`, ...).
///
/// specc-vmm's build script assembles the guests into its `OUT_DIR`; the testsuite depends on
/// specc-vmm, so that directory exists in the same target directory as this binary:
/// `<target>/<profile>/build/specc-vmm-<hash>/out/test-guests/`. The newest such directory
/// wins; `SPECC_TEST_GUESTS` (a directory) overrides the search.
pub fn guest_elf(name: &str) -> anyhow::Result<PathBuf> {
    let file = format!("{name}.elf");
    if let Some(dir) = std::env::var_os("SPECC_TEST_GUESTS") {
        let p = Path::new(&dir).join(&file);
        anyhow::ensure!(
            p.exists(),
            "SPECC_TEST_GUESTS is set but {} does not exist",
            p.display()
        );
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut best: Option<(SystemTime, PathBuf)> = None;
    let mut searched = Vec::new();
    for dir in exe.ancestors().skip(1) {
        let build = dir.join("build");
        let Ok(entries) = std::fs::read_dir(&build) else {
            continue;
        };
        searched.push(build.clone());
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with("specc-vmm-") {
                continue;
            }
            let guests = e.path().join("out").join("test-guests");
            if let Ok(errors) = std::fs::read_to_string(guests.join("BUILD_ERRORS")) {
                anyhow::bail!(
                    "specc-vmm's test guests were not built (install gcc and binutils, then \
                     rebuild): {errors}"
                );
            }
            let p = guests.join(&file);
            if let Ok(modified) = std::fs::metadata(&p).and_then(|m| m.modified())
                && best.as_ref().is_none_or(|(t, _)| modified > *t)
            {
                best = Some((modified, p));
            }
        }
        if best.is_some() {
            break;
        }
    }
    best.map(|(_, p)| p).with_context(|| {
        format!(
            "test guest {file} not found under {searched:?} (specc-vmm's build script assembles \
             it with gcc and ld; build specc-testsuite with cargo, or set SPECC_TEST_GUESTS)"
        )
    })
}

/// Fails with the reason when `/dev/kvm` cannot be used.
pub fn require_kvm() -> anyhow::Result<()> {
    std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .context(
            "this scenario runs the VMM in process and needs /dev/kvm (hardware KVM or PVM); \
             it cannot be opened here",
        )
}

/// A one-vCPU VM of `mem_bytes` running `kernel`, console logged to `log` if given.
pub fn config(kernel: &Path, mem_bytes: u64, log: Option<PathBuf>) -> VmConfig {
    VmConfig {
        vcpus: 1,
        mem_bytes,
        kernel: kernel.to_owned(),
        cmdline: String::new(),
        serial: SerialConfig { log, stdout: false },
        disks: Vec::new(),
        vsock: None,
        net: None,
        rng: false,
        memory: MemoryBacking::Anonymous,
        hugepages: true,
        hugetlb: false,
        fork_mode: specc_vmm::snapshot::ForkMode::default(),
        timeout_ms: None,
        control: None,
    }
}

/// Reads a guest word.
pub fn read(mem: &GuestMemoryMmap, at: GuestAddress) -> anyhow::Result<u64> {
    mem.read_obj(at)
        .with_context(|| format!("reading guest memory at {:#x}", at.0))
}

/// Waits until the guest word at `at` satisfies `done`. Polls by yielding for the first
/// milliseconds (precise timing of short waits), then every 50 µs, so the poller does not
/// take a core from the vCPU it waits for.
pub fn wait_until(
    mem: &GuestMemoryMmap,
    at: GuestAddress,
    what: &str,
    done: impl Fn(u64) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let v = read(mem, at)?;
        if done(v) {
            return Ok(());
        }
        let waited = start.elapsed();
        anyhow::ensure!(
            waited < GUEST_TIMEOUT,
            "the guest did not {what} within {GUEST_TIMEOUT:?} (word at {:#x} is {v})",
            at.0
        );
        if waited < Duration::from_millis(2) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Boots `config` and waits until the guest has counted to 1000 and spins on `go`.
pub fn boot_ready(config: &VmConfig) -> anyhow::Result<Vmm> {
    let vmm = specc_vmm::boot(config).context("booting the count guest")?;
    wait_until(vmm.memory(), READY, "count to 1000", |v| v == 1)?;
    Ok(vmm)
}

/// Writes a non-zero byte into every 4 KiB page of guest RAM from [`TOUCH_FROM`] up to
/// `TOUCH_FROM + bytes` (or the end of RAM), so those pages are populated on the host (and a
/// snapshot's memory file holds data for them, not holes). Returns the bytes touched.
pub fn touch(mem: &GuestMemoryMmap, bytes: u64) -> anyhow::Result<u64> {
    let end = TOUCH_FROM.saturating_add(bytes);
    let mut touched = 0;
    for r in mem.iter() {
        let mut a = r.start_addr().0.max(TOUCH_FROM);
        let region_end = r.start_addr().0 + r.len();
        while a < region_end && a < end {
            mem.write_obj(0x5au8, GuestAddress(a))
                .with_context(|| format!("touching guest page {a:#x}"))?;
            touched += 4096;
            a += 4096;
        }
    }
    Ok(touched)
}

/// Lets the guest count on and checks that it ends as it should: at 2000, powered off.
pub fn finish(vmm: &mut Vmm) -> anyhow::Result<()> {
    vmm.memory()
        .write_obj(1u64, GO)
        .context("setting the guest's go flag")?;
    match vmm.wait_timeout(Some(GUEST_TIMEOUT)) {
        Some(VmExit::PowerOff) => {}
        other => anyhow::bail!("the count guest ended with {other:?}, not a power-off"),
    }
    let n = read(vmm.memory(), COUNTER)?;
    anyhow::ensure!(
        n == 2000,
        "the count guest ended at {n}, not 2000 (memory or registers lost)"
    );
    Ok(())
}

/// For tests of scenarios that fork: runs `body` in a fresh process (this test binary again,
/// running only `test` with `probe_env` set) so that no other test's threads exist when the
/// scenario forks, and fails with the probe's output unless it succeeded. In the re-executed
/// process (`probe_env` set) it runs `body` and exits.
#[cfg(test)]
pub fn in_own_process(test: &str, probe_env: &str, body: impl FnOnce() -> anyhow::Result<()>) {
    if std::env::var_os(probe_env).is_some() {
        let code = match body() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{e:#}");
                1
            }
        };
        std::process::exit(code);
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env(probe_env, "1")
        .output()
        .expect("re-running the test binary");
    assert!(
        out.status.success(),
        "{test} in its own process: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_guest_is_found_next_to_the_test_binary() {
        let p = guest_elf("count").expect("count.elf");
        let bytes = std::fs::read(&p).expect("read count.elf");
        assert_eq!(&bytes[..4], b"\x7fELF", "{} is an ELF file", p.display());
    }

    #[test]
    fn touch_writes_one_byte_per_page_above_the_guest_and_counts_them() {
        let mem = specc_vmm::vstate::memory::create(16 << 20, &MemoryBacking::Anonymous, false)
            .expect("guest memory");
        let n = touch(&mem, 1 << 20).expect("touch");
        assert_eq!(n, 1 << 20);
        let at = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).expect("read");
        assert_eq!(at(TOUCH_FROM), 0x5a);
        assert_eq!(at(TOUCH_FROM + (1 << 20) - 4096), 0x5a);
        assert_eq!(at(TOUCH_FROM + (1 << 20)), 0, "past the requested bytes");
        assert_eq!(
            at(TOUCH_FROM - 4096),
            0,
            "the guest's own pages are left alone"
        );
        assert_eq!(
            touch(&mem, u64::MAX).expect("touch all"),
            (16 << 20) - TOUCH_FROM
        );
    }
}
