//! Guest RAM on disk: sparse memory files, diff files of dirty pages, and copy-on-write
//! overlays of diffs onto restored memory.
//!
//! A memory file holds the guest's regions back to back in guest-address order, so region `i`
//! starts at the sum of the lengths of the regions before it and the file is exactly as long as
//! guest RAM. Zero pages are holes. A diff file has the same length and layout but holds only
//! the pages of its range list; everything else is a hole and means "not in this diff", which
//! is why the range list (kept in the vmstate), not the data, says what a diff contains.
//!
//! Every function here reads or writes guest memory through raw pointers: the caller must
//! ensure nothing else touches guest memory meanwhile (vCPUs paused, device workers parked).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::atomic::AtomicFile;

/// The page size of memory and diff files (and of the KVM dirty log on x86_64).
pub const PAGE_SIZE: u64 = 4096;

/// Most mappings [`map_overlay`] creates in one call before it copies instead: each mapping
/// can split a VMA in three, and the kernel's default `vm.max_map_count` is 65530.
pub const MAX_OVERLAY_MAPPINGS: usize = 4096;

/// Longest single `pwrite` of coalesced non-zero pages.
const MAX_WRITE: u64 = 8 << 20;
/// Pages whose pagemap entries are read at once (256 KiB of entries, 128 MiB of memory).
const PAGEMAP_CHUNK: u64 = 32 * 1024;
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

// Guest memory offsets are u64 and host pointers usize: this crate is x86_64-only (CPUID), so
// the conversion below never truncates.
const _: () = assert!(usize::BITS == 64);

/// `x` as a host size or offset.
#[allow(clippy::cast_possible_truncation)]
const fn us(x: u64) -> usize {
    x as usize
}

