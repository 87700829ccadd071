//! The local content-addressed store: blobs by sha256, layers by cache key.
//!
//! ```text
//! <root>/lock                          flock: shared while a Store is open, exclusive for gc
//! <root>/tmp/<what>-<owner>-<random>   temp files of writes in progress, named for their
//!                                      owner (crate::owner); a gone owner's are cleaned on open
//! <root>/blobs/sha256/<64 hex>         blob named by the sha256 of its bytes
//! <root>/blobs/sparse-sha256/<64 hex>  sparse blob named by its sparse digest; holes kept
//! <root>/layers/<64 hex key>/layer.json  the layer record; written last, by rename
//! <root>/layers/<64 hex key>/used      its mtime is the layer's last use (for gc)
//! <root>/pins/<name>                   a pin: layers gc keeps (JSON, written by rename)
//! ```
//!
//! Architecture invariant: a layer is complete iff its `layer.json` exists, and `layer.json` is
//! only renamed into place after every blob it names is durable (fsynced and renamed into
//! `blobs/`, directory fsynced). A write killed at any point leaves temp files in `tmp/` (and at
//! worst an empty layer directory), which the next exclusive open removes once their owner is
//! gone; a live writer's are never removed, even by a process that cannot see its lock.
//!
//! A blob is named by a [`BlobId`]: an algorithm and a digest of its logical bytes (holes read
//! as zeros), so a name never depends on how the file system allocated a file. Plain blobs use
//! `sha256` (what OCI digests are). Sparse snapshot files (memory, disk diffs, the base disk)
//! use `sparse-sha256` ([`sparse::sparse_digest`]), which hashes only their non-zero 4 KiB
//! blocks and so costs time in proportion to the data, not to the logical size. The two live
//! in separate directories, so a plain blob and a sparse one can never be confused even if
//! their 32-byte digests were equal.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use specc_plan::ir::Digest;
use specc_plan::store::LayerStore;

use crate::digest_serde;
use crate::owner;
use crate::sparse::{self, SparseWriter};

/// The version of `layer.json` this code writes. Version 2 added `sparse-sha256` part names;
/// version 1 records (only `sha256` names) are still read.
pub const LAYER_RECORD_VERSION: u32 = 2;

/// The `layer.json` versions this code reads.
pub const LAYER_RECORD_VERSIONS_READ: [u32; 2] = [1, 2];

/// How a blob's name is computed from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// sha256 of the logical bytes (holes as zeros).
    Sha256,
    /// [`sparse::sparse_digest`]: sha256 of a canonical encoding of the non-zero 4 KiB blocks.
    SparseSha256,
}

impl Algorithm {
    /// Both algorithms.
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::SparseSha256];

    /// The name as written before the `:` of a [`BlobId`] and as the blob directory.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::SparseSha256 => "sparse-sha256",
        }
    }

    /// What the builder names a part of `role` with: sparse images by their sparse digest
    /// (cheap to compute), everything else by plain sha256.
    pub fn for_role(role: Role) -> Algorithm {
        if role.is_sparse() {
            Algorithm::SparseSha256
        } else {
            Algorithm::Sha256
        }
    }
}

/// The name of a blob in the store: `sha256:<64 hex>` or `sparse-sha256:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobId {
    /// How `digest` was computed.
    pub algorithm: Algorithm,
    /// The digest.
    pub digest: Digest,
}

impl BlobId {
    /// A plain `sha256` name.
    pub fn sha256(digest: Digest) -> BlobId {
        BlobId {
            algorithm: Algorithm::Sha256,
            digest,
        }
    }

    /// A `sparse-sha256` name.
    pub fn sparse(digest: Digest) -> BlobId {
        BlobId {
            algorithm: Algorithm::SparseSha256,
            digest,
        }
    }

    /// Parses `sha256:<64 lowercase hex>` or `sparse-sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Option<BlobId> {
        let (algo, hex) = s.split_once(':')?;
        let algorithm = Algorithm::ALL.into_iter().find(|a| a.name() == algo)?;
        let lower = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        lower.then_some(())?;
        Some(BlobId {
            algorithm,
            digest: Digest::parse(hex)?,
        })
    }
}

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.digest.to_hex())
    }
}

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<BlobId, D::Error> {
        let s = String::deserialize(d)?;
        BlobId::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "bad blob name {s:?}: want sha256:<64 lowercase hex> or sparse-sha256:<64 lowercase hex>"
            ))
        })
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("store: cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file system holding the store is full; the partial write was removed.
    #[error("store {} is out of disk space (ENOSPC; the partial write was removed: free space or run `specc gc`)", root.display())]
    Full {
        /// The store root.
        root: PathBuf,
    },
    /// A blob's bytes do not hash to its name (or to the digest the caller expected).
    #[error("blob {expected}: digest mismatch, the bytes hash to {actual}")]
    DigestMismatch {
        /// The name the blob should have.
        expected: BlobId,
        /// The name its bytes give.
        actual: BlobId,
    },
    /// A blob is not in the store.
    #[error("blob {0} is not in the store")]
    MissingBlob(BlobId),
    /// A part's recorded size differs from its blob's size.
    #[error("layer part {role} names blob {digest} of {recorded} bytes, but the blob has {actual}")]
    PartSize {
        /// The part's role.
        role: Role,
        /// The blob.
        digest: BlobId,
        /// The size in the record.
        recorded: u64,
        /// The blob's size.
        actual: u64,
    },
    /// A layer names a parent that is not a complete layer in the store.
    #[error("layer {key} names parent {parent}, which is not in the store")]
    MissingParent {
        /// The layer.
        key: Digest,
        /// The missing parent.
        parent: Digest,
    },
    /// A `layer.json` cannot be parsed or has an unknown version.
    #[error("layer record {} is unreadable", path.display())]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A `layer.json` has a version this code does not know.
    #[error("layer record {} has version {version}; this specc reads versions 1 and 2", path.display())]
    RecordVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// A pin file cannot be parsed, or a pin name is not allowed.
    #[error("pin {}: {why}", path.display())]
    BadPin {
        /// The pin file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Garbage collection needs the store to itself.
    #[error("store {} is in use by another process; gc needs it to itself", root.display())]
    Busy {
        /// The store root.
        root: PathBuf,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// What a blob is for inside a layer. The role fixes the blob's OCI media type on export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A whole disk image (the base layer's rootfs), sparse.
    Disk,
    /// The block-level diff of the virtio-blk device over the parent's disk
    /// (`docs/disk-format.md`), sparse.
    DiskDiff,
    /// The guest memory image, sparse (only touched pages hold data).
    Memory,
    /// Guest memory pages that changed over the parent's memory, sparse.
    MemoryDiff,
    /// The VMM's device and vCPU state.
    Vmstate,
    /// The guest kernel.
    Kernel,
    /// An initramfs.
    Initrd,
}

impl Role {
    /// All roles, in a fixed order.
    pub const ALL: [Role; 7] = [
        Role::Disk,
        Role::DiskDiff,
        Role::Memory,
        Role::MemoryDiff,
        Role::Vmstate,
        Role::Kernel,
        Role::Initrd,
    ];

    /// The role's name as written in `layer.json`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Disk => "disk",
            Role::DiskDiff => "disk-diff",
            Role::Memory => "memory",
            Role::MemoryDiff => "memory-diff",
            Role::Vmstate => "vmstate",
            Role::Kernel => "kernel",
            Role::Initrd => "initrd",
        }
    }

    /// Whether blobs of this role are sparse images (packed as sparse tar+gzip on export).
    pub fn is_sparse(self) -> bool {
        matches!(
            self,
            Role::Disk | Role::DiskDiff | Role::Memory | Role::MemoryDiff
        )
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One blob of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// What the blob is.
    pub role: Role,
    /// The blob's name (a digest of its logical bytes).
    pub digest: BlobId,
    /// Its logical length in bytes.
    pub size: u64,
}

/// `layer.json`: one complete layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// [`LAYER_RECORD_VERSION`].
    pub version: u32,
    /// The layer's cache key.
    #[serde(with = "digest_serde")]
    pub key: Digest,
    /// The parent layers' keys, in order (empty for a base layer).
    #[serde(with = "digest_serde::vec")]
    pub parents: Vec<Digest>,
    /// The layer's blobs.
    pub parts: Vec<Part>,
    /// When the layer was committed, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Named durations of the build (e.g. "restore", "steps", "snapshot"), in milliseconds.
    #[serde(default)]
    pub timings_ms: BTreeMap<String, u64>,
    /// Free-form data of the builder (opaque to the store).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub info: serde_json::Value,
}

