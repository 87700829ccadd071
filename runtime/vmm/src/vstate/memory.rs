//! Guest memory: one `MAP_PRIVATE` mapping per RAM region, anonymous for a fresh boot or over a
//! memory file for a restore, with transparent huge pages asked for.
//!
//! Why `MAP_PRIVATE` everywhere: a restored VM must never write back into the snapshot file
//! (pages load lazily from the page cache, and every VM restored from one file shares the
//! clean ones), and a live fork relies on `fork(2)` copying private mappings copy-on-write.
//! Why huge pages: a fork's pause is the page-table copy, which is 512x smaller with 2 MiB
//! pages (DESIGN.md section 6). Only the anonymous mapping gets them: a memory file's private
//! mapping stays at 4 KiB (the copies of written pages are anonymous pages inside a file-backed
//! mapping, which no THP path handles), so forking a restored VM copies one entry per page it
//! touched (docs/benchmarks.md, fork).
//!
//! The holes of a memory file (its zero pages) are mapped anonymous over the file's mapping
//! (`specc_snapshot::holes`): over the file, every hole page the guest touched would first
//! get a page-cache page, which on tmpfs is a page of the file system (a store on a nearly
//! full tmpfs made the guest's page faults fail). Anonymous, they are zero pages until
//! written, as in a booted VM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::x86_64::layout::ram_regions;

/// Where guest RAM comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum MemoryBacking {
    /// Zero-filled anonymous memory (a fresh boot).
    Anonymous,
    /// A private mapping of a memory file (a snapshot restore): the regions lie back to back in
    /// the file in guest-address order; guest writes never reach the file.
    File {
        /// The memory file.
        path: PathBuf,
    },
}

