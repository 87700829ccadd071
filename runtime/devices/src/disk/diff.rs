//! One diff layer: a sparse data file and an allocation bitmap at a fixed block size.
//!
//! Layout (all integers little-endian; documented in docs/disk-format.md):
//!
//! ```text
//! 0        header (4096 bytes): magic, version, block size, virtual size, offsets, flags, CRCs
//! 4096     allocation bitmap: bit i (byte i/8, bit i%8) set = block i is in this layer
//! data     block i at data_offset + i * block_size; unallocated blocks are holes
//! ```
//!
//! Crash consistency: the bitmap is written (and its CRC in the header) only by `flush`, after
//! the data has been synced. A crash loses unflushed allocations, never points a bit at data that
//! was not written — exactly the guarantee a disk gives for unflushed writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File magic of a diff layer.
pub const MAGIC: [u8; 8] = *b"SPCCDIFF";
/// Format version this code writes; it reads only this major version.
pub const FORMAT_VERSION: u32 = 1;
/// Allocation granularity.
pub const BLOCK_SIZE: u32 = 4096;

const HEADER_SIZE: u64 = 4096;
const HEADER_BYTES: usize = 4096;
const HEADER_CRC_OFFSET: usize = 56;
const FLAG_FROZEN: u32 = 1;
/// Largest virtual size (4 TiB): bounds the bitmap held in memory (128 MiB) that a hostile
/// header, backed by a sparse file of the claimed length, could make us allocate.
const MAX_VIRTUAL_SIZE: u64 = 1 << 42;

/// Why a diff file could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// I/O on the file failed.
    #[error("diff file {path}: I/O failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a diff layer of a version this code reads.
    #[error("diff file {path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A write to a frozen or read-only layer.
    #[error("diff file {0} is read-only")]
    ReadOnly(PathBuf),
    /// A block index beyond the virtual size.
    #[error("block {block} is beyond the {blocks} blocks of {path}")]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// The block asked for.
        block: u64,
        /// Blocks in the layer.
        blocks: u64,
    },
}

/// An open diff layer.
#[derive(Debug)]
pub struct DiffFile {
    file: File,
    path: PathBuf,
    virtual_size: u64,
    blocks: u64,
    bitmap: Vec<u8>,
    bitmap_dirty: bool,
    data_offset: u64,
    frozen: bool,
    writable: bool,
}

