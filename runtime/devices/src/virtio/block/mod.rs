//! virtio-blk over the layered copy-on-write disk ([`crate::disk::LayeredDisk`]).

mod device;
mod event_handler;
mod persist;

pub use device::{Block, BlockConfig, BlockError, DiskHandle};
pub use persist::{BlockRestoreError, BlockState};

/// virtio-blk feature bits offered.
pub mod features {
    /// `seg_max` in config is valid.
    pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
    /// The device is read-only.
    pub const VIRTIO_BLK_F_RO: u32 = 5;
    /// FLUSH requests.
    pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
    /// Topology (physical block size) in config.
    pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
    /// DISCARD requests.
    pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use super::*;
    use crate::disk::LayeredDisk;
    use crate::persist::Persist;
    use crate::virtio::VirtioDeviceState;
    use crate::virtio::mmio::{MmioTransport, MmioTransportArgs};
    use crate::virtio::test_utils::TestDriver;

    const T_IN: u32 = 0;
    const T_OUT: u32 = 1;
    const T_FLUSH: u32 = 4;
    const T_GET_ID: u32 = 8;
    const T_DISCARD: u32 = 11;

    fn base_image(dir: &Path, size: usize) -> PathBuf {
        let p = dir.join("base.ext4");
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    /// One request through the queue; returns (status, used len, data read).
    fn request(
        d: &mut TestDriver,
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> (u8, u32, Vec<u8>) {
        let h = d.alloc_with(&header(t, sector));
        let status = d.alloc(1);
        d.mem
            .write_obj(0xffu8, vm_memory::GuestAddress(status))
            .unwrap();
        let mut bufs = vec![(h, 16, false)];
        if !out.is_empty() {
            let o = d.alloc_with(out);
            bufs.push((o, u32::try_from(out.len()).unwrap(), false));
        }
        let i = d.alloc(in_len as usize);
        if in_len > 0 {
            bufs.push((i, in_len, true));
        }
        bufs.push((status, 1, true));
        let head = d.add_chain(0, &bufs);
        d.notify(0);
        let (id, len) = d.wait_used(0);
        assert_eq!(id, head);
        (
            d.read_mem(status, 1)[0],
            len,
            d.read_mem(i, in_len as usize),
        )
    }

    fn driver(config: BlockConfig) -> TestDriver {
        let mut d = TestDriver::new(Box::new(Block::new(config).unwrap()));
        d.init(64);
        d
    }

    use vm_memory::Bytes;

    #[test]
    fn reads_writes_and_flush_go_through_the_layer_stack() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_image(dir.path(), 1 << 20);
        // A frozen middle layer that overrides block 1 (sectors 8..16).
        let mid = {
            let mut disk =
                LayeredDisk::open(std::slice::from_ref(&base), &dir.path().join("mid")).unwrap();
            disk.write_at(4096, &[0xee; 4096]).unwrap();
            disk.freeze(&dir.path().join("scratch")).unwrap()
        };
        let top = dir.path().join("top");
        let mut d = driver(BlockConfig::new(
            vec![base.clone(), mid.clone()],
            top.clone(),
        ));
        // Capacity in config space.
        let mut cap = [0u8; 8];
        crate::bus::BusDevice::read(&mut d.transport, 0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (1 << 20) / 512);

        let (s, len, data) = request(&mut d, T_IN, 0, &[], 4096 * 3);
        assert_eq!((s, len), (0, 4096 * 3 + 1));
        assert_eq!(data[0], 0);
        assert_eq!(data[4095], 7);
        assert!(data[4096..8192].iter().all(|&b| b == 0xee));
        assert_eq!(data[8192], 16);

        // A sector-sized write into the middle of a block from the middle layer.
        let (s, _, _) = request(&mut d, T_OUT, 9, &[0x11; 512], 0);
        assert_eq!(s, 0);
        let (s, _, data) = request(&mut d, T_IN, 8, &[], 1536);
        assert_eq!(s, 0);
        assert!(data[..512].iter().all(|&b| b == 0xee));
        assert!(data[512..1024].iter().all(|&b| b == 0x11));
        assert!(data[1024..].iter().all(|&b| b == 0xee));
        let (s, _, _) = request(&mut d, T_FLUSH, 0, &[], 0);
        assert_eq!(s, 0);

        // The write is in the top diff only, and durable.
        drop(d);
        let mut disk = LayeredDisk::open(&[base.clone(), mid.clone()], &top).unwrap();
        let mut b = [0u8; 512];
        disk.read_at(9 * 512, &mut b).unwrap();
        assert_eq!(b, [0x11; 512]);
        let mut lower = LayeredDisk::open(&[base, mid], &dir.path().join("other")).unwrap();
        lower.read_at(9 * 512, &mut b).unwrap();
        assert_eq!(b, [0xee; 512]);
    }

    #[test]
    fn get_id_read_only_and_bad_requests_answer_with_status() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_image(dir.path(), 64 * 1024);
        let mut cfg = BlockConfig::new(vec![base], dir.path().join("top"));
        cfg.read_only = true;
        cfg.id = "specc-root".into();
        let mut d = driver(cfg);
        assert_ne!(d.device_features() & (1 << features::VIRTIO_BLK_F_RO), 0);
        let (s, len, id) = request(&mut d, T_GET_ID, 0, &[], 20);
        assert_eq!((s, len), (0, 21));
        assert_eq!(&id[..10], b"specc-root");
        assert!(id[10..].iter().all(|&b| b == 0));
        // Writes to a read-only disk, reads past the end, odd lengths, unknown types.
        assert_eq!(request(&mut d, T_OUT, 0, &[1; 512], 0).0, 1);
        assert_eq!(request(&mut d, T_IN, 128, &[], 512).0, 1);
        assert_eq!(request(&mut d, T_IN, u64::MAX, &[], 512).0, 1);
        assert_eq!(request(&mut d, T_IN, 0, &[], 100).0, 1);
        assert_eq!(request(&mut d, 77, 0, &[], 0).0, 2);
        assert_eq!(request(&mut d, T_DISCARD, 0, &[0; 16], 0).0, 2);
        // The device still works after all that.
        assert_eq!(request(&mut d, T_IN, 0, &[], 512).0, 0);
    }