impl LayerRecord {
    /// A record created now, without timings or builder info.
    pub fn new(key: Digest, parents: Vec<Digest>, parts: Vec<Part>) -> Self {
        LayerRecord {
            version: LAYER_RECORD_VERSION,
            key,
            parents,
            parts,
            created_unix_ms: now_ms(),
            timings_ms: BTreeMap::new(),
            info: serde_json::Value::Null,
        }
    }

    /// The part with `role`, if any.
    pub fn part(&self, role: Role) -> Option<&Part> {
        self.parts.iter().find(|p| p.role == role)
    }
}

/// A blob that is now in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its name.
    pub digest: BlobId,
    /// Its logical length.
    pub size: u64,
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Leftover temp files and incomplete layer directories removed.
    pub removed_tmp: usize,
    /// Layers evicted to get under the budget, in eviction order.
    pub removed_layers: Vec<Digest>,
    /// Blobs removed (unreferenced, or freed by evicted layers).
    pub removed_blobs: usize,
    /// Allocated bytes of all blobs before.
    pub bytes_before: u64,
    /// Allocated bytes of all blobs after.
    pub bytes_after: u64,
    /// Pins found.
    pub pins: usize,
    /// Layers kept because a pin holds them (pinned, or an ancestor of a pinned layer).
    pub pinned_layers: usize,
    /// Allocated bytes of the blobs of those layers.
    pub pinned_bytes: u64,
}

/// A pin (`<root>/pins/<name>`): layers that gc keeps, with their ancestors and blobs, for as
/// long as the pin exists. specd pins the layer each of its VMs was restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// Format version, 1.
    pub version: u32,
    /// Who holds it (for people reading gc's report).
    pub owner: String,
    /// Layer keys, hex.
    pub layers: Vec<String>,
}

/// A layer as listed by [`Store::layers`].
#[derive(Debug, Clone)]
pub struct LayerEntry {
    /// The record.
    pub record: LayerRecord,
    /// Last use (`touch_layer`), or the commit time.
    pub last_used: SystemTime,
}

/// The store. Holds a shared lock on `<root>/lock` while open.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    lock: File,
}

