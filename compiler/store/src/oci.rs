//! A snapshot as an OCI image layout, and back (`docs/artifact-format.md`).
//!
//! One manifest per snapshot: its layers are the parts of every layer of the snapshot's chain
//! (ancestors first), its config blob names the layer keys, the parents and which manifest layer
//! is which part of which layer. Blobs shared between snapshots (a common base) have the same
//! digest, so a registry stores and a client uploads them once.
//!
//! Sparse parts (disk, disk diff, memory) travel as a one-entry GNU sparse tar, gzipped; the
//! others raw. The config records, for each part, both the digest of the blob in the manifest
//! and the digest of the part's raw bytes (its name in the store), so import can check both.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType,
};
use serde::{Deserialize, Serialize};
use specc_plan::ir::Digest;

use crate::hashio::{HashReader, HashWriter};
use crate::sparse::{self, SparseError};
use crate::store::{Algorithm, BlobId, LayerRecord, Part, Role, Store, StoreError};
use crate::{canonical_json, digest_serde};

/// `artifactType` of a snapshot manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.specc.snapshot.v1+json";
/// Media type of the snapshot config blob.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.specc.snapshot.config.v1+json";
/// The config schema version this code writes. Version 2 allows `sparse-sha256:` names in a
/// part's `content`; version 1 configs (only `sha256:`) are still read.
pub const CONFIG_VERSION: u32 = 2;
/// The config schema versions this code reads.
pub const CONFIG_VERSIONS_READ: [u32; 2] = [1, 2];
/// Descriptor annotation: the key of the layer a manifest layer belongs to.
pub const ANNOTATION_LAYER_KEY: &str = "dev.specc.layer.key";
/// Descriptor annotation: the part's role.
pub const ANNOTATION_ROLE: &str = "dev.specc.layer.role";
/// The standard annotation naming a manifest inside a layout (`index.json`).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The OCI media type of a part of `role`.
pub fn media_type(role: Role) -> &'static str {
    match role {
        Role::Disk => "application/vnd.specc.disk.v1.tar+gzip",
        Role::DiskDiff => "application/vnd.specc.disk.diff.v1.tar+gzip",
        Role::Memory => "application/vnd.specc.memory.v1.tar+gzip",
        Role::MemoryDiff => "application/vnd.specc.memory.diff.v1.tar+gzip",
        Role::Vmstate => "application/vnd.specc.vmstate.v1",
        Role::Kernel => "application/vnd.specc.kernel.v1",
        Role::Initrd => "application/vnd.specc.initrd.v1",
    }
}

/// Errors of export and import.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// An I/O operation on the layout failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The directory is not a usable OCI image layout.
    #[error("{}: not an OCI image layout: {reason}", dir.display())]
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A JSON document (index, manifest, config) is malformed.
    #[error("{what} is not valid JSON of its kind")]
    Json {
        /// Which document.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An OCI document could not be built or parsed.
    #[error("{what}")]
    Spec {
        /// Which document.
        what: String,
        /// The cause.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// The layout holds no snapshot manifest.
    #[error("{}: no manifest with artifactType {ARTIFACT_TYPE}", dir.display())]
    NoSnapshot {
        /// The layout directory.
        dir: PathBuf,
    },
    /// The layout holds several snapshot manifests and none was named.
    #[error("{}: {count} snapshot manifests; name one by digest", dir.display())]
    Ambiguous {
        /// The layout directory.
        dir: PathBuf,
        /// How many.
        count: usize,
    },
    /// A document or blob has the wrong media type.
    #[error("{what} has media type {actual:?}, expected {expected:?}")]
    MediaType {
        /// Which document or blob.
        what: String,
        /// The media type required.
        expected: String,
        /// The media type found.
        actual: String,
    },
    /// The config's schema version is not [`CONFIG_VERSION`].
    #[error("snapshot config version {found} is not supported (this specc reads versions 1 and 2)")]
    ConfigVersion {
        /// The version found.
        found: u32,
    },
    /// The manifest and the config disagree.
    #[error("the manifest and its config disagree: {0}")]
    Inconsistent(String),
    /// A blob named by the manifest is not in the layout.
    #[error("blob {digest} ({what}) is missing from the layout")]
    BlobMissing {
        /// The blob.
        digest: String,
        /// What it is.
        what: String,
    },
    /// A blob's size differs from its descriptor.
    #[error("blob {digest} ({what}) has {actual} bytes, its descriptor says {expected}")]
    BlobSize {
        /// The blob.
        digest: String,
        /// What it is.
        what: String,
        /// The size the descriptor names.
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// A blob's bytes do not hash to its digest.
    #[error("blob {digest} ({what}) is corrupt: its bytes hash to {actual}")]
    BlobDigest {
        /// The blob.
        digest: String,
        /// What it is.
        what: String,
        /// The digest of the bytes found.
        actual: Digest,
    },
    /// A sparse blob could not be packed or unpacked.
    #[error("blob {digest} ({what})")]
    Sparse {
        /// The blob.
        digest: String,
        /// What it is.
        what: String,
        /// The cause.
        #[source]
        source: SparseError,
    },
    /// A layer to export is not in the store.
    #[error("layer {0} is not in the store")]
    MissingLayer(Digest),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Result<T> = std::result::Result<T, OciError>;

/// The VM a snapshot was taken of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VmShape {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Virtual disk size in bytes.
    pub disk_bytes: u64,
    /// The kernel command line the guest booted with.
    pub kernel_cmdline: String,
}

/// What the builder knows about a snapshot beyond its layers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArtifactMeta {
    /// The VM shape.
    pub vm: VmShape,
    /// The digest of the spec (sources) the snapshot was built from.
    pub spec_digest: Option<Digest>,
    /// The CPU fingerprint of the host that took the memory snapshots (opaque here; the VMM
    /// defines it and compares it on restore).
    pub cpu_fingerprint: serde_json::Value,
    /// The name under which `index.json` lists the manifest (`org.opencontainers.image.ref.name`),
    /// e.g. a tag.
    pub ref_name: Option<String>,
    /// Extra manifest annotations.
    pub annotations: BTreeMap<String, String>,
    /// What the spec says of the VMs run from the snapshot.
    pub runtime: Option<RuntimePolicy>,
}

/// What a spec says of the VMs run from its snapshot (`expose`, `idle`, `persistence`): the
/// defaults a daemon applies where a create request is silent. It is in the artifact, not in
/// any layer: it changes nothing a layer holds, so two specs with the same layers share them
/// (and their keys) but may differ here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RuntimePolicy {
    /// TCP guest ports to expose.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Seconds idle before the vCPUs are paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_after_s: Option<u64>,
    /// Seconds idle before the VM is suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend_after_s: Option<u64>,
    /// What happens to the VM's state.
    pub persistence: RuntimePersistence,
}