/// Errors of writing, checking and overlaying memory files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A guest memory region is not a whole number of pages.
    #[error("guest memory region at {guest_base:#x} has length {len:#x}, not a multiple of 4096")]
    UnalignedRegion {
        /// The region's guest address.
        guest_base: u64,
        /// Its length.
        len: u64,
    },
    /// Creating or sizing the output file failed.
    #[error("creating memory file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing pages to the output file failed.
    #[error("writing memory file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Syncing the output file or renaming it into place failed.
    #[error("syncing memory file {path} and renaming it into place")]
    Sync {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/self/pagemap` could not be read (needed by `skip_unpopulated`).
    #[error("reading /proc/self/pagemap for skip_unpopulated (is /proc mounted?)")]
    Pagemap(#[source] std::io::Error),
    /// Opening or inspecting an input file failed.
    #[error("opening memory file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading pages from a diff file failed.
    #[error("reading memory file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file.
    #[error("memory file {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file's length is not guest memory's.
    #[error(
        "memory file {path} has {len} bytes, guest memory has {expected} (truncated or not this VM's)"
    )]
    FileLength {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Guest memory's length.
        expected: u64,
    },
    /// The dirty bitmaps are for a different number of regions.
    #[error("dirty page bitmaps cover {bitmaps} regions, guest memory has {regions}")]
    DirtyRegionCount {
        /// Bitmaps given.
        bitmaps: usize,
        /// Regions in guest memory.
        regions: usize,
    },
    /// A region's dirty bitmap has the wrong number of words, or bits past the region's end.
    #[error(
        "dirty page bitmap of region {region} does not fit it ({words} words for {pages} pages)"
    )]
    DirtyBitmapShape {
        /// The region's index.
        region: usize,
        /// Words given.
        words: usize,
        /// Pages in the region.
        pages: u64,
    },
    /// A guest range to mark dirty is not inside guest memory.
    #[error("guest range {addr:#x}+{len:#x} is not inside guest memory")]
    GuestRange {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A diff range is empty, unaligned, beyond guest memory, or out of order.
    #[error("diff range {offset:#x}+{len:#x} is invalid: {reason}")]
    BadRange {
        /// The range's file offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A region cannot be read (for writing a file) or written (for a copied overlay).
    #[error(
        "guest memory region at {guest_base:#x} is mapped with protection {prot:#x}, needs {needs}"
    )]
    Protection {
        /// The region's guest address.
        guest_base: u64,
        /// Its protection.
        prot: i32,
        /// What the operation needs.
        needs: &'static str,
    },
    /// The region an overlay would replace is not a private mapping.
    #[error(
        "guest memory region at {guest_base:#x} is not MAP_PRIVATE (or is hugetlbfs); a diff cannot be overlaid on it"
    )]
    NotPrivate {
        /// The region's guest address.
        guest_base: u64,
    },
    /// Mapping anonymous memory over the holes of a diff's ranges failed (a process out of
    /// mappings, or of memory); guest memory is partly overlaid and must be discarded.
    #[error("mapping anonymous memory over the holes of {path}")]
    FillHoles {
        /// The diff file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a diff range failed; guest memory is partly overlaid and must be discarded.
    #[error("mapping diff range {offset:#x}+{len:#x}")]
    Mmap {
        /// The range's file offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How [`write_memory`] reads guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Skip anonymous pages the process never faulted in, found through `/proc/self/pagemap`
    /// without touching them (they read as zero). Ignored for file-backed regions, whose
    /// unfaulted pages hold the file's data.
    pub skip_unpopulated: bool,
}

/// What writing a memory or diff file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Length of the file (= guest RAM).
    pub total_bytes: u64,
    /// Bytes written (the rest are holes).
    pub data_bytes: u64,
    /// Pages read to check whether they are zero.
    pub pages_scanned: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Wall time of the call, including the final fsync.
    pub elapsed: Duration,
}

/// A page-aligned byte range of a memory (or diff) file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Dirty 4 KiB pages per guest memory region, in the KVM dirty-log layout: bit `b` of word
/// `w` of region `r`'s bitmap is page `64 * w + b` of region `r`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    bitmaps: Vec<Vec<u64>>,
}

impl DirtyPages {
    /// Takes the bitmaps of `KVM_GET_DIRTY_LOG`, one per region in guest memory region order.
    /// Their shape is checked against guest memory where they are used.
    pub fn from_kvm_bitmaps(bitmaps: Vec<Vec<u64>>) -> Self {
        Self { bitmaps }
    }

    /// Every page of `mem`.
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        let bitmaps = mem
            .iter()
            .map(|r| {
                let pages = r.len().div_ceil(PAGE_SIZE);
                let mut words = vec![u64::MAX; words_for(pages)];
                if let Some(last) = words.last_mut() {
                    let used = pages % 64;
                    if used != 0 {
                        *last = (1u64 << used) - 1;
                    }
                }
                words
            })
            .collect();
        Self { bitmaps }
    }

    /// No page of `mem`.
    pub fn none(mem: &GuestMemoryMmap) -> Self {
        let bitmaps = mem
            .iter()
            .map(|r| vec![0; words_for(r.len().div_ceil(PAGE_SIZE))])
            .collect();
        Self { bitmaps }
    }

    /// Adds `other`'s pages (e.g. a later dirty-log read, or pages devices wrote).
    pub fn union(&mut self, other: &DirtyPages) -> Result<(), Error> {
        if self.bitmaps.len() != other.bitmaps.len() {
            return Err(Error::DirtyRegionCount {
                bitmaps: other.bitmaps.len(),
                regions: self.bitmaps.len(),
            });
        }
        for (region, (a, b)) in self.bitmaps.iter_mut().zip(&other.bitmaps).enumerate() {
            if a.len() != b.len() {
                return Err(Error::DirtyBitmapShape {
                    region,
                    words: b.len(),
                    pages: a.len() as u64 * 64,
                });
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
        Ok(())
    }

    /// Marks the pages of guest range `addr..addr+len` dirty: KVM's log misses what the VMM
    /// itself writes into guest memory (virtio devices), so the VMM adds those ranges here.
    pub fn mark_range(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u64,
    ) -> Result<(), Error> {
        let bad = || Error::GuestRange {
            addr: addr.raw_value(),
            len,
        };
        if len == 0 {
            return Ok(());
        }
        let end = addr.raw_value().checked_add(len).ok_or_else(bad)?;
        let (index, region) = mem
            .iter()
            .enumerate()
            .find(|(_, r)| addr >= r.start_addr() && addr <= r.last_addr())
            .ok_or_else(bad)?;
        let off = addr.raw_value() - region.start_addr().raw_value();
        if end - region.start_addr().raw_value() > region.len() {
            // Ranges spanning regions do not occur (regions are not adjacent in guest space).
            return Err(bad());
        }
        let bitmap = self.bitmaps.get_mut(index).ok_or_else(bad)?;
        let first = off / PAGE_SIZE;
        let last = (off + len - 1) / PAGE_SIZE;
        for page in first..=last {
            let word = bitmap.get_mut(us(page / 64)).ok_or_else(bad)?;
            *word |= 1 << (page % 64);
        }
        Ok(())
    }

    /// The number of dirty pages.
    pub fn count(&self) -> u64 {
        self.bitmaps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    fn check_shape(&self, regions: &[RegionView]) -> Result<(), Error> {
        if self.bitmaps.len() != regions.len() {
            return Err(Error::DirtyRegionCount {
                bitmaps: self.bitmaps.len(),
                regions: regions.len(),
            });
        }
        for (region, (bitmap, view)) in self.bitmaps.iter().zip(regions).enumerate() {
            let pages = view.len / PAGE_SIZE;
            let shape = Error::DirtyBitmapShape {
                region,
                words: bitmap.len(),
                pages,
            };
            if bitmap.len() != words_for(pages) {
                return Err(shape);
            }
            let used = pages % 64;
            if let Some(last) = bitmap.last()
                && used != 0
                && last >> used != 0
            {
                return Err(shape);
            }
        }
        Ok(())
    }
}

fn words_for(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// One guest memory region as this module sees it.
#[derive(Debug)]
struct RegionView {
    host: *mut u8,
    len: u64,
    guest_base: u64,
    /// Offset of the region in memory and diff files.
    file_base: u64,
    anonymous: bool,
    private: bool,
    prot: i32,
}

fn regions(mem: &GuestMemoryMmap) -> Result<(Vec<RegionView>, u64), Error> {
    let mut views = Vec::with_capacity(mem.num_regions());
    let mut file_base = 0u64;
    for region in mem.iter() {
        let region: &GuestRegionMmap = region;
        let len = region.len();
        let guest_base = region.start_addr().raw_value();
        if len % PAGE_SIZE != 0 {
            return Err(Error::UnalignedRegion { guest_base, len });
        }
        let flags = region.flags();
        views.push(RegionView {
            host: region.as_ptr(),
            len,
            guest_base,
            file_base,
            anonymous: GuestMemoryRegion::file_offset(region).is_none(),
            private: flags & libc::MAP_PRIVATE != 0
                && flags & libc::MAP_SHARED == 0
                && region.is_hugetlbfs() != Some(true),
            prot: region.prot(),
        });
        if region.prot() & libc::PROT_READ == 0 {
            return Err(Error::Protection {
                guest_base,
                prot: region.prot(),
                needs: "PROT_READ",
            });
        }
        file_base += len;
    }
    Ok((views, file_base))
}

/// Whether the page at `p` is all zero.
///
/// # Safety
/// `p` must be 8-byte aligned and point to `PAGE_SIZE` readable bytes that nothing writes
/// during the call.
unsafe fn is_zero_page(p: *const u8) -> bool {
    // SAFETY: the caller guarantees alignment, validity and no concurrent writes.
    let words = unsafe { std::slice::from_raw_parts(p.cast::<u64>(), WORDS_PER_PAGE) };
    // OR-folding 64-byte blocks vectorises; the early exit keeps data pages cheap.
    words
        .chunks_exact(8)
        .all(|block| block.iter().fold(0, |acc, w| acc | w) == 0)
}

/// Coalesces runs of pages contiguous both in memory and in the file into single `pwrite`s.
struct RunWriter<'a> {
    file: &'a File,
    path: &'a Path,
    host: *const u8,
    offset: u64,
    len: u64,
    pages_written: u64,
    data_bytes: u64,
}

impl<'a> RunWriter<'a> {
    fn new(file: &'a File, path: &'a Path) -> Self {
        Self {
            file,
            path,
            host: std::ptr::null(),
            offset: 0,
            len: 0,
            pages_written: 0,
            data_bytes: 0,
        }
    }

    /// Adds the page at `host` (file offset `offset`). Callers flush at every region end, so a
    /// run that is contiguous in the file is contiguous in memory too.
    fn push(&mut self, host: *const u8, offset: u64) -> Result<(), Error> {
        if self.len > 0 && (self.offset + self.len != offset || self.len >= MAX_WRITE) {
            self.flush()?;
        }
        if self.len == 0 {
            self.host = host;
            self.offset = offset;
        }
        self.len += PAGE_SIZE;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        let mut done = 0u64;
        while done < self.len {
            let rest = usize::try_from(self.len - done).unwrap_or(usize::MAX);
            let off = libc::off_t::try_from(self.offset + done).map_err(|_| Error::Write {
                path: self.path.to_path_buf(),
                source: std::io::Error::from_raw_os_error(libc::EFBIG),
            })?;
            // SAFETY: `host..host+len` lies in one guest memory region the caller borrows for
            // the whole write and keeps quiescent; pwrite only reads it.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    self.host.add(us(done)).cast(),
                    rest,
                    off,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Write {
                    path: self.path.to_path_buf(),
                    source: e,
                });
            }
            if n == 0 {
                return Err(Error::Write {
                    path: self.path.to_path_buf(),
                    source: std::io::ErrorKind::WriteZero.into(),
                });
            }
            done += n.cast_unsigned() as u64;
        }
        self.pages_written += self.len / PAGE_SIZE;
        self.data_bytes += self.len;
        self.len = 0;
        Ok(())
    }
}

/// A sparse output file of `total` bytes, all holes, that replaces `path` when committed.
pub(crate) fn create_sparse(path: &Path, total: u64) -> Result<AtomicFile, Error> {
    let cerr = |source| Error::Create {
        path: path.to_path_buf(),
        source,
    };
    let file = AtomicFile::create(path).map_err(cerr)?;
    file.file().set_len(total).map_err(cerr)?;
    Ok(file)
}

/// Reads the pagemap entries of `pages` pages from `addr`.
fn read_pagemap(pagemap: &File, addr: usize, pages: u64, out: &mut Vec<u64>) -> Result<(), Error> {
    let n = usize::try_from(pages)
        .map_err(|_| Error::Pagemap(std::io::ErrorKind::InvalidInput.into()))?;
    let mut bytes = vec![0u8; n * 8];
    pagemap
        .read_exact_at(&mut bytes, (addr as u64 / PAGE_SIZE) * 8)
        .map_err(Error::Pagemap)?;
    out.clear();
    out.extend(
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0xff; 8]))),
    );
    Ok(())
}

/// Writes all of guest memory to a sparse memory file at `path`: zero pages become holes,
/// non-zero runs are written with large `pwrite`s. The file is written under a temporary name,
/// fsynced and renamed over `path`, so a crash never leaves a torn file and a VM still mapping
/// an older `path` keeps its pages. The VM must be paused.
pub fn write_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
    opts: &WriteOptions,
) -> Result<MemoryStats, Error> {
    let start = Instant::now();
    let (views, total) = regions(mem)?;
    let out = create_sparse(path, total)?;
    let pagemap = if opts.skip_unpopulated && views.iter().any(|v| v.anonymous) {
        Some(File::open("/proc/self/pagemap").map_err(Error::Pagemap)?)
    } else {
        None
    };
    let mut writer = RunWriter::new(out.file(), path);
    let mut scanned = 0u64;
    let mut entries = Vec::new();
    for view in &views {
        let pages = view.len / PAGE_SIZE;
        let pagemap = pagemap.as_ref().filter(|_| view.anonymous);
        let mut first = 0u64;
        while first < pages {
            let count = (pages - first).min(PAGEMAP_CHUNK);
            // SAFETY: `first < pages`, so the offset is inside the region's mapping.
            let chunk_host = unsafe { view.host.add(us(first * PAGE_SIZE)) };
            if let Some(pm) = pagemap {
                read_pagemap(pm, chunk_host as usize, count, &mut entries)?;
            }
            for i in 0..count {
                if pagemap.is_some() && entries[us(i)] & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0 {
                    continue;
                }
                // SAFETY: page `first + i` is inside the region's mapping.
                let host = unsafe { chunk_host.add(us(i * PAGE_SIZE)) };
                scanned += 1;
                // SAFETY: a page of a page-aligned mapping the caller keeps quiescent.
                if !unsafe { is_zero_page(host) } {
                    writer.push(host, view.file_base + (first + i) * PAGE_SIZE)?;
                }
            }
            first += count;
        }
        writer.flush()?;
    }
    let (data_bytes, pages_written) = (writer.data_bytes, writer.pages_written);
    out.commit().map_err(|source| Error::Sync {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(MemoryStats {
        total_bytes: total,
        data_bytes,
        pages_scanned: scanned,
        pages_written,
        elapsed: start.elapsed(),
    })
}

/// Writes the `dirty` pages of guest memory to a sparse diff file at `path` of full memory
/// length, each at its memory-file offset (zero dirty pages stay holes), and returns the
/// coalesced ranges the diff covers. Replaces `path` atomically like [`write_memory`]. The VM
/// must be paused.
pub fn write_memory_diff(
    mem: &GuestMemoryMmap,
    path: &Path,
    dirty: &DirtyPages,
) -> Result<(Vec<PageRange>, MemoryStats), Error> {
    let start = Instant::now();
    let (views, total) = regions(mem)?;
    dirty.check_shape(&views)?;
    let out = create_sparse(path, total)?;
    let mut writer = RunWriter::new(out.file(), path);
    let mut ranges: Vec<PageRange> = Vec::new();
    let mut scanned = 0u64;
    for (view, bitmap) in views.iter().zip(&dirty.bitmaps) {
        for (w, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let offset = view.file_base + page * PAGE_SIZE;
                match ranges.last_mut() {
                    Some(last) if last.offset + last.len == offset => last.len += PAGE_SIZE,
                    _ => ranges.push(PageRange {
                        offset,
                        len: PAGE_SIZE,
                    }),
                }
                // SAFETY: check_shape guarantees `page` is inside the region's mapping.
                let host = unsafe { view.host.add(us(page * PAGE_SIZE)) };
                scanned += 1;
                // SAFETY: a page of a page-aligned mapping the caller keeps quiescent.
                if !unsafe { is_zero_page(host) } {
                    writer.push(host, offset)?;
                }
            }
        }
        writer.flush()?;
    }
    let (data_bytes, pages_written) = (writer.data_bytes, writer.pages_written);
    out.commit().map_err(|source| Error::Sync {
        path: path.to_path_buf(),
        source,
    })?;
    let stats = MemoryStats {
        total_bytes: total,
        data_bytes,
        pages_scanned: scanned,
        pages_written,
        elapsed: start.elapsed(),
    };
    Ok((ranges, stats))
}

/// Checks that `path` is a regular file of exactly `expected_len` bytes, so that a truncated
/// or foreign memory file is refused before it is mapped (a mapping past the end of a file
/// faults with SIGBUS on first touch).
pub fn check_memory_file(path: &Path, expected_len: u64) -> Result<(), Error> {
    let file = File::open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    check_open_file(&file, path, expected_len)
}

pub(crate) fn check_open_file(file: &File, path: &Path, expected: u64) -> Result<(), Error> {
    let meta = file.metadata().map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() != expected {
        return Err(Error::FileLength {
            path: path.to_path_buf(),
            len: meta.len(),
            expected,
        });
    }
    Ok(())
}

/// Checks a diff's range list from an untrusted vmstate against a memory of `total` bytes:
/// every range non-empty, page-aligned, inside memory, and after the previous one.
pub(crate) fn check_ranges(ranges: &[PageRange], total: u64) -> Result<(), Error> {
    let mut prev_end = 0u64;
    for r in ranges {
        let bad = |reason| Error::BadRange {
            offset: r.offset,
            len: r.len,
            reason,
        };
        if r.len == 0 {
            return Err(bad("empty"));
        }
        if r.offset % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
            return Err(bad("not page aligned"));
        }
        let end = r
            .offset
            .checked_add(r.len)
            .ok_or_else(|| bad("overflows"))?;
        if end > total {
            return Err(bad("beyond the end of guest memory"));
        }
        if r.offset < prev_end {
            return Err(bad("overlaps or precedes the previous range"));
        }
        prev_end = end;
    }
    Ok(())
}

/// Replaces the `ranges` of guest memory (memory-file offsets, as [`write_memory_diff`]
/// returned them) with the same ranges of the diff file, copy-on-write.
///
/// Guest memory must be private mappings (`MAP_PRIVATE`, anonymous or of a base memory file,
/// not hugetlbfs) and not yet in use: call it after mapping the base and before registering
/// memory with KVM or starting vCPUs. Apply a chain oldest diff first. The ranges and the
/// file length are validated before anything is changed. Up to [`MAX_OVERLAY_MAPPINGS`]
/// pieces (ranges split at region boundaries) are mapped `MAP_PRIVATE | MAP_FIXED` over the
/// existing memory, lazily, nothing copied; beyond that bound the pieces are instead copied
/// into guest memory with `pread`, so the process stays far from `vm.max_map_count` (each
/// mapping can add two VMAs; flatten long diff chains rather than relying on this). The diff
/// file must not change afterwards. If a mapping fails midway, guest memory is partly
/// overlaid and must be discarded.
pub fn map_overlay(mem: &GuestMemoryMmap, diff: &Path, ranges: &[PageRange]) -> Result<(), Error> {
    map_overlay_bounded(mem, diff, ranges, MAX_OVERLAY_MAPPINGS)
}

/// A piece of a diff range inside one region.
struct Piece {
    guest_base: u64,
    host: *mut u8,
    prot: i32,
    offset: u64,
    len: u64,
}

fn map_overlay_bounded(
    mem: &GuestMemoryMmap,
    diff: &Path,
    ranges: &[PageRange],
    max_mappings: usize,
) -> Result<(), Error> {
    let (views, total) = regions(mem)?;
    let file = File::open(diff).map_err(|source| Error::Open {
        path: diff.to_path_buf(),
        source,
    })?;
    check_open_file(&file, diff, total)?;
    check_ranges(ranges, total)?;
    let mut pieces = Vec::new();
    for r in ranges {
        let end = r.offset + r.len;
        for view in &views {
            let lo = r.offset.max(view.file_base);
            let hi = end.min(view.file_base + view.len);
            if lo >= hi {
                continue;
            }
            if !view.private {
                return Err(Error::NotPrivate {
                    guest_base: view.guest_base,
                });
            }
            pieces.push(Piece {
                guest_base: view.guest_base,
                // SAFETY: `lo - file_base < view.len`, inside the region's mapping.
                host: unsafe { view.host.add(us(lo - view.file_base)) },
                prot: view.prot,
                offset: lo,
                len: hi - lo,
            });
        }
    }
    if pieces.len() <= max_mappings {
        for p in &pieces {
            map_piece(&file, p)?;
        }
        // Zero pages written since the parent are holes of the diff: anonymous memory over
        // them, or on tmpfs each one the guest touches takes a page of the file system.
        let ranges: Vec<PageRange> = pieces
            .iter()
            .map(|p| PageRange {
                offset: p.offset,
                len: p.len,
            })
            .collect();
        let host = |offset: u64| {
            let i = pieces.partition_point(|p| p.offset + p.len <= offset);
            let p = &pieces[i.min(pieces.len() - 1)];
            // SAFETY: `offset` lies in piece `p` (a hole found inside its range), whose
            // mapping it stays inside.
            (unsafe { p.host.add(us(offset - p.offset)) }, p.prot)
        };
        // SAFETY: each piece was just mapped privately from this diff file at its own offset,
        // and guest memory is not in use yet (see this function's contract).
        unsafe { crate::holes::fill_holes(&file, &ranges, &host) }.map_err(|source| {
            Error::FillHoles {
                path: diff.to_path_buf(),
                source,
            }
        })?;
    } else {
        // The copy writes through the mapping.
        if let Some(p) = pieces.iter().find(|p| p.prot & libc::PROT_WRITE == 0) {
            return Err(Error::Protection {
                guest_base: p.guest_base,
                prot: p.prot,
                needs: "PROT_WRITE",
            });
        }
        for p in &pieces {
            copy_piece(&file, diff, p)?;
        }
    }
    Ok(())
}

fn map_piece(file: &File, p: &Piece) -> Result<(), Error> {
    let merr = |source| Error::Mmap {
        offset: p.offset,
        len: p.len,
        source,
    };
    let off = libc::off_t::try_from(p.offset)
        .map_err(|_| merr(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
    // SAFETY: `p.host..p.host+p.len` lies inside a private guest memory mapping that the
    // caller borrows and does not use meanwhile; MAP_FIXED replaces exactly those pages with a
    // private mapping of the diff file, which was checked to cover them. The region's Drop
    // still unmaps its whole range, which includes the replacement.
    let addr = unsafe {
        libc::mmap(
            p.host.cast(),
            us(p.len),
            p.prot,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            off,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(merr(std::io::Error::last_os_error()));
    }
    if addr.cast::<u8>() != p.host {
        // MAP_FIXED never places elsewhere; if it did, the old pages would still be in place.
        return Err(merr(std::io::Error::other("mmap ignored MAP_FIXED")));
    }
    Ok(())
}

fn copy_piece(file: &File, path: &Path, p: &Piece) -> Result<(), Error> {
    let mut done = 0u64;
    while done < p.len {
        let chunk = (p.len - done).min(MAX_WRITE);
        // SAFETY: `p.host+done..+chunk` lies inside a writable private guest memory mapping
        // the caller borrows and does not use meanwhile; it is only written through this slice.
        let buf = unsafe { std::slice::from_raw_parts_mut(p.host.add(us(done)), us(chunk)) };
        file.read_exact_at(buf, p.offset + done)
            .map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
        done += chunk;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{Bytes, FileOffset};

    use super::*;

    const MIB: usize = 1 << 20;

    /// Two anonymous regions with a gap between them in guest space, like RAM below and above
    /// the PCI hole; THP off so that pagemap counts are exact.
    pub(crate) fn anon_mem(lens: &[usize]) -> GuestMemoryMmap {
        let mut base = 0u64;
        let ranges: Vec<_> = lens
            .iter()
            .map(|&len| {
                let r = (GuestAddress(base), len);
                base += len as u64 + 0x1000_0000;
                r
            })
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        for r in mem.iter() {
            // SAFETY: exactly the region's own mapping; only changes how it is backed.
            let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.size(), libc::MADV_NOHUGEPAGE) };
            assert_eq!(rc, 0);
        }
        mem
    }

    /// Guest memory of the same layout as `like`, mapped MAP_PRIVATE from `path`.
    pub(crate) fn file_mem(path: &Path, like: &GuestMemoryMmap) -> GuestMemoryMmap {
        let file = Arc::new(File::open(path).unwrap());
        let mut off = 0u64;
        let regions: Vec<_> = like
            .iter()
            .map(|r| {
                let region = MmapRegionBuilder::new(us(r.len()))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .with_file_offset(FileOffset::from_arc(file.clone(), off))
                    .build()
                    .unwrap();
                off += r.len();
                GuestRegionMmap::new(region, r.start_addr()).unwrap()
            })
            .collect();
        GuestMemoryMmap::from_regions(regions).unwrap()
    }

    pub(crate) fn contents(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut out = Vec::new();
        for r in mem.iter() {
            let mut buf = vec![0u8; us(r.len())];
            mem.read_slice(&mut buf, r.start_addr()).unwrap();
            out.extend_from_slice(&buf);
        }
        out
    }

    /// Guest address of memory-file offset `off`.
    pub(crate) fn gpa(mem: &GuestMemoryMmap, mut off: u64) -> GuestAddress {
        for r in mem.iter() {
            if off < r.len() {
                return r.start_addr().unchecked_add(off);
            }
            off -= r.len();
        }
        panic!("offset beyond memory");
    }

    pub(crate) fn fill_page(mem: &GuestMemoryMmap, off: u64, byte: u8) {
        mem.write_slice(&[byte; us(PAGE_SIZE)], gpa(mem, off))
            .unwrap();
    }

    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn write_memory_makes_zero_pages_holes_and_reads_back_equal() {
        let mem = anon_mem(&[2 * MIB, MIB]);
        for (off, b) in [
            (0, 1),
            (0x1000, 2),
            (0x5000, 3),
            (2 * MIB as u64, 4),
            (3 * MIB as u64 - 0x1000, 5),
        ] {
            fill_page(&mem, off, b);
        }
        // A page with one non-zero byte at its very end must count as data.
        mem.write_obj(9u8, gpa(&mem, 0x9fff)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let stats = write_memory(&mem, &path, &WriteOptions::default()).unwrap();
        assert_eq!(stats.total_bytes, 3 * MIB as u64);
        assert_eq!(stats.pages_scanned, 3 * MIB as u64 / PAGE_SIZE);
        assert_eq!(stats.pages_written, 6);
        assert_eq!(stats.data_bytes, 6 * PAGE_SIZE);
        assert_eq!(std::fs::read(&path).unwrap(), contents(&mem));
        assert!(
            allocated_bytes(&path) <= 6 * PAGE_SIZE + 64 * 1024,
            "{}",
            allocated_bytes(&path)
        );
    }

    #[test]
    fn skip_unpopulated_scans_only_touched_pages_and_writes_the_same_file() {
        let mem = anon_mem(&[4 * MIB, 2 * MIB]);
        let touched = [0u64, 0x3000, 0x4000, 4 * MIB as u64 + 0x2000];
        for (i, &off) in touched.iter().enumerate() {
            fill_page(&mem, off, u8::try_from(i).unwrap() + 1);
        }
        // Touched but zero again: present, scanned, not written.
        fill_page(&mem, 0x8000, 7);
        fill_page(&mem, 0x8000, 0);
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full");
        let skip = dir.path().join("skip");
        let stats = write_memory(
            &mem,
            &skip,
            &WriteOptions {
                skip_unpopulated: true,
            },
        )
        .unwrap();
        // Second: reading every page maps the zero page everywhere, which pagemap reports.
        write_memory(&mem, &full, &WriteOptions::default()).unwrap();
        assert_eq!(stats.pages_scanned, 5);
        assert_eq!(stats.pages_written, 4);
        assert_eq!(std::fs::read(&skip).unwrap(), std::fs::read(&full).unwrap());
    }

    #[test]
    fn skip_unpopulated_with_huge_pages_writes_the_same_file() {
        // 8 MiB with MADV_HUGEPAGE: a touched page may fault in its whole 2 MiB, every 4 KiB
        // part of which pagemap reports present; the output must not depend on it.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * MIB)]).unwrap();
        let r = mem.iter().next().unwrap();
        // SAFETY: exactly the region's own mapping; only changes how it is backed.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.size(), libc::MADV_HUGEPAGE) };
        assert_eq!(rc, 0, "MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
        fill_page(&mem, 0x1000, 1);
        fill_page(&mem, 5 * MIB as u64 + 0x3000, 2);
        let dir = tempfile::tempdir().unwrap();
        let skip = dir.path().join("skip");
        let stats = write_memory(
            &mem,
            &skip,
            &WriteOptions {
                skip_unpopulated: true,
            },
        )
        .unwrap();
        assert!((2..=1024).contains(&stats.pages_scanned), "{stats:?}");
        assert_eq!(stats.pages_written, 2);
        assert!(std::fs::read(&skip).unwrap() == contents(&mem));
    }

    #[test]
    fn skip_unpopulated_still_copies_unfaulted_pages_of_a_file_mapping() {
        let src = anon_mem(&[MIB, MIB]);
        fill_page(&src, 0x2000, 0x11);
        fill_page(&src, MIB as u64 + 0x1000, 0x22);
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write_memory(&src, &base, &WriteOptions::default()).unwrap();
        // Nothing of this mapping is faulted in, yet its pages hold the base file's data.
        let restored = file_mem(&base, &src);
        let out = dir.path().join("out");
        let stats = write_memory(
            &restored,
            &out,
            &WriteOptions {
                skip_unpopulated: true,
            },
        )
        .unwrap();
        assert_eq!(stats.pages_written, 2);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&base).unwrap());
    }

    #[test]
    fn rewriting_the_file_memory_is_mapped_from_keeps_the_mapping_intact() {
        let src = anon_mem(&[MIB]);
        fill_page(&src, 0x3000, 0x33);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        write_memory(&src, &path, &WriteOptions::default()).unwrap();
        let restored = file_mem(&path, &src);
        fill_page(&restored, 0x5000, 0x55);
        // Snapshot the restored VM to the very file it maps (nothing of it faulted in yet but
        // page 5): the new file has both pages, and the mapping still reads the old inode.
        write_memory(&restored, &path, &WriteOptions::default()).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!((file[0x3000], file[0x5000]), (0x33, 0x55));
        fill_page(&src, 0x3000, 0x44);
        write_memory(&src, &path, &WriteOptions::default()).unwrap();
        assert_eq!(
            restored.read_obj::<u8>(gpa(&restored, 0x3000)).unwrap(),
            0x33
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn dirty_pages_from_kvm_bitmaps_are_checked_against_memory() {
        let mem = anon_mem(&[MIB, 2 * MIB]); // 256 and 512 pages: 4 and 8 words
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diff");
        let wrong_count = DirtyPages::from_kvm_bitmaps(vec![vec![0; 4]]);
        assert!(matches!(
            write_memory_diff(&mem, &path, &wrong_count),
            Err(Error::DirtyRegionCount {
                bitmaps: 1,
                regions: 2
            })
        ));
        let wrong_len = DirtyPages::from_kvm_bitmaps(vec![vec![0; 4], vec![0; 9]]);
        assert!(matches!(
            write_memory_diff(&mem, &path, &wrong_len),
            Err(Error::DirtyBitmapShape { region: 1, .. })
        ));
        let odd = anon_mem(&[MIB + 0x1000]); // 257 pages: bits past page 256 are invalid
        let past_end = DirtyPages::from_kvm_bitmaps(vec![vec![0, 0, 0, 0, 0b10]]);
        assert!(matches!(
            write_memory_diff(&odd, &path, &past_end),
            Err(Error::DirtyBitmapShape { region: 0, .. })
        ));
        let all = DirtyPages::all(&odd);
        assert_eq!(all.count(), 257);
        assert!(write_memory_diff(&odd, &path, &all).is_ok());
    }

    #[test]
    fn union_and_mark_range_add_pages() {
        let mem = anon_mem(&[MIB, MIB]);
        let mut a = DirtyPages::from_kvm_bitmaps(vec![vec![1, 0, 0, 0], vec![0; 4]]);
        let b = DirtyPages::from_kvm_bitmaps(vec![vec![2, 0, 0, 0], vec![0, 0, 0, 1 << 63]]);
        a.union(&b).unwrap();
        assert_eq!(a.count(), 3);
        let second = mem.iter().nth(1).unwrap().start_addr();
        // 0x10 bytes straddling pages 1 and 2 of the second region.
        a.mark_range(&mem, second.unchecked_add(0x1ff8), 0x10)
            .unwrap();
        assert_eq!(a.count(), 5);
        assert!(matches!(
            a.mark_range(&mem, second.unchecked_add(MIB as u64 - 8), 16),
            Err(Error::GuestRange { .. })
        ));
        assert!(matches!(
            a.mark_range(&mem, GuestAddress(MIB as u64 + 0x10), 1),
            Err(Error::GuestRange { .. })
        ));
        let c = DirtyPages::from_kvm_bitmaps(vec![vec![0; 4]]);
        assert!(a.union(&c).is_err());
        assert_eq!(DirtyPages::none(&mem).count(), 0);
    }

    #[test]
    fn diff_ranges_are_coalesced_across_the_region_boundary() {
        let mem = anon_mem(&[MIB, MIB]);
        fill_page(&mem, MIB as u64 - 0x1000, 1);
        // Last page of region 0, first two of region 1 (the second one zero), and page 9.
        let dirty = DirtyPages::from_kvm_bitmaps(vec![
            vec![0, 0, 0, 1 << 63],
            vec![0b10_0000_0011, 0, 0, 0],
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diff");
        let (ranges, stats) = write_memory_diff(&mem, &path, &dirty).unwrap();
        assert_eq!(
            ranges,
            vec![
                PageRange {
                    offset: MIB as u64 - 0x1000,
                    len: 0x3000
                },
                PageRange {
                    offset: MIB as u64 + 0x9000,
                    len: 0x1000
                },
            ]
        );
        assert_eq!((stats.pages_scanned, stats.pages_written), (4, 1));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * MIB as u64);
    }

    /// base, then diff1, then diff2: the restored memory must equal the memory at diff2's time,
    /// including a page that diff1 wrote and diff2 zeroed (a hole in diff2).
    fn check_chain(max_mappings: usize) {
        let mem = anon_mem(&[2 * MIB, MIB]);
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        for off in [0u64, 0x1000, 0x10_0000, 2 * MIB as u64] {
            fill_page(&mem, off, 0xb0);
        }
        write_memory(&mem, &p("base"), &WriteOptions::default()).unwrap();
        let base_bytes = std::fs::read(p("base")).unwrap();

        let mut dirty1 = DirtyPages::none(&mem);
        for (off, b) in [
            (0x1000u64, 0xd1),
            (0x2000, 0xd1),
            (2 * MIB as u64 - 0x1000, 0xd1),
            (2 * MIB as u64, 0xd1),
        ] {
            fill_page(&mem, off, b);
            dirty1.mark_range(&mem, gpa(&mem, off), PAGE_SIZE).unwrap();
        }
        let (r1, _) = write_memory_diff(&mem, &p("diff1"), &dirty1).unwrap();

        let mut dirty2 = DirtyPages::none(&mem);
        for (off, b) in [
            (0x2000u64, 0),
            (0x1000, 0xd2),
            (0x10_0000, 0),
            (3 * MIB as u64 - 0x1000, 0xd2),
        ] {
            fill_page(&mem, off, b);
            dirty2.mark_range(&mem, gpa(&mem, off), PAGE_SIZE).unwrap();
        }
        let (r2, _) = write_memory_diff(&mem, &p("diff2"), &dirty2).unwrap();

        let restored = file_mem(&p("base"), &mem);
        map_overlay_bounded(&restored, &p("diff1"), &r1, max_mappings).unwrap();
        map_overlay_bounded(&restored, &p("diff2"), &r2, max_mappings).unwrap();
        assert!(
            contents(&restored) == contents(&mem),
            "restored memory differs"
        );
        // Guest writes after the restore stay private to this process.
        fill_page(&restored, 0x1000, 0xee);
        fill_page(&restored, 0x5000, 0xee);
        assert!(std::fs::read(p("base")).unwrap() == base_bytes);
        assert_eq!(std::fs::read(p("diff2")).unwrap()[0x1000], 0xd2);
    }

    #[test]
    fn base_and_two_diffs_restore_exactly_with_mappings() {
        check_chain(MAX_OVERLAY_MAPPINGS);
    }

    #[test]
    fn base_and_two_diffs_restore_exactly_with_the_copy_fallback() {
        check_chain(0);
    }

    #[test]
    fn overlay_refuses_bad_ranges_and_files_before_changing_anything() {
        let mem = anon_mem(&[MIB]);
        fill_page(&mem, 0, 0x42);
        let dir = tempfile::tempdir().unwrap();
        let diff = dir.path().join("diff");
        std::fs::File::create(&diff)
            .unwrap()
            .set_len(MIB as u64)
            .unwrap();
        let r = |offset, len| PageRange { offset, len };
        for (ranges, reason) in [
            (vec![r(0, 0)], "empty"),
            (vec![r(0x800, 0x1000)], "aligned"),
            (vec![r(MIB as u64 - 0x1000, 0x2000)], "beyond"),
            (vec![r(u64::MAX - 0xfff, 0x1000)], "overflows"),
            (vec![r(0x2000, 0x1000), r(0x1000, 0x1000)], "overlaps"),
            (vec![r(0x0, 0x2000), r(0x1000, 0x1000)], "overlaps"),
        ] {
            let err = map_overlay(&mem, &diff, &ranges).unwrap_err();
            assert!(matches!(err, Error::BadRange { .. }), "{err}");
            assert!(err.to_string().contains(reason), "{err}");
        }
        let short = dir.path().join("short");
        std::fs::File::create(&short)
            .unwrap()
            .set_len(MIB as u64 - 0x1000)
            .unwrap();
        let err = map_overlay(&mem, &short, &[r(0, 0x1000)]).unwrap_err();
        assert!(matches!(err, Error::FileLength { .. }), "{err}");
        assert!(matches!(
            map_overlay(&mem, dir.path(), &[r(0, 0x1000)]),
            Err(Error::NotAFile { .. })
        ));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0x42);
    }

    #[test]
    fn overlay_refuses_shared_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("shared");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(MIB as u64)
            .unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .open(&backing)
            .unwrap();
        let region = vm_memory::mmap::MmapRegion::from_file(FileOffset::new(file, 0), MIB).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(region, GuestAddress(0)).unwrap(),
        ])
        .unwrap();
        let err = map_overlay(
            &mem,
            &backing,
            &[PageRange {
                offset: 0,
                len: 0x1000,
            }],
        )
        .unwrap_err();
        assert!(matches!(err, Error::NotPrivate { guest_base: 0 }), "{err}");
    }

    fn anon_with_prot(prot: i32) -> GuestMemoryMmap {
        let region = MmapRegionBuilder::new(MIB)
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap()
    }

    #[test]
    fn unreadable_memory_and_copy_into_read_only_memory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let none = anon_with_prot(libc::PROT_NONE);
        let err = write_memory(&none, &path, &WriteOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protection {
                    needs: "PROT_READ",
                    ..
                }
            ),
            "{err}"
        );
        let ro = anon_with_prot(libc::PROT_READ);
        write_memory(&ro, &path, &WriteOptions::default()).unwrap();
        let range = [PageRange {
            offset: 0,
            len: 0x1000,
        }];
        let err = map_overlay_bounded(&ro, &path, &range, 0).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protection {
                    needs: "PROT_WRITE",
                    ..
                }
            ),
            "{err}"
        );
        // Mapping keeps the region's protection, so it needs no write access.
        map_overlay(&ro, &path, &range).unwrap();
    }

    #[test]
    fn check_memory_file_refuses_truncated_and_non_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(0x3000)
            .unwrap();
        check_memory_file(&path, 0x3000).unwrap();
        let err = check_memory_file(&path, 0x4000).unwrap_err();
        assert!(matches!(
            err,
            Error::FileLength {
                len: 0x3000,
                expected: 0x4000,
                ..
            }
        ));
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(matches!(
            check_memory_file(dir.path(), 0),
            Err(Error::NotAFile { .. })
        ));
        assert!(matches!(
            check_memory_file(&dir.path().join("nope"), 0),
            Err(Error::Open { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Range lists from an untrusted vmstate: accepted exactly when they are valid, and then
        /// applied exactly; refused ones leave memory untouched.
        #[test]
        fn any_range_list_is_applied_exactly_or_refused_untouched(
            raw in prop::collection::vec((0u64..36, 0u64..6, 0u64..4), 0..6),
            cumulative in any::<bool>(),
            copy in any::<bool>(),
        ) {
            const PAGES: u64 = 32; // two regions of 16 pages
            let layout = anon_mem(&[us(16 * PAGE_SIZE), us(16 * PAGE_SIZE)]);
            let dir = tempfile::tempdir().unwrap();
            for page in 0..PAGES {
                fill_page(&layout, page * PAGE_SIZE, u8::try_from(page).unwrap() + 1);
            }
            write_memory(&layout, &dir.path().join("base"), &WriteOptions::default()).unwrap();
            for page in 0..PAGES {
                fill_page(&layout, page * PAGE_SIZE, u8::try_from(page).unwrap() + 0x80);
            }
            write_memory(&layout, &dir.path().join("diff"), &WriteOptions::default()).unwrap();
            // Third field: 1 = offset off by 512, 2 = length off by 512, else aligned.
            // `cumulative` makes most lists ordered (each range a small gap after the last).
            let mut next = 0;
            let ranges: Vec<PageRange> = raw
                .iter()
                .map(|&(page, count, skew)| {
                    let page = if cumulative { next + page % 3 } else { page };
                    next = page + count;
                    PageRange {
                        offset: page * PAGE_SIZE + if skew == 1 { 512 } else { 0 },
                        len: count * PAGE_SIZE + if skew == 2 { 512 } else { 0 },
                    }
                })
                .collect();
            let mut valid = true;
            let mut prev_end = 0;
            for r in &ranges {
                let end = r.offset + r.len;
                valid &= r.len > 0
                    && r.offset % PAGE_SIZE == 0
                    && r.len % PAGE_SIZE == 0
                    && end <= PAGES * PAGE_SIZE
                    && r.offset >= prev_end;
                prev_end = end;
            }
            let mem = file_mem(&dir.path().join("base"), &layout);
            let max = if copy { 0 } else { MAX_OVERLAY_MAPPINGS };
            let result = map_overlay_bounded(&mem, &dir.path().join("diff"), &ranges, max);
            prop_assert_eq!(result.is_ok(), valid, "{:?} {:?}", ranges, result);
            let bytes = contents(&mem);
            for page in 0..PAGES {
                let off = page * PAGE_SIZE;
                let overlaid = valid && ranges.iter().any(|r| (r.offset..r.offset + r.len).contains(&off));
                let want = u8::try_from(page).unwrap() + if overlaid { 0x80 } else { 1 };
                prop_assert_eq!(bytes[us(off)], want, "page {}", page);
            }
        }

        /// Any sequence of page writes split into any number of diffs restores exactly.
        #[test]
        fn any_diff_chain_restores_exactly(
            steps in prop::collection::vec(
                prop::collection::vec((0u64..96, any::<u8>()), 0..12),
                1..4,
            ),
            copy in any::<bool>(),
        ) {
            // 64 + 32 pages in two regions.
            let mem = anon_mem(&[us(64 * PAGE_SIZE), us(32 * PAGE_SIZE)]);
            let dir = tempfile::tempdir().unwrap();
            write_memory(&mem, &dir.path().join("base"), &WriteOptions { skip_unpopulated: true }).unwrap();
            let mut diffs = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                let mut dirty = DirtyPages::none(&mem);
                for &(page, byte) in step {
                    fill_page(&mem, page * PAGE_SIZE, byte);
                    dirty.mark_range(&mem, gpa(&mem, page * PAGE_SIZE), 1).unwrap();
                }
                let path = dir.path().join(format!("diff{i}"));
                let (ranges, _) = write_memory_diff(&mem, &path, &dirty).unwrap();
                diffs.push((path, ranges));
            }
            let restored = file_mem(&dir.path().join("base"), &mem);
            for (path, ranges) in &diffs {
                map_overlay_bounded(&restored, path, ranges, if copy { 0 } else { MAX_OVERLAY_MAPPINGS }).unwrap();
            }
            prop_assert!(contents(&restored) == contents(&mem));
        }
    }
}
