//! The spec IR: what the builder consumes. Plain data, no spans except [`SourceRef`]s for
//! pointing build errors back at the spec.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use specc_syntax::value::PortSpec;
use specc_syntax::{FileId, Span};

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// `sha256:<64 hex>`.
    pub fn to_prefixed(&self) -> String {
        format!("sha256:{}", hex::encode(self.0))
    }

    /// The 64 hex digits (the store's directory name).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits, with or without a `sha256:` prefix.
    pub fn parse(s: &str) -> Option<Digest> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        let bytes = hex::decode(hex).ok()?;
        Some(Digest(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.to_hex()[..12])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_prefixed())
    }
}

/// Where in the spec sources something was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRef {
    /// The file.
    pub file: FileId,
    /// The node's span.
    pub span: Span,
}

/// A fully lowered and planned spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// `spec "<name>"`.
    pub name: String,
    /// The spec file.
    pub path: PathBuf,
    /// What the first layer starts from.
    pub base: Base,
    /// VM shape.
    pub vm: Vm,
    /// Params with their resolved values.
    pub params: Vec<Param>,
    /// Declared build secrets.
    pub secrets: Vec<Secret>,
    /// Groups to create (also present as steps in the `users` layer).
    pub groups: Vec<Group>,
    /// Users to create (also present as steps in the `users` layer).
    pub users: Vec<User>,
    /// Layers in topological order: `layers[0]` is `base` and every parent comes before its
    /// children, so a [`LayerId`] is an index into this vector.
    pub layers: Vec<Layer>,
    /// Services, wherever they were declared.
    pub services: Vec<Service>,
    /// Ports exposed to the host.
    pub expose: Vec<PortSpec>,
    /// Idle policy.
    pub idle: Idle,
    /// Persistence policy.
    pub persistence: Persistence,
    /// The kernel digest in the base layer's key: of the `vm kernel=` file, or of the default
    /// guest kernel's inputs (from the driver's resolver), or of its description.
    pub kernel_digest: Digest,
    /// The base digest in the base layer's key: of the root filesystem's inputs (from the
    /// driver's resolver), or of the canonical base description; for `base spec=`, of the base
    /// spec's head key.
    pub base_digest: Digest,
}

impl Spec {
    /// The layer a VM of this spec runs from: the last layer, in file order, that no other
    /// layer builds on. Other sinks are side branches that are built and cached too.
    pub fn head(&self) -> LayerId {
        let mut has_child = vec![false; self.layers.len()];
        for l in &self.layers {
            for p in &l.parents {
                has_child[p.0] = true;
            }
        }
        (0..self.layers.len())
            .filter(|i| !has_child[*i])
            .max_by_key(|i| self.layers[*i].file_order)
            .map_or(LayerId(0), LayerId)
    }

    /// The layer called `name`.
    pub fn layer(&self, name: &str) -> Option<&Layer> {
        self.layers.iter().find(|l| l.name == name)
    }
}

/// Index into [`Spec::layers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub usize);

/// What the spec starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// An empty root filesystem (the agent only).
    Scratch,
    /// Debian's `busybox-static`.
    Busybox,
    /// A debootstrapped Debian.
    Debian {
        /// The suite, e.g. `bookworm`.
        suite: String,
    },
    /// An OCI image.
    Oci {
        /// The image reference.
        reference: String,
    },
    /// Another spec's head layer.
    Spec {
        /// The base spec's file.
        path: PathBuf,
        /// The base spec, planned.
        spec: Box<Spec>,
    },
}

impl Base {
    /// The canonical one-line description that is digested into the default base digest.
    pub fn describe(&self) -> String {
        match self {
            Base::Scratch => "scratch".into(),
            Base::Busybox => "busybox".into(),
            Base::Debian { suite } => format!("debian suite={suite}"),
            Base::Oci { reference } => format!("oci ref={reference}"),
            Base::Spec { spec, .. } => {
                format!("spec head={}", spec.layers[spec.head().0].key.to_prefixed())
            }
        }
    }
}

/// VM shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Root disk size in bytes.
    pub disk: u64,
    /// A kernel image to boot instead of the default guest kernel (absolute host path).
    pub kernel: Option<PathBuf>,
    /// Build and run VMs get a network device (passt, user mode). Part of the VM's device set,
    /// so of every snapshot: it enters the base layer's key.
    pub network: bool,
}

impl Default for Vm {
    fn default() -> Self {
        Vm {
            vcpus: 1,
            memory: 512 << 20,
            disk: 2 << 30,
            kernel: None,
            network: false,
        }
    }
}

/// A param and the value it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Name.
    pub name: String,
    /// Resolved value (override, else default).
    pub value: String,
    /// The declared default.
    pub default: Option<String>,
}

