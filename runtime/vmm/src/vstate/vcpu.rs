//! vCPUs: boot configuration, the run loop (one thread per vCPU), pause/resume, and the
//! complete architectural state a snapshot needs ([`VcpuState`]).
//!
//! Pausing: the controller sends a command on the vCPU's channel, then sends the vCPU thread
//! the kick signal. The signal handler sets `kvm_run.immediate_exit` on that thread's own
//! `kvm_run`, so the vCPU leaves KVM_RUN with EINTR whether the signal lands inside KVM_RUN or
//! just before it; on EINTR the loop reads its commands. A paused vCPU blocks on its channel,
//! holds no lock and touches no guest memory: the quiesced state a live fork needs.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_MAX_MSR_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Cap, SyncReg, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::crash::{CpuSnapshot, CrashReport, ExitHistory, ExitKind, ExitRecord};
use crate::device_manager::DeviceManager;
use crate::exit::{ExitSender, InternalErrorReport, VmExit};
use crate::probe;
use crate::vstate::kvm::KvmFlavor;

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;
/// How long a controller waits for a vCPU to answer a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of vCPU setup, state and control.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// Building a CPUID or MSR list failed.
    #[error("building a KVM entry list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// Register setup failed.
    #[error("setting boot registers")]
    Regs(#[from] regs::Error),
    /// MSR setup failed.
    #[error("setting MSRs")]
    Msr(#[from] msr::Error),
    /// LAPIC setup failed.
    #[error("setting up the LAPIC")]
    Lapic(#[from] interrupts::Error),
    /// Reading a piece of vCPU state failed.
    #[error("reading vCPU state ({0})")]
    SaveState(&'static str, #[source] kvm_ioctls::Error),
    /// Writing a piece of vCPU state failed.
    #[error("writing vCPU state ({0})")]
    RestoreState(&'static str, #[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS took only part of a saved MSR list.
    #[error("restoring MSRs: KVM accepted {accepted} of {total}")]
    RestoreMsrs {
        /// How many took.
        accepted: usize,
        /// How many there were.
        total: usize,
    },
    /// A saved XSAVE area has the wrong size.
    #[error("saved XSAVE area has {0} words, expected 1024")]
    XsaveSize(usize),
    /// Registering the kick signal handler failed.
    #[error("registering the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning the vCPU thread failed.
    #[error("spawning vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The vCPU thread is gone or did not answer in time.
    #[error("vCPU {0} did not answer")]
    NoResponse(u8),
    /// The vCPU answered with something unexpected.
    #[error("vCPU {0} answered out of protocol: {1}")]
    Protocol(u8, String),
    /// The vCPU reported a failure executing the command.
    #[error("vCPU {vcpu}: {message}")]
    Command {
        /// The vCPU.
        vcpu: u8,
        /// What it said.
        message: String,
    },
}

/// Everything KVM holds for one vCPU. Plain data (`serde` via kvm-bindings' mirrors); untrusted
/// when restored: KVM validates every field and errors come back as [`Error::RestoreState`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// The vCPU index (= APIC id).
    pub id: u8,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state: the legacy 4 KiB XSAVE area as 1024 words (it includes what
    /// KVM_GET_FPU gives).
    pub xsave: Vec<u32>,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC page.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: kvm_vcpu_events,
    /// Guest TSC frequency, where KVM exposes it.
    pub tsc_khz: Option<u32>,
}

/// A vCPU before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    /// The index (= APIC id).
    pub id: u8,
    /// The KVM vCPU fd.
    pub fd: VcpuFd,
    msr_index_list: Arc<Vec<u32>>,
    /// KVM copies the registers into `kvm_run` at every exit (`KVM_CAP_SYNC_REGS`), which
    /// the run loop keeps for a crash report.
    sync_regs: bool,
}

/// Commands a controller sends to a running vCPU thread.
#[derive(Debug)]
pub enum VcpuCommand {
    /// Stop running guest code and wait.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Reply with the vCPU's state (paused vCPUs only).
    SaveState,
    /// Load a state (paused vCPUs only).
    RestoreState(Box<VcpuState>),
    /// Leave the run loop and end the thread.
    Exit,
}

/// Replies of a vCPU thread.
#[derive(Debug)]
pub enum VcpuResponse {
    /// Now paused: since when the guest has not run (`KVM_RUN` returned to the kick; for a
    /// vCPU paused already, now).
    Paused(Instant),
    /// Now running: when the thread went back to the guest.
    Resumed(Instant),
    /// The state asked for.
    State(Box<VcpuState>),
    /// The restore took.
    Restored,
    /// A command failed.
    Failed(String),
    /// The command needs a paused vCPU.
    NotPaused,
}

thread_local! {
    // The running vCPU's kvm_run page, for the kick handler. Const-initialised and without a
    // destructor, so reading it from a signal handler needs no lazy initialisation.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
            // before its first KVM_RUN and cleared before the VcpuFd (and the mapping) is
            // dropped; the page is shared with the kernel, so the write is volatile.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// The kick signal number.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick signal handler (once per process).
pub fn register_kick_signal() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler).map_err(Error::Signal);
    });
    result
}

