//! `specc build --explain`: for each layer about to be rebuilt, the input that changed since the
//! previous build of that layer (a copied file's content, a command, an environment variable,
//! a parent), BuildKit's missing "why was this a cache miss".
//!
//! Every build records, per spec file and layer name, what went into the layer's key: the
//! parents' names and keys, one fingerprint per step (copy steps also keep their source
//! path and content digest), and for the base layer the base, the kernel and root filesystem
//! input digests and the VM shape. The record lives beside the store
//! (`$SPECC_HOME/explain/<sha256 of the spec path>.json`); it never affects a key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use specc_plan::ir::{self, StepKind};

use crate::steps::describe;

/// What went into one layer's key, for comparing builds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerInputs {
    /// The layer's key.
    pub key: String,
    /// Parents: name and key, in `after=` order.
    pub parents: Vec<(String, String)>,
    /// One entry per step.
    pub steps: Vec<StepInputs>,
    /// For a layer without parents: what the base contributes to its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseInputs>,
}

/// What a base layer's key is made of besides its (absent) steps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseInputs {
    /// The base as written (`busybox`, `debian suite=bookworm`, `spec head=...`).
    pub base: String,
    /// Hex digest of the kernel's inputs ([`ir::Spec::kernel_digest`]).
    pub kernel: String,
    /// Hex digest of the root filesystem's inputs ([`ir::Spec::base_digest`]).
    pub rootfs: String,
    /// vCPUs, memory and disk.
    pub vm: String,
}

/// One step's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepInputs {
    /// The step in a few words.
    pub what: String,
    /// Digest of everything about the step that enters the key.
    pub fingerprint: String,
    /// For a copy: the host source and its content digest.
    #[serde(default)]
    pub copy: Option<(PathBuf, String)>,
}

fn step_inputs(kind: &StepKind) -> StepInputs {
    // The IR's derived Debug form covers every field the key encodes (commands, env, paths,
    // modes, content digests of copies); it is only compared, never part of a key.
    let fingerprint = hex::encode(Sha256::digest(format!("{kind:?}").as_bytes()));
    let copy = match kind {
        StepKind::Copy { src, digest, .. } => Some((src.clone(), digest.to_hex())),
        _ => None,
    };
    StepInputs {
        what: describe(kind),
        fingerprint,
        copy,
    }
}

/// The inputs of every layer of `spec`, by layer name.
pub fn inputs(spec: &ir::Spec) -> BTreeMap<String, LayerInputs> {
    spec.layers
        .iter()
        .map(|l| {
            let parents = l
                .parents
                .iter()
                .map(|p| {
                    let p = &spec.layers[p.0];
                    (p.name.clone(), p.key.to_hex())
                })
                .collect();
            let steps = l.steps.iter().map(|s| step_inputs(&s.kind)).collect();
            let key = l.key.to_hex();
            let base = l.parents.is_empty().then(|| BaseInputs {
                base: spec.base.describe(),
                kernel: spec.kernel_digest.to_hex(),
                rootfs: spec.base_digest.to_hex(),
                vm: format!(
                    "{} vCPUs, {} MiB memory, {} MiB disk",
                    spec.vm.vcpus,
                    spec.vm.memory >> 20,
                    spec.vm.disk >> 20
                ),
            });
            (
                l.name.clone(),
                LayerInputs {
                    key,
                    parents,
                    steps,
                    base,
                },
            )
        })
        .collect()
}

/// Why `now` differs from `before` (the previous build of the same layer), most specific
/// first; `None` when they are identical (a key change elsewhere: the base, the kernel, the
/// VM shape, or the key format).
pub fn why(before: &LayerInputs, now: &LayerInputs) -> Option<String> {
    for (i, (b, n)) in before.parents.iter().zip(&now.parents).enumerate() {
        if b.1 != n.1 {
            return Some(format!(
                "parent `{}` changed (key {} -> {}){}",
                n.0,
                &b.1[..12],
                &n.1[..12],
                if i == 0 { "" } else { " (a later parent)" }
            ));
        }
    }
    if before.parents.len() != now.parents.len() {
        return Some(format!(
            "its parents changed: {} -> {}",
            names(&before.parents),
            names(&now.parents)
        ));
    }
    if let (Some(b), Some(n)) = (&before.base, &now.base)
        && let Some(why) = base_why(b, n)
    {
        return Some(why);
    }
    for (i, (b, n)) in before.steps.iter().zip(&now.steps).enumerate() {
        if b.fingerprint == n.fingerprint {
            continue;
        }
        if let (Some((bs, bd)), Some((ns, nd))) = (&b.copy, &n.copy)
            && bs == ns
            && bd != nd
        {
            return Some(format!(
                "step {} ({}): the content of {} changed",
                i + 1,
                n.what,
                ns.display()
            ));
        }
        if b.what != n.what {
            return Some(format!("step {} changed: {} -> {}", i + 1, b.what, n.what));
        }
        return Some(format!(
            "step {} ({}) changed (its environment, user, working directory or options)",
            i + 1,
            n.what
        ));
    }
    if before.steps.len() != now.steps.len() {
        return Some(format!(
            "the layer has {} steps, it had {}",
            now.steps.len(),
            before.steps.len()
        ));
    }
    (before.key != now.key).then(|| {
        "an input outside its steps changed (base image, kernel, VM shape or key format)".into()
    })
}

