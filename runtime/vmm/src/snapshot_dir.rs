//! Snapshots on disk: a directory with the VM state, guest memory and the frozen disk diffs
//! (the layout is in docs/snapshot-format.md).
//!
//! ```text
//! DIR/vmstate       VmSnapshot in a versioned, checksummed state file (specc-snapshot)
//! DIR/memory        full snapshot: all of guest RAM, zero pages as holes
//! DIR/memory.diff   diff snapshot: only the pages that differ from the VM's memory file
//! DIR/disk<i>.diff  disk i's writes since the previous snapshot, frozen (read-only)
//! ```
//!
//! Relative paths inside `vmstate` are relative to DIR, so a snapshot directory can be moved
//! (into the store, into an artifact); a diff snapshot names its parent's files by absolute
//! path.
//!
//! Diff snapshots use the mapping, not the KVM dirty log: a VM restored from a memory file
//! maps it `MAP_PRIVATE`, so exactly the pages anybody wrote since the restore (the guest, but
//! also the VMM's own device emulation, which the KVM dirty log never sees) have become
//! private anonymous pages, and `/proc/self/pagemap` tells them apart from the file's
//! page-cache pages at no cost while the VM runs (no write protection, no extra exits).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use specc_snapshot::{CpuFingerprint, DirtyPages, PageRange, WriteOptions};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::snapshot::Captured;
use crate::vstate::memory::{self, MemoryBacking};
use crate::{Error as VmError, Vmm};

/// The state file in a snapshot directory.
pub const VMSTATE_FILE: &str = "vmstate";
/// A full snapshot's memory file.
pub const MEMORY_FILE: &str = "memory";
/// A diff snapshot's memory file.
pub const MEMORY_DIFF_FILE: &str = "memory.diff";
/// The largest state file read back (a VM state is tens of KiB; this bounds a hostile file).
pub const VMSTATE_LIMIT: u64 = 64 << 20;

/// What `vmstate` holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmSnapshot {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM size.
    pub mem_bytes: u64,
    /// The command line the VM was booted with (for inspection; not used on restore).
    pub cmdline: String,
    /// The host CPU the memory state was taken on.
    pub host_cpu: CpuFingerprint,
    /// Host wall clock when the snapshot was taken, ms since the epoch.
    pub taken_unix_ms: u64,
    /// vCPU, VM-wide and device state.
    pub state: Captured,
    /// Where guest RAM is.
    pub memory: MemoryImage,
    /// Each disk's read-only layer stack, bottom first.
    pub disks: Vec<DiskImage>,
}

/// Guest RAM as files: a base memory file (or none: zeroes) and diffs laid over it in order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryImage {
    /// The full memory file.
    pub base: Option<PathBuf>,
    /// Diff files over the base, oldest first.
    pub overlays: Vec<Overlay>,
}

/// One diff file and the ranges it holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Overlay {
    /// The diff file.
    pub file: PathBuf,
    /// The byte ranges of the memory layout it replaces.
    pub ranges: Vec<PageRange>,
}

/// One disk's frozen layers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskImage {
    /// Read-only layers, bottom first (the last one is this snapshot's `disk<i>.diff`).
    pub layers: Vec<PathBuf>,
}