/// [`RuntimePolicy::persistence`], spelled as the daemon's API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuntimePersistence {
    /// Deleted on suspend or idle timeout.
    #[default]
    Ephemeral,
    /// Kept under a storage budget, evicted lowest priority first.
    Sticky {
        /// 0 to 10.
        priority: u8,
    },
    /// Never evicted.
    Persistent,
}

/// The config blob (`application/vnd.specc.snapshot.config.v1+json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotConfig {
    /// [`CONFIG_VERSION`].
    pub schema_version: u32,
    /// The VM shape.
    pub vm: VmShape,
    /// The spec digest.
    #[serde(default, with = "opt_digest", skip_serializing_if = "Option::is_none")]
    pub spec_digest: Option<Digest>,
    /// CPU fingerprint of the snapshotting host (opaque).
    #[serde(default)]
    pub cpu_fingerprint: serde_json::Value,
    /// The snapshot's top layer.
    #[serde(with = "digest_serde")]
    pub head: Digest,
    /// Every layer of the chain, parents before children; the last one is `head`.
    pub layers: Vec<ConfigLayer>,
    /// The spec's policy for VMs run from it (absent in artifacts made before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimePolicy>,
}

/// One layer in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigLayer {
    /// Its cache key.
    #[serde(with = "digest_serde")]
    pub key: Digest,
    /// Its parents' keys, in order.
    #[serde(with = "digest_serde::vec")]
    pub parents: Vec<Digest>,
    /// Its parts.
    pub parts: Vec<ConfigPart>,
    /// When it was built (ms since the epoch).
    pub created_unix_ms: u64,
    /// Build timings (ms).
    #[serde(default)]
    pub timings_ms: BTreeMap<String, u64>,
    /// The builder's free-form data.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub info: serde_json::Value,
}

/// One part of a layer in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPart {
    /// The part's role.
    pub role: Role,
    /// Digest of the manifest layer blob carrying it.
    #[serde(with = "digest_serde")]
    pub blob: Digest,
    /// The name of the part's raw bytes (holes as zeros) in the store: `sha256:` or, for sparse
    /// parts, `sparse-sha256:` (docs/artifact-format.md).
    pub content: BlobId,
    /// Length of the raw bytes.
    pub size: u64,
}

mod opt_digest {
    use serde::{Deserialize, Deserializer, Serializer};
    use specc_plan::ir::Digest;

