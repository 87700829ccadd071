use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::event_handler::BlockHandler;
use super::features::*;
use crate::disk::{DiskError, LayeredDisk};
use crate::virtio::worker::{Running, lock};
use crate::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, device_type, read_config_bytes,
};

pub(super) const QUEUE_SIZE: u16 = 256;
/// Length of the device id answered to GET_ID.
pub(super) const ID_LEN: usize = 20;
pub(super) const SECTOR: u64 = 512;

/// How to build a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Read-only layers, bottom first (bottom = base ext4 image, raw; above it diff layers).
    pub layers: Vec<PathBuf>,
    /// The writable diff on top; created empty if it does not exist.
    pub top: PathBuf,
    /// Offer the disk read-only (VIRTIO_BLK_F_RO; writes fail with IOERR).
    pub read_only: bool,
    /// Answer to GET_ID (the guest's `/sys/block/vdX/serial`), at most 20 bytes.
    pub id: String,
}

impl BlockConfig {
    /// A writable disk over `layers` with the diff at `top` and an empty id.
    pub fn new(layers: Vec<PathBuf>, top: PathBuf) -> Self {
        BlockConfig {
            layers,
            top,
            read_only: false,
            id: String::new(),
        }
    }
}

/// Why a block device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk layers could not be opened.
    #[error("opening the disk failed")]
    Disk(#[from] DiskError),
    /// The id is longer than virtio-blk allows.
    #[error("block id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
}

/// A shared handle on a block device's disk, kept by the VMM for snapshots and forks.
#[derive(Debug, Clone)]
pub struct DiskHandle(pub(super) Arc<Mutex<LayeredDisk>>);

impl DiskHandle {
    /// Make every completed write durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        lock(&self.0).flush()
    }

    /// Freeze the current top diff into a read-only layer and continue in a fresh diff at
    /// `new_top`; returns the frozen layer's path. Call with the device paused.
    pub fn freeze(&self, new_top: &Path) -> Result<PathBuf, DiskError> {
        lock(&self.0).freeze(new_top)
    }

    /// Freeze the top diff into `frozen_at` and continue in a fresh diff at the same top path
    /// ([`LayeredDisk::freeze_into`]); returns the read-only stack, bottom first. Call with
    /// the device paused. `durable` syncs the frozen layer.
    pub fn freeze_into(&self, frozen_at: &Path, durable: bool) -> Result<Vec<PathBuf>, DiskError> {
        let mut d = lock(&self.0);
        d.freeze_into(frozen_at, durable)?;
        Ok(d.layer_paths())
    }

    /// The read-only layers, bottom first.
    pub fn layer_paths(&self) -> Vec<PathBuf> {
        lock(&self.0).layer_paths()
    }

    /// The writable top diff.
    pub fn top_path(&self) -> PathBuf {
        lock(&self.0).top_path().to_owned()
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        lock(&self.0).size()
    }
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    pub(super) disk: DiskHandle,
    pub(super) config: BlockConfig,
    pub(super) acked_features: u64,
    pub(super) capacity: u64,
    config_space: Vec<u8>,
    queue_sizes: [u16; 1],
    running: Option<Running<BlockHandler>>,
}

impl Block {
    /// Open the disk described by `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        if config.id.len() > ID_LEN {
            return Err(BlockError::IdTooLong(config.id.clone()));
        }
        let disk = LayeredDisk::open(&config.layers, &config.top)?;
        let capacity = disk.size() / SECTOR;
        let mut cs = vec![0u8; 60];
        cs[0..8].copy_from_slice(&capacity.to_le_bytes());
        let seg_max = u32::from(QUEUE_SIZE) - 2;
        cs[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // Topology: 4 KiB physical blocks (the diff's granularity), so the guest avoids
        // read-modify-write of partial blocks.
        cs[24] = 3;
        cs[26..28].copy_from_slice(&8u16.to_le_bytes());
        cs[28..32].copy_from_slice(&8u32.to_le_bytes());
        cs[34..36].copy_from_slice(&1u16.to_le_bytes());
        cs[36..40].copy_from_slice(&(!7u32).to_le_bytes());
        cs[40..44].copy_from_slice(&1u32.to_le_bytes());
        cs[44..48].copy_from_slice(&8u32.to_le_bytes());
        Ok(Block {
            disk: DiskHandle(Arc::new(Mutex::new(disk))),
            config,
            acked_features: 0,
            capacity,
            config_space: cs,
            queue_sizes: [QUEUE_SIZE],
            running: None,
        })
    }

    /// The disk, for flush/freeze from the VMM.
    pub fn disk(&self) -> DiskHandle {
        self.disk.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(super) fn offered(read_only: bool) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY);
        if read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        f
    }

    fn id_bytes(&self) -> [u8; ID_LEN] {
        let mut id = [0u8; ID_LEN];
        let b = self.config.id.as_bytes();
        id[..b.len()].copy_from_slice(b);
        id
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        Self::offered(self.config.read_only)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // `writeback` (offset 32) is only writable with VIRTIO_BLK_F_CONFIG_WCE, not offered.
        tracing::debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = BlockHandler::new(
            ctx,
            self.disk.0.clone(),
            self.config.read_only,
            self.id_bytes(),
        )?;
        self.running = Some(Running::start("virtio-blk", handler).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
    }

    fn pause(&mut self) {
        if let Some(r) = &mut self.running {
            r.pause();
        }
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        match &mut self.running {
            Some(r) => r.resume().map_err(ActivateError::Worker),
            None => Ok(()),
        }
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.running.as_ref().map(Running::queue_states)
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(crate::persist::Persist::save(self))
    }
}
