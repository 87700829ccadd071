//! Snapshot files of specc VMs (docs/snapshot-format.md has the byte layouts).
//!
//! - [`state`]: versioned state files (magic, semver, CRC64, byte limit) holding `serde`
//!   values encoded with `postcard`; the VMM's vmstate goes here.
//! - [`memory`]: sparse memory files of guest RAM, diff files of dirty pages, and
//!   copy-on-write overlays of diffs onto restored guest memory.
//! - [`merge`]: one diff file from a chain of them (a VM's suspends, compacted).
//! - [`holes`]: anonymous memory over the holes of a privately mapped memory file (a tmpfs
//!   file would otherwise give a page of the file system to every hole page touched).
//! - [`cpu`]: the host CPU's fingerprint and the check that a snapshot may run here.
//!
//! Architecture invariant: every reader treats its input as hostile and returns an error for
//! anything malformed; nothing here panics on input.

#![deny(missing_docs)]

mod atomic;
pub mod cpu;
#[doc(hidden)]
pub mod fuzzing;
pub mod holes;
pub mod memory;
pub mod merge;
pub mod state;

pub use cpu::{CpuFingerprint, CpuMismatch};
pub use holes::{HoleStats, fill_holes};
/// Errors of [`memory`].
pub use memory::Error as MemoryError;
pub use memory::{
    DirtyPages, MemoryStats, PageRange, WriteOptions, check_memory_file, map_overlay, write_memory,
    write_memory_diff,
};
/// Errors of [`state`].
pub use state::Error as StateError;
pub use state::{FORMAT_VERSION, Version, decode, encode, read_state_file, write_state_file};