    pub(super) fn serialize<S: Serializer>(d: &Option<Digest>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&d.to_prefixed()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Digest>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| crate::digest_serde::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The layers of `head`'s chain in an order where parents come first (depth first, parents in
/// their listed order).
pub fn chain(store: &Store, head: &Digest) -> Result<Vec<LayerRecord>> {
    fn visit(
        store: &Store,
        key: &Digest,
        seen: &mut BTreeSet<Digest>,
        out: &mut Vec<LayerRecord>,
    ) -> Result<()> {
        if !seen.insert(*key) {
            return Ok(());
        }
        let rec = store.layer(key)?.ok_or(OciError::MissingLayer(*key))?;
        for p in &rec.parents {
            visit(store, p, seen, out)?;
        }
        out.push(rec);
        Ok(())
    }
    let mut out = Vec::new();
    visit(store, head, &mut BTreeSet::new(), &mut out)?;
    Ok(out)
}

/// Writes the snapshot whose top layer is `head` into the OCI image layout `out_dir` (created if
/// missing; an existing layout gains the manifest, replacing one of the same `ref_name`).
/// Returns the manifest's descriptor as `index.json` lists it.
pub fn export_artifact(
    store: &Store,
    head: &Digest,
    meta: &ArtifactMeta,
    out_dir: &Path,
) -> Result<Descriptor> {
    let layers = chain(store, head)?;
    let blobs = out_dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(|e| io_err("create", &blobs, e))?;
    let layout_file = out_dir.join("oci-layout");
    if !layout_file.exists() {
        write_file_atomic(&layout_file, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }

    let mut packed: HashMap<(Role, BlobId), (Digest, u64)> = HashMap::new();
    let mut descriptors = Vec::new();
    let mut config_layers = Vec::new();
    for rec in &layers {
        let mut parts = Vec::new();
        for part in &rec.parts {
            let (digest, size) = match packed.get(&(part.role, part.digest)) {
                Some(v) => *v,
                None => {
                    let v = export_part(store, part, out_dir)?;
                    packed.insert((part.role, part.digest), v);
                    v
                }
            };
            let mut annotations = HashMap::new();
            annotations.insert(ANNOTATION_LAYER_KEY.to_owned(), rec.key.to_prefixed());
            annotations.insert(ANNOTATION_ROLE.to_owned(), part.role.name().to_owned());
            let mut d = Descriptor::new(
                MediaType::Other(media_type(part.role).to_owned()),
                size,
                oci_digest(&digest),
            );
            d.set_annotations(Some(annotations));
            descriptors.push(d);
            parts.push(ConfigPart {
                role: part.role,
                blob: digest,
                content: part.digest,
                size: part.size,
            });
        }
        config_layers.push(ConfigLayer {
            key: rec.key,
            parents: rec.parents.clone(),
            parts,
            created_unix_ms: rec.created_unix_ms,
            timings_ms: rec.timings_ms.clone(),
            info: rec.info.clone(),
        });
    }
    let config = SnapshotConfig {
        schema_version: CONFIG_VERSION,
        vm: meta.vm.clone(),
        spec_digest: meta.spec_digest,
        cpu_fingerprint: meta.cpu_fingerprint.clone(),
        head: *head,
        layers: config_layers,
        runtime: meta.runtime.clone(),
    };
    let config_bytes = canonical_json(&config).map_err(|source| OciError::Json {
        what: "the snapshot config".into(),
        source,
    })?;
    let config_digest = write_blob_bytes(out_dir, &config_bytes)?;
    let mut builder = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .artifact_type(MediaType::Other(ARTIFACT_TYPE.to_owned()))
        .config(Descriptor::new(
            MediaType::Other(CONFIG_MEDIA_TYPE.to_owned()),
            config_bytes.len() as u64,
            oci_digest(&config_digest),
        ))
        .layers(descriptors);
    if !meta.annotations.is_empty() {
        builder = builder.annotations(
            meta.annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        );
    }
    let manifest = builder.build().map_err(|source| OciError::Spec {
        what: "cannot build the manifest".into(),
        source,
    })?;
    let manifest_bytes = canonical_json(&manifest).map_err(|source| OciError::Json {
        what: "the manifest".into(),
        source,
    })?;
    let manifest_digest = write_blob_bytes(out_dir, &manifest_bytes)?;
    let mut desc = Descriptor::new(
        MediaType::ImageManifest,
        manifest_bytes.len() as u64,
        oci_digest(&manifest_digest),
    );
    desc.set_artifact_type(Some(MediaType::Other(ARTIFACT_TYPE.to_owned())));
    if let Some(name) = &meta.ref_name {
        desc.set_annotations(Some(HashMap::from([(
            ANNOTATION_REF_NAME.to_owned(),
            name.clone(),
        )])));
    }
    add_to_index(out_dir, desc.clone())?;
    store.touch_layer(head)?;
    Ok(desc)
}

/// Puts `desc` into `<dir>/index.json`, replacing an entry with the same ref name (or, without
/// one, the same digest). Written by rename.
pub fn add_to_index(dir: &Path, desc: Descriptor) -> Result<()> {
    let index_path = dir.join("index.json");
    let mut manifests = if index_path.exists() {
        read_index(dir)?.manifests().clone()
    } else {
        Vec::new()
    };
    let name = ref_name(&desc).map(str::to_owned);
    manifests.retain(|m| match &name {
        Some(n) => ref_name(m) != Some(n),
        None => m.digest() != desc.digest(),
    });
    manifests.push(desc);
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()
        .map_err(|source| OciError::Spec {
            what: "cannot build index.json".into(),
            source,
        })?;
    let bytes = canonical_json(&index).map_err(|source| OciError::Json {
        what: "index.json".into(),
        source,
    })?;
    write_file_atomic(&index_path, &bytes)
}

/// The `org.opencontainers.image.ref.name` annotation of a descriptor.
pub fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REF_NAME))
        .map(String::as_str)
}

