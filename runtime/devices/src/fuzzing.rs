//! Entry points that feed untrusted bytes to the devices, shared by the cargo-fuzz targets in
//! `runtime/devices/fuzz/` and the property tests below. Not part of the device API.
//!
//! Each entry point panics only if a device did (a worker thread panicking is counted by
//! [`crate::virtio::worker_panics`] and re-raised here), which is what a fuzzer looks for.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::Interrupt;
use crate::bus::BusDevice;
use crate::virtio::block::{Block, BlockConfig};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::{Net, NetBackend, NetConfig};
use crate::virtio::rng::Rng;
use crate::virtio::vsock::{Vsock, VsockConfig};
use crate::virtio::{VirtioDevice, status, worker_panics};

const MEM_SIZE: usize = 1 << 20;
const RINGS: u64 = 0;
const RING_STRIDE: u64 = 0x1000;
const QUEUE_SIZE: u32 = 16;

/// Which device a queue fuzz case drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// virtio-rng.
    Rng,
    /// virtio-blk over a 64 KiB raw base and a fresh diff.
    Block,
    /// virtio-vsock with a host socket in the temp directory.
    Vsock,
    /// virtio-net with a socketpair backend.
    Net,
}

#[derive(Debug)]
struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A scratch directory removed on drop (no dev-dependency in the library).
#[derive(Debug)]
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        // tmpfs when there is one: creating a diff syncs it, which costs real I/O on a disk.
        let shm = std::path::Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let p = root.join(format!(
            "specc-devices-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("creating a scratch directory");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_workers(before: usize) {
    assert_eq!(worker_panics(), before, "a device worker thread panicked");
}

/// Treat `data` as a diff layer file pulled from an untrusted artifact: open it, and if it is
/// accepted, read every block through a disk stacked on it and write one.
pub fn diff_file(data: &[u8]) {
    diff_file_once(data);
    // Again with valid CRCs, so the checks behind them (offsets, sizes, flags) meet the input.
    let mut fixed = data.to_vec();
    if fixed.len() >= 60 {
        let blen = u64::from_le_bytes(fixed[32..40].try_into().unwrap_or([0; 8]));
        let end = usize::try_from(blen)
            .ok()
            .and_then(|b| b.checked_add(4096))
            .filter(|&e| e <= fixed.len());
        if let Some(end) = end {
            let crc = crc32fast::hash(&fixed[4096..end]);
            fixed[52..56].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32fast::hash(&fixed[..56]);
        fixed[56..60].copy_from_slice(&crc.to_le_bytes());
        diff_file_once(&fixed);
    }
}

fn diff_file_once(data: &[u8]) {
    let scratch = Scratch::new();
    let path = scratch.0.join("layer");
    std::fs::write(&path, data).expect("writing the fuzz layer");
    let Ok(layer) = crate::disk::DiffFile::open(&path, false) else {
        return;
    };
    // Bound the work per input: a header may claim a huge (sparse) disk.
    let blocks = layer.blocks().min(256);
    drop(layer);
    let top = scratch.0.join("top");
    let Ok(mut disk) = crate::disk::LayeredDisk::open(std::slice::from_ref(&path), &top) else {
        return;
    };
    let mut buf = vec![0u8; 4096];
    for i in 0..blocks {
        let _ = disk.read_at(i * 4096, &mut buf);
    }
    let _ = disk.write_at(100, &[1, 2, 3]);
    let _ = disk.flush();
}

/// Interpret `data` as register accesses (7 bytes each: kind, offset, value) on a transport.
pub fn mmio_ops(data: &[u8]) {
    let before = worker_panics();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let mut t = MmioTransport::new(mem, Box::new(Rng::new()), Arc::new(NoIrq)).expect("transport");
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) & 0x1fff;
        let value = [op[3], op[4], op[5], op[6]];
        let width = [1usize, 2, 4, 8][usize::from(op[0] >> 1 & 3)];
        if op[0] & 1 == 0 {
            let mut buf = vec![0u8; width];
            t.read(offset, &mut buf);
        } else {
            let buf: Vec<u8> = value.iter().copied().cycle().take(width).collect();
            t.write(offset, &buf);
        }
    }
    t.pause();
    drop(t);
    check_workers(before);
}

