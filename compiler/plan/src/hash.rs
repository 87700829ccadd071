//! Content digests of copied files and directories: paths, modes and bytes, never mtimes.
//!
//! File contents are hashed in parallel with rayon. A digest cache (the git index trick)
//! remembers each file's digest together with its size, mtime, ctime, inode and device, so an
//! unchanged file is not read again; any change to those re-reads the file, and the *key* only
//! ever sees the content digest, so touching a file never changes a key.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ir::Digest;

/// Errors of the digest cache file.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Writing the cache file failed.
    #[error("cannot write the digest cache {path}")]
    Write {
        /// The cache file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        Stamp {
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    stamp: Stamp,
    digest: String,
}

/// Remembers content digests of files by their stat stamp. Stored as JSON; a missing or
/// corrupt file is an empty cache (it is only ever an optimisation).
#[derive(Debug, Default)]
pub struct DigestCache {
    path: Option<PathBuf>,
    entries: HashMap<PathBuf, CacheEntry>,
    dirty: bool,
    /// Files hashed (read) during this run, for benchmarks and tests.
    pub files_read: usize,
}

/// A file modified this recently may be modified again within the same timestamp tick, which
/// the stamp could not see: such files are hashed but not remembered (git's "racy" rule).
const RACY_NS: i128 = 2_000_000_000;

impl DigestCache {
    /// A cache that lives only in memory.
    pub fn in_memory() -> Self {
        DigestCache::default()
    }

    /// Loads the cache at `path` (empty if it does not exist or does not parse).
    pub fn load(path: &Path) -> Self {
        let entries = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<HashMap<PathBuf, CacheEntry>>(&b).ok())
            .unwrap_or_default();
        DigestCache {
            path: Some(path.to_path_buf()),
            entries,
            dirty: false,
            files_read: 0,
        }
    }

    /// Writes the cache back if anything changed (atomically: temp file, then rename).
    pub fn save(&mut self) -> Result<(), CacheError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let err = |source| CacheError::Write {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let bytes = serde_json::to_vec(&self.entries).map_err(|e| err(io::Error::other(e)))?;
        fs::write(&tmp, bytes).map_err(err)?;
        fs::rename(&tmp, path).map_err(err)?;
        self.dirty = false;
        Ok(())
    }

    fn get(&self, path: &Path, stamp: &Stamp) -> Option<Digest> {
        let e = self.entries.get(path)?;
        (e.stamp == *stamp)
            .then(|| Digest::parse(&e.digest))
            .flatten()
    }

    fn put(&mut self, path: PathBuf, stamp: Stamp, digest: Digest, now_ns: i128) {
        if now_ns - stamp.mtime_ns < RACY_NS || now_ns - stamp.ctime_ns < RACY_NS {
            return;
        }
        self.entries.insert(
            path,
            CacheEntry {
                stamp,
                digest: digest.to_hex(),
            },
        );
        self.dirty = true;
    }
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// One entry of a copied tree.
enum Kind {
    File(Stamp),
    Dir,
    Symlink(PathBuf),
}

struct TreeEntry {
    /// Path relative to the copy source (`""` for the source itself).
    rel: PathBuf,
    abs: PathBuf,
    mode: u32,
    kind: Kind,
}

fn walk(src: &Path, out: &mut Vec<TreeEntry>) -> io::Result<()> {
    // The source itself is followed if it is a symlink (you copy what it points at); links
    // inside a copied directory are copied as links.
    let meta = fs::metadata(src)?;
    push_entry(src, PathBuf::new(), &meta, out)?;
    if meta.is_dir() {
        walk_dir(src, Path::new(""), out)?;
    }
    Ok(())
}

fn push_entry(
    abs: &Path,
    rel: PathBuf,
    meta: &Metadata,
    out: &mut Vec<TreeEntry>,
) -> io::Result<()> {
    let mode = meta.permissions().mode() & 0o7777;
    let kind = if meta.file_type().is_symlink() {
        Kind::Symlink(fs::read_link(abs)?)
    } else if meta.is_dir() {
        Kind::Dir
    } else if meta.is_file() {
        Kind::File(Stamp::of(meta))
    } else {
        return Err(io::Error::other(format!(
            "`{}` is not a file, directory or symlink",
            abs.display()
        )));
    };
    out.push(TreeEntry {
        rel,
        abs: abs.to_path_buf(),
        mode,
        kind,
    });
    Ok(())
}

fn walk_dir(dir_abs: &Path, dir_rel: &Path, out: &mut Vec<TreeEntry>) -> io::Result<()> {
    let abs_dir = if dir_rel.as_os_str().is_empty() {
        dir_abs.to_path_buf()
    } else {
        dir_abs.join(dir_rel)
    };
    let mut names: Vec<_> = fs::read_dir(&abs_dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let abs = abs_dir.join(&name);
        let rel = dir_rel.join(&name);
        let meta = fs::symlink_metadata(&abs)?;
        push_entry(&abs, rel.clone(), &meta, out)?;
        if meta.is_dir() {
            walk_dir(dir_abs, &rel, out)?;
        }
    }
    Ok(())
}

fn hash_contents(path: &Path) -> io::Result<Digest> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(Digest(h.finalize().into()))
}

/// The content digest of one file, through the cache.
pub fn hash_file(path: &Path, cache: &mut DigestCache) -> io::Result<Digest> {
    let meta = fs::metadata(path)?;
    let stamp = Stamp::of(&meta);
    if let Some(d) = cache.get(path, &stamp) {
        return Ok(d);
    }
    let d = hash_contents(path)?;
    cache.files_read += 1;
    cache.put(path.to_path_buf(), stamp, d, now_ns());
    Ok(d)
}