/// Errors of writing or restoring a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory exists or cannot be created.
    #[error("creating snapshot directory {}", .0.display())]
    Dir(PathBuf, #[source] std::io::Error),
    /// Pausing or capturing the VM failed.
    #[error("capturing the VM")]
    Capture(#[from] VmError),
    /// Freezing a disk failed.
    #[error("freezing disk {0}")]
    Freeze(usize, #[source] specc_devices::disk::DiskError),
    /// Reading or writing a state or memory file failed, or the file is invalid.
    #[error("{}", .0.display())]
    File(PathBuf, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// The snapshot was taken on an incompatible CPU.
    #[error("the snapshot's memory state cannot run on this CPU")]
    Cpu(#[source] specc_snapshot::CpuMismatch),
    /// The configuration does not fit the snapshot.
    #[error("the configuration does not fit the snapshot: {0}")]
    Config(String),
    /// Reading the page map failed.
    #[error("reading /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    /// Restoring the VM failed.
    #[error("restoring the VM")]
    Restore(#[from] crate::builder::RestoreError),
    /// Creating guest memory failed.
    #[error("mapping guest memory")]
    Memory(#[from] memory::Error),
}

/// What a snapshot cost.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotReport {
    /// How long the vCPUs were stopped (capture, freeze, memory and state written).
    pub pause_us: u64,
    /// Memory bytes written (not counting holes).
    pub memory_data_bytes: u64,
    /// Guest RAM size.
    pub memory_total_bytes: u64,
    /// Whether only the pages changed since the restore were written.
    pub diff: bool,
}

fn file_err(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::File(path.to_owned(), Box::new(e))
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Writes a snapshot of `vmm` into `dir` (created; it must not exist). The VM is paused for
/// the duration and left paused: the caller resumes it or ends it. With `diff`, a VM restored
/// from a memory file writes only the pages that differ from it; a booted VM always writes a
/// full memory file (every page it touched).
pub fn write(
    vmm: &mut Vmm,
    config: &VmConfig,
    dir: &Path,
    diff: bool,
) -> Result<SnapshotReport, Error> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir.parent().unwrap_or(Path::new("/")))
        .map_err(|e| Error::Dir(dir.to_owned(), e))?;
    std::fs::create_dir(dir).map_err(|e| Error::Dir(dir.to_owned(), e))?;
    if !vmm.is_paused() {
        vmm.pause()?;
    }
    vmm.pause_devices();
    let result = write_paused(vmm, config, dir, diff, t0);
    if let Err(e) = vmm.resume_devices() {
        tracing::error!("resuming devices after a snapshot: {e}");
    }
    if result.is_err() {
        // Nothing half-written is left behind to be mistaken for a snapshot.
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn write_paused(
    vmm: &mut Vmm,
    config: &VmConfig,
    dir: &Path,
    diff: bool,
    t0: Instant,
) -> Result<SnapshotReport, Error> {
    let stacks = vmm
        .freeze_disks(|i| dir.join(format!("disk{i}.diff")), true)
        .map_err(|(i, e)| Error::Freeze(i, e))?;
    // Lower layers a live fork froze without syncing become part of a durable snapshot now.
    for layer in stacks.iter().flat_map(|s| s.iter().skip(1)) {
        File::open(layer)
            .and_then(|f| f.sync_all())
            .map_err(|e| file_err(layer, e))?;
    }
    let state = vmm.capture()?;
    let mem = vmm.memory();
    let restored_from = vmm.memory_image.clone();
    let (image, stats) = match (&restored_from, diff) {
        (Some(parent), true) => {
            let dirty = cow_pages(mem)?;
            let path = dir.join(MEMORY_DIFF_FILE);
            let (ranges, stats) = specc_snapshot::write_memory_diff(mem, &path, &dirty)
                .map_err(|e| file_err(&path, e))?;
            let mut image = parent.clone();
            image.overlays.push(Overlay {
                file: PathBuf::from(MEMORY_DIFF_FILE),
                ranges,
            });
            (image, stats)
        }
        _ => {
            let path = dir.join(MEMORY_FILE);
            let opts = WriteOptions {
                skip_unpopulated: restored_from.is_none(),
            };
            let stats =
                specc_snapshot::write_memory(mem, &path, &opts).map_err(|e| file_err(&path, e))?;
            let image = MemoryImage {
                base: Some(PathBuf::from(MEMORY_FILE)),
                overlays: Vec::new(),
            };
            (image, stats)
        }
    };
    let disks = stacks
        .into_iter()
        .map(|layers| DiskImage {
            layers: layers.into_iter().map(|p| relative_to(dir, &p)).collect(),
        })
        .collect();
    let snap = VmSnapshot {
        vcpus: config.vcpus,
        mem_bytes: config.mem_bytes,
        cmdline: config.cmdline.clone(),
        host_cpu: CpuFingerprint::host(),
        taken_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
        state,
        memory: image,
        disks,
    };
    let path = dir.join(VMSTATE_FILE);
    // Written last: a directory with a vmstate file is a complete snapshot.
    specc_snapshot::write_state_file(&path, &snap).map_err(|e| file_err(&path, e))?;
    Ok(SnapshotReport {
        pause_us: micros(t0.elapsed()),
        memory_data_bytes: stats.data_bytes,
        memory_total_bytes: stats.total_bytes,
        diff: diff && restored_from.is_some(),
    })
}

/// `path` relative to `dir` if it is inside it, else as is.
fn relative_to(dir: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(dir)
        .map_or_else(|_| path.to_owned(), Path::to_path_buf)
}

/// The absolute form of a path recorded in the snapshot in `dir`.
pub fn resolve(dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        dir.join(path)
    }
}

/// Reads and validates `dir/vmstate`.
pub fn read(dir: &Path) -> Result<VmSnapshot, Error> {
    let path = dir.join(VMSTATE_FILE);
    specc_snapshot::read_state_file(&path, VMSTATE_LIMIT).map_err(|e| file_err(&path, e))
}

/// `snap`'s memory image with every path made absolute against `dir`.
pub fn resolved_memory(dir: &Path, snap: &VmSnapshot) -> MemoryImage {
    MemoryImage {
        base: snap.memory.base.as_deref().map(|p| resolve(dir, p)),
        overlays: snap
            .memory
            .overlays
            .iter()
            .map(|o| Overlay {
                file: resolve(dir, &o.file),
                ranges: o.ranges.clone(),
            })
            .collect(),
    }
}

/// Restores the snapshot in `dir` with the run-time settings of `config` (console, vsock
/// socket, control socket, net backend, fresh disk tops). The VM's shape (vCPUs, memory) is
/// the snapshot's; a disk whose `layers` are empty in `config` gets the snapshot's stack.
/// Memory is mapped privately from the snapshot's files: nothing is read up front.
pub fn restore(dir: &Path, config: &VmConfig) -> Result<Vmm, Error> {
    restore_with(&dir.join(VMSTATE_FILE), config, None)
}

/// Like [`restore`], from a state file anywhere (a store blob), with the memory image given
/// explicitly (`memory`, absolute paths) instead of the one the state file records: how the
/// builder restores a layer whose files live in the content-addressed store. Relative paths
/// recorded in the state file are relative to its directory.
pub fn restore_with(
    vmstate: &Path,
    config: &VmConfig,
    memory: Option<MemoryImage>,
) -> Result<Vmm, Error> {
    let t0 = Instant::now();
    let dir = vmstate.parent().unwrap_or(Path::new("."));
    let snap: VmSnapshot = specc_snapshot::read_state_file(vmstate, VMSTATE_LIMIT)
        .map_err(|e| file_err(vmstate, e))?;
    CpuFingerprint::host()
        .check_compatible(&snap.host_cpu)
        .map_err(Error::Cpu)?;
    let mut config = config.clone();
    config.vcpus = snap.vcpus;
    config.mem_bytes = snap.mem_bytes;
    if config.disks.len() != snap.disks.len() {
        return Err(Error::Config(format!(
            "the snapshot has {} disks, the configuration {}",
            snap.disks.len(),
            config.disks.len()
        )));
    }
    for (d, img) in config.disks.iter_mut().zip(&snap.disks) {
        if d.layers.is_empty() {
            d.layers = img.layers.iter().map(|p| resolve(dir, p)).collect();
        }
        if std::fs::metadata(&d.top).is_ok_and(|m| m.len() > 0) {
            return Err(Error::Config(format!(
                "disk top {} already exists: a restored VM starts on a fresh diff",
                d.top.display()
            )));
        }
    }
    let image = memory.unwrap_or_else(|| resolved_memory(dir, &snap));
    let mem = map_image(&image, snap.mem_bytes, config.hugepages)?;
    tracing::debug!("restore: state read, memory mapped {:?}", t0.elapsed());
    let mut vmm = crate::builder::restore_captured(&config, Some(mem), &snap.state)?;
    vmm.memory_image = Some(image);
    // `restore_us` is read by `specc-bench restore --linux` from a restored VMM's log.
    tracing::debug!(
        restore_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
        "restore: running {:?}",
        t0.elapsed()
    );
    Ok(vmm)
}

/// The bounds on which holes of a memory file [`map_image`] maps anonymous.
pub use specc_snapshot::holes::{MAX_HOLES, MIN_HOLE};

/// Bytes of holes in `image`'s files that [`map_image`] leaves file-backed (beyond the bound
/// on mappings; see `specc_snapshot::holes`): on tmpfs, the most a restored
/// guest can take from the file system by touching them. Every other hole is mapped
/// anonymous. Follows `map_image`'s own split: the base per RAM region, an overlay's ranges
/// cut at region boundaries (and none for an overlay with more pieces than are mapped, which
/// is copied in with `pread`, which takes no page of a hole).
pub fn file_hole_bytes(image: &MemoryImage, mem_bytes: u64) -> Result<u64, Error> {
    let mut regions = Vec::new();
    let mut at = 0u64;
    for (_, len) in crate::arch::x86_64::layout::ram_regions(mem_bytes) {
        regions.push(PageRange { offset: at, len });
        at += len;
    }
    let open = |p: &Path| File::open(p).map_err(|e| file_err(p, e));
    let mut total = 0;
    if let Some(base) = &image.base {
        let f = open(base.as_path())?;
        for r in &regions {
            total += specc_snapshot::holes::plan_holes(&f, std::slice::from_ref(r))
                .map_err(|e| file_err(base, e))?
                .1;
        }
    }
    for o in &image.overlays {
        let mut pieces = Vec::new();
        for range in &o.ranges {
            for r in &regions {
                let lo = range.offset.max(r.offset);
                let hi = (range.offset + range.len).min(r.offset + r.len);
                if lo < hi {
                    pieces.push(PageRange {
                        offset: lo,
                        len: hi - lo,
                    });
                }
            }
        }
        if pieces.len() <= specc_snapshot::memory::MAX_OVERLAY_MAPPINGS {
            let f = open(o.file.as_path())?;
            total += specc_snapshot::holes::plan_holes(&f, &pieces)
                .map_err(|e| file_err(&o.file, e))?
                .1;
        }
    }
    Ok(total)
}

/// Maps a memory image: the base privately (or zeroes), each overlay over it.
pub fn map_image(
    image: &MemoryImage,
    mem_bytes: u64,
    hugepages: bool,
) -> Result<GuestMemoryMmap, Error> {
    let backing = match &image.base {
        Some(path) => {
            specc_snapshot::check_memory_file(path, mem_bytes).map_err(|e| file_err(path, e))?;
            MemoryBacking::File { path: path.clone() }
        }
        None => MemoryBacking::Anonymous,
    };
    let mem = memory::create(mem_bytes, &backing, hugepages)?;
    for o in &image.overlays {
        specc_snapshot::check_memory_file(&o.file, mem_bytes).map_err(|e| file_err(&o.file, e))?;
        specc_snapshot::map_overlay(&mem, &o.file, &o.ranges).map_err(|e| file_err(&o.file, e))?;
    }
    Ok(mem)
}

/// Pages of a privately mapped file that have been written since it was mapped: in
/// /proc/self/pagemap they are present (bit 63) or swapped (bit 62) but no longer file pages
/// (bit 61). A page of a hole mapped anonymous (see [`file_hole_bytes`]) that the guest only
/// read is the zero page, no file page either: it is taken as written, which costs the diff a
/// range of zeros (a hole of the diff file), never a wrong byte.
pub fn cow_pages(mem: &GuestMemoryMmap) -> Result<DirtyPages, Error> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    let pagemap = File::open("/proc/self/pagemap").map_err(Error::Pagemap)?;
    let mut bitmaps = Vec::new();
    for r in mem.iter() {
        let pages = usize::try_from(r.len() / 4096).unwrap_or(0);
        let mut words = vec![0u64; pages.div_ceil(64)];
        let host = r.as_ptr() as u64;
        let mut entries = vec![0u8; 8 * 8192];
        let mut page = 0usize;
        while page < pages {
            let n = (pages - page).min(8192);
            let buf = &mut entries[..n * 8];
            let at = (host / 4096 + page as u64) * 8;
            pagemap.read_exact_at(buf, at).map_err(Error::Pagemap)?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                let v = u64::from_le_bytes(b);
                if v & (PRESENT | SWAPPED) != 0 && v & FILE == 0 {
                    let p = page + i;
                    words[p / 64] |= 1 << (p % 64);
                }
            }
            page += n;
        }
        bitmaps.push(words);
    }
    Ok(DirtyPages::from_kvm_bitmaps(bitmaps))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A sparse file of `len` bytes with a page of 0x11 at each of `pages` (byte offsets).
    fn sparse(path: &Path, len: u64, pages: &[u64]) {
        let f = File::create(path).unwrap();
        f.set_len(len).unwrap();
        for &at in pages {
            f.write_all_at(&[0x11; 4096], at).unwrap();
        }
        f.sync_all().unwrap();
    }

    /// A base with holes and an overlay whose range has a one-page and a long hole: all are
    /// mapped anonymous, nothing stays file-backed; the restored memory reads the files' bytes
    /// and zeros, and a diff snapshot takes as written the pages written and the anonymous
    /// hole pages read, never a file page only read.
    #[test]
    fn restored_memory_maps_long_holes_anonymous_and_diffs_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("memory");
        let diff = dir.path().join("memory.diff");
        sparse(&base, 16 * MIB, &[0, 8 * MIB]);
        // The range 4 MiB..6 MiB: data at its start, at +8 KiB (a 4 KiB hole between) and at
        // its last page (a long hole before it).
        sparse(&diff, 16 * MIB, &[4 * MIB, 4 * MIB + 8192, 6 * MIB - 4096]);
        let image = MemoryImage {
            base: Some(base.clone()),
            overlays: vec![Overlay {
                file: diff.clone(),
                ranges: vec![PageRange {
                    offset: 4 * MIB,
                    len: 2 * MIB,
                }],
            }],
        };
        assert_eq!(file_hole_bytes(&image, 16 * MIB).unwrap(), 0);

        let mem = map_image(&image, 16 * MIB, false).unwrap();
        let byte = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        for (a, want) in [
            (0, 0x11),
            (4096, 0),
            (2 * MIB, 0),
            (4 * MIB, 0x11),
            (4 * MIB + 4096, 0),
            (4 * MIB + 8192, 0x11),
            (5 * MIB, 0),
            (6 * MIB - 4096, 0x11),
            (8 * MIB, 0x11),
            (12 * MIB, 0),
        ] {
            assert_eq!(byte(a), want, "byte at {a:#x}");
        }
        let bitmap = |addrs: &[u64]| {
            let mut words = vec![0u64; 16 * 256 / 64];
            for a in addrs {
                let page = usize::try_from(a / 4096).unwrap();
                words[page / 64] |= 1 << (page % 64);
            }
            DirtyPages::from_kvm_bitmaps(vec![words])
        };
        // Reading an anonymous hole maps the zero page, which is not a file page: a diff takes
        // it as written (zeros, a hole of the diff file). Reads of file data are not.
        let read = [4096, 2 * MIB, 4 * MIB + 4096, 5 * MIB, 12 * MIB];
        assert_eq!(cow_pages(&mem).unwrap(), bitmap(&read));
        let written = [0, 2 * MIB, 5 * MIB, 8 * MIB + 4096];
        for a in written {
            mem.write_obj(0x77u8, GuestAddress(a)).unwrap();
        }
        assert_eq!(
            cow_pages(&mem).unwrap(),
            bitmap(&[
                0,
                4096,
                2 * MIB,
                4 * MIB + 4096,
                5 * MIB,
                8 * MIB + 4096,
                12 * MIB
            ])
        );
        let mut back = vec![0u8; 4096];
        File::open(&base)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert!(
            back.iter().all(|&b| b == 0x11),
            "the base file is untouched"
        );
    }
}
