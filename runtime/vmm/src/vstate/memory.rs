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

use std::fs::File;
use std::path::PathBuf;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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
    /// mmap failed.
    #[error("mapping guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// A region does not fit the address space (cannot happen with the fixed layout).
    #[error("guest memory region at {0:#x} is invalid")]
    Region(u64),
    /// Assembling the regions failed.
    #[error("assembling guest memory")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// Creates guest RAM of `mem_bytes` following the fixed layout.
pub fn create(
    mem_bytes: u64,
    backing: &MemoryBacking,
    hugepages: bool,
) -> Result<GuestMemoryMmap, Error> {
    if mem_bytes == 0 || !mem_bytes.is_multiple_of(4096) {
        return Err(Error::Size(mem_bytes));
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
        regions
            .push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(Error::Region(start))?);
        file_offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Collection)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestMemoryBackend};

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
