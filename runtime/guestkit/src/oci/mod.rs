//! OCI images as bases (`base oci="REF"`): an image is read from an OCI image layout on disk
//! (or pulled from a registry into one), its linux/amd64 manifest found, every blob verified
//! against its descriptor's digest and size as it is read, and its layers unpacked in order
//! with whiteouts ([`unpack`]) into the tree the rootfs builder renders with `mkfs.ext4 -d`.
//!
//! References (see [`ImageRef::parse`]):
//!
//! ```text
//! oci-layout:/path/to/layout[:TAG | @sha256:HEX]   an image layout directory
//! /path/to/layout[:TAG], ./dir, ../dir              the same, for paths
//! host[:port]/repo[:tag][@sha256:HEX]                a registry (pulled by specc-store)
//! ```
//!
//! Both OCI and Docker (schema 2) media types are read; layers may be tar, tar+gzip or
//! tar+zstd (any number of frames, skippable ones skipped). The image config's `Env`, `WorkingDir`, `User`, `Entrypoint` and `Cmd` are
//! returned ([`ImageConfig`]) and kept beside a built image ([`RootfsImage::oci_config`]).

pub mod unpack;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use oci_spec::image::{
    ANNOTATION_REF_NAME, Arch, Descriptor, Digest, DigestAlgorithm, ImageConfiguration, ImageIndex,
    ImageManifest, Os,
};
use sha2::{Digest as _, Sha256};

use crate::rootfs::{self, RootfsImage, RootfsOptions};
use unpack::{LayerStats, Tree, UnpackError};

/// Bumped when unpacking or the agent installation changes what ends up in an image.
pub const OCI_BUILDER_VERSION: &str = "specc-oci-base 1";

/// The only platform a guest runs.
pub const PLATFORM: &str = "linux/amd64";

/// Largest manifest, index or config blob read (they are read into memory).
pub const MAX_JSON_BLOB: u64 = 8 << 20;

/// The name of the image config beside a built image.
pub const CONFIG_FILE: &str = "oci-config.json";

const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Errors of reading OCI images and building bases from them.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference cannot be parsed.
    #[error("`{reference}` is not an image reference: {why}")]
    BadReference {
        /// As given.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// The directory is not an OCI image layout.
    #[error("{} is not an OCI image layout: {why}", dir.display())]
    NotALayout {
        /// The directory.
        dir: PathBuf,
        /// What is missing or wrong.
        why: String,
    },
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A JSON document (index.json or a blob) does not parse as what it should be.
    #[error("{what} is not a valid {kind}")]
    Json {
        /// Which document (`index.json` or a blob digest).
        what: String,
        /// What it should have been.
        kind: &'static str,
        /// The cause.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A blob named by a descriptor is not in the layout.
    #[error("blob {digest} is missing from the layout ({})", path.display())]
    BlobMissing {
        /// The blob's digest.
        digest: String,
        /// Where it should be.
        path: PathBuf,
    },
    /// A blob's bytes do not match its descriptor.
    #[error("blob {digest} is corrupt: {why}")]
    BlobCorrupt {
        /// The blob's digest.
        digest: String,
        /// How it differs (size, digest, or the uncompressed layer's digest).
        why: String,
    },
    /// A JSON blob is larger than this reader accepts.
    #[error(
        "blob {digest} is {size} bytes, more than the {MAX_JSON_BLOB} accepted for a manifest, index or config"
    )]
    BlobTooLarge {
        /// The blob's digest.
        digest: String,
        /// Its size.
        size: u64,
    },
    /// No image matches the reference's tag or digest.
    #[error("no image {selector} in {}; it has: {available}", dir.display())]
    NoSuchImage {
        /// The layout.
        dir: PathBuf,
        /// What was asked for.
        selector: String,
        /// What the layout's index.json names.
        available: String,
    },
    /// The layout holds several images and the reference names none of them.
    #[error("{} holds several images; name one with :TAG or @DIGEST (it has: {available})", dir.display())]
    Ambiguous {
        /// The layout.
        dir: PathBuf,
        /// What index.json names.
        available: String,
    },
    /// The image has no linux/amd64 variant.
    #[error("image {digest} has no linux/amd64 manifest (found: {found})")]
    NoPlatform {
        /// The index or manifest looked at.
        digest: String,
        /// The platforms it has.
        found: String,
    },
    /// Something this reader does not handle (unknown layer types, schema 1 manifests, non-sha256
    /// digests, artifacts that are not container images).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Applying a layer failed.
    #[error("unpacking layer {index} ({digest})")]
    Layer {
        /// 0-based, bottom first.
        index: usize,
        /// The layer blob's digest.
        digest: String,
        /// The cause.
        #[source]
        source: UnpackError,
    },
    /// Installing the agent into the unpacked tree failed.
    #[error("installing the agent into the image")]
    Install(#[source] UnpackError),
    /// Creating the unpack tree failed.
    #[error("creating the unpack tree")]
    Tree(#[source] UnpackError),
    /// Pulling a registry reference failed.
    #[error("pulling `{reference}` ({PLATFORM})")]
    Pull {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: specc_store::registry::RegistryError,
    },
    /// `SPECC_OCI_OFFLINE` is set and the reference was never pulled.
    #[error(
        "`{reference}` has not been pulled and {OFFLINE_ENV} forbids pulling it (run once without it)"
    )]
    NotPulled {
        /// The reference.
        reference: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OciError {
    let path = path.to_path_buf();
    move |source| OciError::Io { what, path, source }
}

/// Which image of a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The only image of the layout (or the one tagged `latest`).
    Default,
    /// The image whose `org.opencontainers.image.ref.name` is this tag.
    Tag(String),
    /// The manifest or index with this digest (`sha256:<hex>`).
    Digest(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Default => f.write_str("(default)"),
            Selector::Tag(t) => write!(f, ":{t}"),
            Selector::Digest(d) => write!(f, "@{d}"),
        }
    }
}

/// A parsed `base oci=` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory on disk.
    Layout {
        /// The directory (relative paths are relative to the process' working directory;
        /// see [`ImageRef::relative_to`]).
        dir: PathBuf,
        /// Which image in it.
        selector: Selector,
    },
    /// A registry reference, `host[:port]/repo[:tag][@digest]`.
    Registry(String),
}

impl ImageRef {
    /// Parses a reference: `oci-layout:DIR[:TAG|@DIGEST]`; a path (starting with `/`, `./`
    /// or `../`) to a layout, with the same suffixes; else a registry reference. A path that
    /// is itself an existing directory is never split at a `:`.
    pub fn parse(reference: &str) -> Result<ImageRef, OciError> {
        let bad = |why: &str| OciError::BadReference {
            reference: reference.to_owned(),
            why: why.to_owned(),
        };
        if reference.is_empty() || reference.chars().any(|c| c.is_whitespace() || c == '\0') {
            return Err(bad("empty, or has whitespace"));
        }
        let path = if let Some(rest) = reference.strip_prefix("oci-layout:") {
            rest
        } else if reference.starts_with('/')
            || reference.starts_with("./")
            || reference.starts_with("../")
            || reference == "."
        {
            reference
        } else {
            // As docker reads names: the first component is a host only if it looks like one.
            let host = reference.split('/').next().unwrap_or_default();
            let looks_like_host = reference.contains('/')
                && (host.contains('.') || host.contains(':') || host == "localhost");
            if !looks_like_host {
                return Err(bad(
                    "a registry reference needs a host and a repository (host[:port]/repo:tag, \
                     there is no default registry); a layout directory needs oci-layout: or a \
                     path starting with / or ./",
                ));
            }
            return Ok(ImageRef::Registry(reference.to_owned()));
        };
        if path.is_empty() {
            return Err(bad("no layout directory after oci-layout:"));
        }
        if Path::new(path).is_dir() {
            return Ok(ImageRef::Layout {
                dir: path.into(),
                selector: Selector::Default,
            });
        }
        if let Some((dir, digest)) = path.rsplit_once('@') {
            let d: Digest = digest
                .parse()
                .map_err(|_| bad("the part after @ is not a digest (sha256:<64 hex>)"))?;
            if *d.algorithm() != DigestAlgorithm::Sha256 {
                return Err(bad("only sha256 digests are supported"));
            }
            if dir.is_empty() {
                return Err(bad("no layout directory before @"));
            }
            return Ok(ImageRef::Layout {
                dir: dir.into(),
                selector: Selector::Digest(d.to_string()),
            });
        }
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        if let Some(colon) = path[last_slash..].rfind(':') {
            let (dir, tag) = (&path[..last_slash + colon], &path[last_slash + colon + 1..]);
            if dir.is_empty() || tag.is_empty() {
                return Err(bad("empty directory or tag around `:`"));
            }
            return Ok(ImageRef::Layout {
                dir: dir.into(),
                selector: Selector::Tag(tag.to_owned()),
            });
        }
        Ok(ImageRef::Layout {
            dir: path.into(),
            selector: Selector::Default,
        })
    }

