//! Lowering to the spec IR, validation, the layer DAG and content-addressed cache keys.
//!
//! Entry point: [`compile`] (or [`compile_str`]): a spec file in, a [`Compilation`] out, with
//! the planned [`ir::Spec`] (layers in topological order, each with its cache key) when there
//! are no errors, and every diagnostic either way.
//!
//! Unlike `specc-syntax`, this crate does I/O: it reads imported files and base specs, checks
//! and hashes copy sources, and keeps a digest cache. It never writes anywhere but the digest
//! cache file given in [`Options::digest_cache`].

#![deny(missing_docs)]

pub mod graph;
pub mod hash;
pub mod integrations;
pub mod ir;
pub mod key;
mod lower;
pub mod plancache;
pub mod report;
pub mod store;

use std::io;
use std::path::{Path, PathBuf};

pub use ir::{Digest, Spec};
use specc_syntax::{Diagnostic, Files};

/// Inputs of the cache keys that the front end cannot know itself. `None` means the default
/// digest of a canonical description ([`key::default_kernel_digest`],
/// [`key::default_base_digest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOverrides {
    /// Digest of the guest kernel the builder will boot.
    pub kernel: Option<Digest>,
    /// Digest of the base root filesystem.
    pub base: Option<Digest>,
}

/// How to compile.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--param name=value` overrides.
    pub params: Vec<(String, String)>,
    /// Directories searched for `<name>.kdl` integrations before the standard library.
    pub integration_dirs: Vec<PathBuf>,
    /// Key inputs from the driver.
    pub keys: KeyOverrides,
    /// Where to keep the file digest cache; `None` keeps it in memory for this run only.
    pub digest_cache: Option<PathBuf>,
}

impl Options {
    /// Options with the digest cache at its default place, `$SPECC_HOME/cache/file-digests-v1.json`.
    pub fn with_default_cache() -> Self {
        Options {
            digest_cache: Some(default_digest_cache()),
            ..Options::default()
        }
    }
}

/// `$SPECC_HOME/cache/file-digests-v1.json`.
pub fn default_digest_cache() -> PathBuf {
    store::specc_home()
        .join("cache")
        .join("file-digests-v1.json")
}

/// The result of compiling one spec.
#[derive(Debug)]
pub struct Compilation {
    /// Every source file read (the spec, imports, base specs, integrations), for rendering.
    pub files: Files,
    /// The planned spec, when there were no errors.
    pub spec: Option<Spec>,
    /// All diagnostics, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
    /// Files whose content was read for hashing (the rest came from the digest cache).
    pub files_hashed: usize,
}

impl Compilation {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Errors that stop compilation before there is anything to diagnose.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The spec file itself cannot be read.
    #[error("cannot read spec {}", path.display())]
    Read {
        /// The spec file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Compiles the spec at `path`.
pub fn compile(path: &Path, opts: &Options) -> Result<Compilation, CompileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CompileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(compile_str(path, &text, opts))
}

/// Compiles `text` as if it were the file at `path` (relative paths resolve against its
/// directory; diagnostics name it).
pub fn compile_str(path: &Path, text: &str, opts: &Options) -> Compilation {
    compile_str_recording(path, text, opts).0
}

/// Text files read: path and sha256 of the text, or `None` for a path probed and absent.
type Inputs = Vec<(PathBuf, Option<Digest>)>;
/// Files or trees hashed, with their digests.
type Hashed = Vec<(PathBuf, Digest)>;

pub(crate) fn compile_str_recording(
    path: &Path,
    text: &str,
    opts: &Options,
) -> (Compilation, Inputs, Hashed, Hashed) {
    let cache = match &opts.digest_cache {
        Some(p) => hash::DigestCache::load(p),
        None => hash::DigestCache::in_memory(),
    };
    let mut lowerer = lower::Lowerer::new(opts, cache);
    let spec = lowerer.lower_root(path, &path.display().to_string(), text);
    // The cache is an optimisation: failing to write it must not fail the plan.
    let _ = lowerer.digests.save();
    let mut diagnostics = lowerer.diags;
    diagnostics.sort_by_key(|d| (d.primary.file, d.primary.span.start));
    let spec = if diagnostics.iter().any(Diagnostic::is_error) {
        None
    } else {
        spec
    };
    let c = Compilation {
        files: lowerer.files,
        spec,
        diagnostics,
        files_hashed: lowerer.digests.files_read,
    };
    (c, lowerer.inputs, lowerer.trees, lowerer.kernels)
}