/// Errors of creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested size is zero or not page aligned.
    #[error("guest memory size {0} is not a positive multiple of 4096")]
    Size(u64),
    /// Opening the memory file failed.
    #[error("opening memory file {path}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The memory file is shorter than guest memory.
    #[error("memory file {path} has {len} bytes, guest memory needs {needed}")]
    FileTooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The guest memory size.
        needed: u64,
    },
    /// Mapping anonymous memory over the holes of the memory file failed.
    #[error("mapping anonymous memory over the holes of memory file {path}")]
    FillHoles {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("mapping guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// A region does not fit the address space (cannot happen with the fixed layout).
    #[error("guest memory region at {0:#x} is invalid")]
    Region(u64),
    /// Assembling the regions failed.
    #[error("assembling guest memory")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
    /// A system call of moving guest memory into anonymous huge pages failed; guest memory is
    /// as it was.
    #[error("promoting guest memory to anonymous huge pages: {0}")]
    Promote(&'static str, #[source] std::io::Error),
    /// Swapping the mappings failed and so did putting the old ones back: the guest's memory
    /// is lost and the VM must end.
    #[error("promoting guest memory: {0}; putting the old mapping back failed too")]
    PromoteLost(&'static str, #[source] std::io::Error),
}

/// Creates guest RAM of `mem_bytes` following the fixed layout.
pub fn create(
    mem_bytes: u64,
    backing: &MemoryBacking,
    hugepages: bool,
) -> Result<GuestMemoryMmap, Error> {
    create_with(mem_bytes, backing, hugepages, false)
}

/// Free pages of the host's 2 MiB hugetlb pool (0 if there is none).
pub fn hugetlb_free_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Anonymous guest RAM from the hugetlb pool: `MAP_PRIVATE | MAP_HUGETLB`, reserved at
/// `mmap` (no `MAP_NORESERVE`), so a pool without the pages refuses here instead of a fault
/// failing later. `None` (with the reason logged) when the layout's regions are not whole
/// 2 MiB pages or the pool cannot hold them.
fn create_hugetlb(mem_bytes: u64) -> Option<GuestMemoryMmap> {
    let regions = ram_regions(mem_bytes);
    if regions
        .iter()
        .any(|&(_, len)| !len.is_multiple_of(HUGE as u64))
    {
        tracing::warn!(
            "guest RAM of {mem_bytes} bytes is not whole 2 MiB pages: using transparent huge \
             pages, not the hugetlb pool"
        );
        return None;
    }
    let mut out = Vec::new();
    for (start, len) in regions {
        let size = usize::try_from(len).ok()?;
        let built = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB)
            .with_hugetlbfs(true)
            .build();
        match built {
            Ok(region) => out.push(GuestRegionMmap::new(region, GuestAddress(start))?),
            Err(e) => {
                tracing::warn!(
                    "the hugetlb pool cannot hold guest RAM ({} free 2 MiB pages, {} needed: \
                     {e}): using transparent huge pages",
                    hugetlb_free_pages(),
                    mem_bytes / HUGE as u64
                );
                return None;
            }
        }
    }
    GuestMemoryMmap::from_regions(out).ok()
}

/// [`create`], and with `hugetlb` anonymous RAM comes from the host's 2 MiB hugetlb pool when
/// it has the pages (one page-table entry per 2 MiB and no page table to deposit: `fork(2)`
/// costs ~0.2 ms at 2 GiB against ~1.3 ms with transparent huge pages, docs/benchmarks.md),
/// else from transparent huge pages as without it. Which one was used is logged at info.
///
/// The price of hugetlb: copy-on-write after a fork copies 2 MiB, not 4 KiB, from the pool,
/// and a process that finds the pool empty then cannot write the page (the kernel takes the
/// page from the children if the source needs it, and a child that needs one fails): size the
/// pool for the source's RAM plus what its children will write.
pub fn create_with(
    mem_bytes: u64,
    backing: &MemoryBacking,
    hugepages: bool,
    hugetlb: bool,
) -> Result<GuestMemoryMmap, Error> {
    if mem_bytes == 0 || !mem_bytes.is_multiple_of(4096) {
        return Err(Error::Size(mem_bytes));
    }
    if hugetlb && *backing == MemoryBacking::Anonymous {
        if let Some(m) = create_hugetlb(mem_bytes) {
            tracing::info!(
                "guest RAM: {} MiB from the hugetlb pool (2 MiB pages)",
                mem_bytes >> 20
            );
            return Ok(m);
        }
    } else if hugetlb {
        tracing::info!("guest RAM maps a memory file: no hugetlb pages (promotion gives THP)");
    }
    let file = match backing {
        MemoryBacking::Anonymous => None,
        MemoryBacking::File { path } => {
            let f = File::options()
                .read(true)
                .open(path)
                .map_err(|source| Error::OpenFile {
                    path: path.clone(),
                    source,
                })?;
            let len = f
                .metadata()
                .map_err(|source| Error::OpenFile {
                    path: path.clone(),
                    source,
                })?
                .len();
            if len < mem_bytes {
                return Err(Error::FileTooShort {
                    path: path.clone(),
                    len,
                    needed: mem_bytes,
                });
            }
            Some(std::sync::Arc::new(f))
        }
    };
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    let mut holes = specc_snapshot::HoleStats::default();
    for (start, len) in ram_regions(mem_bytes) {
        let size = usize::try_from(len).map_err(|_| Error::Region(start))?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let mut builder = MmapRegionBuilder::new(size).with_mmap_prot(prot);
        builder = match &file {
            None => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            Some(f) => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::from_arc(f.clone(), file_offset)),
        };
        let region = builder.build().map_err(Error::Mmap)?;
        if hugepages {
            // SAFETY: the range is exactly the mapping just created and owned by `region`;
            // madvise only changes how the kernel backs it.
            let rc = unsafe { libc::madvise(region.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                // THP disabled on the host is not fatal: forks just copy more page tables.
                tracing::warn!(
                    "madvise(MADV_HUGEPAGE) failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        if let Some(f) = &file {
            let host = region.as_ptr();
            let range = specc_snapshot::PageRange {
                offset: file_offset,
                len,
            };
            // SAFETY: `region` is a private mapping of `f` from `file_offset`, just made and
            // used by nobody yet; `o` is a hole's offset inside `range`.
            let filled = unsafe {
                specc_snapshot::fill_holes(f, &[range], &|o| {
                    (
                        host.wrapping_add(usize::try_from(o - file_offset).unwrap_or(0)),
                        prot,
                    )
                })
            };
            match filled {
                Ok(stats) => {
                    holes.add(stats);
                }
                Err(source) => {
                    return Err(Error::FillHoles {
                        path: backing_path(backing),
                        source,
                    });
                }
            }
        }
        regions
            .push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(Error::Region(start))?);
        file_offset += len;
    }
    if file.is_some() {
        tracing::debug!(
            holes = holes.filled,
            hole_bytes = holes.filled_bytes,
            file_hole_bytes = holes.file_hole_bytes,
            "memory file holes mapped anonymous"
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Collection)
}

fn backing_path(backing: &MemoryBacking) -> PathBuf {
    match backing {
        MemoryBacking::File { path } => path.clone(),
        MemoryBacking::Anonymous => PathBuf::new(),
    }
}

/// How guest RAM is backed right now, from `/proc/self/smaps` (what `fork(2)` will copy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Guest RAM mapped.
    pub ram_bytes: u64,
    /// Of guest RAM, resident in normal or transparent huge pages (`Rss`).
    pub resident_bytes: u64,
    /// Of those, mapped as 2 MiB transparent huge pages (`AnonHugePages`): one entry each for
    /// `fork(2)`; the rest of `resident_bytes` is one entry per 4 KiB page.
    pub thp_bytes: u64,
    /// Of guest RAM, in hugetlb pages (`Private_Hugetlb` + `Shared_Hugetlb`).
    pub hugetlb_bytes: u64,
    /// Anonymous bytes of the process's other mappings (`Anonymous`): `fork(2)` copies their
    /// page-table entries too.
    pub other_anon_bytes: u64,
}

impl Usage {
    /// Resident guest RAM in 4 KiB entries (what makes a fork's `fork(2)` grow).
    pub fn small_page_bytes(&self) -> u64 {
        self.resident_bytes.saturating_sub(self.thp_bytes)
    }
}

/// Reads [`Usage`] of `mem` (a walk of this process's page tables: a few ms at most).
pub fn usage(mem: &GuestMemoryMmap) -> Result<Usage, Error> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| Error::Promote("reading /proc/self/smaps", e))?;
    let ranges: Vec<(usize, usize)> = mem
        .iter()
        .map(|r| {
            let a = r.as_ptr() as usize;
            (a, a + usize::try_from(r.len()).unwrap_or(usize::MAX - a))
        })
        .collect();
    let mut u = Usage {
        ram_bytes: mem.iter().map(|r| r.len()).sum(),
        ..Usage::default()
    };
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split(' ').next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            // The kernel merges an anonymous RAM mapping with an adjacent one of the same
            // flags (another thread's, say), and smaps then reports both as one: count such a
            // mapping's RAM part page by page instead of its whole figures.
            let mut partial = false;
            inside = false;
            for &(a, b) in &ranges {
                if lo < b && hi > a {
                    if lo >= a && hi <= b {
                        inside = true;
                    } else {
                        partial = true;
                        u.resident_bytes += resident_in(lo.max(a), hi.min(b));
                    }
                }
            }
            inside &= !partial;
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib = |rest: &str| -> u64 {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * 1024
        };
        match (inside, key) {
            (true, "Rss") => u.resident_bytes += kib(rest),
            (true, "AnonHugePages") => u.thp_bytes += kib(rest),
            (true, "Private_Hugetlb" | "Shared_Hugetlb") => u.hugetlb_bytes += kib(rest),
            (false, "Anonymous") => u.other_anon_bytes += kib(rest),
            _ => {}
        }
    }
    Ok(u)
}

