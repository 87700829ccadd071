//! Applying image layers (tar streams) onto a directory with OCI whiteout semantics.
//!
//! A layer is untrusted input. Architecture invariant: nothing is ever created, changed or
//! removed outside the unpack root. Every path is resolved component by component from the
//! root with `lstat`; a symlink met on the way is followed *inside* the root (an absolute
//! target restarts at the root, `..` stops at the root), exactly as the guest will see it, so
//! `evil -> /` followed by `evil/etc/passwd` writes the image's `/etc/passwd`, never the
//! host's. The resolved path then consists of real directories only, and the final component
//! is never followed: an existing entry there is removed and replaced. `..` in an entry's own
//! name or in a hard link's target is refused outright. We are the only writer of the tree,
//! so a path checked stays valid while it is used.
//!
//! Whiteouts follow the image spec: `DIR/.wh.NAME` removes `DIR/NAME` of the lower layers,
//! `DIR/.wh..wh..opq` removes all of `DIR`'s lower content; neither hides what the same
//! layer adds, in whichever order the entries come.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Symlinks followed while resolving one path before it counts as a loop (Linux: 40).
const MAX_SYMLINKS: usize = 40;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Errors of the layer unpacker.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The tar stream could not be read (truncated, corrupt, or the decompressor failed).
    #[error("reading the layer archive")]
    Read(#[source] io::Error),
    /// An entry's name or hard link target climbs out of the root with `..`.
    #[error("entry {} leaves the image root (`..`)", path.display())]
    Traversal {
        /// The entry's path (or link target) as written in the archive.
        path: PathBuf,
    },
    /// An entry would replace the root directory itself with a non-directory.
    #[error("entry {} would replace the image root", path.display())]
    ReplacesRoot {
        /// The entry's path.
        path: PathBuf,
    },
    /// A path's parent is a file (or a device) in the tree.
    #[error("entry {}: {} is not a directory", path.display(), component.display())]
    NotADirectory {
        /// The entry's path.
        path: PathBuf,
        /// The tree path that is not a directory.
        component: PathBuf,
    },
    /// Resolving a path met more than 40 symlinks.
    #[error("entry {}: too many levels of symlinks", path.display())]
    SymlinkLoop {
        /// The entry's path.
        path: PathBuf,
    },
    /// A hard link whose target is missing or a directory.
    #[error("hard link {} -> {}: {why}", path.display(), target.display())]
    HardLink {
        /// The link's path.
        path: PathBuf,
        /// Its target as written in the archive.
        target: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// The layers hold more file data than the disk.
    #[error("entry {}: the image's files exceed the {limit}-byte budget (the disk size)", path.display())]
    TooBig {
        /// The entry that crossed the budget.
        path: PathBuf,
        /// The budget in bytes.
        limit: u64,
    },
    /// Unpacking sets owners and creates device nodes, which needs root.
    #[error("unpacking image layers needs root: files keep their owners and device nodes")]
    NeedsRoot,
    /// A file system operation in the tree failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which tree path (relative to the root).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UnpackError {
    let path = path.to_path_buf();
    move |source| UnpackError::Io { what, path, source }
}

/// Counts of what a layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Archive entries read (whiteouts included).
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// File data written, in bytes.
    pub bytes: u64,
    /// `.wh.NAME` and opaque markers applied.
    pub whiteouts: u64,
    /// Entries of kinds an image has no use for (sockets, GNU volume labels, ...), skipped.
    pub skipped: u64,
}

/// A directory being assembled from layers.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    budget: u64,
    used: u64,
    /// Directory mtimes, applied at the end (adding children changes them).
    dir_times: Vec<(PathBuf, SystemTime)>,
}

/// One step of a path being resolved.
#[derive(Debug, Clone)]
enum Step {
    Root,
    Up,
    Name(OsString),
}

fn steps_of(p: &Path) -> impl Iterator<Item = Step> + '_ {
    p.components().filter_map(|c| match c {
        Component::RootDir | Component::Prefix(_) => Some(Step::Root),
        Component::ParentDir => Some(Step::Up),
        Component::CurDir => None,
        Component::Normal(n) => Some(Step::Name(n.to_owned())),
    })
}

/// The components of an archive path, relative to the root: a leading `/` and `.` are
/// dropped (as tar does), `..` is refused.
fn entry_components(p: &Path) -> Result<Vec<OsString>, UnpackError> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(UnpackError::Traversal { path: p.to_owned() });
            }
        }
    }
    Ok(out)
}

