//! The plan cache: a warm `specc plan` without re-parsing.
//!
//! Parsing dominates planning (the `kdl` parser reads about 1 MB/s), so a plan that succeeded
//! without diagnostics is remembered as an [`Outline`] together with everything it was made
//! from: the spec text, every imported file, base spec and integration file (by sha256 of the
//! text), every integration path that was probed and absent, every copy source (by tree digest,
//! through the digest cache, so unchanged files are only `stat`ed) and `vm kernel=` file. A
//! later plan with the same options reuses the outline only if every one of those still
//! matches, and every digest the driver's [`crate::KeyResolver`] gave (kernel and root
//! filesystem inputs) is still what it answers now; otherwise it compiles from scratch and
//! refreshes the entry. Keys are never computed from stale inputs: a hit returns exactly what a
//! fresh compile would.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::hash::{self, DigestCache};
use crate::ir::{Base, Digest};
use crate::report::Outline;
use crate::{
    Compilation, CompileError, KeyResolver, Options, Recorded, compile_str_recording, integrations,
    key,
};

/// A question a compilation asked the driver's resolver (see [`crate::KeyInputs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolved {
    /// The default guest kernel's digest.
    Kernel,
    /// The digest of a root filesystem base.
    Rootfs {
        /// `scratch`, `busybox`, `debian` or `oci`.
        kind: String,
        /// The suite or image reference (empty for the others).
        arg: String,
        /// The directory of the spec naming it.
        dir: PathBuf,
        /// The disk size.
        disk: u64,
    },
}

impl Resolved {
    /// The question for `base` (never a `base spec=`).
    pub fn rootfs(base: &Base, dir: &Path, disk: u64) -> Resolved {
        let (kind, arg) = match base {
            Base::Scratch => ("scratch", String::new()),
            Base::Busybox => ("busybox", String::new()),
            Base::Debian { suite } => ("debian", suite.clone()),
            Base::Oci { reference } => ("oci", reference.clone()),
            Base::Spec { .. } => ("spec", String::new()),
        };
        Resolved::Rootfs {
            kind: kind.to_owned(),
            arg,
            dir: dir.to_owned(),
            disk,
        }
    }

    /// Asks `resolver` this question again.
    fn ask(&self, resolver: &KeyResolver) -> Option<Digest> {
        let r = resolver.0.as_ref();
        match self {
            Resolved::Kernel => r.kernel().ok(),
            Resolved::Rootfs {
                kind,
                arg,
                dir,
                disk,
            } => {
                let base = match kind.as_str() {
                    "scratch" => Base::Scratch,
                    "busybox" => Base::Busybox,
                    "debian" => Base::Debian { suite: arg.clone() },
                    "oci" => Base::Oci {
                        reference: arg.clone(),
                    },
                    _ => return None,
                };
                r.rootfs(&base, dir, *disk).ok()
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    inputs: Vec<(PathBuf, Option<Digest>)>,
    trees: Vec<(PathBuf, Digest)>,
    kernels: Vec<(PathBuf, Digest)>,
    #[serde(default)]
    resolved: Vec<(Resolved, Digest)>,
    outline: Outline,
}

/// A plan from the cache, or a fresh compilation.
#[derive(Debug)]
pub enum Planned {
    /// Every input matched a remembered plan.
    Hit(Outline),
    /// Compiled now (and remembered, if it had no diagnostics).
    Fresh(Box<Compilation>),
}

fn entry_path(dir: &Path, path: &Path, text: &str, opts: &Options) -> PathBuf {
    let mut h = Sha256::new();
    h.update(key::FORMAT_VERSION.as_bytes());
    h.update(b"\0plan-cache-v1\0");
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    h.update(abs.as_os_str().as_encoded_bytes());
    h.update(b"\0");
    // Options and the compiled-in integrations are part of what a plan depends on.
    h.update(
        format!(
            "{:?}|{:?}|{:?}|resolver={}",
            opts.params,
            opts.integration_dirs,
            opts.keys,
            opts.resolver.is_some()
        )
        .as_bytes(),
    );
    for (name, body) in integrations::STDLIB {
        h.update(name.as_bytes());
        h.update(body.as_bytes());
    }
    h.update(b"\0");
    h.update(text.as_bytes());
    dir.join(format!("{}.json", hex::encode(h.finalize())))
}

fn still_valid(e: &Entry, cache: &mut DigestCache, resolver: Option<&KeyResolver>) -> bool {
    let resolved_ok = e
        .resolved
        .iter()
        .all(|(q, d)| resolver.is_some_and(|r| q.ask(r).is_some_and(|now| now == *d)));
    if !resolved_ok {
        return false;
    }
    let texts_ok = e.inputs.iter().all(|(p, d)| match d {
        None => !p.exists(),
        Some(d) => std::fs::read_to_string(p).is_ok_and(|t| key::text_digest(&t) == *d),
    });
    if !texts_ok {
        return false;
    }
    let srcs: Vec<PathBuf> = e.trees.iter().map(|(p, _)| p.clone()).collect();
    let now = hash::hash_sources(&srcs, cache);
    let trees_ok = e
        .trees
        .iter()
        .all(|(p, d)| now.get(p).is_some_and(|r| r.as_ref().is_ok_and(|n| n == d)));
    trees_ok
        && e.kernels
            .iter()
            .all(|(p, d)| hash::hash_file(p, cache).is_ok_and(|n| n == *d))
}

/// Plans `path`, through the plan cache in `cache_dir` (`$SPECC_HOME/cache/plans`).
pub fn plan(path: &Path, opts: &Options, cache_dir: &Path) -> Result<Planned, CompileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CompileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let entry_file = entry_path(cache_dir, path, &text, opts);
    if let Some(entry) = std::fs::read(&entry_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Entry>(&b).ok())
    {
        let mut digests = match &opts.digest_cache {
            Some(p) => DigestCache::load(p),
            None => DigestCache::in_memory(),
        };
        if still_valid(&entry, &mut digests, opts.resolver.as_ref()) {
            let _ = digests.save();
            return Ok(Planned::Hit(entry.outline));
        }
    }
    let (c, rec) = compile_str_recording(path, &text, opts);
    let Recorded {
        inputs,
        trees,
        kernels,
        resolved,
    } = rec;
    if let (Some(spec), true) = (&c.spec, c.diagnostics.is_empty()) {
        let entry = Entry {
            inputs,
            trees,
            kernels,
            resolved,
            outline: Outline::of(spec),
        };
        // Best effort: a plan cache that cannot be written only costs speed.
        if std::fs::create_dir_all(cache_dir).is_ok()
            && let Ok(bytes) = serde_json::to_vec(&entry)
        {
            let tmp = entry_file.with_extension(format!("tmp.{}", std::process::id()));
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, &entry_file);
            }
        }
    }
    Ok(Planned::Fresh(Box::new(c)))
}

