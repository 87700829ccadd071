//! Wires the devices crate's virtio devices onto the MMIO bus: one virtio-mmio window and one
//! irqfd-backed GSI per device, announced on the kernel command line.

use std::sync::{Arc, Mutex};

use specc_devices::Interrupt;
use specc_devices::persist::Persist;
use specc_devices::virtio::block::DiskHandle;
use specc_devices::virtio::mmio::{MmioTransport, MmioTransportArgs, MmioTransportState};
use specc_devices::virtio::{VirtioDevice, VirtioDeviceState};
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
    /// The snapshot's devices do not match the configuration's.
    #[error("the snapshot has {saved}, the configuration asks for {configured}")]
    Mismatch {
        /// Devices in the snapshot, in order.
        saved: String,
        /// Devices the configuration asks for, in order.
        configured: String,
    },
    /// A saved device state was refused.
    #[error("restoring virtio-{0}")]
    Restore(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
}

/// One virtio device's saved state, in attach order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSnapshot {
    /// Device kind (`blk`, `net`, `vsock`, `rng`).
    pub kind: String,
    /// Guest-physical base of its virtio-mmio window (checked on restore: the guest's driver
    /// knows it).
    pub mmio_base: u64,
    /// Transport and device state.
    pub transport: MmioTransportState,
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
    /// A block device's disk, for flush and freeze.
    pub disk: Option<DiskHandle>,
}

impl Attached {
    fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The device's state; its worker must be paused.
    pub fn save(&self) -> DeviceSnapshot {
        DeviceSnapshot {
            kind: self.kind.to_owned(),
            mmio_base: self.slot.base,
            transport: self.lock().save(),
        }
    }
}

/// A device about to be attached: a fresh one, or one rebuilt from a snapshot.
enum Source<'a> {
    Fresh(Box<dyn VirtioDevice>),
    Saved(Box<dyn VirtioDevice>, &'a DeviceSnapshot),
}

/// Places `device` at the next free window with its own GSI.
fn add_device(
    vm: &Vm,
    devices: &mut DeviceManager,
    kind: &'static str,
    source: Source<'_>,
    disk: Option<DiskHandle>,
) -> Result<Attached, Error> {
    let slot = devices.next_slot()?;
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&evt, slot.gsi)?;
    let irq = Arc::new(IrqFd(evt));
    let transport = match source {
        Source::Fresh(device) => MmioTransport::new(vm.memory.clone(), device, irq)
            .map_err(|e| Error::Transport(kind, e))?,
        Source::Saved(device, saved) => {
            if saved.mmio_base != slot.base {
                return Err(Error::Mismatch {
                    saved: format!("virtio-{kind} at {:#x}", saved.mmio_base),
                    configured: format!("virtio-{kind} at {:#x}", slot.base),
                });
            }
            let args = MmioTransportArgs {
                mem: vm.memory.clone(),
                device,
                irq,
            };
            MmioTransport::restore(args, &saved.transport)
                .map_err(|e| Error::Restore(kind, Box::new(e)))?
        }
    };
    let transport = Arc::new(Mutex::new(transport));
    devices.add_mmio(slot, transport.clone())?;
    Ok(Attached {
        kind,
        slot,
        transport,
        disk,
    })
}

/// The device kinds `config` asks for, in attach order.
pub fn configured_kinds(config: &VmConfig) -> Vec<&'static str> {
    let mut k = vec!["blk"; config.disks.len()];
    if config.net.is_some() {
        k.push("net");
    }
    if config.vsock.is_some() {
        k.push("vsock");
    }
    if config.rng {
        k.push("rng");
    }
    k
}

fn restore_err(kind: &'static str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error {
    move |e| Error::Restore(kind, e)
}