/// Reads and parses `<dir>/index.json` after checking `oci-layout`.
pub fn read_index(dir: &Path) -> Result<ImageIndex> {
    let layout_path = dir.join("oci-layout");
    let layout = fs::read(&layout_path).map_err(|e| OciError::Layout {
        dir: dir.to_owned(),
        reason: format!("cannot read oci-layout: {e}"),
    })?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Layout {
        image_layout_version: String,
    }
    let layout: Layout = serde_json::from_slice(&layout).map_err(|source| OciError::Json {
        what: layout_path.display().to_string(),
        source,
    })?;
    if layout.image_layout_version != "1.0.0" {
        return Err(OciError::Layout {
            dir: dir.to_owned(),
            reason: format!("imageLayoutVersion {:?}", layout.image_layout_version),
        });
    }
    let index_path = dir.join("index.json");
    let f = File::open(&index_path).map_err(|e| OciError::Layout {
        dir: dir.to_owned(),
        reason: format!("cannot read index.json: {e}"),
    })?;
    ImageIndex::from_reader(BufReader::new(f)).map_err(|source| OciError::Spec {
        what: format!("{} is not an image index", index_path.display()),
        source,
    })
}

/// Imports the one snapshot manifest of the layout `oci_dir` into `store` and returns its head
/// layer's key. See [`import_manifest`].
pub fn import_artifact(oci_dir: &Path, store: &Store) -> Result<Digest> {
    import_artifact_config(oci_dir, store).map(|c| c.head)
}

/// [`import_artifact`], returning the artifact's whole config (its head, its runtime policy).
pub fn import_artifact_config(oci_dir: &Path, store: &Store) -> Result<SnapshotConfig> {
    let index = read_index(oci_dir)?;
    let mut found = Vec::new();
    for d in index.manifests() {
        if *d.media_type() != MediaType::ImageManifest {
            continue;
        }
        let m = read_manifest(oci_dir, d)?;
        if m.artifact_type()
            .as_ref()
            .map(MediaType::to_string)
            .as_deref()
            == Some(ARTIFACT_TYPE)
        {
            found.push(d.clone());
        }
    }
    match found.len() {
        0 => Err(OciError::NoSnapshot {
            dir: oci_dir.to_owned(),
        }),
        1 => import_manifest_config(oci_dir, &found[0], store),
        count => Err(OciError::Ambiguous {
            dir: oci_dir.to_owned(),
            count,
        }),
    }
}

/// Imports the snapshot manifest `desc` of layout `oci_dir` into `store`: checks media types and
/// the config version, verifies the size and digest of every blob before anything is written,
/// unpacks the parts into the store (verifying their raw digests too), then registers the layers,
/// parents first. On any error no layer is registered (blobs already unpacked stay as
/// unreferenced blobs for gc).
pub fn import_manifest(oci_dir: &Path, desc: &Descriptor, store: &Store) -> Result<Digest> {
    import_manifest_config(oci_dir, desc, store).map(|c| c.head)
}

/// [`import_manifest`], returning the manifest's whole config.
pub fn import_manifest_config(
    oci_dir: &Path,
    desc: &Descriptor,
    store: &Store,
) -> Result<SnapshotConfig> {
    let manifest = read_manifest(oci_dir, desc)?;
    let artifact = manifest
        .artifact_type()
        .as_ref()
        .map(MediaType::to_string)
        .unwrap_or_default();
    if artifact != ARTIFACT_TYPE {
        return Err(OciError::MediaType {
            what: format!("manifest {}", desc.digest()),
            expected: ARTIFACT_TYPE.into(),
            actual: artifact,
        });
    }
    let cfg_desc = manifest.config();
    if cfg_desc.media_type().to_string() != CONFIG_MEDIA_TYPE {
        return Err(OciError::MediaType {
            what: format!("config {}", cfg_desc.digest()),
            expected: CONFIG_MEDIA_TYPE.into(),
            actual: cfg_desc.media_type().to_string(),
        });
    }
    let cfg_bytes = read_small_blob(oci_dir, cfg_desc, "snapshot config")?;
    #[derive(Deserialize)]
    struct Version {
        schema_version: u32,
    }
    let version: Version = serde_json::from_slice(&cfg_bytes).map_err(|source| OciError::Json {
        what: "the snapshot config".into(),
        source,
    })?;
    if !CONFIG_VERSIONS_READ.contains(&version.schema_version) {
        return Err(OciError::ConfigVersion {
            found: version.schema_version,
        });
    }
    let config: SnapshotConfig =
        serde_json::from_slice(&cfg_bytes).map_err(|source| OciError::Json {
            what: "the snapshot config".into(),
            source,
        })?;

    // Every part names a manifest layer of the right media type, and every manifest layer is
    // some part.
    let by_digest: HashMap<String, &Descriptor> = manifest
        .layers()
        .iter()
        .map(|d| (d.digest().to_string(), d))
        .collect();
    let mut used = BTreeSet::new();
    for layer in &config.layers {
        for part in &layer.parts {
            let name = part.blob.to_prefixed();
            let d = by_digest.get(&name).ok_or_else(|| {
                OciError::Inconsistent(format!(
                    "the config names blob {name} ({} of layer {}), the manifest does not",
                    part.role, layer.key
                ))
            })?;
            if d.media_type().to_string() != media_type(part.role) {
                return Err(OciError::MediaType {
                    what: format!("blob {name} ({} of layer {})", part.role, layer.key),
                    expected: media_type(part.role).into(),
                    actual: d.media_type().to_string(),
                });
            }
            used.insert(name);
        }
    }
    if let Some(extra) = by_digest.keys().find(|k| !used.contains(*k)) {
        return Err(OciError::Inconsistent(format!(
            "manifest layer {extra} is no part of any layer"
        )));
    }
    if config.layers.last().map(|l| l.key) != Some(config.head) {
        return Err(OciError::Inconsistent(
            "the last layer of the config is not its head".into(),
        ));
    }

    // Verify everything before writing anything.
    for d in manifest.layers() {
        verify_blob(oci_dir, d, &describe(d))?;
    }

    let mut known: BTreeSet<Digest> = BTreeSet::new();
    for layer in &config.layers {
        for parent in &layer.parents {
            if !known.contains(parent) && store.layer(parent)?.is_none() {
                return Err(OciError::Inconsistent(format!(
                    "layer {} names parent {parent}, which comes neither earlier nor from the store",
                    layer.key
                )));
            }
        }
        known.insert(layer.key);
        if store.layer(&layer.key)?.is_some() {
            continue;
        }
        for part in &layer.parts {
            if store.has_blob(&part.content) {
                continue;
            }
            import_part(oci_dir, store, layer, part)?;
        }
    }
    for layer in &config.layers {
        if store.layer(&layer.key)?.is_some() {
            continue;
        }
        let rec = LayerRecord {
            version: crate::store::LAYER_RECORD_VERSION,
            key: layer.key,
            parents: layer.parents.clone(),
            parts: layer
                .parts
                .iter()
                .map(|p| Part {
                    role: p.role,
                    digest: p.content,
                    size: p.size,
                })
                .collect(),
            created_unix_ms: layer.created_unix_ms,
            timings_ms: layer.timings_ms.clone(),
            info: layer.info.clone(),
        };
        store.commit_layer(&rec)?;
    }
    Ok(config)
}