/// Resident bytes of `[lo, hi)` (page aligned, mapped), by `mincore(2)`.
fn resident_in(lo: usize, hi: usize) -> u64 {
    let pages = (hi - lo).div_ceil(PAGE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `[lo, hi)` lies in a mapping of this process (read from smaps just now), and
    // `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(lo as *mut libc::c_void, hi - lo, vec.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE as u64
}

/// `MADV_COLLAPSE` of every region of `mem`: 4 KiB anonymous pages into huge pages, with
/// direct compaction (the fault path gives up sooner). Runs while the guest runs: the kernel
/// copies each 2 MiB range under its page-table lock and KVM's MMU notifier drops its
/// mappings of it. Ranges with nothing populated stay empty; a range with some pages is
/// filled to a whole huge page. Failure (no huge page to be had) leaves 4 KiB pages.
pub fn collapse(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        let Ok(len) = usize::try_from(r.len()) else {
            continue;
        };
        // SAFETY: exactly a guest RAM mapping owned by `mem`; collapsing keeps its contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), len, MADV_COLLAPSE) };
        if rc != 0 {
            tracing::debug!(
                "MADV_COLLAPSE of guest RAM: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

const HUGE: usize = 2 << 20;
const PAGE: usize = 4096;
/// `madvise` advice (Linux >= 6.1) that collapses a range into huge pages synchronously; not in
/// the libc crate yet.
const MADV_COLLAPSE: i32 = 25;

/// An anonymous private mapping of `len` bytes, `MADV_HUGEPAGE`d, starting at the same offset
/// within a 2 MiB page as `like` (so that `mremap` between the two moves whole page tables and
/// huge pages), or a `PROT_NONE` reservation of the same shape.
fn map_like(like: usize, len: usize, usable: bool) -> Result<*mut u8, Error> {
    let prot = if usable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_NONE
    };
    let total = len + HUGE;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(Error::Promote("mmap", std::io::Error::last_os_error()));
    }
    let b = base as usize;
    let start = b + ((like % HUGE) + HUGE - (b % HUGE)) % HUGE;
    // SAFETY: the head and tail trimmed here lie inside the mapping just created and are not
    // used by anybody.
    unsafe {
        if start > b {
            libc::munmap(base, start - b);
        }
        if b + total > start + len {
            libc::munmap((start + len) as *mut libc::c_void, b + total - start - len);
        }
    }
    if usable {
        // SAFETY: exactly the mapping kept above; only changes how the kernel backs it.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: the mapping kept above, owned here.
            unsafe { libc::munmap(start as *mut libc::c_void, len) };
            return Err(Error::Promote("madvise(MADV_HUGEPAGE)", e));
        }
    }
    Ok(start as *mut u8)
}

/// The mappings (`start`, `end`) of this process that intersect `lo..hi`, clipped to it.
fn mappings_in(lo: usize, hi: usize) -> Result<Vec<(usize, usize)>, Error> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| Error::Promote("reading /proc/self/maps", e))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let range = line.split(' ').next().unwrap_or("");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if a < hi && b > lo {
            out.push((a.max(lo), b.min(hi)));
        }
    }
    Ok(out)
}

