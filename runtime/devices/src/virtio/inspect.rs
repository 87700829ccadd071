//! What a running device looks like from outside, for diagnosing a guest that stopped
//! answering (the VMM's `inspect` control request, docs/vmm.md).
//!
//! The ring indices are read from guest memory as they are at that moment, next to the
//! device's own positions: together they tell a lost notification (the driver published
//! buffers the device never took: `avail_idx != next_avail` while the device is idle) from
//! a lost interrupt (the device published used buffers past `used_event`, the interrupt
//! status bit is still set, and the driver never came to acknowledge it).

use serde::Serialize;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One virtqueue: the device's positions and the rings' indices in guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueInspect {
    /// Queue size the driver set.
    pub size: u16,
    /// Whether the driver set QueueReady.
    pub ready: bool,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// The available ring's `idx` (what the driver has published), if readable.
    pub avail_idx: Option<u16>,
    /// The available ring's `flags`.
    pub avail_flags: Option<u16>,
    /// `used_event` (end of the available ring): with EVENT_IDX, the driver wants an interrupt
    /// once the used index passes it.
    pub used_event: Option<u16>,
    /// The used ring's `idx` (what the device has published), if readable.
    pub used_idx: Option<u16>,
    /// The used ring's `flags`.
    pub used_flags: Option<u16>,
    /// `avail_event` (end of the used ring): with EVENT_IDX, the device wants a notification
    /// once the available index passes it.
    pub avail_event: Option<u16>,
}

impl QueueInspect {
    /// Read `queue`'s rings in `mem`. `live` are the device's positions when it is running
    /// (the transport's copy of the queue is stale then).
    pub(crate) fn read(
        queue: &Queue,
        live: Option<&virtio_queue::QueueState>,
        mem: &GuestMemoryMmap,
    ) -> Self {
        let s = live.copied().unwrap_or_else(|| queue.state());
        let size = u64::from(s.size);
        let at = |base: u64, off: u64| -> Option<u16> {
            if !s.ready {
                return None;
            }
            let addr = GuestAddress(base.checked_add(off)?);
            mem.read_obj::<u16>(addr).ok().map(u16::from_le)
        };
        QueueInspect {
            size: s.size,
            ready: s.ready,
            next_avail: s.next_avail,
            next_used: s.next_used,
            avail_flags: at(s.avail_ring, 0),
            avail_idx: at(s.avail_ring, 2),
            used_event: at(s.avail_ring, 4 + 2 * size),
            used_flags: at(s.used_ring, 0),
            used_idx: at(s.used_ring, 2),
            avail_event: at(s.used_ring, 4 + 8 * size),
        }
    }
}

/// One vsock connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockConnInspect {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    /// `connecting`, `established` or `closing`.
    pub state: &'static str,
    /// Milliseconds since the state last changed.
    pub state_ms: u64,
    /// The guest's receive buffer, as it last told us.
    pub peer_buf_alloc: u32,
    /// Bytes the guest had consumed, as it last told us.
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    pub tx_cnt: u32,
    /// Payload bytes forwarded from the guest to the host.
    pub fwd_cnt: u32,
    /// Bytes the guest can still take.
    pub peer_credit: u32,
    /// Bytes waiting for the host stream.
    pub to_host: usize,
    /// Bytes read from the host, waiting for guest rx buffers or credit.
    pub to_guest: usize,
    /// The host closed its side.
    pub host_eof: bool,
    /// The host stream hung up.
    pub hup: bool,
    /// The guest said it sends no more.
    pub peer_shut_send: bool,
    /// The guest said it receives no more.
    pub peer_shut_rcv: bool,
    /// The epoll interest bits of the host stream.
    pub interest: u32,
}

/// The vsock device's connection table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockInspect {
    /// Control packets waiting for guest rx buffers.
    pub backlog: usize,
    /// Host connections that have not sent their `CONNECT` line yet.
    pub pending_host: usize,
    /// Whether the device gave up on the guest's queues (until a reset).
    pub failed: bool,
    /// The connections.
    pub conns: Vec<VsockConnInspect>,
}

/// Device-specific state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceInspect {
    /// Nothing beyond the transport and its queues.
    #[default]
    Plain,
    /// A vsock device's connections.
    Vsock(VsockInspect),
}

/// A transport, its queues and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransportInspect {
    /// The virtio device type.
    pub device_type: u32,
    /// The device status register (DEVICE_NEEDS_RESET included).
    pub status: u32,
    /// Whether the device processes its queues.
    pub activated: bool,
    /// Whether the driver accepted VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// The InterruptStatus register: bits raised and not acknowledged by the driver.
    pub interrupt_status: u32,
    /// The queues, in order.
    pub queues: Vec<QueueInspect>,
    /// The device's own state.
    pub device: DeviceInspect,
}
