//! The memory image of a precopy fork: a fresh memfd holding a copy of guest RAM as of the
//! fork, filled while the source runs and mapped `MAP_PRIVATE` by every child of that fork.
//!
//! Why: `fork(2)` of a process whose guest RAM it must share copy-on-write copies (and
//! write-protects) a page-table entry per mapped page, and KVM's MMU notifier then zaps the
//! whole memory slot, both inside the source's pause, so that pause grows with guest memory
//! (docs/fork.md). With the image, guest RAM is marked `MADV_DONTFORK` for the `fork(2)`:
//! the kernel copies none of its page tables, and the children map the image at RAM's old
//! addresses instead. The copy is made while the guest runs (KVM's dirty log tracks what
//! the vCPUs write meanwhile; a comparison with the device workers stopped finds what
//! devices wrote), so the pause only copies the last dirty pages. The source keeps its own
//! RAM as it was.
//!
//! The image is sparse: zero pages stay holes (a child reads them as zeros), and a bitmap of
//! the pages written into it lets the comparison leave the holes alone (reading a hole of a
//! shared memfd mapping would allocate it). All children of one fork share its clean pages
//! through the page cache; each fork builds a new image, earlier children keep theirs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::memory::CopyStats;

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// Errors of building or mapping a fork image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed (memfd_create, ftruncate, mmap, madvise, reading pagemap).
    #[error("fork memory image: {0}")]
    Os(&'static str, #[source] std::io::Error),
    /// A region is too large for this address space (cannot happen with the fixed layout).
    #[error("guest memory region at {0:#x} is invalid")]
    Region(u64),
    /// Describing the child's mapping to vm-memory failed.
    #[error("describing the mapped fork image")]
    Describe(#[source] vm_memory::mmap::MmapRegionError),
    /// Assembling the child's regions failed.
    #[error("assembling the child's guest memory")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

fn os(what: &'static str) -> Error {
    Error::Os(what, std::io::Error::last_os_error())
}

#[derive(Debug)]
struct Staged {
    /// The region's mapping in the source (what KVM's slot and the devices use).
    host: usize,
    len: usize,
    /// Where the region lies in the image.
    offset: u64,
    /// The image's range mapped shared here (writes go into the memfd).
    copy: usize,
    /// Pages written into the image (the rest are holes), one bit per 4 KiB page.
    written: Vec<u64>,
    /// Whether a page absent from the source's page tables may still hold data: RAM that is
    /// a private file mapping (a restored VM, or a child of an earlier precopy fork).
    file_backed: bool,
}

impl Staged {
    fn is_written(&self, page: usize) -> bool {
        self.written[page / 64] & (1 << (page % 64)) != 0
    }

    fn mark(&mut self, page: usize) {
        self.written[page / 64] |= 1 << (page % 64);
    }

    /// Copies one page of the source into the image.
    fn copy_page(&mut self, page: usize) {
        let off = page * PAGE;
        // SAFETY: one page inside both live mappings (the region's and this image's); the
        // image's is only written by this value, never concurrently.
        unsafe {
            libc::memcpy(
                (self.copy + off) as *mut libc::c_void,
                (self.host + off) as *const libc::c_void,
                PAGE,
            );
        }
        self.mark(page);
    }
}

/// A copy of guest RAM in a memfd, being filled in the source (see the module docs).
#[derive(Debug)]
pub struct ForkImage {
    file: Arc<File>,
    staged: Vec<Staged>,
    pagemap: File,
}

// SAFETY: the addresses are of mappings this value owns (the image's shared mapping) or of
// guest memory, which outlives the VM that owns this value; nothing is tied to a thread.
unsafe impl Send for ForkImage {}

/// The image a fork child maps: the memfd and where each region lies in it.
#[derive(Debug, Clone)]
pub struct Image {
    file: Arc<File>,
    /// (guest address, host address in the source, length, offset in the file), per region.
    regions: Vec<(u64, usize, usize, u64)>,
}

impl ForkImage {
    /// An empty (all-holes) image of `mem`, mapped shared in this process and left out of
    /// `fork(2)` children (`MADV_DONTFORK`). `file_backed`: guest RAM is a private file
    /// mapping, whose pages hold data even where this process has not faulted them in.
    pub fn new(mem: &GuestMemoryMmap, file_backed: bool) -> Result<Self, Error> {
        // SAFETY: a NUL-terminated name and flags; returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"specc-fork-image".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        file.set_len(total).map_err(|e| Error::Os("ftruncate", e))?;
        let pagemap =
            File::open("/proc/self/pagemap").map_err(|e| Error::Os("opening pagemap", e))?;
        let mut image = ForkImage {
            file: Arc::new(file),
            staged: Vec::new(),
            pagemap,
        };
        let mut offset = 0u64;
        for r in mem.iter() {
            let len = usize::try_from(r.len()).map_err(|_| Error::Region(r.start_addr().0))?;
            let off = libc::off_t::try_from(offset).map_err(|_| Error::Region(r.start_addr().0))?;
            // SAFETY: a new shared mapping of the memfd at an address of the kernel's choosing.
            let copy = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    image.file.as_raw_fd(),
                    off,
                )
            };
            if copy == libc::MAP_FAILED {
                return Err(os("mmap of the fork image"));
            }
            // Pushed before the madvise so that Drop unmaps it on an error.
            image.staged.push(Staged {
                host: r.as_ptr() as usize,
                len,
                offset,
                copy: copy as usize,
                written: vec![0; len.div_ceil(PAGE).div_ceil(64)],
                file_backed,
            });
            // SAFETY: exactly the mapping just made; only changes what fork(2) copies.
            if unsafe { libc::madvise(copy, len, libc::MADV_DONTFORK) } != 0 {
                return Err(os("madvise(MADV_DONTFORK) of the fork image"));
            }
            offset += r.len();
        }
        Ok(image)
    }

    /// The pagemap entries of the source's pages `off..off + n` of `s` (`n` ≤ 2 MiB).
    fn entries(&self, s: &Staged, off: usize, n: usize, buf: &mut [u8]) -> Result<(), Error> {
        let buf = &mut buf[..n / PAGE * 8];
        self.pagemap
            .read_exact_at(buf, ((s.host + off) / PAGE * 8) as u64)
            .map_err(|e| Error::Os("reading /proc/self/pagemap", e))
    }

    /// Copies every page of guest RAM that holds anything but zeros, 2 MiB chunk by chunk;
    /// anonymous chunks the source never faulted in are skipped without reading them. Runs
    /// while the guest runs: pages it writes meanwhile must be copied again.
    pub fn copy_all(&mut self) -> Result<CopyStats, Error> {
        let mut stats = CopyStats::default();
        let mut buf = vec![0u8; HUGE / PAGE * 8];
        for i in 0..self.staged.len() {
            let len = self.staged[i].len;
            let mut off = 0;
            while off < len {
                let n = (len - off).min(HUGE);
                self.entries(&self.staged[i], off, n, &mut buf)?;
                let s = &mut self.staged[i];
                let mut any = false;
                for (k, e) in buf[..n / PAGE * 8].chunks_exact(8).enumerate() {
                    let v = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
                    if v & (PRESENT | SWAPPED) == 0 && !s.file_backed {
                        continue;
                    }
                    any = true;
                    let page = off / PAGE + k;
                    // SAFETY: one page-aligned page inside the region's mapping.
                    if !unsafe { is_zero((s.host + page * PAGE) as *const u8) } {
                        s.copy_page(page);
                        stats.copied_bytes += PAGE as u64;
                    }
                }
                if !any {
                    stats.skipped_chunks += 1;
                }
                off += n;
            }
        }
        Ok(stats)
    }

    /// Copies the pages set in `bitmaps` (one per region, KVM dirty-log layout); returns how
    /// many.
    pub fn copy_pages(&mut self, bitmaps: &[Vec<u64>]) -> u64 {
        let mut pages = 0;
        for (s, bitmap) in self.staged.iter_mut().zip(bitmaps) {
            for (w, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if page * PAGE >= s.len {
                        break;
                    }
                    s.copy_page(page);
                    pages += 1;
                }
            }
        }
        pages
    }

    /// Copies every page whose bytes differ between guest RAM and the image (what device
    /// emulation wrote through the host mapping, which KVM's dirty log never sees); returns
    /// how many. Call it with the device workers stopped. Only pages present in the source's
    /// page tables can have been written; holes of the image are compared with zero, not
    /// read (reading would allocate them).
    pub fn copy_differing(&mut self) -> Result<u64, Error> {
        let mut pages = 0;
        let mut buf = vec![0u8; HUGE / PAGE * 8];
        for i in 0..self.staged.len() {
            let len = self.staged[i].len;
            let mut off = 0;
            while off < len {
                let n = (len - off).min(HUGE);
                self.entries(&self.staged[i], off, n, &mut buf)?;
                let s = &mut self.staged[i];
                for (k, e) in buf[..n / PAGE * 8].chunks_exact(8).enumerate() {
                    let v = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
                    if v & (PRESENT | SWAPPED) == 0 {
                        continue;
                    }
                    let page = off / PAGE + k;
                    let from = (s.host + page * PAGE) as *const u8;
                    let differs = if s.is_written(page) {
                        let to = (s.copy + page * PAGE) as *const u8;
                        // SAFETY: one page inside both live mappings; the guest may write
                        // the source meanwhile, and such a page is in the dirty log.
                        unsafe { libc::memcmp(from.cast(), to.cast(), PAGE) != 0 }
                    } else {
                        // SAFETY: one page-aligned page inside the region's mapping.
                        !unsafe { is_zero(from) }
                    };
                    if differs {
                        s.copy_page(page);
                        pages += 1;
                    }
                }
                off += n;
            }
        }
        Ok(pages)
    }

    /// The memfd and the layout a child maps; the shared mapping here stays until this value
    /// is dropped (unmapping costs O(pages): drop it after the source runs again).
    pub fn image(&self, mem: &GuestMemoryMmap) -> Image {
        Image {
            file: self.file.clone(),
            regions: mem
                .iter()
                .zip(&self.staged)
                .map(|(r, s)| (r.start_addr().0, s.host, s.len, s.offset))
                .collect(),
        }
    }

    /// Bytes of the image that hold data (pages written into it).
    pub fn data_bytes(&self) -> u64 {
        self.staged
            .iter()
            .map(|s| {
                s.written
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum::<u64>()
            })
            .sum::<u64>()
            * PAGE as u64
    }
}