/// `mremap` of `len` bytes from `from` to `to`, replacing whatever is at `to`.
///
/// # Safety
/// Both ranges must be mappings the caller owns and nothing may use them meanwhile.
unsafe fn move_mapping(from: usize, len: usize, to: usize, dontunmap: bool) -> std::io::Result<()> {
    let mut flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
    if dontunmap {
        flags |= libc::MREMAP_DONTUNMAP;
    }
    // SAFETY: the caller guarantees both ranges are its own, unused mappings.
    let r = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len,
            len,
            flags,
            to as *mut libc::c_void,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the `len` bytes at `p` are all zero. The guest may write them meanwhile: a page it
/// writes is in KVM's dirty log and copied again, so a torn read only costs a copy.
///
/// # Safety
/// `p` must be 8-byte aligned and point to `len` (a multiple of 64) readable bytes.
unsafe fn is_zero(p: *const u8, len: usize) -> bool {
    // SAFETY: the caller guarantees alignment and validity; values may be stale (see above).
    let words = unsafe { std::slice::from_raw_parts(p.cast::<u64>(), len / 8) };
    words
        .chunks_exact(8)
        .all(|block| block.iter().fold(0, |acc, w| acc | w) == 0)
}

#[derive(Debug)]
struct Staged {
    /// The region's mapping: what KVM's memory slot and every device point at.
    host: usize,
    len: usize,
    /// The anonymous copy being filled, at the same offset within a 2 MiB page as `host`.
    copy: usize,
}

/// A restored VM's guest RAM on its way into anonymous memory with transparent huge pages.
///
/// A memory file's `MAP_PRIVATE` mapping only ever has 4 KiB pages, so `fork(2)` of a
/// restored VM copies one page-table entry per touched page and the source's pause grows with
/// its memory (docs/benchmarks.md, fork). Before the first fork, [`Promotion::copy_all`] and
/// [`Promotion::copy_pages`] fill an anonymous `MADV_HUGEPAGE` copy while the guest runs (the
/// caller tracks what changes meanwhile), and [`Promotion::swap`], with the VM paused, puts
/// the copy at the very addresses of the old mapping, so the KVM memory slots and every
/// pointer the devices hold stay valid: `mremap` moves page tables a whole 2 MiB at a time,
/// so the swap costs O(memory / 2 MiB), not O(pages). The price: the promoted VM's memory is
/// its own, no longer the page cache's pages it shared with other VMs restored from the
/// same file.
#[derive(Debug)]
pub struct Promotion {
    staged: Vec<Staged>,
    pagemap: File,
}

// SAFETY: the addresses are of mappings this value owns (the copies) or of guest memory,
// which outlives the VM that owns this value; nothing here is tied to a thread.
unsafe impl Send for Promotion {}

/// What [`Promotion::copy_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopyStats {
    /// Bytes copied (whole 2 MiB chunks).
    pub copied_bytes: u64,
    /// 2 MiB chunks left unpopulated: all zero and never written since the restore.
    pub skipped_chunks: u64,
}

