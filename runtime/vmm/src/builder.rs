//! Boots a [`VmConfig`]: memory, VM, devices, kernel, boot structures, vCPUs.

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, load_cmdline};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, SERIAL_GSI};
use crate::arch::x86_64::{boot_params, mptable, regs};
use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::device_manager::legacy::{IrqLine, LegacyDevices, SerialOut};
use crate::vstate::kvm::Kvm;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::vstate::{memory, vcpu, vm};
use crate::{Vmm, virtio};

/// The 64-bit entry point of a bzImage is 0x200 past its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors of booting a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU count is out of range.
    #[error("vcpus must be 1..={max}, got {got}")]
    VcpuCount {
        /// Asked for.
        got: u8,
        /// Allowed.
        max: u8,
    },
    /// Opening KVM failed.
    #[error(transparent)]
    Kvm(#[from] crate::vstate::kvm::Error),
    /// Creating guest memory failed.
    #[error("creating guest memory")]
    Memory(#[from] memory::Error),
    /// Creating the VM failed.
    #[error("creating the VM")]
    Vm(#[from] vm::Error),
    /// Setting up the legacy devices failed.
    #[error("setting up legacy devices")]
    Legacy(#[from] crate::device_manager::legacy::Error),
    /// Adding a virtio device failed.
    #[error("adding virtio devices")]
    Virtio(#[from] virtio::Error),
    /// The kernel file cannot be opened.
    #[error("opening kernel {path}")]
    OpenKernel {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("loading kernel {path}: not an x86_64 ELF ({elf}) nor a bzImage ({bzimage})")]
    LoadKernel {
        /// The file.
        path: std::path::PathBuf,
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: linux_loader::loader::Error,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("writing the kernel command line")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// Writing the zero page failed.
    #[error("writing the zero page")]
    BootParams(#[from] boot_params::Error),
    /// Writing the MP table failed.
    #[error("writing the MP table")]
    Mptable(#[from] mptable::Error),
    /// Writing the boot page tables and GDT failed.
    #[error("writing boot tables")]
    BootTables(#[from] regs::Error),
    /// Setting up a vCPU failed.
    #[error("setting up vCPUs")]
    Vcpu(#[from] vcpu::Error),
}

/// Where the kernel was loaded and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// The bzImage setup header, if it was one.
    pub header: Option<setup_header>,
}

/// Loads an ELF (vmlinux or a test guest) or a bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let open = || {
        File::open(path).map_err(|source| Error::OpenKernel {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut f = open()?;
    let elf = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                header: None,
            });
        }
        Err(e) => e,
    };
    let mut f = open()?;
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            header: r.setup_header,
        }),
        Err(bzimage) => Err(Error::LoadKernel {
            path: path.to_path_buf(),
            elf,
            bzimage,
        }),
    }
}

/// Builds the command line: the configured one plus one `virtio_mmio.device=` per device.
pub fn build_cmdline(base: &str, devices: &DeviceManager) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    if !base.trim().is_empty() {
        cmdline.insert_str(base.trim()).map_err(Error::Cmdline)?;
    }
    for slot in devices.mmio_slots() {
        cmdline
            .insert_str(slot.cmdline_param())
            .map_err(Error::Cmdline)?;
    }
    Ok(cmdline)
}

/// What a boot and a restore share: KVM, memory, the VM, the buses and the devices.
struct Parts {
    kvm: Kvm,
    memory: GuestMemoryMmap,
    vm: Vm,
    exit_tx: crate::exit::ExitSender,
    exit_rx: std::sync::mpsc::Receiver<crate::exit::Event>,
    waker: crate::exit::Waker,
    devices: DeviceManager,
    backends: Vec<virtio::Attached>,
}

fn create(
    config: &VmConfig,
    t0: Instant,
    memory: Option<GuestMemoryMmap>,
    saved: Option<&crate::snapshot::Captured>,
) -> Result<Parts, Error> {
    if config.vcpus == 0 || config.vcpus > mptable::MAX_CPUS {
        return Err(Error::VcpuCount {
            got: config.vcpus,
            max: mptable::MAX_CPUS,
        });
    }
    let kvm = Kvm::new()?;
    tracing::debug!("boot: kvm open + caps {:?}", t0.elapsed());
    let memory = match memory {
        Some(m) => m,
        None => memory::create_with(
            config.mem_bytes,
            &config.memory,
            config.hugepages,
            config.hugetlb,
        )?,
    };
    tracing::debug!("boot: memory mapped {:?}", t0.elapsed());
    let vm = Vm::new(&kvm, memory.clone())?;
    tracing::debug!("boot: memory + VM {:?}", t0.elapsed());
    let (tx, exit_rx) = channel();
    let exit_tx = crate::exit::ExitSender(tx.clone());
    let waker = crate::exit::Waker(tx);

    let serial_irq = IrqLine::new()?;
    vm.register_irqfd(&serial_irq.0, SERIAL_GSI)?;
    let out = SerialOut::new(config.serial.log.as_deref(), config.serial.stdout)?;
    let legacy = LegacyDevices::new(serial_irq, out, exit_tx.clone(), saved.map(|s| &s.serial))?;
    let mut devices = DeviceManager::new(legacy);
    let backends = virtio::attach(config, &vm, &mut devices, saved.map(|s| &s.devices[..]))?;
    Ok(Parts {
        kvm,
        memory,
        vm,
        exit_tx,
        exit_rx,
        waker,
        devices,
        backends,
    })
}

fn start(
    parts: Parts,
    vcpus: Vec<Vcpu>,
    paused: bool,
    timeout_ms: Option<u64>,
) -> Result<Vmm, Error> {
    let devices = Arc::new(parts.devices);
    let first_run = Arc::new(OnceLock::<Instant>::new());
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        handles.push(v.start(
            devices.clone(),
            parts.memory.clone(),
            parts.exit_tx.clone(),
            paused,
            first_run.clone(),
        )?);
    }
    let mut vmm = Vmm::new(
        parts.kvm,
        parts.vm,
        devices,
        handles,
        parts.exit_rx,
        parts.waker,
        first_run,
        parts.backends,
        timeout_ms,
    );
    vmm.paused = paused;
    Ok(vmm)
}