/// A build secret. Its value never enters a cache key; `version` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// Name (steps refer to it with `secrets=`).
    pub name: String,
    /// Where the builder reads the value on the host.
    pub source: SecretSource,
    /// Explicit version: changing it rebuilds the steps that use the secret.
    pub version: Option<String>,
}

/// Where a secret's value comes from on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A host environment variable.
    Env(String),
    /// A host file (absolute).
    File(PathBuf),
}

/// A Linux group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Fixed gid, if given.
    pub gid: Option<u32>,
}

/// A Linux user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Name.
    pub name: String,
    /// Fixed uid, if given.
    pub uid: Option<u32>,
    /// Supplementary groups.
    pub groups: Vec<String>,
    /// Login shell.
    pub shell: Option<String>,
    /// Home directory.
    pub home: Option<String>,
}

/// Why a layer exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerOrigin {
    /// The base layer.
    Base,
    /// `layer "name" { ... }`.
    Declared,
    /// The top-level `users { ... }` block.
    Users,
    /// A top-level `use "integration"`.
    Use(String),
    /// A top-level `service`.
    Service(String),
    /// A top-level `repo`.
    Repo(String),
}

/// One snapshot layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Name (`base`, a declared name, or an implicit `use:node`, `service:app`, ...).
    pub name: String,
    /// Why it exists.
    pub origin: LayerOrigin,
    /// Parent layers, in `after=` order (empty only for `base`).
    pub parents: Vec<LayerId>,
    /// Steps in order.
    pub steps: Vec<Step>,
    /// Cache key.
    pub key: Digest,
    /// Position in the file (stable tie-break for orderings and [`Spec::head`]).
    pub file_order: usize,
    /// Where it was declared (the `spec` node for `base`).
    pub source: SourceRef,
    /// The environment, working directory and user in force after its steps: what its
    /// children start from and what a command run in a VM of this layer gets.
    pub context: RunContext,
}

/// The environment, working directory and user commands run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunContext {
    /// The full environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: String,
    /// User (name or uid).
    pub user: String,
}

/// A step with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What to do.
    pub kind: StepKind,
    /// The node it came from.
    pub source: SourceRef,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// Run a shell command (`/bin/sh -c`).
    Run {
        /// The command, params interpolated.
        cmd: String,
        /// The full environment the command sees (spec env, inherited and layer `env`).
        env: BTreeMap<String, String>,
        /// Working directory.
        workdir: String,
        /// User to run as.
        user: String,
        /// Secrets made available at `/run/secrets/<name>`.
        secrets: Vec<String>,
    },
    /// Copy a host file or directory into the guest.
    Copy {
        /// Absolute host path.
        src: PathBuf,
        /// Absolute guest path.
        dst: String,
        /// Digest of paths, modes and bytes (never mtimes).
        digest: Digest,
    },
    /// Write a file with literal content.
    File {
        /// Absolute guest path.
        path: String,
        /// Content.
        content: String,
        /// Permission bits.
        mode: u32,
    },
    /// Set an environment variable for the following steps and layers.
    Env {
        /// Name.
        key: String,
        /// Value.
        value: String,
    },
    /// Set the working directory for the following steps and layers.
    Workdir(String),
    /// Set the user for the following steps and layers.
    User(String),
    /// Create a group.
    AddGroup(Group),
    /// Create a user.
    AddUser(User),
    /// Install a service.
    Service(Service),
    /// Clone a git repository (layered git cache).
    Repo {
        /// Clone URL.
        url: String,
        /// Branch, tag or commit.
        reference: String,
        /// Absolute guest path.
        path: String,
    },
    /// An integration, expanded.
    Use {
        /// Integration name (`node`).
        integration: String,
        /// The `version` param's value.
        version: String,
        /// The integration's steps with its params substituted.
        steps: Vec<Step>,
    },
}

/// A supervised service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Command line.
    pub exec: String,
    /// User to run as.
    pub user: Option<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Restart policy.
    pub restart: Restart,
}

/// Service restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always restart.
    Always,
    /// Restart when it exits non-zero (the default).
    OnFailure,
    /// Never restart.
    Never,
}

impl Restart {
    /// The spelling in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Always => "always",
            Restart::OnFailure => "on-failure",
            Restart::Never => "no",
        }
    }
}

/// Idle policy: pause, then suspend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Idle {
    /// Pause the vCPUs after this long idle.
    pub pause_after: Option<Duration>,
    /// Suspend to disk after this long idle.
    pub suspend_after: Option<Duration>,
}

/// What happens to a VM's state over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persistence {
    /// Deleted on suspend or idle (the default).
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

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_prefixed())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad digest `{s}`")))
    }
}