/// Reads the config of snapshot manifest `desc` in layout `oci_dir` (verified).
pub fn read_config(oci_dir: &Path, desc: &Descriptor) -> Result<SnapshotConfig> {
    let manifest = read_manifest(oci_dir, desc)?;
    let bytes = read_small_blob(oci_dir, manifest.config(), "snapshot config")?;
    serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
        what: "the snapshot config".into(),
        source,
    })
}

fn describe(d: &Descriptor) -> String {
    let a = d.annotations().as_ref();
    match (
        a.and_then(|a| a.get(ANNOTATION_ROLE)),
        a.and_then(|a| a.get(ANNOTATION_LAYER_KEY)),
    ) {
        (Some(role), Some(key)) => format!("{role} of layer {key}"),
        _ => d.media_type().to_string(),
    }
}

fn import_part(
    oci_dir: &Path,
    store: &Store,
    layer: &ConfigLayer,
    part: &ConfigPart,
) -> Result<()> {
    let name = part.blob.to_prefixed();
    let what = format!("{} of layer {}", part.role, layer.key);
    let path = blob_path(oci_dir, &part.blob);
    let f = File::open(&path).map_err(|e| io_err("open", &path, e))?;
    let mut reader = HashReader::new(BufReader::with_capacity(1 << 20, f));
    let info = if part.role.is_sparse() {
        let mut w = store.blob_writer_as(part.content.algorithm)?;
        sparse::unpack(&mut reader, &mut w, Some(part.size)).map_err(|source| {
            OciError::Sparse {
                digest: name.clone(),
                what: what.clone(),
                source,
            }
        })?;
        w.finish(Some(&part.content))
    } else {
        store.put_reader_expecting(&mut reader, Some(&part.content))
    };
    let info = info.map_err(|e| match e {
        StoreError::DigestMismatch { actual, .. } => OciError::Inconsistent(format!(
            "blob {name} ({what}) unpacks to bytes with digest {actual}, the config says {}",
            part.content
        )),
        e => OciError::Store(e),
    })?;
    let (digest, _) = reader.finish();
    if digest != part.blob {
        return Err(OciError::BlobDigest {
            digest: name,
            what,
            actual: digest,
        });
    }
    if info.size != part.size {
        return Err(OciError::Inconsistent(format!(
            "blob {name} ({what}) unpacks to {} bytes, the config says {}",
            info.size, part.size
        )));
    }
    Ok(())
}

/// Packs (sparse roles) or copies (raw roles) a store blob into the layout; returns the layout
/// blob's digest and size.
fn export_part(store: &Store, part: &Part, out_dir: &Path) -> Result<(Digest, u64)> {
    let src = store.blob_path(&part.digest);
    let what = format!("{} part {}", part.role, part.digest);
    let dir = out_dir.join("blobs/sha256");
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(&dir)
        .map_err(|e| io_err("create a temp file in", &dir, e))?;
    let w = HashWriter::new(io::BufWriter::with_capacity(1 << 20, tmp.as_file()));
    let w = if part.role.is_sparse() {
        sparse::pack(&src, part.role.name(), w).map_err(|source| OciError::Sparse {
            digest: part.digest.to_string(),
            what: what.clone(),
            source,
        })?
    } else {
        let mut w = w;
        let f = store.open_blob(&part.digest)?;
        let mut r = HashReader::new(f);
        io::copy(&mut r, &mut w).map_err(|e| io_err("copy", &src, e))?;
        let (d, _) = r.finish();
        match part.digest.algorithm {
            // The bytes just copied are what the layout gets: they must be the part's.
            Algorithm::Sha256 if d != part.digest.digest => {
                return Err(StoreError::DigestMismatch {
                    expected: part.digest,
                    actual: BlobId::sha256(d),
                }
                .into());
            }
            Algorithm::Sha256 => {}
            Algorithm::SparseSha256 => {
                store.verify_blob(&part.digest)?;
            }
        }
        w
    };
    let (buf, digest, size) = w.finish();
    buf.into_inner()
        .map_err(|e| io_err("write", tmp.path(), e.into_error()))?;
    persist_blob(tmp, out_dir, &digest)?;
    Ok((digest, size))
}

