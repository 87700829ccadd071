use serde::{Deserialize, Serialize};

use super::device::{Block, BlockConfig, BlockError};
use crate::persist::Persist;
use crate::virtio::features::TRANSPORT;

/// Saved virtio-blk state. The disk contents are not here: they are the layer files, and the
/// restoring VMM hands the (frozen + fresh) layer stack in as [`BlockConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Capacity in sectors the guest saw: the restored disk must have exactly this size, since
    /// the guest's page cache and file system refer to its blocks.
    pub capacity: u64,
    /// Whether the guest saw the disk read-only.
    pub read_only: bool,
    /// The id the guest saw.
    pub id: String,
}

/// Why a saved virtio-blk state was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlockRestoreError {
    /// The new disk could not be opened.
    #[error("opening the restored disk failed")]
    Open(#[from] BlockError),
    /// The new disk has another size than the one the guest knew.
    #[error("restored disk has {got} sectors, the snapshot was taken with {saved}")]
    Capacity {
        /// In the state.
        saved: u64,
        /// Of the disk handed to restore.
        got: u64,
    },
    /// The configuration disagrees with the state (read-only flag or id).
    #[error("restored disk configuration differs from the snapshot: {0}")]
    Config(&'static str),
    /// The state claims features the device never offers.
    #[error("saved features {0:#x} were never offered")]
    Features(u64),
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockConfig;
    type Error = BlockRestoreError;

    fn save(&self) -> BlockState {
        BlockState {
            acked_features: self.acked_features,
            capacity: self.capacity,
            read_only: self.config.read_only,
            id: self.config.id.clone(),
        }
    }

    fn restore(config: BlockConfig, state: &BlockState) -> Result<Self, BlockRestoreError> {
        if config.read_only != state.read_only {
            return Err(BlockRestoreError::Config("read-only flag"));
        }
        if config.id != state.id {
            return Err(BlockRestoreError::Config("id"));
        }
        let offered = Block::offered(state.read_only) | TRANSPORT;
        if state.acked_features & !offered != 0 {
            return Err(BlockRestoreError::Features(state.acked_features));
        }
        let mut block = Block::new(config)?;
        if block.capacity != state.capacity {
            return Err(BlockRestoreError::Capacity {
                saved: state.capacity,
                got: block.capacity,
            });
        }
        block.acked_features = state.acked_features;
        Ok(block)
    }
}
