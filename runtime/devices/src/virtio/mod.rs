//! Virtio: the device trait, the MMIO transport, queue handling and the devices.

pub mod block;
pub(crate) mod chain;
pub mod inspect;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;
pub(crate) mod worker;

pub use worker::worker_panics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::Interrupt;
pub use persist::{QueueStateData, VirtioDeviceState};

/// Device type ids (virtio 1.2, section 5).
pub mod device_type {
    /// virtio-net.
    pub const NET: u32 = 1;
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
    /// virtio-rng (entropy).
    pub const RNG: u32 = 4;
    /// virtio-vsock.
    pub const VSOCK: u32 = 19;
}

/// Feature bits shared by every device.
pub mod features {
    /// Modern (non-legacy) device: the only kind this crate offers.
    pub const VIRTIO_F_VERSION_1: u32 = 32;
    /// `used_event` / `avail_event` notification suppression, offered for every device.
    pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
    /// The features the transport offers on top of every device's own.
    pub const TRANSPORT: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may process queues.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation finished.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits of the MMIO transport.
pub mod interrupt_status {
    /// A used buffer was added to a queue.
    pub const USED_RING: u32 = 1;
    /// The configuration space (or the device status) changed.
    pub const CONFIG_CHANGED: u32 = 2;
}

/// What a device shares with its transport at run time: the interrupt status register, the
/// needs-reset flag, and the VMM's interrupt line. Cloned into device worker threads.
#[derive(Clone)]
pub struct IrqTrigger {
    status: Arc<AtomicU32>,
    needs_reset: Arc<AtomicBool>,
    irq: Arc<dyn Interrupt>,
}

impl std::fmt::Debug for IrqTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqTrigger")
            .field("status", &self.status.load(Ordering::Relaxed))
            .field("needs_reset", &self.needs_reset.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl IrqTrigger {
    pub(crate) fn new(irq: Arc<dyn Interrupt>) -> Self {
        IrqTrigger {
            status: Arc::new(AtomicU32::new(0)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            irq,
        }
    }

    /// Tell the driver that used buffers were added.
    pub fn signal_used_queue(&self) {
        self.raise(interrupt_status::USED_RING);
    }

    /// Tell the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(interrupt_status::CONFIG_CHANGED);
    }

    /// The guest broke the protocol (bad descriptor chain, bad address, ...): stop trusting the
    /// device's queues until the driver resets it, and tell the driver.
    pub fn fail_device(&self, why: &dyn std::fmt::Display) {
        tracing::warn!("virtio device needs reset: {why}");
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    /// Whether the device was failed since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.trigger() {
            tracing::error!("failed to raise virtio interrupt: {e}");
        }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn set_status(&self, value: u32) {
        self.status.store(value, Ordering::SeqCst);
    }

    pub(crate) fn set_needs_reset(&self, value: bool) {
        self.needs_reset.store(value, Ordering::SeqCst);
    }
}

/// Everything a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them (validated against `mem`), in queue order.
    pub queues: Vec<Queue>,
    /// One event per queue, signalled by the transport when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// Interrupts and failure reporting.
    pub irq: IrqTrigger,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed to activate.
        got: usize,
    },
    /// The backend (file, socket, helper process) could not be set up.
    #[error("backend setup failed")]
    Backend(#[source] std::io::Error),
    /// The device worker thread could not be started.
    #[error("worker thread failed to start")]
    Worker(#[source] std::io::Error),
}

/// A virtio device behind a transport. Devices never see the VMM.
///
/// Queue processing happens in a worker thread per device (see `worker.rs`), woken through the
/// queue events, so a vCPU thread that notifies a queue never blocks on backend I/O.
pub trait VirtioDevice: Send {
    /// The virtio device type (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 is added by the transport).
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of the offered ones, checked by the transport).
    fn set_acked_features(&mut self, features: u64);
    /// Read from the device configuration space; out-of-range bytes are left untouched.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the device configuration space; most devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start processing queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stop processing (driver reset): stop the worker and drop the queues. The device can be
    /// activated again afterwards.
    fn reset(&mut self);
    /// Stop the worker without forgetting anything (for snapshots); `resume` restarts it.
    fn pause(&mut self);
    /// Restart the worker after `pause`.
    fn resume(&mut self) -> Result<(), ActivateError>;
    /// The live queue states (next_avail/next_used move while the device runs), if activated.
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>>;
    /// The device's own state for a snapshot.
    fn save_state(&self) -> VirtioDeviceState;
    /// What the device's backend holds beyond its queues (connections, buffers), for
    /// diagnosing a stuck guest.
    fn inspect(&self) -> inspect::DeviceInspect {
        inspect::DeviceInspect::Plain
    }
}

/// Copy `src` (the whole config space) into `data` at `offset`, ignoring what lies outside.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - offset);
    data[..n].copy_from_slice(&src[offset..offset + n]);
}
