//! The API's wire types: what `specd` serves and `specc vm` sends. Every type here is in the
//! OpenAPI document (`GET /v1/openapi.json`), generated from these definitions.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a VM's snapshot comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// A layer in the daemon's store, by cache key (hex), as `specc build` printed it.
    Layer {
        /// The layer's cache key.
        key: String,
    },
    /// An OCI image layout on the daemon's host written by `specc build -o DIR`.
    Layout {
        /// The layout directory.
        path: String,
    },
    /// A snapshot artifact in a registry (`host[:port]/repository[:tag|@digest]`).
    Registry {
        /// The reference.
        reference: String,
    },
}

/// What happens to a VM's state when it is idle or storage runs short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Persistence {
    /// Deleted instead of suspended: nothing of it outlives its idle timeout.
    Ephemeral,
    /// Suspended to disk; evicted under the storage budget, lowest priority first, then least
    /// recently used.
    Sticky {
        /// 0 (evicted first) to 10.
        #[serde(default)]
        priority: u8,
    },
    /// Suspended to disk, never evicted.
    #[default]
    Persistent,
}

impl Persistence {
    /// Rejects a priority above 10.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Persistence::Sticky { priority } if *priority > 10 => {
                Err(format!("sticky priority is 0 to 10, got {priority}"))
            }
            _ => Ok(()),
        }
    }
}

impl From<specc_store::oci::RuntimePersistence> for Persistence {
    fn from(p: specc_store::oci::RuntimePersistence) -> Self {
        use specc_store::oci::RuntimePersistence as R;
        match p {
            R::Ephemeral => Persistence::Ephemeral,
            R::Sticky { priority } => Persistence::Sticky { priority },
            R::Persistent => Persistence::Persistent,
        }
    }
}

/// Idle timers: seconds without activity (exec, file API, proxied bytes) before the VM is
/// paused, then suspended. Absent timers never fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct IdlePolicy {
    /// Pause (vCPUs stopped, memory kept) after this many idle seconds.
    #[serde(default)]
    pub pause_after_s: Option<u64>,
    /// Suspend (memory to disk, VMM exits) after this many idle seconds.
    #[serde(default)]
    pub suspend_after_s: Option<u64>,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateVm {
    /// The snapshot to start from.
    pub source: Source,
    /// A name (also the guest's hostname); the id when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Persistence class. Absent: the artifact's (its spec's `persistence`), else persistent.
    #[serde(default)]
    pub persistence: Option<Persistence>,
    /// Idle timers. Absent: the artifact's (its spec's `idle`), else none.
    #[serde(default)]
    pub idle: Option<IdlePolicy>,
    /// Guest TCP ports to expose on the daemon host's loopback. Absent: the artifact's (its
    /// spec's `expose`), else none.
    #[serde(default)]
    pub ports: Option<Vec<u16>>,
    /// Give the guest a network (passt).
    #[serde(default)]
    pub net: bool,
}

/// Where a VM is in its life.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Being restored for the first time.
    Creating,
    /// vCPUs run.
    Running,
    /// vCPUs stopped, memory held by the VMM process.
    Paused,
    /// Writing memory and state to disk.
    Suspending,
    /// On disk only: no process, no CPU, no RAM.
    Suspended,
    /// Being restored from its suspend snapshot.
    Waking,
    /// Powering off: syncing the guest's disk and freezing it; memory is discarded.
    Stopping,
    /// Powered off: disk kept, memory gone.
    Stopped,
    /// Cold-booting from its kernel and its own disk.
    Starting,
    /// Its VMM ended by itself (a guest crash, the VMM killed): `error` says how. What it
    /// did since its last snapshot is lost; waking it restores that snapshot, deleting it
    /// removes it. It is not woken by itself, so no call runs in an older state unasked.
    Failed,
}

impl VmState {
    /// All states, for metrics.
    pub const ALL: [VmState; 10] = [
        VmState::Creating,
        VmState::Running,
        VmState::Paused,
        VmState::Suspending,
        VmState::Suspended,
        VmState::Waking,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Starting,
        VmState::Failed,
    ];

    /// The name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Suspending => "suspending",
            VmState::Suspended => "suspended",
            VmState::Waking => "waking",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Failed => "failed",
        }
    }

    /// Whether a VMM process should exist in this state.
    pub fn has_process(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

/// One exposed port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Port {
    /// The guest's TCP port.
    pub guest: u16,
    /// The daemon host's loopback port that reaches it.
    pub host: u16,
    /// Set when `127.0.0.1:<host>` does not answer on the host the API's clients are on, and
    /// why: a daemon placed in the rig listens there too (the bridge mirrors the port), and
    /// this says so when the host port is taken there, or not confirmed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// Unique id.
    pub id: String,
    /// Name and hostname.
    pub name: String,
    /// Lifecycle state.
    pub state: VmState,
    /// What it was created from.
    pub source: Source,
    /// The VM it was forked from, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// Persistence class.
    pub persistence: Persistence,
    /// Idle timers.
    pub idle: IdlePolicy,
    /// Exposed ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Whether the guest has a network.
    #[serde(default)]
    pub net: bool,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Last activity, ms since the epoch.
    pub last_active_ms: u64,
    /// The VMM process, while there is one.
    #[serde(default)]
    pub pid: Option<i32>,
    /// Bytes the VM's own files take on the daemon host's disk.
    #[serde(default)]
    pub disk_bytes: u64,
    /// How many times it was suspended.
    #[serde(default)]
    pub suspends: u32,
    /// Why its VMM ended, when it ended by itself (the state is then `failed`, or `stopped`
    /// for a VM that had cold-booted); cleared when it runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/vms/{id}/fork`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct ForkVm {
    /// How many children.
    pub count: u32,
    /// How the children get the source's memory; `precopy` when absent (docs/vmm.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ForkMode>,
}

