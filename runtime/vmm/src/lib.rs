//! A minimal KVM virtual machine monitor: boot, virtio-mmio devices, snapshots.
//!
//! One process per VM (the `specc-vmm` binary is a thin shell over [`builder::boot`] and
//! [`Vmm::wait`]). The layout follows Firecracker's: `vstate/` is KVM state (system, VM,
//! memory, vCPUs), `arch/` the boot protocol, `device_manager/` the buses.
//!
//! Architecture invariants:
//! - A guest never crashes the VMM: every exit is dispatched to a bus that logs and ignores
//!   accesses that hit nothing; vCPU failures end the VM with a [`VmExit`], never a panic.
//! - Guest RAM is `MAP_PRIVATE` (anonymous, or over a snapshot's memory file) with
//!   `MADV_HUGEPAGE`, owned by `vm-memory`: ready for copy-on-write restore and `fork(2)`.
//! - vCPU state is captured only from paused vCPUs, through the vCPU's own thread.
#![deny(missing_docs)]

pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod exit;
pub mod probe;
pub mod virtio;
pub mod vstate;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use builder::{boot, restore, restore_with_memory};
pub use config::VmConfig;
pub use exit::VmExit;
use vm_memory::GuestMemoryMmap;
pub use vstate::kvm::KvmFlavor;
use vstate::vcpu::VcpuHandle;
pub use vstate::vcpu::VcpuState;
pub use vstate::vm::VmState;