fn base_why(b: &BaseInputs, n: &BaseInputs) -> Option<String> {
    let short = |h: &str| h.get(..12).unwrap_or(h).to_owned();
    if b.base != n.base {
        return Some(format!("base: the base changed: {} -> {}", b.base, n.base));
    }
    if b.kernel != n.kernel {
        return Some(format!(
            "base: the guest kernel's inputs changed (kernel digest {} -> {})",
            short(&b.kernel),
            short(&n.kernel)
        ));
    }
    if b.rootfs != n.rootfs {
        let what = if n.base.starts_with("spec ") {
            "the base spec's head layer"
        } else {
            "the root filesystem's inputs (agent, packages, image or recipe)"
        };
        return Some(format!(
            "base: {what} changed (digest {} -> {})",
            short(&b.rootfs),
            short(&n.rootfs)
        ));
    }
    (b.vm != n.vm).then(|| format!("base: the VM shape changed: {} -> {}", b.vm, n.vm))
}

fn names(p: &[(String, String)]) -> String {
    let v: Vec<&str> = p.iter().map(|(n, _)| n.as_str()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Where the inputs of the last build of the spec at `spec_path` are kept.
pub fn record_path(home: &Path, spec_path: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(spec_path).unwrap_or_else(|_| spec_path.to_owned());
    let h = hex::encode(Sha256::digest(abs.to_string_lossy().as_bytes()));
    home.join("explain").join(format!("{}.json", &h[..32]))
}

/// The recorded inputs of the last build, if any (an unreadable record is no record).
pub fn load(path: &Path) -> BTreeMap<String, LayerInputs> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records `inputs` as the last build's (atomically: temp file + rename).
pub fn save(path: &Path, inputs: &BTreeMap<String, LayerInputs>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(inputs).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(key: &str, parents: &[(&str, &str)], steps: &[(&str, &str)]) -> LayerInputs {
        LayerInputs {
            key: key.repeat(64 / key.len()),
            parents: parents
                .iter()
                .map(|(n, k)| ((*n).to_owned(), k.repeat(64 / k.len())))
                .collect(),
            steps: steps
                .iter()
                .map(|(w, f)| StepInputs {
                    what: (*w).to_owned(),
                    fingerprint: (*f).to_owned(),
                    copy: None,
                })
                .collect(),
            base: None,
        }
    }

    #[test]
    fn the_most_specific_change_is_named() {
        let a = layer("a", &[("base", "1")], &[("run \"make\"", "f1")]);
        assert_eq!(why(&a, &a), None);
        let parent = layer("b", &[("base", "2")], &[("run \"make\"", "f1")]);
        assert!(
            why(&a, &parent)
                .unwrap()
                .starts_with("parent `base` changed")
        );
        let cmd = layer("c", &[("base", "1")], &[("run \"make all\"", "f2")]);
        assert_eq!(
            why(&a, &cmd).unwrap(),
            "step 1 changed: run \"make\" -> run \"make all\""
        );
        let env = layer("d", &[("base", "1")], &[("run \"make\"", "f3")]);
        assert!(why(&a, &env).unwrap().contains("environment"));
        let mut copy_a = layer("e", &[("base", "1")], &[("copy x -> /x", "f4")]);
        copy_a.steps[0].copy = Some(("/p/x".into(), "d1".into()));
        let mut copy_b = layer("f", &[("base", "1")], &[("copy x -> /x", "f5")]);
        copy_b.steps[0].copy = Some(("/p/x".into(), "d2".into()));
        assert_eq!(
            why(&copy_a, &copy_b).unwrap(),
            "step 1 (copy x -> /x): the content of /p/x changed"
        );
        let shape = layer("g", &[("base", "1")], &[("run \"make\"", "f1")]);
        assert!(why(&a, &shape).unwrap().contains("outside its steps"));
    }

    #[test]
    fn a_changed_kernel_or_rootfs_is_named_for_the_base_layer() {
        let base = |kernel: &str, rootfs: &str| {
            let mut l = layer("k", &[], &[]);
            l.base = Some(BaseInputs {
                base: "busybox".into(),
                kernel: kernel.repeat(64),
                rootfs: rootfs.repeat(64),
                vm: "1 vCPUs, 512 MiB memory, 1024 MiB disk".into(),
            });
            l
        };
        let a = base("1", "2");
        assert_eq!(why(&a, &a), None);
        assert_eq!(
            why(&a, &base("3", "2")).unwrap(),
            "base: the guest kernel's inputs changed (kernel digest 111111111111 -> 333333333333)"
        );
        assert!(
            why(&a, &base("1", "4"))
                .unwrap()
                .starts_with("base: the root filesystem's inputs")
        );
        let mut shape = base("1", "2");
        shape.base.as_mut().unwrap().vm = "2 vCPUs, 512 MiB memory, 1024 MiB disk".into();
        assert!(
            why(&a, &shape)
                .unwrap()
                .starts_with("base: the VM shape changed")
        );
        // A record from before base inputs were kept explains as before.
        let mut old = base("1", "2");
        old.base = None;
        old.key = "9".repeat(64);
        assert!(why(&old, &a).unwrap().contains("outside its steps"));
        let json = serde_json::to_string(&layer("a", &[], &[])).unwrap();
        assert!(
            !json.contains("\"base\""),
            "absent when not a base layer: {json}"
        );
    }

    #[test]
    fn records_round_trip_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = record_path(dir.path(), Path::new("/no/such/spec.kdl"));
        assert!(load(&p).is_empty());
        let mut m = BTreeMap::new();
        m.insert("a".to_owned(), layer("a", &[], &[("file /x", "f")]));
        save(&p, &m).unwrap();
        assert_eq!(load(&p), m);
    }
}