/// Writes `bytes` as a blob of the layout and returns its digest.
pub(crate) fn write_blob_bytes(out_dir: &Path, bytes: &[u8]) -> Result<Digest> {
    use sha2::Digest as _;
    let digest = Digest(sha2::Sha256::digest(bytes).into());
    let dir = out_dir.join("blobs/sha256");
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(&dir)
        .map_err(|e| io_err("create a temp file in", &dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| io_err("write", tmp.path(), e))?;
    persist_blob(tmp, out_dir, &digest)?;
    Ok(digest)
}

/// fsyncs and renames a finished temp file to `blobs/sha256/<hex>` (if absent).
pub(crate) fn persist_blob(
    tmp: tempfile::NamedTempFile,
    out_dir: &Path,
    digest: &Digest,
) -> Result<()> {
    let dest = blob_path(out_dir, digest);
    if dest.exists() {
        return Ok(());
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| io_err("sync", tmp.path(), e))?;
    tmp.persist(&dest)
        .map_err(|e| io_err("rename into place", &dest, e.error))?;
    Ok(())
}

/// `<dir>/blobs/sha256/<hex>`.
pub fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs/sha256").join(digest.to_hex())
}

/// Converts our digest to an OCI one.
pub fn oci_digest(d: &Digest) -> oci_spec::image::Digest {
    // A sha256 digest of 64 lowercase hex digits is always a valid OCI digest.
    d.to_prefixed()
        .parse()
        .unwrap_or_else(|_| unreachable!("sha256 digests are valid OCI digests"))
}

/// Converts an OCI digest to ours; `None` for other algorithms.
pub fn from_oci_digest(d: &oci_spec::image::Digest) -> Option<Digest> {
    digest_serde::parse(d.as_ref()).ok()
}

fn descriptor_digest(d: &Descriptor, what: &str) -> Result<Digest> {
    from_oci_digest(d.digest()).ok_or_else(|| {
        OciError::Inconsistent(format!(
            "{what} has digest {}; only sha256 is supported",
            d.digest()
        ))
    })
}

/// Checks that blob `d` is in the layout with the right size and digest.
pub fn verify_blob(dir: &Path, d: &Descriptor, what: &str) -> Result<()> {
    let digest = descriptor_digest(d, what)?;
    let path = blob_path(dir, &digest);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OciError::BlobMissing {
                digest: digest.to_prefixed(),
                what: what.to_owned(),
            });
        }
        Err(e) => return Err(io_err("open", &path, e)),
    };
    let len = f.metadata().map_err(|e| io_err("stat", &path, e))?.len();
    if len != d.size() {
        return Err(OciError::BlobSize {
            digest: digest.to_prefixed(),
            what: what.to_owned(),
            expected: d.size(),
            actual: len,
        });
    }
    let mut r = HashReader::new(BufReader::with_capacity(1 << 20, f));
    io::copy(&mut r, &mut io::sink()).map_err(|e| io_err("read", &path, e))?;
    let (actual, _) = r.finish();
    if actual != digest {
        return Err(OciError::BlobDigest {
            digest: digest.to_prefixed(),
            what: what.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// Reads a small blob (manifest, config) whole, checking size and digest.
pub fn read_small_blob(dir: &Path, d: &Descriptor, what: &str) -> Result<Vec<u8>> {
    const LIMIT: u64 = 16 << 20;
    let digest = descriptor_digest(d, what)?;
    if d.size() > LIMIT {
        return Err(OciError::Inconsistent(format!(
            "{what} {digest} claims {} bytes; documents are at most {LIMIT}",
            d.size()
        )));
    }
    let path = blob_path(dir, &digest);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OciError::BlobMissing {
                digest: digest.to_prefixed(),
                what: what.to_owned(),
            });
        }
        Err(e) => return Err(io_err("read", &path, e)),
    };
    if bytes.len() as u64 != d.size() {
        return Err(OciError::BlobSize {
            digest: digest.to_prefixed(),
            what: what.to_owned(),
            expected: d.size(),
            actual: bytes.len() as u64,
        });
    }
    use sha2::Digest as _;
    let actual = Digest(sha2::Sha256::digest(&bytes).into());
    if actual != digest {
        return Err(OciError::BlobDigest {
            digest: digest.to_prefixed(),
            what: what.to_owned(),
            actual,
        });
    }
    Ok(bytes)
}

/// Reads and parses a manifest blob (verified).
pub fn read_manifest(dir: &Path, d: &Descriptor) -> Result<ImageManifest> {
    let bytes = read_small_blob(dir, d, "manifest")?;
    ImageManifest::from_reader(&bytes[..]).map_err(|source| OciError::Spec {
        what: format!("manifest {} is not an image manifest", d.digest()),
        source,
    })
}

