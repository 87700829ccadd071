//! A stack of layers read top-down, written at the top.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::diff::{BLOCK_SIZE, DiffError, DiffFile, MAGIC};

const BS: u64 = BLOCK_SIZE as u64;

/// Why a layered disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A diff layer failed.
    #[error(transparent)]
    Diff(#[from] DiffError),
    /// The raw base image could not be opened or read.
    #[error("base image {path}")]
    Base {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The layers do not describe one disk.
    #[error("layer {path} is {size} bytes, the disk is {expected}")]
    SizeMismatch {
        /// The odd layer.
        path: PathBuf,
        /// Its virtual size.
        size: u64,
        /// The bottom layer's size.
        expected: u64,
    },
    /// Only the bottom layer may be a raw image.
    #[error("layer {0} above the bottom is not a diff layer")]
    RawAboveBottom(PathBuf),
    /// Moving the frozen top into place failed.
    #[error("moving the frozen top diff to {path}")]
    Move {
        /// The destination.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No layer gives the disk a size.
    #[error("no base layer and no existing top diff: the disk has no size")]
    NoSize,
    /// An access beyond the end of the disk.
    #[error("access {offset}+{len} beyond the {size}-byte disk")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
}

#[derive(Debug)]
enum Layer {
    Raw { file: File, path: PathBuf, len: u64 },
    Diff(DiffFile),
}

impl Layer {
    fn has_block(&self, i: u64) -> bool {
        match self {
            Layer::Raw { .. } => true,
            Layer::Diff(d) => d.has_block(i),
        }
    }

    fn path(&self) -> &Path {
        match self {
            Layer::Raw { path, .. } => path,
            Layer::Diff(d) => d.path(),
        }
    }

    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        match self {
            Layer::Raw { file, path, len } => {
                let off = first * BS;
                // The image may end inside the last block: the rest reads as zeros.
                let avail = usize::try_from(len.saturating_sub(off)).unwrap_or(usize::MAX);
                let n = avail.min(buf.len());
                file.read_exact_at(&mut buf[..n], off)
                    .map_err(|source| DiskError::Base {
                        path: path.clone(),
                        source,
                    })?;
                buf[n..].fill(0);
                Ok(())
            }
            Layer::Diff(d) => Ok(d.read_blocks(first, buf)?),
        }
    }
}

/// Open read-only layers, bottom first; only the bottom may be raw.
fn open_lower(layers: &[PathBuf]) -> Result<Vec<Layer>, DiskError> {
    let mut lower = Vec::with_capacity(layers.len());
    for (i, path) in layers.iter().enumerate() {
        let base_err = |source| DiskError::Base {
            path: path.clone(),
            source,
        };
        if is_diff(path).map_err(base_err)? {
            lower.push(Layer::Diff(DiffFile::open(path, false)?));
        } else if i == 0 {
            let file = OpenOptions::new().read(true).open(path).map_err(base_err)?;
            let len = file.metadata().map_err(base_err)?.len();
            lower.push(Layer::Raw {
                file,
                path: path.clone(),
                len,
            });
        } else {
            return Err(DiskError::RawAboveBottom(path.clone()));
        }
    }
    Ok(lower)
}

/// Merge the diff layers of `layers` (bottom first) into one new frozen diff at `out`, for a
/// shorter chain: `[base, d1, .., dn]` reads exactly like `[base, out]` afterwards (a raw bottom
/// layer is kept as it is; a diff bottom is merged too, then `[out]` alone is the disk). Blocks
/// are copied from the topmost layer that has them; the sources are not modified.
pub fn flatten(layers: &[PathBuf], out: &Path) -> Result<PathBuf, DiskError> {
    let lower = open_lower(layers)?;
    let Some(size) = lower.iter().find_map(|l| match l {
        Layer::Diff(d) => Some(d.virtual_size()),
        Layer::Raw { .. } => None,
    }) else {
        return Err(DiskError::NoSize);
    };
    for l in &lower {
        if let Layer::Diff(d) = l
            && d.virtual_size() != size
        {
            return Err(DiskError::SizeMismatch {
                path: d.path().to_owned(),
                size: d.virtual_size(),
                expected: size,
            });
        }
    }
    let mut flat = DiffFile::create(out, size)?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for i in 0..flat.blocks() {
        let src = lower
            .iter()
            .rev()
            .find(|l| matches!(l, Layer::Diff(d) if d.has_block(i)));
        if let Some(l) = src {
            l.read_blocks(i, &mut buf)?;
            flat.write_blocks(i, &buf)?;
        }
    }
    let frozen = flat.freeze()?;
    Ok(frozen.path().to_owned())
}

/// A layered copy-on-write disk: read-only layers (bottom first) and one writable diff on top.
#[derive(Debug)]
pub struct LayeredDisk {
    lower: Vec<Layer>,
    top: DiffFile,
    size: u64,
    scratch: Vec<u8>,
}

fn is_diff(path: &Path) -> Result<bool, io::Error> {
    let f = File::open(path)?;
    let mut m = [0u8; 8];
    match f.read_exact_at(&mut m, 0) {
        Ok(()) => Ok(m == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl LayeredDisk {
    /// Open `layers` (read-only, bottom first; only the bottom may be a raw image, recognised by
    /// not starting with the diff magic) and the writable `top` diff, created empty if missing.
    pub fn open(layers: &[PathBuf], top: &Path) -> Result<Self, DiskError> {
        let lower = open_lower(layers)?;
        let size = match lower.first() {
            // A raw image's size is rounded up to whole sectors.
            Some(Layer::Raw { len, .. }) => len.div_ceil(512) * 512,
            Some(Layer::Diff(d)) => d.virtual_size(),
            None => match DiffFile::open(top, true) {
                Ok(d) => d.virtual_size(),
                Err(_) => return Err(DiskError::NoSize),
            },
        };
        for l in &lower[1.min(lower.len())..] {
            if let Layer::Diff(d) = l
                && d.virtual_size() != size
            {
                return Err(DiskError::SizeMismatch {
                    path: d.path().to_owned(),
                    size: d.virtual_size(),
                    expected: size,
                });
            }
        }
        let top = if top.exists() {
            DiffFile::open(top, true)?
        } else {
            DiffFile::create(top, size)?
        };
        if top.virtual_size() != size {
            return Err(DiskError::SizeMismatch {
                path: top.path().to_owned(),
                size: top.virtual_size(),
                expected: size,
            });
        }
        Ok(LayeredDisk {
            lower,
            top,
            size,
            scratch: Vec::new(),
        })
    }

    /// Size of the disk in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Paths of the read-only layers, bottom first.
    pub fn layer_paths(&self) -> Vec<PathBuf> {
        self.lower.iter().map(|l| l.path().to_owned()).collect()
    }

    /// Path of the writable top diff.
    pub fn top_path(&self) -> &Path {
        self.top.path()
    }

    /// The top diff (for statistics: allocated blocks).
    pub fn top(&self) -> &DiffFile {
        &self.top
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Which layer holds block `i`: `None` = the top, `Some(k)` = lower layer `k`, and
    /// `Some(usize::MAX)` = no layer (reads as zeros).
    fn source(&self, i: u64) -> Option<usize> {
        if self.top.has_block(i) {
            return None;
        }
        Some(
            self.lower
                .iter()
                .rposition(|l| l.has_block(i))
                .unwrap_or(usize::MAX),
        )
    }

    fn read_run(&self, src: Option<usize>, first: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        match src {
            None => Ok(self.top.read_blocks(first, buf)?),
            Some(usize::MAX) => {
                buf.fill(0);
                Ok(())
            }
            Some(k) => self.lower[k].read_blocks(first, buf),
        }
    }

    /// Read whole blocks `first..` into `buf` (a multiple of the block size), grouping runs of
    /// blocks that come from the same layer into one read.
    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let count = buf.len() as u64 / BS;
        let mut i = 0;
        while i < count {
            let src = self.source(first + i);
            let mut j = i + 1;
            while j < count && self.source(first + j) == src {
                j += 1;
            }
            let (a, b) = (
                usize::try_from(i * BS).unwrap_or(usize::MAX),
                usize::try_from(j * BS).unwrap_or(usize::MAX),
            );
            self.read_run(src, first + i, &mut buf[a..b])?;
            i = j;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at byte `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / BS;
        let end = (offset + buf.len() as u64).div_ceil(BS);
        let skip = usize::try_from(offset - first * BS).unwrap_or(0);
        if skip == 0 && (buf.len() as u64).is_multiple_of(BS) {
            return self.read_blocks(first, buf);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(usize::try_from((end - first) * BS).unwrap_or(usize::MAX), 0);
        let r = self.read_blocks(first, &mut scratch);
        if r.is_ok() {
            buf.copy_from_slice(&scratch[skip..skip + buf.len()]);
        }
        self.scratch = scratch;
        r
    }

    /// Write `data` at byte `offset` into the top diff; partial blocks are completed from the
    /// layers below (copy-on-write).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / BS;
        let end = (offset + data.len() as u64).div_ceil(BS);
        let skip = usize::try_from(offset - first * BS).unwrap_or(0);
        if skip == 0 && (data.len() as u64).is_multiple_of(BS) {
            return Ok(self.top.write_blocks(first, data)?);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(usize::try_from((end - first) * BS).unwrap_or(usize::MAX), 0);
        let nblocks = end - first;
        let bs = usize::try_from(BS).unwrap_or(4096);
        // Only the first and last blocks can be partial; read just those.
        let r = (|| {
            if skip != 0 || (nblocks == 1 && data.len() != bs) {
                self.read_blocks(first, &mut scratch[..bs])?;
            }
            let tail = (offset + data.len() as u64) % BS;
            if nblocks > 1 && tail != 0 {
                let at = scratch.len() - bs;
                self.read_blocks(end - 1, &mut scratch[at..])?;
            }
            scratch[skip..skip + data.len()].copy_from_slice(data);
            self.top.write_blocks(first, &scratch)?;
            Ok(())
        })();
        self.scratch = scratch;
        r
    }

    /// Discard whole blocks inside `offset..offset+len`: they read as zeros afterwards and
    /// their space in the top diff is freed. Partial blocks at the edges are left alone (discard
    /// is a hint).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check(offset, len)?;
        let first = offset.div_ceil(BS);
        let end = (offset + len) / BS;
        if end > first {
            self.top.zero_blocks(first, end - first)?;
        }
        Ok(())
    }

    /// Make all completed writes durable (virtio-blk FLUSH).
    pub fn flush(&mut self) -> Result<(), DiskError> {
        Ok(self.top.flush()?)
    }

    /// Freeze the top diff into a read-only layer and continue in a fresh, empty diff at
    /// `new_top`. Returns the path of the frozen layer, which now belongs to the layer stack
    /// (and may be shared with a fork or packed into an artifact).
    pub fn freeze(&mut self, new_top: &Path) -> Result<PathBuf, DiskError> {
        self.freeze_with(new_top, true)
    }

    fn freeze_with(&mut self, new_top: &Path, durable: bool) -> Result<PathBuf, DiskError> {
        let fresh = DiffFile::create(new_top, self.size)?;
        let old = std::mem::replace(&mut self.top, fresh);
        let frozen = old.freeze_with(durable)?;
        let path = frozen.path().to_owned();
        self.lower.push(Layer::Diff(frozen));
        Ok(path)
    }

    /// Like [`LayeredDisk::freeze`], but the frozen layer moves to `frozen_at` (a snapshot's or
    /// a fork's directory, on the same file system) and the fresh diff takes the top's old
    /// path, so the disk's writable path never changes. Without `durable` nothing is synced
    /// ([`DiffFile::freeze_with`]).
    ///
    /// When `frozen_at` is on another file system (a daemon in the rig keeps its VMs' run
    /// directories, where a fork child's top lives, on the rig's tmpfs and its snapshots on a
    /// 9p share), the layer is copied there instead.
    pub fn freeze_into(&mut self, frozen_at: &Path, durable: bool) -> Result<PathBuf, DiskError> {
        let top_path = self.top.path().to_owned();
        match std::fs::rename(&top_path, frozen_at) {
            Ok(()) => {
                // The open descriptor follows the rename; only the recorded path changes.
                self.top.set_path(frozen_at.to_owned());
                self.freeze_with(&top_path, durable)
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                self.freeze_by_copy(frozen_at, durable)
            }
            Err(source) => Err(DiskError::Move {
                path: frozen_at.to_owned(),
                source,
            }),
        }
    }

    /// [`LayeredDisk::freeze_into`] across file systems: the top is frozen where it is, its
    /// header, bitmap and allocated blocks are copied to `frozen_at` (holes stay holes), the
    /// copy becomes the layer, and a fresh top takes the old path. The copy is always synced:
    /// it is a new file whose contents nobody else has in their page cache.
    fn freeze_by_copy(&mut self, frozen_at: &Path, durable: bool) -> Result<PathBuf, DiskError> {
        let top_path = self.top.path().to_owned();
        let mut next = top_path.clone().into_os_string();
        next.push(".next");
        let next = PathBuf::from(next);
        let moved = |path: &Path| {
            let path = path.to_owned();
            move |source| DiskError::Move { path, source }
        };
        let fresh = DiffFile::create(&next, self.size)?;
        let frozen = std::mem::replace(&mut self.top, fresh).freeze_with(durable)?;
        let copy = (|| {
            let src = File::open(&top_path)?;
            let dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(frozen_at)?;
            let head = usize::try_from(frozen.data_offset()).map_err(io::Error::other)?;
            let mut buf = vec![0u8; head];
            src.read_exact_at(&mut buf, 0)?;
            dst.write_all_at(&buf, 0)?;
            const CHUNK: usize = 256;
            let block = BLOCK_SIZE as usize;
            buf.resize(CHUNK * block, 0);
            for (first, count) in frozen.allocated_runs() {
                let mut b = first;
                while b < first + count {
                    let n =
                        usize::try_from(first + count - b).map_or(CHUNK, |left| left.min(CHUNK));
                    let at = frozen.data_offset() + b * BS;
                    let chunk = &mut buf[..n * block];
                    src.read_exact_at(chunk, at)?;
                    dst.write_all_at(chunk, at)?;
                    b += n as u64;
                }
            }
            dst.set_len(src.metadata()?.len())?;
            dst.sync_all()
        })();
        if let Err(e) = copy {
            let _ = std::fs::remove_file(frozen_at);
            // The disk stays whole: the frozen old top joins the stack in place, and writes go
            // on in the fresh top beside it.
            self.lower.push(Layer::Diff(frozen));
            return Err(moved(frozen_at)(e));
        }
        drop(frozen);
        self.lower
            .push(Layer::Diff(DiffFile::open(frozen_at, false)?));
        std::fs::remove_file(&top_path).map_err(moved(&top_path))?;
        std::fs::rename(&next, &top_path).map_err(moved(&top_path))?;
        self.top.set_path(top_path);
        Ok(frozen_at.to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    fn base(dir: &Path, size: usize, fill: impl Fn(usize) -> u8) -> PathBuf {
        let p = dir.join("base.img");
        let data: Vec<u8> = (0..size).map(fill).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn freeze_into_moves_the_frozen_layer_and_keeps_the_top_path() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 64 * 1024, |_| 0);
        let top = dir.path().join("top");
        let mut disk = LayeredDisk::open(std::slice::from_ref(&b), &top).unwrap();
        disk.write_at(0, &[0xaa; 4096]).unwrap();
        let frozen = dir.path().join("snap.diff");
        disk.freeze_into(&frozen, true).unwrap();
        assert_eq!(disk.top_path(), top);
        assert_eq!(disk.layer_paths(), vec![b.clone(), frozen.clone()]);
        disk.write_at(4096, &[0xbb; 4096]).unwrap();
        drop(disk);
        // The frozen layer holds the first write only; the top the second.
        let mut snap =
            LayeredDisk::open(&[b.clone(), frozen.clone()], &dir.path().join("t2")).unwrap();
        let mut buf = vec![0u8; 8192];
        snap.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0xaa) && buf[4096..].iter().all(|&x| x == 0));
        let mut live = LayeredDisk::open(&[b, frozen], &top).unwrap();
        live.read_at(0, &mut buf).unwrap();
        assert!(buf[4096..].iter().all(|&x| x == 0xbb));
        assert!(matches!(
            live.freeze_into(&dir.path().join("no/such/dir/x"), false),
            Err(DiskError::Move { .. })
        ));
    }

    /// The copy that replaces the rename across file systems, checked on one file system
    /// (always) and across two when the machine has them (the test says when it has not).
    #[test]
    fn freeze_by_copy_keeps_the_layer_whole_and_sparse_and_the_top_path() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").ok();
        let cross = shm
            .as_ref()
            .filter(|s| s.path().metadata().unwrap().dev() != dir.path().metadata().unwrap().dev());
        if cross.is_none() {
            eprintln!(
                "NOTE: no second file system (/dev/shm) here: freeze_into's EXDEV path is \
                 checked through freeze_by_copy on one file system only"
            );
        }
        let b = base(dir.path(), 4 << 20, |_| 0);
        let top_dir = cross.map_or(dir.path(), |s| s.path());
        let top = top_dir.join("top");
        let mut disk = LayeredDisk::open(std::slice::from_ref(&b), &top).unwrap();
        disk.write_at(0, &[0xaa; 4096]).unwrap();
        disk.write_at(3 << 20, &[0xcc; 8192]).unwrap();
        let frozen = dir.path().join("snap.diff");
        if cross.is_some() {
            disk.freeze_into(&frozen, true).unwrap();
        } else {
            disk.freeze_by_copy(&frozen, true).unwrap();
        }
        assert_eq!(disk.top_path(), top);
        assert_eq!(disk.layer_paths(), vec![b.clone(), frozen.clone()]);
        let copy = std::fs::metadata(&frozen).unwrap();
        assert!(
            copy.blocks() * 512 < 1 << 20,
            "the copy is sparse: {} bytes allocated",
            copy.blocks() * 512
        );
        disk.write_at(4096, &[0xbb; 4096]).unwrap();
        drop(disk);
        let mut buf = vec![0u8; 8192];
        let mut snap =
            LayeredDisk::open(&[b.clone(), frozen.clone()], &dir.path().join("t2")).unwrap();
        snap.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0xaa) && buf[4096..].iter().all(|&x| x == 0));
        snap.read_at(3 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0xcc));
        let mut live = LayeredDisk::open(&[b, frozen], &top).unwrap();
        live.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0xaa) && buf[4096..].iter().all(|&x| x == 0xbb));
        assert!(!top_dir.join("top.next").exists());
    }

    #[test]
    fn reads_come_from_the_topmost_layer_that_has_the_block() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 64 * 1024, |i| (i / 4096) as u8);
        let mut disk = LayeredDisk::open(std::slice::from_ref(&b), &dir.path().join("d1")).unwrap();
        disk.write_at(4096, &[0xaa; 4096]).unwrap();
        let l1 = disk.freeze(&dir.path().join("top")).unwrap();
        disk.write_at(8192 + 100, &[0xbb; 10]).unwrap();
        let mut buf = vec![0u8; 3 * 4096];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..8192].iter().all(|&x| x == 0xaa));
        assert_eq!(&buf[8192..8192 + 100], &[2u8; 100][..]);
        assert_eq!(&buf[8292..8302], &[0xbb; 10]);
        assert_eq!(buf[8302], 2);
        // The frozen layer and the base are untouched; reopening the stack sees the same bytes.
        drop(disk);
        let mut again = LayeredDisk::open(&[b, l1], &dir.path().join("top")).unwrap();
        let mut buf2 = vec![0u8; 3 * 4096];
        again.read_at(0, &mut buf2).unwrap();
        assert_eq!(buf, buf2);
    }

    #[test]
    fn unaligned_write_spanning_blocks_keeps_neighbouring_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 32 * 1024, |i| (i % 251) as u8);
        let mut disk =
            LayeredDisk::open(std::slice::from_ref(&b), &dir.path().join("top")).unwrap();
        let data = vec![0x5a; 9000];
        disk.write_at(1000, &data).unwrap();
        let mut buf = vec![0u8; 32 * 1024];
        disk.read_at(0, &mut buf).unwrap();
        let expect: Vec<u8> = (0..32 * 1024)
            .map(|i| {
                if (1000..10000).contains(&i) {
                    0x5a
                } else {
                    (i % 251) as u8
                }
            })
            .collect();
        assert_eq!(buf, expect);
        assert_eq!(disk.top().allocated_blocks(), 3);
    }

    #[test]
    fn flushed_writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("top");
        let b = base(dir.path(), 16 * 1024, |_| 7);
        {
            let mut disk = LayeredDisk::open(std::slice::from_ref(&b), &top).unwrap();
            disk.write_at(0, &[1; 4096]).unwrap();
            disk.flush().unwrap();
        }
        let mut disk = LayeredDisk::open(&[b], &top).unwrap();
        let mut buf = [0u8; 4096];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [1; 4096]);
    }

    #[test]
    fn corrupt_header_or_bitmap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        {
            let mut d = DiffFile::create(&p, 1 << 20).unwrap();
            d.write_blocks(3, &[9; 4096]).unwrap();
            d.flush().unwrap();
        }
        assert!(DiffFile::open(&p, false).is_ok());
        let orig = std::fs::read(&p).unwrap();
        for (at, what) in [(16usize, "header"), (4096, "bitmap"), (0, "magic")] {
            let mut bad = orig.clone();
            bad[at] ^= 0xff;
            std::fs::write(&p, &bad).unwrap();
            assert!(
                DiffFile::open(&p, false).is_err(),
                "{what} corruption accepted"
            );
        }
        std::fs::write(&p, &orig[..100]).unwrap();
        assert!(
            DiffFile::open(&p, false).is_err(),
            "truncated file accepted"
        );
    }

    #[test]
    fn frozen_layer_cannot_be_opened_writable_or_sit_below_a_raw_image() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 8192, |_| 0);
        let mut disk = LayeredDisk::open(std::slice::from_ref(&b), &dir.path().join("d1")).unwrap();
        let frozen = disk.freeze(&dir.path().join("d2")).unwrap();
        assert!(matches!(
            DiffFile::open(&frozen, true),
            Err(DiffError::ReadOnly(_))
        ));
        assert!(matches!(
            LayeredDisk::open(&[frozen, b], &dir.path().join("d3")),
            Err(DiskError::RawAboveBottom(_))
        ));
    }

    #[test]
    fn discard_zeroes_whole_blocks_over_lower_data() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 16 * 1024, |_| 3);
        let mut disk = LayeredDisk::open(&[b], &dir.path().join("top")).unwrap();
        disk.discard(2048, 3 * 4096).unwrap();
        let mut buf = vec![0u8; 16 * 1024];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 3));
        assert!(buf[4096..12288].iter().all(|&x| x == 0));
        assert!(buf[12288..].iter().all(|&x| x == 3));
    }

    #[test]
    fn flattened_chain_reads_like_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 64 * 1024, |i| (i % 199) as u8);
        let mut layers = vec![b.clone()];
        let mut disk = LayeredDisk::open(&layers, &dir.path().join("d0")).unwrap();
        for (n, (off, len)) in [(0u64, 5000usize), (4096, 100), (20000, 9000), (60000, 4000)]
            .into_iter()
            .enumerate()
        {
            disk.write_at(off, &vec![n as u8 + 1; len]).unwrap();
            layers.push(
                disk.freeze(&dir.path().join(format!("d{}", n + 1)))
                    .unwrap(),
            );
        }
        let mut want = vec![0u8; 64 * 1024];
        disk.read_at(0, &mut want).unwrap();
        drop(disk);
        let flat = flatten(&layers, &dir.path().join("flat")).unwrap();
        let mut short = LayeredDisk::open(&[b, flat.clone()], &dir.path().join("top")).unwrap();
        let mut got = vec![0u8; 64 * 1024];
        short.read_at(0, &mut got).unwrap();
        assert_eq!(got, want);
        let f = DiffFile::open(&flat, false).unwrap();
        assert!(f.is_frozen());
        // Blocks 0-1 (first two writes), 4-7 (9000 bytes at 20000), 14-15 (4000 at 60000).
        assert_eq!(f.allocated_blocks(), 2 + 4 + 2);
    }

    #[test]
    fn out_of_range_access_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 8192, |_| 0);
        let mut disk = LayeredDisk::open(&[b], &dir.path().join("top")).unwrap();
        let mut buf = [0u8; 512];
        assert!(disk.read_at(8192, &mut buf).is_err());
        assert!(disk.write_at(u64::MAX - 10, &buf).is_err());
    }
}