impl Store {
    /// Opens (creating if needed) the store at `root`. If no other process has the store open,
    /// leftovers of interrupted writes are removed first.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for dir in [
            "tmp",
            "blobs/sha256",
            "blobs/sparse-sha256",
            "layers",
            "pins",
        ] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(|e| io_err("create", &p, e))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err("open", &lock_path, e))?;
        let store = Store { root, lock };
        if flock(&store.lock, libc::LOCK_EX | libc::LOCK_NB)
            .map_err(|e| io_err("lock", &lock_path, e))?
        {
            store.clean_leftovers()?;
        }
        // Converting our own lock (or waiting out a running gc).
        flock(&store.lock, libc::LOCK_SH).map_err(|e| io_err("lock", &lock_path, e))?;
        Ok(store)
    }

    /// The store under `$SPECC_HOME/store`.
    pub fn open_default() -> Result<Store> {
        Store::open(specc_plan::store::specc_home().join("store"))
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `digest` lives (whether or not it exists). The VMM may mmap this file; it must
    /// never be written.
    pub fn blob_path(&self, id: &BlobId) -> PathBuf {
        self.blob_dir(id.algorithm).join(id.digest.to_hex())
    }

    /// `<root>/blobs/<algorithm>`.
    fn blob_dir(&self, algorithm: Algorithm) -> PathBuf {
        self.root.join("blobs").join(algorithm.name())
    }

    /// Whether blob `id` is in the store.
    pub fn has_blob(&self, id: &BlobId) -> bool {
        self.blob_path(id).is_file()
    }

    /// A writer for a new `sha256` blob; bytes are hashed as they are written, zero blocks
    /// become holes.
    pub fn blob_writer(&self) -> Result<BlobWriter<'_>> {
        self.blob_writer_as(Algorithm::Sha256)
    }

    /// A writer for a new blob named with `algorithm`.
    pub fn blob_writer_as(&self, algorithm: Algorithm) -> Result<BlobWriter<'_>> {
        let tmp = self.new_tmp("blob-")?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| self.io_err("open", tmp.path(), e))?;
        let (sparse, hasher) = match algorithm {
            Algorithm::Sha256 => (SparseWriter::new(file), Some(sha2::Sha256::new())),
            Algorithm::SparseSha256 => (SparseWriter::with_digest(file), None),
        };
        Ok(BlobWriter {
            store: self,
            tmp,
            sparse,
            hasher,
        })
    }

    /// Copies the file at `path` into the store as a `sha256` blob (holes stay holes).
    pub fn put_file(&self, path: &Path) -> Result<BlobInfo> {
        self.put_file_as(path, Algorithm::Sha256)
    }

    /// Copies the file at `path` into the store (holes stay holes), named with `algorithm`.
    /// With [`Algorithm::SparseSha256`] the holes of `path` are neither read nor hashed.
    pub fn put_file_as(&self, path: &Path, algorithm: Algorithm) -> Result<BlobInfo> {
        let src = File::open(path).map_err(|e| io_err("open", path, e))?;
        let tmp = self.new_tmp("blob-")?;
        let id = match algorithm {
            Algorithm::Sha256 => {
                let mut hasher = sha2::Sha256::new();
                sparse::copy_sparse(&src, tmp.as_file(), |b| hasher.update(b))
                    .map_err(|e| self.io_err("copy into the store", path, e))?;
                BlobId::sha256(Digest(hasher.finalize().into()))
            }
            Algorithm::SparseSha256 => {
                let d = sparse::copy_sparse_digest(&src, tmp.as_file())
                    .map_err(|e| self.io_err("copy into the store", path, e))?;
                BlobId::sparse(d)
            }
        };
        self.seal(tmp, id, None)
    }

    /// Moves the file at `path` into the store as a `sha256` blob; see
    /// [`Store::adopt_file_as`].
    pub fn adopt_file(&self, path: &Path) -> Result<BlobInfo> {
        self.adopt_file_as(path, Algorithm::Sha256)
    }

    /// Moves the file at `path` into the store without copying it when it is on the store's
    /// file system (hash in place, fsync, rename); otherwise copies it and removes the source.
    /// For the builder's freshly written snapshot files: the caller must not touch `path` again.
    /// With [`Algorithm::SparseSha256`] only the file's data is read, not its holes.
    pub fn adopt_file_as(&self, path: &Path, algorithm: Algorithm) -> Result<BlobInfo> {
        let src = File::open(path).map_err(|e| io_err("open", path, e))?;
        let meta = src.metadata().map_err(|e| io_err("stat", path, e))?;
        let tmp_dir = self.root.join("tmp");
        let same_fs = fs::metadata(&tmp_dir)
            .map(|m| {
                std::os::unix::fs::MetadataExt::dev(&m)
                    == std::os::unix::fs::MetadataExt::dev(&meta)
            })
            .unwrap_or(false);
        if !same_fs {
            let info = self.put_file_as(path, algorithm)?;
            fs::remove_file(path).map_err(|e| io_err("remove", path, e))?;
            return Ok(info);
        }
        let (id, len) = file_id(&src, algorithm).map_err(|e| io_err("read", path, e))?;
        src.sync_all().map_err(|e| io_err("sync", path, e))?;
        let dest = self.blob_path(&id);
        if dest.exists() {
            fs::remove_file(path).map_err(|e| io_err("remove", path, e))?;
        } else {
            fs::rename(path, &dest).map_err(|e| self.io_err("rename into place", &dest, e))?;
            let dir = self.blob_dir(algorithm);
            sync_dir(&dir).map_err(|e| self.io_err("sync", &dir, e))?;
        }
        Ok(BlobInfo {
            digest: id,
            size: len,
        })
    }

    /// Puts `bytes` into the store.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<BlobInfo> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes)
            .map_err(|e| self.io_err("write", w.tmp.path(), e))?;
        w.finish(None)
    }

    /// Puts everything `reader` yields into the store.
    pub fn put_reader(&self, reader: impl Read) -> Result<BlobInfo> {
        self.put_reader_expecting(reader, None)
    }

    /// Like [`Store::put_reader`], but refuses (and stores nothing) unless the bytes hash to
    /// `expected` (named with `expected`'s algorithm).
    pub fn put_reader_expecting(
        &self,
        mut reader: impl Read,
        expected: Option<&BlobId>,
    ) -> Result<BlobInfo> {
        let mut w = self.blob_writer_as(expected.map_or(Algorithm::Sha256, |e| e.algorithm))?;
        let tmp = w.tmp.path().to_owned();
        io::copy(&mut reader, &mut w).map_err(|e| self.io_err("write", &tmp, e))?;
        w.finish(expected)
    }

    /// Opens blob `digest` for reading without verifying it (see [`Store::verify_blob`]).
    pub fn open_blob(&self, digest: &BlobId) -> Result<File> {
        let p = self.blob_path(digest);
        File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::MissingBlob(*digest)
            } else {
                self.io_err("open", &p, e)
            }
        })
    }

    /// Reads a (small) blob whole, verifying its digest.
    pub fn read_blob(&self, digest: &BlobId) -> Result<Vec<u8>> {
        let mut f = self.open_blob(digest)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| self.io_err("read", &self.blob_path(digest), e))?;
        let actual = match digest.algorithm {
            Algorithm::Sha256 => BlobId::sha256(Digest(sha2::Sha256::digest(&buf).into())),
            Algorithm::SparseSha256 => BlobId::sparse(sparse::sparse_digest_of(&buf)),
        };
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        Ok(buf)
    }

    /// Re-hashes blob `digest` (holes are not read).
    pub fn verify_blob(&self, digest: &BlobId) -> Result<BlobInfo> {
        let f = self.open_blob(digest)?;
        let p = self.blob_path(digest);
        let (actual, len) =
            file_id(&f, digest.algorithm).map_err(|e| self.io_err("read", &p, e))?;
        if actual != *digest {
            return Err(StoreError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        Ok(BlobInfo {
            digest: actual,
            size: len,
        })
    }

    /// `<root>/layers/<hex key>`.
    pub fn layer_dir(&self, key: &Digest) -> PathBuf {
        self.root.join("layers").join(key.to_hex())
    }

    /// Registers a complete layer. Every part's blob and every parent layer must already be in
    /// the store. Committing a key that already exists replaces its record.
    pub fn commit_layer(&self, record: &LayerRecord) -> Result<()> {
        for part in &record.parts {
            let p = self.blob_path(&part.digest);
            let meta = fs::metadata(&p).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    StoreError::MissingBlob(part.digest)
                } else {
                    self.io_err("stat", &p, e)
                }
            })?;
            if meta.len() != part.size {
                return Err(StoreError::PartSize {
                    role: part.role,
                    digest: part.digest,
                    recorded: part.size,
                    actual: meta.len(),
                });
            }
        }
        for parent in &record.parents {
            if !self.has_layer(parent) {
                return Err(StoreError::MissingParent {
                    key: record.key,
                    parent: *parent,
                });
            }
        }
        let json = serde_json::to_vec_pretty(record).map_err(|source| StoreError::BadRecord {
            path: self.layer_dir(&record.key).join("layer.json"),
            source,
        })?;
        let dir = self.layer_dir(&record.key);
        let final_path = dir.join("layer.json");
        // An open that cannot see this process's lock (from inside the rig, over 9p) takes the
        // still-empty directory for a killed commit's and removes it; make it again, once.
        for last in [false, true] {
            fs::create_dir_all(&dir).map_err(|e| self.io_err("create", &dir, e))?;
            match self.write_atomic(&final_path, &json) {
                Err(StoreError::Io { source, .. })
                    if !last && source.kind() == io::ErrorKind::NotFound => {}
                r => {
                    r?;
                    break;
                }
            }
        }
        sync_dir(&self.root.join("layers")).map_err(|e| self.io_err("sync", &dir, e))?;
        self.touch_layer(&record.key)
    }

    /// The record of layer `key`, if it is complete.
    pub fn layer(&self, key: &Digest) -> Result<Option<LayerRecord>> {
        let p = self.layer_dir(key).join("layer.json");
        match fs::read(&p) {
            Ok(bytes) => parse_record(&p, &bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("read", &p, e)),
        }
    }

    /// Every complete layer, sorted by key.
    pub fn layers(&self) -> Result<Vec<LayerEntry>> {
        let dir = self.root.join("layers");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| self.io_err("list", &dir, e))? {
            let entry = entry.map_err(|e| self.io_err("list", &dir, e))?;
            let Some(key) = entry.file_name().to_str().and_then(Digest::parse) else {
                continue;
            };
            let Some(record) = self.layer(&key)? else {
                continue;
            };
            out.push(LayerEntry {
                last_used: self.last_used(&key),
                record,
            });
        }
        out.sort_by_key(|e| e.record.key);
        Ok(out)
    }

    /// Records that layer `key` was used now (restored from, exported); gc evicts the least
    /// recently used layers first.
    pub fn touch_layer(&self, key: &Digest) -> Result<()> {
        let p = self.layer_dir(key).join("used");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| self.io_err("open", &p, e))?;
        f.set_modified(SystemTime::now())
            .map_err(|e| self.io_err("touch", &p, e))
    }

    /// Pins `layers` under `name` (letters, digits, `-`, `_`, `.`; not starting with `.`):
    /// gc keeps them, their ancestors and their blobs while the pin exists. `owner` says who
    /// pinned them (shown by gc). Replaces an earlier pin of that name; written atomically.
    pub fn pin(&self, name: &str, owner: &str, layers: &[Digest]) -> Result<()> {
        let path = self.pin_path(name)?;
        let pin = Pin {
            version: 1,
            owner: owner.to_owned(),
            layers: layers.iter().map(Digest::to_hex).collect(),
        };
        let json = serde_json::to_vec_pretty(&pin).map_err(|e| StoreError::BadPin {
            path: path.clone(),
            why: e.to_string(),
        })?;
        self.write_atomic(&path, &json)?;
        let dir = self.root.join("pins");
        sync_dir(&dir).map_err(|e| self.io_err("sync", &dir, e))
    }

    /// Removes pin `name` (absent is fine).
    pub fn unpin(&self, name: &str) -> Result<()> {
        let path = self.pin_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("remove", &path, e)),
        }
    }

    /// Every pin, by name. A pin file that does not parse is an error: gc must not guess what
    /// it protected.
    pub fn pins(&self) -> Result<BTreeMap<String, Pin>> {
        let dir = self.root.join("pins");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.io_err("list", &dir, e)),
        };
        let mut out = BTreeMap::new();
        for entry in rd {
            let entry = entry.map_err(|e| self.io_err("list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let bytes = fs::read(&path).map_err(|e| self.io_err("read", &path, e))?;
            let pin: Pin = serde_json::from_slice(&bytes).map_err(|e| StoreError::BadPin {
                path: path.clone(),
                why: e.to_string(),
            })?;
            if pin.version != 1 || pin.layers.iter().any(|l| Digest::parse(l).is_none()) {
                return Err(StoreError::BadPin {
                    path,
                    why: "unknown version or a layer key that is not 64 hex digits".into(),
                });
            }
            out.insert(name, pin);
        }
        Ok(out)
    }

    fn pin_path(&self, name: &str) -> Result<PathBuf> {
        let ok = !name.is_empty()
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        let path = self.root.join("pins").join(name);
        if !ok {
            return Err(StoreError::BadPin {
                path,
                why: "a pin name is letters, digits, '-', '_' and '.'".into(),
            });
        }
        Ok(path)
    }

    /// Allocated bytes of all blobs (what the store costs on disk).
    pub fn usage(&self) -> Result<u64> {
        Ok(self.blob_sizes()?.values().sum())
    }

    /// Removes leftovers of interrupted writes, then every blob no layer references, then whole
    /// layers, least recently used first, until the blobs take at most `budget` bytes on disk.
    ///
    /// Only layers that are no kept layer's parent are candidates: a child's disk diff is
    /// meaningless without its ancestors, so a chain is evicted from its leaves up. Using a child
    /// (`touch_layer`) therefore also protects its ancestors while the child is kept. Needs the
    /// store to itself ([`StoreError::Busy`] otherwise), so it cannot remove the blobs of a
    /// build that is running in another process. Pinned layers ([`Store::pin`]) and their
    /// ancestors are never evicted, even if the budget is then not met.
    pub fn gc(&self, budget: u64) -> Result<GcReport> {
        let lock_path = self.root.join("lock");
        if !flock(&self.lock, libc::LOCK_EX | libc::LOCK_NB)
            .map_err(|e| self.io_err("lock", &lock_path, e))?
        {
            return Err(StoreError::Busy {
                root: self.root.clone(),
            });
        }
        let result = self.gc_locked(budget);
        let relock =
            flock(&self.lock, libc::LOCK_SH).map_err(|e| self.io_err("lock", &lock_path, e));
        let report = result?;
        relock?;
        Ok(report)
    }

    fn gc_locked(&self, budget: u64) -> Result<GcReport> {
        let mut report = GcReport {
            removed_tmp: self.clean_leftovers()?,
            ..GcReport::default()
        };
        let mut sizes = self.blob_sizes()?;
        report.bytes_before = sizes.values().sum();
        let mut kept: BTreeMap<Digest, LayerEntry> = self
            .layers()?
            .into_iter()
            .map(|e| (e.record.key, e))
            .collect();
        let referenced = |kept: &BTreeMap<Digest, LayerEntry>| -> BTreeSet<BlobId> {
            kept.values()
                .flat_map(|e| e.record.parts.iter().map(|p| p.digest))
                .collect()
        };
        let pins = self.pins()?;
        report.pins = pins.len();
        // The pinned layers and their ancestors, as far as they are in the store.
        let mut pinned: BTreeSet<Digest> = BTreeSet::new();
        let mut todo: Vec<Digest> = pins
            .values()
            .flat_map(|p| p.layers.iter().filter_map(|l| Digest::parse(l)))
            .collect();
        while let Some(k) = todo.pop() {
            if let Some(e) = kept.get(&k)
                && pinned.insert(k)
            {
                todo.extend(e.record.parents.iter().copied());
            }
        }
        let refs = referenced(&kept);
        let unreferenced: Vec<BlobId> = sizes
            .keys()
            .filter(|d| !refs.contains(d))
            .copied()
            .collect();
        for d in unreferenced {
            self.remove_blob(&d)?;
            sizes.remove(&d);
            report.removed_blobs += 1;
        }
        let mut usage: u64 = sizes.values().sum();
        while usage > budget {
            let parents: BTreeSet<Digest> = kept
                .values()
                .flat_map(|e| e.record.parents.iter().copied())
                .collect();
            let Some(victim) = kept
                .values()
                .filter(|e| !parents.contains(&e.record.key) && !pinned.contains(&e.record.key))
                .min_by_key(|e| (e.last_used, e.record.key))
                .map(|e| e.record.key)
            else {
                break;
            };
            // Unregister first (the record goes, so the layer is no longer complete), then free.
            let dir = self.layer_dir(&victim);
            let rec = dir.join("layer.json");
            fs::remove_file(&rec).map_err(|e| self.io_err("remove", &rec, e))?;
            sync_dir(&dir).map_err(|e| self.io_err("sync", &dir, e))?;
            fs::remove_dir_all(&dir).map_err(|e| self.io_err("remove", &dir, e))?;
            kept.remove(&victim);
            report.removed_layers.push(victim);
            let refs = referenced(&kept);
            let freed: Vec<BlobId> = sizes
                .keys()
                .filter(|d| !refs.contains(d))
                .copied()
                .collect();
            for d in freed {
                self.remove_blob(&d)?;
                usage -= sizes.remove(&d).unwrap_or(0);
                report.removed_blobs += 1;
            }
        }
        report.bytes_after = usage;
        let pinned_blobs: BTreeSet<BlobId> = pinned
            .iter()
            .filter_map(|k| kept.get(k))
            .flat_map(|e| e.record.parts.iter().map(|p| p.digest))
            .collect();
        report.pinned_layers = pinned.len();
        report.pinned_bytes = pinned_blobs.iter().filter_map(|d| sizes.get(d)).sum();
        Ok(report)
    }

    fn remove_blob(&self, d: &BlobId) -> Result<()> {
        let p = self.blob_path(d);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("remove", &p, e)),
        }
    }

    /// Allocated bytes of every blob, by name. Files in `blobs/<algorithm>` that are not named
    /// by a digest are not blobs and are left alone.
    fn blob_sizes(&self) -> Result<BTreeMap<BlobId, u64>> {
        let mut out = BTreeMap::new();
        for algorithm in Algorithm::ALL {
            let dir = self.blob_dir(algorithm);
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                // A store made before sparse names existed has no such directory.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io_err("list", &dir, e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| self.io_err("list", &dir, e))?;
                let Some(d) = entry.file_name().to_str().and_then(Digest::parse) else {
                    continue;
                };
                let meta = entry
                    .metadata()
                    .map_err(|e| self.io_err("stat", &entry.path(), e))?;
                out.insert(
                    BlobId {
                        algorithm,
                        digest: d,
                    },
                    sparse::allocated(&meta),
                );
            }
        }
        Ok(out)
    }

    /// Removes the temporary files in `tmp/` whose owner is gone ([`crate::owner`]) and layer
    /// directories without `layer.json`. Only called with the exclusive lock held; the owner
    /// check is for writers whose lock this process cannot see (a build inside the rig, over
    /// 9p). Returns how many were removed.
    fn clean_leftovers(&self) -> Result<usize> {
        let mut n = 0;
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| self.io_err("list", &tmp, e))? {
            let entry = entry.map_err(|e| self.io_err("list", &tmp, e))?;
            let p = entry.path();
            let name = entry.file_name();
            let mtime = entry.metadata().and_then(|m| m.modified()).ok();
            if !owner::is_leftover(
                tmp_owner(&name.to_string_lossy()),
                mtime,
                owner::FOREIGN_GRACE,
            ) {
                continue;
            }
            let r = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|e| self.io_err("remove", &p, e))?;
            n += 1;
        }
        let layers = self.root.join("layers");
        for entry in fs::read_dir(&layers).map_err(|e| self.io_err("list", &layers, e))? {
            let entry = entry.map_err(|e| self.io_err("list", &layers, e))?;
            let p = entry.path();
            if p.is_dir() && !p.join("layer.json").exists() {
                fs::remove_dir_all(&p).map_err(|e| self.io_err("remove", &p, e))?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn last_used(&self, key: &Digest) -> SystemTime {
        let dir = self.layer_dir(key);
        fs::metadata(dir.join("used"))
            .or_else(|_| fs::metadata(dir.join("layer.json")))
            .and_then(|m| m.modified())
            .unwrap_or(UNIX_EPOCH)
    }

    /// Writes `bytes` to `dest` by temp file + fsync + rename + directory fsync.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let mut tmp = self.new_tmp("record-")?;
        tmp.write_all(bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| self.io_err("write", tmp.path(), e))?;
        tmp.persist(dest)
            .map_err(|e| self.io_err("rename into place", dest, e.error))?;
        let parent = dest.parent().unwrap_or(&self.root);
        sync_dir(parent).map_err(|e| self.io_err("sync", parent, e))
    }

    fn new_tmp(&self, prefix: &str) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(&format!("{prefix}{}-", owner::current()))
            .tempfile_in(&dir)
            .map_err(|e| self.io_err("create a temp file in", &dir, e))
    }

    /// A temporary directory in the store's `tmp/` (on the store's file system, so its files
    /// can be adopted by rename), named for this process so that only its owner's end lets a
    /// later open remove it. Removed when dropped.
    pub fn temp_dir(&self, what: &str) -> Result<tempfile::TempDir> {
        let dir = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(&format!("{what}-{}-", owner::current()))
            .tempdir_in(&dir)
            .map_err(|e| self.io_err("create a temp directory in", &dir, e))
    }

    /// Checks the digest, fsyncs the temp file and renames it to its digest's name (unless a
    /// blob of that digest is already there), then fsyncs the directory.
    fn seal(
        &self,
        tmp: tempfile::NamedTempFile,
        digest: BlobId,
        expected: Option<&BlobId>,
    ) -> Result<BlobInfo> {
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StoreError::DigestMismatch {
                expected: *expected,
                actual: digest,
            });
        }
        let file = tmp.as_file();
        let size = file
            .metadata()
            .map_err(|e| self.io_err("stat", tmp.path(), e))?
            .len();
        file.sync_all()
            .map_err(|e| self.io_err("sync", tmp.path(), e))?;
        let dest = self.blob_path(&digest);
        if !dest.exists() {
            tmp.persist(&dest)
                .map_err(|e| self.io_err("rename into place", &dest, e.error))?;
            let dir = self.blob_dir(digest.algorithm);
            sync_dir(&dir).map_err(|e| self.io_err("sync", &dir, e))?;
        }
        Ok(BlobInfo { digest, size })
    }

    fn io_err(&self, op: &'static str, path: &Path, e: io::Error) -> StoreError {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull {
            StoreError::Full {
                root: self.root.clone(),
            }
        } else {
            io_err(op, path, e)
        }
    }
}