fn bitmap_len(blocks: u64) -> u64 {
    blocks.div_ceil(8).div_ceil(u64::from(BLOCK_SIZE)) * u64::from(BLOCK_SIZE)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl DiffFile {
    /// Create an empty diff of `virtual_size` bytes at `path` (which must not exist).
    pub fn create(path: &Path, virtual_size: u64) -> Result<Self, DiffError> {
        let io_err = |source| DiffError::Io {
            path: path.to_owned(),
            source,
        };
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(512)
        {
            return Err(DiffError::Format {
                path: path.to_owned(),
                reason: format!(
                    "virtual size {virtual_size} is not a positive multiple of 512 up to 4 TiB"
                ),
            });
        }
        let blocks = virtual_size.div_ceil(u64::from(BLOCK_SIZE));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err)?;
        let blen = bitmap_len(blocks);
        let mut diff = DiffFile {
            file,
            path: path.to_owned(),
            virtual_size,
            blocks,
            bitmap: vec![
                0u8;
                usize::try_from(blen).map_err(|_| DiffError::Format {
                    path: path.to_owned(),
                    reason: "bitmap too large for this host".into(),
                })?
            ],
            bitmap_dirty: true,
            data_offset: HEADER_SIZE + blen,
            frozen: false,
            writable: true,
        };
        diff.file
            .set_len(diff.data_offset + blocks * u64::from(BLOCK_SIZE))
            .map_err(io_err)?;
        diff.flush()?;
        Ok(diff)
    }

    /// Open an existing diff; `writable` for the top layer. A frozen diff opens only read-only.
    pub fn open(path: &Path, writable: bool) -> Result<Self, DiffError> {
        let io_err = |source| DiffError::Io {
            path: path.to_owned(),
            source,
        };
        let bad = |reason: String| DiffError::Format {
            path: path.to_owned(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len < HEADER_SIZE {
            return Err(bad(format!("{len} bytes is shorter than the header")));
        }
        let mut h = vec![0u8; HEADER_BYTES];
        file.read_exact_at(&mut h, 0).map_err(io_err)?;
        if h[..8] != MAGIC {
            return Err(bad("bad magic (not a specc diff layer)".into()));
        }
        let crc = le_u32(&h, HEADER_CRC_OFFSET);
        if crc32fast::hash(&h[..HEADER_CRC_OFFSET]) != crc {
            return Err(bad("header CRC mismatch".into()));
        }
        let version = le_u32(&h, 8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        let block_size = le_u32(&h, 12);
        if block_size != BLOCK_SIZE {
            return Err(bad(format!(
                "block size {block_size}, expected {BLOCK_SIZE}"
            )));
        }
        let virtual_size = le_u64(&h, 16);
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(512)
        {
            return Err(bad(format!("virtual size {virtual_size} out of range")));
        }
        let blocks = virtual_size.div_ceil(u64::from(BLOCK_SIZE));
        let bitmap_offset = le_u64(&h, 24);
        let blen = le_u64(&h, 32);
        let data_offset = le_u64(&h, 40);
        if bitmap_offset != HEADER_SIZE
            || blen != bitmap_len(blocks)
            || data_offset != HEADER_SIZE + blen
        {
            return Err(bad("inconsistent bitmap/data offsets".into()));
        }
        if len < data_offset {
            return Err(bad("file truncated inside the bitmap".into()));
        }
        let flags = le_u32(&h, 48);
        if flags & !FLAG_FROZEN != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let frozen = flags & FLAG_FROZEN != 0;
        if frozen && writable {
            return Err(DiffError::ReadOnly(path.to_owned()));
        }
        let mut bitmap =
            vec![0u8; usize::try_from(blen).map_err(|_| bad("bitmap too large".into()))?];
        file.read_exact_at(&mut bitmap, bitmap_offset)
            .map_err(io_err)?;
        if crc32fast::hash(&bitmap) != le_u32(&h, 52) {
            return Err(bad("bitmap CRC mismatch".into()));
        }
        // Bits past the last block would claim data outside the disk.
        let used_bytes = usize::try_from(blocks / 8).unwrap_or(usize::MAX);
        let tail_bits = blocks % 8;
        let tail_ok = if tail_bits == 0 {
            bitmap[used_bytes..].iter().all(|&b| b == 0)
        } else {
            bitmap[used_bytes] >> tail_bits == 0 && bitmap[used_bytes + 1..].iter().all(|&b| b == 0)
        };
        if !tail_ok {
            return Err(bad("bitmap marks blocks beyond the virtual size".into()));
        }
        Ok(DiffFile {
            file,
            path: path.to_owned(),
            virtual_size,
            blocks,
            bitmap,
            bitmap_dirty: false,
            data_offset,
            frozen,
            writable,
        })
    }

    pub(crate) fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }

    /// The file behind the layer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Number of blocks of the virtual disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether the layer was frozen (it is then read-only forever).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Blocks present in this layer.
    pub fn allocated_blocks(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Runs of allocated blocks as `(first block, count)`, ascending: the extents an artifact
    /// packer copies (block `i` is at byte `data_offset() + i * BLOCK_SIZE` of the file).
    pub fn allocated_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in 0..self.blocks {
            if !self.has_block(i) {
                continue;
            }
            match runs.last_mut() {
                Some((first, count)) if *first + *count == i => *count += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }

    /// Byte offset of block 0 in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Whether block `i` is in this layer.
    pub fn has_block(&self, i: u64) -> bool {
        let Ok(byte) = usize::try_from(i / 8) else {
            return false;
        };
        i < self.blocks && self.bitmap[byte] & (1 << (i % 8)) != 0
    }

    fn check(&self, first: u64, count: u64) -> Result<(), DiffError> {
        if first.checked_add(count).is_none_or(|end| end > self.blocks) {
            return Err(DiffError::OutOfRange {
                path: self.path.clone(),
                block: first + count,
                blocks: self.blocks,
            });
        }
        Ok(())
    }

    fn io(&self, source: io::Error) -> DiffError {
        DiffError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Read `buf.len() / BLOCK_SIZE` consecutive blocks starting at `first`, whether or not they
    /// are allocated (holes read as zeros).
    pub fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        let count = buf.len() as u64 / u64::from(BLOCK_SIZE);
        self.check(first, count)?;
        self.file
            .read_exact_at(buf, self.data_offset + first * u64::from(BLOCK_SIZE))
            .map_err(|e| self.io(e))
    }

    /// Write whole blocks starting at `first` and mark them allocated.
    pub fn write_blocks(&mut self, first: u64, data: &[u8]) -> Result<(), DiffError> {
        if !self.writable || self.frozen {
            return Err(DiffError::ReadOnly(self.path.clone()));
        }
        let count = data.len() as u64 / u64::from(BLOCK_SIZE);
        self.check(first, count)?;
        self.file
            .write_all_at(data, self.data_offset + first * u64::from(BLOCK_SIZE))
            .map_err(|e| self.io(e))?;
        for i in first..first + count {
            self.set_bit(i);
        }
        Ok(())
    }

    /// Make blocks read as zeros in this layer and free their space (discard).
    pub fn zero_blocks(&mut self, first: u64, count: u64) -> Result<(), DiffError> {
        if !self.writable || self.frozen {
            return Err(DiffError::ReadOnly(self.path.clone()));
        }
        self.check(first, count)?;
        let off = i64::try_from(self.data_offset + first * u64::from(BLOCK_SIZE))
            .map_err(|_| self.io(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let len = i64::try_from(count * u64::from(BLOCK_SIZE))
            .map_err(|_| self.io(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: fallocate on an fd we own; it only changes the file's extents.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r != 0 {
            return Err(self.io(io::Error::last_os_error()));
        }
        for i in first..first + count {
            self.set_bit(i);
        }
        Ok(())
    }

    fn set_bit(&mut self, i: u64) {
        // i < blocks was checked, and the bitmap covers every block.
        let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
        if let Some(b) = self.bitmap.get_mut(byte) {
            let bit = 1u8 << (i % 8);
            if *b & bit == 0 {
                *b |= bit;
                self.bitmap_dirty = true;
            }
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_BYTES];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        h[16..24].copy_from_slice(&self.virtual_size.to_le_bytes());
        h[24..32].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        h[32..40].copy_from_slice(&(self.bitmap.len() as u64).to_le_bytes());
        h[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        let flags = if self.frozen { FLAG_FROZEN } else { 0 };
        h[48..52].copy_from_slice(&flags.to_le_bytes());
        h[52..56].copy_from_slice(&crc32fast::hash(&self.bitmap).to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_CRC_OFFSET]);
        h[56..60].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Make every completed write durable: data first, then bitmap and header.
    pub fn flush(&mut self) -> Result<(), DiffError> {
        if !self.writable {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.io(e))?;
        if self.bitmap_dirty {
            self.file
                .write_all_at(&self.bitmap, HEADER_SIZE)
                .map_err(|e| self.io(e))?;
            self.file
                .write_all_at(&self.header(), 0)
                .map_err(|e| self.io(e))?;
            self.file.sync_data().map_err(|e| self.io(e))?;
            self.bitmap_dirty = false;
        }
        Ok(())
    }

    /// Flush, mark the layer frozen on disk, and return it read-only.
    pub fn freeze(self) -> Result<DiffFile, DiffError> {
        self.freeze_with(true)
    }

    /// Like [`DiffFile::freeze`]; without `durable` the bitmap and header are written but not
    /// synced (a live fork's shared layer: the data is in the page cache for every reader, and
    /// whoever persists a snapshot over it syncs it then).
    pub fn freeze_with(mut self, durable: bool) -> Result<DiffFile, DiffError> {
        if durable {
            self.flush()?;
        } else if self.writable && self.bitmap_dirty {
            self.file
                .write_all_at(&self.bitmap, HEADER_SIZE)
                .map_err(|e| self.io(e))?;
            self.bitmap_dirty = false;
        }
        self.frozen = true;
        if self.writable {
            self.file
                .write_all_at(&self.header(), 0)
                .map_err(|e| self.io(e))?;
            if durable {
                self.file.sync_all().map_err(|e| self.io(e))?;
            }
        }
        self.writable = false;
        Ok(self)
    }
}

impl Drop for DiffFile {
    fn drop(&mut self) {
        if self.writable
            && self.bitmap_dirty
            && let Err(e) = self.flush()
        {
            tracing::error!("flushing {} on close failed: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer assembled by hand from the table in docs/disk-format.md reads as intended.
    #[test]
    fn file_built_from_the_documented_layout_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spec");
        let mut h = vec![0u8; 4096];
        h[0..8].copy_from_slice(b"SPCCDIFF");
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&4096u32.to_le_bytes());
        h[16..24].copy_from_slice(&(8u64 * 4096).to_le_bytes());
        h[24..32].copy_from_slice(&4096u64.to_le_bytes());
        h[32..40].copy_from_slice(&4096u64.to_le_bytes());
        h[40..48].copy_from_slice(&8192u64.to_le_bytes());
        h[48..52].copy_from_slice(&1u32.to_le_bytes()); // frozen
        let mut bitmap = vec![0u8; 4096];
        bitmap[0] = 0b0000_0101; // blocks 0 and 2
        h[52..56].copy_from_slice(&crc32fast::hash(&bitmap).to_le_bytes());
        let crc = crc32fast::hash(&h[..56]);
        h[56..60].copy_from_slice(&crc.to_le_bytes());
        let mut data = vec![0u8; 8 * 4096];
        data[..4096].fill(0x11);
        data[2 * 4096..3 * 4096].fill(0x22);
        std::fs::write(&p, [h, bitmap, data].concat()).unwrap();

        let d = DiffFile::open(&p, false).unwrap();
        assert!(d.is_frozen());
        assert_eq!(d.allocated_runs(), [(0, 1), (2, 1)]);
        let mut b = vec![0u8; 4096];
        d.read_blocks(2, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x22));
    }

    #[test]
    fn allocated_runs_list_written_extents_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = DiffFile::create(&dir.path().join("d"), 64 * 4096).unwrap();
        d.write_blocks(3, &[1; 2 * 4096]).unwrap();
        d.write_blocks(10, &[2; 4096]).unwrap();
        d.write_blocks(5, &[3; 4096]).unwrap();
        d.zero_blocks(63, 1).unwrap();
        assert_eq!(d.allocated_runs(), [(3, 3), (10, 1), (63, 1)]);
        assert_eq!(d.data_offset(), 8192);
    }
}
