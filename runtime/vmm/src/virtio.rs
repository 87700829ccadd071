//! Wires the devices crate's virtio devices onto the MMIO bus: one virtio-mmio window and one
//! irqfd-backed GSI per device, announced on the kernel command line.

use std::sync::{Arc, Mutex};

use specc_devices::Interrupt;
use specc_devices::virtio::VirtioDevice;
use specc_devices::virtio::mmio::MmioTransport;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DEFAULT_MAC, NetBackend, VmConfig, parse_mac};
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
    /// The device (or its backend) could not be created.
    #[error("creating virtio-{0}")]
    Device(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
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
/// so device names in the guest are stable (`/dev/vda` is the first disk).
pub fn attach(
    config: &VmConfig,
    vm: &Vm,
    devices: &mut DeviceManager,
) -> Result<Vec<Attached>, Error> {
    use specc_devices::virtio::{block, net, rng, vsock};
    let mut out = Vec::new();
    for d in &config.disks {
        let cfg = block::BlockConfig {
            layers: d.layers.clone(),
            top: d.top.clone(),
            read_only: d.read_only,
            id: d.id.clone().unwrap_or_default(),
        };
        let dev = block::Block::new(cfg).map_err(|e| Error::Device("blk", Box::new(e)))?;
        out.push(add_device(vm, devices, "blk", Box::new(dev))?);
    }
    if let Some(n) = &config.net {
        let mac = match &n.mac {
            Some(m) => parse_mac(m).map_err(|e| Error::Device("net", Box::new(e)))?,
            None => DEFAULT_MAC,
        };
        let backend = match &n.backend {
            NetBackend::Passt { binary, log, args } => {
                let mut p = net::PasstConfig::default();
                if let Some(b) = binary {
                    p.binary = b.clone();
                }
                p.log_file = log.clone();
                p.extra_args = args.clone();
                net::NetBackend::Passt(p)
            }
            NetBackend::Tap { name } => net::NetBackend::Tap(name.clone()),
        };
        let cfg = net::NetConfig {
            mac,
            mtu: n.mtu.unwrap_or(1500),
            backend,
        };
        let dev = net::Net::new(cfg).map_err(|e| Error::Device("net", Box::new(e)))?;
        out.push(add_device(vm, devices, "net", Box::new(dev))?);
    }
    if let Some(v) = &config.vsock {
        let cfg = vsock::VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.clone(),
        };
        let dev = vsock::Vsock::new(cfg).map_err(|e| Error::Device("vsock", Box::new(e)))?;
        out.push(add_device(vm, devices, "vsock", Box::new(dev))?);
    }
    if config.rng {
        out.push(add_device(vm, devices, "rng", Box::new(rng::Rng::new()))?);
    }
    Ok(out)
}
