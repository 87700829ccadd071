//! Compaction of a suspended VM's own snapshot chain (the file side; `Daemon` decides when and
//! switches the record).
//!
//! Every suspend writes `snap-<n>/` with a memory diff over the chain before it and the disk's
//! frozen top over the disk stack before it, so both stacks grow by one per suspend. A
//! compaction writes `merged-<n>/` beside them: one memory diff for the VM's own memory diffs
//! (`specc_snapshot::merge`), one disk diff for its own disk diffs
//! (`specc_devices::disk::flatten`), a vmstate naming them (the same VM state) and `replaces`,
//! the list of files it supersedes. The daemon then records `merged-<n>` as the VM's restore
//! point (one database write: the switch) and deletes what `replaces` lists.
//!
//! What is merged: the suffix of each stack that lies in the VM's own directory. Store files
//! (the layer's base memory, its diffs and disk layers) are shared and content-addressed and
//! never touched; an own base memory file (a fork child's or booted VM's first suspend) is
//! kept as the base. While any VM forked from this one exists, the disk layers up to the
//! newest fork freeze (`<top>.fork<n>`) are kept too: a fork child's disk stack is this VM's
//! stack at the fork plus that layer, so every file a descendant reads is in the kept prefix.
//! (Memory files are never a descendant's: a fork child writes its whole memory at its first
//! suspend.)
//!
//! Crash safety: `merged-<n>` is complete once its vmstate exists (written last, atomically)
//! and in use once the database says so. [`remove_leftovers`] (after a switch, and on every
//! daemon start) removes the files of `merged-*` directories the restore point does not use
//! (an interrupted or discarded merge) and the files the restore point's `replaces` lists
//! (an interrupted deletion), never a file the current chain names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use specc_snapshot::PageRange;
use specc_snapshot::merge::ChainDiff;
use specc_vmm::snapshot_dir::{
    self, DiskImage, MEMORY_DIFF_FILE, Overlay, VMSTATE_FILE, VmSnapshot,
};

use crate::policy::ChainShape;

/// The list of files a merged snapshot supersedes, beside its vmstate.
pub(super) const REPLACES_FILE: &str = "replaces";
/// The start of a merged snapshot directory's name.
pub(super) const MERGED_PREFIX: &str = "merged-";
/// The largest `replaces` file read back.
const REPLACES_LIMIT: u64 = 16 << 20;