impl Promotion {
    /// Maps an empty anonymous copy of every region of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| Error::Promote("opening /proc/self/pagemap", e))?;
        let mut p = Promotion {
            staged: Vec::new(),
            pagemap,
        };
        for r in mem.iter() {
            let host = r.as_ptr() as usize;
            let len = usize::try_from(r.len()).map_err(|_| Error::Region(r.start_addr().0))?;
            let copy = map_like(host, len, true)? as usize;
            p.staged.push(Staged { host, len, copy });
        }
        Ok(p)
    }

    /// Copies all of guest memory, 2 MiB at a time, leaving out chunks that are all zero and
    /// hold no page written since the restore (they stay unpopulated, as in a booted VM; a
    /// diff snapshot, which takes every populated anonymous page as written, then stays
    /// exact). Runs while the guest runs: pages it writes meanwhile must be copied again.
    pub fn copy_all(&self) -> Result<CopyStats, Error> {
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE: u64 = 1 << 61;
        let mut stats = CopyStats::default();
        let mut entries = vec![0u8; HUGE / PAGE * 8];
        for s in &self.staged {
            let mut off = 0;
            while off < s.len {
                let n = (s.len - off).min(HUGE);
                let buf = &mut entries[..n / PAGE * 8];
                self.pagemap
                    .read_exact_at(buf, ((s.host + off) / PAGE * 8) as u64)
                    .map_err(|e| Error::Promote("reading /proc/self/pagemap", e))?;
                let written = buf.chunks_exact(8).any(|e| {
                    let v = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
                    v & (PRESENT | SWAPPED) != 0 && v & FILE == 0
                });
                let src = (s.host + off) as *const u8;
                // SAFETY: `off + n <= len`: inside the region's mapping, page aligned.
                if written || !unsafe { is_zero(src, n) } {
                    // SAFETY: source and destination are `n` bytes inside two distinct live
                    // mappings; the destination is only written here and by `copy_pages`,
                    // never concurrently.
                    unsafe { libc::memcpy((s.copy + off) as *mut libc::c_void, src.cast(), n) };
                    stats.copied_bytes += n as u64;
                } else {
                    stats.skipped_chunks += 1;
                }
                off += n;
            }
        }
        Ok(stats)
    }

    /// Collapses what the bulk copy got as 4 KiB pages into huge pages (`MADV_COLLAPSE`, with
    /// direct compaction, where the fault path fell back because no free huge page was at
    /// hand), then returns how many bytes of the copies are huge pages (`AnonHugePages` in
    /// `/proc/self/smaps`). A kernel without `MADV_COLLAPSE` or without free memory leaves
    /// some 4 KiB pages, which a fork then copies entry by entry; it is not an error.
    pub fn collapse(&self) -> u64 {
        for s in &self.staged {
            // SAFETY: the copy is this value's own mapping; collapsing keeps its contents.
            let rc = unsafe { libc::madvise(s.copy as *mut libc::c_void, s.len, MADV_COLLAPSE) };
            if rc != 0 {
                tracing::debug!(
                    "promote: MADV_COLLAPSE: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return 0;
        };
        let starts: Vec<usize> = self.staged.iter().map(|s| s.copy).collect();
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split(' ').next().unwrap_or("");
            if let Some((lo, _)) = first.split_once('-')
                && let Ok(lo) = usize::from_str_radix(lo, 16)
            {
                inside = starts.contains(&lo);
            } else if inside && let Some(rest) = line.strip_prefix("AnonHugePages:") {
                let kib: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                total += kib * 1024;
            }
        }
        total
    }

    /// Copies the pages set in `bitmaps` (one per region, KVM dirty-log layout); returns how
    /// many. A bitmap shorter than its region leaves the rest alone.
    pub fn copy_pages(&self, bitmaps: &[Vec<u64>]) -> u64 {
        let mut pages = 0;
        for (s, bitmap) in self.staged.iter().zip(bitmaps) {
            for (w, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let off = page * PAGE;
                    if off >= s.len {
                        break;
                    }
                    // SAFETY: one page inside both live mappings (see `copy_all`).
                    unsafe {
                        libc::memcpy(
                            (s.copy + off) as *mut libc::c_void,
                            (s.host + off) as *const libc::c_void,
                            PAGE,
                        )
                    };
                    pages += 1;
                }
            }
        }
        pages
    }

    /// Copies every page whose bytes differ between guest memory and the copy; returns how
    /// many. This finds what device emulation wrote during the copy (such writes go through
    /// the host mapping, which KVM's dirty log never sees): call it with the device workers
    /// stopped. It reads both copies, which are resident by now, so it costs a fraction of
    /// the copy (no page is allocated unless it differs).
    pub fn copy_differing(&self) -> u64 {
        let mut pages = 0;
        for s in &self.staged {
            let mut off = 0;
            while off < s.len {
                let (from, to) = ((s.host + off) as *const u8, (s.copy + off) as *mut u8);
                // SAFETY: one page inside both live mappings (see `copy_all`); the guest may
                // write the source meanwhile, and such a page is in the dirty log.
                unsafe {
                    if libc::memcmp(from.cast(), to.cast(), PAGE) != 0 {
                        libc::memcpy(to.cast(), from.cast(), PAGE);
                        pages += 1;
                    }
                }
                off += PAGE;
            }
        }
        pages
    }

    /// Puts the copies in place of guest memory, at the same addresses. The old mappings are
    /// moved (page tables and all) to [`Retired`] scratch addresses with `MREMAP_DONTUNMAP`,
    /// so the address range is never unmapped in between (another thread's `mmap` could take
    /// it), then each copy is moved over its region, replacing the emptied old mappings.
    ///
    /// The guest must be paused, device workers stopped and the last writes copied. On an
    /// error, guest memory is as before ([`Error::Promote`]) or lost ([`Error::PromoteLost`]).
    pub fn swap(mut self) -> Result<Retired, Error> {
        let mut retired = Retired {
            scratch: Vec::new(),
        };
        while !self.staged.is_empty() {
            // Regions not reached stay in `self` and are unmapped by its Drop on an error;
            // regions swapped already are fine either way (the copies hold the same bytes).
            let s = self.staged.remove(0);
            let prepared = mappings_in(s.host, s.host + s.len)
                .and_then(|pieces| Ok((pieces, map_like(s.host, s.len, false)? as usize)));
            let (pieces, scratch) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    // SAFETY: the copy is this value's own mapping, not yet in use.
                    unsafe { libc::munmap(s.copy as *mut libc::c_void, s.len) };
                    return Err(e);
                }
            };
            let mut entry = Scratch {
                base: scratch,
                len: s.len,
                moved: Vec::new(),
            };
            let mut failed = None;
            for &(a, b) in &pieces {
                let to = scratch + (a - s.host);
                // SAFETY: `a..b` is part of guest memory, which the caller keeps unused;
                // `to` is inside the scratch reservation made above.
                match unsafe { move_mapping(a, b - a, to, true) } {
                    Ok(()) => entry.moved.push((a, b, to)),
                    Err(e) => {
                        failed = Some(("mremap(MREMAP_DONTUNMAP) of guest memory", e));
                        break;
                    }
                }
            }
            if failed.is_none() {
                // SAFETY: the copy is ours; the destination is guest memory's own range,
                // whose old mappings hold no pages any more (they were moved out above).
                if let Err(e) = unsafe { move_mapping(s.copy, s.len, s.host, false) } {
                    failed = Some(("mremap of the copy onto guest memory", e));
                }
            }
            if let Some((what, e)) = failed {
                // SAFETY: the copy was not moved (the failing step was its move or before).
                unsafe { libc::munmap(s.copy as *mut libc::c_void, s.len) };
                retired.scratch.push(entry);
                retired.restore_all()?;
                return Err(Error::Promote(what, e));
            }
            entry.moved.clear();
            // A fork(2) right after the swap must not copy the old page tables.
            // SAFETY: the scratch range is ours; only changes what fork(2) copies.
            unsafe { libc::madvise(scratch as *mut libc::c_void, s.len, libc::MADV_DONTFORK) };
            retired.scratch.push(entry);
        }
        Ok(retired)
    }
}