/// What is at a tree path, without following a final symlink.
fn lstat(host: &Path) -> Result<Option<fs::Metadata>, io::Error> {
    match fs::symlink_metadata(host) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The tar fields of an entry, with PAX records applied.
#[derive(Debug)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<SystemTime>,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// Extended attributes worth keeping: file capabilities (`ping`, `newuidmap`) and `user.*`.
/// `trusted.*` (overlayfs' own markers among them) and SELinux labels of the build host are
/// not the guest's.
fn kept_xattr(name: &[u8]) -> bool {
    name == b"security.capability" || name.starts_with(b"user.")
}

impl Tree {
    /// An empty tree at `root` (created, mode 0700 so that no other host user can reach the
    /// image's setuid files or device nodes while it exists; `mkfs.ext4 -d` does not copy the
    /// root's mode). `budget` bounds the file data written, so a compression bomb cannot fill
    /// the host's disk.
    pub fn create(root: &Path, budget: u64) -> Result<Tree, UnpackError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(UnpackError::NeedsRoot);
        }
        fs::create_dir(root).map_err(io_err("creating", root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", root))?;
        Ok(Tree {
            root: root.to_owned(),
            budget,
            used: 0,
            dir_times: Vec::new(),
        })
    }

    /// The host directory of the tree.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// File data written so far, in bytes.
    pub fn bytes_used(&self) -> u64 {
        self.used
    }

    fn host(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Resolves `comps` (a directory path) inside the tree, following symlinks inside the
    /// root. Missing directories are created (mode 0755, owned by root) when `created` is
    /// given, and recorded in it; otherwise a missing one gives `Ok(None)`. The result is
    /// relative to the root and has no symlink in it.
    fn resolve_dir(
        &self,
        entry: &Path,
        comps: &[OsString],
        mut created: Option<&mut HashSet<PathBuf>>,
    ) -> Result<Option<PathBuf>, UnpackError> {
        let mut pending: VecDeque<Step> = comps.iter().cloned().map(Step::Name).collect();
        let mut stack: Vec<OsString> = Vec::new();
        let mut links = 0;
        while let Some(step) = pending.pop_front() {
            let name = match step {
                Step::Root => {
                    stack.clear();
                    continue;
                }
                Step::Up => {
                    stack.pop();
                    continue;
                }
                Step::Name(n) => n,
            };
            let rel: PathBuf = stack.iter().chain(std::iter::once(&name)).collect();
            let host = self.host(&rel);
            match lstat(&host).map_err(io_err("stat", &rel))? {
                None => {
                    let Some(created) = created.as_deref_mut() else {
                        return Ok(None);
                    };
                    fs::create_dir(&host).map_err(io_err("creating", &rel))?;
                    fs::set_permissions(&host, fs::Permissions::from_mode(0o755))
                        .map_err(io_err("chmod", &rel))?;
                    created.insert(rel);
                }
                Some(m) if m.file_type().is_dir() => {}
                Some(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(UnpackError::SymlinkLoop {
                            path: entry.to_owned(),
                        });
                    }
                    let target = fs::read_link(&host).map_err(io_err("reading link", &rel))?;
                    for s in steps_of(&target).collect::<Vec<_>>().into_iter().rev() {
                        pending.push_front(s);
                    }
                    continue;
                }
                Some(_) => {
                    return Err(UnpackError::NotADirectory {
                        path: entry.to_owned(),
                        component: rel,
                    });
                }
            }
            stack.push(name);
        }
        Ok(Some(stack.iter().collect()))
    }

    /// Resolves a guest path inside the tree, following every symlink (the last one too)
    /// inside the root; `None` if something on the way is missing. For the installer's
    /// look-ups (is `/sbin/init` systemd?).
    pub fn lookup(&self, guest: &str) -> Result<Option<(PathBuf, fs::Metadata)>, UnpackError> {
        let path = Path::new(guest);
        let mut comps = entry_components(path)?;
        for _ in 0..MAX_SYMLINKS {
            let Some(name) = comps.pop() else {
                let m = fs::symlink_metadata(&self.root).map_err(io_err("stat", path))?;
                return Ok(Some((PathBuf::new(), m)));
            };
            let Some(dir) = self.resolve_dir(path, &comps, None)? else {
                return Ok(None);
            };
            let rel = dir.join(&name);
            match lstat(&self.host(&rel)).map_err(io_err("stat", &rel))? {
                None => return Ok(None),
                Some(m) if m.file_type().is_symlink() => {
                    let target =
                        fs::read_link(self.host(&rel)).map_err(io_err("reading link", &rel))?;
                    // Re-resolve `dir/target` from the root.
                    let joined = if target.is_absolute() {
                        target
                    } else {
                        Path::new("/").join(&dir).join(target)
                    };
                    comps = normalize(&joined);
                }
                Some(m) => return Ok(Some((rel, m))),
            }
        }
        Err(UnpackError::SymlinkLoop {
            path: path.to_owned(),
        })
    }

    /// Removes whatever is at `rel` (a directory with its content); returns the file bytes
    /// freed. A missing path is not an error.
    fn remove(&mut self, rel: &Path) -> Result<(), UnpackError> {
        let host = self.host(rel);
        let Some(m) = lstat(&host).map_err(io_err("stat", rel))? else {
            return Ok(());
        };
        let freed = if m.file_type().is_dir() {
            let freed = dir_bytes(&host);
            fs::remove_dir_all(&host).map_err(io_err("removing", rel))?;
            freed
        } else {
            fs::remove_file(&host).map_err(io_err("removing", rel))?;
            if m.file_type().is_file() && m.nlink() == 1 {
                m.len()
            } else {
                0
            }
        };
        self.used = self.used.saturating_sub(freed);
        Ok(())
    }

    /// Applies one layer (an uncompressed tar stream) onto the tree.
    pub fn apply_layer<R: Read>(&mut self, tar: R) -> Result<LayerStats, UnpackError> {
        let mut archive = tar::Archive::new(tar);
        let mut stats = LayerStats::default();
        // Everything this layer wrote: whiteouts in it do not hide these.
        let mut written: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(UnpackError::Read)? {
            let mut entry = entry.map_err(UnpackError::Read)?;
            stats.entries += 1;
            self.apply_entry(&mut entry, &mut written, &mut stats)?;
        }
        Ok(stats)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        written: &mut HashSet<PathBuf>,
        stats: &mut LayerStats,
    ) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let path = entry.path().map_err(UnpackError::Read)?.into_owned();
        let comps = entry_components(&path)?;
        let kind = entry.header().entry_type();
        let Some((name, parents)) = comps.split_last() else {
            // The root itself ("./"): its mode and owner are the image builder's (mkfs sets
            // root:root 0755), so only a non-directory here is an error.
            return if kind == T::Directory {
                Ok(())
            } else {
                Err(UnpackError::ReplacesRoot { path })
            };
        };

        if let Some(rest) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            stats.whiteouts += 1;
            if name.as_bytes() == OPAQUE {
                let dir = self
                    .resolve_dir(&path, parents, Some(written))?
                    .expect("created when missing");
                written.insert(dir.clone());
                return self.clear_lower(&dir, written);
            }
            if rest.starts_with(WHITEOUT_PREFIX) || rest.is_empty() {
                // Other `.wh..wh.` names are aufs bookkeeping (hard link directories).
                return Ok(());
            }
            let Some(dir) = self.resolve_dir(&path, parents, None)? else {
                return Ok(());
            };
            let victim = dir.join(OsStr::from_bytes(rest));
            if !written.contains(&victim) {
                self.remove(&victim)?;
            }
            return Ok(());
        }

        if !matches!(
            kind,
            T::Directory
                | T::Regular
                | T::Continuous
                | T::GNUSparse
                | T::Symlink
                | T::Link
                | T::Char
                | T::Block
                | T::Fifo
        ) {
            // PAX global headers, sockets, GNU volume labels: nothing an image needs.
            stats.skipped += 1;
            return Ok(());
        }
        let dir = self
            .resolve_dir(&path, parents, Some(written))?
            .expect("created when missing");
        let rel = dir.join(name);
        let host = self.host(&rel);
        let meta = self.meta(entry)?;
        match kind {
            T::Directory => {
                let existing = lstat(&host).map_err(io_err("stat", &rel))?;
                if !existing.as_ref().is_some_and(|m| m.file_type().is_dir()) {
                    self.remove(&rel)?;
                    fs::create_dir(&host).map_err(io_err("creating", &rel))?;
                }
                std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid))
                    .map_err(io_err("chown", &rel))?;
                fs::set_permissions(&host, fs::Permissions::from_mode(meta.mode))
                    .map_err(io_err("chmod", &rel))?;
                if let Some(t) = meta.mtime {
                    self.dir_times.push((rel.clone(), t));
                }
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.remove(&rel)?;
                let size = entry.size();
                if self.used.saturating_add(size) > self.budget {
                    return Err(UnpackError::TooBig {
                        path,
                        limit: self.budget,
                    });
                }
                let mut f = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&host)
                    .map_err(io_err("creating", &rel))?;
                let n =
                    io::copy(&mut (&mut *entry).take(size), &mut f).map_err(UnpackError::Read)?;
                self.used += n;
                stats.files += 1;
                stats.bytes += n;
                std::os::unix::fs::fchown(&f, Some(meta.uid), Some(meta.gid))
                    .map_err(io_err("chown", &rel))?;
                // After the chown, which clears set-id bits.
                f.set_permissions(fs::Permissions::from_mode(meta.mode))
                    .map_err(io_err("chmod", &rel))?;
                for (name, value) in &meta.xattrs {
                    set_xattr(&f, name, value).map_err(io_err("setting an xattr on", &rel))?;
                }
                if let Some(t) = meta.mtime {
                    f.set_modified(t)
                        .map_err(io_err("setting the mtime of", &rel))?;
                }
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| UnpackError::Read(io::Error::other("symlink without target")))?
                    .into_owned();
                self.remove(&rel)?;
                // The target is only text to the host: it is interpreted in the guest (and
                // inside the root by `resolve_dir`), so any value is safe to store.
                symlink(&target, &host).map_err(io_err("symlinking", &rel))?;
                std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid))
                    .map_err(io_err("chown", &rel))?;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| UnpackError::Read(io::Error::other("hard link without target")))?
                    .into_owned();
                let src = self.resolve_link_target(&path, &target)?;
                if src == rel {
                    return Ok(());
                }
                self.remove(&rel)?;
                fs::hard_link(self.host(&src), &host).map_err(io_err("linking", &rel))?;
            }
            T::Char | T::Block | T::Fifo => {
                self.remove(&rel)?;
                let file_type = match kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                mknod(&host, file_type | (meta.mode & 0o7777), major, minor)
                    .map_err(io_err("creating the device node", &rel))?;
                std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid))
                    .map_err(io_err("chown", &rel))?;
                fs::set_permissions(&host, fs::Permissions::from_mode(meta.mode))
                    .map_err(io_err("chmod", &rel))?;
            }
            _ => unreachable!("filtered above"),
        }
        written.insert(rel);
        Ok(())
    }

    /// The tree path a hard link points at: resolved like an entry's parent (symlinks inside
    /// the root), the final component not followed, and it must be an existing non-directory.
    fn resolve_link_target(&self, path: &Path, target: &Path) -> Result<PathBuf, UnpackError> {
        let bad = |why| UnpackError::HardLink {
            path: path.to_owned(),
            target: target.to_owned(),
            why,
        };
        let comps = entry_components(target).map_err(|_| UnpackError::Traversal {
            path: target.to_owned(),
        })?;
        let Some((name, parents)) = comps.split_last() else {
            return Err(bad("the target is the root"));
        };
        let Some(dir) = self.resolve_dir(path, parents, None)? else {
            return Err(bad("the target does not exist"));
        };
        let rel = dir.join(name);
        match lstat(&self.host(&rel)).map_err(io_err("stat", &rel))? {
            None => Err(bad("the target does not exist")),
            Some(m) if m.file_type().is_dir() => Err(bad("the target is a directory")),
            Some(_) => Ok(rel),
        }
    }

    /// An opaque directory: removes everything below `dir` that this layer did not write.
    fn clear_lower(&mut self, dir: &Path, written: &HashSet<PathBuf>) -> Result<(), UnpackError> {
        let host = self.host(dir);
        let mut children: Vec<OsString> = fs::read_dir(&host)
            .map_err(io_err("listing", dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("listing", dir))?;
        children.sort();
        for name in children {
            let rel = dir.join(&name);
            if !written.contains(&rel) {
                self.remove(&rel)?;
            } else if lstat(&self.host(&rel))
                .map_err(io_err("stat", &rel))?
                .is_some_and(|m| m.file_type().is_dir())
            {
                self.clear_lower(&rel, written)?;
            }
        }
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, UnpackError> {
        let h = entry.header();
        let mode = h.mode().map_err(UnpackError::Read)? & 0o7777;
        let mut uid = u32::try_from(h.uid().map_err(UnpackError::Read)?).unwrap_or(u32::MAX);
        let mut gid = u32::try_from(h.gid().map_err(UnpackError::Read)?).unwrap_or(u32::MAX);
        let mut mtime = h
            .mtime()
            .ok()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Read)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Read)?;
                let key = ext.key_bytes();
                let num = || {
                    std::str::from_utf8(ext.value_bytes())
                        .ok()
                        .and_then(|v| v.parse::<u32>().ok())
                };
                match key {
                    b"uid" => uid = num().unwrap_or(uid),
                    b"gid" => gid = num().unwrap_or(gid),
                    b"mtime" => {
                        // "seconds[.fraction]"; the fraction does not matter to anyone.
                        let secs = std::str::from_utf8(ext.value_bytes())
                            .ok()
                            .and_then(|v| v.split('.').next()?.parse::<u64>().ok());
                        if let Some(s) = secs {
                            mtime = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
                        }
                    }
                    _ => {
                        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.")
                            && kept_xattr(name)
                            && let Ok(name) = CString::new(name)
                        {
                            xattrs.push((name, ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    /// Sets the recorded directory mtimes (deepest first, since setting a child's does not
    /// touch its parent's but creating one did). Paths removed by later layers are skipped.
    pub fn finish(mut self) -> Result<PathBuf, UnpackError> {
        let times = std::mem::take(&mut self.dir_times);
        let mut last: std::collections::HashMap<PathBuf, SystemTime> = Default::default();
        for (rel, t) in times {
            last.insert(rel, t);
        }
        let mut dirs: Vec<_> = last.into_iter().collect();
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, t) in dirs {
            let host = self.host(&rel);
            if !lstat(&host)
                .map_err(io_err("stat", &rel))?
                .is_some_and(|m| m.file_type().is_dir())
            {
                continue;
            }
            File::open(&host)
                .and_then(|f| f.set_modified(t))
                .map_err(io_err("setting the mtime of", &rel))?;
        }
        Ok(self.root)
    }

    /// Writes a file at guest path `guest` (replacing what is there, never writing through
    /// it), owned by root. Parents are resolved inside the root and created when missing.
    pub fn put_file(&mut self, guest: &str, content: &[u8], mode: u32) -> Result<(), UnpackError> {
        let rel = self.place(guest)?;
        self.remove(&rel)?;
        let host = self.host(&rel);
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .open(&host)
            .map_err(io_err("creating", &rel))?;
        io::Write::write_all(&mut f, content).map_err(io_err("writing", &rel))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &rel))?;
        self.used += content.len() as u64;
        Ok(())
    }

    /// A symlink at guest path `guest` (replacing what is there).
    pub fn put_symlink(&mut self, guest: &str, target: &str) -> Result<(), UnpackError> {
        let rel = self.place(guest)?;
        self.remove(&rel)?;
        symlink(target, self.host(&rel)).map_err(io_err("symlinking", &rel))
    }

    /// A directory at guest path `guest` with `mode`, if there is none yet. An existing
    /// directory, or a symlink to one, is left as the image has it; a dangling symlink gets
    /// its target directory created (inside the root).
    pub fn ensure_dir(&mut self, guest: &str, mode: u32) -> Result<(), UnpackError> {
        if self.lookup(guest)?.is_some_and(|(_, m)| m.is_dir()) {
            return Ok(());
        }
        let path = Path::new(guest);
        let comps = entry_components(path)?;
        let rel = self
            .resolve_dir(path, &comps, Some(&mut HashSet::new()))?
            .expect("created when missing");
        let host = self.host(&rel);
        fs::set_permissions(&host, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &rel))
    }

    /// A device node at guest path `guest`, unless something is there already.
    pub fn ensure_char_device(
        &mut self,
        guest: &str,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> Result<(), UnpackError> {
        let rel = self.place(guest)?;
        let host = self.host(&rel);
        if lstat(&host).map_err(io_err("stat", &rel))?.is_some() {
            return Ok(());
        }
        mknod(&host, libc::S_IFCHR | mode, major, minor)
            .map_err(io_err("creating the device node", &rel))?;
        fs::set_permissions(&host, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &rel))
    }

    /// The tree path for a new entry at `guest`: its parent resolved (and created) inside the
    /// root, the final component as given.
    fn place(&self, guest: &str) -> Result<PathBuf, UnpackError> {
        let path = Path::new(guest);
        let comps = entry_components(path)?;
        let Some((name, parents)) = comps.split_last() else {
            return Err(UnpackError::ReplacesRoot {
                path: path.to_owned(),
            });
        };
        let dir = self
            .resolve_dir(path, parents, Some(&mut HashSet::new()))?
            .expect("created when missing");
        Ok(dir.join(name))
    }
}

/// `p` made absolute-free with `..` applied lexically, clamped at the root.
fn normalize(p: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for s in steps_of(p) {
        match s {
            Step::Root => out.clear(),
            Step::Up => {
                out.pop();
            }
            Step::Name(n) => out.push(n),
        }
    }
    out
}

/// Bytes of the regular files under `dir` that have no other links (what removing it frees).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && m.nlink() == 1 {
                total += m.len();
            }
        }
    }
    total
}

fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: `c` is a NUL-terminated path that outlives the call; mknod reads nothing else.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_xattr(f: &File, name: &CString, value: &[u8]) -> io::Result<()> {
    // SAFETY: the fd is open for the call's duration; name is NUL-terminated and value is a
    // valid buffer of value.len() bytes, both only read.
    let rc = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// One archive entry, written with raw header bytes so that hostile names (`..`,
    /// absolute paths) reach the unpacker as an attacker would write them.
    #[derive(Debug, Clone)]
    pub(crate) enum E {
        Dir(String),
        File(String, Vec<u8>),
        /// A file with owner and mode.
        Owned(String, Vec<u8>, u32, u32, u32),
        Symlink(String, String),
        Hardlink(String, String),
        Char(String, u32, u32),
        Fifo(String),
        /// A file preceded by a PAX header with these records.
        Pax(String, Vec<u8>, Vec<(&'static str, Vec<u8>)>),
    }

    fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let raw = h.as_gnu_mut().expect("gnu header");
        assert!(name.len() < 100, "test names fit the old header");
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    fn set_link(h: &mut tar::Header, target: &str) {
        let raw = h.as_gnu_mut().expect("gnu header");
        assert!(target.len() < 100);
        raw.linkname[..target.len()].copy_from_slice(target.as_bytes());
    }

    /// A tar stream of `entries`.
    pub(crate) fn tar_of(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let (mut h, data): (tar::Header, &[u8]) = match e {
                E::Dir(p) => (header(p, tar::EntryType::Directory, 0, 0o755), &[]),
                E::File(p, d) => (header(p, tar::EntryType::Regular, d.len() as u64, 0o644), d),
                E::Owned(p, d, uid, gid, mode) => {
                    let mut h = header(p, tar::EntryType::Regular, d.len() as u64, *mode);
                    h.set_uid(u64::from(*uid));
                    h.set_gid(u64::from(*gid));
                    (h, d)
                }
                E::Symlink(p, t) => {
                    let mut h = header(p, tar::EntryType::Symlink, 0, 0o777);
                    set_link(&mut h, t);
                    (h, &[])
                }
                E::Hardlink(p, t) => {
                    let mut h = header(p, tar::EntryType::Link, 0, 0o644);
                    set_link(&mut h, t);
                    (h, &[])
                }
                E::Char(p, major, minor) => {
                    let mut h = header(p, tar::EntryType::Char, 0, 0o600);
                    h.set_device_major(*major).unwrap();
                    h.set_device_minor(*minor).unwrap();
                    (h, &[])
                }
                E::Fifo(p) => (header(p, tar::EntryType::Fifo, 0, 0o600), &[]),
                E::Pax(p, d, records) => {
                    b.append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_slice())))
                        .unwrap();
                    (header(p, tar::EntryType::Regular, d.len() as u64, 0o755), d)
                }
            };
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// What a tree holds: path -> "dir", "file:<content>", "link:<target>", "char", "fifo".
    pub(crate) fn snapshot(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let m = fs::symlink_metadata(&p).unwrap();
                let ft = m.file_type();
                let v = if ft.is_dir() {
                    stack.push(p.clone());
                    "dir".to_owned()
                } else if ft.is_symlink() {
                    format!("link:{}", fs::read_link(&p).unwrap().display())
                } else if ft.is_file() {
                    format!("file:{}", String::from_utf8_lossy(&fs::read(&p).unwrap()))
                } else {
                    "special".to_owned()
                };
                out.insert(rel, v);
            }
        }
        out
    }

    fn tree_in(dir: &Path) -> Tree {
        Tree::create(&dir.join("root"), 1 << 30).expect("tests run as root")
    }

    fn apply(t: &mut Tree, entries: &[E]) -> Result<LayerStats, UnpackError> {
        t.apply_layer(tar_of(entries).as_slice())
    }

    fn f(p: &str, c: &str) -> E {
        E::File(p.into(), c.as_bytes().to_vec())
    }

    #[test]
    fn whiteouts_remove_lower_files_and_opaque_dirs_keep_only_their_layer() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree_in(dir.path());
        apply(
            &mut t,
            &[
                E::Dir("d/".into()),
                f("d/gone", "1"),
                f("d/stays", "2"),
                E::Dir("o/".into()),
                f("o/old", "3"),
                E::Dir("o/sub/".into()),
                f("o/sub/deep", "4"),
            ],
        )
        .unwrap();
        // The whiteout comes after a same-layer file of the same name: that file stays.
        let stats = apply(
            &mut t,
            &[
                f("d/.wh.gone", ""),
                f("o/new", "5"),
                E::Dir("o/sub/".into()),
                f("o/.wh..wh..opq", ""),
                f("d/again", "6"),
                f("d/.wh.again", ""),
                f(".wh.never-existed", ""),
                f("missing/dir/.wh.x", ""),
            ],
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 5);
        let s = snapshot(t.root());
        let want: BTreeMap<String, String> = [
            ("d", "dir"),
            ("d/stays", "file:2"),
            ("d/again", "file:6"),
            ("o", "dir"),
            ("o/new", "file:5"),
            ("o/sub", "dir"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        assert_eq!(s, want);
    }

    #[test]
    fn dot_dot_in_names_and_link_targets_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree_in(dir.path());
        let err = apply(&mut t, &[f("a/../../escape", "x")]).unwrap_err();
        assert!(matches!(err, UnpackError::Traversal { .. }), "{err}");
        let err = apply(
            &mut t,
            &[E::Hardlink("h".into(), "../../etc/passwd".into())],
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::Traversal { .. }), "{err}");
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn files_written_through_symlinks_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), "s").unwrap();
        let mut t = tree_in(dir.path());
        apply(
            &mut t,
            &[
                E::Symlink("up".into(), "../outside".into()),
                E::Symlink(
                    "abs".into(),
                    dir.path().join("outside").display().to_string(),
                ),
                E::Symlink("rootlink".into(), "/".into()),
                E::Dir("etc/".into()),
            ],
        )
        .unwrap();
        apply(
            &mut t,
            &[
                f("up/secret", "overwritten"),
                f("abs/secret", "overwritten"),
                f("rootlink/etc/passwd", "image passwd"),
                f("up/.wh.secret", ""),
                E::Hardlink("stolen".into(), "up/secret".into()),
            ],
        )
        .unwrap();
        assert_eq!(fs::read_to_string(outside.join("secret")).unwrap(), "s");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
        let s = snapshot(t.root());
        // `..` from the root stays at the root: up/ is the image's /outside.
        assert_eq!(s["outside/secret"], "file:overwritten");
        assert_eq!(s["stolen"], "file:overwritten");
        assert_eq!(s["etc/passwd"], "file:image passwd");
        // The absolute target restarted at the root: <root>/<tmp path>/outside/secret.
        let abs_rel = format!(
            "{}/secret",
            dir.path()
                .join("outside")
                .display()
                .to_string()
                .trim_start_matches('/')
        );
        assert_eq!(s[&abs_rel], "file:overwritten");
        assert_eq!(s["up"], "link:../outside");
    }

    #[test]
    fn hard_links_share_the_inode_and_owners_modes_survive() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree_in(dir.path());
        apply(
            &mut t,
            &[
                E::Owned("bin/su".into(), b"elf".to_vec(), 0, 0, 0o4755),
                E::Owned("home/u/f".into(), b"mine".to_vec(), 1000, 100, 0o600),
                E::Hardlink("bin/su2".into(), "bin/su".into()),
                E::Hardlink("bin/self".into(), "bin/self".into()),
                E::Char("dev/zero".into(), 1, 5),
                E::Fifo("run/fifo".into()),
            ],
        )
        .unwrap_err();
        // `bin/self -> bin/self` has no target yet: refused, not a loop.
        let mut t = Tree::create(&dir.path().join("root2"), 1 << 30).unwrap();
        apply(
            &mut t,
            &[
                E::Owned("bin/su".into(), b"elf".to_vec(), 0, 0, 0o4755),
                E::Owned("home/u/f".into(), b"mine".to_vec(), 1000, 100, 0o600),
                E::Hardlink("bin/su2".into(), "bin/su".into()),
                E::Char("dev/zero".into(), 1, 5),
                E::Fifo("run/fifo".into()),
            ],
        )
        .unwrap();
        let r = t.root().to_owned();
        let su = fs::metadata(r.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(su.ino(), fs::metadata(r.join("bin/su2")).unwrap().ino());
        let f = fs::metadata(r.join("home/u/f")).unwrap();
        assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1000, 100, 0o600));
        assert_eq!(f.mtime(), 1_700_000_000);
        let z = fs::symlink_metadata(r.join("dev/zero")).unwrap();
        assert_eq!(z.mode() & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(z.rdev(), libc::makedev(1, 5));
        let p = fs::symlink_metadata(r.join("run/fifo")).unwrap();
        assert_eq!(p.mode() & libc::S_IFMT, libc::S_IFIFO);
    }

    #[test]
    fn a_file_in_place_of_a_parent_directory_is_an_error_and_a_bomb_hits_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree_in(dir.path());
        let err = apply(&mut t, &[f("a", "x"), f("a/b", "y")]).unwrap_err();
        assert!(matches!(err, UnpackError::NotADirectory { .. }), "{err}");
        let mut t = Tree::create(&dir.path().join("small"), 10).unwrap();
        let err = apply(&mut t, &[f("one", "123456"), f("two", "123456")]).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooBig { limit: 10, .. }),
            "{err}"
        );
        // Replacing a file frees its bytes.
        let mut t = Tree::create(&dir.path().join("small2"), 10).unwrap();
        apply(&mut t, &[f("one", "123456")]).unwrap();
        apply(&mut t, &[f("one", "1234567")]).unwrap();
        assert_eq!(t.bytes_used(), 7);
    }

    #[test]
    fn symlink_loops_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tree_in(dir.path());
        let err = apply(
            &mut t,
            &[
                E::Symlink("a".into(), "b".into()),
                E::Symlink("b".into(), "a".into()),
                f("a/x", "1"),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::SymlinkLoop { .. }), "{err}");
    }

    // ---- model-based property: whiteout semantics against an in-memory overlay model ----

    #[derive(Debug, Clone)]
    enum Op {
        Dir(Vec<&'static str>),
        File(Vec<&'static str>, u8),
        Whiteout(Vec<&'static str>, &'static str),
        Opaque(Vec<&'static str>),
    }

    fn name() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "c"])
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            prop::collection::vec(name(), 1..=3).prop_map(Op::Dir),
            (prop::collection::vec(name(), 1..=3), 0u8..4).prop_map(|(p, c)| Op::File(p, c)),
            (prop::collection::vec(name(), 0..=2), name()).prop_map(|(d, n)| Op::Whiteout(d, n)),
            prop::collection::vec(name(), 0..=2).prop_map(Op::Opaque),
        ]
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Node {
        Dir,
        File(u8),
    }

    type Model = BTreeMap<Vec<&'static str>, Node>;

    fn remove_subtree(m: &mut Model, p: &[&'static str]) {
        m.retain(|k, _| !k.starts_with(p));
    }

    /// Creates missing directories along `p` (all of it); a file on the way is an error.
    fn ensure_dirs(
        m: &mut Model,
        p: &[&'static str],
        written: &mut HashSet<Vec<&'static str>>,
    ) -> Result<(), ()> {
        for i in 1..=p.len() {
            match m.get(&p[..i]) {
                None => {
                    m.insert(p[..i].to_vec(), Node::Dir);
                    written.insert(p[..i].to_vec());
                }
                Some(Node::Dir) => {}
                Some(Node::File(_)) => return Err(()),
            }
        }
        Ok(())
    }

    fn clear_lower(m: &mut Model, d: &[&'static str], written: &HashSet<Vec<&'static str>>) {
        let children: Vec<Vec<&'static str>> = m
            .keys()
            .filter(|k| k.len() == d.len() + 1 && k.starts_with(d))
            .cloned()
            .collect();
        for c in children {
            if !written.contains(&c) {
                remove_subtree(m, &c);
            } else if m.get(&c) == Some(&Node::Dir) {
                clear_lower(m, &c, written);
            }
        }
    }

    /// The image spec's layer semantics, on paths without symlinks.
    fn model_layer(m: &mut Model, ops: &[Op]) -> Result<(), ()> {
        let mut written = HashSet::new();
        for op in ops {
            match op {
                Op::Dir(p) | Op::File(p, _) => {
                    let (parent, _) = p.split_at(p.len() - 1);
                    ensure_dirs(m, parent, &mut written)?;
                    let is_dir = matches!(op, Op::Dir(_));
                    if !(is_dir && m.get(p) == Some(&Node::Dir)) {
                        remove_subtree(m, p);
                    }
                    m.insert(
                        p.clone(),
                        match op {
                            Op::File(_, c) => Node::File(*c),
                            _ => Node::Dir,
                        },
                    );
                    written.insert(p.clone());
                }
                Op::Whiteout(d, n) => {
                    let mut missing = false;
                    for i in 1..=d.len() {
                        match m.get(&d[..i]) {
                            None => missing = true,
                            Some(Node::File(_)) if !missing => return Err(()),
                            _ => {}
                        }
                    }
                    if missing {
                        continue;
                    }
                    let mut victim = d.clone();
                    victim.push(n);
                    if !written.contains(&victim) {
                        remove_subtree(m, &victim);
                    }
                }
                Op::Opaque(d) => {
                    ensure_dirs(m, d, &mut written)?;
                    written.insert(d.clone());
                    clear_lower(m, d, &written);
                }
            }
        }
        Ok(())
    }

    fn entries_of(ops: &[Op]) -> Vec<E> {
        ops.iter()
            .map(|op| match op {
                Op::Dir(p) => E::Dir(format!("{}/", p.join("/"))),
                Op::File(p, c) => E::File(p.join("/"), vec![b'0' + c]),
                Op::Whiteout(d, n) => E::File(
                    d.iter().map(|c| format!("{c}/")).collect::<String>() + ".wh." + n,
                    vec![],
                ),
                Op::Opaque(d) => E::File(
                    d.iter().map(|c| format!("{c}/")).collect::<String>() + ".wh..wh..opq",
                    vec![],
                ),
            })
            .collect()
    }

    fn model_snapshot(m: &Model) -> BTreeMap<String, String> {
        m.iter()
            .map(|(k, v)| {
                (
                    k.join("/"),
                    match v {
                        Node::Dir => "dir".to_owned(),
                        Node::File(c) => format!("file:{}", char::from(b'0' + c)),
                    },
                )
            })
            .collect()
    }

    // ---- hostile archives: nothing outside the root ever changes ----

    fn hostile_component() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a",
            "b",
            "l",
            "..",
            ".",
            "outside",
            "secret",
            ".wh..wh..opq",
        ])
    }

    fn hostile_path() -> impl Strategy<Value = String> {
        (
            any::<bool>(),
            prop::collection::vec(hostile_component(), 1..=4),
        )
            .prop_map(|(abs, c)| format!("{}{}", if abs { "/" } else { "" }, c.join("/")))
    }

    fn hostile_target() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "/",
                "..",
                "../..",
                "../outside",
                "../../outside",
                "/../outside",
                "a",
                "l",
                "/l",
                "../../../../../tmp",
                "l/l",
                "."
            ])
            .prop_map(str::to_owned),
            hostile_path(),
        ]
    }

    fn hostile_entry() -> impl Strategy<Value = E> {
        prop_oneof![
            hostile_path().prop_map(E::Dir),
            (hostile_path(), any::<u8>()).prop_map(|(p, c)| E::File(p, vec![c])),
            (hostile_path(), hostile_target()).prop_map(|(p, t)| E::Symlink(p, t)),
            (hostile_path(), hostile_target()).prop_map(|(p, t)| E::Hardlink(p, t)),
            hostile_path().prop_map(E::Fifo),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn unpacking_matches_the_overlay_model(
            layers in prop::collection::vec(prop::collection::vec(op(), 0..8), 1..4)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut t = tree_in(dir.path());
            let mut m = Model::new();
            for ops in &layers {
                let real = apply(&mut t, &entries_of(ops));
                let model = model_layer(&mut m, ops);
                match (&real, &model) {
                    (Ok(_), Ok(())) => {}
                    (Err(UnpackError::NotADirectory { .. }), Err(())) => return Ok(()),
                    _ => prop_assert!(false, "unpacker {real:?} but model {model:?} for {ops:?}"),
                }
                prop_assert_eq!(snapshot(t.root()), model_snapshot(&m), "after {:?}", ops);
            }
        }

        #[test]
        fn hostile_layers_never_touch_anything_outside_the_root(
            layers in prop::collection::vec(prop::collection::vec(hostile_entry(), 1..10), 1..4)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let outside = dir.path().join("outside");
            fs::create_dir(&outside).unwrap();
            fs::write(outside.join("secret"), "s").unwrap();
            fs::create_dir(outside.join("a")).unwrap();
            let before = snapshot(dir.path());
            let mut t = tree_in(dir.path());
            for entries in &layers {
                match apply(&mut t, entries) {
                    Ok(_)
                    | Err(UnpackError::Traversal { .. })
                    | Err(UnpackError::NotADirectory { .. })
                    | Err(UnpackError::SymlinkLoop { .. })
                    | Err(UnpackError::HardLink { .. })
                    | Err(UnpackError::ReplacesRoot { .. }) => {}
                    Err(e) => prop_assert!(false, "unexpected error {e} for {entries:?}"),
                }
            }
            let after: BTreeMap<String, String> = snapshot(dir.path())
                .into_iter()
                .filter(|(k, _)| k != "root" && !k.starts_with("root/"))
                .collect();
            prop_assert_eq!(before, after);
        }
    }
}
