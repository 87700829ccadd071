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
use std::sync::Arc;

pub use ir::{Digest, Spec};
use specc_syntax::{Diagnostic, Files};

/// Explicit inputs of the cache keys, given by hand (`--kernel-digest`, `--base-digest`); they
/// win over a [`KeyResolver`]. `None` means: ask the resolver, or without one use the digest
/// of a canonical description ([`key::default_kernel_digest`], [`key::default_base_digest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOverrides {
    /// Digest of the default guest kernel (a spec's own `vm kernel=` file is hashed instead).
    pub kernel: Option<Digest>,
    /// Digest of the root filesystem of a `scratch`, `busybox`, `debian` or `oci` base (a
    /// `base spec=` is keyed by the base spec's head layer).
    pub base: Option<Digest>,
}

/// The key inputs that only the guest kit can compute: digests of what the default kernel and
/// each root filesystem are made from. `specc` implements it (compiler/specc/src/cmd/common.rs)
/// so `plan`, `build` and `run` key layers alike.
pub trait KeyInputs: Send + Sync {
    /// The digest of everything the default guest kernel is built from.
    fn kernel(&self) -> Result<Digest, String>;
    /// The digest of everything the root filesystem of `base` (never [`ir::Base::Spec`]) is
    /// made from, for a disk of `disk_bytes`; `spec_dir` is the directory of the spec that
    /// names the base (a relative OCI layout path is relative to it).
    fn rootfs(&self, base: &ir::Base, spec_dir: &Path, disk_bytes: u64) -> Result<Digest, String>;
}

/// A shared [`KeyInputs`].
#[derive(Clone)]
pub struct KeyResolver(pub Arc<dyn KeyInputs>);

impl std::fmt::Debug for KeyResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyResolver")
    }
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
    /// Computes the kernel and root filesystem digests that [`Options::keys`] leaves open.
    pub resolver: Option<KeyResolver>,
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

/// What compiling recorded besides the [`Compilation`], for the plan cache.
pub(crate) struct Recorded {
    pub(crate) inputs: Inputs,
    pub(crate) trees: Hashed,
    pub(crate) kernels: Hashed,
    pub(crate) resolved: Vec<(plancache::Resolved, Digest)>,
}