impl Drop for Promotion {
    fn drop(&mut self) {
        for s in &self.staged {
            // SAFETY: the copies not swapped in are this value's own mappings.
            unsafe { libc::munmap(s.copy as *mut libc::c_void, s.len) };
        }
    }
}

#[derive(Debug)]
struct Scratch {
    base: usize,
    len: usize,
    /// Pieces moved out of guest memory (`from`, `to`, scratch address) whose replacement
    /// failed: put back by [`Retired::restore_all`].
    moved: Vec<(usize, usize, usize)>,
}

/// The old mappings of promoted guest memory, at scratch addresses and marked
/// `MADV_DONTFORK`. Dropping unmaps them, which costs O(pages): drop it after the VM runs
/// again, on a thread of its own.
#[derive(Debug)]
pub struct Retired {
    scratch: Vec<Scratch>,
}

// SAFETY: plain addresses of mappings this value owns.
unsafe impl Send for Retired {}

impl Retired {
    /// Moves every piece not yet replaced back where it came from (undoing a failed swap).
    fn restore_all(&mut self) -> Result<(), Error> {
        for s in &mut self.scratch {
            for (a, b, to) in s.moved.drain(..) {
                // SAFETY: `to` holds the pages moved out of `a..b`, which still holds the
                // emptied old mapping (MREMAP_DONTUNMAP); moving them back replaces it.
                unsafe { move_mapping(to, b - a, a, false) }
                    .map_err(|e| Error::PromoteLost("mremap back", e))?;
            }
        }
        Ok(())
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        for s in &self.scratch {
            // SAFETY: the scratch range is this value's own; guest memory no longer uses it.
            unsafe { libc::munmap(s.base as *mut libc::c_void, s.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn anonymous_memory_is_zeroed_and_writable() {
        let m = create(16 << 20, &MemoryBacking::Anonymous, true).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
        m.write_obj(0xdead_beefu64, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(m.num_regions(), 1);
    }

    #[test]
    fn file_backed_memory_reads_the_file_and_never_writes_it() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 2 << 20];
        data[0x2000] = 0x5a;
        f.write_all(&data).unwrap();
        let backing = MemoryBacking::File {
            path: f.path().to_path_buf(),
        };
        let m = create(2 << 20, &backing, false).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x5a);
        m.write_obj(0xa5u8, GuestAddress(0x2000)).unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap()[0x2000], 0x5a);
    }

    fn byte_at(m: &GuestMemoryMmap, a: u64) -> u8 {
        m.read_obj::<u8>(GuestAddress(a)).unwrap()
    }

    /// Memory of a file with an overlay over it (two VMAs, clean and written pages, zero
    /// chunks), promoted: same addresses and bytes, anonymous pages only, one mapping, the
    /// file untouched, and zero chunks nobody wrote left unpopulated.
    #[test]
    fn promotion_swaps_an_anonymous_copy_in_at_the_same_addresses() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("memory");
        let mut data = vec![0u8; 8 << 20];
        data[..2 << 20].fill(0x11); // chunk 0: data; chunk 1 and 2: zero
        data[6 << 20..].fill(0x33); // chunk 3: data
        std::fs::write(&base, &data).unwrap();
        let mut diff = vec![0u8; 8 << 20];
        diff[(6 << 20) + 0x1000..(6 << 20) + 0x2000].fill(0x77);
        std::fs::write(dir.path().join("diff"), &diff).unwrap();
        let m = create(8 << 20, &MemoryBacking::File { path: base.clone() }, true).unwrap();
        specc_snapshot::map_overlay(
            &m,
            &dir.path().join("diff"),
            &[specc_snapshot::PageRange {
                offset: 6 * MIB + 0x1000,
                len: 0x1000,
            }],
        )
        .unwrap();
        m.write_slice(&[0xab; 4096], GuestAddress(0x3000)).unwrap();
        // A page written with zeros in a zero chunk still differs from "never written".
        m.write_slice(&[0; 4096], GuestAddress(4 * MIB)).unwrap();
        let host = m.iter().next().unwrap().as_ptr() as usize;
        let p = Promotion::new(&m).unwrap();
        assert_eq!(p.staged[0].copy % HUGE, host % HUGE);
        let stats = p.copy_all().unwrap();
        assert_eq!(
            stats,
            CopyStats {
                copied_bytes: 6 * MIB,
                skipped_chunks: 1
            }
        );
        // Collapsing changes nothing the guest sees (checked below).
        p.collapse();
        // Written after the bulk copy: only the bitmap brings it over.
        m.write_slice(&[0xcd; 4096], GuestAddress(0x5000)).unwrap();
        m.write_slice(&[0xee; 4096], GuestAddress(0x6000)).unwrap();
        assert_eq!(p.copy_pages(&[vec![1 << 5]]), 1);
        // Written where no bitmap says so (a device): found by comparing, even in a chunk
        // the bulk copy left out.
        m.write_slice(&[0x99; 4096], GuestAddress(0x7000)).unwrap();
        m.write_slice(&[0x98; 4096], GuestAddress(2 * MIB + 0x1000))
            .unwrap();
        assert_eq!(p.copy_differing(), 3);
        let retired = p.swap().unwrap();
        assert_eq!(m.iter().next().unwrap().as_ptr() as usize, host);
        for (a, want) in [
            (0u64, 0x11),
            (0x3000, 0xab),
            (0x5000, 0xcd),
            (0x6000, 0xee), // in no bitmap: found by the comparison
            (0x7000, 0x99),
            (2 * MIB, 0),
            (2 * MIB + 0x1000, 0x98),
            (4 * MIB, 0),
            (6 * MIB, 0x33),
            (6 * MIB + 0x1000, 0x77),
            (8 * MIB - 1, 0x33),
        ] {
            assert_eq!(byte_at(&m, a), want, "byte at {a:#x}");
        }
        drop(retired);
        let maps = mappings_in(host, host + (8 << 20)).unwrap();
        assert_eq!(maps, vec![(host, host + (8 << 20))], "one mapping");
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut entries = vec![0u8; 2048 * 8];
        pagemap
            .read_exact_at(&mut entries, (host / PAGE * 8) as u64)
            .unwrap();
        let entry =
            |page: usize| u64::from_ne_bytes(entries[page * 8..page * 8 + 8].try_into().unwrap());
        for page in 0..2048 {
            if entry(page) & (1 << 63) != 0 {
                assert_eq!(entry(page) & (1 << 61), 0, "page {page} is a file page");
            }
        }
        assert!(
            std::fs::read(&base).unwrap() == data,
            "memory file untouched"
        );
    }