fn write_file_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| io_err("create a temp file in", dir, e))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| io_err("write", tmp.path(), e))?;
    tmp.persist(dest)
        .map_err(|e| io_err("rename into place", dest, e.error))?;
    Ok(())
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> OciError {
    OciError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::MetadataExt;

    use specc_plan::store::LayerStore;

    use super::*;
    use crate::sparse::tests::make_sparse;

    /// A store with a base layer (disk diff + memory + vmstate + kernel) and a child layer
    /// (disk diff + memory + vmstate); returns the child's key. The memory files are `mem_len`
    /// bytes with a few MiB of data.
    pub(crate) fn synthetic_store(store: &Store, scratch: &Path, mem_len: u64) -> Digest {
        let mut parents = vec![];
        let mut head = Digest::default();
        for (i, key) in [[0x11u8; 32], [0x22; 32]].into_iter().enumerate() {
            let seed = u64::try_from(i).expect("small") + 2;
            let mem = scratch.join(format!("mem{i}"));
            make_sparse(&mem, mem_len, 4 * seed, 256 << 10);
            let disk = scratch.join(format!("disk{i}"));
            make_sparse(&disk, 64 << 20, seed, 128 << 10);
            let mut parts = vec![];
            for (role, path) in [(Role::Memory, &mem), (Role::DiskDiff, &disk)] {
                // The base layer's parts have sparse names (what the builder writes), the
                // child's plain ones (what stores of older builders hold): both must travel.
                let algorithm = if i == 0 {
                    Algorithm::for_role(role)
                } else {
                    Algorithm::Sha256
                };
                let info = store.put_file_as(path, algorithm).expect("put");
                parts.push(Part {
                    role,
                    digest: info.digest,
                    size: info.size,
                });
            }
            let vm = store
                .put_bytes(format!("vmstate of layer {i}").as_bytes())
                .expect("vmstate");
            parts.push(Part {
                role: Role::Vmstate,
                digest: vm.digest,
                size: vm.size,
            });
            if i == 0 {
                let k = store.put_bytes(&[0x7f; 3000]).expect("kernel");
                parts.push(Part {
                    role: Role::Kernel,
                    digest: k.digest,
                    size: k.size,
                });
            }
            let mut rec = LayerRecord::new(Digest(key), parents.clone(), parts);
            rec.timings_ms.insert("steps".into(), 1234);
            rec.info = serde_json::json!({"steps": i});
            store.commit_layer(&rec).expect("commit");
            parents = vec![rec.key];
            head = rec.key;
        }
        head
    }

    pub(crate) fn meta() -> ArtifactMeta {
        ArtifactMeta {
            vm: VmShape {
                vcpus: 2,
                memory_mib: 256,
                disk_bytes: 64 << 20,
                kernel_cmdline: "console=ttyS0".into(),
            },
            spec_digest: Some(Digest([0x5e; 32])),
            cpu_fingerprint: serde_json::json!({"vendor": "GenuineIntel", "cpuid": [1, 2, 3]}),
            ref_name: Some("latest".into()),
            annotations: BTreeMap::new(),
            runtime: Some(RuntimePolicy {
                ports: vec![8080],
                pause_after_s: Some(300),
                suspend_after_s: None,
                persistence: RuntimePersistence::Sticky { priority: 5 },
            }),
        }
    }

    #[test]
    fn export_then_import_restores_identical_sparse_parts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Store::open(dir.path().join("a")).expect("store a");
        let head = synthetic_store(&src, dir.path(), 256 << 20);
        let out = dir.path().join("oci");
        let desc = export_artifact(&src, &head, &meta(), &out).expect("export");
        assert_eq!(
            desc.artifact_type()
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some(ARTIFACT_TYPE)
        );
        let manifest = read_manifest(&out, &desc).expect("manifest");
        assert_eq!(manifest.layers().len(), 7);
        let config = read_config(&out, &desc).expect("config");
        assert_eq!(config.head, head);
        assert_eq!(config.layers.len(), 2);
        assert_eq!(config.cpu_fingerprint, meta().cpu_fingerprint);
        assert_eq!(config.runtime, meta().runtime);
        let names: Vec<String> = config.layers[0]
            .parts
            .iter()
            .map(|p| p.content.to_string())
            .collect();
        assert!(names[0].starts_with("sparse-sha256:"), "{names:?}");
        assert!(names[2].starts_with("sha256:"), "{names:?}");
        // Every manifest layer is named by the sha256 of exactly the bytes in the layout.
        for d in manifest.layers() {
            let bytes = fs::read(blob_path(
                &out,
                &from_oci_digest(d.digest()).expect("sha256"),
            ))
            .expect("blob");
            use sha2::Digest as _;
            assert_eq!(
                format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes))),
                d.digest().to_string()
            );
            assert_eq!(bytes.len() as u64, d.size());
        }

        let dst = Store::open(dir.path().join("b")).expect("store b");
        let got = import_artifact_config(&out, &dst).expect("import");
        assert_eq!((got.head, &got.runtime), (head, &meta().runtime));
        for key in [Digest([0x11; 32]), head] {
            assert!(dst.has_layer(&key));
            let a = src.layer(&key).expect("a").expect("layer a");
            let b = dst.layer(&key).expect("b").expect("layer b");
            assert_eq!(a.parts, b.parts);
            assert_eq!(a.parents, b.parents);
            assert_eq!(a.info, b.info);
            for p in &b.parts {
                dst.verify_blob(&p.digest).expect("bytes identical");
                let ma = fs::metadata(src.blob_path(&p.digest)).expect("meta a");
                let mb = fs::metadata(dst.blob_path(&p.digest)).expect("meta b");
                assert_eq!(ma.len(), mb.len());
                assert!(
                    mb.blocks() <= ma.blocks() + 8,
                    "holes survived for {}",
                    p.role
                );
            }
        }
        // The memory file is 256 MiB long but only a few MiB are allocated after the trip.
        let mem = dst
            .layer(&head)
            .expect("read")
            .expect("layer")
            .part(Role::Memory)
            .expect("memory part")
            .clone();
        let m = fs::metadata(dst.blob_path(&mem.digest)).expect("meta");
        assert_eq!(m.len(), 256 << 20);
        assert!(m.blocks() * 512 < 8 << 20, "{} allocated", m.blocks() * 512);

        // Re-exporting from the imported store gives the very same manifest.
        let out2 = dir.path().join("oci2");
        let desc2 = export_artifact(&dst, &head, &meta(), &out2).expect("export again");
        assert_eq!(desc.digest(), desc2.digest());
    }

    fn corrupt_one_layer_blob(out: &Path, desc: &Descriptor, role: &str) -> String {
        let manifest = read_manifest(out, desc).expect("manifest");
        let d = manifest
            .layers()
            .iter()
            .find(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_ROLE))
                    .map(String::as_str)
                    == Some(role)
            })
            .expect("layer of role");
        let digest = from_oci_digest(d.digest()).expect("sha256");
        let p = blob_path(out, &digest);
        let mut bytes = fs::read(&p).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&p, bytes).expect("write");
        digest.to_prefixed()
    }

    #[test]
    fn corrupt_blob_is_one_clear_error_and_registers_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Store::open(dir.path().join("a")).expect("store a");
        let head = synthetic_store(&src, dir.path(), 32 << 20);
        let out = dir.path().join("oci");
        let desc = export_artifact(&src, &head, &meta(), &out).expect("export");
        let bad = corrupt_one_layer_blob(&out, &desc, "memory");
        let dst = Store::open(dir.path().join("b")).expect("store b");
        let err = import_artifact(&out, &dst).expect_err("corrupt");
        let msg = err.to_string();
        assert!(matches!(err, OciError::BlobDigest { .. }), "{err:?}");
        assert!(msg.contains(&bad) && msg.contains("corrupt"), "{msg}");
        assert!(dst.layers().expect("list").is_empty());
        assert_eq!(dst.usage().expect("usage"), 0, "nothing was unpacked");
    }

    #[test]
    fn wrong_config_version_and_media_type_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Store::open(dir.path().join("a")).expect("store a");
        let head = synthetic_store(&src, dir.path(), 8 << 20);
        let out = dir.path().join("oci");
        let desc = export_artifact(&src, &head, &meta(), &out).expect("export");
        let manifest = read_manifest(&out, &desc).expect("manifest");

        // A config of version 3 (from a future specc), properly re-digested, in a new manifest.
        let mut config: serde_json::Value = serde_json::from_slice(
            &read_small_blob(&out, manifest.config(), "config").expect("config"),
        )
        .expect("json");
        config["schema_version"] = 3.into();
        let cfg = canonical_json(&config).expect("json");
        let cfg_digest = write_blob_bytes(&out, &cfg).expect("blob");
        let mut m2 = manifest.clone();
        m2.set_config(Descriptor::new(
            MediaType::Other(CONFIG_MEDIA_TYPE.into()),
            cfg.len() as u64,
            oci_digest(&cfg_digest),
        ));
        let m2_bytes = canonical_json(&m2).expect("json");
        let m2_digest = write_blob_bytes(&out, &m2_bytes).expect("blob");
        let d2 = Descriptor::new(
            MediaType::ImageManifest,
            m2_bytes.len() as u64,
            oci_digest(&m2_digest),
        );
        let dst = Store::open(dir.path().join("b")).expect("store b");
        let err = import_manifest(&out, &d2, &dst).expect_err("version 3");
        assert!(
            matches!(err, OciError::ConfigVersion { found: 3 }),
            "{err:?}"
        );

        // A memory layer relabelled as raw vmstate.
        let mut m3 = manifest.clone();
        for d in m3.layers_mut() {
            if d.media_type().to_string() == media_type(Role::Memory) {
                d.set_media_type(MediaType::Other(media_type(Role::Vmstate).into()));
            }
        }
        let m3_bytes = canonical_json(&m3).expect("json");
        let m3_digest = write_blob_bytes(&out, &m3_bytes).expect("blob");
        let d3 = Descriptor::new(
            MediaType::ImageManifest,
            m3_bytes.len() as u64,
            oci_digest(&m3_digest),
        );
        let err = import_manifest(&out, &d3, &dst).expect_err("media type");
        assert!(matches!(err, OciError::MediaType { .. }), "{err:?}");
        assert!(dst.layers().expect("list").is_empty());
    }
}