pub(crate) fn compile_str_recording(
    path: &Path,
    text: &str,
    opts: &Options,
) -> (Compilation, Recorded) {
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
    let rec = Recorded {
        inputs: lowerer.inputs,
        trees: lowerer.trees,
        kernels: lowerer.kernels,
        resolved: lowerer.resolved,
    };
    (c, rec)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// A resolver whose answers the test sets, counting the questions.
    #[derive(Default)]
    struct Fake {
        kernel: Mutex<Option<Digest>>,
        rootfs: Mutex<BTreeMap<String, Digest>>,
        asked: Mutex<Vec<String>>,
    }

    impl KeyInputs for Fake {
        fn kernel(&self) -> Result<Digest, String> {
            self.asked.lock().unwrap().push("kernel".into());
            self.kernel
                .lock()
                .unwrap()
                .ok_or_else(|| "no kernel source".into())
        }
        fn rootfs(&self, base: &ir::Base, _dir: &Path, disk: u64) -> Result<Digest, String> {
            let d = base.describe();
            self.asked.lock().unwrap().push(format!("{d} {disk}"));
            self.rootfs
                .lock()
                .unwrap()
                .get(&d)
                .copied()
                .ok_or_else(|| format!("cannot resolve {d}"))
        }
    }

    fn fake(kernel: u8, busybox: u8) -> Arc<Fake> {
        let f = Fake::default();
        *f.kernel.lock().unwrap() = Some(Digest([kernel; 32]));
        f.rootfs
            .lock()
            .unwrap()
            .insert("busybox".into(), Digest([busybox; 32]));
        Arc::new(f)
    }

    const SPEC: &str = "spec \"s\" {\n    base \"busybox\"\n    layer \"a\" {\n        run \"a\"\n    }\n    layer \"b\" after=\"base\" {\n        run \"b\"\n    }\n    layer \"c\" after=\"a,b\" {\n        run \"c\"\n    }\n}\n";

    fn keys(dir: &Path, text: &str, f: &Arc<Fake>) -> Vec<(String, Digest)> {
        let opts = Options {
            resolver: Some(KeyResolver(f.clone())),
            ..Options::default()
        };
        let c = compile_str(&dir.join("s.kdl"), text, &opts);
        assert!(!c.has_errors(), "{:?}", c.diagnostics);
        let spec = c.spec.expect("planned");
        spec.layers
            .iter()
            .map(|l| (l.name.clone(), l.key))
            .collect()
    }

    fn all_differ(a: &[(String, Digest)], b: &[(String, Digest)]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1 != y.1)
    }

    #[test]
    fn a_changed_kernel_or_rootfs_digest_changes_every_key_and_same_inputs_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let first = keys(dir.path(), SPEC, &fake(1, 2));
        assert_eq!(first.len(), 4, "base, a, b, c");
        assert_eq!(
            keys(dir.path(), SPEC, &fake(1, 2)),
            first,
            "same inputs, same keys"
        );
        assert!(
            all_differ(&first, &keys(dir.path(), SPEC, &fake(9, 2))),
            "kernel"
        );
        assert!(
            all_differ(&first, &keys(dir.path(), SPEC, &fake(1, 9))),
            "rootfs"
        );
        // Without a resolver the keys are those of the descriptions: different again.
        let c = compile_str(&dir.path().join("s.kdl"), SPEC, &Options::default());
        let plain: Vec<_> = c
            .spec
            .unwrap()
            .layers
            .iter()
            .map(|l| (l.name.clone(), l.key))
            .collect();
        assert!(all_differ(&first, &plain));
    }

    #[test]
    fn the_resolver_is_asked_once_per_input_and_not_for_an_own_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let f = fake(1, 2);
        keys(dir.path(), SPEC, &f);
        assert_eq!(*f.asked.lock().unwrap(), ["kernel", "busybox 2147483648"]);
        std::fs::write(dir.path().join("vmlinux"), b"my kernel").unwrap();
        let own = SPEC.replace(
            "base \"busybox\"\n",
            "base \"busybox\"\n    vm kernel=\"vmlinux\"\n",
        );
        let f2 = fake(1, 2);
        let a = keys(dir.path(), &own, &f2);
        assert_eq!(
            *f2.asked.lock().unwrap(),
            ["busybox 2147483648"],
            "the file is hashed instead"
        );
        assert_eq!(
            a,
            keys(dir.path(), &own, &fake(7, 2)),
            "so the default kernel's digest is irrelevant"
        );
    }

    #[test]
    fn a_base_spec_is_keyed_by_its_head_which_covers_its_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("parent.kdl"), SPEC).unwrap();
        let child = "spec \"child\" {\n    base spec=\"parent.kdl\"\n    layer \"d\" {\n        run \"d\"\n    }\n}\n";
        let f = fake(1, 2);
        let a = keys(dir.path(), child, &f);
        assert!(
            !f.asked
                .lock()
                .unwrap()
                .iter()
                .any(|q| q.starts_with("spec")),
            "a base spec is not a root filesystem"
        );
        assert!(all_differ(&a, &keys(dir.path(), child, &fake(1, 3))));
        assert!(all_differ(&a, &keys(dir.path(), child, &fake(4, 2))));
        assert_eq!(a, keys(dir.path(), child, &fake(1, 2)));
    }

    #[test]
    fn a_network_changes_every_key_and_no_network_keeps_the_keys_it_had() {
        let dir = tempfile::tempdir().unwrap();
        let plain = keys(dir.path(), SPEC, &fake(1, 2));
        let vm = |v: &str| {
            SPEC.replace(
                "base \"busybox\"\n",
                &format!("base \"busybox\"\n    {v}\n"),
            )
        };
        let off = keys(dir.path(), &vm("vm network=#false"), &fake(1, 2));
        assert_eq!(plain, off, "network=#false is the default");
        let on = keys(dir.path(), &vm("vm network=#true"), &fake(1, 2));
        assert!(
            all_differ(&plain, &on),
            "the device set is in every snapshot"
        );
        let c = compile_str(
            &dir.path().join("s.kdl"),
            &vm("vm network=\"yes\""),
            &Options::default(),
        );
        assert!(c.spec.is_none(), "a string is not a boolean");
    }

    #[test]
    fn each_layer_ends_with_the_env_workdir_and_user_its_children_start_from() {
        let dir = tempfile::tempdir().unwrap();
        let text = "spec \"s\" {\n    base \"busybox\"\n    env A=\"1\"\n    layer \"a\" {\n        \
                    env B=\"2\"\n        workdir \"/srv\"\n    }\n    layer \"b\" after=\"base\" {\n        \
                    user \"nobody\"\n    }\n    layer \"c\" after=\"a,b\" {\n        env A=\"3\"\n    }\n}\n";
        let c = compile_str(&dir.path().join("s.kdl"), text, &Options::default());
        let spec = c.spec.unwrap_or_else(|| panic!("{:?}", c.diagnostics));
        let ctx = |name: &str| {
            let l = spec.layers.iter().find(|l| l.name == name).unwrap();
            let env: Vec<String> = l
                .context
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            (
                env.join(" "),
                l.context.workdir.clone(),
                l.context.user.clone(),
            )
        };
        assert_eq!(ctx("base"), ("A=1".into(), "/".into(), "root".into()));
        assert_eq!(ctx("a"), ("A=1 B=2".into(), "/srv".into(), "root".into()));
        assert_eq!(ctx("b"), ("A=1".into(), "/".into(), "nobody".into()));
        // From the first parent only, as the VM continues from it.
        assert_eq!(ctx("c"), ("A=3 B=2".into(), "/srv".into(), "root".into()));
    }

    #[test]
    fn a_failing_resolver_is_an_error_not_a_made_up_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(Fake::default());
        let opts = Options {
            resolver: Some(KeyResolver(f)),
            ..Options::default()
        };
        let c = compile_str(&dir.path().join("s.kdl"), SPEC, &opts);
        assert!(c.spec.is_none());
        let msgs: Vec<&str> = c.diagnostics.iter().map(|d| d.message.as_str()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("default guest kernel: no kernel source")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("cannot resolve busybox")),
            "{msgs:?}"
        );
    }

    #[test]
    fn a_cached_plan_is_not_reused_once_the_resolver_answers_differently() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("s.kdl");
        std::fs::write(&spec, SPEC).unwrap();
        let f = fake(1, 2);
        let opts = Options {
            resolver: Some(KeyResolver(f.clone())),
            digest_cache: Some(dir.path().join("digests.json")),
            ..Options::default()
        };
        let cache = dir.path().join("plans");
        let outline = |p: plancache::Planned| match p {
            plancache::Planned::Hit(o) => (true, o),
            plancache::Planned::Fresh(c) => (false, report::Outline::of(c.spec.as_ref().unwrap())),
        };
        let (hit, a) = outline(plancache::plan(&spec, &opts, &cache).unwrap());
        assert!(!hit);
        let (hit, again) = outline(plancache::plan(&spec, &opts, &cache).unwrap());
        assert!(hit);
        assert_eq!(a, again);
        f.rootfs
            .lock()
            .unwrap()
            .insert("busybox".into(), Digest([5; 32]));
        let (hit, b) = outline(plancache::plan(&spec, &opts, &cache).unwrap());
        assert!(!hit, "the rootfs inputs changed");
        assert!(a.layers.iter().zip(&b.layers).all(|(x, y)| x.key != y.key));
        *f.kernel.lock().unwrap() = Some(Digest([6; 32]));
        let (hit, _) = outline(plancache::plan(&spec, &opts, &cache).unwrap());
        assert!(!hit, "the kernel inputs changed");
    }
}