impl Vcpu {
    /// Creates vCPU `id`.
    pub fn new(id: u8, vm: &VmFd, msr_index_list: Arc<Vec<u32>>) -> Result<Self, Error> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Create(id, e))?;
        Ok(Vcpu {
            id,
            fd,
            msr_index_list,
            sync_regs: vm.check_extension(Cap::SyncRegs),
        })
    }

    /// Configures the vCPU for the 64-bit boot protocol: CPUID shaped for this vCPU of
    /// `num_cpus`, boot MSRs, LAPIC LINT pins, and (on the boot vCPU) long-mode registers at
    /// `entry`. Application processors stay in wait-for-SIPI; the guest starts them.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        num_cpus: u8,
        entry: u64,
        flavor: KvmFlavor,
        tsc_deadline: bool,
    ) -> Result<(), Error> {
        let mut entries = supported_cpuid.as_slice().to_vec();
        cpuid::filter(&mut entries, self.id, num_cpus);
        cpuid::hide_async_pf(&mut entries);
        if tsc_deadline {
            cpuid::set_tsc_deadline(&mut entries);
        }
        if flavor == KvmFlavor::Pvm {
            cpuid::hide_unemulated(&mut entries);
        }
        let cpuid = CpuId::from_entries(&entries).map_err(Error::Fam)?;
        self.fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
        msr::setup_boot_msrs(&self.fd, &self.msr_index_list)?;
        interrupts::setup_lint(&self.fd)?;
        if self.id == 0 {
            regs::setup_regs(&self.fd, entry)?;
            regs::setup_fpu(&self.fd)?;
            regs::setup_sregs(&self.fd)?;
        }
        Ok(())
    }

    fn save_msrs(&self) -> Result<Vec<kvm_msr_entry>, Error> {
        let mut pending: Vec<u32> = self.msr_index_list.to_vec();
        let mut out = Vec::with_capacity(pending.len());
        // KVM_GET_MSRS stops at the first MSR it cannot read; drop that one and go on, so a
        // single unreadable MSR (listed but disabled by this vCPU's CPUID) costs nothing else.
        while !pending.is_empty() {
            let chunk_len = pending.len().min(KVM_MAX_MSR_ENTRIES);
            let entries: Vec<_> = pending[..chunk_len]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(Error::Fam)?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| Error::SaveState("msrs", e))?;
            out.extend_from_slice(&msrs.as_slice()[..n]);
            let consumed = if n < chunk_len { n + 1 } else { n };
            pending.drain(..consumed);
        }
        Ok(out)
    }

    /// Reads the complete vCPU state. Call it on a vCPU that is not in KVM_RUN.
    pub fn save_state(&self) -> Result<VcpuState, Error> {
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::SaveState("cpuid", e))?
            .as_slice()
            .to_vec();
        // The MP state goes first: reading it flushes pending APIC events into the state the
        // other ioctls report.
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(|e| Error::SaveState("mp_state", e))?;
        Ok(VcpuState {
            id: self.id,
            cpuid,
            regs: self
                .fd
                .get_regs()
                .map_err(|e| Error::SaveState("regs", e))?,
            sregs: self
                .fd
                .get_sregs()
                .map_err(|e| Error::SaveState("sregs", e))?,
            xsave: self
                .fd
                .get_xsave()
                .map_err(|e| Error::SaveState("xsave", e))?
                .region
                .to_vec(),
            xcrs: self
                .fd
                .get_xcrs()
                .map_err(|e| Error::SaveState("xcrs", e))?,
            debug_regs: self
                .fd
                .get_debug_regs()
                .map_err(|e| Error::SaveState("debugregs", e))?,
            lapic: self
                .fd
                .get_lapic()
                .map_err(|e| Error::SaveState("lapic", e))?,
            mp_state,
            vcpu_events: self
                .fd
                .get_vcpu_events()
                .map_err(|e| Error::SaveState("events", e))?,
            msrs: self.save_msrs()?,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Loads a state from [`Vcpu::save_state`], in the order KVM needs: CPUID before anything
    /// that depends on features, sregs before MSRs (EFER), events last.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), Error> {
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(Error::Fam)?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::RestoreState("cpuid", e))?;
        if let Some(khz) = state.tsc_khz
            && self.fd.get_tsc_khz().ok() != Some(khz)
        {
            self.fd
                .set_tsc_khz(khz)
                .map_err(|e| Error::RestoreState("tsc_khz", e))?;
        }
        self.fd
            .set_sregs(&state.sregs)
            .map_err(|e| Error::RestoreState("sregs", e))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(|e| Error::RestoreState("regs", e))?;
        let mut xsave = kvm_xsave::default();
        if state.xsave.len() != xsave.region.len() {
            return Err(Error::XsaveSize(state.xsave.len()));
        }
        xsave.region.copy_from_slice(&state.xsave);
        // SAFETY: `xsave` is a full legacy 4 KiB kvm_xsave, which is what KVM_SET_XSAVE reads
        // without XSAVE2; KVM validates its contents.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(|e| Error::RestoreState("xsave", e))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(|e| Error::RestoreState("xcrs", e))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(|e| Error::RestoreState("debugregs", e))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(|e| Error::RestoreState("lapic", e))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(|e| Error::RestoreState("mp_state", e))?;
        let msrs = without_async_pf(&state.msrs);
        for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(Error::Fam)?;
            let n = self
                .fd
                .set_msrs(&msrs)
                .map_err(|e| Error::RestoreState("msrs", e))?;
            if n != chunk.len() {
                return Err(Error::RestoreMsrs {
                    accepted: n,
                    total: chunk.len(),
                });
            }
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(|e| Error::RestoreState("events", e))?;
        Ok(())
    }

    /// Starts the vCPU thread. The thread runs the guest until a command or the VM's end;
    /// how the VM ended goes to `exit`.
    pub fn start(
        self,
        devices: Arc<DeviceManager>,
        memory: GuestMemoryMmap,
        exit: ExitSender,
        start_paused: bool,
        first_run: Arc<OnceLock<Instant>>,
    ) -> Result<VcpuHandle, Error> {
        register_kick_signal()?;
        let id = self.id;
        let (cmd_tx, cmd_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let exits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread_exits = exits.clone();
        let crash = Arc::new(OnceLock::new());
        let thread_crash = crash.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut t = VcpuThread {
                    vcpu: self,
                    devices,
                    memory,
                    exit,
                    cmd_rx,
                    resp_tx,
                    first_run,
                    exits: thread_exits,
                    crash: thread_crash,
                    history: ExitHistory::default(),
                    started: Instant::now(),
                };
                t.run(start_paused);
            })
            .map_err(Error::Spawn)?;
        Ok(VcpuHandle {
            id,
            thread: Some(thread),
            cmd_tx,
            resp_rx,
            exits,
            crash,
        })
    }
}

