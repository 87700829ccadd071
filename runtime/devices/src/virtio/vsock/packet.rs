//! The virtio-vsock packet header (virtio 1.2, 5.10.6).

use vm_memory::ByteValued;

pub(super) const TYPE_STREAM: u16 = 1;

pub(super) const OP_REQUEST: u16 = 1;
pub(super) const OP_RESPONSE: u16 = 2;
pub(super) const OP_RST: u16 = 3;
pub(super) const OP_SHUTDOWN: u16 = 4;
pub(super) const OP_RW: u16 = 5;
pub(super) const OP_CREDIT_UPDATE: u16 = 6;
pub(super) const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more.
pub(super) const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub(super) const SHUTDOWN_SEND: u32 = 2;

/// Event id of VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
pub(super) const EVENT_TRANSPORT_RESET: u32 = 0;

/// Largest payload a packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub(super) const MAX_PAYLOAD: u32 = 64 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed)]
pub(super) struct Header {
    pub(super) src_cid: u64,
    pub(super) dst_cid: u64,
    pub(super) src_port: u32,
    pub(super) dst_port: u32,
    pub(super) len: u32,
    pub(super) type_: u16,
    pub(super) op: u16,
    pub(super) flags: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
}
// SAFETY: packed plain integers (44 bytes, no padding); any bit pattern is a valid header.
unsafe impl ByteValued for Header {}

impl Header {
    /// Convert between wire (little-endian) and host order; the same swap both ways.
    pub(super) fn swap_le(self) -> Header {
        Header {
            src_cid: u64::from_le(self.src_cid),
            dst_cid: u64::from_le(self.dst_cid),
            src_port: u32::from_le(self.src_port),
            dst_port: u32::from_le(self.dst_port),
            len: u32::from_le(self.len),
            type_: u16::from_le(self.type_),
            op: u16::from_le(self.op),
            flags: u32::from_le(self.flags),
            buf_alloc: u32::from_le(self.buf_alloc),
            fwd_cnt: u32::from_le(self.fwd_cnt),
        }
    }
}

pub(super) const HEADER_LEN: usize = std::mem::size_of::<Header>();

/// A packet the device will send to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Packet {
    pub(super) hdr: Header,
    pub(super) data: Vec<u8>,
}