    fn fill(m: &GuestMemoryMmap, len: u64) {
        for a in (0..len).step_by(PAGE) {
            m.write_obj(a ^ 0x5a5a, GuestAddress(a)).unwrap();
        }
    }

    fn filled(m: &GuestMemoryMmap, len: u64) -> bool {
        (0..len)
            .step_by(PAGE)
            .all(|a| m.read_obj::<u64>(GuestAddress(a)).ok() == Some(a ^ 0x5a5a))
    }

    #[test]
    fn usage_counts_resident_guest_ram_apart_from_other_memory() {
        let m = create(16 << 20, &MemoryBacking::Anonymous, false).unwrap();
        let before = usage(&m).unwrap();
        assert_eq!(before.ram_bytes, 16 << 20);
        assert_eq!(before.resident_bytes, 0, "{before:?}");
        fill(&m, 8 << 20);
        let u = usage(&m).unwrap();
        assert_eq!(u.resident_bytes, 8 << 20, "{u:?}");
        assert_eq!(u.hugetlb_bytes, 0);
        assert!(u.thp_bytes <= u.resident_bytes);
        assert_eq!(u.small_page_bytes() + u.thp_bytes, u.resident_bytes);
        // This test binary's own heap and stacks are there too.
        assert!(u.other_anon_bytes > 0, "{u:?}");
    }