impl LayerStore for Store {
    fn has_layer(&self, key: &Digest) -> bool {
        self.layer_dir(key).join("layer.json").is_file()
    }
}

/// A blob being written; see [`Store::blob_writer`]. Dropping it without `finish` removes the
/// temp file.
#[derive(Debug)]
pub struct BlobWriter<'s> {
    store: &'s Store,
    tmp: tempfile::NamedTempFile,
    sparse: SparseWriter<File>,
    /// The plain sha256 of the stream; `None` when the sparse writer computes a sparse digest.
    hasher: Option<sha2::Sha256>,
}

impl BlobWriter<'_> {
    /// Appends `len` zero bytes as a hole.
    pub fn write_zeros(&mut self, len: u64) -> Result<()> {
        if let Some(h) = &mut self.hasher {
            sparse::observe_zeros(len, &mut |b: &[u8]| h.update(b));
        }
        self.sparse
            .skip_zeros(len)
            .map_err(|e| self.store.io_err("write", self.tmp.path(), e))
    }

    /// Makes the blob durable and names it by its digest. With `expected`, a blob whose bytes
    /// hash to anything else is discarded with [`StoreError::DigestMismatch`].
    pub fn finish(self, expected: Option<&BlobId>) -> Result<BlobInfo> {
        let BlobWriter {
            store,
            tmp,
            sparse,
            hasher,
        } = self;
        let (_, sparse_digest) = sparse
            .finish_digest()
            .map_err(|e| store.io_err("write", tmp.path(), e))?;
        let id = match (hasher, sparse_digest) {
            (Some(h), _) => BlobId::sha256(Digest(h.finalize().into())),
            (None, Some(d)) => BlobId::sparse(d),
            (None, None) => unreachable!("blob_writer_as makes a hasher of one kind"),
        };
        store.seal(tmp, id, expected)
    }
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sparse.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<LayerRecord> {
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(bytes).map_err(|source| StoreError::BadRecord {
        path: path.to_owned(),
        source,
    })?;
    if !LAYER_RECORD_VERSIONS_READ.contains(&v.version) {
        return Err(StoreError::RecordVersion {
            path: path.to_owned(),
            version: v.version,
        });
    }
    serde_json::from_slice(bytes).map_err(|source| StoreError::BadRecord {
        path: path.to_owned(),
        source,
    })
}