/// Errors of planning or writing a compaction.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The snapshot to compact cannot be read.
    #[error("reading the snapshot to compact")]
    Read(#[source] snapshot_dir::Error),
    /// Merging the memory diffs failed.
    #[error("merging the memory diffs")]
    Memory(#[source] specc_snapshot::merge::Error),
    /// Merging the disk diffs failed.
    #[error("merging the diffs of disk {0}")]
    Disk(usize, #[source] specc_devices::disk::DiskError),
    /// Writing the merged snapshot's state files failed.
    #[error("writing {}", .0.display())]
    State(PathBuf, #[source] specc_snapshot::StateError),
    /// A file system operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One disk's stack split into what stays and what is merged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiskSplit {
    keep: Vec<PathBuf>,
    merge: Vec<PathBuf>,
}

/// What a compaction of the snapshot in `from` would merge.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// The snapshot directory compacted (the VM's restore point when planned).
    pub from: PathBuf,
    snap: VmSnapshot,
    base: Option<PathBuf>,
    memory_keep: Vec<Overlay>,
    memory_merge: Vec<Overlay>,
    disks: Vec<DiskSplit>,
}

impl Plan {
    /// Reads the snapshot in `from` and splits its stacks: the suffix of each inside `own`
    /// (the VM's directory) is merged; with `descendants`, the disk layers up to the newest
    /// fork freeze stay as they are.
    pub fn new(own: &Path, from: &Path, descendants: bool) -> Result<Plan, CompactError> {
        let snap = snapshot_dir::read(from).map_err(CompactError::Read)?;
        let image = snapshot_dir::resolved_memory(from, &snap);
        let files: Vec<&Path> = image.overlays.iter().map(|o| o.file.as_path()).collect();
        let (keep, merge) = image.overlays.split_at(own_suffix(&files, own, false));
        let disks = snap
            .disks
            .iter()
            .map(|d| {
                let layers: Vec<PathBuf> = d
                    .layers
                    .iter()
                    .map(|l| snapshot_dir::resolve(from, l))
                    .collect();
                let paths: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
                let split = own_suffix(&paths, own, descendants);
                DiskSplit {
                    keep: layers[..split].to_vec(),
                    merge: layers[split..].to_vec(),
                }
            })
            .collect();
        Ok(Plan {
            from: from.to_owned(),
            base: image.base.clone(),
            memory_keep: keep.to_vec(),
            memory_merge: merge.to_vec(),
            disks,
            snap,
        })
    }

    /// The shape of the VM's own chain, for [`crate::policy::should_compact`].
    pub fn shape(&self) -> ChainShape {
        let lists: Vec<&[PageRange]> = self
            .memory_merge
            .iter()
            .map(|o| o.ranges.as_slice())
            .collect();
        ChainShape {
            memory_diffs: self.memory_merge.len(),
            disk_diffs: self.disks.iter().map(|d| d.merge.len()).max().unwrap_or(0),
            range_bytes: lists.iter().flat_map(|l| l.iter()).map(|r| r.len).sum(),
            union_bytes: specc_snapshot::merge::union_ranges(&lists)
                .iter()
                .map(|r| r.len)
                .sum(),
        }
    }
}

/// What a compaction wrote.
#[derive(Debug, Clone)]
pub(super) struct Merged {
    /// The merged snapshot directory.
    pub dir: PathBuf,
    /// Diffs merged, memory and disk.
    pub memory_diffs: usize,
    /// Disk diffs merged (all disks).
    pub disk_diffs: usize,
    /// Memory data bytes written.
    pub memory_data_bytes: u64,
}

/// Where the mergeable suffix of a stack (bottom first) starts: after the last file outside
/// `own`, and with `keep_forks` after the last layer a live fork froze.
fn own_suffix(stack: &[&Path], own: &Path, keep_forks: bool) -> usize {
    stack
        .iter()
        .rposition(|l| !l.starts_with(own) || (keep_forks && is_fork_layer(l)))
        .map_or(0, |i| i + 1)
}

/// Whether `p` is a layer a live fork froze (`<top>.fork<n>`).
fn is_fork_layer(p: &Path) -> bool {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .and_then(|n| {
            n.rsplit_once(".fork")
                .map(|(_, seq)| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or(false)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CompactError {
    let path = path.to_owned();
    move |source| CompactError::Io { what, path, source }
}

fn sync_dir(dir: &Path) -> Result<(), CompactError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io("syncing", dir))
}

/// Writes the merged snapshot of `plan` into `out` (removed first if a previous attempt left
/// it; removed again on any error). The inputs are only read.
pub(super) fn write(plan: &Plan, out: &Path) -> Result<Merged, CompactError> {
    let r = write_inner(plan, out);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(out);
    }
    r
}

fn write_inner(plan: &Plan, out: &Path) -> Result<Merged, CompactError> {
    match std::fs::remove_dir_all(out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing", out)(e)),
    }
    std::fs::create_dir(out).map_err(io("creating", out))?;
    sync_dir(out.parent().unwrap_or(Path::new("/")))?;
    let mut replaced: Vec<PathBuf> = Vec::new();
    let mut merged = Merged {
        dir: out.to_owned(),
        memory_diffs: 0,
        disk_diffs: 0,
        memory_data_bytes: 0,
    };
    let mut overlays = plan.memory_keep.clone();
    if plan.memory_merge.len() >= 2 {
        let chain: Vec<ChainDiff<'_>> = plan
            .memory_merge
            .iter()
            .map(|o| ChainDiff {
                file: &o.file,
                ranges: &o.ranges,
            })
            .collect();
        let (ranges, stats) = specc_snapshot::merge::merge_diffs(
            plan.snap.mem_bytes,
            &chain,
            &out.join(MEMORY_DIFF_FILE),
        )
        .map_err(CompactError::Memory)?;
        overlays.push(Overlay {
            file: PathBuf::from(MEMORY_DIFF_FILE),
            ranges,
        });
        replaced.extend(plan.memory_merge.iter().map(|o| o.file.clone()));
        merged.memory_diffs = stats.diffs;
        merged.memory_data_bytes = stats.data_bytes;
    } else {
        overlays.extend(plan.memory_merge.iter().cloned());
    }
    let mut disks = Vec::with_capacity(plan.disks.len());
    for (i, d) in plan.disks.iter().enumerate() {
        let mut layers = d.keep.clone();
        if d.merge.len() >= 2 {
            let name = format!("disk{i}.diff");
            specc_devices::disk::flatten(&d.merge, &out.join(&name))
                .map_err(|e| CompactError::Disk(i, e))?;
            layers.push(PathBuf::from(name));
            replaced.extend(d.merge.iter().cloned());
            merged.disk_diffs += d.merge.len();
        } else {
            layers.extend(d.merge.iter().cloned());
        }
        disks.push(DiskImage { layers });
    }
    // The state files of the snapshots whose files were merged go with them (the one
    // compacted included: `out` replaces it).
    let mut dirs: BTreeSet<PathBuf> = replaced
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    dirs.insert(plan.from.clone());
    replaced.extend(dirs.iter().map(|d| d.join(VMSTATE_FILE)));
    let list = out.join(REPLACES_FILE);
    specc_snapshot::write_state_file(&list, &replaced)
        .map_err(|e| CompactError::State(list.clone(), e))?;
    let mut snap = plan.snap.clone();
    snap.memory.base.clone_from(&plan.base);
    snap.memory.overlays = overlays;
    snap.disks = disks;
    let vmstate = out.join(VMSTATE_FILE);
    // Written last: with it the directory is a complete snapshot.
    specc_snapshot::write_state_file(&vmstate, &snap)
        .map_err(|e| CompactError::State(vmstate.clone(), e))?;
    Ok(merged)
}

/// Every file the snapshot in `dir` reads: its vmstate (and `replaces`), its memory files and
/// its disk layers, as absolute paths. None if it cannot be read.
fn chain_files(dir: &Path) -> Option<BTreeSet<PathBuf>> {
    let snap = snapshot_dir::read(dir).ok()?;
    let image = snapshot_dir::resolved_memory(dir, &snap);
    let mut files: BTreeSet<PathBuf> = [dir.join(VMSTATE_FILE), dir.join(REPLACES_FILE)].into();
    files.extend(image.base);
    files.extend(image.overlays.into_iter().map(|o| o.file));
    for d in &snap.disks {
        files.extend(d.layers.iter().map(|l| snapshot_dir::resolve(dir, l)));
    }
    Some(files)
}

/// Removes, in the VM directory `own` whose restore point is the snapshot in `restore`, what
/// compactions left behind: the files of `merged-*` directories the chain does not read, and
/// the files `restore/replaces` lists; then the snapshot directories left empty. Nothing the
/// chain reads is removed, nor anything when the chain cannot be read. Returns the files
/// removed.
pub(super) fn remove_leftovers(own: &Path, restore: &Path) -> Vec<PathBuf> {
    match chain_files(restore) {
        Some(keep) => remove_unread(own, restore, &keep),
        None => Vec::new(),
    }
}

/// [`remove_leftovers`] with the chain's files given.
fn remove_unread(own: &Path, restore: &Path, keep: &BTreeSet<PathBuf>) -> Vec<PathBuf> {
    let mut doomed: BTreeSet<PathBuf> = BTreeSet::new();
    if let Ok(list) = specc_snapshot::read_state_file::<Vec<PathBuf>>(
        &restore.join(REPLACES_FILE),
        REPLACES_LIMIT,
    ) {
        // Only files of this VM's own directory: the list is read back from disk.
        doomed.extend(list.into_iter().filter(|f| f.starts_with(own)));
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(own)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    for d in &dirs {
        let merged = d
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(MERGED_PREFIX));
        if merged
            && d != restore
            && let Ok(rd) = std::fs::read_dir(d)
        {
            doomed.extend(rd.flatten().map(|e| e.path()));
        }
    }
    let mut removed = Vec::new();
    for f in doomed.iter().filter(|f| !keep.contains(*f)) {
        match std::fs::remove_file(f) {
            Ok(()) => removed.push(f.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %f.display(), "compaction: cannot remove: {e}"),
        }
    }
    let mut parents: BTreeSet<PathBuf> = removed
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    parents.extend(dirs.into_iter().filter(|d| {
        d.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(MERGED_PREFIX))
    }));
    for p in parents {
        if p != own && p.starts_with(own) && p != restore {
            // Only an empty directory goes (remove_dir refuses any other).
            let _ = std::fs::remove_dir(&p);
        }
    }
    if !removed.is_empty() {
        let _ = sync_dir(own);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    /// Store files and an ancestor's never merge; with descendants, the own layers up to the
    /// newest fork freeze stay too.
    #[test]
    fn only_the_own_suffix_after_the_last_fork_freeze_is_merged() {
        let own = p("/s/vms/a");
        let disk = [
            p("/store/blobs/base"),
            p("/s/vms/parent/snap-1/disk0.diff"),
            p("/s/vms/a/snap-1/disk0.diff"),
            p("/s/vms/a/disk-2.diff.fork1"),
            p("/s/vms/a/snap-2/disk0.diff"),
            p("/s/vms/a/snap-3/disk0.diff"),
        ];
        assert_eq!(own_suffix(&disk, own, false), 2);
        assert_eq!(own_suffix(&disk, own, true), 4);
        assert_eq!(
            own_suffix(&disk[..2], own, false),
            2,
            "nothing own: nothing to merge"
        );
        let mem = [p("/store/blobs/m1"), p("/s/vms/a/snap-1/memory.diff")];
        assert_eq!(own_suffix(&mem, own, false), 1);
        assert_eq!(own_suffix(&[], own, true), 0);
        // A prefix match of names is not a directory match.
        assert_eq!(
            own_suffix(&[p("/s/vms/ab/snap-1/disk0.diff")], own, false),
            1
        );
    }

    /// After a switch to `merged-5`: the files it replaces go, and a stale merge's, and the
    /// directories left empty; what the chain reads stays (a protected disk layer in snap-1,
    /// the own base), and so does what nobody listed (a fork freeze, the next top).
    #[test]
    fn leftovers_go_and_the_chain_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path().join("vms/a");
        let f = |rel: &str| {
            let path = own.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, rel).unwrap();
            path
        };
        let snap1 = [
            f("snap-1/vmstate"),
            f("snap-1/memory"),
            f("snap-1/disk0.diff"),
        ];
        let snap2 = [
            f("snap-2/vmstate"),
            f("snap-2/memory.diff"),
            f("snap-2/disk0.diff"),
        ];
        let snap5 = [
            f("snap-5/vmstate"),
            f("snap-5/memory.diff"),
            f("snap-5/disk0.diff"),
        ];
        let stale = [f("merged-3/memory.diff"), f("merged-3/disk0.diff")];
        let others = [f("disk-2.diff.fork1"), f("disk-6.diff")];
        let restore = own.join("merged-5");
        let merged = [
            f("merged-5/vmstate"),
            f("merged-5/replaces"),
            f("merged-5/memory.diff"),
            f("merged-5/disk0.diff"),
        ];
        let replaced: Vec<PathBuf> = [&snap2[..], &snap5[..]]
            .concat()
            .into_iter()
            .chain([snap1[0].clone(), PathBuf::from("/elsewhere/vmstate")])
            .collect();
        std::fs::remove_file(&merged[1]).unwrap();
        specc_snapshot::write_state_file(&merged[1], &replaced).unwrap();
        let keep: BTreeSet<PathBuf> = merged
            .iter()
            .cloned()
            .chain([snap1[1].clone(), snap1[2].clone(), others[0].clone()])
            .collect();
        let removed: BTreeSet<PathBuf> = remove_unread(&own, &restore, &keep).into_iter().collect();
        let want: BTreeSet<PathBuf> = [&snap2[..], &snap5[..], &stale[..], &snap1[..1]]
            .concat()
            .into_iter()
            .collect();
        assert_eq!(removed, want);
        for k in keep.iter().chain(&others) {
            assert!(k.exists(), "{} kept", k.display());
        }
        for gone in ["snap-2", "snap-5", "merged-3"] {
            assert!(!own.join(gone).exists(), "{gone} removed once empty");
        }
        assert!(own.join("snap-1").is_dir());
        // Run again (a restart after the deletion): nothing more goes.
        assert!(remove_unread(&own, &restore, &keep).is_empty());
    }

    #[test]
    fn fork_layers_are_recognised_by_name() {
        assert!(is_fork_layer(Path::new("/s/vms/a/disk-2.diff.fork1")));
        assert!(is_fork_layer(Path::new("/r/vms/a-1/disk.diff.fork12")));
        assert!(!is_fork_layer(Path::new("/s/vms/a/snap-3/disk0.diff")));
        assert!(!is_fork_layer(Path::new("/s/vms/a/disk-2.diff.fork")));
        assert!(!is_fork_layer(Path::new("/s/vms/a/x.forkx")));
    }
}