    #[test]
    fn discard_zeroes_whole_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_image(dir.path(), 64 * 1024);
        let mut d = driver(BlockConfig::new(vec![base], dir.path().join("top")));
        let mut seg = Vec::new();
        seg.extend_from_slice(&8u64.to_le_bytes());
        seg.extend_from_slice(&16u32.to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(request(&mut d, T_DISCARD, 0, &seg, 0).0, 0);
        let (_, _, data) = request(&mut d, T_IN, 0, &[], 4 * 4096);
        assert_eq!(data[4095], 7);
        assert!(data[4096..3 * 4096].iter().all(|&b| b == 0));
        assert_eq!(data[3 * 4096], 24);
    }

    #[test]
    fn request_without_status_byte_fails_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_image(dir.path(), 64 * 1024);
        let mut d = driver(BlockConfig::new(vec![base], dir.path().join("top")));
        let h = d.alloc_with(&header(T_IN, 0));
        d.add_chain(0, &[(h, 16, false)]);
        d.notify(0);
        d.wait_needs_reset();
    }

    #[test]
    fn short_header_fails_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_image(dir.path(), 64 * 1024);
        let mut d = driver(BlockConfig::new(vec![base], dir.path().join("top")));
        let h = d.alloc_with(&header(T_IN, 0));
        let s = d.alloc(1);
        d.add_chain(0, &[(h, 8, false), (s, 1, true)]);
        d.notify(0);
        d.wait_needs_reset();
    }

    #[test]
    fn block_state_round_trips_over_a_frozen_disk() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_image(dir.path(), 64 * 1024);
        let cfg = BlockConfig {
            layers: vec![base.clone()],
            top: dir.path().join("top"),
            read_only: false,
            id: "root".into(),
        };
        let block = Block::new(cfg.clone()).unwrap();
        let disk = block.disk();
        let mut d = TestDriver::new(Box::new(block));
        d.init(64);
        assert_eq!(request(&mut d, T_OUT, 0, &[0x42; 4096], 0).0, 0);
        d.transport.pause();
        let saved = d.transport.save();
        // Snapshot: freeze the diff; the restored VM continues in a fresh diff above it.
        let frozen = disk.freeze(&dir.path().join("after")).unwrap();
        let VirtioDeviceState::Block(bs) = &saved.device else {
            panic!("not a block state: {saved:?}");
        };
        let restore_cfg = BlockConfig {
            layers: vec![base.clone(), frozen],
            top: dir.path().join("restored-top"),
            ..cfg.clone()
        };
        let block = Block::restore(restore_cfg.clone(), bs).unwrap();
        let t = MmioTransport::restore(
            MmioTransportArgs {
                mem: d.mem.clone(),
                device: Box::new(block),
                irq: d.irq.clone(),
            },
            &saved,
        )
        .unwrap();
        assert_eq!(t.save(), saved);
        d.transport = t;
        let (s, _, data) = request(&mut d, T_IN, 0, &[], 4096);
        assert_eq!(s, 0);
        assert!(data.iter().all(|&b| b == 0x42));

        // A disk of another size is refused.
        let small = dir.path().join("small");
        std::fs::write(&small, [0u8; 4096]).unwrap();
        let bad = BlockConfig {
            layers: vec![small],
            top: dir.path().join("t2"),
            ..cfg
        };
        assert!(matches!(
            Block::restore(bad, bs),
            Err(BlockRestoreError::Capacity { .. })
        ));
    }

    /// Prints the throughput of 128 KiB requests through the queue (a figure, not a threshold).
    #[test]
    fn sequential_throughput_through_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let total: usize = 32 << 20;
        let base = dir.path().join("base");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(total as u64)
            .unwrap();
        let mut d = driver(BlockConfig::new(vec![base], dir.path().join("top")));
        let chunk: usize = 128 << 10;
        let data = d.alloc(chunk);
        let pattern: Vec<u8> = (0..chunk).map(|i| (i % 253) as u8).collect();
        d.mem
            .write_slice(&pattern, vm_memory::GuestAddress(data))
            .unwrap();
        let h = d.alloc(16);
        let st = d.alloc(1);
        let run = |d: &mut TestDriver, t: u32| {
            let start = Instant::now();
            for i in 0..total / chunk {
                let sector = (i * chunk / 512) as u64;
                d.mem
                    .write_slice(&header(t, sector), vm_memory::GuestAddress(h))
                    .unwrap();
                d.add_chain(
                    0,
                    &[
                        (h, 16, false),
                        (data, chunk as u32, t == T_IN),
                        (st, 1, true),
                    ],
                );
                d.notify(0);
                d.wait_used(0);
                assert_eq!(d.read_mem(st, 1)[0], 0);
            }
            total as f64 / start.elapsed().as_secs_f64() / f64::from(1 << 20)
        };
        let w = run(&mut d, T_OUT);
        d.mem
            .write_slice(&vec![0u8; chunk], vm_memory::GuestAddress(data))
            .unwrap();
        let r = run(&mut d, T_IN);
        assert_eq!(d.read_mem(data, chunk), pattern);
        let build = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        eprintln!(
            "virtio-blk 128 KiB sequential: write {w:.0} MiB/s, read {r:.0} MiB/s ({build} build)"
        );
    }
}
