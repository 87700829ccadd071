//! A pretend driver for unit tests: guest memory, rings laid out like a driver would, and the
//! register sequence of the virtio-mmio init, all through [`BusDevice`].

#![allow(clippy::cast_possible_truncation, dead_code)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::MmioTransport;
use super::{VirtioDevice, status};
use crate::Interrupt;
use crate::bus::BusDevice;

pub(crate) const MEM_SIZE: usize = 32 << 20;
const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x1_0000;
const DATA_BASE: u64 = 0x20_0000;
/// How long a test waits for a device before it fails: a generous bound for a 2-core machine
/// shared with other builds, not a performance threshold.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

pub(crate) const VIRTQ_DESC_F_NEXT: u16 = 1;
pub(crate) const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Counts interrupts and lets a test wait for the next one.
#[derive(Debug, Default)]
pub(crate) struct TestIrq {
    count: Mutex<u64>,
    cv: Condvar,
}

impl TestIrq {
    pub(crate) fn count(&self) -> u64 {
        *self.count.lock().unwrap()
    }

    /// Wait until the count exceeds `seen` or `timeout` passes; returns the count.
    pub(crate) fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.count.lock().unwrap();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |c| *c <= seen)
            .unwrap();
        *guard
    }
}

impl Interrupt for TestIrq {
    fn trigger(&self) -> std::io::Result<()> {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DrvQueue {
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

/// The guest side of one device.
#[derive(Debug)]
pub(crate) struct TestDriver {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) transport: MmioTransport,
    pub(crate) irq: Arc<TestIrq>,
    pub(crate) queues: Vec<DrvQueue>,
    next_data: u64,
}

pub(crate) fn new_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

impl TestDriver {
    pub(crate) fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = new_mem();
        let irq = Arc::new(TestIrq::default());
        let transport = MmioTransport::new(mem.clone(), device, irq.clone()).unwrap();
        TestDriver {
            mem,
            transport,
            irq,
            queues: Vec::new(),
            next_data: DATA_BASE,
        }
    }

    pub(crate) fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn write_reg(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    pub(crate) fn status(&mut self) -> u32 {
        self.read_reg(0x70)
    }

    pub(crate) fn device_features(&mut self) -> u64 {
        self.write_reg(0x14, 0);
        let lo = self.read_reg(0x10);
        self.write_reg(0x14, 1);
        let hi = self.read_reg(0x10);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACK, DRIVER, negotiate `features`, FEATURES_OK; true if the device kept it.
    pub(crate) fn negotiate(&mut self, features: u64) -> bool {
        self.write_reg(0x70, 0);
        self.write_reg(0x70, status::ACKNOWLEDGE);
        self.write_reg(0x70, status::ACKNOWLEDGE | status::DRIVER);
        self.write_reg(0x24, 0);
        self.write_reg(0x20, (features & 0xffff_ffff) as u32);
        self.write_reg(0x24, 1);
        self.write_reg(0x20, (features >> 32) as u32);
        self.write_reg(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.status() & status::FEATURES_OK != 0
    }

    /// The whole driver init: negotiate every offered feature, set up every queue (at most
    /// `qsize` entries), DRIVER_OK.
    pub(crate) fn init(&mut self, qsize: u16) {
        let f = self.device_features();
        self.init_with(f, qsize);
    }

    pub(crate) fn init_with(&mut self, features: u64, qsize: u16) {
        assert!(self.negotiate(features), "device refused FEATURES_OK");
        self.queues.clear();
        let mut i = 0u32;
        loop {
            self.write_reg(0x30, i);
            let max = self.read_reg(0x34);
            if max == 0 {
                break;
            }
            let size = u16::try_from(max.min(u32::from(qsize))).unwrap();
            let base = RING_BASE + u64::from(i) * RING_STRIDE;
            let q = DrvQueue {
                size,
                desc: base,
                avail: base + 0x4000,
                used: base + 0x8000,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            };
            // A driver hands the device zeroed rings.
            self.mem
                .write_slice(&vec![0u8; RING_STRIDE as usize], GuestAddress(base))
                .unwrap();
            self.write_reg(0x38, u32::from(size));
            for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
                self.write_reg(reg, (addr & 0xffff_ffff) as u32);
                self.write_reg(reg + 4, (addr >> 32) as u32);
            }
            self.write_reg(0x44, 1);
            self.queues.push(q);
            i += 1;
        }
        self.write_reg(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Space for a buffer in guest memory (zeroed).
    pub(crate) fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_data;
        self.next_data += (len as u64).div_ceil(64) * 64 + 64;
        assert!(
            self.next_data < MEM_SIZE as u64,
            "test ran out of guest memory"
        );
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(addr))
            .unwrap();
        addr
    }

    /// A buffer holding `data`.
    pub(crate) fn alloc_with(&mut self, data: &[u8]) -> u64 {
        let addr = self.alloc(data.len());
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        addr
    }

    pub(crate) fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Write raw descriptors (addr, len, flags, next) starting at the queue's next free slot
    /// and publish the first one as a chain head. For malformed chains.
    pub(crate) fn add_raw(&mut self, qi: usize, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let q = &mut self.queues[qi];
        let head = q.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (u64::from(head) + i as u64) % u64::from(q.size);
            let at = q.desc + slot * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        q.next_desc = ((usize::from(head) + descs.len()) % usize::from(q.size)) as u16;
        self.publish(qi, head);
        head
    }

    /// Publish a well-formed chain of (addr, len, device_writable) buffers.
    pub(crate) fn add_chain(&mut self, qi: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.queues[qi].size;
        let head = self.queues[qi].next_desc;
        let descs: Vec<(u64, u32, u16, u16)> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == bufs.len();
                let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                let next = ((usize::from(head) + i + 1) % usize::from(size)) as u16;
                (addr, len, flags, next)
            })
            .collect();
        self.add_raw(qi, &descs)
    }

    fn publish(&mut self, qi: usize, head: u16) {
        let q = &mut self.queues[qi];
        let slot = u64::from(q.avail_idx % q.size);
        self.mem
            .write_obj(head, GuestAddress(q.avail + 4 + slot * 2))
            .unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(q.avail_idx, GuestAddress(q.avail + 2))
            .unwrap();
    }

    pub(crate) fn notify(&mut self, qi: usize) {
        self.write_reg(0x50, u32::try_from(qi).unwrap());
    }

    /// The next used element of queue `qi`, if the device returned one.
    pub(crate) fn try_used(&mut self, qi: usize) -> Option<(u16, u32)> {
        let q = &mut self.queues[qi];
        let idx: u16 = self.mem.read_obj(GuestAddress(q.used + 2)).unwrap();
        if idx == q.last_used {
            return None;
        }
        let slot = u64::from(q.last_used % q.size);
        let at = q.used + 4 + slot * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        q.last_used = q.last_used.wrapping_add(1);
        Some((u16::try_from(id).unwrap(), len))
    }

    /// Wait for the next used element of queue `qi`; fails the test after [`DEADLINE`].
    pub(crate) fn wait_used(&mut self, qi: usize) -> (u16, u32) {
        let start = Instant::now();
        loop {
            let seen = self.irq.count();
            if let Some(u) = self.try_used(qi) {
                return u;
            }
            // With EVENT_IDX: interrupt me for the next used buffer.
            let q = &self.queues[qi];
            let used_event = q.avail + 4 + 2 * u64::from(q.size);
            self.mem
                .write_obj(q.last_used, GuestAddress(used_event))
                .unwrap();
            if let Some(u) = self.try_used(qi) {
                return u;
            }
            let left = DEADLINE.saturating_sub(start.elapsed());
            assert!(
                !left.is_zero(),
                "device did not return a buffer on queue {qi}"
            );
            self.irq
                .wait_past(seen, left.min(Duration::from_millis(50)));
        }
    }

    /// Wait until the device reports DEVICE_NEEDS_RESET; fails the test after [`DEADLINE`].
    pub(crate) fn wait_needs_reset(&mut self) {
        let start = Instant::now();
        while self.status() & status::DEVICE_NEEDS_RESET == 0 {
            assert!(start.elapsed() < DEADLINE, "device never asked for a reset");
            let seen = self.irq.count();
            self.irq.wait_past(seen, Duration::from_millis(50));
        }
    }
}
