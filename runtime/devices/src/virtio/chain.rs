//! Validated descriptor chains.
//!
//! `virtio_queue::DescriptorChain` walks the descriptor table with loop protection but ends the
//! walk silently when a descriptor cannot be read, an index is out of range or the chain loops.
//! [`Chain::parse`] turns each of those into an error (the last descriptor still says NEXT), and
//! adds the checks a device needs before touching memory: every buffer inside guest memory, the
//! readable part before the writable part, and a bound on the total size.

use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::IrqTrigger;

/// Why a descriptor chain was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The available ring pointed at nothing usable.
    #[error("descriptor chain is empty")]
    Empty,
    /// The walk ended on a descriptor that still has NEXT: a loop, an out-of-range next index,
    /// an unreadable descriptor or a bad indirect table.
    #[error("descriptor chain is malformed (loop, bad next index or bad indirect table)")]
    Malformed,
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    BadAddress {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    WrongOrder,
    /// The chain is larger than the device accepts.
    #[error("descriptor chain carries {0} bytes, more than the device accepts")]
    TooLarge(u64),
    /// The chain lacks a part the request needs (a header, a status byte, ...).
    #[error("descriptor chain too short for the request: {0}")]
    TooShort(&'static str),
    /// Guest memory access failed even though the range was checked (memory changed under us).
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The queue's rings are corrupt (e.g. the available index ran ahead by more than the size).
    #[error("queue rings are corrupt")]
    Queue(#[source] virtio_queue::Error),
}

/// Take the next available chain from `queue` and validate it; `Ok(None)` if the ring is empty.
pub(crate) fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    max_bytes: u64,
) -> Result<Option<Chain>, ChainError> {
    loop {
        let next = {
            let mut iter = queue.iter(mem).map_err(ChainError::Queue)?;
            iter.next()
        };
        if let Some(dc) = next {
            return Chain::parse(dc, mem, max_bytes).map(Some);
        }
        // The ring is empty: ask the driver to notify us about the next buffer (with EVENT_IDX
        // this publishes avail_event = next_avail) and look again, in case it added one while
        // notifications were off.
        if !queue.enable_notification(mem).map_err(ChainError::Queue)? {
            return Ok(None);
        }
    }
}

/// Return a chain to the driver and interrupt it if it asked for interrupts.
pub(crate) fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    irq: &IrqTrigger,
) -> Result<(), ChainError> {
    queue.add_used(mem, head, len).map_err(ChainError::Queue)?;
    if queue.needs_notification(mem).map_err(ChainError::Queue)? {
        irq.signal_used_queue();
    }
    Ok(())
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
}

/// A validated chain, split into its device-readable and device-writable buffers.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    pub(crate) head: u16,
    pub(crate) readable: Vec<Desc>,
    pub(crate) writable: Vec<Desc>,
}

impl Chain {
    /// Walk and validate `chain`; `max_bytes` bounds the sum of all buffer lengths.
    pub(crate) fn parse<M>(
        mut chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        max_bytes: u64,
    ) -> Result<Chain, ChainError>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let head = chain.head_index();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut total: u64 = 0;
        let mut last_has_next = false;
        let mut any = false;
        for desc in chain.by_ref() {
            any = true;
            last_has_next = desc.has_next();
            let len = desc.len();
            let addr = desc.addr();
            let access = if desc.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if len > 0 && !GuestMemory::check_range(mem, addr, len as usize, access) {
                return Err(ChainError::BadAddress { addr: addr.0, len });
            }
            total += u64::from(len);
            if total > max_bytes {
                return Err(ChainError::TooLarge(total));
            }
            let d = Desc { addr, len };
            if desc.is_write_only() {
                writable.push(d);
            } else if writable.is_empty() {
                readable.push(d);
            } else {
                return Err(ChainError::WrongOrder);
            }
        }
        if !any {
            return Err(ChainError::Empty);
        }
        if last_has_next {
            return Err(ChainError::Malformed);
        }
        Ok(Chain {
            head,
            readable,
            writable,
        })
    }

    pub(crate) fn writable_len(&self) -> u64 {
        self.writable.iter().map(|d| u64::from(d.len)).sum()
    }
}

/// Sequential reads over the readable buffers of a chain.
#[derive(Debug)]
pub(crate) struct ChainReader<'a> {
    mem: &'a GuestMemoryMmap,
    descs: &'a [Desc],
    idx: usize,
    off: u32,
}