/// Errors of controlling a running VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vCPU command failed.
    #[error("vCPU control")]
    Vcpu(#[from] vstate::vcpu::Error),
    /// Reading or writing VM-wide state failed.
    #[error("VM state")]
    Vm(#[from] vstate::vm::Error),
    /// The operation needs paused vCPUs.
    #[error("the VM is not paused")]
    NotPaused,
    /// The VM has already ended.
    #[error("the VM has ended")]
    Ended,
}

/// Formats an error with its whole `source()` chain, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A running VM.
#[derive(Debug)]
pub struct Vmm {
    kvm: vstate::kvm::Kvm,
    vm: vstate::vm::Vm,
    devices: Arc<device_manager::DeviceManager>,
    vcpus: Vec<VcpuHandle>,
    exit_rx: Receiver<VmExit>,
    first_run: Arc<OnceLock<Instant>>,
    virtio: Vec<virtio::Attached>,
    deadline: Option<Instant>,
    paused: bool,
    ended: Option<VmExit>,
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kvm: vstate::kvm::Kvm,
        vm: vstate::vm::Vm,
        devices: Arc<device_manager::DeviceManager>,
        vcpus: Vec<VcpuHandle>,
        exit_rx: Receiver<VmExit>,
        first_run: Arc<OnceLock<Instant>>,
        virtio: Vec<virtio::Attached>,
        timeout_ms: Option<u64>,
    ) -> Self {
        let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        Vmm {
            kvm,
            vm,
            devices,
            vcpus,
            exit_rx,
            first_run,
            virtio,
            deadline,
            paused: false,
            ended: None,
        }
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.vm.memory
    }

    /// The buses (stray-access counters, virtio slots).
    pub fn devices(&self) -> &device_manager::DeviceManager {
        &self.devices
    }

    /// The attached virtio devices.
    pub fn virtio_devices(&self) -> &[virtio::Attached] {
        &self.virtio
    }

    /// Which KVM this VM runs on.
    pub fn kvm_flavor(&self) -> KvmFlavor {
        self.kvm.flavor
    }

    /// When the first vCPU first entered KVM_RUN.
    pub fn first_kvm_run(&self) -> Option<Instant> {
        self.first_run.get().copied()
    }

    /// Waits until the VM ends (or the configured timeout, or `limit`, whichever is first),
    /// then stops the vCPU threads. `None` only if `limit` passed first; the VM keeps running.
    pub fn wait_timeout(&mut self, limit: Option<Duration>) -> Option<VmExit> {
        if let Some(e) = &self.ended {
            return Some(e.clone());
        }
        let now = Instant::now();
        let limit_at = limit.map(|l| now + l);
        let until = match (self.deadline, limit_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let got = match until {
            None => self.exit_rx.recv().ok(),
            Some(t) => match self.exit_rx.recv_timeout(t.saturating_duration_since(now)) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => {
                    if self.deadline.is_some_and(|d| d <= Instant::now()) {
                        self.log_vcpu_positions();
                        Some(VmExit::Timeout)
                    } else {
                        return None;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        let exit = got.unwrap_or(VmExit::VcpuError {
            vcpu: 0,
            message: "all vCPU threads ended".into(),
        });
        self.stop();
        self.ended = Some(exit.clone());
        Some(exit)
    }

    /// Logs where every vCPU is (a guest that ran out of time is usually stuck somewhere).
    fn log_vcpu_positions(&mut self) {
        if self.pause().is_err() {
            return;
        }
        match self.save_vcpu_states() {
            Ok(states) => {
                for s in states {
                    tracing::warn!(
                        "timeout: vcpu {} mp_state {} rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} \
                         cr3 {:#x} efer {:#x} cs {:#x}/{:#x}",
                        s.id,
                        s.mp_state.mp_state,
                        s.regs.rip,
                        s.regs.rsp,
                        s.regs.rflags,
                        s.sregs.cr0,
                        s.sregs.cr3,
                        s.sregs.efer,
                        s.sregs.cs.selector,
                        s.sregs.cs.base
                    );
                }
            }
            Err(e) => tracing::warn!("timeout: reading vCPU state: {}", error_chain(&e)),
        }
    }

    /// Waits until the VM ends and stops the vCPU threads.
    pub fn wait(&mut self) -> VmExit {
        loop {
            if let Some(e) = self.wait_timeout(None) {
                return e;
            }
        }
    }

    fn stop(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        for d in &self.virtio {
            d.transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pause();
        }
    }

    /// Pauses every vCPU (kick + wait). The guest stops at an instruction boundary; no vCPU
    /// thread holds a lock afterwards. Device workers keep running (see [`Vmm::pause_devices`]).
    pub fn pause(&mut self) -> Result<(), Error> {
        if self.ended.is_some() {
            return Err(Error::Ended);
        }
        // Kick them all first so the pause costs one round trip, not one per vCPU.
        for v in &self.vcpus {
            v.request_pause()?;
        }
        for v in &self.vcpus {
            v.wait_paused()?;
        }
        self.paused = true;
        Ok(())
    }

    /// Resumes the vCPUs after [`Vmm::pause`].
    pub fn resume(&mut self) -> Result<(), Error> {
        if self.ended.is_some() {
            return Err(Error::Ended);
        }
        for v in &self.vcpus {
            v.resume()?;
        }
        self.paused = false;
        Ok(())
    }

    /// Stops the virtio device workers (before a snapshot; the vCPUs should be paused first).
    pub fn pause_devices(&self) {
        for d in &self.virtio {
            d.transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pause();
        }
    }

    /// Restarts the virtio device workers after [`Vmm::pause_devices`].
    pub fn resume_devices(&self) -> Result<(), specc_devices::virtio::ActivateError> {
        for d in &self.virtio {
            d.transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .resume()?;
        }
        Ok(())
    }

    /// The state of every vCPU, in id order. Needs paused vCPUs.
    pub fn save_vcpu_states(&self) -> Result<Vec<VcpuState>, Error> {
        if !self.paused {
            return Err(Error::NotPaused);
        }
        Ok(self
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<_, _>>()?)
    }

    /// Loads states (one per vCPU, matched by id). Needs paused vCPUs.
    pub fn restore_vcpu_states(&self, states: &[VcpuState]) -> Result<(), Error> {
        if !self.paused {
            return Err(Error::NotPaused);
        }
        for s in states {
            let v = self
                .vcpus
                .iter()
                .find(|v| v.id == s.id)
                .ok_or(Error::Vcpu(vstate::vcpu::Error::NoResponse(s.id)))?;
            v.restore_state(s.clone())?;
        }
        Ok(())
    }

    /// The irqchip, PIT and clock state. Needs paused vCPUs.
    pub fn save_vm_state(&self) -> Result<VmState, Error> {
        if !self.paused {
            return Err(Error::NotPaused);
        }
        Ok(self.vm.save_state()?)
    }

    /// Loads irqchip, PIT and clock state. Needs paused vCPUs.
    pub fn restore_vm_state(&self, state: &VmState) -> Result<(), Error> {
        if !self.paused {
            return Err(Error::NotPaused);
        }
        Ok(self.vm.restore_state(state)?)
    }
}

/// Closes every KVM VM and vCPU fd this process holds. In a `fork(2)` child they belong to the
/// parent's VM (KVM binds a VM to the process that created it), so the child can only close
/// them, and must, or the parent's VM outlives the parent.
fn close_inherited_kvm_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let t = target.to_string_lossy();
            (t.starts_with("anon_inode:kvm-vm") || t.starts_with("anon_inode:kvm-vcpu"))
                .then_some(fd)
        })
        .collect();
    for fd in fds {
        // SAFETY: the fd is open (just listed) and, in a fork child, owned by nothing that will
        // use or close it again: the structures holding it are leaked by `into_fork_child`.
        unsafe { libc::close(fd) };
    }
}

impl Vmm {
    /// For the child of a `fork(2)` taken while this VM was paused: gives up the parent's VM
    /// without touching it (no vCPU threads exist in the child, so nothing is stopped or
    /// joined; the parent's KVM fds are closed) and returns guest memory, the child's own
    /// copy-on-write view of the parent's `MAP_PRIVATE` mapping, for
    /// [`builder::restore_with_memory`]. Call it only in a fork child.
    pub fn into_fork_child(self) -> GuestMemoryMmap {
        let memory = self.vm.memory.clone();
        // Dropping would signal and join vCPU threads that exist only in the parent.
        std::mem::forget(self);
        close_inherited_kvm_fds();
        memory
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    //! These boot the tiny guests of test-guests/ under /dev/kvm (on this project's machines a
    //! PVM-backed one, where guest code runs under KVM's instruction emulator: the guests are
    //! a few hundred instructions each).

    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::SerialConfig;
    use crate::vstate::memory::MemoryBacking;

    const RESULTS: u64 = 0x20_0000;

    fn guest(name: &str) -> PathBuf {
        let dir = Path::new(env!("SPECC_TEST_GUESTS"));
        if let Ok(errors) = std::fs::read_to_string(dir.join("BUILD_ERRORS")) {
            panic!("test guests were not built (install gcc and binutils): {errors}");
        }
        let p = dir.join(format!("{name}.elf"));
        assert!(p.exists(), "test guest {} missing", p.display());
        p
    }

    fn require_kvm() {
        if let Err(e) = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            panic!(
                "these tests boot guests and need /dev/kvm, which cannot be opened ({e}); \
                 run them on a KVM host or inside the rig"
            );
        }
    }

    fn config(name: &str, dir: &Path) -> VmConfig {
        require_kvm();
        VmConfig {
            vcpus: 1,
            mem_bytes: 64 << 20,
            kernel: guest(name),
            cmdline: String::new(),
            serial: SerialConfig {
                log: Some(dir.join("serial.log")),
                stdout: false,
            },
            disks: Vec::new(),
            vsock: None,
            net: None,
            rng: false,
            memory: MemoryBacking::Anonymous,
            hugepages: true,
            timeout_ms: Some(20_000),
        }
    }

    fn result(vmm: &Vmm, slot: u64) -> u64 {
        vmm.memory()
            .read_obj(GuestAddress(RESULTS + slot * 8))
            .unwrap()
    }

    fn serial(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("serial.log")).unwrap()
    }

    #[test]
    fn hello_guest_boots_in_long_mode_echoes_cmdline_and_powers_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("hello", dir.path());
        c.vcpus = 2;
        c.cmdline = "console=ttyS0 specc.test=1".into();
        let mut vmm = boot(&c).unwrap();
        assert_eq!(vmm.wait(), VmExit::PowerOff);
        assert_eq!(
            serial(dir.path()),
            "hello from the test guest: console=ttyS0 specc.test=1\n"
        );
        assert_eq!(result(&vmm, 0), 0x5353_4543_4345_5053, "guest did not run");
        assert_eq!(result(&vmm, 1), 0xaa55, "zero page boot_flag");
        assert_eq!(result(&vmm, 2), 0x5372_6448, "zero page header magic");
        assert_eq!(result(&vmm, 3), 0x8ff0, "boot stack");
        assert_eq!(result(&vmm, 4), 3, "e820 entries");
        let ebx = result(&vmm, 5);
        assert_eq!((ebx >> 24) & 0xff, 0, "BSP APIC id");
        assert_eq!((ebx >> 16) & 0xff, 2, "logical processor count");
        assert_ne!(result(&vmm, 6) & (1 << 31), 0, "hypervisor bit");
        if vmm.kvm_flavor() == KvmFlavor::Pvm {
            assert_eq!(result(&vmm, 6) & (1 << 13), 0, "CX16 hidden on PVM");
        }
        assert!(vmm.first_kvm_run().is_some());
    }

    fn wait_for(vmm: &Vmm, slot: u64, value: u64) {
        let start = Instant::now();
        while result(vmm, slot) != value {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "guest never wrote {value:#x}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn halted_guest_pauses_saves_restores_rewritten_state_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut vmm = boot(&config("halt", dir.path())).unwrap();
        wait_for(&vmm, 0, 1);
        vmm.pause().unwrap();
        let states = vmm.save_vcpu_states().unwrap();
        assert_eq!(states.len(), 1);
        let s = &states[0];
        assert_eq!(s.regs.r12, 0x1234_abcd);
        assert_eq!(s.regs.rflags & (1 << 9), 0, "interrupts were disabled");
        assert_eq!(s.sregs.efer & (1 << 10), 1 << 10, "long mode active");
        assert_eq!(s.xsave.len(), 1024);
        assert!(!s.msrs.is_empty() && !s.cpuid.is_empty());
        // A second save of an unchanged paused vCPU is identical, except for the TSC, which
        // keeps counting while the guest is paused.
        let without_tsc = |v: &[VcpuState]| {
            let mut v = v.to_vec();
            v[0].msrs.retain(|m| m.index != 0x10);
            serde_json::to_string(&v).unwrap()
        };
        let again = vmm.save_vcpu_states().unwrap();
        assert!(
            states[0].msrs.iter().any(|m| m.index == 0x10),
            "TSC MSR saved"
        );
        assert_eq!(without_tsc(&states), without_tsc(&again));
        let vm_state = vmm.save_vm_state().unwrap();
        vmm.restore_vm_state(&vm_state).unwrap();

        let mut edited = states[0].clone();
        edited.regs.rip = result(&vmm, 1);
        edited.mp_state.mp_state = kvm_bindings::KVM_MP_STATE_RUNNABLE;
        vmm.restore_vcpu_states(&[edited]).unwrap();
        let restored = vmm.save_vcpu_states().unwrap();
        assert_eq!(restored[0].regs.rip, result(&vmm, 1));
        vmm.resume().unwrap();
        assert_eq!(vmm.wait(), VmExit::PowerOff);
        assert_eq!(serial(dir.path()), "HR\n");
    }

    /// Writes all of guest RAM to `path`, regions back to back (the memory-file layout).
    fn dump_memory(vmm: &Vmm, path: &Path) {
        use std::io::Write;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut f = std::fs::File::create(path).unwrap();
        let mem = vmm.memory();
        for r in mem.iter() {
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < r.len() {
                mem.read_slice(&mut buf, GuestAddress(r.start_addr().0 + off))
                    .unwrap();
                f.write_all(&buf).unwrap();
                off += buf.len() as u64;
            }
        }
    }

    #[test]
    fn snapshot_mid_run_restores_from_a_private_memory_file_and_continues_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("count", dir.path());
        c.mem_bytes = 16 << 20;
        let mut vmm = boot(&c).unwrap();
        wait_for(&vmm, 1, 1);
        vmm.pause().unwrap();
        let vcpus = vmm.save_vcpu_states().unwrap();
        let vm_state = vmm.save_vm_state().unwrap();
        let mem_file = dir.path().join("memory");
        dump_memory(&vmm, &mem_file);
        assert_eq!(result(&vmm, 0), 1000);
        drop(vmm);
        let pristine = std::fs::read(&mem_file).unwrap();
        assert_eq!(pristine.len() as u64, c.mem_bytes);

        for round in 0..2 {
            let rdir = dir.path().join(format!("r{round}"));
            std::fs::create_dir(&rdir).unwrap();
            let mut rc = config("count", &rdir);
            rc.mem_bytes = c.mem_bytes;
            rc.memory = MemoryBacking::File {
                path: mem_file.clone(),
            };
            let mut restored = restore(&rc, &vm_state, &vcpus).unwrap();
            assert_eq!(result(&restored, 0), 1000, "memory came back");
            restored
                .memory()
                .write_obj(1u64, GuestAddress(RESULTS + 16))
                .unwrap();
            assert_eq!(restored.wait(), VmExit::PowerOff);
            assert_eq!(
                result(&restored, 0),
                2000,
                "counting went on from 1000 with its registers"
            );
            assert_eq!(serial(&rdir), "done\n");
        }
        assert!(
            std::fs::read(&mem_file).unwrap() == pristine,
            "memory file untouched"
        );
    }

    #[test]
    fn restore_with_memory_runs_a_second_vm_over_already_mapped_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("count", dir.path());
        c.mem_bytes = 16 << 20;
        let mut vmm = boot(&c).unwrap();
        wait_for(&vmm, 1, 1);
        vmm.pause().unwrap();
        let vcpus = vmm.save_vcpu_states().unwrap();
        let vm_state = vmm.save_vm_state().unwrap();
        // Stand-in for the mapping a fork(2) child inherits: a private copy of the pages.
        let mem_file = dir.path().join("memory");
        dump_memory(&vmm, &mem_file);
        let copy = crate::vstate::memory::create(
            c.mem_bytes,
            &MemoryBacking::File { path: mem_file },
            true,
        )
        .unwrap();
        let mut child = restore_with_memory(&c, copy, &vm_state, &vcpus).unwrap();
        child
            .memory()
            .write_obj(1u64, GuestAddress(RESULTS + 16))
            .unwrap();
        assert_eq!(child.wait(), VmExit::PowerOff);
        assert_eq!(result(&child, 0), 2000);
        // The parent never saw the child's writes and still runs where it paused.
        assert_eq!(result(&vmm, 0), 1000);
        vmm.resume().unwrap();
        vmm.memory()
            .write_obj(1u64, GuestAddress(RESULTS + 16))
            .unwrap();
        assert_eq!(vmm.wait(), VmExit::PowerOff);
        assert_eq!(result(&vmm, 0), 2000);
    }

    /// Runs in its own process (re-executed by the test below) so that no other test's threads
    /// exist when it forks.
    fn fork_probe() -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("count", dir.path());
        c.mem_bytes = 64 << 20;
        let mut vmm = boot(&c).unwrap();
        wait_for(&vmm, 1, 1);
        vmm.pause().unwrap();
        let vcpus = vmm.save_vcpu_states().unwrap();
        let vm_state = vmm.save_vm_state().unwrap();
        // SAFETY: the process is quiesced: the only other threads are the paused vCPU (blocked
        // on its channel) and the test harness waiting for this test; the child only runs the
        // restore path and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let memory = vmm.into_fork_child();
            let mut rc = c.clone();
            rc.serial.log = Some(dir.path().join("child.log"));
            let code = match restore_with_memory(&rc, memory, &vm_state, &vcpus) {
                Ok(mut child) => {
                    child
                        .memory()
                        .write_obj(1u64, GuestAddress(RESULTS + 16))
                        .unwrap();
                    let ok = child.wait() == VmExit::PowerOff && result(&child, 0) == 2000;
                    if ok { 0 } else { 2 }
                }
                Err(_) => 3,
            };
            // SAFETY: _exit ends the child without running the parent's atexit handlers or
            // destructors over state it shares with the parent.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let child_code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            100
        };
        // The child's writes never reached the parent; the parent runs on from where it was.
        let parent_untouched = result(&vmm, 0) == 1000 && result(&vmm, 2) == 0;
        vmm.resume().unwrap();
        vmm.memory()
            .write_obj(1u64, GuestAddress(RESULTS + 16))
            .unwrap();
        let parent_ok = vmm.wait() == VmExit::PowerOff && result(&vmm, 0) == 2000;
        match (child_code, parent_untouched, parent_ok) {
            (0, true, true) => 0,
            (c, _, _) if c != 0 => 10 + c,
            (_, false, _) => 20,
            _ => 30,
        }
    }

    #[test]
    fn fork_of_a_paused_vmm_gives_a_child_vm_over_copy_on_write_memory() {
        if std::env::var_os("SPECC_VMM_FORK_PROBE").is_some() {
            std::process::exit(fork_probe());
        }
        require_kvm();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::fork_of_a_paused_vmm_gives_a_child_vm_over_copy_on_write_memory",
                "--test-threads=1",
            ])
            .env("SPECC_VMM_FORK_PROBE", "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "fork probe failed (11-13: child restore/run failed, 20: child wrote into the \
             parent, 30: parent did not resume): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn restore_refuses_a_state_count_that_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let c = config("count", dir.path());
        let mut vmm = boot(&c).unwrap();
        wait_for(&vmm, 1, 1);
        vmm.pause().unwrap();
        let vm_state = vmm.save_vm_state().unwrap();
        assert!(matches!(
            restore(&c, &vm_state, &[]),
            Err(builder::RestoreError::VcpuCount {
                states: 0,
                vcpus: 1
            })
        ));
    }

    #[test]
    fn pause_resume_cycles_keep_a_halted_guest_alive() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("halt", dir.path());
        c.timeout_ms = Some(300);
        let mut vmm = boot(&c).unwrap();
        wait_for(&vmm, 0, 1);
        for _ in 0..10 {
            vmm.pause().unwrap();
            vmm.resume().unwrap();
        }
        assert!(matches!(vmm.save_vcpu_states(), Err(Error::NotPaused)));
        assert_eq!(vmm.wait(), VmExit::Timeout);
        assert!(matches!(vmm.pause(), Err(Error::Ended)));
    }

    #[test]
    fn invalid_opcode_without_idt_is_a_triple_fault() {
        let dir = tempfile::tempdir().unwrap();
        let mut vmm = boot(&config("crash", dir.path())).unwrap();
        assert_eq!(vmm.wait(), VmExit::TripleFault { vcpu: 0 });
    }

    #[test]
    fn stray_port_and_mmio_accesses_are_ignored_and_read_all_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut vmm = boot(&config("stray", dir.path())).unwrap();
        assert_eq!(vmm.wait(), VmExit::PowerOff);
        assert_eq!(result(&vmm, 4), 0x600d, "guest did not finish");
        assert_eq!(result(&vmm, 0), 0xff);
        assert_eq!(result(&vmm, 1), 0xffff_ffff);
        assert_eq!(result(&vmm, 2), 0xffff_ffff);
        assert_eq!(result(&vmm, 3), u64::MAX);
        assert!(vmm.devices().unhandled_accesses() >= 6);
    }

    #[test]
    fn virtio_rng_queue_round_trip_from_a_hand_written_driver() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("virtio_rng", dir.path());
        c.rng = true;
        let mut vmm = boot(&c).unwrap();
        assert_eq!(vmm.virtio_devices().len(), 1);
        assert_eq!(vmm.wait(), VmExit::PowerOff);
        assert_eq!(result(&vmm, 0), 0x7472_6976, "virtio magic");
        assert_eq!(result(&vmm, 1), 2, "virtio-mmio version");
        assert_eq!(result(&vmm, 2), 4, "device id (entropy)");
        assert_eq!(result(&vmm, 5) & 0x4, 0x4, "DRIVER_OK accepted");
        assert_eq!(result(&vmm, 3), 1, "used idx");
        assert_eq!(result(&vmm, 4), 16, "used len");
        let mut buf = [0u8; 16];
        vmm.memory()
            .read_slice(&mut buf, GuestAddress(0x31_0000))
            .unwrap();
        assert_ne!(buf, [0u8; 16], "buffer was not filled");
    }

    #[test]
    fn every_virtio_device_is_placed_and_announced_on_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let mut c = config("hello", dir.path());
        c.cmdline = "console=ttyS0".into();
        c.disks = vec![crate::config::DiskConfig {
            layers: vec![base],
            top: dir.path().join("top.diff"),
            read_only: false,
            id: Some("root".into()),
        }];
        c.vsock = Some(crate::config::VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("v.sock"),
        });
        c.net = Some(crate::config::NetConfig {
            mac: None,
            mtu: None,
            backend: crate::config::NetBackend::Passt {
                binary: None,
                log: None,
                args: vec![],
            },
        });
        c.rng = true;
        let mut vmm = boot(&c).unwrap();
        let kinds: Vec<_> = vmm.virtio_devices().iter().map(|d| d.kind).collect();
        assert_eq!(kinds, ["blk", "net", "vsock", "rng"]);
        assert_eq!(vmm.wait(), VmExit::PowerOff);
        assert_eq!(
            serial(dir.path()),
            "hello from the test guest: console=ttyS0 \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8\n"
        );
        assert!(dir.path().join("v.sock").exists(), "vsock host socket");
    }

    #[test]
    fn missing_or_garbage_kernels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("hello", dir.path());
        c.kernel = dir.path().join("nope");
        assert!(matches!(boot(&c), Err(builder::Error::OpenKernel { .. })));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
        c.kernel = junk;
        let e = boot(&c).unwrap_err();
        assert!(matches!(e, builder::Error::LoadKernel { .. }), "{e}");
        c.kernel = guest("hello");
        c.vcpus = 0;
        assert!(matches!(boot(&c), Err(builder::Error::VcpuCount { .. })));
    }
}