/// The name of `file`'s logical bytes under `algorithm`, and its length; holes are not read.
fn file_id(file: &File, algorithm: Algorithm) -> io::Result<(BlobId, u64)> {
    match algorithm {
        Algorithm::SparseSha256 => {
            let (d, len) = sparse::sparse_digest(file)?;
            Ok((BlobId::sparse(d), len))
        }
        Algorithm::Sha256 => {
            let mut hasher = sha2::Sha256::new();
            let len = file.metadata()?.len();
            let mut pos = 0;
            let mut buf = vec![0u8; 1 << 20];
            for (start, elen) in sparse::data_extents(file)? {
                sparse::observe_zeros(start - pos, &mut |b: &[u8]| hasher.update(b));
                let mut off = start;
                while off < start + elen {
                    let n = sparse::clamp(start + elen - off, buf.len());
                    std::os::unix::fs::FileExt::read_exact_at(file, &mut buf[..n], off)?;
                    hasher.update(&buf[..n]);
                    off += n as u64;
                }
                pos = start + elen;
            }
            sparse::observe_zeros(len - pos, &mut |b: &[u8]| hasher.update(b));
            Ok((BlobId::sha256(Digest(hasher.finalize().into())), len))
        }
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The owner in a temporary name `<what>-<owner>-<random>`, if it has one.
fn tmp_owner(name: &str) -> Option<&str> {
    let mut parts = name.splitn(3, '-');
    let (_what, owner) = (parts.next()?, parts.next()?);
    parts.next()?;
    owner::parse(owner).map(|_| owner)
}

/// `flock(2)`; `Ok(false)` if a non-blocking request would block.
fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::sparse::tests::make_sparse;

    fn sha(bytes: &[u8]) -> BlobId {
        BlobId::sha256(Digest(sha2::Sha256::digest(bytes).into()))
    }

    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
    }

    /// A layer with a memory part and a vmstate part made of `seed`-dependent bytes.
    fn layer(store: &Store, key: u8, parents: &[u8], seed: u8, len: usize) -> LayerRecord {
        let mem = store.put_bytes(&vec![seed; len]).expect("put memory");
        let vm = store.put_bytes(&[seed, key, 1, 2, 3]).expect("put vmstate");
        let rec = LayerRecord::new(
            Digest([key; 32]),
            parents.iter().map(|p| Digest([*p; 32])).collect(),
            vec![
                Part {
                    role: Role::Memory,
                    digest: mem.digest,
                    size: mem.size,
                },
                Part {
                    role: Role::Vmstate,
                    digest: vm.digest,
                    size: vm.size,
                },
            ],
        );
        store.commit_layer(&rec).expect("commit");
        rec
    }

    #[test]
    fn blobs_are_named_by_the_sha256_of_their_bytes_and_verified_on_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let info = store.put_bytes(b"hello store").expect("put");
        assert_eq!(info.digest, sha(b"hello store"));
        assert_eq!(info.size, 11);
        assert_eq!(store.read_blob(&info.digest).expect("read"), b"hello store");
        let again = store.put_reader(&b"hello store"[..]).expect("put again");
        assert_eq!(again, info);
        assert_eq!(count(&dir.path().join("blobs/sha256")), 1);
        assert_eq!(count(&dir.path().join("tmp")), 0);

        // Corrupt it in place: reading and verifying both refuse.
        fs::write(store.blob_path(&info.digest), b"hello st0re").expect("corrupt");
        assert!(matches!(
            store.read_blob(&info.digest),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(matches!(
            store.verify_blob(&info.digest),
            Err(StoreError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn put_file_keeps_holes_and_hashes_the_logical_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("store")).expect("open");
        let src = dir.path().join("mem");
        make_sparse(&src, 128 << 20, 4, 256 << 10);
        let info = store.put_file(&src).expect("put");
        assert_eq!(info.size, 128 << 20);
        let bytes = fs::read(&src).expect("read");
        assert_eq!(info.digest, sha(&bytes));
        let meta = fs::metadata(store.blob_path(&info.digest)).expect("meta");
        assert_eq!(meta.len(), 128 << 20);
        assert!(
            meta.blocks() * 512 <= 2 << 20,
            "the blob is sparse: {} bytes allocated",
            meta.blocks() * 512
        );
        assert_eq!(store.verify_blob(&info.digest).expect("verify"), info);
    }

    #[test]
    fn sparse_names_do_not_depend_on_holes_and_live_apart_from_plain_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("store")).expect("open");
        let holes = dir.path().join("holes");
        make_sparse(&holes, 64 << 20, 3, 100 << 10);
        let bytes = fs::read(&holes).expect("read");
        let dense = dir.path().join("dense");
        fs::write(&dense, &bytes).expect("write dense");

        let a = store
            .put_file_as(&holes, Algorithm::SparseSha256)
            .expect("put");
        assert_eq!(a.digest.algorithm, Algorithm::SparseSha256);
        assert_eq!(a.digest.digest, sparse::sparse_digest_of(&bytes));
        assert_eq!(a.size, 64 << 20);
        let b = store
            .adopt_file_as(&dense, Algorithm::SparseSha256)
            .expect("adopt");
        assert_eq!(a, b, "written zeros and holes name the same blob");
        assert!(!dense.exists());
        let mut w = store
            .blob_writer_as(Algorithm::SparseSha256)
            .expect("writer");
        w.write_all(&bytes).expect("write");
        assert_eq!(w.finish(Some(&a.digest)).expect("finish"), a);

        let plain = store.put_file(&holes).expect("put plain");
        assert_eq!(plain.digest, sha(&bytes));
        assert_eq!(plain.digest.digest.0.len(), 32);
        assert!(
            store
                .blob_path(&a.digest)
                .starts_with(dir.path().join("store/blobs/sparse-sha256"))
        );
        assert!(
            store
                .blob_path(&plain.digest)
                .starts_with(dir.path().join("store/blobs/sha256"))
        );
        for id in [a.digest, plain.digest] {
            assert_eq!(store.verify_blob(&id).expect("verify").size, 64 << 20);
            assert_eq!(store.read_blob(&id).expect("read"), bytes);
        }
        let meta = fs::metadata(store.blob_path(&a.digest)).expect("meta");
        assert!(meta.blocks() * 512 <= 2 << 20, "the copy is sparse");

        // One changed byte is another blob; a corrupt blob fails verification.
        let f = File::options()
            .write(true)
            .open(store.blob_path(&a.digest))
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, &[1], 40 << 20).expect("corrupt");
        assert!(matches!(
            store.verify_blob(&a.digest),
            Err(StoreError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn blob_names_parse_and_print_with_their_algorithm() {
        let d = Digest([0xab; 32]);
        for id in [BlobId::sha256(d), BlobId::sparse(d)] {
            assert_eq!(BlobId::parse(&id.to_string()), Some(id));
            let json = serde_json::to_string(&id).expect("json");
            assert_eq!(serde_json::from_str::<BlobId>(&json).expect("parse"), id);
        }
        assert_eq!(
            BlobId::sparse(d).to_string(),
            format!("sparse-sha256:{}", "ab".repeat(32))
        );
        assert_ne!(BlobId::sha256(d), BlobId::sparse(d));
        for bad in [
            "ab",
            "md5:00",
            "sha256:AB",
            "sparse-sha256:",
            &format!("sha512:{}", "ab".repeat(32)),
        ] {
            assert_eq!(BlobId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn version_1_records_are_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let vm = store.put_bytes(b"state").expect("put");
        let key = Digest([0x31; 32]);
        let old = format!(
            r#"{{"version":1,"key":"{}","parents":[],"parts":[{{"role":"vmstate","digest":"{}","size":5}}],"created_unix_ms":1}}"#,
            key.to_prefixed(),
            vm.digest
        );
        fs::create_dir_all(store.layer_dir(&key)).expect("mkdir");
        fs::write(store.layer_dir(&key).join("layer.json"), old).expect("write");
        let rec = store.layer(&key).expect("read").expect("layer");
        assert_eq!(rec.parts[0].digest, vm.digest);
        let new = store.layer_dir(&key).join("layer.json");
        fs::write(
            &new,
            fs::read_to_string(&new)
                .expect("read")
                .replace("\"version\":1", "\"version\":3"),
        )
        .expect("write");
        assert!(matches!(
            store.layer(&key),
            Err(StoreError::RecordVersion { version: 3, .. })
        ));
    }

    #[test]
    fn adopt_file_moves_a_file_on_the_same_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("store")).expect("open");
        let src = dir.path().join("snap");
        make_sparse(&src, 32 << 20, 2, 64 << 10);
        let bytes = fs::read(&src).expect("read");
        let ino = fs::metadata(&src).expect("meta").ino();
        let info = store.adopt_file(&src).expect("adopt");
        assert_eq!(info.digest, sha(&bytes));
        assert!(!src.exists());
        let meta = fs::metadata(store.blob_path(&info.digest)).expect("blob");
        assert_eq!(meta.ino(), ino, "moved, not copied");
        assert_eq!(store.verify_blob(&info.digest).expect("verify"), info);
    }

    #[test]
    fn put_reader_expecting_a_different_digest_stores_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let err = store
            .put_reader_expecting(&b"abc"[..], Some(&BlobId::sha256(Digest([1; 32]))))
            .expect_err("mismatch");
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert_eq!(count(&dir.path().join("blobs/sha256")), 0);
        assert_eq!(count(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn commit_needs_the_blobs_and_parents_and_is_seen_by_specc_plan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let missing = LayerRecord::new(
            Digest([9; 32]),
            vec![],
            vec![Part {
                role: Role::Memory,
                digest: BlobId::sha256(Digest([3; 32])),
                size: 1,
            }],
        );
        assert!(matches!(
            store.commit_layer(&missing),
            Err(StoreError::MissingBlob(_))
        ));
        let orphan = LayerRecord::new(Digest([8; 32]), vec![Digest([7; 32])], vec![]);
        assert!(matches!(
            store.commit_layer(&orphan),
            Err(StoreError::MissingParent { .. })
        ));

        let base = layer(&store, 1, &[], 10, 1000);
        let child = layer(&store, 2, &[1], 11, 1000);
        assert!(store.has_layer(&base.key));
        assert_eq!(store.layer(&child.key).expect("read"), Some(child.clone()));
        let plan_view = specc_plan::store::DirStore::at(dir.path());
        assert!(plan_view.has_layer(&child.key));
        assert!(!plan_view.has_layer(&Digest([5; 32])));
        let keys: Vec<Digest> = store
            .layers()
            .expect("list")
            .into_iter()
            .map(|e| e.record.key)
            .collect();
        assert_eq!(keys, vec![base.key, child.key]);
    }

    #[test]
    fn gc_drops_unreferenced_blobs_then_lru_leaves_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let stray = store.put_bytes(&[42u8; 10_000]).expect("stray");
        // base <- a <- a2 ; base <- b
        let base = layer(&store, 1, &[], 1, 64 << 10);
        let a = layer(&store, 2, &[1], 2, 64 << 10);
        let a2 = layer(&store, 3, &[2], 3, 64 << 10);
        let b = layer(&store, 4, &[1], 4, 64 << 10);
        let set_used = |key: &Digest, secs: u64| {
            File::options()
                .write(true)
                .open(store.layer_dir(key).join("used"))
                .expect("open used")
                .set_modified(UNIX_EPOCH + Duration::from_secs(secs))
                .expect("set mtime");
        };
        // The base is the oldest, but it is a parent, so it goes last.
        set_used(&base.key, 100);
        set_used(&a.key, 300);
        set_used(&a2.key, 200);
        set_used(&b.key, 400);

        let report = store.gc(u64::MAX).expect("gc");
        assert_eq!(report.removed_blobs, 1);
        assert!(report.removed_layers.is_empty());
        assert!(!store.has_blob(&stray.digest));
        let full = report.bytes_after;

        // Room for about two layers: a2 (the oldest leaf) goes, then a (now a leaf, older than b).
        let report = store.gc(full / 2).expect("gc");
        assert_eq!(report.removed_layers, vec![a2.key, a.key]);
        assert!(report.bytes_after <= full / 2);
        assert!(store.has_layer(&base.key) && store.has_layer(&b.key));
        for p in &a2.parts {
            assert!(!store.has_blob(&p.digest));
        }
        for p in &b.parts {
            assert!(store.has_blob(&p.digest));
        }
        let report = store.gc(0).expect("gc to zero");
        assert_eq!(report.removed_layers, vec![b.key, base.key]);
        assert_eq!(report.bytes_after, 0);
    }

    #[test]
    fn gc_keeps_pinned_layers_and_their_ancestors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        // base <- a ; base <- b ; a is pinned (and so is base, its parent).
        let base = layer(&store, 1, &[], 1, 64 << 10);
        let a = layer(&store, 2, &[1], 2, 64 << 10);
        let b = layer(&store, 3, &[1], 3, 64 << 10);
        store.pin("vm-1", "test", &[a.key]).expect("pin");
        // A pin of a layer the store does not have protects nothing and breaks nothing.
        store.pin("vm-2", "test", &[Digest([99; 32])]).expect("pin");
        assert_eq!(store.pins().expect("pins").len(), 2);
        assert!(store.pin("../escape", "test", &[a.key]).is_err());

        let report = store.gc(0).expect("gc");
        assert_eq!(report.removed_layers, vec![b.key]);
        assert!(store.has_layer(&a.key) && store.has_layer(&base.key));
        for p in a.parts.iter().chain(&base.parts) {
            assert!(store.has_blob(&p.digest));
        }
        assert_eq!(report.pins, 2);
        assert_eq!(report.pinned_layers, 2);
        assert_eq!(report.pinned_bytes, report.bytes_after);
        assert!(report.bytes_after > 0);

        // Unpinned, the chain goes from its leaf up.
        store.unpin("vm-1").expect("unpin");
        store.unpin("vm-1").expect("unpin twice");
        let report = store.gc(0).expect("gc");
        assert_eq!(report.removed_layers, vec![a.key, base.key]);
        assert_eq!((report.pinned_layers, report.bytes_after), (0, 0));

        // A damaged pin stops gc rather than let it guess.
        fs::write(dir.path().join("pins/bad"), b"{not json").expect("write");
        assert!(matches!(store.gc(0), Err(StoreError::BadPin { .. })));
    }

    #[test]
    fn gc_refuses_while_another_store_handle_is_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = Store::open(dir.path()).expect("open");
        let two = Store::open(dir.path()).expect("open again");
        assert!(matches!(one.gc(0), Err(StoreError::Busy { .. })));
        drop(two);
        one.gc(0).expect("alone now");
    }

    /// The child half of the crash test: write layers forever until killed.
    fn crash_child(root: &Path) -> ! {
        let store = Store::open(root).expect("child open");
        let mut n: u32 = 0;
        loop {
            n += 1;
            let mut w = store.blob_writer().expect("writer");
            let chunk = vec![u8::try_from(n % 251).expect("small") | 1; 1 << 20];
            for _ in 0..16 {
                w.write_all(&chunk).expect("write");
                w.write_zeros(1 << 20).expect("hole");
            }
            let mem = w.finish(None).expect("finish");
            let vm = store.put_bytes(&n.to_le_bytes()).expect("vmstate");
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_le_bytes());
            let rec = LayerRecord::new(
                Digest(key),
                vec![],
                vec![
                    Part {
                        role: Role::Memory,
                        digest: mem.digest,
                        size: mem.size,
                    },
                    Part {
                        role: Role::Vmstate,
                        digest: vm.digest,
                        size: vm.size,
                    },
                ],
            );
            store.commit_layer(&rec).expect("commit");
        }
    }

    #[test]
    fn an_open_removes_only_the_temp_files_of_gone_owners() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("create"));
        let tmp = dir.path().join("tmp");
        let me = owner::current();
        let (boot, _) = owner::parse(&me).expect("own owner");
        let mut child = Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("reap");
        let names = [
            format!("blob-{boot}.{dead}-a1"),
            format!("blob-{me}-b2"),
            "blob-000000000000.1-c3".to_owned(),
            "blob-legacy".to_owned(),
        ];
        for n in &names {
            fs::write(tmp.join(n), b"x").expect("write");
        }
        fs::create_dir(tmp.join(format!("pull-{boot}.{dead}-d4"))).expect("mkdir");
        // Nobody holds the lock, so this open cleans: only the two of the gone owner go.
        let store = Store::open(dir.path()).expect("reopen");
        let left: BTreeSet<String> = fs::read_dir(&tmp)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            names[1..].iter().cloned().collect::<BTreeSet<_>>(),
            "a live owner's, a foreign boot's and an unnamed fresh file stay"
        );
        let own = store.temp_dir("pull").expect("temp dir");
        let name = own
            .path()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert_eq!(tmp_owner(&name), Some(me.as_str()), "{name}");
    }

    const CRASH_ENV: &str = "SPECC_STORE_CRASH_CHILD_ROOT";

    #[test]
    fn kill_9_mid_write_leaves_the_store_consistent() {
        if let Some(root) = std::env::var_os(CRASH_ENV) {
            crash_child(Path::new(&root));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for round in 0..3 {
            let mut child = Command::new(std::env::current_exe().expect("test binary"))
                .args([
                    "--exact",
                    "store::tests::kill_9_mid_write_leaves_the_store_consistent",
                    "--nocapture",
                ])
                .env(CRASH_ENV, dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn the writer");
            // Kill it while a temp file exists after at least `round + 1` layers are committed,
            // i.e. certainly in the middle of some write.
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let layers = count(&dir.path().join("layers"));
                let tmp = count(&dir.path().join("tmp"));
                if layers > round && tmp > 0 {
                    break;
                }
                if let Some(st) = child.try_wait().expect("wait") {
                    panic!("the writer exited early: {st}");
                }
                assert!(Instant::now() < deadline, "the writer made no progress");
                std::thread::sleep(Duration::from_millis(5));
            }
            child.kill().expect("kill -9");
            child.wait().expect("reap");
            assert!(count(&dir.path().join("tmp")) > 0 || round > 0);

            let store = Store::open(dir.path()).expect("reopen");
            assert_eq!(count(&dir.path().join("tmp")), 0, "tmp cleaned on open");
            let layers = store.layers().expect("list");
            assert_eq!(
                layers.len(),
                count(&dir.path().join("layers")),
                "every layer directory is a complete layer"
            );
            for e in &layers {
                for p in &e.record.parts {
                    let info = store
                        .verify_blob(&p.digest)
                        .expect("blob of a complete layer");
                    assert_eq!(info.size, p.size);
                }
            }
            for entry in fs::read_dir(dir.path().join("blobs/sha256")).expect("list") {
                let name = entry.expect("entry").file_name();
                let d = Digest::parse(name.to_str().expect("utf8")).expect("digest name");
                store
                    .verify_blob(&BlobId::sha256(d))
                    .expect("every blob is whole");
            }
        }
    }

    #[test]
    fn full_disk_is_a_clear_error_and_leaves_no_temp_file() {
        // A 4 MiB tmpfs is the only reliable way to get ENOSPC; mounting needs root.
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "this test needs root to mount a small tmpfs (it is the ENOSPC test)"
        );
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(self.0).status();
            }
        }
        let _guard = Unmount(dir.path());
        let store = Store::open(dir.path()).expect("open");
        let err = store
            .put_bytes(&vec![7u8; 8 << 20])
            .expect_err("8 MiB cannot fit in 4 MiB");
        assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
        assert!(err.to_string().contains("out of disk space"), "{err}");
        assert_eq!(count(&dir.path().join("tmp")), 0);
        assert_eq!(count(&dir.path().join("blobs/sha256")), 0);
        // The store still works for what fits.
        store.put_bytes(b"small").expect("small put");
    }
}