/// The controller's side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    /// The vCPU index.
    pub id: u8,
    thread: Option<JoinHandle<()>>,
    cmd_tx: Sender<VcpuCommand>,
    resp_rx: Receiver<VcpuResponse>,
    exits: Arc<std::sync::atomic::AtomicU64>,
    crash: Arc<OnceLock<CrashReport>>,
}

impl VcpuHandle {
    /// What this vCPU recorded when its guest triple-faulted, if it did.
    pub fn crash_report(&self) -> Option<&CrashReport> {
        self.crash.get()
    }

    /// How many times KVM_RUN returned on this vCPU (a stuck guest and a vCPU that never
    /// enters the guest look alike from outside; this tells them apart).
    pub fn exits(&self) -> u64 {
        self.exits.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send(&self, cmd: VcpuCommand) -> Result<(), Error> {
        self.cmd_tx
            .send(cmd)
            .map_err(|_| Error::NoResponse(self.id))?;
        if let Some(t) = &self.thread {
            // A failed kick means the thread already ended; the missing reply says so.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    fn recv(&self) -> Result<VcpuResponse, Error> {
        match self.resp_rx.recv_timeout(COMMAND_TIMEOUT) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                Err(Error::NoResponse(self.id))
            }
        }
    }

    fn expect(&self, r: VcpuResponse) -> Error {
        match r {
            VcpuResponse::Failed(message) => Error::Command {
                vcpu: self.id,
                message,
            },
            other => Error::Protocol(self.id, format!("{other:?}")),
        }
    }

