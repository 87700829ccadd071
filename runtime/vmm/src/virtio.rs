//! Wires the devices crate's virtio devices onto the MMIO bus: one virtio-mmio window and one
//! irqfd-backed GSI per device, announced on the kernel command line.

use std::sync::{Arc, Mutex};

use specc_devices::Interrupt;
use specc_devices::virtio::VirtioDevice;
use specc_devices::virtio::mmio::MmioTransport;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::device_manager::{self, DeviceManager, MmioSlot};
use crate::vstate::vm::{self, Vm};

/// Errors of attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the interrupt eventfd failed.
    #[error("creating an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// Registering the irqfd failed.
    #[error("registering the interrupt")]
    Irq(#[from] vm::Error),
    /// No window or GSI left, or the bus refused.
    #[error("placing a virtio device")]
    Place(#[from] device_manager::Error),
    /// The transport could not be built.
    #[error("creating the virtio-mmio transport for {0}")]
    Transport(
        &'static str,
        #[source] specc_devices::virtio::mmio::MmioError,
    ),
    /// A configured device kind is not available in this build.
    #[error("virtio-{0} is not available in this build of specc-devices")]
    NotAvailable(&'static str),
}

/// A device's interrupt: an eventfd registered as irqfd on the device's GSI.
#[derive(Debug)]
pub struct IrqFd(EventFd);

impl Interrupt for IrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// An attached virtio device, kept so the VMM can pause and resume its worker.
#[derive(Debug, Clone)]
pub struct Attached {
    /// Device kind, for logs.
    pub kind: &'static str,
    /// Where it is.
    pub slot: MmioSlot,
    /// The transport (also on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Places `device` at the next free window with its own GSI.
pub fn add_device(
    vm: &Vm,
    devices: &mut DeviceManager,
    kind: &'static str,
    device: Box<dyn VirtioDevice>,
) -> Result<Attached, Error> {
    let slot = devices.next_slot()?;
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&evt, slot.gsi)?;
    let transport = MmioTransport::new(vm.memory.clone(), device, Arc::new(IrqFd(evt)))
        .map_err(|e| Error::Transport(kind, e))?;
    let transport = Arc::new(Mutex::new(transport));
    devices.add_mmio(slot, transport.clone())?;
    Ok(Attached {
        kind,
        slot,
        transport,
    })
}

/// Attaches every virtio device `config` asks for, in a fixed order (disks, net, vsock, rng)
/// so device names in the guest are stable.
pub fn attach(
    config: &VmConfig,
    vm: &Vm,
    devices: &mut DeviceManager,
) -> Result<Vec<Attached>, Error> {
    let mut out = Vec::new();
    if !config.disks.is_empty() {
        return Err(Error::NotAvailable("blk"));
    }
    if config.net.is_some() {
        return Err(Error::NotAvailable("net"));
    }
    if config.vsock.is_some() {
        return Err(Error::NotAvailable("vsock"));
    }
    if config.rng {
        out.push(add_device(
            vm,
            devices,
            "rng",
            Box::new(specc_devices::virtio::rng::Rng::new()),
        )?);
    }
    Ok(out)
}
