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
pub mod control;
pub mod crash;
pub mod device_manager;
pub mod exit;
pub mod inspect;
pub mod probe;
pub mod promote;
pub mod snapshot;
pub mod snapshot_dir;
pub mod virtio;
pub mod vstate;

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use builder::{boot, restore_captured};
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
    exit_rx: Receiver<exit::Event>,
    waker: exit::Waker,
    first_run: Arc<OnceLock<Instant>>,
    virtio: Vec<virtio::Attached>,
    deadline: Option<Instant>,
    paused: bool,
    ended: Option<VmExit>,
    freeze_seq: u64,
    /// The files guest memory was restored from, if it was (what a diff snapshot is against).
    memory_image: Option<snapshot_dir::MemoryImage>,
    /// Guest RAM was moved into anonymous huge pages (see [`promote`]).
    promoted: bool,
    /// Whether a fork promotes file-backed guest RAM first.
    promote_on_fork: bool,
    /// The thread unmapping a promotion's old mappings (O(pages)); a `fork(2)` waits for
    /// its `mmap` lock, so a fork joins it before its pause.
    retiring: Option<std::thread::JoinHandle<()>>,
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kvm: vstate::kvm::Kvm,
        vm: vstate::vm::Vm,
        devices: Arc<device_manager::DeviceManager>,
        vcpus: Vec<VcpuHandle>,
        exit_rx: Receiver<exit::Event>,
        waker: exit::Waker,
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
            waker,
            first_run,
            virtio,
            deadline,
            paused: false,
            ended: None,
            freeze_seq: 0,
            memory_image: None,
            promoted: false,
            promote_on_fork: true,
            retiring: None,
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

    /// KVM_RUN returns so far, per vCPU.
    pub fn vcpu_exits(&self) -> Vec<u64> {
        self.vcpus.iter().map(VcpuHandle::exits).collect()
    }

    /// What the vCPUs whose guest triple-faulted recorded (see [`crash`]).
    pub fn crash_reports(&self) -> Vec<crash::CrashReport> {
        self.vcpus
            .iter()
            .filter_map(|v| v.crash_report().cloned())
            .collect()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// A handle that makes a blocked [`Vmm::wait_timeout`] return `None` early.
    pub fn waker(&self) -> exit::Waker {
        self.waker.clone()
    }

    /// Waits until the VM ends (or the configured timeout, or `limit`, whichever is first),
    /// then stops the vCPU threads. `None` if `limit` passed first or a [`exit::Waker`] woke
    /// the caller; the VM keeps running.
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
        let event = match until {
            None => self.exit_rx.recv().ok(),
            Some(t) => match self.exit_rx.recv_timeout(t.saturating_duration_since(now)) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => {
                    if self.deadline.is_some_and(|d| d <= Instant::now()) {
                        self.log_vcpu_positions();
                        Some(exit::Event::Exit(VmExit::Timeout))
                    } else {
                        return None;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        let got = match event {
            Some(exit::Event::Wake) => return None,
            Some(exit::Event::Exit(e)) => Some(e),
            None => None,
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
        self.resume_timed().map(|_| ())
    }

    /// [`Vmm::resume`], returning when the last vCPU thread went back to the guest (the
    /// guest's pause ended there, not when this thread heard of it).
    pub(crate) fn resume_timed(&mut self) -> Result<Instant, Error> {
        if self.ended.is_some() {
            return Err(Error::Ended);
        }
        // Like the pause: one round trip for all vCPUs, not one per vCPU.
        for v in &self.vcpus {
            v.request_resume()?;
        }
        let mut last = None;
        for v in &self.vcpus {
            let at = v.wait_resumed()?;
            last = Some(last.map_or(at, |l: Instant| l.max(at)));
        }
        self.paused = false;
        Ok(last.unwrap_or_else(Instant::now))
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
        // Every request before any reply: one round trip for all vCPUs.
        for v in &self.vcpus {
            v.request_state()?;
        }
        Ok(self
            .vcpus
            .iter()
            .map(VcpuHandle::wait_state)
            .collect::<Result<_, _>>()?)
    }

    /// [`Vmm::pause`] and [`Vmm::save_vcpu_states`] in one round trip to each vCPU thread
    /// (on a loaded host every wake-up of a vCPU thread can wait for a core: a fork's pause
    /// holds as few as it can). Works on a paused VM too. Also returns when the first vCPU
    /// stopped running guest code (for a paused VM: when its state was read).
    pub fn pause_and_save_vcpus(&mut self) -> Result<(Vec<VcpuState>, Instant), Error> {
        if self.ended.is_some() {
            return Err(Error::Ended);
        }
        for v in &self.vcpus {
            if !self.paused {
                v.request_pause()?;
            }
            v.request_state()?;
        }
        let mut states = Vec::with_capacity(self.vcpus.len());
        let mut failed = None;
        let mut first = None;
        for v in &self.vcpus {
            // Read every reply, even after a failure, so none is left for the next command.
            let got = if self.paused {
                v.wait_state().map(|s| (s, Instant::now()))
            } else {
                v.wait_paused()
                    .and_then(|at| v.wait_state().map(|s| (s, at)))
            };
            match got {
                Ok((s, at)) => {
                    states.push(s);
                    first = Some(first.map_or(at, |f: Instant| f.min(at)));
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        self.paused = true;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok((states, first.unwrap_or_else(Instant::now))),
        }
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

/// Serves one control request other than `fork` (which replaces the process's VM in a child,
/// so the caller's loop handles it): status, pause, resume, snapshot, promote, stop.
pub fn handle_request(
    vmm: &mut Vmm,
    config: &VmConfig,
    request: control::Request,
) -> control::Reply {
    use control::{After, Reply, Request};
    let t0 = Instant::now();
    let us = |t: Instant| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
    let done = |r: Result<serde_json::Value, String>| match r {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::err(e),
    };
    let chain = |e: &dyn std::error::Error| error_chain(e);
    match request {
        Request::Status => Reply::ok(serde_json::json!({
            "state": if vmm.ended.is_some() { "ended" } else if vmm.paused { "paused" } else { "running" },
            "vcpus": config.vcpus,
            "mem_bytes": config.mem_bytes,
            "restored": vmm.memory_image.is_some(),
            "promoted": vmm.promoted,
            "vcpu_exits": vmm.vcpu_exits(),
        })),
        Request::Pause => done(
            vmm.pause()
                .map(|()| serde_json::json!({ "pause_us": us(t0) }))
                .map_err(|e| chain(&e)),
        ),
        Request::Resume => done(
            vmm.resume()
                .map(|()| serde_json::json!({ "resume_us": us(t0) }))
                .map_err(|e| chain(&e)),
        ),
        Request::Snapshot { dir, diff, then } => {
            let was_paused = vmm.paused;
            let r = snapshot_dir::write(vmm, config, &dir, diff);
            let resume = match then {
                After::Resume => !was_paused,
                After::Pause | After::Exit => false,
            };
            if resume && let Err(e) = vmm.resume() {
                return Reply::err(format!("snapshot written, resuming failed: {}", chain(&e)));
            }
            done(
                r.map(|rep| serde_json::to_value(rep).unwrap_or_default())
                    .map_err(|e| chain(&e)),
            )
        }
        Request::Promote => match vmm.promote_memory() {
            Ok(report) => Reply::ok(serde_json::to_value(report).unwrap_or_default()),
            Err(e) if e.memory_lost() => {
                let e = vmm.lose_memory(e);
                Reply::err(chain(&e))
            }
            Err(e) => Reply::err(chain(&e)),
        },
        Request::Inspect => done(
            inspect::inspect(vmm)
                .map(|i| serde_json::to_value(i).unwrap_or_default())
                .map_err(|e| chain(&e)),
        ),
        Request::Kick { interrupts, queues } => done(
            inspect::kick(vmm, interrupts, queues)
                .map(|n| serde_json::json!({ "devices": n }))
                .map_err(|e| chain(&e)),
        ),
        Request::Stop => Reply::ok(serde_json::Value::Null),
        Request::Fork { .. } => Reply::err("fork is served by the process's main loop"),
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

    /// Runs test `name` alone in a fresh process of this test binary with `var=value` (so a
    /// `fork(2)` there sees no other test thread), and returns its output.
    fn in_own_process(name: &str, var: &str, value: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(var, value)
            .output()
            .unwrap()
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
            hugetlb: false,
            fork_mode: snapshot::ForkMode::default(),
            timeout_ms: Some(20_000),
            control: None,
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
        let captured = vmm.capture().unwrap();
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
            let mut restored = restore_captured(&rc, None, &captured).unwrap();
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
        let captured = vmm.capture().unwrap();
        // Stand-in for the mapping a fork(2) child inherits: a private copy of the pages.
        let mem_file = dir.path().join("memory");
        dump_memory(&vmm, &mem_file);
        let copy = crate::vstate::memory::create(
            c.mem_bytes,
            &MemoryBacking::File { path: mem_file },
            true,
        )
        .unwrap();
        let mut child = restore_captured(&c, Some(copy), &captured).unwrap();
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
        let captured = vmm.capture().unwrap();
        // SAFETY: the process is quiesced: the only other threads are the paused vCPU (blocked
        // on its channel) and the test harness waiting for this test; the child only runs the
        // restore path and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let memory = vmm.into_fork_child(&[]);
            let mut rc = c.clone();
            rc.serial.log = Some(dir.path().join("child.log"));
            let code = match restore_captured(&rc, Some(memory), &captured) {
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
        let out = in_own_process(
            "tests::fork_of_a_paused_vmm_gives_a_child_vm_over_copy_on_write_memory",
            "SPECC_VMM_FORK_PROBE",
            "1",
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "fork probe failed (11-13: child restore/run failed, 20: child wrote into the \
             parent, 30: parent did not resume): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn count_until_ready(dir: &Path, mem: u64) -> (VmConfig, Vmm) {
        let mut c = config("count", dir);
        c.mem_bytes = mem;
        c.rng = true;
        let vmm = boot(&c).unwrap();
        wait_for(&vmm, 1, 1);
        (c, vmm)
    }

    fn rerun_config(c: &VmConfig, dir: &Path) -> VmConfig {
        std::fs::create_dir_all(dir).unwrap();
        let mut rc = c.clone();
        rc.serial.log = Some(dir.join("serial.log"));
        rc
    }

    fn finish_count(mut vmm: Vmm, dir: &Path) {
        vmm.memory()
            .write_obj(1u64, GuestAddress(RESULTS + 16))
            .unwrap();
        assert_eq!(vmm.wait(), VmExit::PowerOff);
        assert_eq!(
            result(&vmm, 0),
            2000,
            "counting went on from 1000 with its registers"
        );
        assert_eq!(serial(dir), "done\n");
    }

    #[test]
    fn a_snapshot_directory_restores_lazily_and_twice_with_its_devices() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 64 << 20);
        let snap = dir.path().join("snap");
        let rep = snapshot_dir::write(&mut vmm, &c, &snap, false).unwrap();
        assert!(vmm.is_paused(), "a snapshot leaves the VM paused");
        assert!(!rep.diff);
        let saved = snapshot_dir::read(&snap).unwrap();
        drop(vmm);
        let mem = std::fs::metadata(snap.join(snapshot_dir::MEMORY_FILE)).unwrap();
        assert_eq!(mem.len(), 64 << 20);
        assert!(
            mem.blocks() * 512 < 8 << 20,
            "zero and untouched pages are holes ({} bytes allocated)",
            mem.blocks() * 512
        );
        for round in 0..2 {
            let rdir = dir.path().join(format!("r{round}"));
            let rc = rerun_config(&c, &rdir);
            let mut restored = snapshot_dir::restore(&snap, &rc).unwrap();
            assert_eq!(result(&restored, 0), 1000, "memory came back");
            restored.pause().unwrap();
            restored.pause_devices();
            let again = restored.capture().unwrap();
            assert_eq!(
                again.devices, saved.state.devices,
                "device state round trip"
            );
            assert_eq!(again.serial, saved.state.serial, "serial state round trip");
            restored.resume_devices().unwrap();
            restored.resume().unwrap();
            finish_count(restored, &rdir);
        }
    }

    /// Sums one field (in KiB) of /proc/self/smaps over the mappings that start at `starts`.
    fn smaps_kib(starts: &[u64], field: &str) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut total = 0;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, _)) = first.split_once('-')
                && let Ok(lo) = u64::from_str_radix(lo, 16)
            {
                inside = starts.contains(&lo);
            } else if inside && line.starts_with(field) {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        total
    }

    /// The start of every mapping inside `vmm`'s guest RAM.
    fn ram_mapping_starts(vmm: &Vmm) -> Vec<u64> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let ranges: Vec<(u64, u64)> = vmm
            .memory()
            .iter()
            .map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len()))
            .collect();
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('-'))
            .filter_map(|(lo, _)| u64::from_str_radix(lo, 16).ok())
            .filter(|&lo| ranges.iter().any(|&(a, b)| a <= lo && lo < b))
            .collect()
    }

    fn ram_starts(vmm: &Vmm) -> Vec<u64> {
        use vm_memory::GuestMemoryBackend;
        vmm.memory().iter().map(|r| r.as_ptr() as u64).collect()
    }

    #[test]
    fn vms_restored_from_one_snapshot_read_its_data_and_share_its_clean_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 64 << 20);
        // 16 MiB of data written from the host, every page distinct, so the snapshot's
        // populated-page scan and zero-page holes are exercised on real content.
        let pages = (0x40_0000u64..0x140_0000).step_by(4096);
        for a in pages.clone() {
            vmm.memory()
                .write_obj(a ^ 0x5a5a_5a5a, GuestAddress(a))
                .unwrap();
        }
        let snap = dir.path().join("snap");
        let rep = snapshot_dir::write(&mut vmm, &c, &snap, false).unwrap();
        assert!(rep.memory_data_bytes >= 16 << 20, "{rep:?}");
        drop(vmm);
        let a = snapshot_dir::restore(&snap, &rerun_config(&c, &dir.path().join("a"))).unwrap();
        let b = snapshot_dir::restore(&snap, &rerun_config(&c, &dir.path().join("b"))).unwrap();
        for vm in [&a, &b] {
            for p in pages.clone() {
                assert_eq!(
                    vm.memory().read_obj::<u64>(GuestAddress(p)).unwrap(),
                    p ^ 0x5a5a_5a5a
                );
            }
        }
        // Both mappings hold the same page-cache pages: clean and shared, not copies. (Every
        // mapping inside guest RAM: the memory file's holes are anonymous mappings of their
        // own, between the file's.)
        for vm in [&a, &b] {
            let starts = ram_mapping_starts(vm);
            let shared = smaps_kib(&starts, "Shared_Clean:");
            let private = smaps_kib(&starts, "Private_Dirty:");
            assert!(shared >= 16 << 10, "shared clean {shared} KiB");
            assert!(private < 4 << 10, "private dirty {private} KiB");
        }
        finish_count(a, &dir.path().join("a"));
        finish_count(b, &dir.path().join("b"));
    }

    #[test]
    fn ten_diff_snapshot_generations_restore_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 32 << 20);
        let mut snap = dir.path().join("s0");
        snapshot_dir::write(&mut vmm, &c, &snap, false).unwrap();
        drop(vmm);
        let full = std::fs::metadata(snap.join(snapshot_dir::MEMORY_FILE)).unwrap();
        for gen_no in 1..=10u64 {
            let rc = rerun_config(&c, &dir.path().join(format!("run{gen_no}")));
            let mut vmm = snapshot_dir::restore(&snap, &rc).unwrap();
            for earlier in 1..gen_no {
                assert_eq!(
                    result(&vmm, 3 + earlier),
                    earlier,
                    "generation {earlier}'s write"
                );
            }
            // One page touched per generation: the diff holds that page, not the guest.
            vmm.memory()
                .write_obj(gen_no, GuestAddress(RESULTS + (3 + gen_no) * 8))
                .unwrap();
            let next = dir.path().join(format!("s{gen_no}"));
            let rep = snapshot_dir::write(&mut vmm, &rc, &next, true).unwrap();
            assert!(rep.diff);
            assert!(
                rep.memory_data_bytes < full.len() / 4,
                "diff of generation {gen_no} wrote {} bytes",
                rep.memory_data_bytes
            );
            snap = next;
        }
        let image = snapshot_dir::read(&snap).unwrap().memory;
        assert_eq!(image.overlays.len(), 10);
        let last = dir.path().join("last");
        let vmm = snapshot_dir::restore(&snap, &rerun_config(&c, &last)).unwrap();
        for g in 1..=10 {
            assert_eq!(result(&vmm, 3 + g), g);
        }
        finish_count(vmm, &last);
    }

    #[test]
    fn corrupt_truncated_foreign_or_mismatched_snapshots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 16 << 20);
        let snap = dir.path().join("snap");
        snapshot_dir::write(&mut vmm, &c, &snap, false).unwrap();
        drop(vmm);
        let copy = |name: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            for e in std::fs::read_dir(&snap).unwrap().flatten() {
                std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
            }
            d
        };
        let fresh = |name: &str| rerun_config(&c, &dir.path().join(name));
        let refused = |d: &Path, name: &str| {
            let e = snapshot_dir::restore(d, &fresh(name)).unwrap_err();
            error_chain(&e)
        };
        let state = snap.join(snapshot_dir::VMSTATE_FILE);
        let bytes = std::fs::read(&state).unwrap();

        let flipped = copy("flipped");
        let mut b = bytes.clone();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        std::fs::write(flipped.join("vmstate"), &b).unwrap();
        let e = refused(&flipped, "f");
        assert!(e.contains("vmstate"), "{e}");

        let short = copy("short");
        std::fs::write(short.join("vmstate"), &bytes[..bytes.len() - 9]).unwrap();
        refused(&short, "s");

        let memshort = copy("memshort");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(memshort.join("memory"))
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let e = refused(&memshort, "m");
        assert!(e.contains("memory"), "{e}");

        let foreign = copy("foreign");
        let mut s = snapshot_dir::read(&snap).unwrap();
        s.host_cpu.vendor = "NotARealCPU".into();
        specc_snapshot::write_state_file(&foreign.join("vmstate"), &s).unwrap();
        assert!(matches!(
            snapshot_dir::restore(&foreign, &fresh("x")),
            Err(snapshot_dir::Error::Cpu(_))
        ));

        let mut two_disks = fresh("d");
        two_disks.disks.push(crate::config::DiskConfig {
            layers: vec![],
            top: dir.path().join("nope.diff"),
            read_only: false,
            id: None,
        });
        assert!(matches!(
            snapshot_dir::restore(&snap, &two_disks),
            Err(snapshot_dir::Error::Config(_))
        ));
        let mut no_rng = fresh("n");
        no_rng.rng = false;
        let e = snapshot_dir::restore(&snap, &no_rng).unwrap_err();
        assert!(error_chain(&e).contains("rng"), "{}", error_chain(&e));
        // The good snapshot still restores after all that.
        finish_count(
            snapshot_dir::restore(&snap, &fresh("ok")).unwrap(),
            &dir.path().join("ok"),
        );
    }

    /// Runs in its own process (see the fork test): forks a counting VM three ways.
    fn live_fork_probe(mode: snapshot::ForkMode, paused: bool) -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 64 << 20);
        let dirs: Vec<PathBuf> = (0..3)
            .map(|i| dir.path().join(format!("child{i}")))
            .collect();
        if paused {
            vmm.pause().unwrap();
        }
        match vmm.fork_with(&c, &dirs, mode).unwrap() {
            snapshot::Forked::Child { config, index } => {
                let marker = 100 + index as u64;
                vmm.memory()
                    .write_obj(marker, GuestAddress(RESULTS + 32))
                    .unwrap();
                vmm.memory()
                    .write_obj(1u64, GuestAddress(RESULTS + 16))
                    .unwrap();
                let ok =
                    vmm.wait() == VmExit::PowerOff
                        && result(&vmm, 0) == 2000
                        && result(&vmm, 4) == marker
                        && config.serial.log.as_deref().is_some_and(|l| {
                            std::fs::read_to_string(l).is_ok_and(|s| s == "done\n")
                        });
                let _ = std::fs::write(dirs[index].join("result"), if ok { "ok" } else { "bad" });
                // SAFETY: ends the child without running the test harness's destructors.
                unsafe { libc::_exit(0) }
            }
            snapshot::Forked::Source(report) => {
                let mut code = 0;
                if report.mode != mode
                    || (mode == snapshot::ForkMode::Precopy) != report.precopy.is_some()
                {
                    eprintln!(
                        "asked for {mode:?}, forked {:?}: {:?}",
                        report.mode, report.precopy
                    );
                    code = 40;
                }
                for (i, ch) in report.children.iter().enumerate() {
                    if ch.error.is_some() || ch.pid <= 0 || ch.ready_us.is_none() {
                        eprintln!("child {i}: {ch:?}");
                        code = 10;
                    }
                }
                let deadline = Instant::now() + Duration::from_secs(20);
                for d in &dirs {
                    while !d.join("result").exists() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if std::fs::read_to_string(d.join("result")).ok().as_deref() != Some("ok") {
                        eprintln!("{} did not report ok", d.display());
                        code = 20;
                    }
                }
                // No child's writes reached the source, which still runs where it was.
                if result(&vmm, 4) != 0 || result(&vmm, 0) != 1000 || vmm.is_paused() != paused {
                    code = 30;
                }
                if paused {
                    vmm.resume().unwrap();
                }
                finish_count(vmm, dir.path());
                eprintln!("fork pause {} us", report.pause_us);
                code
            }
        }
    }

    #[test]
    fn live_fork_gives_three_independent_running_children() {
        if let Some(mode) = std::env::var_os("SPECC_VMM_LIVE_FORK_PROBE") {
            let mode = mode.to_string_lossy();
            let fork_mode = if mode.starts_with("precopy") {
                snapshot::ForkMode::Precopy
            } else {
                snapshot::ForkMode::Cow
            };
            std::process::exit(live_fork_probe(fork_mode, mode.ends_with("paused")));
        }
        require_kvm();
        // A paused source is copied whole while it stays paused (no dirty log).
        for mode in ["cow", "precopy", "precopy-paused"] {
            let out = in_own_process(
                "tests::live_fork_gives_three_independent_running_children",
                "SPECC_VMM_LIVE_FORK_PROBE",
                mode,
            );
            assert_eq!(
                out.status.code(),
                Some(0),
                "live fork probe ({mode}) failed (10: a child failed to restore, 20: a child did \
                 not finish with its own marker, 30: a child's write reached the source, 40: \
                 the fork was not made in the mode asked for): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    const RING: u64 = 0x40_0000;
    /// Written by the host before the fork (the bulk copy gets it), then again after the bulk
    /// copy (only the comparison can find that), then by the source after the fork.
    const HOST_PAGE: u64 = 0x80_0000;
    /// First written after the bulk copy, as a device would (only the comparison finds it).
    const DEVICE_PAGE: u64 = 0x90_0000;

    fn write_like_a_device(m: &GuestMemoryMmap) {
        m.write_obj(0xbbbb_u64, GuestAddress(HOST_PAGE)).unwrap();
        m.write_obj(0xdddd_u64, GuestAddress(DEVICE_PAGE)).unwrap();
    }

    /// Whether the scribble guest's ring in `m` is exact for a vCPU whose sequence number is
    /// `rax`: the 64 latest values, each in its own page, and none missing or stale.
    fn ring_exact(m: &GuestMemoryMmap, rax: u64) -> Result<(), String> {
        let vals: Vec<u64> = (0..64)
            .map(|i| m.read_obj::<u64>(GuestAddress(RING + i * 4096)).unwrap())
            .collect();
        let top = *vals.iter().max().unwrap();
        if top != rax && top + 1 != rax {
            return Err(format!("ring's latest {top}, %rax {rax}"));
        }
        for (i, &v) in vals.iter().enumerate() {
            let i = i as u64;
            // The largest value <= top that lands in page i.
            let want = top - ((top + 64 - i) % 64);
            if top >= 64 && v != want {
                return Err(format!("page {i} holds {v}, not {want} (latest {top})"));
            }
        }
        Ok(())
    }

    fn check_child_memory(m: &GuestMemoryMmap, captured: &snapshot::Captured, dir: &Path) {
        let verdict = ring_exact(m, captured.vcpus[0].regs.rax).and_then(|()| {
            let host = m.read_obj::<u64>(GuestAddress(HOST_PAGE)).unwrap();
            let device = m.read_obj::<u64>(GuestAddress(DEVICE_PAGE)).unwrap();
            if (host, device) == (0xbbbb, 0xdddd) {
                Ok(())
            } else {
                Err(format!("host page {host:#x}, device page {device:#x}"))
            }
        });
        let _ = std::fs::write(
            dir.join("memory"),
            match verdict {
                Ok(()) => "ok".to_string(),
                Err(e) => e,
            },
        );
    }

    /// Runs in its own process: a precopy fork of a guest that writes memory without pause.
    fn precopy_exact_probe() -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("scribble", dir.path());
        c.rng = true;
        let mut vmm = boot(&c).unwrap();
        wait_for(&vmm, 1, 1);
        vmm.memory()
            .write_obj(0xaaaa_u64, GuestAddress(HOST_PAGE))
            .unwrap();
        *promote::tests::AFTER_BULK_COPY.lock().unwrap() = Some(write_like_a_device);
        *snapshot::tests::CHILD_MEMORY.lock().unwrap() = Some(check_child_memory);
        let dirs: Vec<PathBuf> = (0..2)
            .map(|i| dir.path().join(format!("child{i}")))
            .collect();
        match vmm
            .fork_with(&c, &dirs, snapshot::ForkMode::Precopy)
            .unwrap()
        {
            snapshot::Forked::Child { index, .. } => {
                let d = &dirs[index];
                let deadline = Instant::now() + Duration::from_secs(20);
                while !dir.path().join("source-wrote").exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let host = vmm
                    .memory()
                    .read_obj::<u64>(GuestAddress(HOST_PAGE))
                    .unwrap();
                vmm.memory()
                    .write_obj(1u64, GuestAddress(RESULTS + 16))
                    .unwrap();
                let ok = host == 0xbbbb && vmm.wait() == VmExit::PowerOff;
                let _ = std::fs::write(d.join("result"), if ok { "ok" } else { "bad" });
                // SAFETY: ends the child without running the test harness's destructors.
                unsafe { libc::_exit(0) }
            }
            snapshot::Forked::Source(report) => {
                vmm.memory()
                    .write_obj(0xeeee_u64, GuestAddress(HOST_PAGE))
                    .unwrap();
                std::fs::write(dir.path().join("source-wrote"), "").unwrap();
                eprintln!("precopy fork: {report:?}");
                let mut code = 0;
                let Some(pre) = &report.precopy else {
                    return 40;
                };
                // The hook's two pages, outside the dirty log. (Whether the guest wrote again
                // between the last round and the pause depends on the host's scheduling; the
                // children's rings check whatever it wrote.)
                if pre.differing_pages < 2 {
                    code = 41;
                }
                let deadline = Instant::now() + Duration::from_secs(20);
                for d in &dirs {
                    while !d.join("result").exists() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let memory = std::fs::read_to_string(d.join("memory")).unwrap_or_default();
                    if memory != "ok" {
                        eprintln!("{}: child memory: {memory}", d.display());
                        code = 10;
                    }
                    if std::fs::read_to_string(d.join("result")).ok().as_deref() != Some("ok") {
                        eprintln!(
                            "{} saw the source's write or did not power off",
                            d.display()
                        );
                        code = 20;
                    }
                }
                // The source runs on over its own memory, still scribbling.
                let before = vmm.memory().read_obj::<u64>(GuestAddress(RING)).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                let after = vmm.memory().read_obj::<u64>(GuestAddress(RING)).unwrap();
                if after == before
                    || vmm
                        .memory()
                        .read_obj::<u64>(GuestAddress(HOST_PAGE))
                        .unwrap()
                        != 0xeeee
                {
                    code = 30;
                }
                vmm.memory()
                    .write_obj(1u64, GuestAddress(RESULTS + 16))
                    .unwrap();
                if vmm.wait() != VmExit::PowerOff {
                    code = 31;
                }
                code
            }
        }
    }

    /// A precopy fork's children see memory exactly as of the pause: the guest's writes of
    /// the last dirty round (its ring matches its registers), a page written like a device
    /// after the bulk copy (outside the dirty log), and none of the source's later writes.
    #[test]
    fn a_precopy_fork_child_sees_memory_exactly_as_of_the_pause() {
        if std::env::var_os("SPECC_VMM_PRECOPY_PROBE").is_some() {
            std::process::exit(precopy_exact_probe());
        }
        require_kvm();
        let out = in_own_process(
            "tests::a_precopy_fork_child_sees_memory_exactly_as_of_the_pause",
            "SPECC_VMM_PRECOPY_PROBE",
            "1",
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "precopy probe failed (10: a child's memory was not as of the pause, 20: a child \
             saw the source's later write or did not finish, 30/31: the source stopped \
             running, 40: the fork fell back to copy-on-write, 41: the comparison missed the \
             pages written like a device): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pattern_ok(vmm: &Vmm) -> bool {
        (0x40_0000u64..0x140_0000).step_by(4096).all(|a| {
            let want = if a < 0xc0_0000 {
                a ^ 0xc3c3
            } else {
                a ^ 0x5a5a
            };
            vmm.memory().read_obj::<u64>(GuestAddress(a)).ok() == Some(want)
        })
    }

    /// Runs in its own process (see the fork test): forks a VM restored from a snapshot, whose
    /// memory the first fork promotes to anonymous huge pages while the guest runs.
    fn restored_fork_probe() -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 64 << 20);
        // 16 MiB of distinct data in the memory file; the restored VM then rewrites half of it,
        // so its memory holds both clean file pages and private written ones.
        for a in (0x40_0000u64..0x140_0000).step_by(4096) {
            vmm.memory().write_obj(a ^ 0x5a5a, GuestAddress(a)).unwrap();
        }
        let snap = dir.path().join("snap");
        snapshot_dir::write(&mut vmm, &c, &snap, false).unwrap();
        drop(vmm);
        let mut rc = rerun_config(&c, &dir.path().join("src"));
        // Promotion is what copy-on-write forks of a restored VM do first.
        rc.fork_mode = snapshot::ForkMode::Cow;
        let mut vmm = snapshot_dir::restore(&snap, &rc).unwrap();
        for a in (0x40_0000u64..0xc0_0000).step_by(4096) {
            vmm.memory().write_obj(a ^ 0xc3c3, GuestAddress(a)).unwrap();
        }
        if !vmm.needs_promotion() {
            return 5;
        }
        let before: Vec<u64> = ram_starts(&vmm);
        for round in 0..2 {
            let dirs: Vec<PathBuf> = (0..3)
                .map(|i| dir.path().join(format!("r{round}child{i}")))
                .collect();
            match vmm.fork(&rc, &dirs).unwrap() {
                snapshot::Forked::Child { config, index } => {
                    let marker = 100 + index as u64;
                    let intact = pattern_ok(&vmm);
                    vmm.memory()
                        .write_obj(marker, GuestAddress(RESULTS + 32))
                        .unwrap();
                    vmm.memory()
                        .write_obj(marker, GuestAddress(0x100_0000))
                        .unwrap();
                    vmm.memory()
                        .write_obj(1u64, GuestAddress(RESULTS + 16))
                        .unwrap();
                    let ok = intact
                        && vmm.wait() == VmExit::PowerOff
                        && result(&vmm, 0) == 2000
                        && result(&vmm, 4) == marker
                        && vmm.memory().read_obj::<u64>(GuestAddress(0x100_0000)).ok()
                            == Some(marker)
                        && config.serial.log.as_deref().is_some_and(|l| {
                            std::fs::read_to_string(l).is_ok_and(|s| s == "done\n")
                        });
                    let _ =
                        std::fs::write(dirs[index].join("result"), if ok { "ok" } else { "bad" });
                    // SAFETY: ends the child without running the test harness's destructors.
                    unsafe { libc::_exit(0) }
                }
                snapshot::Forked::Source(report) => {
                    eprintln!(
                        "round {round}: pause {} us, promotion {:?}",
                        report.pause_us, report.promotion
                    );
                    if (round == 0) != report.promotion.is_some() {
                        return 40 + round;
                    }
                    for (i, ch) in report.children.iter().enumerate() {
                        if ch.error.is_some() || ch.pid <= 0 || ch.ready_us.is_none() {
                            eprintln!("child {i}: {ch:?}");
                            return 10;
                        }
                    }
                    let deadline = Instant::now() + Duration::from_secs(30);
                    for d in &dirs {
                        while !d.join("result").exists() && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if std::fs::read_to_string(d.join("result")).ok().as_deref() != Some("ok") {
                            eprintln!("{} did not report ok", d.display());
                            return 20;
                        }
                    }
                }
            }
            // No child's writes reached the source, which still waits at 1000 with its data.
            if result(&vmm, 4) != 0 || result(&vmm, 0) != 1000 || !pattern_ok(&vmm) {
                return 30;
            }
        }
        if vmm.needs_promotion() || ram_starts(&vmm) != before {
            return 50;
        }
        // The written data now lies in huge pages (the copy, at the same address).
        let huge = smaps_kib(&before, "AnonHugePages:");
        eprintln!("AnonHugePages {huge} KiB");
        if huge < 16 << 10 {
            return 60;
        }
        // A diff snapshot of the promoted VM against its memory file is still exact.
        vmm.memory()
            .write_obj(0xd1ff_u64, GuestAddress(0x130_0000))
            .unwrap();
        let diff = dir.path().join("diff");
        snapshot_dir::write(&mut vmm, &rc, &diff, true).unwrap();
        vmm.resume().unwrap();
        vmm.memory()
            .write_obj(0x5a5a ^ 0x130_0000_u64, GuestAddress(0x130_0000))
            .unwrap();
        let again = rerun_config(&c, &dir.path().join("again"));
        let back = snapshot_dir::restore(&diff, &again).unwrap();
        let diff_ok = back.memory().read_obj::<u64>(GuestAddress(0x130_0000)).ok() == Some(0xd1ff)
            && (0x40_0000u64..0x130_0000).step_by(4096).all(|a| {
                let want = if a < 0xc0_0000 {
                    a ^ 0xc3c3
                } else {
                    a ^ 0x5a5a
                };
                back.memory().read_obj::<u64>(GuestAddress(a)).ok() == Some(want)
            });
        if !diff_ok {
            return 70;
        }
        finish_count(back, &dir.path().join("again"));
        finish_count(vmm, &dir.path().join("src"));
        0
    }

    #[test]
    fn a_restored_vm_is_promoted_on_its_first_fork_and_its_forks_diverge() {
        if std::env::var_os("SPECC_VMM_RESTORED_FORK_PROBE").is_some() {
            std::process::exit(restored_fork_probe());
        }
        require_kvm();
        let out = in_own_process(
            "tests::a_restored_vm_is_promoted_on_its_first_fork_and_its_forks_diverge",
            "SPECC_VMM_RESTORED_FORK_PROBE",
            "1",
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "restored fork probe failed (5: restored memory not file-backed, 10: a child failed \
             to restore, 20: a child did not finish with its own marker and the source's data, \
             30: a child's write reached the source or the source's data changed, 40/41: the \
             first fork did not promote or the second did, 50: memory still file-backed or \
             moved, 60: no huge pages after promotion, 70: diff snapshot after promotion \
             wrong): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs in its own process: precopy forks of a restored VM (RAM a private mapping of the
    /// memory file, pages of the file and pages written since), and of its child (RAM a
    /// private mapping of the first fork's image).
    fn restored_precopy_probe() -> i32 {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 64 << 20);
        for a in (0x40_0000u64..0x140_0000).step_by(4096) {
            vmm.memory().write_obj(a ^ 0x5a5a, GuestAddress(a)).unwrap();
        }
        let snap = dir.path().join("snap");
        snapshot_dir::write(&mut vmm, &c, &snap, false).unwrap();
        drop(vmm);
        let mut rc = rerun_config(&c, &dir.path().join("src"));
        rc.fork_mode = snapshot::ForkMode::Precopy;
        let mut vmm = snapshot_dir::restore(&snap, &rc).unwrap();
        for a in (0x40_0000u64..0xc0_0000).step_by(4096) {
            vmm.memory().write_obj(a ^ 0xc3c3, GuestAddress(a)).unwrap();
        }
        let child_dir = dir.path().join("child");
        let grandchild_dir = dir.path().join("grandchild");
        let finish = |vmm: &mut Vmm, at: &Path, intact: bool| {
            vmm.memory()
                .write_obj(1u64, GuestAddress(RESULTS + 16))
                .unwrap();
            let ok = intact && vmm.wait() == VmExit::PowerOff && result(vmm, 0) == 2000;
            let _ = std::fs::write(at.join("result"), if ok { "ok" } else { "bad" });
            // SAFETY: ends the child without running the test harness's destructors.
            unsafe { libc::_exit(0) }
        };
        match vmm.fork(&rc, std::slice::from_ref(&child_dir)).unwrap() {
            snapshot::Forked::Child { config, .. } => {
                let intact = pattern_ok(&vmm) && vmm.needs_promotion();
                vmm.memory()
                    .write_obj(0x77_u64, GuestAddress(0x100_0000))
                    .unwrap();
                match vmm
                    .fork(&config, std::slice::from_ref(&grandchild_dir))
                    .unwrap()
                {
                    snapshot::Forked::Child { .. } => {
                        let seen = vmm.memory().read_obj::<u64>(GuestAddress(0x100_0000)).ok();
                        let rest = (0x40_0000u64..0x140_0000)
                            .step_by(4096)
                            .filter(|&a| a != 0x100_0000)
                            .all(|a| {
                                let want = if a < 0xc0_0000 {
                                    a ^ 0xc3c3
                                } else {
                                    a ^ 0x5a5a
                                };
                                vmm.memory().read_obj::<u64>(GuestAddress(a)).ok() == Some(want)
                            });
                        finish(&mut vmm, &grandchild_dir, rest && seen == Some(0x77))
                    }
                    snapshot::Forked::Source(r) => {
                        let nested = r.precopy.is_some() && r.children[0].error.is_none();
                        finish(&mut vmm, &child_dir, intact && nested)
                    }
                }
            }
            snapshot::Forked::Source(report) => {
                eprintln!("restored precopy fork: {report:?}");
                if report.precopy.is_none() || report.promotion.is_some() {
                    return 40;
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                for d in [&child_dir, &grandchild_dir] {
                    while !d.join("result").exists() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if std::fs::read_to_string(d.join("result")).ok().as_deref() != Some("ok") {
                        eprintln!("{} did not report ok", d.display());
                        return 20;
                    }
                }
                // The source was not promoted and still has its bytes.
                if !vmm.needs_promotion() || !pattern_ok(&vmm) || result(&vmm, 0) != 1000 {
                    return 30;
                }
                finish_count(vmm, &dir.path().join("src"));
                0
            }
        }
    }

    #[test]
    fn precopy_forks_of_a_restored_vm_and_of_its_child_keep_every_byte() {
        if std::env::var_os("SPECC_VMM_RESTORED_PRECOPY_PROBE").is_some() {
            std::process::exit(restored_precopy_probe());
        }
        require_kvm();
        let out = in_own_process(
            "tests::precopy_forks_of_a_restored_vm_and_of_its_child_keep_every_byte",
            "SPECC_VMM_RESTORED_PRECOPY_PROBE",
            "1",
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "restored precopy probe failed (20: the child (memory as of the fork, then a \
             nested precopy fork) or the grandchild (the child's write and the rest) was wrong, \
             30: the source's memory changed or was promoted, 40: the fork was not a \
             precopy): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn promote_memory_keeps_a_running_or_paused_restored_guest_on_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut vmm) = count_until_ready(dir.path(), 32 << 20);
        for a in (0x40_0000u64..0x140_0000).step_by(4096) {
            vmm.memory().write_obj(a ^ 0x5a5a, GuestAddress(a)).unwrap();
        }
        let snap = dir.path().join("snap");
        snapshot_dir::write(&mut vmm, &c, &snap, false).unwrap();
        drop(vmm);
        let rc = rerun_config(&c, &dir.path().join("r"));
        let mut vmm = snapshot_dir::restore(&snap, &rc).unwrap();
        for a in (0x40_0000u64..0xc0_0000).step_by(4096) {
            vmm.memory().write_obj(a ^ 0xc3c3, GuestAddress(a)).unwrap();
        }
        let report = vmm
            .promote_memory()
            .unwrap()
            .expect("a restored VM needs promotion");
        assert!(report.copied_bytes >= 16 << 20, "{report:?}");
        assert!(!vmm.needs_promotion());
        assert_eq!(vmm.promote_memory().unwrap(), None, "promoted once only");
        assert!(!vmm.is_paused());
        assert!(
            pattern_ok(&vmm),
            "the promoted copy holds the guest's bytes"
        );
        vmm.pause().unwrap();
        assert_eq!(vmm.promote_memory().unwrap(), None);
        vmm.resume().unwrap();
        finish_count(vmm, &dir.path().join("r"));
        // A paused restored VM is promoted while it stays paused, and runs on from its bytes.
        let pdir = dir.path().join("p");
        let mut paused = snapshot_dir::restore(&snap, &rerun_config(&c, &pdir)).unwrap();
        paused.pause().unwrap();
        for a in (0x40_0000u64..0xc0_0000).step_by(4096) {
            paused
                .memory()
                .write_obj(a ^ 0xc3c3, GuestAddress(a))
                .unwrap();
        }
        let report = paused
            .promote_memory()
            .unwrap()
            .expect("a paused restored VM is promoted too");
        assert!(report.copied_bytes >= 16 << 20, "{report:?}");
        assert_eq!(report.rounds, 0, "no dirty log while paused: {report:?}");
        assert!(paused.is_paused() && !paused.needs_promotion());
        assert!(pattern_ok(&paused));
        paused.resume().unwrap();
        finish_count(paused, &pdir);
    }

    #[test]
    fn restore_refuses_a_state_count_that_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let c = config("count", dir.path());
        let mut vmm = boot(&c).unwrap();
        wait_for(&vmm, 1, 1);
        vmm.pause().unwrap();
        let mut captured = vmm.capture().unwrap();
        captured.vcpus.clear();
        assert!(matches!(
            restore_captured(&c, None, &captured),
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
    fn a_triple_fault_reports_the_exits_before_it_and_dumps_memory() {
        // The dump directory comes from the environment: the check runs in a process of its
        // own with it set.
        if let Some(dumps) = std::env::var_os(crash::CRASH_DUMP_ENV) {
            crash_report_probe(Path::new(&dumps));
            std::process::exit(0);
        }
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let out = in_own_process(
            "tests::a_triple_fault_reports_the_exits_before_it_and_dumps_memory",
            crash::CRASH_DUMP_ENV,
            dir.path().join("dumps").to_str().unwrap(),
        );
        assert!(
            out.status.success(),
            "crash report probe failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn crash_report_probe(dumps: &Path) {
        let dir = tempfile::tempdir().unwrap();
        let mut vmm = boot(&config("crash", dir.path())).unwrap();
        assert_eq!(vmm.wait(), VmExit::TripleFault { vcpu: 0 });
        let reports = vmm.crash_reports();
        assert_eq!(reports.len(), 1, "{reports:?}");
        let r = &reports[0];
        eprintln!("{r}");
        assert_eq!(r.vcpu, 0);
        // The COM1 write is the last exit to userspace before the fault, with the guest's
        // registers as of that exit: the marker, and RIP inside the guest's code at 1 MiB.
        let last = r
            .last_exits
            .last()
            .expect("no exit recorded before the fault");
        assert_eq!(last.kind, crash::ExitKind::IoOut(0x3f8), "{r}");
        assert!(r.exits > last.seq, "{r}");
        let cpu = last.cpu.expect("KVM gave no registers (KVM_CAP_SYNC_REGS)");
        assert_eq!(cpu.r12, 0x5ca1_ab1e, "{r}");
        assert!((0x10_0000..0x10_1000).contains(&cpu.rip), "{r}");
        assert!(r.to_string().contains("io out 0x3f8"), "{r}");
        // Guest memory is in the dump at its guest physical address: the guest's own code.
        let path = r.dump.clone().expect("no dump written");
        assert!(path.starts_with(dumps), "{}", path.display());
        let dumped = std::fs::read(&path).unwrap();
        let mut code = [0u8; 16];
        vmm.memory()
            .read_slice(&mut code, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(&dumped[0x10_0000..0x10_0010], &code);
        assert_eq!(dumped.len() as u64, 64 << 20);
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