/// How a live fork gives its children the source's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ForkMode {
    /// `fork(2)` shares guest RAM copy-on-write: nothing copied up front, but the pause grows
    /// with the source's resident memory (a page-table entry per mapped page).
    Cow,
    /// Guest RAM is copied into an image while the guest runs; the pause copies the last dirty
    /// pages and does not grow with memory size. The children share the image's clean pages.
    #[default]
    Precopy,
}

/// The answer to a fork.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Forked {
    /// How long the source's vCPUs stood still, in microseconds (`report.pause_us`).
    pub pause_us: u64,
    /// The VMM's figures of the fork.
    #[serde(default)]
    pub report: ForkReport,
    /// The new VMs.
    pub vms: Vec<Vm>,
}

/// What the source's VMM reports of a fork (docs/fork.md explains each figure).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkReport {
    /// The mode the fork ran in: `cow` when a precopy failed and fell back to it.
    pub mode: ForkMode,
    /// How long the source's guest did not run, as its vCPU threads timed it (µs).
    pub pause_us: u64,
    /// The same pause as the VMM's controlling thread saw it (µs).
    pub owner_us: u64,
    /// Where the pause went.
    pub phases: ForkPhases,
    /// A precopy fork's copy of guest RAM into its image, made while the guest ran.
    pub precopy: Option<MemoryCopy>,
    /// The first fork of a restored VM in `cow` mode moves its RAM into huge pages first.
    pub promotion: Option<MemoryCopy>,
    /// Each child as the VMM reported it, in request order (failed ones included).
    pub children: Vec<ForkChild>,
}

/// The spans of a fork's pause in microseconds, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkPhases {
    /// Kicking every vCPU out of the guest until each is parked.
    pub vcpu_stop_us: u64,
    /// Stopping the device workers.
    pub devices_stop_us: u64,
    /// A promotion's last dirty pages and swap.
    pub promotion_swap_us: u64,
    /// A precopy fork's last dirty pages copied into its image.
    pub final_copy_us: u64,
    /// Freezing the disk diffs and capturing VM and device state.
    pub capture_us: u64,
    /// `fork(2)` of the VMM process.
    pub fork_us: u64,
    /// Restarting the device workers.
    pub devices_resume_us: u64,
    /// Resuming the vCPUs.
    pub vcpu_resume_us: u64,
}

/// A copy of guest RAM made while the guest ran (a precopy fork's image, or a promotion).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemoryCopy {
    /// From the start until the vCPUs were paused (µs); the guest ran.
    pub precopy_us: u64,
    /// Of that, the bulk copy (µs).
    pub copy_us: u64,
    /// With the device workers stopped before the pause (µs): the guest ran, its I/O waited.
    pub devices_stopped_us: u64,
    /// Bytes of the bulk copy.
    pub copied_bytes: u64,
    /// Dirty-log rounds while the guest ran.
    pub rounds: u32,
    /// Pages those rounds copied.
    pub round_pages: u64,
    /// Pages copied with the vCPUs paused.
    pub final_pages: u64,
    /// The final copy (and a promotion's swap) in the pause (µs).
    pub swap_us: u64,
}

/// One child of a fork as the VMM reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkChild {
    /// The VM id it was registered under.
    pub id: String,
    /// Its VMM process (0 if it never reported).
    pub pid: i32,
    /// From the fork request until its vCPUs ran (µs).
    pub ready_us: Option<u64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// `POST /v1/vms/{id}/exec`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Exec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes for stdin, base64 (stdin is `/dev/null` when absent and `stdin_stream` is not
    /// set).
    #[serde(default)]
    pub stdin_b64: Option<String>,
    /// Stdin arrives while the process runs, as the body of
    /// `POST /v1/vms/{id}/execs/{exec}/stdin` (forwarded as it comes; its end closes stdin).
    /// The `started` event names the exec. Not together with `stdin_b64`.
    #[serde(default)]
    pub stdin_stream: bool,
    /// Kill the process after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// One line of an exec's `application/x-ndjson` answer, in the order things happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process is running. The first line of every exec that started.
    Started {
        /// Its pid in the guest.
        pid: i32,
        /// With `stdin_stream`: the exec's name in `POST /v1/vms/{id}/execs/{exec}/stdin`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stdin: Option<String>,
    },
    /// Bytes the process wrote to stdout, base64.
    Stdout {
        /// The bytes.
        data_b64: String,
    },
    /// Bytes the process wrote to stderr, base64.
    Stderr {
        /// The bytes.
        data_b64: String,
    },
    /// The process ended. Always the last line of a successful exec.
    Exit {
        /// Exit code, if it exited.
        code: Option<i32>,
        /// Signal, if it was killed.
        signal: Option<i32>,
        /// Whether the exec had to wake (or resume) the VM first.
        woke: bool,
    },
    /// The exec failed after the answer started (the VM died, the agent went away).
    Error {
        /// What happened.
        message: String,
    },
}

/// A directory entry of `GET /v1/vms/{id}/dir`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
}

/// Any error answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What went wrong, with its causes.
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// The daemon's version.
    pub version: String,
    /// Virtualization mode the VMs run under: `hardware-kvm`, `rig` (the daemon placed itself
    /// in the rig: emulated, whatever the rig's `/dev/kvm` looks like from inside), `pvm`.
    pub mode: String,
    /// VMs known.
    pub vms: usize,
}
