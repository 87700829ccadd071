//! Serializable mirrors of transport-level virtio state.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::block::BlockState;
use super::net::NetState;
use super::rng::RngState;
use super::vsock::VsockState;

/// A queue's state as plain data. Untrusted: turn it into a queue with [`QueueStateData::to_queue`],
/// which validates it (virtio-queue's `TryFrom<QueueState>`) against the device's maximum size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStateData {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
}

/// Why a saved queue was refused.
#[derive(Debug, thiserror::Error)]
pub enum QueueRestoreError {
    /// The saved maximum size differs from what the device offers.
    #[error("saved queue max size {saved} differs from the device's {device}")]
    MaxSize {
        /// In the state.
        saved: u16,
        /// Offered by the device.
        device: u16,
    },
    /// virtio-queue refused the state (size not a power of two, misaligned rings, ...).
    #[error("invalid queue state")]
    Invalid(#[source] virtio_queue::Error),
}

impl From<QueueState> for QueueStateData {
    fn from(s: QueueState) -> Self {
        QueueStateData {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueStateData {
    /// Validate and build the queue for a device whose queue has `device_max` entries at most.
    pub fn to_queue(&self, device_max: u16) -> Result<Queue, QueueRestoreError> {
        if self.max_size != device_max {
            return Err(QueueRestoreError::MaxSize {
                saved: self.max_size,
                device: device_max,
            });
        }
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(QueueRestoreError::Invalid)
    }
}

/// The device-specific part of a virtio device's snapshot, one variant per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// virtio-rng.
    Rng(RngState),
    /// virtio-blk.
    Block(BlockState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-net.
    Net(NetState),
}
