//! The virtio-mmio transport, version 2 (modern), a 0x1000-byte window on the MMIO bus.
//!
//! Every register access comes from the guest and is untrusted: unknown offsets, odd widths and
//! out-of-order status transitions are logged and ignored, never a panic.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::inspect::{QueueInspect, TransportInspect};
use super::persist::{QueueRestoreError, QueueStateData, VirtioDeviceState};
use super::{ActivateContext, ActivateError, IrqTrigger, VirtioDevice, features, status};
use crate::Interrupt;
use crate::bus::BusDevice;
use crate::persist::Persist;

/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor id reported to the guest ("SPCC" would be cute, but drivers only compare it).
const VENDOR_ID: u32 = 0x5350_4343;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    irq: IrqTrigger,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

/// Why a transport could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue event could not be created.
    #[error("failed to create queue event")]
    EventFd(#[source] std::io::Error),
    /// The device offered a queue size virtio-queue refuses.
    #[error("device offers an invalid queue")]
    Queue(#[source] virtio_queue::Error),
    /// The saved state is for another kind of device.
    #[error("saved state is for device type {saved}, the device is type {device}")]
    DeviceType {
        /// In the state.
        saved: u32,
        /// Of the device handed to restore.
        device: u32,
    },
    /// The saved state has another number of queues than the device.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// In the state.
        saved: usize,
        /// Of the device.
        device: usize,
    },
    /// A saved queue is invalid.
    #[error("saved queue {index} is invalid")]
    RestoreQueue {
        /// Which queue.
        index: usize,
        /// Why.
        #[source]
        source: QueueRestoreError,
    },
    /// The saved status has unknown bits or skips a step of the init sequence.
    #[error("saved device status {0:#x} is not a reachable status")]
    Status(u32),
    /// The saved features were never offered by the device.
    #[error("saved features {saved:#x} are not a subset of the offered {offered:#x}")]
    Features {
        /// In the state.
        saved: u64,
        /// Offered by the device.
        offered: u64,
    },
    /// A saved running device has queues that do not fit guest memory.
    #[error("saved queue {0} does not fit guest memory")]
    QueueMemory(usize),
    /// Re-activating the restored device failed.
    #[error("failed to re-activate the restored device")]
    Activate(#[source] ActivateError),
}

impl MmioTransport {
    /// Put `device` behind virtio-mmio registers; `irq` is the device's interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(MmioError::Queue)?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(MmioTransport {
            mem,
            device,
            irq: IrqTrigger::new(irq),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            queue_evts,
            config_generation: 0,
            activated: false,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport, mutably (for pause/resume around snapshots).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Whether the driver finished initialization and the device is processing queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The current device status register, including DEVICE_NEEDS_RESET.
    pub fn device_status(&self) -> u32 {
        if self.irq.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Stop the device's worker (before a snapshot); the VMM calls this with vCPUs paused.
    pub fn pause(&mut self) {
        if self.activated {
            self.device.pause();
        }
    }

    /// Restart the device's worker after [`MmioTransport::pause`].
    pub fn resume(&mut self) -> Result<(), ActivateError> {
        if self.activated {
            self.device.resume()
        } else {
            Ok(())
        }
    }

    /// After a restore, once the vCPUs and the interrupt controllers have their state back:
    /// raise the device's interrupt once. Whatever a restored device signalled while the
    /// controllers were still being restored (its worker starts with the transport) was lost,
    /// and a driver that never sees that interrupt never reads its used ring again (with
    /// event-idx the device then never signals again): a restored guest stalled. A spurious
    /// used-ring interrupt is harmless: the driver finds nothing new.
    pub fn signal_after_restore(&self) {
        if self.activated {
            self.irq.signal_used_queue();
        }
    }

    /// The registers, the rings' indices in guest memory and the device's own state, for
    /// diagnosing a guest that stopped answering (see [`super::inspect`]).
    pub fn inspect(&self) -> TransportInspect {
        let live = if self.activated {
            self.device.queue_states()
        } else {
            None
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let l = live.as_ref().and_then(|l| l.get(i));
                QueueInspect::read(q, l, &self.mem)
            })
            .collect();
        TransportInspect {
            device_type: self.device.device_type(),
            status: self.device_status(),
            activated: self.activated,
            event_idx: self.acked_features & (1 << features::VIRTIO_RING_F_EVENT_IDX) != 0,
            interrupt_status: self.irq.status(),
            queues,
            device: self.device.inspect(),
        }
    }

    /// By hand, for a stuck guest: raise the used-ring interrupt (`interrupt`) and/or signal
    /// every queue's notification event as if the driver had written QueueNotify (`queues`).
    /// Whether the guest recovers tells a lost interrupt from a lost notification. Both are
    /// harmless when nothing was lost: the driver and the device find nothing new.
    pub fn kick(&self, interrupt: bool, queues: bool) {
        if !self.activated {
            return;
        }
        if queues {
            for evt in &self.queue_evts {
                if let Err(e) = evt.write(1) {
                    tracing::error!("virtio-mmio: queue kick failed: {e}");
                }
            }
        }
        if interrupt {
            self.irq.signal_used_queue();
        }
    }

    /// In the child of a `fork(2)` of the VMM process: give up this transport without running
    /// any destructor. Its device's backends belong to the parent (dropping them would delete
    /// the parent's vsock socket file, kill the parent's passt, or join worker threads that do
    /// not exist in the child). Pause the device before forking; the child builds new devices
    /// with `Persist::restore`. The inherited descriptors stay open in the child.
    pub fn forget_after_fork(self) {
        std::mem::forget(self);
    }

    fn offered_features(&self) -> u64 {
        self.device.avail_features() | features::TRANSPORT
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let idx = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(idx)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_evts {
            // Drain stale notifications so a later activation does not see them.
            let _ = evt.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.irq.set_status(0);
        self.irq.set_needs_reset(false);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & !KNOWN_STATUS != 0 || value & status::DEVICE_NEEDS_RESET != 0 {
            tracing::warn!("virtio-mmio: driver wrote invalid status {value:#x}");
            return;
        }
        if value & old != old {
            tracing::warn!(
                "virtio-mmio: driver cleared status bits {old:#x} -> {value:#x} without reset"
            );
            return;
        }
        let new = value & !old;
        if new & status::FAILED != 0 {
            self.status |= status::FAILED;
        }
        let has = |bits: u32| (old | new) & bits == bits;
        if new & status::ACKNOWLEDGE != 0 {
            self.status |= status::ACKNOWLEDGE;
        }
        if new & status::DRIVER != 0 {
            if has(status::ACKNOWLEDGE) {
                self.status |= status::DRIVER;
            } else {
                tracing::warn!("virtio-mmio: DRIVER before ACKNOWLEDGE");
                return;
            }
        }
        if new & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            if !has(status::DRIVER) {
                tracing::warn!("virtio-mmio: FEATURES_OK before DRIVER");
                return;
            }
            if self.acked_features & !offered != 0 {
                tracing::warn!(
                    "virtio-mmio: driver accepted unoffered features {:#x}",
                    self.acked_features & !offered
                );
                return;
            }
            if self.acked_features & (1 << features::VIRTIO_F_VERSION_1) == 0 {
                tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
                return;
            }
            self.device.set_acked_features(self.acked_features);
            self.status |= status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 {
            if !has(status::FEATURES_OK) {
                tracing::warn!("virtio-mmio: DRIVER_OK before FEATURES_OK");
                return;
            }
            self.status |= status::DRIVER_OK;
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.activated || self.status & status::FAILED != 0 {
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                self.irq.fail_device(&format_args!(
                    "queue {i} is not ready or does not fit guest memory"
                ));
                return;
            }
        }
        match self.start_device() {
            Ok(()) => self.activated = true,
            Err(e) => self
                .irq
                .fail_device(&format_args!("activation failed: {e}")),
        }
    }

    fn start_device(&mut self) -> Result<(), ActivateError> {
        // Queue is not Clone; its state round-trip is exact and was validated when configured.
        let mut queues = Vec::with_capacity(self.queues.len());
        let event_idx = self.acked_features & (1 << features::VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &self.queues {
            let mut q = Queue::try_from(q.state()).map_err(|e| {
                ActivateError::Backend(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
            })?;
            q.set_event_idx(event_idx);
            queues.push(q);
        }
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            evts.push(e.try_clone().map_err(ActivateError::Worker)?);
        }
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: evts,
            irq: self.irq.clone(),
        })
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_setup_allowed() {
            tracing::warn!("virtio-mmio: queue register {offset:#x} written outside queue setup");
            return;
        }
        let Some(q) = self.selected_queue() else {
            tracing::warn!("virtio-mmio: queue register written for a queue that does not exist");
            return;
        };
        if offset != reg::QUEUE_READY && q.ready() {
            tracing::warn!(
                "virtio-mmio: queue register {offset:#x} written while the queue is ready"
            );
            return;
        }
        match offset {
            reg::QUEUE_NUM => match u16::try_from(v) {
                Ok(size) => {
                    if let Err(e) = q.try_set_size(size) {
                        tracing::warn!("virtio-mmio: queue size {v}: {e}");
                    }
                }
                Err(_) => tracing::warn!("virtio-mmio: queue size {v} too large"),
            },
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = self.offered_features();
                match self.device_features_sel {
                    0 => (f & 0xffff_ffff) as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => {
                // A running device's queue sizes are fixed; report them while the queue exists.
                let idx = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
                self.queues.get(idx).map_or(0, |q| u32::from(q.max_size()))
            }
            reg::QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.device_status(),
            // No shared memory regions: length all-ones means "no such region".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
                    tracing::warn!("virtio-mmio: features written outside feature negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    _ => tracing::warn!(
                        "virtio-mmio: features written with selector {}",
                        self.driver_features_sel
                    ),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            reg::QUEUE_NOTIFY => {
                if !self.activated {
                    tracing::debug!("virtio-mmio: notify before DRIVER_OK ignored");
                    return;
                }
                // With VIRTIO_F_NOTIFICATION_DATA (not offered) the high half would carry more.
                let idx = (v & 0xffff) as usize;
                match self.queue_evts.get(idx) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            tracing::error!("virtio-mmio: queue notify failed: {e}");
                        }
                    }
                    None => {
                        tracing::warn!("virtio-mmio: notify of queue {idx} that does not exist")
                    }
                }
            }
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.set_status(v),
            reg::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            if offset < MMIO_WINDOW_SIZE {
                self.device.read_config(offset - reg::CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if offset < MMIO_WINDOW_SIZE {
                self.device.write_config(offset - reg::CONFIG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// The saved transport, including the device's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// Device type the state belongs to.
    pub device_type: u32,
    /// Status register (without DEVICE_NEEDS_RESET, which is `needs_reset`).
    pub status: u32,
    /// Device features selector.
    pub device_features_sel: u32,
    /// Driver features selector.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Queue selector.
    pub queue_sel: u32,
    /// Pending interrupt status bits.
    pub interrupt_status: u32,
    /// The device was failed and waits for a reset.
    pub needs_reset: bool,
    /// Config generation counter.
    pub config_generation: u32,
    /// Every queue, in order.
    pub queues: Vec<QueueStateData>,
    /// The device's own state; restore the device from it first, then the transport.
    pub device: VirtioDeviceState,
}

/// What [`MmioTransport::restore`] needs besides the state.
pub struct MmioTransportArgs {
    /// Guest memory (the restored mapping).
    pub mem: GuestMemoryMmap,
    /// The device, already restored from `state.device` with its new backends.
    pub device: Box<dyn VirtioDevice>,
    /// The device's interrupt line in the new VM.
    pub irq: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for MmioTransportArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransportArgs")
            .field("device_type", &self.device.device_type())
            .finish_non_exhaustive()
    }
}

fn reachable_status(s: u32) -> bool {
    if s & !KNOWN_STATUS != 0 || s & status::DEVICE_NEEDS_RESET != 0 {
        return false;
    }
    let requires = [
        (status::DRIVER, status::ACKNOWLEDGE),
        (status::FEATURES_OK, status::DRIVER),
        (status::DRIVER_OK, status::FEATURES_OK),
    ];
    requires
        .iter()
        .all(|&(bit, needs)| s & bit == 0 || s & needs == needs)
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = MmioError;

    fn save(&self) -> MmioTransportState {
        let live = if self.activated {
            self.device.queue_states()
        } else {
            None
        };
        let queues = match live {
            Some(states) if states.len() == self.queues.len() => {
                states.into_iter().map(QueueStateData::from).collect()
            }
            _ => self
                .queues
                .iter()
                .map(|q| QueueStateData::from(q.state()))
                .collect(),
        };
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.irq.status(),
            needs_reset: self.irq.needs_reset(),
            config_generation: self.config_generation,
            queues,
            device: self.device.save_state(),
        }
    }

    fn restore(args: MmioTransportArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let mut t = MmioTransport::new(args.mem, args.device, args.irq)?;
        let device_type = t.device.device_type();
        if state.device_type != device_type {
            return Err(MmioError::DeviceType {
                saved: state.device_type,
                device: device_type,
            });
        }
        let maxes = t.device.queue_max_sizes().to_vec();
        if state.queues.len() != maxes.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                device: maxes.len(),
            });
        }
        if !reachable_status(state.status) {
            return Err(MmioError::Status(state.status));
        }
        let offered = t.offered_features();
        if state.acked_features & !offered != 0 {
            return Err(MmioError::Features {
                saved: state.acked_features,
                offered,
            });
        }
        let mut queues = Vec::with_capacity(maxes.len());
        for (index, (qs, &max)) in state.queues.iter().zip(&maxes).enumerate() {
            queues.push(
                qs.to_queue(max)
                    .map_err(|source| MmioError::RestoreQueue { index, source })?,
            );
        }
        t.queues = queues;
        t.status = state.status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.acked_features = state.acked_features;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        t.irq.set_status(
            state.interrupt_status
                & (super::interrupt_status::USED_RING | super::interrupt_status::CONFIG_CHANGED),
        );
        t.irq.set_needs_reset(state.needs_reset);
        if state.status & status::FEATURES_OK != 0 {
            t.device.set_acked_features(state.acked_features);
        }
        if state.status & status::DRIVER_OK != 0
            && state.status & status::FAILED == 0
            && !state.needs_reset
        {
            for (i, q) in t.queues.iter().enumerate() {
                if !q.is_valid(&t.mem) {
                    return Err(MmioError::QueueMemory(i));
                }
            }
            t.start_device().map_err(MmioError::Activate)?;
            t.activated = true;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use vm_memory::Bytes;

    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_utils::{TestDriver, TestIrq, new_mem};

    fn driver() -> TestDriver {
        TestDriver::new(Box::new(Rng::new()))
    }

    #[test]
    fn identity_registers_read_as_virtio_mmio_v2() {
        let mut d = driver();
        assert_eq!(d.read_reg(reg::MAGIC), MAGIC);
        assert_eq!(d.read_reg(reg::VERSION), 2);
        assert_eq!(d.read_reg(reg::DEVICE_ID), crate::virtio::device_type::RNG);
        assert_eq!(d.device_features() >> 32, 1, "VERSION_1 offered");
    }

    #[test]
    fn full_init_sequence_activates_the_device() {
        let mut d = driver();
        d.init(16);
        assert!(d.transport.is_activated());
        assert_eq!(d.status() & status::DRIVER_OK, status::DRIVER_OK);
        d.write_reg(reg::STATUS, 0);
        assert!(!d.transport.is_activated());
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn inspect_shows_an_unnotified_buffer_and_a_queue_kick_makes_the_device_take_it() {
        let mut d = driver();
        d.init(16);
        let a = d.alloc(32);
        // A buffer published without QueueNotify: a lost notification.
        let head = d.add_chain(0, &[(a, 32, true)]);
        let i = d.transport.inspect();
        assert!(i.activated && i.event_idx);
        let q = &i.queues[0];
        assert_eq!(
            (q.size, q.avail_idx, q.next_avail, q.used_idx, q.next_used),
            (16, Some(1), 0, Some(0), 0)
        );
        assert_eq!(i.device, crate::virtio::inspect::DeviceInspect::Plain);
        d.transport.kick(false, true);
        assert_eq!(d.wait_used(0), (head, 32));
        let q = &d.transport.inspect().queues[0];
        assert_eq!(
            (q.avail_idx, q.next_avail, q.used_idx, q.next_used),
            (Some(1), 1, Some(1), 1)
        );
        // With the ring empty again the device asked to be notified about entry 1.
        assert_eq!(q.avail_event, Some(1));
    }

    #[test]
    fn an_interrupt_kick_raises_the_line_and_sets_the_used_ring_bit() {
        let mut d = driver();
        d.init(16);
        let before = d.irq.count();
        d.write_reg(reg::INTERRUPT_ACK, u32::MAX);
        d.transport.kick(true, false);
        assert_eq!(d.irq.count(), before + 1);
        assert_eq!(
            d.transport.inspect().interrupt_status,
            crate::virtio::interrupt_status::USED_RING
        );
        // Before activation nothing is kicked.
        let fresh = driver();
        fresh.transport.kick(true, true);
        assert_eq!(fresh.irq.count(), 0);
        assert!(!fresh.transport.inspect().activated);
    }

    #[test]
    fn features_ok_without_version_1_is_refused() {
        let mut d = driver();
        assert!(!d.negotiate(0));
        assert!(d.negotiate(1 << features::VIRTIO_F_VERSION_1));
    }

    #[test]
    fn features_ok_with_unoffered_bits_is_refused() {
        let mut d = driver();
        assert!(!d.negotiate((1 << features::VIRTIO_F_VERSION_1) | (1 << 7)));
    }

    #[test]
    fn driver_ok_before_features_ok_does_not_activate() {
        let mut d = driver();
        d.write_reg(reg::STATUS, status::ACKNOWLEDGE);
        d.write_reg(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!d.transport.is_activated());
    }

    #[test]
    fn driver_ok_with_unconfigured_queue_needs_reset() {
        let mut d = driver();
        assert!(d.negotiate(1 << features::VIRTIO_F_VERSION_1));
        d.write_reg(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(!d.transport.is_activated());
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_setup_after_driver_ok_is_ignored() {
        let mut d = driver();
        d.init(16);
        d.write_reg(reg::QUEUE_SEL, 0);
        d.write_reg(reg::QUEUE_NUM, 4);
        assert_eq!(d.read_reg(reg::QUEUE_NUM), 16);
    }

    #[test]
    fn odd_width_and_unaligned_accesses_are_ignored() {
        let mut d = driver();
        let mut b = [0xffu8; 2];
        d.transport.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        d.transport.write(reg::STATUS + 1, &[1, 0, 0, 0]);
        d.transport.write(reg::STATUS, &[1, 0]);
        assert_eq!(d.status(), 0);
        let mut big = [0u8; 8];
        d.transport.read(0x2000, &mut big);
        d.transport.write(u64::MAX, &[1, 2, 3, 4]);
    }

    #[test]
    fn event_idx_publishes_avail_event_after_draining_the_ring() {
        let mut d = driver();
        assert_ne!(
            d.device_features() & (1 << features::VIRTIO_RING_F_EVENT_IDX),
            0
        );
        d.init(16);
        for _ in 0..3 {
            let a = d.alloc(8);
            d.add_chain(0, &[(a, 8, true)]);
        }
        d.notify(0);
        for _ in 0..3 {
            d.wait_used(0);
        }
        // Join the worker so its last ring update is done, then look at avail_event.
        d.transport.pause();
        let q = d.queues[0].clone();
        let avail_event: u16 = d
            .mem
            .read_obj(vm_memory::GuestAddress(q.used + 4 + 8 * u64::from(q.size)))
            .unwrap();
        assert_eq!(avail_event, 3);
        assert!(d.transport.save().queues[0].event_idx_enabled);
    }

    #[test]
    fn device_without_event_idx_still_serves() {
        let mut d = driver();
        d.init_with(1 << features::VIRTIO_F_VERSION_1, 16);
        let a = d.alloc(8);
        let head = d.add_chain(0, &[(a, 8, true)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 8));
        d.transport.pause();
        assert!(!d.transport.save().queues[0].event_idx_enabled);
    }

    #[test]
    fn restore_refuses_state_of_another_device_type() {
        let d = driver();
        let mut state = d.transport.save();
        state.device_type = crate::virtio::device_type::BLOCK;
        let args = MmioTransportArgs {
            mem: new_mem(),
            device: Box::new(Rng::new()),
            irq: Arc::new(TestIrq::default()),
        };
        assert!(matches!(
            MmioTransport::restore(args, &state),
            Err(MmioError::DeviceType { .. })
        ));
    }

    #[test]
    fn restore_refuses_unreachable_status_and_bad_queues() {
        let mut d = driver();
        d.init(16);
        let good = d.transport.save();
        let args = || MmioTransportArgs {
            mem: new_mem(),
            device: Box::new(Rng::new()),
            irq: Arc::new(TestIrq::default()),
        };
        let mut s = good.clone();
        s.status = status::DRIVER_OK;
        assert!(matches!(
            MmioTransport::restore(args(), &s),
            Err(MmioError::Status(_))
        ));
        let mut s = good.clone();
        s.queues[0].size = 3;
        assert!(matches!(
            MmioTransport::restore(args(), &s),
            Err(MmioError::RestoreQueue { .. })
        ));
        let mut s = good.clone();
        s.queues[0].used_ring = 1 << 40;
        assert!(matches!(
            MmioTransport::restore(args(), &s),
            Err(MmioError::QueueMemory(0))
        ));
        let mut s = good.clone();
        s.queues.push(s.queues[0]);
        assert!(matches!(
            MmioTransport::restore(args(), &s),
            Err(MmioError::QueueCount { .. })
        ));
        let mut s = good;
        s.acked_features |= 1 << 3;
        assert!(matches!(
            MmioTransport::restore(args(), &s),
            Err(MmioError::Features { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_register_accesses_never_panic(
            ops in proptest::collection::vec((any::<bool>(), 0u64..0x1100, 0usize..9, any::<u32>()), 1..200)
        ) {
            let mut d = driver();
            for (write, offset, width, value) in ops {
                let bytes = value.to_le_bytes();
                let mut buf = vec![0u8; width];
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = bytes[i % 4];
                }
                if write {
                    d.transport.write(offset, &buf);
                } else {
                    d.transport.read(offset, &mut buf);
                }
            }
        }
    }
}