/// `$SPECC_HOME/cache/plans`.
pub fn default_dir() -> PathBuf {
    crate::store::specc_home().join("cache").join("plans")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outline_of(p: Planned) -> (bool, Outline) {
        match p {
            Planned::Hit(o) => (true, o),
            Planned::Fresh(c) => (false, Outline::of(c.spec.as_ref().expect("plans"))),
        }
    }

    #[test]
    fn hits_only_while_every_input_is_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("data.txt"), "one").expect("write");
        std::fs::write(d.join("frag.kdl"), "layer \"f\" {\n    run \"f\"\n}\n").expect("write");
        let spec = d.join("s.kdl");
        std::fs::write(&spec, "spec \"s\" {\n    base \"busybox\"\n    import \"frag.kdl\"\n    layer \"c\" {\n        copy \"data.txt\" \"/d\"\n    }\n}\n").expect("write");
        let opts = Options {
            digest_cache: Some(d.join("digests.json")),
            ..Options::default()
        };
        let cache = d.join("plans");

        let (hit, first) = outline_of(plan(&spec, &opts, &cache).expect("plan"));
        assert!(!hit, "cold");
        let (hit, again) = outline_of(plan(&spec, &opts, &cache).expect("plan"));
        assert!(hit, "warm");
        assert_eq!(again, first);

        std::fs::write(d.join("data.txt"), "two").expect("write");
        let (hit, changed) = outline_of(plan(&spec, &opts, &cache).expect("plan"));
        assert!(!hit, "a copy source changed");
        assert_ne!(
            changed.layers.last().expect("c").key,
            first.layers.last().expect("c").key
        );

        std::fs::write(d.join("frag.kdl"), "layer \"f\" {\n    run \"g\"\n}\n").expect("write");
        let (hit, _) = outline_of(plan(&spec, &opts, &cache).expect("plan"));
        assert!(!hit, "an import changed");

        let other = Options {
            params: vec![],
            keys: crate::KeyOverrides {
                kernel: Some(Digest([1; 32])),
                base: None,
            },
            ..opts.clone()
        };
        let (hit, _) = outline_of(plan(&spec, &other, &cache).expect("plan"));
        assert!(!hit, "other options are another entry");
    }
}