impl Drop for ForkImage {
    fn drop(&mut self) {
        for s in &self.staged {
            // SAFETY: the image's shared mapping is this value's own.
            unsafe { libc::munmap(s.copy as *mut libc::c_void, s.len) };
        }
    }
}

impl Image {
    /// The memfd's descriptor (a fork child keeps it open).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// In a fork child whose guest RAM was not inherited (`MADV_DONTFORK`): maps the image
    /// `MAP_PRIVATE` at RAM's old addresses and returns guest memory over it, each region a
    /// private mapping of the image (so a snapshot reads its unfaulted pages from the file).
    pub fn map_in_child(&self) -> Result<GuestMemoryMmap, Error> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        let mut regions = Vec::new();
        for &(guest, host, len, offset) in &self.regions {
            let off = libc::off_t::try_from(offset).map_err(|_| Error::Region(guest))?;
            // SAFETY: in a fork child whose guest RAM range was left out of the fork, so
            // nothing is mapped there (MAP_FIXED_NOREPLACE refuses otherwise); the child has
            // a single thread.
            let p = unsafe {
                libc::mmap(
                    host as *mut libc::c_void,
                    len,
                    prot,
                    flags | libc::MAP_FIXED_NOREPLACE,
                    self.file.as_raw_fd(),
                    off,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(os("mmap of the fork image in the child"));
            }
            if p as usize != host {
                // SAFETY: the mapping just made, at the wrong place (an old kernel treats
                // MAP_FIXED_NOREPLACE as a hint).
                unsafe { libc::munmap(p, len) };
                return Err(Error::Os(
                    "mmap of the fork image in the child",
                    std::io::Error::from_raw_os_error(libc::EEXIST),
                ));
            }
            // SAFETY: `p` is the mapping of `len` bytes just made; it lives as long as the
            // process (a VM's memory is never unmapped before it exits).
            let built = unsafe {
                MmapRegionBuilder::new(len)
                    .with_raw_mmap_pointer(p.cast())
                    .with_mmap_prot(prot)
                    .with_mmap_flags(flags)
                    .with_file_offset(FileOffset::from_arc(self.file.clone(), offset))
                    .build()
            }
            .map_err(Error::Describe)?;
            regions.push(
                GuestRegionMmap::new(built, vm_memory::GuestAddress(guest))
                    .ok_or(Error::Region(guest))?,
            );
        }
        GuestMemoryMmap::from_regions(regions).map_err(Error::Collection)
    }
}

