//! The layered copy-on-write disk behind virtio-blk.
//!
//! A disk is a stack of read-only layers (bottom first: a raw base image, then frozen diff
//! layers) and one writable diff on top. Reads take each 4 KiB block from the topmost layer
//! that has it; writes always go to the top. Freezing the top turns it into a read-only layer
//! and starts a fresh diff above it: that is how snapshots and live forks share a disk (each
//! side continues in its own fresh diff). The diff file format is in `docs/disk-format.md`.

mod diff;
mod layered;

pub use diff::{BLOCK_SIZE, DiffError, DiffFile, FORMAT_VERSION, MAGIC};
pub use layered::{DiskError, LayeredDisk, flatten};