    /// Asks the vCPU to pause, without waiting (see [`VcpuHandle::wait_paused`]).
    pub fn request_pause(&self) -> Result<(), Error> {
        self.send(VcpuCommand::Pause)
    }

    /// Waits for the reply to [`VcpuHandle::request_pause`].
    /// Returns when the vCPU stopped running guest code.
    pub fn wait_paused(&self) -> Result<Instant, Error> {
        match self.recv()? {
            VcpuResponse::Paused(at) => Ok(at),
            r => Err(self.expect(r)),
        }
    }

    /// Resumes a paused vCPU.
    pub fn resume(&self) -> Result<(), Error> {
        self.request_resume()?;
        self.wait_resumed().map(|_| ())
    }

    /// Asks a paused vCPU to run again; [`VcpuHandle::wait_resumed`] takes the reply.
    pub fn request_resume(&self) -> Result<(), Error> {
        self.send(VcpuCommand::Resume)
    }

    /// Waits for the reply to [`VcpuHandle::request_resume`].
    /// Returns when the vCPU thread went back to the guest.
    pub fn wait_resumed(&self) -> Result<Instant, Error> {
        match self.recv()? {
            VcpuResponse::Resumed(at) => Ok(at),
            r => Err(self.expect(r)),
        }
    }

    /// Reads the state of a paused vCPU.
    pub fn save_state(&self) -> Result<VcpuState, Error> {
        self.request_state()?;
        self.wait_state()
    }

    /// Asks for the state of a vCPU that is paused, or will be by the time it reads this
    /// (a [`VcpuHandle::request_pause`] sent before: the thread answers the pause and then
    /// this, in one wake-up), without waiting; [`VcpuHandle::wait_state`] takes the reply.
    pub fn request_state(&self) -> Result<(), Error> {
        // No kick: a paused thread blocks on this channel, and a running one was kicked by
        // the pause before it.
        self.cmd_tx
            .send(VcpuCommand::SaveState)
            .map_err(|_| Error::NoResponse(self.id))
    }

    /// Waits for the reply to [`VcpuHandle::request_state`].
    pub fn wait_state(&self) -> Result<VcpuState, Error> {
        match self.recv()? {
            VcpuResponse::State(s) => Ok(*s),
            r => Err(self.expect(r)),
        }
    }

    /// Loads a state into a paused vCPU.
    pub fn restore_state(&self, state: VcpuState) -> Result<(), Error> {
        self.send(VcpuCommand::RestoreState(Box::new(state)))?;
        match self.recv()? {
            VcpuResponse::Restored => Ok(()),
            r => Err(self.expect(r)),
        }
    }

    /// Ends the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(VcpuCommand::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// MSR_KVM_ASYNC_PF_EN: where the guest's async page fault area is, and whether it is on.
pub(crate) const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;

/// `msrs` with KVM's asynchronous page faults turned off (MSR_KVM_ASYNC_PF_EN = 0).
///
/// Snapshots made before the guest's CPUID hid the feature (`cpuid::hide_async_pf`) have a
/// guest that turned it on; a restored VM would then keep getting them, and their "page
/// ready" wake-ups were lost under load in the rig (issue 7: tasks of restored VMs that never
/// ran again). With the MSR at 0, KVM never puts a guest task to sleep for a page: the vCPU
/// waits for it instead. The guest still believes the feature is on, which costs nothing:
/// only KVM starts an async page fault.
fn without_async_pf(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    msrs.iter()
        .map(|m| {
            let mut m = *m;
            if m.index == MSR_KVM_ASYNC_PF_EN {
                m.data = 0;
            }
            m
        })
        .collect()
}

/// What one KVM_RUN led to.
enum Step {
    Continue,
    Kicked,
    Ended(VmExit),
}

struct VcpuThread {
    vcpu: Vcpu,
    devices: Arc<DeviceManager>,
    memory: GuestMemoryMmap,
    exit: ExitSender,
    cmd_rx: Receiver<VcpuCommand>,
    resp_tx: Sender<VcpuResponse>,
    first_run: Arc<OnceLock<Instant>>,
    exits: Arc<std::sync::atomic::AtomicU64>,
    crash: Arc<OnceLock<CrashReport>>,
    history: ExitHistory,
    started: Instant,
}

/// Reports a panic of the vCPU thread as the VM's end, so the VMM never waits on a dead vCPU.
struct PanicGuard(u8, ExitSender);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.1.send(VmExit::VcpuError {
                vcpu: self.0,
                message: "vCPU thread panicked".into(),
            });
        }
    }
}