fn device(target: Target, scratch: &Scratch) -> (Box<dyn VirtioDevice>, Option<UnixStream>) {
    match target {
        Target::Rng => (Box::new(Rng::new()), None),
        Target::Block => {
            let base = scratch.0.join("base");
            std::fs::write(&base, vec![0x5au8; 64 * 1024]).expect("base image");
            let cfg = BlockConfig::new(vec![base], scratch.0.join("top"));
            (Box::new(Block::new(cfg).expect("block device")), None)
        }
        Target::Vsock => {
            let cfg = VsockConfig {
                guest_cid: 3,
                uds_path: scratch.0.join("v.sock"),
            };
            (Box::new(Vsock::new(cfg).expect("vsock device")), None)
        }
        Target::Net => {
            let (dev, host) = UnixStream::pair().expect("socketpair");
            let cfg = NetConfig {
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
                backend: NetBackend::Stream(dev),
            };
            (Box::new(Net::new(cfg).expect("net device")), Some(host))
        }
    }
}

fn reg(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Bring a device up like a driver, then let `data` be the guest's memory: the first
/// 16 KiB are the rings and descriptor tables of up to four queues (queue q at q * 4 KiB:
/// descriptors, available ring at +1 KiB, used ring at +2 KiB), the rest is buffer space.
/// Every queue is notified, then the device is paused (its worker finishes the batch).
pub fn queues(target: Target, data: &[u8]) {
    run_queues(target, data);
}

/// Like [`queues`], but `data` is XORed onto [`seed`]`(target)`: an empty or all-zero input is a
/// valid driver's memory, and a mutation is a small corruption of it. The fuzz targets use this
/// so that the fuzzer starts deep inside request parsing instead of at the ring headers.
pub fn queues_over_seed(target: Target, data: &[u8]) {
    let mut mem = seed(target);
    if mem.len() < data.len() {
        mem.resize(data.len().min(MEM_SIZE), 0);
    }
    for (m, d) in mem.iter_mut().zip(data) {
        *m ^= d;
    }
    run_queues(target, &mem);
}

fn put_desc(m: &mut [u8], q: usize, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
    let at = q * 0x1000 + i * 16;
    m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
    m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
    m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
    m[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
}

fn publish(m: &mut [u8], q: usize, heads: &[u16]) {
    let av = q * 0x1000 + 0x400;
    let n = u16::try_from(heads.len()).unwrap_or(0);
    m[av + 2..av + 4].copy_from_slice(&n.to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        m[av + 4 + i * 2..av + 6 + i * 2].copy_from_slice(&h.to_le_bytes());
    }
}

fn vsock_header(m: &mut [u8], at: usize, op: u16, len: u32) {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(&3u64.to_le_bytes()); // src cid: the guest
    h.extend_from_slice(&2u64.to_le_bytes()); // dst cid: the host
    h.extend_from_slice(&1000u32.to_le_bytes());
    h.extend_from_slice(&5000u32.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // stream
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&65536u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    m[at..at + 44].copy_from_slice(&h);
}

/// The memory of a well-behaved driver with requests posted on every queue of `target`.
pub fn seed(target: Target) -> Vec<u8> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let mut m = vec![0u8; 0x8000];
    match target {
        Target::Rng => {
            put_desc(&mut m, 0, 0, 0x4000, 64, WRITE, 0);
            publish(&mut m, 0, &[0]);
        }
        Target::Block => {
            // IN of sector 0, then OUT of sector 8.
            m[0x4000..0x4004].copy_from_slice(&0u32.to_le_bytes());
            put_desc(&mut m, 0, 0, 0x4000, 16, NEXT, 1);
            put_desc(&mut m, 0, 1, 0x4100, 512, WRITE | NEXT, 2);
            put_desc(&mut m, 0, 2, 0x4400, 1, WRITE, 0);
            m[0x4500..0x4504].copy_from_slice(&1u32.to_le_bytes());
            m[0x4508..0x4510].copy_from_slice(&8u64.to_le_bytes());
            put_desc(&mut m, 0, 3, 0x4500, 16, NEXT, 4);
            put_desc(&mut m, 0, 4, 0x4600, 512, NEXT, 5);
            put_desc(&mut m, 0, 5, 0x4900, 1, WRITE, 0);
            publish(&mut m, 0, &[0, 3]);
        }
        Target::Vsock => {
            put_desc(&mut m, 0, 0, 0x5000, 44 + 4096, WRITE, 0);
            publish(&mut m, 0, &[0]);
            // A REQUEST to a host port nobody listens on, and an RW packet.
            vsock_header(&mut m, 0x4000, 1, 0);
            put_desc(&mut m, 1, 0, 0x4000, 44, 0, 0);
            vsock_header(&mut m, 0x4080, 5, 4);
            put_desc(&mut m, 1, 1, 0x4080, 44, NEXT, 2);
            put_desc(&mut m, 1, 2, 0x4100, 4, 0, 0);
            publish(&mut m, 1, &[0, 1]);
            put_desc(&mut m, 2, 0, 0x4200, 4, WRITE, 0);
            publish(&mut m, 2, &[0]);
        }
        Target::Net => {
            put_desc(&mut m, 0, 0, 0x5000, 2048, WRITE, 0);
            publish(&mut m, 0, &[0]);
            put_desc(&mut m, 1, 0, 0x4000, 12, NEXT, 1);
            put_desc(&mut m, 1, 1, 0x4100, 60, 0, 0);
            publish(&mut m, 1, &[0]);
        }
    }
    m
}

/// Returns the used index of every queue after the run.
fn run_queues(target: Target, data: &[u8]) -> Vec<u16> {
    let before = worker_panics();
    let scratch = Scratch::new();
    let (dev, _peer) = device(target, &scratch);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let mut t = MmioTransport::new(mem.clone(), dev, Arc::new(NoIrq)).expect("transport");
    let nq = t.device().queue_max_sizes().len();
    reg(&mut t, 0x70, status::ACKNOWLEDGE);
    reg(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..2u32 {
        reg(&mut t, 0x14, sel);
        let f = read_reg(&mut t, 0x10);
        reg(&mut t, 0x24, sel);
        reg(&mut t, 0x20, f);
    }
    reg(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for q in 0..nq {
        let q32 = u32::try_from(q).unwrap_or(0);
        let base = RINGS + u64::from(q32) * RING_STRIDE;
        reg(&mut t, 0x30, q32);
        reg(&mut t, 0x38, QUEUE_SIZE);
        reg(&mut t, 0x80, u32::try_from(base).unwrap_or(0));
        reg(&mut t, 0x90, u32::try_from(base + 0x400).unwrap_or(0));
        reg(&mut t, 0xa0, u32::try_from(base + 0x800).unwrap_or(0));
        reg(&mut t, 0x44, 1);
    }
    reg(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("fuzz bytes into guest memory");
    for q in 0..nq {
        reg(&mut t, 0x50, u32::try_from(q).unwrap_or(0));
    }
    t.pause();
    let used = (0..nq)
        .map(|q| {
            let at = RINGS + (q as u64) * RING_STRIDE + 0x800 + 2;
            mem.read_obj::<u16>(GuestAddress(at)).unwrap_or(0)
        })
        .collect();
    // Resume and reset exercise the same state again, as a driver might.
    let _ = t.resume();
    reg(&mut t, 0x70, 0);
    drop(t);
    check_workers(before);
    used
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Rings whose descriptors point into guest memory often enough to reach the devices'
    /// request parsing: descriptor addresses are drawn from the buffer area.
    fn guest_memory() -> impl Strategy<Value = Vec<u8>> {
        let desc = (0x4000u64..0x8000, 0u32..0x3000, 0u16..8, 0u16..20);
        (
            proptest::collection::vec(desc, 16),
            proptest::collection::vec(any::<u16>(), 18),
            proptest::collection::vec(any::<u8>(), 0x4000),
        )
            .prop_map(|(descs, avail, buffers)| {
                let mut m = vec![0u8; 0x8000];
                for q in 0..4usize {
                    let base = q * 0x1000;
                    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                        let at = base + i * 16;
                        m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                        m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                        m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
                        m[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
                    }
                    let av = base + 0x400;
                    // flags, idx (how many heads the driver published), then the ring.
                    m[av + 2..av + 4].copy_from_slice(&(avail[0] % 20).to_le_bytes());
                    for (i, h) in avail[2..].iter().enumerate() {
                        let at = av + 4 + i * 2;
                        m[at..at + 2].copy_from_slice(&(h % 18).to_le_bytes());
                    }
                }
                m[0x4000..].copy_from_slice(&buffers);
                m
            })
    }

    #[test]
    fn seeds_are_served_by_every_device() {
        assert_eq!(run_queues(Target::Rng, &seed(Target::Rng)), [1]);
        assert_eq!(run_queues(Target::Block, &seed(Target::Block)), [2]);
        // Vsock: both tx packets consumed, an RST for each on rx (only one rx buffer), and the
        // event queue untouched (no restore happened).
        assert_eq!(run_queues(Target::Vsock, &seed(Target::Vsock)), [1, 2, 0]);
        // Net: the frame went out; nothing came in.
        assert_eq!(run_queues(Target::Net, &seed(Target::Net)), [0, 1]);
    }

    fn valid_layer() -> Vec<u8> {
        let scratch = Scratch::new();
        let p = scratch.0.join("l");
        let mut d = crate::disk::DiffFile::create(&p, 64 * 4096).unwrap();
        d.write_blocks(2, &[7; 4096]).unwrap();
        d.flush().unwrap();
        drop(d);
        std::fs::read(&p).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn corrupted_diff_files_are_refused_or_read_safely(
            flips in proptest::collection::vec((0usize..8192, any::<u8>()), 0..8),
            cut in proptest::option::of(0usize..20000),
        ) {
            let mut data = valid_layer();
            for (at, x) in flips {
                data[at] ^= x;
            }
            if let Some(c) = cut {
                data.truncate(c.min(data.len()));
            }
            diff_file(&data);
        }

        #[test]
        fn random_register_sequences_never_panic(data in proptest::collection::vec(any::<u8>(), 0..700)) {
            mmio_ops(&data);
        }

        #[test]
        fn random_rings_never_panic_rng(mem in guest_memory()) {
            queues(Target::Rng, &mem);
        }

        #[test]
        fn random_rings_never_panic_block(mem in guest_memory()) {
            queues(Target::Block, &mem);
        }

        #[test]
        fn random_rings_never_panic_vsock(mem in guest_memory()) {
            queues(Target::Vsock, &mem);
        }

        #[test]
        fn random_rings_never_panic_net(mem in guest_memory()) {
            queues(Target::Net, &mem);
        }

        #[test]
        fn corrupted_seeds_never_panic(
            target in prop_oneof![Just(Target::Rng), Just(Target::Block), Just(Target::Vsock), Just(Target::Net)],
            flips in proptest::collection::vec((0usize..0x8000, any::<u8>()), 1..64),
        ) {
            let mut data = vec![0u8; 0x8000];
            for (at, x) in flips {
                data[at] ^= x;
            }
            queues_over_seed(target, &data);
        }

        #[test]
        fn random_bytes_as_guest_memory_never_panic(
            target in prop_oneof![Just(Target::Rng), Just(Target::Block), Just(Target::Vsock), Just(Target::Net)],
            data in proptest::collection::vec(any::<u8>(), 0..0x6000),
        ) {
            queues(target, &data);
        }
    }
}