/// Attaches every virtio device `config` asks for, in a fixed order (disks, net, vsock, rng)
/// so device names in the guest are stable (`/dev/vda` is the first disk). With `saved` (a
/// restore or fork) each device is rebuilt from its state over the new backends `config`
/// names; the kinds must match the snapshot's one for one.
pub fn attach(
    config: &VmConfig,
    vm: &Vm,
    devices: &mut DeviceManager,
    saved: Option<&[DeviceSnapshot]>,
) -> Result<Vec<Attached>, Error> {
    use specc_devices::virtio::{block, net, rng, vsock};
    if let Some(saved) = saved {
        let want = configured_kinds(config);
        if saved
            .iter()
            .map(|d| d.kind.as_str())
            .ne(want.iter().copied())
        {
            return Err(Error::Mismatch {
                saved: saved
                    .iter()
                    .map(|d| d.kind.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                configured: want.join(","),
            });
        }
    }
    let saved_state = |i: usize| saved.map(|s| (&s[i], &s[i].transport.device));
    let mut out = Vec::new();
    for d in &config.disks {
        let cfg = block::BlockConfig {
            layers: d.layers.clone(),
            top: d.top.clone(),
            read_only: d.read_only,
            id: d.id.clone().unwrap_or_default(),
        };
        let i = out.len();
        let (dev, source_of) = match saved_state(i) {
            Some((snap, VirtioDeviceState::Block(st))) => {
                let dev =
                    block::Block::restore(cfg, st).map_err(|e| restore_err("blk")(Box::new(e)))?;
                (dev, Some(snap))
            }
            Some(_) => {
                return Err(restore_err("blk")(
                    "saved state is not a block device's".into(),
                ));
            }
            None => (
                block::Block::new(cfg).map_err(|e| Error::Device("blk", Box::new(e)))?,
                None,
            ),
        };
        let disk = dev.disk();
        let source = match source_of {
            Some(snap) => Source::Saved(Box::new(dev), snap),
            None => Source::Fresh(Box::new(dev)),
        };
        out.push(add_device(vm, devices, "blk", source, Some(disk))?);
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
        let source = match saved_state(out.len()) {
            Some((snap, VirtioDeviceState::Net(st))) => Source::Saved(
                Box::new(net::Net::restore(cfg, st).map_err(|e| restore_err("net")(Box::new(e)))?),
                snap,
            ),
            Some(_) => {
                return Err(restore_err("net")(
                    "saved state is not a net device's".into(),
                ));
            }
            None => Source::Fresh(Box::new(
                net::Net::new(cfg).map_err(|e| Error::Device("net", Box::new(e)))?,
            )),
        };
        out.push(add_device(vm, devices, "net", source, None)?);
    }
    if let Some(v) = &config.vsock {
        let cfg = vsock::VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.clone(),
        };
        let source = match saved_state(out.len()) {
            Some((snap, VirtioDeviceState::Vsock(st))) => Source::Saved(
                Box::new(
                    vsock::Vsock::restore(cfg, st)
                        .map_err(|e| restore_err("vsock")(Box::new(e)))?,
                ),
                snap,
            ),
            Some(_) => {
                return Err(restore_err("vsock")(
                    "saved state is not a vsock device's".into(),
                ));
            }
            None => Source::Fresh(Box::new(
                vsock::Vsock::new(cfg).map_err(|e| Error::Device("vsock", Box::new(e)))?,
            )),
        };
        out.push(add_device(vm, devices, "vsock", source, None)?);
    }
    if config.rng {
        let source = match saved_state(out.len()) {
            Some((snap, VirtioDeviceState::Rng(st))) => Source::Saved(
                Box::new(rng::Rng::restore((), st).map_err(|e| restore_err("rng")(Box::new(e)))?),
                snap,
            ),
            Some(_) => {
                return Err(restore_err("rng")(
                    "saved state is not an rng device's".into(),
                ));
            }
            None => Source::Fresh(Box::new(rng::Rng::new())),
        };
        out.push(add_device(vm, devices, "rng", source, None)?);
    }
    Ok(out)
}