/// Digests of copy sources (files or directories), keyed by source path. Each digest covers
/// every entry's relative path, type, permission bits and content (or link target).
pub fn hash_sources(
    srcs: &[PathBuf],
    cache: &mut DigestCache,
) -> HashMap<PathBuf, Result<Digest, String>> {
    let mut trees: Vec<(PathBuf, io::Result<Vec<TreeEntry>>)> = srcs
        .par_iter()
        .map(|s| {
            let mut entries = Vec::new();
            let r = walk(s, &mut entries).map(|()| entries);
            (s.clone(), r)
        })
        .collect();
    // Content hashing is the expensive part: every file not in the cache, in parallel.
    let todo: Vec<(PathBuf, Stamp)> = trees
        .iter()
        .filter_map(|(_, t)| t.as_ref().ok())
        .flatten()
        .filter_map(|e| match e.kind {
            Kind::File(stamp) if cache.get(&e.abs, &stamp).is_none() => {
                Some((e.abs.clone(), stamp))
            }
            _ => None,
        })
        .collect();
    let hashed: Vec<(PathBuf, Stamp, io::Result<Digest>)> = todo
        .into_par_iter()
        .map(|(p, st)| {
            let d = hash_contents(&p);
            (p, st, d)
        })
        .collect();
    let now = now_ns();
    let mut fresh: HashMap<PathBuf, Result<Digest, String>> = HashMap::new();
    for (p, st, d) in hashed {
        cache.files_read += 1;
        if let Ok(d) = &d {
            cache.put(p.clone(), st, *d, now);
        }
        fresh.insert(p, d.map_err(|e| e.to_string()));
    }
    let mut out = HashMap::new();
    for (src, tree) in trees.drain(..) {
        let digest = tree.map_err(|e| e.to_string()).and_then(|entries| {
            let mut h = Sha256::new();
            h.update(b"specc-tree-v1\0");
            for e in &entries {
                let rel = e.rel.as_os_str().as_encoded_bytes();
                h.update((rel.len() as u64).to_le_bytes());
                h.update(rel);
                h.update(e.mode.to_le_bytes());
                match &e.kind {
                    Kind::Dir => h.update(b"d"),
                    Kind::Symlink(t) => {
                        let t = t.as_os_str().as_encoded_bytes();
                        h.update(b"l");
                        h.update((t.len() as u64).to_le_bytes());
                        h.update(t);
                    }
                    Kind::File(stamp) => {
                        let d = match cache.get(&e.abs, stamp) {
                            Some(d) => d,
                            None => match fresh.get(&e.abs) {
                                Some(Ok(d)) => *d,
                                Some(Err(err)) => {
                                    return Err(format!("{}: {err}", e.abs.display()));
                                }
                                None => {
                                    return Err(format!(
                                        "{}: changed while hashing",
                                        e.abs.display()
                                    ));
                                }
                            },
                        };
                        h.update(b"f");
                        h.update(d.0);
                    }
                }
            }
            Ok(Digest(h.finalize().into()))
        });
        out.insert(src, digest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(p: &Path) -> Digest {
        let mut c = DigestCache::in_memory();
        hash_sources(&[p.to_path_buf()], &mut c)
            .remove(p)
            .expect("present")
            .expect("hashed")
    }

    #[test]
    fn directory_digest_covers_names_modes_and_bytes_but_not_mtimes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("sub")).expect("mkdir");
        fs::write(root.join("a.txt"), "a").expect("write");
        fs::write(root.join("sub/b.txt"), "b").expect("write");
        let d0 = digest_of(&root);

        let f = File::options()
            .write(true)
            .open(root.join("a.txt"))
            .expect("open");
        f.set_modified(SystemTime::UNIX_EPOCH).expect("touch");
        assert_eq!(digest_of(&root), d0, "mtime must not matter");

        fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let d1 = digest_of(&root);
        assert_ne!(d1, d0, "mode matters");

        fs::rename(root.join("sub/b.txt"), root.join("sub/c.txt")).expect("rename");
        assert_ne!(digest_of(&root), d1, "names matter");
    }

    #[test]
    fn cache_skips_reading_unchanged_files_and_rereads_touched_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        fs::write(&file, "content").expect("write");
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(&file)
            .expect("open")
            .set_modified(old)
            .expect("touch");
        let mut cache = DigestCache::in_memory();
        let srcs = [file.clone()];
        let d = hash_sources(&srcs, &mut cache);
        assert_eq!(cache.files_read, 1);
        // ctime is "now" after set_modified, so the racy rule keeps it out of the cache...
        let _ = hash_sources(&srcs, &mut cache);
        assert_eq!(cache.files_read, 2);
        // ...until it is old enough: simulate by planting the entry as a later run would.
        let meta = fs::metadata(&file).expect("stat");
        cache.put(
            file.clone(),
            Stamp::of(&meta),
            hash_contents(&file).expect("read"),
            now_ns() + 10 * RACY_NS,
        );
        let d2 = hash_sources(&srcs, &mut cache);
        assert_eq!(cache.files_read, 2, "cached, not read");
        assert_eq!(d2[&file], d[&file]);
    }

    #[test]
    fn cache_round_trips_through_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache/digests.json");
        let mut c = DigestCache::load(&path);
        let stamp = Stamp {
            size: 1,
            mtime_ns: 0,
            ctime_ns: 0,
            ino: 1,
            dev: 1,
        };
        c.put(PathBuf::from("/x"), stamp, Digest([7; 32]), RACY_NS * 10);
        c.save().expect("save");
        let c2 = DigestCache::load(&path);
        assert_eq!(c2.get(Path::new("/x"), &stamp), Some(Digest([7; 32])));
    }
}