/// Errors of restoring a VM from saved state.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Setting up the VM failed.
    #[error("setting up the VM")]
    Create(#[from] Error),
    /// The saved vCPU states do not match the configuration.
    #[error("{states} saved vCPU states for {vcpus} vCPUs")]
    VcpuCount {
        /// States given.
        states: usize,
        /// vCPUs configured.
        vcpus: u8,
    },
    /// Loading the saved state failed.
    #[error("loading saved state")]
    State(#[from] crate::Error),
}

/// Restores a VM from captured state instead of booting: guest RAM comes from `config.memory`
/// (normally `MemoryBacking::File`, mapped privately, nothing copied) or, with `memory`, is a
/// mapping the caller already holds (what a `fork(2)` child inherited). The vCPUs start
/// paused, get the VM-wide and vCPU state loaded, and run; the devices are rebuilt from their
/// saved state over the new backends `config` names (disk tops, vsock socket, net backend).
/// No kernel is loaded.
pub fn restore_captured(
    config: &VmConfig,
    memory: Option<GuestMemoryMmap>,
    saved: &crate::snapshot::Captured,
) -> Result<Vmm, RestoreError> {
    if saved.vcpus.len() != usize::from(config.vcpus) {
        return Err(RestoreError::VcpuCount {
            states: saved.vcpus.len(),
            vcpus: config.vcpus,
        });
    }
    let t0 = Instant::now();
    let parts = create(config, t0, memory, Some(saved))?;
    let msr_list = Arc::new(parts.kvm.msr_index_list.clone());
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        vcpus.push(Vcpu::new(id, &parts.vm.fd, msr_list.clone()).map_err(Error::from)?);
    }
    let mut vmm = start(parts, vcpus, true, config.timeout_ms)?;
    vmm.restore_vm_state(&saved.vm)?;
    vmm.restore_vcpu_states(&saved.vcpus)?;
    for d in vmm.virtio_devices() {
        d.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .signal_after_restore();
    }
    tracing::debug!("restore: state loaded {:?}", t0.elapsed());
    vmm.resume()?;
    Ok(vmm)
}

/// Boots `config`: everything is set up, then the vCPUs start running the kernel.
pub fn boot(config: &VmConfig) -> Result<Vmm, Error> {
    let t0 = Instant::now();
    let Parts {
        kvm,
        memory,
        vm,
        exit_tx,
        exit_rx,
        waker,
        devices,
        backends,
    } = create(config, t0, None, None)?;
    tracing::debug!("boot: devices {:?}", t0.elapsed());
    let kernel = load_kernel(&memory, &config.kernel)?;
    tracing::debug!("boot: kernel loaded {:?}", t0.elapsed());
    let cmdline = build_cmdline(&config.cmdline, &devices)?;
    load_cmdline(&memory, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(Error::LoadCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes()
        .len();
    let params = boot_params::build(kernel.header, cmdline_len, config.mem_bytes)?;
    boot_params::write(&memory, &params)?;
    mptable::setup_mptable(&memory, config.vcpus)?;
    regs::write_boot_tables(&memory)?;

    let msr_list = Arc::new(kvm.msr_index_list.clone());
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let v = Vcpu::new(id, &vm.fd, msr_list.clone())?;
        v.configure(
            &kvm.supported_cpuid,
            config.vcpus,
            kernel.entry,
            kvm.flavor,
            kvm.tsc_deadline,
        )?;
        vcpus.push(v);
    }
    tracing::debug!("boot: vcpus configured {:?}", t0.elapsed());
    let parts = Parts {
        kvm,
        memory,
        vm,
        exit_tx,
        exit_rx,
        waker,
        devices,
        backends,
    };
    start(parts, vcpus, false, config.timeout_ms)
}