impl VcpuThread {
    fn run(&mut self, start_paused: bool) {
        let _guard = PanicGuard(self.vcpu.id, self.exit.clone());
        let run_ptr: *mut kvm_run = self.vcpu.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        if self.vcpu.sync_regs {
            // Nothing is ever marked dirty: KVM only copies out, never loads from kvm_run.
            self.vcpu.fd.set_sync_valid_reg(SyncReg::Register);
            self.vcpu.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        let mut paused = start_paused;
        loop {
            if paused {
                match self.paused_loop() {
                    Some(()) => paused = false,
                    None => break,
                }
            }
            match self.step() {
                Step::Continue => {}
                Step::Kicked => {
                    self.vcpu.fd.set_kvm_immediate_exit(0);
                    match self.drain_commands(Instant::now()) {
                        Drain::Run => {}
                        Drain::Pause => paused = true,
                        Drain::Exit => break,
                    }
                }
                Step::Ended(reason) => {
                    let _ = self.exit.send(reason);
                    // Stay answerable (state reads of a crashed guest are useful) until told
                    // to exit.
                    if self.paused_loop().is_none() {
                        break;
                    }
                }
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    fn reply(&self, r: VcpuResponse) {
        let _ = self.resp_tx.send(r);
    }

    /// Handles commands that arrived with a kick, while running.
    /// `exited`: when `KVM_RUN` returned.
    fn drain_commands(&mut self, exited: Instant) -> Drain {
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            match cmd {
                // Whatever follows a pause (state reads) is for the paused loop: the controller
                // may send it the moment it sees this reply.
                VcpuCommand::Pause => {
                    // Tell a kvmclock guest it was stopped, so its watchdogs do not report a
                    // soft lockup for the time it spent paused (EINVAL without kvmclock).
                    let _ = self.vcpu.fd.kvmclock_ctrl();
                    self.reply(VcpuResponse::Paused(exited));
                    return Drain::Pause;
                }
                VcpuCommand::Resume => self.reply(VcpuResponse::Resumed(Instant::now())),
                VcpuCommand::SaveState | VcpuCommand::RestoreState(_) => {
                    self.reply(VcpuResponse::NotPaused)
                }
                VcpuCommand::Exit => return Drain::Exit,
            }
        }
        Drain::Run
    }

    /// Blocks on commands while paused. `Some` = resume, `None` = exit.
    fn paused_loop(&mut self) -> Option<()> {
        loop {
            let cmd = self.cmd_rx.recv().ok()?;
            match cmd {
                VcpuCommand::Pause => self.reply(VcpuResponse::Paused(Instant::now())),
                VcpuCommand::Resume => {
                    // A kick that raced with the pause may have left immediate_exit set.
                    self.vcpu.fd.set_kvm_immediate_exit(0);
                    self.reply(VcpuResponse::Resumed(Instant::now()));
                    return Some(());
                }
                VcpuCommand::SaveState => match self.vcpu.save_state() {
                    Ok(s) => self.reply(VcpuResponse::State(Box::new(s))),
                    Err(e) => self.reply(VcpuResponse::Failed(crate::error_chain(&e))),
                },
                VcpuCommand::RestoreState(s) => match self.vcpu.restore_state(&s) {
                    Ok(()) => self.reply(VcpuResponse::Restored),
                    Err(e) => self.reply(VcpuResponse::Failed(crate::error_chain(&e))),
                },
                VcpuCommand::Exit => return None,
            }
        }
    }

    fn step(&mut self) -> Step {
        let id = self.vcpu.id;
        if self.first_run.get().is_none() {
            let _ = self.first_run.set(Instant::now());
        }
        let r = self.vcpu.fd.run();
        let seq = self
            .exits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let kind = match &r {
            Ok(VcpuExit::IoIn(port, _)) => ExitKind::IoIn(*port),
            Ok(VcpuExit::IoOut(port, _)) => ExitKind::IoOut(*port),
            Ok(VcpuExit::MmioRead(addr, _)) => ExitKind::MmioRead(*addr),
            Ok(VcpuExit::MmioWrite(addr, _)) => ExitKind::MmioWrite(*addr),
            Ok(VcpuExit::Shutdown) => ExitKind::Shutdown,
            Ok(VcpuExit::Hlt) => ExitKind::Other("hlt"),
            Ok(VcpuExit::SystemEvent(..)) => ExitKind::Other("system event"),
            Ok(VcpuExit::InternalError) => ExitKind::Other("internal error"),
            Ok(VcpuExit::FailEntry(..)) => ExitKind::Other("fail entry"),
            Ok(_) => ExitKind::Other("other"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitKind::Kicked,
            Err(_) => ExitKind::Other("KVM_RUN error"),
        };
        let step = match r {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.devices.pio_read(port, data);
                    Step::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    self.devices.pio_write(port, data);
                    Step::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.devices.mmio_read(addr, data);
                    Step::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.devices.mmio_write(addr, data);
                    Step::Continue
                }
                // With the in-kernel LAPIC, HLT stays in the kernel; this only comes from a
                // guest halting with interrupts off on some KVMs. Nothing can wake it.
                VcpuExit::Hlt => Step::Ended(VmExit::PowerOff),
                VcpuExit::Shutdown => Step::Ended(VmExit::TripleFault { vcpu: id }),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                        Step::Ended(VmExit::PowerOff)
                    }
                    KVM_SYSTEM_EVENT_CRASH => Step::Ended(VmExit::TripleFault { vcpu: id }),
                    other => {
                        tracing::warn!("vcpu {id}: ignoring system event {other}");
                        Step::Continue
                    }
                },
                VcpuExit::FailEntry(reason, _) => {
                    Step::Ended(VmExit::FailEntry { vcpu: id, reason })
                }
                VcpuExit::InternalError => {
                    Step::Ended(VmExit::InternalError(self.internal_error()))
                }
                VcpuExit::IoapicEoi(_) | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Step::Continue,
                other => {
                    tracing::warn!("vcpu {id}: unhandled exit {other:?}");
                    Step::Continue
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Kicked,
            Err(e) => Step::Ended(VmExit::VcpuError {
                vcpu: id,
                message: format!("KVM_RUN: {e}"),
            }),
        };
        let record = ExitRecord {
            seq,
            at: self.started.elapsed(),
            kind,
            cpu: self.synced_cpu(),
        };
        if kind == ExitKind::Shutdown {
            self.report_crash(record);
        } else {
            self.history.push(record);
        }
        step
    }

    /// The registers KVM copied into `kvm_run` at the last exit.
    fn synced_cpu(&self) -> Option<CpuSnapshot> {
        if !self.vcpu.sync_regs {
            return None;
        }
        let s = self.vcpu.fd.sync_regs();
        Some(CpuSnapshot::new(&s.regs, &s.sregs))
    }

    /// Logs what is left of a triple fault (see [`crate::crash`]) and, if asked to, dumps
    /// guest memory, before the VM's end is reported.
    fn report_crash(&mut self, shutdown: ExitRecord) {
        let mut report = CrashReport {
            vcpu: self.vcpu.id,
            exits: shutdown.seq,
            after: shutdown.at,
            at_shutdown: shutdown.cpu,
            last_exits: self.history.records(),
            dump: None,
        };
        if let Some(dir) = std::env::var_os(crate::crash::CRASH_DUMP_ENV) {
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let stem = format!(
                "crash-{unix_ms}-{}-vcpu{}",
                std::process::id(),
                self.vcpu.id
            );
            match crate::crash::dump(
                &self.memory,
                std::path::Path::new(&dir),
                &stem,
                &report.to_string(),
            ) {
                Ok(path) => report.dump = Some(path),
                Err(e) => tracing::error!("crash dump: {}", crate::error_chain(&e)),
            }
        }
        // The summary last: the tail of the VMM's log (what specd keeps in `Vm.error`) then
        // holds it and the newest exits.
        tracing::error!("{}", report.exits_text());
        tracing::error!("{}", report.summary());
        let _ = self.crash.set(report);
    }

    fn internal_error(&mut self) -> InternalErrorReport {
        let run = self.vcpu.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR (VcpuExit::InternalError told us), so
        // the kernel filled the `internal` member of the union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = usize::try_from(internal.ndata)
            .unwrap_or(0)
            .min(internal.data.len());
        probe::internal_error_report(
            &self.vcpu,
            &self.memory,
            internal.suberror,
            &internal.data[..ndata],
        )
    }
}

enum Drain {
    Run,
    Pause,
    Exit,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::kvm::Kvm;

    fn vcpu() -> (Kvm, VmFd, Vcpu) {
        let kvm = Kvm::new()
            .unwrap_or_else(|e| panic!("these tests need /dev/kvm: {}", crate::error_chain(&e)));
        let vm = kvm.fd.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let v = Vcpu::new(0, &vm, Arc::new(kvm.msr_index_list.clone())).unwrap();
        v.configure(
            &kvm.supported_cpuid,
            1,
            0x10_0000,
            kvm.flavor,
            kvm.tsc_deadline,
        )
        .unwrap();
        (kvm, vm, v)
    }

    #[test]
    fn saved_state_restores_onto_a_fresh_vcpu_and_saves_back_the_same() {
        let (kvm, vm, v) = vcpu();
        let s = v.save_state().unwrap();
        let w = Vcpu::new(1, &vm, Arc::new(kvm.msr_index_list.clone())).unwrap();
        w.restore_state(&s).unwrap();
        let t = w.save_state().unwrap();
        assert_eq!(t.regs, s.regs);
        assert_eq!(t.sregs.cr3, s.sregs.cr3);
        assert_eq!(t.xsave, s.xsave);
        assert_eq!(t.cpuid.len(), s.cpuid.len());
        // The same MSRs are readable, and the boot MSRs (none of which is a clock, unlike the
        // TSC or Hyper-V's reference counter) carry the same values.
        let index = |m: &[kvm_msr_entry]| m.iter().map(|e| e.index).collect::<Vec<_>>();
        assert_eq!(index(&t.msrs), index(&s.msrs));
        let value = |m: &[kvm_msr_entry], i: u32| m.iter().find(|e| e.index == i).map(|e| e.data);
        for boot in msr::boot_msr_entries().iter().filter(|e| e.index != 0x10) {
            assert_eq!(
                value(&t.msrs, boot.index),
                value(&s.msrs, boot.index),
                "{:#x}",
                boot.index
            );
        }
    }

    #[test]
    fn restored_msrs_turn_async_page_faults_off_and_keep_the_rest() {
        let entry = |index, data| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        };
        let saved = [
            entry(0x10, 1234),
            entry(MSR_KVM_ASYNC_PF_EN, 0x3f_f000 | 0b1001),
            entry(0x4b56_4d06, 0xf3),
        ];
        let out = without_async_pf(&saved);
        let got: Vec<(u32, u64)> = out.iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(
            got,
            vec![(0x10, 1234), (MSR_KVM_ASYNC_PF_EN, 0), (0x4b56_4d06, 0xf3)]
        );
    }

    #[test]
    fn garbage_states_are_errors_not_panics() {
        let (_kvm, _vm, v) = vcpu();
        let good = v.save_state().unwrap();

        let mut s = good.clone();
        s.xsave.truncate(5);
        assert!(matches!(v.restore_state(&s), Err(Error::XsaveSize(5))));

        let mut s = good.clone();
        s.cpuid = vec![kvm_cpuid_entry2::default(); 1000];
        assert!(v.restore_state(&s).is_err());

        let mut s = good.clone();
        s.msrs.push(kvm_msr_entry {
            index: 0xdead_0000,
            data: 1,
            ..Default::default()
        });
        assert!(v.restore_state(&s).is_err());

        let mut s = good.clone();
        // Paging without protection is an invalid CR0; KVM must refuse it.
        s.sregs.cr0 = 1 << 31;
        assert!(v.restore_state(&s).is_err());

        v.restore_state(&good).unwrap();
    }
}
