use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::{ID_LEN, SECTOR};
use crate::disk::LayeredDisk;
use crate::virtio::chain::{
    Chain, ChainError, ChainReader, ChainWriter, complete, pop_chain, write_last_byte,
};
use crate::virtio::worker::{EventHandler, epoll_add, lock};
use crate::virtio::{ActivateContext, ActivateError, IrqTrigger};

const QUEUE_TOKEN: u64 = 0;
/// Largest request accepted: well above Linux's default 1280 KiB max_sectors_kb.
const MAX_CHAIN_BYTES: u64 = 16 << 20;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct RequestHeader {
    type_: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding (4 + 4 + 8 bytes), any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding (8 + 4 + 4 bytes), any bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

#[derive(Debug)]
pub(super) struct BlockHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    evt: EventFd,
    irq: IrqTrigger,
    disk: Arc<Mutex<LayeredDisk>>,
    read_only: bool,
    id: [u8; ID_LEN],
    failed: bool,
    buf: Vec<u8>,
}

impl BlockHandler {
    pub(super) fn new(
        ctx: ActivateContext,
        disk: Arc<Mutex<LayeredDisk>>,
        read_only: bool,
        id: [u8; ID_LEN],
    ) -> Result<Self, ActivateError> {
        let got = ctx.queues.len();
        let (Ok([queue]), Ok([evt])) = (
            <[Queue; 1]>::try_from(ctx.queues),
            <[EventFd; 1]>::try_from(ctx.queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        Ok(BlockHandler {
            mem: ctx.mem,
            queue,
            evt,
            irq: ctx.irq,
            disk,
            read_only,
            id,
            failed: false,
            buf: Vec::new(),
        })
    }

    fn process(&mut self) -> Result<(), ChainError> {
        while let Some(chain) = pop_chain(&mut self.queue, &self.mem, MAX_CHAIN_BYTES)? {
            let (status, data_written) = self.request(&chain)?;
            write_last_byte(&self.mem, &chain.writable, status)?;
            let len = u32::try_from(data_written + 1).unwrap_or(u32::MAX);
            complete(&mut self.queue, &self.mem, chain.head, len, &self.irq)?;
        }
        Ok(())
    }

    /// Run one request. `Err` = the chain itself is malformed (the device fails); a request the
    /// disk cannot serve is a status byte, not an error.
    fn request(&mut self, chain: &Chain) -> Result<(u8, usize), ChainError> {
        if chain.writable_len() == 0 {
            return Err(ChainError::TooShort("status byte"));
        }
        let mut r = ChainReader::new(&self.mem, &chain.readable);
        let hdr: RequestHeader = r.read_obj("request header")?;
        // Data buffers are the writable part minus the status byte at its end.
        let data_out = usize::try_from(chain.writable_len() - 1).unwrap_or(usize::MAX);
        match hdr.type_ {
            VIRTIO_BLK_T_IN => {
                let Some(offset) = self.data_offset(hdr.sector, data_out) else {
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                };
                self.buf.resize(data_out, 0);
                if let Err(e) = lock(&self.disk).read_at(offset, &mut self.buf) {
                    tracing::warn!("virtio-blk: read failed: {e}");
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                let mut w = ChainWriter::new(&self.mem, &chain.writable);
                w.write_all(&self.buf, "read data")?;
                Ok((VIRTIO_BLK_S_OK, data_out))
            }
            VIRTIO_BLK_T_OUT => {
                let len = r.remaining();
                if self.read_only {
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                let Some(offset) = self.data_offset(hdr.sector, len) else {
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                };
                self.buf.resize(len, 0);
                r.read_exact(&mut self.buf, "write data")?;
                if let Err(e) = lock(&self.disk).write_at(offset, &self.buf) {
                    tracing::warn!("virtio-blk: write failed: {e}");
                    return Ok((VIRTIO_BLK_S_IOERR, 0));
                }
                Ok((VIRTIO_BLK_S_OK, 0))
            }
            VIRTIO_BLK_T_FLUSH => match lock(&self.disk).flush() {
                Ok(()) => Ok((VIRTIO_BLK_S_OK, 0)),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    Ok((VIRTIO_BLK_S_IOERR, 0))
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut w = ChainWriter::new(&self.mem, &chain.writable);
                let n = ID_LEN.min(data_out);
                w.write_all(&self.id[..n], "id")?;
                Ok((VIRTIO_BLK_S_OK, n))
            }
            VIRTIO_BLK_T_DISCARD if !self.read_only => {
                let mut status = VIRTIO_BLK_S_OK;
                while r.remaining() >= std::mem::size_of::<DiscardSegment>() {
                    let seg: DiscardSegment = r.read_obj("discard segment")?;
                    let len = u64::from(seg.num_sectors) * SECTOR;
                    let ok = seg
                        .sector
                        .checked_mul(SECTOR)
                        .filter(|o| o.checked_add(len).is_some());
                    let res = match ok {
                        Some(o) => lock(&self.disk).discard(o, len).map_err(|e| e.to_string()),
                        None => Err("sector overflows".into()),
                    };
                    if let Err(e) = res {
                        tracing::warn!("virtio-blk: discard failed: {e}");
                        status = VIRTIO_BLK_S_IOERR;
                    }
                }
                Ok((status, 0))
            }
            other => {
                tracing::debug!("virtio-blk: unsupported request type {other}");
                Ok((VIRTIO_BLK_S_UNSUPP, 0))
            }
        }
    }

    /// Byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors and fits.
    fn data_offset(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR) {
            return None;
        }
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (end <= lock(&self.disk).size()).then_some(offset)
    }
}

impl EventHandler for BlockHandler {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        epoll_add(epoll, self.evt.as_raw_fd(), EventSet::IN, QUEUE_TOKEN)?;
        Ok(())
    }

    fn kick(&mut self, epoll: &Epoll) {
        self.handle(epoll, QUEUE_TOKEN, EventSet::IN);
    }

    fn handle(&mut self, _epoll: &Epoll, token: u64, _events: EventSet) {
        if token != QUEUE_TOKEN {
            return;
        }
        let _ = self.evt.read();
        if self.failed {
            return;
        }
        if let Err(e) = self.process() {
            self.failed = true;
            self.irq.fail_device(&format_args!("virtio-blk: {e}"));
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.queue.state()]
    }
}