/// Whether `fork(2)` children inherit guest RAM: `MADV_DONTFORK` (`false`) just before a
/// precopy fork's `fork(2)`, `MADV_DOFORK` (`true`) right after it. A flag on the mappings:
/// no page is touched.
pub fn set_inherited(mem: &GuestMemoryMmap, inherited: bool) -> Result<(), Error> {
    let advice = if inherited {
        libc::MADV_DOFORK
    } else {
        libc::MADV_DONTFORK
    };
    for r in mem.iter() {
        let len = usize::try_from(r.len()).map_err(|_| Error::Region(r.start_addr().0))?;
        // SAFETY: exactly a guest RAM mapping owned by `mem`; only changes what fork(2) copies.
        if unsafe { libc::madvise(r.as_ptr().cast(), len, advice) } != 0 {
            return Err(os("madvise of guest RAM for fork(2)"));
        }
    }
    Ok(())
}

/// Whether the page at `p` is all zero. The guest may write it meanwhile: a page it writes is
/// in KVM's dirty log and copied again, so a torn read only costs a copy.
///
/// # Safety
/// `p` must be page aligned and point to a readable page.
unsafe fn is_zero(p: *const u8) -> bool {
    // SAFETY: the caller guarantees alignment and validity; values may be stale (see above).
    let words = unsafe { std::slice::from_raw_parts(p.cast::<u64>(), PAGE / 8) };
    words
        .chunks_exact(8)
        .all(|block| block.iter().fold(0, |acc, w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::memory::{MemoryBacking, create};

    fn byte_in_file(f: &File, off: u64) -> u8 {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        b[0]
    }

    /// The image gets what was there at the bulk copy, what a dirty bitmap names, and what
    /// only the comparison finds; zero and untouched pages stay holes.
    #[test]
    fn image_holds_copied_logged_and_differing_pages_and_leaves_zeros_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let m = create(8 << 20, &MemoryBacking::Anonymous, false).unwrap();
        m.write_slice(&[0x11; 4096], GuestAddress(0x1000)).unwrap();
        // Touched but zero: present, not copied.
        m.write_slice(&[0; 4096], GuestAddress(0x2000)).unwrap();
        let mut img = ForkImage::new(&m, false).unwrap();
        let stats = img.copy_all().unwrap();
        assert_eq!(stats.copied_bytes, 4096);
        assert_eq!(stats.skipped_chunks, 3, "chunks 1..4 never touched");
        // Written after the bulk copy: a bitmap brings one over, the comparison the other.
        m.write_slice(&[0x22; 4096], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[0x33; 4096], GuestAddress(0x3000)).unwrap();
        m.write_slice(&[0x44; 4096], GuestAddress(6 << 20)).unwrap();
        assert_eq!(img.copy_pages(&[vec![1 << 3]]), 1);
        assert_eq!(img.copy_differing().unwrap(), 2);
        assert_eq!(img.copy_differing().unwrap(), 0, "nothing differs any more");
        assert_eq!(img.data_bytes(), 3 * 4096);
        let image = img.image(&m);
        for (off, want) in [(0x1000, 0x22), (0x2000, 0), (0x3000, 0x33), (6 << 20, 0x44)] {
            assert_eq!(byte_in_file(&image.file, off), want, "at {off:#x}");
        }
        let blocks = image.file.metadata().unwrap().blocks() * 512;
        assert_eq!(blocks, 3 * 4096, "zero pages are holes");
    }

    /// In a fork child RAM is not inherited under MADV_DONTFORK; the image mapped at its
    /// addresses gives the child the bytes of the copy, and its writes stay its own.
    #[test]
    fn a_fork_child_maps_the_image_at_the_old_addresses() {
        let m = create(4 << 20, &MemoryBacking::Anonymous, true).unwrap();
        m.write_obj(0x5a5a_u64, GuestAddress(0x10_0000)).unwrap();
        let mut img = ForkImage::new(&m, false).unwrap();
        img.copy_all().unwrap();
        // After the image was made: the child must not see it.
        let image = img.image(&m);
        set_inherited(&m, false).unwrap();
        m.write_obj(0x7777_u64, GuestAddress(0x10_0000)).unwrap();
        // SAFETY: the child only maps, reads, writes and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match image.map_in_child() {
                Ok(cm) => {
                    let ok = cm.read_obj::<u64>(GuestAddress(0x10_0000)).ok() == Some(0x5a5a)
                        && cm.iter().all(|r| r.file_offset().is_some());
                    cm.write_obj(0x9999_u64, GuestAddress(0x10_0000)).unwrap();
                    if ok { 0 } else { 2 }
                }
                Err(_) => 3,
            };
            // SAFETY: ends the child without the harness's destructors.
            unsafe { libc::_exit(code) }
        }
        set_inherited(&m, true).unwrap();
        let mut status = 0;
        // SAFETY: our own child; status is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "2: wrong bytes, 3: map failed"
        );
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 0x7777);
        assert_eq!(
            byte_in_file(&image.file, 0x10_0000),
            0x5a,
            "image unchanged"
        );
    }
}