    #[test]
    fn collapse_keeps_guest_ram_contents_and_accounts_every_byte() {
        // Without MADV_HUGEPAGE (THP is `madvise` on these hosts) the faults give 4 KiB pages.
        let m = create(8 << 20, &MemoryBacking::Anonymous, false).unwrap();
        fill(&m, 6 << 20);
        collapse(&m);
        let u = usage(&m).unwrap();
        assert!(filled(&m, 6 << 20), "contents changed by the collapse");
        assert!(u.resident_bytes >= 6 << 20, "{u:?}");
        assert_eq!(u.small_page_bytes() + u.thp_bytes, u.resident_bytes);
    }

    /// With the pool empty (no pages configured) RAM comes from THP, as without `hugetlb`;
    /// with pages free, from the pool. Either way the VM gets working memory.
    #[test]
    fn hugetlb_ram_comes_from_the_pool_or_falls_back_to_thp() {
        let len = 4u64 << 20;
        let free = hugetlb_free_pages();
        let m = create_with(len, &MemoryBacking::Anonymous, true, true).unwrap();
        fill(&m, len);
        assert!(filled(&m, len));
        let u = usage(&m).unwrap();
        if free >= 2 {
            assert_eq!(u.hugetlb_bytes, len, "{free} pages free: {u:?}");
        } else {
            assert_eq!(u.hugetlb_bytes, 0, "{u:?}");
            assert_eq!(u.resident_bytes, len, "{u:?}");
        }
        // Not whole 2 MiB pages: THP, whatever the pool.
        let odd = create_with(len + 4096, &MemoryBacking::Anonymous, true, true).unwrap();
        fill(&odd, len + 4096);
        assert_eq!(usage(&odd).unwrap().hugetlb_bytes, 0);
    }

    #[test]
    fn short_file_and_bad_sizes_are_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let backing = MemoryBacking::File {
            path: f.path().to_path_buf(),
        };
        assert!(matches!(
            create(1 << 20, &backing, false),
            Err(Error::FileTooShort { .. })
        ));
        assert!(matches!(
            create(0, &MemoryBacking::Anonymous, false),
            Err(Error::Size(0))
        ));
        assert!(matches!(
            create(4097, &MemoryBacking::Anonymous, false),
            Err(Error::Size(_))
        ));
    }
}