impl<'a> ChainReader<'a> {
    pub(crate) fn new(mem: &'a GuestMemoryMmap, descs: &'a [Desc]) -> Self {
        ChainReader {
            mem,
            descs,
            idx: 0,
            off: 0,
        }
    }

    /// Bytes left to read.
    pub(crate) fn remaining(&self) -> usize {
        let rest: u64 = self.descs[self.idx.min(self.descs.len())..]
            .iter()
            .map(|d| u64::from(d.len))
            .sum();
        usize::try_from(rest - u64::from(self.off)).unwrap_or(usize::MAX)
    }

    /// Read as much of `buf` as the chain holds; returns the count.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        while done < buf.len() && self.idx < self.descs.len() {
            let d = self.descs[self.idx];
            let avail = (d.len - self.off) as usize;
            let n = avail.min(buf.len() - done);
            if n > 0 {
                let addr = GuestAddress(d.addr.0 + u64::from(self.off));
                self.mem
                    .read_slice(&mut buf[done..done + n], addr)
                    .map_err(ChainError::Memory)?;
            }
            done += n;
            // n <= avail <= u32::MAX
            self.off += u32::try_from(n).unwrap_or(u32::MAX);
            if self.off >= d.len {
                self.idx += 1;
                self.off = 0;
            }
        }
        Ok(done)
    }

    /// Fill all of `buf`, or fail with `what` as the missing part.
    pub(crate) fn read_exact(
        &mut self,
        buf: &mut [u8],
        what: &'static str,
    ) -> Result<(), ChainError> {
        if self.read(buf)? == buf.len() {
            Ok(())
        } else {
            Err(ChainError::TooShort(what))
        }
    }

    /// Read a plain-data header.
    pub(crate) fn read_obj<T: ByteValued + Default>(
        &mut self,
        what: &'static str,
    ) -> Result<T, ChainError> {
        let mut v = T::default();
        self.read_exact(v.as_mut_slice(), what)?;
        Ok(v)
    }
}

/// Sequential writes over the writable buffers of a chain.
#[derive(Debug)]
pub(crate) struct ChainWriter<'a> {
    mem: &'a GuestMemoryMmap,
    descs: &'a [Desc],
    idx: usize,
    off: u32,
    written: usize,
}

impl<'a> ChainWriter<'a> {
    pub(crate) fn new(mem: &'a GuestMemoryMmap, descs: &'a [Desc]) -> Self {
        ChainWriter {
            mem,
            descs,
            idx: 0,
            off: 0,
            written: 0,
        }
    }

    /// Bytes written so far (what goes into the used ring).
    pub(crate) fn written(&self) -> usize {
        self.written
    }

    /// Write as much of `buf` as fits; returns the count.
    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        while done < buf.len() && self.idx < self.descs.len() {
            let d = self.descs[self.idx];
            let avail = (d.len - self.off) as usize;
            let n = avail.min(buf.len() - done);
            if n > 0 {
                let addr = GuestAddress(d.addr.0 + u64::from(self.off));
                self.mem
                    .write_slice(&buf[done..done + n], addr)
                    .map_err(ChainError::Memory)?;
            }
            done += n;
            self.off += u32::try_from(n).unwrap_or(u32::MAX);
            if self.off >= d.len {
                self.idx += 1;
                self.off = 0;
            }
        }
        self.written += done;
        Ok(done)
    }

    /// Write all of `buf`, or fail with `what` as the part that did not fit.
    pub(crate) fn write_all(&mut self, buf: &[u8], what: &'static str) -> Result<(), ChainError> {
        if self.write(buf)? == buf.len() {
            Ok(())
        } else {
            Err(ChainError::TooShort(what))
        }
    }
}

/// Write one plain-data value at the very end of the writable part (a status byte): virtio-blk
/// puts the status in the last writable byte whatever the data length.
pub(crate) fn write_last_byte(
    mem: &GuestMemoryMmap,
    writable: &[Desc],
    value: u8,
) -> Result<(), ChainError> {
    let last = writable
        .iter()
        .rev()
        .find(|d| d.len > 0)
        .ok_or(ChainError::TooShort("status byte"))?;
    let addr = GuestAddress(last.addr.0 + u64::from(last.len) - 1);
    mem.write_obj(value, addr).map_err(ChainError::Memory)
}