    /// Makes a relative layout directory relative to `base` (a spec's directory).
    pub fn relative_to(self, base: &Path) -> ImageRef {
        match self {
            ImageRef::Layout { dir, selector } if dir.is_relative() => ImageRef::Layout {
                dir: base.join(dir),
                selector,
            },
            other => other,
        }
    }

    /// The reference in the syntax [`ImageRef::parse`] reads.
    pub fn to_reference(&self) -> String {
        match self {
            ImageRef::Layout { dir, selector } => match selector {
                Selector::Default => format!("oci-layout:{}", dir.display()),
                s => format!("oci-layout:{}{s}", dir.display()),
            },
            ImageRef::Registry(r) => r.clone(),
        }
    }
}

/// The parts of an image config a guest's processes start with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`, `NAME=value` strings.
    pub env: Vec<String>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`, ...), if set.
    pub user: Option<String>,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
}

impl ImageConfig {
    fn from_configuration(c: &ImageConfiguration) -> ImageConfig {
        let Some(cfg) = c.config() else {
            return ImageConfig::default();
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        ImageConfig {
            env: cfg.env().clone().unwrap_or_default(),
            working_dir: nonempty(cfg.working_dir()),
            user: nonempty(cfg.user()),
            entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
            cmd: cfg.cmd().clone().unwrap_or_default(),
        }
    }

    /// Parses an image config blob (OCI or Docker).
    pub fn from_json(what: &str, bytes: &[u8]) -> Result<ImageConfig, OciError> {
        let c = ImageConfiguration::from_reader(bytes).map_err(|source| OciError::Json {
            what: what.to_owned(),
            kind: "image config",
            source,
        })?;
        Ok(ImageConfig::from_configuration(&c))
    }
}

impl RootfsImage {
    /// The image config of an image built from an OCI base (`None` for other bases).
    pub fn oci_config(&self) -> Result<Option<ImageConfig>, OciError> {
        let p = self
            .path
            .parent()
            .map(|d| d.join(CONFIG_FILE))
            .unwrap_or_default();
        match fs::read(&p) {
            Ok(bytes) => ImageConfig::from_json(&p.display().to_string(), &bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &p)(e)),
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// tar+gzip.
    Gzip,
    /// tar+zstd.
    Zstd,
}

fn layer_compression(media_type: &str) -> Result<Compression, OciError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Compression::Zstd),
        m => Err(OciError::Unsupported(format!("layer media type {m}"))),
    }
}

fn is_index(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.index.v1+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
    )
}

fn is_manifest(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v2+json"
    )
}

fn check_config_type(media_type: &str) -> Result<(), OciError> {
    match media_type {
        "application/vnd.oci.image.config.v1+json"
        | "application/vnd.docker.container.image.v1+json" => Ok(()),
        m => Err(OciError::Unsupported(format!(
            "config media type {m}: not a container image"
        ))),
    }
}

/// One layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The blob's descriptor digest (`sha256:<hex>`).
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// Its compression.
    pub compression: Compression,
    /// The digest of the uncompressed tar (the config's `rootfs.diff_ids`), if the config
    /// gives one.
    pub diff_id: Option<String>,
}

/// An image found in a layout, with its manifest and config read and verified.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The layout directory.
    pub layout: PathBuf,
    /// The linux/amd64 manifest's digest (what the rootfs cache key uses).
    pub manifest_digest: String,
    /// Its layers, bottom first.
    pub layers: Vec<Layer>,
    /// The config's process defaults.
    pub config: ImageConfig,
    /// The config blob as stored (kept beside a built image).
    pub config_json: Vec<u8>,
}

/// What unpacking an image did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackReport {
    /// Layers applied.
    pub layers: usize,
    /// Totals over the layers.
    pub totals: LayerStats,
}

/// A zstd stream of any number of frames, skippable frames skipped: zstd:chunked layers are
/// many frames, and ruzstd's own streaming reader stops after the first.
struct ZstdFrames<R> {
    src: R,
    frame: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: Read> ZstdFrames<R> {
    fn new(src: R) -> Self {
        ZstdFrames {
            src,
            frame: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                let mut first = [0u8; 1];
                if self.src.read(&mut first)? == 0 {
                    return Ok(0);
                }
                match self.frame.reset((&first[..]).chain(&mut self.src)) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let want = u64::from(length);
                        let skipped = io::copy(&mut (&mut self.src).take(want), &mut io::sink())?;
                        if skipped != want {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        continue;
                    }
                    Err(e) => return Err(io::Error::other(format!("zstd: {e}"))),
                }
            }
            while self.frame.can_collect() < buf.len() && !self.frame.is_finished() {
                let need = buf.len() - self.frame.can_collect();
                self.frame
                    .decode_blocks(
                        &mut self.src,
                        ruzstd::decoding::BlockDecodingStrategy::UptoBytes(need),
                    )
                    .map_err(|e| io::Error::other(format!("zstd: {e}")))?;
            }
            let n = self.frame.read(buf)?;
            if n == 0 && self.frame.is_finished() {
                self.in_frame = false;
                continue;
            }
            return Ok(n);
        }
    }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

/// Reads a blob through, counting and hashing; fails as soon as it is longer than expected.
#[derive(Debug)]
struct Verifying<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    limit: Option<u64>,
}

impl<R: Read> Verifying<R> {
    fn new(inner: R, limit: Option<u64>) -> Self {
        Verifying {
            inner,
            hasher: Sha256::new(),
            read: 0,
            limit,
        }
    }

    /// Reads the rest and returns (bytes, `sha256:<hex>`).
    fn finish(mut self) -> io::Result<(u64, String)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            self.read,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
        ))
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if let Some(limit) = self.limit
            && self.read > limit
        {
            return Err(io::Error::other(format!(
                "longer than the {limit} bytes its descriptor gives"
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn sha256_hex_of(d: &Digest) -> Result<&str, OciError> {
    if *d.algorithm() != DigestAlgorithm::Sha256 {
        return Err(OciError::Unsupported(format!(
            "digest algorithm of {d} (only sha256)"
        )));
    }
    Ok(d.digest())
}

fn platform_of(d: &Descriptor) -> Option<String> {
    d.platform().as_ref().map(|p| {
        let mut s = format!("{}/{}", p.os(), p.architecture());
        if let Some(v) = p.variant() {
            let _ = write!(s, "/{v}");
        }
        s
    })
}

impl Layout {
    /// Opens a layout: `oci-layout` must say version 1.x, `index.json` must exist.
    pub fn open(dir: &Path) -> Result<Layout, OciError> {
        let not = |why: String| OciError::NotALayout {
            dir: dir.to_owned(),
            why,
        };
        let marker = dir.join("oci-layout");
        let text = fs::read(&marker).map_err(|e| not(format!("reading oci-layout: {e}")))?;
        let layout = oci_spec::image::OciLayout::from_reader(text.as_slice())
            .map_err(|e| not(format!("oci-layout does not parse: {e}")))?;
        if !layout.image_layout_version().starts_with("1.") {
            return Err(not(format!(
                "image layout version {} (this reader knows 1.x)",
                layout.image_layout_version()
            )));
        }
        if !dir.join("index.json").is_file() {
            return Err(not("no index.json".into()));
        }
        Ok(Layout {
            dir: dir.to_owned(),
        })
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The top-level `index.json`.
    pub fn index(&self) -> Result<ImageIndex, OciError> {
        let p = self.dir.join("index.json");
        let f = File::open(&p).map_err(io_err("opening", &p))?;
        if f.metadata().map_err(io_err("stat", &p))?.len() > MAX_JSON_BLOB {
            return Err(OciError::BlobTooLarge {
                digest: "index.json".into(),
                size: f.metadata().map_err(io_err("stat", &p))?.len(),
            });
        }
        ImageIndex::from_reader(f).map_err(|source| OciError::Json {
            what: p.display().to_string(),
            kind: "image index",
            source,
        })
    }

    /// Opens a blob after checking that its file has the descriptor's size.
    fn open_blob(&self, desc: &Descriptor) -> Result<File, OciError> {
        let hex = sha256_hex_of(desc.digest())?;
        let p = self.dir.join("blobs/sha256").join(hex);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::BlobMissing {
                    digest: desc.digest().to_string(),
                    path: p,
                });
            }
            Err(e) => return Err(io_err("opening", &p)(e)),
        };
        let len = f.metadata().map_err(io_err("stat", &p))?.len();
        if len != desc.size() {
            return Err(OciError::BlobCorrupt {
                digest: desc.digest().to_string(),
                why: format!("it is {len} bytes, its descriptor says {}", desc.size()),
            });
        }
        Ok(f)
    }

    fn check(desc: &Descriptor, read: u64, digest: &str) -> Result<(), OciError> {
        if read != desc.size() {
            return Err(OciError::BlobCorrupt {
                digest: desc.digest().to_string(),
                why: format!("read {read} bytes, its descriptor says {}", desc.size()),
            });
        }
        if digest != desc.digest().as_ref() {
            return Err(OciError::BlobCorrupt {
                digest: desc.digest().to_string(),
                why: format!("its content hashes to {digest}"),
            });
        }
        Ok(())
    }

    /// Reads a small (JSON) blob whole and verifies it.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, OciError> {
        if desc.size() > MAX_JSON_BLOB {
            return Err(OciError::BlobTooLarge {
                digest: desc.digest().to_string(),
                size: desc.size(),
            });
        }
        let f = self.open_blob(desc)?;
        let mut r = Verifying::new(f, Some(desc.size()));
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)
            .map_err(|e| OciError::BlobCorrupt {
                digest: desc.digest().to_string(),
                why: e.to_string(),
            })?;
        let (read, digest) = r.finish().map_err(io_err("reading", &self.dir))?;
        Self::check(desc, read, &digest)?;
        Ok(bytes)
    }

    fn names(index: &ImageIndex) -> String {
        let mut names: Vec<String> = index
            .manifests()
            .iter()
            .map(|d| {
                let ann = d.annotations().as_ref();
                match ann.and_then(|a| a.get(ANNOTATION_REF_NAME)) {
                    Some(tag) => format!(":{tag} ({})", d.digest()),
                    None => format!("@{}", d.digest()),
                }
            })
            .collect();
        if names.is_empty() {
            names.push("nothing".into());
        }
        names.join(", ")
    }

    /// Finds the linux/amd64 image `selector` names, and reads and verifies its manifest and
    /// config.
    pub fn resolve(&self, selector: &Selector) -> Result<OciImage, OciError> {
        let index = self.index()?;
        let matches_tag = |d: &Descriptor, tag: &str| {
            d.annotations().as_ref().is_some_and(|a| {
                a.get(ANNOTATION_REF_NAME).is_some_and(|t| t == tag)
                    || a.get(CONTAINERD_NAME)
                        .is_some_and(|n| n.rsplit_once(':').is_some_and(|(_, t)| t == tag))
            })
        };
        let top: Vec<&Descriptor> = match selector {
            Selector::Default => {
                let all: Vec<&Descriptor> = index.manifests().iter().collect();
                let mut digests: Vec<&str> = all.iter().map(|d| d.digest().as_ref()).collect();
                digests.sort_unstable();
                digests.dedup();
                if digests.len() > 1 {
                    let latest: Vec<&Descriptor> = all
                        .iter()
                        .copied()
                        .filter(|d| matches_tag(d, "latest"))
                        .collect();
                    if latest.is_empty() {
                        return Err(OciError::Ambiguous {
                            dir: self.dir.clone(),
                            available: Self::names(&index),
                        });
                    }
                    latest
                } else {
                    all.into_iter().take(1).collect()
                }
            }
            Selector::Tag(tag) => index
                .manifests()
                .iter()
                .filter(|d| matches_tag(d, tag))
                .take(1)
                .collect(),
            Selector::Digest(want) => {
                let found = self.find_digest(&index, want, 0)?;
                return match found {
                    Some(d) => self.select(&d, 0),
                    None => Err(OciError::NoSuchImage {
                        dir: self.dir.clone(),
                        selector: selector.to_string(),
                        available: Self::names(&index),
                    }),
                };
            }
        };
        let Some(desc) = top.first() else {
            return Err(OciError::NoSuchImage {
                dir: self.dir.clone(),
                selector: selector.to_string(),
                available: Self::names(&index),
            });
        };
        self.select(desc, 0)
    }

    /// A descriptor with digest `want` in `index` or in the indexes it points to.
    fn find_digest(
        &self,
        index: &ImageIndex,
        want: &str,
        depth: usize,
    ) -> Result<Option<Descriptor>, OciError> {
        for d in index.manifests() {
            if d.digest().as_ref() == want {
                return Ok(Some(d.clone()));
            }
        }
        if depth < 4 {
            for d in index.manifests() {
                if is_index(d.media_type().as_ref()) {
                    let nested = self.read_index(d)?;
                    if let Some(found) = self.find_digest(&nested, want, depth + 1)? {
                        return Ok(Some(found));
                    }
                }
            }
        }
        Ok(None)
    }

    fn read_index(&self, desc: &Descriptor) -> Result<ImageIndex, OciError> {
        let bytes = self.read_blob(desc)?;
        ImageIndex::from_reader(bytes.as_slice()).map_err(|source| OciError::Json {
            what: desc.digest().to_string(),
            kind: "image index",
            source,
        })
    }

    /// Follows `desc` (an index or a manifest) to the linux/amd64 image.
    fn select(&self, desc: &Descriptor, depth: usize) -> Result<OciImage, OciError> {
        let mt = desc.media_type().as_ref();
        if is_index(mt) {
            if depth >= 4 {
                return Err(OciError::Unsupported(format!(
                    "indexes nested deeper than 4 ({})",
                    desc.digest()
                )));
            }
            let index = self.read_index(desc)?;
            let amd64: Vec<&Descriptor> = index
                .manifests()
                .iter()
                .filter(|d| {
                    d.platform()
                        .as_ref()
                        .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
                })
                .collect();
            let chosen = match amd64.as_slice() {
                [] => {
                    // An index without platforms (e.g. a single image wrapped in an index).
                    let unplatformed: Vec<&Descriptor> = index
                        .manifests()
                        .iter()
                        .filter(|d| d.platform().is_none())
                        .collect();
                    if unplatformed.len() == 1 {
                        unplatformed[0]
                    } else {
                        let found: Vec<String> =
                            index.manifests().iter().filter_map(platform_of).collect();
                        return Err(OciError::NoPlatform {
                            digest: desc.digest().to_string(),
                            found: if found.is_empty() {
                                "no platforms".into()
                            } else {
                                found.join(", ")
                            },
                        });
                    }
                }
                // Prefer a plain amd64 over variants (v2, v3, ...): every x86_64 runs it.
                many => many
                    .iter()
                    .copied()
                    .find(|d| d.platform().as_ref().is_some_and(|p| p.variant().is_none()))
                    .unwrap_or(many[0]),
            };
            return self.select(chosen, depth + 1);
        }
        if !is_manifest(mt) {
            return Err(OciError::Unsupported(format!(
                "{mt} ({}); expected an image manifest or index",
                desc.digest()
            )));
        }
        let bytes = self.read_blob(desc)?;
        let manifest =
            ImageManifest::from_reader(bytes.as_slice()).map_err(|source| OciError::Json {
                what: desc.digest().to_string(),
                kind: "image manifest",
                source,
            })?;
        check_config_type(manifest.config().media_type().as_ref())?;
        let config_json = self.read_blob(manifest.config())?;
        let configuration =
            ImageConfiguration::from_reader(config_json.as_slice()).map_err(|source| {
                OciError::Json {
                    what: manifest.config().digest().to_string(),
                    kind: "image config",
                    source,
                }
            })?;
        if *configuration.os() != Os::Linux || *configuration.architecture() != Arch::Amd64 {
            return Err(OciError::NoPlatform {
                digest: desc.digest().to_string(),
                found: format!("{}/{}", configuration.os(), configuration.architecture()),
            });
        }
        let diff_ids = configuration.rootfs().diff_ids();
        if !diff_ids.is_empty() && diff_ids.len() != manifest.layers().len() {
            return Err(OciError::BlobCorrupt {
                digest: manifest.config().digest().to_string(),
                why: format!(
                    "it lists {} diff_ids for {} layers",
                    diff_ids.len(),
                    manifest.layers().len()
                ),
            });
        }
        let mut layers = Vec::new();
        for (i, l) in manifest.layers().iter().enumerate() {
            sha256_hex_of(l.digest())?;
            layers.push(Layer {
                digest: l.digest().to_string(),
                size: l.size(),
                compression: layer_compression(l.media_type().as_ref())?,
                diff_id: diff_ids.get(i).cloned(),
            });
        }
        Ok(OciImage {
            layout: self.dir.clone(),
            manifest_digest: desc.digest().to_string(),
            layers,
            config: ImageConfig::from_configuration(&configuration),
            config_json,
        })
    }
}

impl OciImage {
    /// Reads and verifies every layer blob and applies it onto `tree`, bottom first. A blob
    /// whose bytes (or uncompressed bytes) do not match its digest is reported as corrupt
    /// even when the damage first shows as a decompression or tar error.
    pub fn unpack_into(
        &self,
        tree: &mut Tree,
        progress: &dyn Fn(&str),
    ) -> Result<UnpackReport, OciError> {
        let layout = Layout::open(&self.layout)?;
        let mut report = UnpackReport::default();
        for (index, layer) in self.layers.iter().enumerate() {
            progress(&format!(
                "unpacking layer {}/{} {} ({} bytes)",
                index + 1,
                self.layers.len(),
                layer.digest,
                layer.size
            ));
            let digest: Digest = layer
                .digest
                .parse()
                .map_err(|_| OciError::Unsupported(format!("layer digest {}", layer.digest)))?;
            let mt = match layer.compression {
                Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::None => "application/vnd.oci.image.layer.v1.tar",
                Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            let desc = Descriptor::new(mt.into(), layer.size, digest);
            let file = layout.open_blob(&desc)?;
            let mut raw = Verifying::new(file, Some(layer.size));
            let applied = {
                let decoded: Box<dyn Read + '_> = match layer.compression {
                    Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut raw)),
                    Compression::None => Box::new(&mut raw),
                    Compression::Zstd => Box::new(ZstdFrames::new(&mut raw)),
                };
                let mut diff = Verifying::new(decoded, None);
                tree.apply_layer(&mut diff).and_then(|stats| {
                    let (_, diff_digest) = diff.finish().map_err(UnpackError::Read)?;
                    Ok((stats, diff_digest))
                })
            };
            // The blob's own digest first: damage often surfaces as a gzip or tar error.
            let (read, blob_digest) = raw.finish().map_err(|e| OciError::BlobCorrupt {
                digest: layer.digest.clone(),
                why: e.to_string(),
            })?;
            Layout::check(&desc, read, &blob_digest)?;
            let (stats, diff_digest) = applied.map_err(|source| OciError::Layer {
                index,
                digest: layer.digest.clone(),
                source,
            })?;
            if let Some(want) = &layer.diff_id
                && *want != diff_digest
            {
                return Err(OciError::BlobCorrupt {
                    digest: layer.digest.clone(),
                    why: format!(
                        "its uncompressed content hashes to {diff_digest}, the config's diff_id is {want}"
                    ),
                });
            }
            report.layers += 1;
            let t = &mut report.totals;
            t.entries += stats.entries;
            t.files += stats.files;
            t.bytes += stats.bytes;
            t.whiteouts += stats.whiteouts;
            t.skipped += stats.skipped;
        }
        Ok(report)
    }

    /// What the rootfs cache key takes from the image.
    pub fn key_inputs(&self) -> Vec<(String, String)> {
        vec![
            ("oci-builder".into(), OCI_BUILDER_VERSION.into()),
            ("oci-manifest".into(), self.manifest_digest.clone()),
            ("oci-platform".into(), PLATFORM.into()),
            ("unit".into(), rootfs::AGENT_UNIT.into()),
            ("network".into(), rootfs::DHCP_NETWORK.into()),
        ]
    }
}

/// Set (to anything but empty or `0`) to use registry images as last pulled, without asking
/// the registry: `specc run` sets it for its re-run inside the rig, which has no route to the
/// registry but sees the host's `$SPECC_HOME`.
pub const OFFLINE_ENV: &str = "SPECC_OCI_OFFLINE";

/// In a pull directory: the manifest digest the last pull resolved the reference to.
const PULLED_FILE: &str = "specc-pulled";

/// Where registry pulls go: `<home>/oci/pulls/<sha256 of the reference>`, an OCI layout.
pub fn pull_dir(home: &Path, reference: &str) -> PathBuf {
    home.join("oci/pulls")
        .join(hex::encode(Sha256::digest(reference.as_bytes())))
}

fn offline() -> bool {
    std::env::var_os(OFFLINE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Finds the image a `base oci=` reference names: reads a layout, or pulls a registry
/// reference (with specc-store's registry client) into [`pull_dir`] first. Blobs already in
/// the pull directory are not fetched again, but the registry is asked every time what the
/// tag names now, unless [`OFFLINE_ENV`] is set.
pub fn open(home: &Path, reference: &str, progress: &dyn Fn(&str)) -> Result<OciImage, OciError> {
    open_with(home, reference, offline(), progress)
}

fn open_with(
    home: &Path,
    reference: &str,
    offline: bool,
    progress: &dyn Fn(&str),
) -> Result<OciImage, OciError> {
    match ImageRef::parse(reference)? {
        ImageRef::Layout { dir, selector } => Layout::open(&dir)?.resolve(&selector),
        ImageRef::Registry(r) => {
            let dir = pull_dir(home, &r);
            let digest = if offline {
                let p = dir.join(PULLED_FILE);
                match fs::read_to_string(&p) {
                    Ok(d) => d.trim().to_owned(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(OciError::NotPulled { reference: r });
                    }
                    Err(e) => return Err(io_err("reading", &p)(e)),
                }
            } else {
                progress(&format!("pulling {r} ({PLATFORM}) into {}", dir.display()));
                pull(&r, &dir)?
            };
            Layout::open(&dir)?.resolve(&Selector::Digest(digest))
        }
    }
}

/// Pulls a registry image into the layout directory `dest`; returns the manifest digest.
/// Concurrent pulls of one reference serialize on `<dest>.lock`.
fn pull(reference: &str, dest: &Path) -> Result<String, OciError> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    let lock_path = dest.with_extension("lock");
    let _lock = crate::lock::FileLock::acquire(&lock_path)
        .map_err(|(what, e)| io_err(what, &lock_path)(e))?;
    let pulled = specc_store::registry::pull_image(
        reference,
        dest,
        PLATFORM,
        &specc_store::registry::Options::default(),
    )
    .map_err(|source| OciError::Pull {
        reference: reference.to_owned(),
        source,
    })?;
    let digest = pulled.manifest.digest().to_string();
    let tmp = dest.join(format!(".{PULLED_FILE}.tmp"));
    fs::write(&tmp, format!("{digest}\n")).map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, dest.join(PULLED_FILE)).map_err(io_err("renaming", &tmp))?;
    Ok(digest)
}

/// How the agent was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentInstall {
    /// As PID 1: `/sbin/init -> specc-agent`.
    Init,
    /// As `specc-agent.service` under the image's systemd.
    Systemd,
}

/// Whether the image boots systemd: `/sbin/init` resolves (inside the image) to a file named
/// `systemd`.
fn has_systemd(tree: &Tree) -> Result<bool, UnpackError> {
    Ok(tree
        .lookup("/sbin/init")?
        .is_some_and(|(rel, m)| m.is_file() && rel.file_name().is_some_and(|n| n == "systemd")))
}

/// Installs the agent into an unpacked image the way the other bases have it: PID 1 (like
/// busybox) unless the image boots systemd, then a systemd unit (like debian).
pub fn install_agent(tree: &mut Tree, opts: &RootfsOptions) -> Result<AgentInstall, UnpackError> {
    let agent = fs::read(&opts.agent_path).map_err(|source| UnpackError::Io {
        what: "reading the agent",
        path: opts.agent_path.clone(),
        source,
    })?;
    for (d, mode) in [
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/etc", 0o755),
        ("/root", 0o700),
    ] {
        tree.ensure_dir(d, mode)?;
    }
    // The kernel opens the console for init before anything mounts devtmpfs.
    tree.ensure_char_device("/dev/console", 5, 1, 0o600)?;
    tree.ensure_char_device("/dev/null", 1, 3, 0o666)?;
    tree.put_file("/etc/hostname", b"specc\n", 0o644)?;
    for (path, content, mode) in [
        ("/etc/passwd", rootfs::PASSWD, 0o644),
        ("/etc/group", rootfs::GROUP, 0o644),
        ("/etc/hosts", rootfs::HOSTS, 0o644),
    ] {
        if tree.lookup(path)?.is_none() {
            tree.put_file(path, content.as_bytes(), mode)?;
        }
    }
    if has_systemd(tree)? {
        tree.put_file(rootfs::AGENT_DEBIAN_PATH, &agent, 0o755)?;
        tree.put_file(
            "/etc/systemd/system/specc-agent.service",
            rootfs::AGENT_UNIT.as_bytes(),
            0o644,
        )?;
        tree.put_symlink(
            "/etc/systemd/system/multi-user.target.wants/specc-agent.service",
            "/etc/systemd/system/specc-agent.service",
        )?;
        for unit_dir in ["/lib/systemd/system", "/usr/lib/systemd/system"] {
            let unit = format!("{unit_dir}/systemd-networkd.service");
            if tree.lookup(&unit)?.is_some() {
                tree.put_symlink(
                    "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
                    &unit,
                )?;
                tree.put_file(
                    "/etc/systemd/network/80-specc-dhcp.network",
                    rootfs::DHCP_NETWORK.as_bytes(),
                    0o644,
                )?;
                break;
            }
        }
        tree.put_file("/etc/machine-id", b"", 0o444)?;
        Ok(AgentInstall::Systemd)
    } else {
        tree.ensure_dir("/sbin", 0o755)?;
        tree.put_file(rootfs::AGENT_GUEST_PATH, &agent, 0o755)?;
        tree.put_symlink("/sbin/init", "specc-agent")?;
        Ok(AgentInstall::Init)
    }
}

/// Builds the staging tree of an OCI base in `staging` (inside the builder's temporary
/// directory `out`, where the image config is kept as [`CONFIG_FILE`]).
pub(crate) fn stage(
    image: &OciImage,
    out: &Path,
    staging: &Path,
    opts: &RootfsOptions,
    progress: &dyn Fn(&str),
) -> Result<(), OciError> {
    let started = Instant::now();
    let cfg = out.join(CONFIG_FILE);
    fs::write(&cfg, &image.config_json).map_err(io_err("writing", &cfg))?;
    let mut tree = Tree::create(staging, opts.disk_bytes).map_err(OciError::Tree)?;
    let report = image.unpack_into(&mut tree, progress)?;
    let how = install_agent(&mut tree, opts).map_err(OciError::Install)?;
    tree.finish().map_err(OciError::Install)?;
    progress(&format!(
        "{} layers unpacked ({} entries, {} files, {} bytes, {} whiteouts) in {:.2} s; agent as {}",
        report.layers,
        report.totals.entries,
        report.totals.files,
        report.totals.bytes,
        report.totals.whiteouts,
        started.elapsed().as_secs_f64(),
        match how {
            AgentInstall::Init => "PID 1",
            AgentInstall::Systemd => "a systemd service",
        }
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde_json::json;

    use super::unpack::tests::{E, snapshot, tar_of};
    use super::*;
    use crate::rootfs::{Base, RootfsError, ensure_rootfs_in};

    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    const OCI_TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    const DOCKER_TGZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut e, bytes).unwrap();
        e.finish().unwrap()
    }

    /// An image layout being written by a test.
    struct TestLayout {
        dir: PathBuf,
    }

    impl TestLayout {
        fn new(dir: &Path) -> TestLayout {
            fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
            fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
            TestLayout {
                dir: dir.to_owned(),
            }
        }

        fn blob(&self, bytes: &[u8]) -> (String, u64) {
            let d = sha(bytes);
            fs::write(
                self.dir
                    .join("blobs/sha256")
                    .join(d.trim_start_matches("sha256:")),
                bytes,
            )
            .unwrap();
            (d, bytes.len() as u64)
        }

        fn blob_path(&self, digest: &str) -> PathBuf {
            self.dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:"))
        }

        /// A manifest over `layers` (media type, compressed bytes, uncompressed tar); returns
        /// its descriptor as JSON.
        fn image(
            &self,
            manifest_type: &str,
            config_type: &str,
            arch: &str,
            layers: &[(&str, Vec<u8>, Vec<u8>)],
        ) -> serde_json::Value {
            let diff_ids: Vec<String> = layers.iter().map(|(_, _, tar)| sha(tar)).collect();
            let config = serde_json::to_vec(&json!({
                "architecture": arch,
                "os": "linux",
                "config": {
                    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
                    "WorkingDir": "/srv",
                    "User": "1234:5678",
                    "Entrypoint": ["/usr/bin/tool"],
                    "Cmd": ["--serve"]
                },
                "rootfs": { "type": "layers", "diff_ids": diff_ids }
            }))
            .unwrap();
            let (cd, cs) = self.blob(&config);
            let layer_descs: Vec<serde_json::Value> = layers
                .iter()
                .map(|(mt, bytes, _)| {
                    let (d, s) = self.blob(bytes);
                    json!({ "mediaType": mt, "digest": d, "size": s })
                })
                .collect();
            let manifest = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": { "mediaType": config_type, "digest": cd, "size": cs },
                "layers": layer_descs
            }))
            .unwrap();
            let (md, ms) = self.blob(&manifest);
            json!({ "mediaType": manifest_type, "digest": md, "size": ms })
        }

        fn nested_index(
            &self,
            list_type: &str,
            entries: &[serde_json::Value],
        ) -> serde_json::Value {
            let index = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": list_type,
                "manifests": entries
            }))
            .unwrap();
            let (d, s) = self.blob(&index);
            json!({ "mediaType": list_type, "digest": d, "size": s })
        }

        fn index(&self, entries: &[serde_json::Value]) {
            fs::write(
                self.dir.join("index.json"),
                serde_json::to_vec(&json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": entries
                }))
                .unwrap(),
            )
            .unwrap();
        }
    }

    fn tagged(mut desc: serde_json::Value, tag: &str) -> serde_json::Value {
        desc["annotations"] = json!({ ANNOTATION_REF_NAME: tag });
        desc
    }

    fn with_platform(mut desc: serde_json::Value, arch: &str) -> serde_json::Value {
        desc["platform"] = json!({ "architecture": arch, "os": "linux" });
        desc
    }

    fn f(p: &str, c: &str) -> E {
        E::File(p.into(), c.as_bytes().to_vec())
    }

    /// The three layers of the end-to-end image: files, then whiteouts and an opaque
    /// directory, then an uncompressed layer writing through a symlink.
    fn three_layers() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
        let busybox = fs::read("/bin/busybox").expect("busybox-static provides /bin/busybox");
        let mut first = vec![
            E::Dir("etc/".into()),
            f("etc/os-release", "ID=speccos\nVERSION=1\n"),
            E::Dir("usr/".into()),
            E::Dir("usr/bin/".into()),
            E::Owned("usr/bin/tool".into(), busybox, 0, 0, 0o4755),
            E::Hardlink("usr/bin/tool-again".into(), "usr/bin/tool".into()),
            E::Symlink("bin".into(), "usr/bin".into()),
            E::Dir("sbin/".into()),
            f("sbin/init", "#!/bin/sh\nexec /bin/sh\n"),
            E::Dir("data/".into()),
            f("data/removed", "old"),
            E::Owned("data/owned".into(), b"theirs".to_vec(), 1234, 5678, 0o640),
            E::Dir("data/keep/".into()),
            f("data/keep/k", "k"),
            E::Dir("opaque/".into()),
            f("opaque/old", "old"),
            E::Dir("opaque/sub/".into()),
            f("opaque/sub/deep", "deep"),
            E::Dir("srv/".into()),
            E::Dir("srv/many/".into()),
            E::Char("dev/zero".into(), 1, 5),
            E::Pax(
                "usr/bin/ping".into(),
                b"elf".to_vec(),
                vec![
                    ("SCHILY.xattr.user.specc", b"kept".to_vec()),
                    ("SCHILY.xattr.trusted.overlay.opaque", b"y".to_vec()),
                    ("uid", b"3000000".to_vec()),
                ],
            ),
        ];
        // Some bulk, so the timings mean something.
        let page = vec![b'x'; 4096];
        for i in 0..400 {
            first.push(E::File(format!("srv/many/f{i:03}"), page.clone()));
        }
        let second = vec![
            f("data/.wh.removed", ""),
            f("opaque/.wh..wh..opq", ""),
            f("opaque/new", "new"),
            f("etc/os-release", "ID=speccos\nVERSION=2\n"),
        ];
        let third = vec![
            f("bin/through-link", "via the symlink"),
            f(".wh.never-existed", ""),
            f("data/keep/.wh.k", ""),
        ];
        let (t1, t2, t3) = (tar_of(&first), tar_of(&second), tar_of(&third));
        vec![
            (OCI_TGZ, gzip(&t1), t1),
            (OCI_TGZ, gzip(&t2), t2),
            (OCI_TAR, t3.clone(), t3),
        ]
    }

    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs) must be installed");
        assert!(out.status.success(), "debugfs {request}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ls_names(image: &Path, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = debugfs(image, &format!("ls {dir}"))
            .split_whitespace()
            .filter(|t| !t.starts_with('(') && t.parse::<u64>().is_err())
            .filter(|t| *t != "." && *t != "..")
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// A static ELF standing in for the agent (busybox-static is one).
    fn fake_agent(dir: &Path) -> PathBuf {
        let p = dir.join("fake-agent");
        fs::copy("/bin/busybox", &p).expect("busybox-static provides /bin/busybox");
        p
    }

    fn opts(dir: &Path) -> RootfsOptions {
        RootfsOptions {
            disk_bytes: 64 << 20,
            agent_path: fake_agent(dir),
        }
    }

    #[test]
    fn three_layer_image_renders_to_ext4_with_whiteouts_owners_links_and_the_agent() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let desc = layout.image(OCI_MANIFEST, OCI_CONFIG, "amd64", &three_layers());
        let manifest_digest = desc["digest"].as_str().unwrap().to_owned();
        layout.index(&[tagged(desc, "v1")]);
        let home = tmp.path().join("home");
        let opts = opts(tmp.path());
        let base = Base::Oci {
            reference: format!("oci-layout:{}:v1", layout.dir.display()),
        };
        let started = Instant::now();
        let img = ensure_rootfs_in(&home, &base, &opts, &|m| eprintln!("rootfs: {m}")).unwrap();
        eprintln!(
            "three-layer image: unpack + mkfs + e2fsck + digest in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert!(img.built);
        let e2fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img.path)
            .output()
            .unwrap();
        assert!(e2fsck.status.success(), "{e2fsck:?}");
        let p = &img.path;

        assert_eq!(ls_names(p, "/data"), ["keep", "owned"]);
        assert!(ls_names(p, "/data/keep").is_empty());
        assert_eq!(ls_names(p, "/opaque"), ["new"]);
        assert_eq!(debugfs(p, "cat /etc/os-release"), "ID=speccos\nVERSION=2\n");
        let owned = debugfs(p, "stat /data/owned");
        assert!(owned.contains("User:  1234   Group:  5678"), "{owned}");
        assert!(owned.contains("Mode:  0640"), "{owned}");
        let tool = debugfs(p, "stat /usr/bin/tool");
        assert!(
            tool.contains("Mode:  04755") && tool.contains("Links: 2"),
            "{tool}"
        );
        let inode = |s: &str| s.split_whitespace().nth(1).unwrap().to_owned();
        assert_eq!(inode(&tool), inode(&debugfs(p, "stat /usr/bin/tool-again")));
        assert_eq!(
            debugfs(p, "cat /usr/bin/through-link"),
            "via the symlink",
            "written through bin -> usr/bin"
        );
        let bin = debugfs(p, "stat /bin");
        assert!(
            bin.contains("Type: symlink") && bin.contains("\"usr/bin\""),
            "{bin}"
        );
        assert_eq!(ls_names(p, "/srv/many").len(), 400);
        let zero = debugfs(p, "stat /dev/zero");
        assert!(zero.contains("Type: character special"), "{zero}");
        let ping = debugfs(p, "stat /usr/bin/ping");
        assert!(ping.contains("User: 3000000"), "PAX uid: {ping}");
        let xattrs = debugfs(p, "ea_list /usr/bin/ping");
        assert!(
            xattrs.contains("user.specc") && xattrs.contains("kept"),
            "{xattrs}"
        );
        assert!(!xattrs.contains("trusted."), "{xattrs}");

        // The agent as PID 1, where the busybox builder puts it.
        let init = debugfs(p, "stat /sbin/init");
        assert!(
            init.contains("Type: symlink") && init.contains("\"specc-agent\""),
            "{init}"
        );
        let agent = debugfs(p, "stat /sbin/specc-agent");
        assert!(
            agent.contains("Mode:  0755") && agent.contains("User:     0"),
            "{agent}"
        );
        let console = debugfs(p, "stat /dev/console");
        assert!(console.contains("Type: character special"), "{console}");
        assert_eq!(debugfs(p, "cat /etc/hostname"), "specc\n");
        assert!(debugfs(p, "cat /etc/passwd").starts_with("root:x:0:0:"));
        for d in ["proc", "sys", "run", "tmp", "dev"] {
            assert!(ls_names(p, "/").contains(&d.to_owned()), "/{d} missing");
        }

        // The config comes back with the image, also from the cache.
        let cfg = img
            .oci_config()
            .unwrap()
            .expect("an OCI image has a config");
        assert_eq!(cfg.working_dir.as_deref(), Some("/srv"));
        assert_eq!(cfg.env[1], "LANG=C.UTF-8");
        assert_eq!(cfg.user.as_deref(), Some("1234:5678"));
        assert_eq!(
            (cfg.entrypoint, cfg.cmd),
            (vec!["/usr/bin/tool".to_owned()], vec!["--serve".to_owned()])
        );
        let inputs = fs::read_to_string(img.path.parent().unwrap().join("inputs")).unwrap();
        assert!(
            inputs.contains(&format!("oci-manifest={manifest_digest}")),
            "{inputs}"
        );

        let again = ensure_rootfs_in(&home, &base, &opts, &|_| {}).unwrap();
        assert!(!again.built);
        assert_eq!(again.digest, img.digest);
        // The same image by digest and by plain path is the same cache entry.
        let by_digest = Base::Oci {
            reference: format!("{}@{manifest_digest}", layout.dir.display()),
        };
        let same = ensure_rootfs_in(&home, &by_digest, &opts, &|_| {}).unwrap();
        assert_eq!((same.built, same.key), (false, img.key));
    }

    #[test]
    fn docker_manifest_lists_resolve_to_linux_amd64_and_unpack() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let arm_tar = tar_of(&[f("arch", "arm64")]);
        let amd_tar = tar_of(&[f("arch", "amd64"), E::Dir("etc/".into())]);
        let arm = layout.image(
            DOCKER_MANIFEST,
            DOCKER_CONFIG,
            "arm64",
            &[(DOCKER_TGZ, gzip(&arm_tar), arm_tar)],
        );
        let amd = layout.image(
            DOCKER_MANIFEST,
            DOCKER_CONFIG,
            "amd64",
            &[(DOCKER_TGZ, gzip(&amd_tar), amd_tar)],
        );
        let amd_digest = amd["digest"].as_str().unwrap().to_owned();
        let list = layout.nested_index(
            DOCKER_LIST,
            &[with_platform(arm, "arm64"), with_platform(amd, "amd64")],
        );
        layout.index(&[tagged(list, "latest")]);
        let image = Layout::open(&layout.dir)
            .unwrap()
            .resolve(&Selector::Default)
            .unwrap();
        assert_eq!(image.manifest_digest, amd_digest);
        assert_eq!(image.layers[0].compression, Compression::Gzip);
        let mut tree = Tree::create(&tmp.path().join("root"), 1 << 20).unwrap();
        let report = image.unpack_into(&mut tree, &|_| {}).unwrap();
        assert_eq!((report.layers, report.totals.files), (1, 1));
        assert_eq!(
            fs::read_to_string(tree.root().join("arch")).unwrap(),
            "amd64"
        );

        // Only arm64: refused, naming what there is.
        let arm_only = TestLayout::new(&tmp.path().join("arm"));
        let t = tar_of(&[f("x", "y")]);
        let m = arm_only.image(
            OCI_MANIFEST,
            OCI_CONFIG,
            "arm64",
            &[(OCI_TAR, t.clone(), t)],
        );
        let idx = arm_only.nested_index(OCI_INDEX, &[with_platform(m, "arm64")]);
        arm_only.index(&[idx]);
        let err = Layout::open(&arm_only.dir)
            .unwrap()
            .resolve(&Selector::Default)
            .unwrap_err();
        assert!(
            matches!(&err, OciError::NoPlatform { found, .. } if found == "linux/arm64"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_or_truncated_blobs_are_refused_naming_the_blob_and_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let layers = three_layers();
        let layer0 = sha(&layers[0].1);
        let desc = layout.image(OCI_MANIFEST, OCI_CONFIG, "amd64", &layers);
        let manifest: serde_json::Value = serde_json::from_slice(
            &fs::read(layout.blob_path(desc["digest"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
        layout.index(&[desc]);
        let home = tmp.path().join("home");
        let opts = opts(tmp.path());
        let base = Base::Oci {
            reference: layout.dir.display().to_string(),
        };
        let blob = layout.blob_path(&layer0);
        let good = fs::read(&blob).unwrap();

        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        fs::write(&blob, &bad).unwrap();
        let err = ensure_rootfs_in(&home, &base, &opts, &|_| {}).unwrap_err();
        assert!(
            matches!(&err, RootfsError::Oci(OciError::BlobCorrupt { digest, .. }) if *digest == layer0),
            "{err}"
        );
        assert!(err.to_string().contains(&layer0), "{err}");

        fs::write(&blob, &good[..good.len() - 1]).unwrap();
        let err = ensure_rootfs_in(&home, &base, &opts, &|_| {}).unwrap_err();
        assert!(
            err.to_string().contains("bytes, its descriptor says"),
            "{err}"
        );

        let leftovers: Vec<_> = fs::read_dir(home.join("rootfs"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // With the layer repaired, a tampered config (same size) is caught while resolving.
        fs::write(&blob, &good).unwrap();
        let l = Layout::open(&layout.dir).unwrap();
        assert_eq!(l.resolve(&Selector::Default).unwrap().layers.len(), 3);
        let config = layout.blob_path(&config_digest);
        let text = fs::read_to_string(&config).unwrap();
        fs::write(&config, text.replace("/srv", "/tmp")).unwrap();
        let err = l.resolve(&Selector::Default).unwrap_err();
        assert!(
            matches!(&err, OciError::BlobCorrupt { digest, .. } if *digest == config_digest),
            "{err}"
        );
    }

    #[test]
    fn a_layer_whose_tar_differs_from_its_diff_id_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let t = tar_of(&[f("a", "1")]);
        let other = tar_of(&[f("a", "2")]);
        // The blob is consistent with its descriptor, but not with the config's diff_id.
        let desc = layout.image(
            OCI_MANIFEST,
            OCI_CONFIG,
            "amd64",
            &[(OCI_TGZ, gzip(&other), t)],
        );
        layout.index(&[desc]);
        let image = Layout::open(&layout.dir)
            .unwrap()
            .resolve(&Selector::Default)
            .unwrap();
        let mut tree = Tree::create(&tmp.path().join("root"), 1 << 20).unwrap();
        let err = image.unpack_into(&mut tree, &|_| {}).unwrap_err();
        assert!(
            matches!(&err, OciError::BlobCorrupt { why, .. } if why.contains("diff_id")),
            "{err}"
        );
    }

    fn zstd(bytes: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
    }

    #[test]
    fn zstd_layers_of_several_frames_and_skippable_frames_unpack() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let t = tar_of(&[f("a", "1"), E::File("big".into(), big.clone()), f("z", "2")]);
        // As zstd:chunked writes them: several frames, with a skippable frame between.
        let (head, rest) = t.split_at(1536);
        let mut blob = zstd(head);
        blob.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        blob.extend_from_slice(&5u32.to_le_bytes());
        blob.extend_from_slice(b"skip!");
        blob.extend_from_slice(&zstd(rest));
        let desc = layout.image(
            OCI_MANIFEST,
            OCI_CONFIG,
            "amd64",
            &[("application/vnd.oci.image.layer.v1.tar+zstd", blob, t)],
        );
        layout.index(&[desc]);
        let image = Layout::open(&layout.dir)
            .unwrap()
            .resolve(&Selector::Default)
            .unwrap();
        assert_eq!(image.layers[0].compression, Compression::Zstd);
        let mut tree = Tree::create(&tmp.path().join("root"), 1 << 20).unwrap();
        image.unpack_into(&mut tree, &|_| {}).unwrap();
        assert_eq!(fs::read(tree.root().join("big")).unwrap(), big);
        assert_eq!(fs::read_to_string(tree.root().join("z")).unwrap(), "2");
    }

    #[test]
    fn unknown_layer_types_and_traversing_entries_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let t = tar_of(&[f("a", "1")]);
        let desc = layout.image(
            OCI_MANIFEST,
            OCI_CONFIG,
            "amd64",
            &[("application/vnd.example.layer.v1.tar+lz4", t.clone(), t)],
        );
        layout.index(&[desc]);
        let err = Layout::open(&layout.dir)
            .unwrap()
            .resolve(&Selector::Default)
            .unwrap_err();
        assert!(
            matches!(&err, OciError::Unsupported(m) if m.contains("lz4")),
            "{err}"
        );

        let evil = TestLayout::new(&tmp.path().join("evil"));
        let t = tar_of(&[f("etc/../../../escaped", "x")]);
        let desc = evil.image(
            OCI_MANIFEST,
            OCI_CONFIG,
            "amd64",
            &[(OCI_TAR, t.clone(), t)],
        );
        evil.index(&[desc]);
        let image = Layout::open(&evil.dir)
            .unwrap()
            .resolve(&Selector::Default)
            .unwrap();
        let mut tree = Tree::create(&tmp.path().join("root"), 1 << 20).unwrap();
        let err = image.unpack_into(&mut tree, &|_| {}).unwrap_err();
        assert!(
            matches!(
                &err,
                OciError::Layer {
                    index: 0,
                    source: UnpackError::Traversal { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(!tmp.path().join("escaped").exists());
    }

    #[test]
    fn tags_and_digests_select_images_and_ambiguity_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let ta = tar_of(&[f("which", "a")]);
        let tb = tar_of(&[f("which", "b")]);
        let a = layout.image(
            OCI_MANIFEST,
            OCI_CONFIG,
            "amd64",
            &[(OCI_TAR, ta.clone(), ta)],
        );
        let b = layout.image(
            OCI_MANIFEST,
            OCI_CONFIG,
            "amd64",
            &[(OCI_TAR, tb.clone(), tb)],
        );
        let b_digest = b["digest"].as_str().unwrap().to_owned();
        layout.index(&[tagged(a.clone(), "a"), tagged(b.clone(), "b")]);
        let l = Layout::open(&layout.dir).unwrap();
        let err = l.resolve(&Selector::Default).unwrap_err();
        assert!(matches!(err, OciError::Ambiguous { .. }), "{err}");
        assert!(
            err.to_string().contains(":a (") && err.to_string().contains(":b ("),
            "{err}"
        );
        assert_eq!(
            l.resolve(&Selector::Tag("b".into()))
                .unwrap()
                .manifest_digest,
            b_digest
        );
        assert_eq!(
            l.resolve(&Selector::Digest(b_digest.clone()))
                .unwrap()
                .manifest_digest,
            b_digest
        );
        let err = l.resolve(&Selector::Tag("c".into())).unwrap_err();
        assert!(matches!(err, OciError::NoSuchImage { .. }), "{err}");
        // With a `latest` among several, the default is `latest`.
        layout.index(&[tagged(a, "a"), tagged(b, "latest")]);
        assert_eq!(
            l.resolve(&Selector::Default).unwrap().manifest_digest,
            b_digest
        );
    }

    #[test]
    fn references_parse_into_layouts_and_registries() {
        let tmp = tempfile::tempdir().unwrap();
        let existing = tmp.path().join("has:colon");
        fs::create_dir(&existing).unwrap();
        let parse = |s: &str| ImageRef::parse(s).unwrap();
        assert_eq!(
            parse("oci-layout:/img/alpine:3.19"),
            ImageRef::Layout {
                dir: "/img/alpine".into(),
                selector: Selector::Tag("3.19".into())
            }
        );
        assert_eq!(
            parse("/img/alpine"),
            ImageRef::Layout {
                dir: "/img/alpine".into(),
                selector: Selector::Default
            }
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            parse(&format!("./x.d/img@{d}")),
            ImageRef::Layout {
                dir: "./x.d/img".into(),
                selector: Selector::Digest(d.clone())
            }
        );
        // A directory that exists is never split at its colon.
        assert_eq!(
            parse(&existing.display().to_string()),
            ImageRef::Layout {
                dir: existing.clone(),
                selector: Selector::Default
            }
        );
        assert_eq!(
            parse("localhost:5000/specc/base:1"),
            ImageRef::Registry("localhost:5000/specc/base:1".into())
        );
        for bad in [
            "",
            "oci-layout:",
            "alpine",
            "library/alpine:3",
            "/img@sha256:zz",
            "a b/c",
            "oci-layout::tag",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(
            parse("./img:t").relative_to(Path::new("/specs")),
            ImageRef::Layout {
                dir: "/specs/./img".into(),
                selector: Selector::Tag("t".into())
            }
        );
        assert_eq!(
            parse("oci-layout:/a/b:t").to_reference(),
            "oci-layout:/a/b:t"
        );
    }

    /// Debian's `docker-registry` on a free loopback port, killed on drop.
    struct Registry {
        child: std::process::Child,
        port: u16,
        dir: tempfile::TempDir,
    }

    impl Registry {
        fn start() -> Registry {
            let bin = "/usr/bin/docker-registry";
            assert!(
                Path::new(bin).is_file(),
                "{bin} is missing: install Debian's docker-registry (testsuite/scripts/setup-host.sh does)"
            );
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            let log = File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(bin)
                .arg("serve")
                .arg(&config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(std::process::Stdio::null())
                .spawn()
                .expect("starting docker-registry");
            let mut reg = Registry { child, port, dir };
            let deadline = Instant::now() + std::time::Duration::from_secs(60);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(st) = reg.child.try_wait().unwrap() {
                    panic!("docker-registry exited ({st}): {}", reg.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "docker-registry never listened: {}",
                    reg.log()
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            reg
        }

        fn log(&self) -> String {
            fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
        }
    }

    impl Drop for Registry {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn registry_images_are_pulled_into_a_layout_and_built() {
        let reg = Registry::start();
        let tmp = tempfile::tempdir().unwrap();
        let layout = TestLayout::new(&tmp.path().join("layout"));
        let desc = layout.image(OCI_MANIFEST, OCI_CONFIG, "amd64", &three_layers());
        let manifest_digest = desc["digest"].as_str().unwrap().to_owned();
        layout.index(&[tagged(desc, "v1")]);
        let reference = format!("127.0.0.1:{}/specc/three:v1", reg.port);
        let pushed = specc_store::registry::push(
            &layout.dir,
            &reference,
            &specc_store::registry::Options::default(),
        )
        .unwrap_or_else(|e| panic!("push: {e:?}\n{}", reg.log()));
        assert_eq!(pushed.manifest_digest, manifest_digest);

        let home = tmp.path().join("home");
        let opts = opts(tmp.path());
        let base = Base::Oci {
            reference: reference.clone(),
        };
        let img = ensure_rootfs_in(&home, &base, &opts, &|m| eprintln!("rootfs: {m}"))
            .unwrap_or_else(|e| panic!("{e:?}\n{}", reg.log()));
        assert!(img.built);
        assert_eq!(ls_names(&img.path, "/opaque"), ["new"]);
        assert_eq!(
            debugfs(&img.path, "cat /etc/os-release"),
            "ID=speccos\nVERSION=2\n"
        );
        let inputs = fs::read_to_string(img.path.parent().unwrap().join("inputs")).unwrap();
        assert!(
            inputs.contains(&format!("oci-manifest={manifest_digest}")),
            "{inputs}"
        );
        let pulled = pull_dir(&home, &reference);
        assert!(pulled.join("index.json").is_file());

        // The same image from the local layout is the same cache entry.
        let local = Base::Oci {
            reference: format!("oci-layout:{}:v1", layout.dir.display()),
        };
        let same = ensure_rootfs_in(&home, &local, &opts, &|_| {}).unwrap();
        assert_eq!((same.built, &same.key), (false, &img.key));

        // Offline (inside the rig), the last pull is used without the registry.
        drop(reg);
        let image = open_with(&home, &reference, true, &|_| {}).unwrap();
        assert_eq!(image.manifest_digest, manifest_digest);
        let err = open(&home, &reference, &|_| {}).unwrap_err();
        assert!(matches!(err, OciError::Pull { .. }), "{err}");
        let err = open_with(&home, "127.0.0.1:1/specc/never:1", true, &|_| {}).unwrap_err();
        assert!(matches!(err, OciError::NotPulled { .. }), "{err}");
    }

    #[test]
    fn an_unreachable_registry_is_one_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = open_with(tmp.path(), "127.0.0.1:1/specc/base:1", false, &|_| {}).unwrap_err();
        assert!(matches!(err, OciError::Pull { .. }), "{err}");
        assert!(
            err.to_string().contains("127.0.0.1:1/specc/base:1"),
            "{err}"
        );
    }

    #[test]
    fn systemd_images_get_the_agent_as_a_unit() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tree = Tree::create(&tmp.path().join("root"), 1 << 20).unwrap();
        tree.apply_layer(
            tar_of(&[
                E::Symlink("sbin".into(), "usr/sbin".into()),
                E::Symlink("lib".into(), "usr/lib".into()),
                E::Owned(
                    "usr/lib/systemd/systemd".into(),
                    b"elf".to_vec(),
                    0,
                    0,
                    0o755,
                ),
                f(
                    "usr/lib/systemd/system/systemd-networkd.service",
                    "[Unit]\n",
                ),
                E::Symlink("usr/sbin/init".into(), "../lib/systemd/systemd".into()),
            ])
            .as_slice(),
        )
        .unwrap();
        let how = install_agent(&mut tree, &opts(tmp.path())).unwrap();
        assert_eq!(how, AgentInstall::Systemd);
        let s = snapshot(tree.root());
        assert_eq!(
            s["usr/sbin/init"], "link:../lib/systemd/systemd",
            "init left alone"
        );
        assert!(s["usr/local/sbin/specc-agent"].starts_with("file:"));
        assert!(
            s["etc/systemd/system/specc-agent.service"]
                .contains("ExecStart=/usr/local/sbin/specc-agent")
        );
        assert_eq!(
            s["etc/systemd/system/multi-user.target.wants/systemd-networkd.service"],
            "link:/lib/systemd/system/systemd-networkd.service"
        );
        assert_eq!(s["etc/machine-id"], "file:");

        // Without systemd, on a merged /usr: the agent lands in /usr/sbin through /sbin.
        let mut plain = Tree::create(&tmp.path().join("plain"), 1 << 20).unwrap();
        plain
            .apply_layer(tar_of(&[E::Symlink("sbin".into(), "usr/sbin".into())]).as_slice())
            .unwrap();
        assert_eq!(
            install_agent(&mut plain, &opts(tmp.path())).unwrap(),
            AgentInstall::Init
        );
        let s = snapshot(plain.root());
        assert_eq!(s["usr/sbin/init"], "link:specc-agent");
        assert!(s["usr/sbin/specc-agent"].starts_with("file:"));
        assert_eq!(s["sbin"], "link:usr/sbin");
    }
}
