//! Cache keys (DESIGN section 5).
//!
//! `key(base) = H(version, "base", base digest, kernel digest, vcpus, memory, disk[, "network"])`
//! and `key(layer) = H(version, "layer", parent keys in order, canonical encoding of its steps)`.
//! Every string is length-prefixed, so no two different step lists encode the same bytes.
//! Not in a key: layer names (renaming a layer keeps its cache), host paths of copy sources
//! (moving the project keeps its cache), mtimes, secret values.

use sha2::{Digest as _, Sha256};

use crate::ir::{Base, Digest, Secret, Spec, Step, StepKind};

/// Bumped whenever the encoding below changes, so old keys never collide with new ones.
pub const FORMAT_VERSION: &str = "specc-layer-key-v1";

/// What the default kernel is, for the default kernel digest. The builder passes the digest
/// of the kernel it actually built instead (see [`KeyOverrides`]).
pub const DEFAULT_KERNEL_DESCRIPTION: &str =
    "specc-guest-kernel linux-source-6.1 tinyconfig+specc-guest-fragment";

struct Enc(Sha256);

impl Enc {
    fn new(tag: &str) -> Self {
        let mut e = Enc(Sha256::new());
        e.str(FORMAT_VERSION);
        e.str(tag);
        e
    }
    fn str(&mut self, s: &str) {
        self.0.update((s.len() as u64).to_le_bytes());
        self.0.update(s.as_bytes());
    }
    fn u64(&mut self, n: u64) {
        self.0.update(n.to_le_bytes());
    }
    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u64(1);
                self.str(s);
            }
            None => self.u64(0),
        }
    }
    fn digest(&mut self, d: &Digest) {
        self.0.update(d.0);
    }
    fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

fn sha(tag: &str, text: &str) -> Digest {
    let mut e = Enc::new(tag);
    e.str(text);
    e.finish()
}

/// sha256 of a text, for recording which version of a file a plan was made from.
pub fn text_digest(text: &str) -> Digest {
    Digest(Sha256::digest(text.as_bytes()).into())
}

/// The default kernel digest: of [`DEFAULT_KERNEL_DESCRIPTION`].
pub fn default_kernel_digest() -> Digest {
    sha("kernel", DEFAULT_KERNEL_DESCRIPTION)
}

/// The default base digest: of the canonical base description ([`Base::describe`]).
pub fn default_base_digest(base: &Base) -> Digest {
    sha("base-description", &base.describe())
}

fn encode_steps(e: &mut Enc, steps: &[Step], secrets: &[Secret]) {
    e.u64(steps.len() as u64);
    for s in steps {
        match &s.kind {
            StepKind::Run {
                cmd,
                env,
                workdir,
                user,
                secrets: used,
            } => {
                e.str("run");
                e.str(cmd);
                e.u64(env.len() as u64);
                for (k, v) in env {
                    e.str(k);
                    e.str(v);
                }
                e.str(workdir);
                e.str(user);
                e.u64(used.len() as u64);
                for name in used {
                    e.str(name);
                    e.opt(
                        secrets
                            .iter()
                            .find(|s| s.name == *name)
                            .and_then(|s| s.version.as_deref()),
                    );
                }
            }
            StepKind::Copy { dst, digest, .. } => {
                e.str("copy");
                e.str(dst);
                e.digest(digest);
            }
            StepKind::File {
                path,
                content,
                mode,
            } => {
                e.str("file");
                e.str(path);
                e.str(content);
                e.u64(u64::from(*mode));
            }
            StepKind::Env { key, value } => {
                e.str("env");
                e.str(key);
                e.str(value);
            }
            StepKind::Workdir(w) => {
                e.str("workdir");
                e.str(w);
            }
            StepKind::User(u) => {
                e.str("user");
                e.str(u);
            }
            StepKind::AddGroup(g) => {
                e.str("add-group");
                e.str(&g.name);
                e.opt(g.gid.map(|g| g.to_string()).as_deref());
            }
            StepKind::AddUser(u) => {
                e.str("add-user");
                e.str(&u.name);
                e.opt(u.uid.map(|g| g.to_string()).as_deref());
                e.u64(u.groups.len() as u64);
                for g in &u.groups {
                    e.str(g);
                }
                e.opt(u.shell.as_deref());
                e.opt(u.home.as_deref());
            }
            StepKind::Service(svc) => {
                e.str("service");
                e.str(&svc.name);
                e.str(&svc.exec);
                e.opt(svc.user.as_deref());
                e.opt(svc.workdir.as_deref());
                e.u64(svc.env.len() as u64);
                for (k, v) in &svc.env {
                    e.str(k);
                    e.str(v);
                }
                e.str(svc.restart.as_str());
            }
            StepKind::Repo {
                url,
                reference,
                path,
            } => {
                e.str("repo");
                e.str(url);
                e.str(reference);
                e.str(path);
            }
            StepKind::Use {
                integration,
                version,
                steps,
            } => {
                e.str("use");
                e.str(integration);
                e.str(version);
                encode_steps(e, steps, secrets);
            }
        }
    }
}

/// Computes every layer's key in place from [`Spec::kernel_digest`] and [`Spec::base_digest`]
/// (which enter the base layer's key, and through it every other one). `layers` is in
/// topological order, so parents' keys are known when a child's is computed.
pub fn assign_keys(spec: &mut Spec) {
    let base_digest = spec.base_digest;
    let kernel = spec.kernel_digest;
    for i in 0..spec.layers.len() {
        let key = if spec.layers[i].parents.is_empty() {
            let mut e = Enc::new("base");
            e.digest(&base_digest);
            e.digest(&kernel);
            // The memory snapshot depends on the VM's shape.
            e.u64(u64::from(spec.vm.vcpus));
            e.u64(spec.vm.memory);
            e.u64(spec.vm.disk);
            // So is its device set. Appended only when on, which keeps the keys of specs
            // without a network as they were.
            if spec.vm.network {
                e.str("network");
            }
            e.finish()
        } else {
            let mut e = Enc::new("layer");
            let l = &spec.layers[i];
            e.u64(l.parents.len() as u64);
            for p in &l.parents {
                e.digest(&spec.layers[p.0].key);
            }
            encode_steps(&mut e, &l.steps, &spec.secrets);
            e.finish()
        };
        spec.layers[i].key = key;
    }
}
