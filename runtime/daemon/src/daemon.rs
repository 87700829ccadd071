//! The lifecycle of the daemon's VMs: create from a snapshot, fork, pause, resume, suspend to
//! disk, wake, delete; idle timers and the storage budget; recovery after the daemon itself
//! was killed.
//!
//! Invariants:
//! - Every VM is one `specc-vmm` process started detached (own session, no parent-death
//!   signal): killing the daemon leaves its VMs running, and a restarted daemon attaches to
//!   them again through their control sockets.
//! - Every transition is written to the database before it starts (`Suspending`, `Waking`,
//!   `Creating`) and after it ends; [`Daemon::open`] settles each interrupted one from what is on
//!   disk (a suspend snapshot is complete once its `vmstate` exists: it is written last).
//! - A VM's transitions are serialised by its slot's lock; execs and file calls hold only a
//!   busy count while they talk to the agent, so they run concurrently, and the idle timers
//!   never fire on a VM with a call in flight.
//! - A VM's files stay on disk while any VM forked from it (or from its descendants) exists:
//!   a fork child's disk stack names layers in its ancestors' directories.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use specc_machine::{DEFAULT_CMDLINE, Disk, Machine, MachineConfig};
use specc_protocol::AGENT_VSOCK_PORT;
use specc_protocol::client::Client as AgentClient;
use specc_protocol::messages::{ExecRequest, Request as AgentRequest, WriteFileRequest};
use specc_store::Store;

use crate::api::{self, CreateVm, ExecEvent, Port, Source, Vm, VmState};
use crate::db::{Db, DbError, Record, RestorePoint};
use crate::metrics::Metrics;
use crate::policy::{self, IdleAction};

mod compact;

/// How long past an exec's own timeout the daemon waits for the agent's answer.
const EXEC_GRACE: Duration = Duration::from_secs(30);

/// The longest single attempt to reach an agent; between attempts the daemon checks that the
/// VM's VMM is still there.
const AGENT_ATTEMPT: Duration = Duration::from_secs(10);

/// VMMs outlive the daemon (see the module's invariants).
const DETACHED: specc_machine::Launch = specc_machine::Launch { detached: true };

/// Errors of lifecycle operations, each with the HTTP status the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No such VM.
    #[error("no VM {0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The VM is in a state that does not allow the operation.
    #[error("VM {id} is {state}: cannot {op}")]
    Conflict {
        /// The VM.
        id: String,
        /// Its state.
        state: &'static str,
        /// The operation.
        op: &'static str,
    },
    /// The state database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The store or an artifact failed.
    #[error("{0}")]
    Source(String),
    /// Starting, reaching or stopping the VM failed.
    #[error("VM {id}: {op} failed: {message}")]
    Vm {
        /// The VM.
        id: String,
        /// The operation.
        op: &'static str,
        /// What went wrong, with causes.
        message: String,
    },
    /// The VM is stopped: it must be started (cold boot) before it can be reached.
    #[error(
        "VM {0} is stopped (powered off, only its disk kept): start it first \
         (`POST /v1/vms/{0}/start`, `specc vm start {0}`)"
    )]
    Stopped(String),
    /// The VM's VMM ended by itself: it is not woken by a call, since what it did since its
    /// last snapshot is lost.
    #[error("VM {id} has failed: {hint}\n{reason}")]
    Failed {
        /// The VM.
        id: String,
        /// What can be done about it.
        hint: String,
        /// How its VMM ended, with its last output.
        reason: String,
    },
    /// A filesystem operation on the daemon's state failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
}

impl DaemonError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            DaemonError::NotFound(_) => 404,
            DaemonError::BadRequest(_) => 400,
            DaemonError::Conflict { .. } | DaemonError::Stopped(_) | DaemonError::Failed { .. } => {
                409
            }
            DaemonError::Source(_) => 422,
            DaemonError::Db(_) | DaemonError::Vm { .. } | DaemonError::Io { .. } => 500,
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    specc_vmm::error_chain(e)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// How the daemon is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database and the VMs' directories (disks, snapshots) live.
    pub state_dir: PathBuf,
    /// Where the VMs' run directories (sockets, console logs, a fork child's first disk diff)
    /// live: the state's filesystem (a snapshot renames the disk diff into the state
    /// directory), and one that can hold unix sockets (not 9p).
    pub run_dir: PathBuf,
    /// The store root (`$SPECC_HOME/store`) artifacts are read from.
    pub store: PathBuf,
    /// Disk budget for the VMs' own files; sticky VMs at rest are evicted above it.
    pub budget_bytes: u64,
    /// How long a restored guest's agent may take to answer.
    pub agent_timeout: Duration,
    /// How often the idle timers and the budget are checked.
    pub tick: Duration,
    /// The kernel a stopped VM cold-boots with when its layers carry none (default: the
    /// guest kernel `specc kernel build` made).
    pub kernel: Option<PathBuf>,
}

/// One VM's slot: its record and process behind a lock, its activity outside it.
#[derive(Debug)]
struct Slot {
    live: Mutex<Live>,
    /// Open exec, file and proxy calls.
    busy: AtomicUsize,
    /// Last activity, ms since the epoch (persisted at the next transition).
    last_active: AtomicU64,
    /// Set while a compaction of its chain runs outside the `live` lock; whatever would
    /// leave the suspended state waits on `compacted` until it is over (see
    /// [`Daemon::lock_settled`]).
    compacting: Mutex<bool>,
    compacted: Condvar,
}

#[derive(Debug)]
struct Live {
    rec: Record,
    machine: Option<Machine>,
    /// Set once deleted: late callers holding the slot see it gone.
    deleted: bool,
}

/// Counts a call as activity for as long as it lives.
struct Busy<'a>(&'a Slot);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.last_active.store(now_ms(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The daemon.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    db: Mutex<Db>,
    store: Store,
    vms: Mutex<HashMap<String, Arc<Slot>>>,
    /// Metrics for `/metrics`.
    pub metrics: Metrics,
    mode: String,
    /// This daemon, for the threads it starts (set once by [`Daemon::open`]).
    me: std::sync::OnceLock<std::sync::Weak<Daemon>>,
    /// Running execs with `stdin_stream`, by the name their `started` event gave.
    feeds: Mutex<HashMap<String, Arc<Feed>>>,
    /// In a rig placed by a host specd: the exposed ports the host's loopback mirrors.
    mirror: std::sync::OnceLock<Arc<specc_rig::bridge::RigPorts>>,
}

/// The stdin of a running exec, fed by `POST /v1/vms/{id}/execs/{exec}/stdin`.
#[derive(Debug)]
struct Feed {
    vm: String,
    /// A second handle on the exec's agent connection: after `ExecStarted` the exec's own
    /// thread only reads it, so frames written here stay whole.
    conn: UnixStream,
    /// Set by the one request that feeds it.
    taken: AtomicBool,
}

/// The start of the names of the store pins a daemon on `state_dir` writes
/// (`specd-<tag>-`, then the VM id). Removing the pins of a state directory that was deleted
/// with VMs still in it lets `specc gc` free their layers.
pub fn pin_prefix(state_dir: &Path) -> String {
    // FNV-1a: a stable tag for the state directory, so that daemons sharing one store never
    // sweep each other's pins.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("specd-{:08x}-", h & 0xffff_ffff)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn random_id() -> Result<String, DaemonError> {
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A guest hostname: letters, digits and `-`, 1 to 63 characters, not starting with `-`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Bytes `dir` takes on disk (allocated blocks, so sparse files count what they hold).
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// The pid of the process listening on a unix socket (SO_PEERCRED of a connection to it; the
/// kernel answers it even when the listener never accepts).
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a properly sized ucred.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// The VMM behind `run_dir`'s control socket, attached, and whether it is paused; None when
/// nothing (or no specc-vmm) answers.
fn probe_vmm(run_dir: &Path) -> Option<(Machine, bool)> {
    let sock = run_dir.join("control.sock");
    let pid = peer_pid(&UnixStream::connect(&sock).ok()?)?;
    let mut c = specc_vmm::control::Client::connect(&sock, Duration::from_secs(2)).ok()?;
    let status = c.call(&specc_vmm::control::Request::Status).ok()?;
    let paused = match status["state"].as_str() {
        Some("running") => false,
        Some("paused") => true,
        _ => return None,
    };
    Some((Machine::attach(run_dir, pid).ok()?, paused))
}

impl Daemon {
    /// Opens the daemon's state and settles every VM whose transition a previous daemon left
    /// unfinished.
    pub fn open(config: Config) -> Result<Arc<Daemon>, DaemonError> {
        for d in [config.state_dir.join("vms"), config.run_dir.join("vms")] {
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let db = Db::open(&config.state_dir.join("state.db"))?;
        let store = Store::open(config.store.clone())
            .map_err(|e| DaemonError::Source(format!("opening the store: {}", chain(&e))))?;
        // The rig's /dev/kvm looks like hardware KVM from inside; the VMs run emulated.
        let mode = if specc_rig::in_rig() {
            "rig".to_owned()
        } else {
            specc_rig::detect().mode.name().to_owned()
        };
        let daemon = Arc::new(Daemon {
            config,
            db: Mutex::new(db),
            store,
            vms: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            mode,
            me: std::sync::OnceLock::new(),
            feeds: Mutex::new(HashMap::new()),
            mirror: std::sync::OnceLock::new(),
        });
        let _ = daemon.me.set(Arc::downgrade(&daemon));
        daemon.recover()?;
        Ok(daemon)
    }

    /// The virtualization mode VMs run under.
    pub fn mode(&self) -> &str {
        &self.mode
    }

    /// Mirrors every exposed port's listener into `ports` from now on (those of the VMs
    /// recovered already at once): in a rig placed by a host specd, the host's loopback then
    /// answers on the same port numbers (`specc_rig::bridge`). Set once, before serving.
    pub fn mirror_ports(&self, ports: Arc<specc_rig::bridge::RigPorts>) {
        if self.mirror.set(ports.clone()).is_err() {
            return;
        }
        for vm in self.list() {
            for p in &vm.ports {
                ports.listen(p.host);
            }
        }
    }

    /// Says which of `vm`'s ports the host's loopback does not answer on, and why.
    fn mark_ports(&self, vm: &mut Vm) {
        if let Some(m) = self.mirror.get() {
            for p in &mut vm.ports {
                p.unreachable = m.host_error(p.host);
            }
        }
    }

    /// The run directory of `id`'s `generation`-th VMM process.
    fn run_dir_of(&self, id: &str, generation: u32) -> PathBuf {
        self.config
            .run_dir
            .join("vms")
            .join(format!("{id}-{generation}"))
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot>, DaemonError> {
        self.slots()
            .get(id)
            .cloned()
            .ok_or_else(|| DaemonError::NotFound(id.to_owned()))
    }

    fn lock<'a>(slot: &'a Slot, id: &str) -> Result<MutexGuard<'a, Live>, DaemonError> {
        let live = slot.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.deleted {
            return Err(DaemonError::NotFound(id.to_owned()));
        }
        Ok(live)
    }

    /// [`Daemon::lock`] once no compaction of the VM's chain is running: what wakes, starts,
    /// stops or forks a suspended VM then restores from the merged chain instead of racing the
    /// switch to it (a compaction runs only while its VM is suspended).
    fn lock_settled<'a>(slot: &'a Slot, id: &str) -> Result<MutexGuard<'a, Live>, DaemonError> {
        let mut running = slot.compacting.lock().unwrap_or_else(|p| p.into_inner());
        while *running {
            running = slot
                .compacted
                .wait(running)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(running);
        Self::lock(slot, id)
    }

    /// Writes `live`'s record (with the slot's latest activity) durably.
    fn save(&self, slot: &Slot, live: &mut Live) -> Result<(), DaemonError> {
        live.rec.vm.last_active_ms = slot.last_active.load(Ordering::Relaxed);
        live.rec.vm.pid = live
            .machine
            .as_ref()
            .and_then(Machine::pid)
            .and_then(|p| i32::try_from(p).ok());
        self.db().put(&live.rec)?;
        Ok(())
    }

    /// Notices a VMM that ended by itself (a guest that crashed, a VMM killed from outside):
    /// the VM becomes `failed` with the reason, or `stopped` if it had cold-booted (its disk
    /// is all it had), durably. Returns whether it had ended.
    fn notice_exit(&self, slot: &Slot, live: &mut Live) -> bool {
        if !live.rec.vm.state.has_process() {
            return false;
        }
        let Some(how) = live.machine.as_mut().and_then(Machine::ended) else {
            return false;
        };
        let tail = live
            .machine
            .take()
            .map(|m| m.console_tail(15))
            .unwrap_or_default();
        let from = live.rec.vm.state;
        live.rec.vm.state = if matches!(live.rec.restore, RestorePoint::Boot { .. }) {
            VmState::Stopped
        } else {
            VmState::Failed
        };
        live.rec.run_dir = None;
        tracing::warn!(vm = %live.rec.vm.id, from = from.as_str(), to = live.rec.vm.state.as_str(), "{how}");
        live.rec.vm.error = Some(if tail.trim().is_empty() {
            how
        } else {
            format!("{how}; its last output:\n{}", tail.trim_end())
        });
        self.metrics.vmm_ended();
        if let Err(e) = self.save(slot, live) {
            tracing::warn!(vm = %live.rec.vm.id, "recording the VMM's end: {e}");
        }
        true
    }

    /// Refuses to go on with a VM whose VMM ended by itself (noticing it now if need be): what
    /// would wake it implicitly (an exec, a file call, a connection, a fork) must not run in an
    /// older state unasked.
    fn refuse_failed(&self, slot: &Slot, live: &mut Live) -> Result<(), DaemonError> {
        self.notice_exit(slot, live);
        if live.rec.vm.error.is_some()
            && matches!(live.rec.vm.state, VmState::Failed | VmState::Stopped)
        {
            return Err(Self::failed(&live.rec));
        }
        Ok(())
    }

    /// [`Daemon::lock`], having noticed whether the VM's VMM ended by itself.
    fn lock_noticed<'a>(
        &self,
        slot: &'a Slot,
        id: &str,
    ) -> Result<MutexGuard<'a, Live>, DaemonError> {
        let mut live = Self::lock(slot, id)?;
        self.notice_exit(slot, &mut live);
        Ok(live)
    }

    /// The error of a call to a VM whose VMM ended by itself.
    fn failed(rec: &Record) -> DaemonError {
        let id = rec.vm.id.clone();
        let hint = match (&rec.restore, rec.vm.state) {
            (RestorePoint::Boot { .. }, _) | (_, VmState::Stopped) => format!(
                "it is stopped with what its disk holds; start it (`specc vm start {id}`) or \
                 delete it (`specc vm rm {id}`)"
            ),
            (RestorePoint::Forked, _) => format!(
                "it is a fork child that was never suspended, so there is no snapshot to \
                 return to; delete it (`specc vm rm {id}`)"
            ),
            _ => format!(
                "what it did since its last snapshot is lost; wake it to return to that \
                 snapshot (`specc vm wake {id}`) or delete it (`specc vm rm {id}`)"
            ),
        };
        DaemonError::Failed {
            id,
            hint,
            reason: rec.vm.error.clone().unwrap_or_default(),
        }
    }

    fn insert(&self, rec: Record, machine: Option<Machine>) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            last_active: AtomicU64::new(rec.vm.last_active_ms),
            busy: AtomicUsize::new(0),
            compacting: Mutex::new(false),
            compacted: Condvar::new(),
            live: Mutex::new(Live {
                rec: rec.clone(),
                machine,
                deleted: false,
            }),
        });
        self.slots().insert(rec.vm.id.clone(), slot.clone());
        slot
    }

    // ---------------------------------------------------------------- recovery

    fn recover(&self) -> Result<(), DaemonError> {
        let records = self.db().all()?;
        for mut rec in records {
            let id = rec.vm.id.clone();
            let before = rec.vm.state;
            let alive = rec.run_dir.as_deref().and_then(probe_vmm);
            let mut machine = None;
            match (rec.vm.state, alive) {
                // A VMM that answers is this VM, whatever the last transition was (a suspend
                // whose snapshot did not complete leaves it running).
                (
                    VmState::Running | VmState::Paused | VmState::Waking | VmState::Starting,
                    Some((m, paused)),
                )
                | (VmState::Suspending, Some((m, paused)))
                    if !snapshot_complete(&rec) =>
                {
                    machine = Some(m);
                    rec.vm.state = if paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                }
                (VmState::Stopping, Some((m, paused))) if !stop_complete(&rec) => {
                    machine = Some(m);
                    rec.vm.state = if paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                }
                (VmState::Suspending, alive) if snapshot_complete(&rec) => {
                    // The snapshot is whole: finish the suspend (end the VMM if it lingers).
                    if let Some((mut m, _)) = alive {
                        let _ = m.kill();
                    }
                    let snap = pending_snapshot(&rec);
                    self.finish_suspend(&mut rec, snap);
                }
                (VmState::Stopping, alive) if stop_complete(&rec) => {
                    // The stop's snapshot is whole: finish the stop.
                    if let Some((mut m, _)) = alive {
                        let _ = m.kill();
                    }
                    let snap = stop_snapshot(&rec);
                    self.finish_stop(&mut rec, &snap)?;
                    discard_memory(&rec);
                    rec.vm.disk_bytes = disk_usage(&rec.dir);
                }
                (VmState::Creating, alive) => {
                    // The creator never got an answer: undo it.
                    if let Some((mut m, _)) = alive {
                        let _ = m.kill();
                    }
                    tracing::warn!(vm = %id, "removing a VM whose creation was interrupted");
                    self.db().delete(&id)?;
                    self.sweep_files();
                    continue;
                }
                (
                    VmState::Running
                    | VmState::Paused
                    | VmState::Waking
                    | VmState::Suspending
                    | VmState::Stopping
                    | VmState::Starting,
                    None,
                ) => {
                    // The VMM is gone (host crash, OOM kill): back to the last snapshot, or
                    // to its disk if it had booted.
                    if matches!(rec.restore, RestorePoint::Boot { .. }) {
                        tracing::warn!(vm = %id, state = before.as_str(), "VMM is gone: the VM is stopped with what its disk holds");
                        rec.vm.state = VmState::Stopped;
                        rec.run_dir = None;
                    } else if rec.restore == RestorePoint::Forked {
                        tracing::warn!(vm = %id, "fork child's VMM is gone and it has no snapshot: removing it");
                        self.db().delete(&id)?;
                        continue;
                    } else {
                        tracing::warn!(vm = %id, state = before.as_str(), "VMM is gone: the VM returns to its last snapshot");
                        rec.vm.state = VmState::Suspended;
                        rec.run_dir = None;
                    }
                }
                _ => {}
            }
            if rec.vm.state != before {
                tracing::info!(vm = %id, from = before.as_str(), to = rec.vm.state.as_str(), "recovered");
            }
            rec.vm.pid = machine
                .as_ref()
                .and_then(Machine::pid)
                .and_then(|p| i32::try_from(p).ok());
            if let RestorePoint::Snapshot { dir } = &rec.restore {
                // What an interrupted compaction left: a merge never switched to, or the files
                // of a switched one not yet removed.
                let removed = compact::remove_leftovers(&rec.dir, dir);
                if !removed.is_empty() {
                    tracing::info!(vm = %id, files = removed.len(), "removed what an interrupted compaction left");
                    rec.vm.disk_bytes = disk_usage(&rec.dir);
                }
            }
            self.db().put(&rec)?;
            // VMs made before pins existed get theirs now.
            if let Err(e) = self.pin(&rec) {
                tracing::warn!(vm = %id, "{e}");
            }
            let guest_ports: Vec<u16> = rec.vm.ports.iter().map(|p| p.guest).collect();
            let slot = self.insert(rec, machine);
            self.expose(&slot, &id, &guest_ports)?;
        }
        self.sweep_files();
        Ok(())
    }

    // ---------------------------------------------------------------- queries

    /// Every VM.
    pub fn list(&self) -> Vec<Vm> {
        let slots: Vec<_> = self.slots().values().cloned().collect();
        let mut out: Vec<Vm> = slots
            .iter()
            .filter_map(|s| {
                let mut live = s.live.lock().unwrap_or_else(|p| p.into_inner());
                if !live.deleted {
                    self.notice_exit(s, &mut live);
                }
                (!live.deleted).then(|| {
                    let mut vm = live.rec.vm.clone();
                    vm.last_active_ms = s.last_active.load(Ordering::Relaxed);
                    self.mark_ports(&mut vm);
                    vm
                })
            })
            .collect();
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        out
    }

    /// One VM.
    pub fn show(&self, id: &str) -> Result<Vm, DaemonError> {
        let slot = self.slot(id)?;
        let live = self.lock_noticed(&slot, id)?;
        let mut vm = live.rec.vm.clone();
        vm.last_active_ms = slot.last_active.load(Ordering::Relaxed);
        self.mark_ports(&mut vm);
        Ok(vm)
    }

    /// VMs per state.
    pub fn state_counts(&self) -> BTreeMap<VmState, usize> {
        let mut m = BTreeMap::new();
        for vm in self.list() {
            *m.entry(vm.state).or_default() += 1;
        }
        m
    }

    /// The last lines of the VM's console.
    pub fn logs(&self, id: &str, lines: usize) -> Result<String, DaemonError> {
        let slot = self.slot(id)?;
        let live = Self::lock(&slot, id)?;
        let Some(run_dir) = live.rec.run_dir.clone().or_else(|| {
            (live.rec.generation > 0).then(|| self.run_dir_of(&live.rec.vm.id, live.rec.generation))
        }) else {
            return Ok(String::new());
        };
        drop(live);
        let text = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        Ok(all[all.len().saturating_sub(lines)..].join("\n"))
    }

    // ---------------------------------------------------------------- create

    /// The restore point and layer of `source`, and the runtime policy its artifact carries
    /// (a bare layer key carries none).
    fn resolve(
        &self,
        source: &Source,
    ) -> Result<
        (
            RestorePoint,
            specc_plan::Digest,
            Option<specc_store::oci::RuntimePolicy>,
        ),
        DaemonError,
    > {
        let src = |e: &dyn std::error::Error| DaemonError::Source(chain(e));
        let imported = |dir: &Path| {
            specc_store::oci::import_artifact_config(dir, &self.store)
                .map(|c| (c.head, c.runtime))
                .map_err(|e| src(&e))
        };
        let (key, policy) = match source {
            Source::Layer { key } => (
                specc_plan::Digest::parse(key).ok_or_else(|| {
                    DaemonError::BadRequest(format!("layer key {key:?} is not 64 hex digits"))
                })?,
                None,
            ),
            Source::Layout { path } => imported(Path::new(path))?,
            Source::Registry { reference } => {
                let layout = self.store.temp_dir("pull").map_err(|e| src(&e))?;
                specc_store::registry::pull(
                    reference,
                    layout.path(),
                    &specc_store::registry::Options::default(),
                )
                .map_err(|e| src(&e))?;
                imported(layout.path())?
            }
        };
        let (vmstate, memory, disks) = specc_build::builder::restore_sources(&self.store, &key)
            .map_err(|e| match &e {
                specc_build::builder::BuildError::Incomplete { .. } => DaemonError::NotFound(
                    format!("layer {key} in the store (build it with `specc build`, or pull it)"),
                ),
                _ => src(&e),
            })?;
        let _ = self.store.touch_layer(&key);
        Ok((
            RestorePoint::Image {
                vmstate,
                memory,
                disks,
            },
            key,
            policy,
        ))
    }

    /// Creates a VM from a snapshot and waits until its agent answers.
    pub fn create(&self, req: CreateVm) -> Result<Vm, DaemonError> {
        let t0 = Instant::now();
        let r = self.create_inner(req);
        self.metrics.observe("create", t0.elapsed(), r.is_ok());
        r
    }

    fn create_inner(&self, req: CreateVm) -> Result<Vm, DaemonError> {
        if let Some(p) = &req.persistence {
            p.validate().map_err(DaemonError::BadRequest)?;
        }
        let id = random_id()?;
        let name = req.name.clone().unwrap_or_else(|| format!("vm-{id}"));
        if !valid_name(&name) {
            return Err(DaemonError::BadRequest(format!(
                "name {name:?} is not a hostname (letters, digits, '-', at most 63)"
            )));
        }
        let (restore, layer, policy) = self.resolve(&req.source)?;
        // What the request leaves out, the artifact's spec says; without either: persistent,
        // no timers, no ports.
        let persistence = req
            .persistence
            .or(policy.as_ref().map(|p| p.persistence.into()))
            .unwrap_or(api::Persistence::Persistent);
        persistence.validate().map_err(DaemonError::BadRequest)?;
        let idle = req
            .idle
            .or(policy.as_ref().map(|p| api::IdlePolicy {
                pause_after_s: p.pause_after_s,
                suspend_after_s: p.suspend_after_s,
            }))
            .unwrap_or_default();
        let ports = req
            .ports
            .clone()
            .or(policy.map(|p| p.ports))
            .unwrap_or_default();
        let now = now_ms();
        let rec = Record {
            vm: Vm {
                id: id.clone(),
                name,
                state: VmState::Creating,
                source: req.source,
                parent: None,
                persistence,
                idle,
                ports: Vec::new(),
                net: req.net,
                created_ms: now,
                last_active_ms: now,
                pid: None,
                disk_bytes: 0,
                suspends: 0,
                error: None,
            },
            dir: self.config.state_dir.join("vms").join(&id),
            restore,
            run_dir: None,
            generation: 0,
            lineage: Vec::new(),
            layer: Some(layer.to_hex()),
        };
        std::fs::create_dir_all(&rec.dir)
            .map_err(io_err(format!("creating {}", rec.dir.display())))?;
        // Pinned before it is recorded: no VM exists without its pin (a pin without a VM is
        // swept).
        self.pin(&rec)?;
        self.db().put(&rec)?;
        let slot = self.insert(rec, None);
        let mut live = Self::lock(&slot, &id)?;
        let started = self.start_vm(&mut live, "create");
        if let Err(e) = started {
            live.deleted = true;
            drop(live);
            self.forget(&id);
            return Err(e);
        }
        live.rec.vm.state = VmState::Running;
        live.rec.vm.disk_bytes = disk_usage(&live.rec.dir);
        // Idle time counts from when the VM could first be used, not from the request.
        slot.last_active.store(now_ms(), Ordering::Relaxed);
        self.save(&slot, &mut live)?;
        let vm = live.rec.vm.clone();
        drop(live);
        if let Err(e) = self.expose(&slot, &id, &ports) {
            // A VM whose ports cannot be served is not what was asked for: undo it.
            let _ = self.delete(&id);
            return Err(e);
        }
        Ok(self.show(&vm.id).unwrap_or(vm))
    }

    /// Starts a VMM from the record's restore point and waits for the agent; records the run
    /// directory first (so a daemon killed meanwhile finds the process).
    fn start_vm(&self, live: &mut Live, op: &'static str) -> Result<(), DaemonError> {
        let rec = &mut live.rec;
        let id = rec.vm.id.clone();
        let vm_err = |message: String| DaemonError::Vm {
            id: id.clone(),
            op,
            message,
        };
        rec.generation += 1;
        let run_dir = self.run_dir_of(&rec.vm.id, rec.generation);
        let top = rec.dir.join(format!("disk-{}.diff", rec.generation));
        rec.run_dir = Some(run_dir.clone());
        self.db().put(rec)?;
        if let RestorePoint::Boot {
            cmdline,
            vcpus,
            mem_bytes,
            disks,
            top,
        } = &rec.restore
        {
            let kernel = self.kernel_for(rec)?;
            let config = MachineConfig {
                kernel,
                cmdline: cmdline.clone(),
                vcpus: *vcpus,
                mem_bytes: *mem_bytes,
                disk: Disk {
                    layers: disks.clone(),
                    top: top.clone(),
                },
                net: rec.vm.net,
            };
            let mut machine =
                Machine::launch(&config, &run_dir, specc_machine::Source::Boot, DETACHED)
                    .map_err(|e| vm_err(chain(&e)))?;
            // The agent of a booted guest answers once init has started it; the hostname is
            // the VM's name, as after a restore.
            let hello = machine
                .connect_agent(self.config.agent_timeout)
                .and_then(|mut agent| Machine::announce_restored(&mut agent, &rec.vm.name));
            if let Err(e) = hello {
                let _ = machine.kill();
                return Err(vm_err(chain(&e)));
            }
            live.machine = Some(machine);
            return Ok(());
        }
        let vmstate = match &rec.restore {
            RestorePoint::Image { vmstate, .. } => vmstate.clone(),
            RestorePoint::Snapshot { dir } => dir.join(specc_vmm::snapshot_dir::VMSTATE_FILE),
            RestorePoint::Forked | RestorePoint::Boot { .. } => PathBuf::new(),
        };
        // The shape is the snapshot's; the VMM checks the memory files against it.
        let shape: Option<specc_vmm::snapshot_dir::VmSnapshot> =
            specc_snapshot::read_state_file(&vmstate, specc_vmm::snapshot_dir::VMSTATE_LIMIT).ok();
        let (vcpus, mem_bytes) = shape.map_or((1, 0), |s| (s.vcpus, s.mem_bytes));
        let config = |layers: Vec<PathBuf>| MachineConfig {
            // Unused on restore: the kernel is in the snapshot's memory.
            kernel: PathBuf::new(),
            cmdline: DEFAULT_CMDLINE.to_owned(),
            vcpus,
            mem_bytes,
            disk: Disk {
                layers,
                top: top.clone(),
            },
            net: rec.vm.net,
        };
        let launched = match &rec.restore {
            RestorePoint::Image {
                vmstate,
                memory,
                disks,
            } => Machine::launch(
                &config(disks.clone()),
                &run_dir,
                specc_machine::Source::Image { vmstate, memory },
                DETACHED,
            ),
            RestorePoint::Snapshot { dir } => Machine::launch(
                &config(Vec::new()),
                &run_dir,
                specc_machine::Source::Snapshot(dir),
                DETACHED,
            ),
            RestorePoint::Forked | RestorePoint::Boot { .. } => {
                return Err(vm_err(
                    "a fork child without a snapshot cannot be restarted".into(),
                ));
            }
        };
        let mut machine = launched.map_err(|e| vm_err(chain(&e)))?;
        let hello = machine
            .connect_agent(self.config.agent_timeout)
            .and_then(|mut agent| Machine::announce_restored(&mut agent, &rec.vm.name));
        if let Err(e) = hello {
            let _ = machine.kill();
            return Err(vm_err(chain(&e)));
        }
        live.machine = Some(machine);
        Ok(())
    }

    // ---------------------------------------------------------------- transitions

    /// Pauses a running VM.
    pub fn pause(&self, id: &str) -> Result<Vm, DaemonError> {
        let slot = self.slot(id)?;
        let mut live = self.lock_noticed(&slot, id)?;
        self.pause_locked(&slot, &mut live)?;
        Ok(live.rec.vm.clone())
    }

    fn pause_locked(&self, slot: &Slot, live: &mut Live) -> Result<(), DaemonError> {
        let t0 = Instant::now();
        match live.rec.vm.state {
            VmState::Paused => return Ok(()),
            VmState::Running => {}
            s => return Err(conflict(&live.rec, s, "pause")),
        }
        let r = self.machine(live, "pause")?.pause();
        self.metrics.observe("pause", t0.elapsed(), r.is_ok());
        r.map_err(|e| vm_error(&live.rec, "pause", &e))?;
        live.rec.vm.state = VmState::Paused;
        self.save(slot, live)
    }

    /// Resumes a paused VM (a running one is left alone).
    pub fn resume(&self, id: &str) -> Result<Vm, DaemonError> {
        let slot = self.slot(id)?;
        let mut live = self.lock_noticed(&slot, id)?;
        self.resume_locked(&slot, &mut live)?;
        Ok(live.rec.vm.clone())
    }

    fn resume_locked(&self, slot: &Slot, live: &mut Live) -> Result<(), DaemonError> {
        let t0 = Instant::now();
        match live.rec.vm.state {
            VmState::Running => return Ok(()),
            VmState::Paused => {}
            s => return Err(conflict(&live.rec, s, "resume")),
        }
        let r = self.machine(live, "resume")?.resume();
        self.metrics.observe("resume", t0.elapsed(), r.is_ok());
        r.map_err(|e| vm_error(&live.rec, "resume", &e))?;
        live.rec.vm.state = VmState::Running;
        slot.last_active.store(now_ms(), Ordering::Relaxed);
        self.save(slot, live)
    }

    fn machine<'a>(&self, live: &'a Live, op: &'static str) -> Result<&'a Machine, DaemonError> {
        live.machine.as_ref().ok_or_else(|| DaemonError::Vm {
            id: live.rec.vm.id.clone(),
            op,
            message: "the daemon has no VMM process for it".into(),
        })
    }

    /// Suspends a VM to disk (an ephemeral VM is deleted instead).
    pub fn suspend(&self, id: &str) -> Result<Option<Vm>, DaemonError> {
        let slot = self.slot(id)?;
        let mut live = self.lock_noticed(&slot, id)?;
        if live.rec.vm.persistence == api::Persistence::Ephemeral {
            self.delete_locked(&mut live)?;
            drop(live);
            self.forget(id);
            return Ok(None);
        }
        self.suspend_locked(&slot, &mut live)?;
        let vm = live.rec.vm.clone();
        drop(live);
        self.enforce_budget();
        Ok(Some(vm))
    }

    fn suspend_locked(&self, slot: &Arc<Slot>, live: &mut Live) -> Result<(), DaemonError> {
        let t0 = Instant::now();
        let r = self.suspend_inner(slot, live);
        self.metrics.observe("suspend", t0.elapsed(), r.is_ok());
        r
    }

    fn suspend_inner(&self, slot: &Arc<Slot>, live: &mut Live) -> Result<(), DaemonError> {
        match live.rec.vm.state {
            VmState::Suspended => return Ok(()),
            VmState::Running | VmState::Paused => {}
            s => return Err(conflict(&live.rec, s, "suspend")),
        }
        let n = live.rec.vm.suspends + 1;
        let snap = live.rec.dir.join(format!("snap-{n}"));
        self.snapshot_and_exit(slot, live, &snap, VmState::Suspending, "suspend")?;
        self.finish_suspend(&mut live.rec, snap);
        self.save(slot, live)?;
        self.schedule_compaction(slot, live);
        Ok(())
    }

    // ---------------------------------------------------------------- compaction

    /// Whether any VM (living, or kept for its files) was forked from `id` or its descendants.
    fn has_descendants(&self, id: &str) -> Result<bool, DaemonError> {
        Ok(self
            .db()
            .all()?
            .iter()
            .any(|r| r.lineage.iter().any(|a| a == id)))
    }

    /// After a suspend: when the VM's own chain is past the policy's bound, merges it into
    /// `merged-<n>/` (see `compact`). The merge runs on a thread of its own, so the suspend
    /// answers at once; a wake (or start, stop, fork) meanwhile waits for it. A chain twice
    /// the bound (merges discarded because the VM woke before their switch) is merged here,
    /// before the suspend answers, so no chain grows without bound.
    fn schedule_compaction(&self, slot: &Arc<Slot>, live: &mut Live) {
        let RestorePoint::Snapshot { dir } = &live.rec.restore else {
            return;
        };
        let id = live.rec.vm.id.clone();
        let plan = self
            .has_descendants(&id)
            .map_err(|e| e.to_string())
            .and_then(|d| compact::Plan::new(&live.rec.dir, dir, d).map_err(|e| chain(&e)));
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(vm = %id, "compaction: cannot plan it: {e}");
                self.metrics.compaction("error", 0);
                return;
            }
        };
        let shape = plan.shape();
        if !policy::should_compact(&shape) {
            return;
        }
        let out = live.rec.dir.join(format!(
            "{}{}",
            compact::MERGED_PREFIX,
            live.rec.vm.suspends
        ));
        let me = self.me.get().and_then(std::sync::Weak::upgrade);
        let inline = shape.memory_diffs.max(shape.disk_diffs) > 2 * policy::MAX_CHAIN_DIFFS;
        let Some(me) = me.filter(|_| !inline) else {
            let t0 = Instant::now();
            let merged = compact::write(&plan, &out);
            self.switch_chain(slot, live, &plan, merged, t0);
            return;
        };
        *slot.compacting.lock().unwrap_or_else(|p| p.into_inner()) = true;
        /// Ends the compaction whatever happens to its thread, so no waiter hangs.
        struct Done(Arc<Slot>);
        impl Drop for Done {
            fn drop(&mut self) {
                *self.0.compacting.lock().unwrap_or_else(|p| p.into_inner()) = false;
                self.0.compacted.notify_all();
            }
        }
        let done = Done(slot.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("compact-{id}"))
            .spawn(move || {
                let t0 = Instant::now();
                let merged = compact::write(&plan, &out);
                let slot = done.0.clone();
                let mut live = slot.live.lock().unwrap_or_else(|p| p.into_inner());
                me.switch_chain(&slot, &mut live, &plan, merged, t0);
                drop(live);
                drop(done);
            });
        if let Err(e) = spawned {
            // The closure (and its `Done`) was dropped: the flag is clear again.
            tracing::warn!(vm = %id, "compaction: cannot start its thread: {e}");
            self.metrics.compaction("error", 0);
        }
    }

    /// Makes the merged snapshot the VM's restore point, if the VM is still suspended at the
    /// snapshot the merge started from (else the merge is thrown away: the VM runs from the
    /// old chain, whose files it maps), then removes the files it replaces.
    fn switch_chain(
        &self,
        slot: &Slot,
        live: &mut Live,
        plan: &compact::Plan,
        merged: Result<compact::Merged, compact::CompactError>,
        t0: Instant,
    ) {
        let id = live.rec.vm.id.clone();
        let merged = match merged {
            Ok(m) => m,
            // Deleted meanwhile: its directory went under the merge.
            Err(_) if live.deleted => {
                self.metrics.compaction("discarded", 0);
                return;
            }
            Err(e) => {
                tracing::warn!(vm = %id, "compaction failed (the chain stays as it is): {}", chain(&e));
                self.metrics.compaction("error", 0);
                self.metrics.observe("compact", t0.elapsed(), false);
                return;
            }
        };
        let current =
            matches!(&live.rec.restore, RestorePoint::Snapshot { dir } if *dir == plan.from);
        if live.deleted || live.rec.vm.state != VmState::Suspended || !current {
            let _ = std::fs::remove_dir_all(&merged.dir);
            tracing::info!(vm = %id, "compaction discarded: the VM left {} meanwhile", plan.from.display());
            self.metrics.compaction("discarded", 0);
            return;
        }
        let before = std::mem::replace(
            &mut live.rec.restore,
            RestorePoint::Snapshot {
                dir: merged.dir.clone(),
            },
        );
        // The switch: one durable write. Before it a restart restores the old chain (and
        // removes `merged.dir`), after it the new one (and removes what it replaces).
        if let Err(e) = self.save(slot, live) {
            live.rec.restore = before;
            let _ = std::fs::remove_dir_all(&merged.dir);
            tracing::warn!(vm = %id, "compaction: recording the merged chain failed: {e}");
            self.metrics.compaction("error", 0);
            return;
        }
        let removed = compact::remove_leftovers(&live.rec.dir, &merged.dir);
        let disk_before = live.rec.vm.disk_bytes;
        live.rec.vm.disk_bytes = disk_usage(&live.rec.dir);
        if let Err(e) = self.save(slot, live) {
            tracing::warn!(vm = %id, "compaction: recording the disk use: {e}");
        }
        self.metrics.compaction(
            "merged",
            u64::try_from(merged.memory_diffs + merged.disk_diffs).unwrap_or(u64::MAX),
        );
        self.metrics.observe("compact", t0.elapsed(), true);
        tracing::info!(
            vm = %id,
            into = %merged.dir.display(),
            memory_diffs = merged.memory_diffs,
            disk_diffs = merged.disk_diffs,
            memory_data_bytes = merged.memory_data_bytes,
            files_removed = removed.len(),
            disk_bytes_before = disk_before,
            disk_bytes_after = live.rec.vm.disk_bytes,
            took_ms = t0.elapsed().as_millis(),
            "compacted the snapshot chain"
        );
    }

    /// Snapshots the VM to `snap` and lets its VMM exit, with `during` recorded meanwhile; on
    /// failure the VM keeps running in its previous state. A leftover `snap` of an earlier
    /// failed attempt (vmstate missing, so never used) is removed first. Memory mapped from
    /// files (a restore) needs only the pages written since; a fork child's memory is
    /// anonymous and is written whole (sparse).
    fn snapshot_and_exit(
        &self,
        slot: &Slot,
        live: &mut Live,
        snap: &Path,
        during: VmState,
        op: &'static str,
    ) -> Result<(), DaemonError> {
        let prev = live.rec.vm.state;
        let _ = std::fs::remove_dir_all(snap);
        live.rec.vm.state = during;
        self.save(slot, live)?;
        let diff = memory_is_file_backed(&live.rec.restore);
        let shot = self.machine(live, op).and_then(|m| {
            m.snapshot(snap, diff, specc_machine::After::Exit)
                .map_err(|e| vm_error(&live.rec, op, &e))
        });
        if let Err(e) = shot {
            live.rec.vm.state = prev;
            self.save(slot, live)?;
            return Err(e);
        }
        if let Some(mut m) = live.machine.take() {
            let _ = m.wait_timeout(Duration::from_secs(30));
        }
        Ok(())
    }

    fn finish_suspend(&self, rec: &mut Record, snap: PathBuf) {
        rec.restore = RestorePoint::Snapshot { dir: snap };
        rec.vm.state = VmState::Suspended;
        rec.vm.suspends += 1;
        rec.vm.pid = None;
        rec.run_dir = None;
        rec.vm.disk_bytes = disk_usage(&rec.dir);
    }

    /// Wakes a suspended VM or resumes a paused one; returns whether anything had to be done.
    pub fn wake(&self, id: &str) -> Result<(Vm, bool), DaemonError> {
        let slot = self.slot(id)?;
        let mut live = Self::lock_settled(&slot, id)?;
        let woke = self.wake_locked(&slot, &mut live)?;
        Ok((live.rec.vm.clone(), woke))
    }

    fn wake_locked(&self, slot: &Slot, live: &mut Live) -> Result<bool, DaemonError> {
        match live.rec.vm.state {
            VmState::Running => return Ok(false),
            VmState::Paused => {
                self.resume_locked(slot, live)?;
                return Ok(true);
            }
            VmState::Suspended => {}
            VmState::Failed if live.rec.restore != RestorePoint::Forked => {}
            VmState::Stopped => return Err(DaemonError::Stopped(live.rec.vm.id.clone())),
            VmState::Failed => return Err(Self::failed(&live.rec)),
            s => return Err(conflict(&live.rec, s, "wake")),
        }
        let t0 = Instant::now();
        let at_rest = live.rec.vm.state;
        live.rec.vm.state = VmState::Waking;
        self.save(slot, live)?;
        let r = self.start_vm(live, "wake");
        self.metrics.observe("wake", t0.elapsed(), r.is_ok());
        if let Err(e) = r {
            live.rec.vm.state = at_rest;
            live.rec.run_dir = None;
            self.save(slot, live)?;
            return Err(e);
        }
        live.rec.vm.state = VmState::Running;
        live.rec.vm.error = None;
        slot.last_active.store(now_ms(), Ordering::Relaxed);
        self.save(slot, live)?;
        Ok(true)
    }

    /// Powers a VM off: its guest syncs its file systems, the VMM exits, its memory (and the
    /// memory of every earlier suspend) is discarded and only its disk is kept. A suspended
    /// VM just drops its memory.
    pub fn stop(&self, id: &str) -> Result<Vm, DaemonError> {
        let t0 = Instant::now();
        let slot = self.slot(id)?;
        let mut live = Self::lock_settled(&slot, id)?;
        self.notice_exit(&slot, &mut live);
        let r = self.stop_locked(&slot, &mut live);
        self.metrics.observe("stop", t0.elapsed(), r.is_ok());
        r?;
        let vm = live.rec.vm.clone();
        drop(live);
        self.enforce_budget();
        Ok(vm)
    }

    fn stop_locked(&self, slot: &Slot, live: &mut Live) -> Result<(), DaemonError> {
        match live.rec.vm.state {
            VmState::Stopped => return Ok(()),
            VmState::Running | VmState::Paused | VmState::Suspended | VmState::Failed => {}
            s => return Err(conflict(&live.rec, s, "stop")),
        }
        // Refuse before anything happens if it could never be started again.
        self.kernel_for(&live.rec)?;
        if matches!(live.rec.vm.state, VmState::Suspended | VmState::Failed) {
            // A failed VM's disk as of its last snapshot is the one it can boot from.
            let RestorePoint::Snapshot { dir } = live.rec.restore.clone() else {
                return Err(conflict(&live.rec, live.rec.vm.state, "stop"));
            };
            // One write: the record goes from suspended to stopped (the memory is removed
            // after it).
            self.finish_stop(&mut live.rec, &dir)?;
            self.save(slot, live)?;
            discard_memory(&live.rec);
            live.rec.vm.disk_bytes = disk_usage(&live.rec.dir);
            return self.save(slot, live);
        }
        if live.rec.vm.state == VmState::Paused {
            self.resume_locked(slot, live)?;
        }
        // What the guest wrote is in its page cache: flush it to the disk that is kept. A
        // guest whose agent does not answer is stopped all the same, with what it flushed.
        if let Some(vsock) = live.rec.run_dir.as_ref().map(|d| d.join("vsock.sock")) {
            let synced = self.agent(slot, &live.rec.vm.id, &vsock).and_then(|mut a| {
                a.exec_output(&ExecRequest::new(["sync"]))
                    .map_err(|e| DaemonError::Vm {
                        id: live.rec.vm.id.clone(),
                        op: "sync",
                        message: chain(&e),
                    })
            });
            if let Err(e) = synced {
                tracing::warn!(vm = %live.rec.vm.id, "stop: the guest did not sync: {e}");
            }
        }
        let snap = stop_snapshot(&live.rec);
        // The snapshot is the one way to get the VM's whole frozen disk stack from its VMM
        // (forks freeze layers under it); its memory is deleted right after.
        self.snapshot_and_exit(slot, live, &snap, VmState::Stopping, "stop")?;
        self.finish_stop(&mut live.rec, &snap)?;
        self.save(slot, live)?;
        discard_memory(&live.rec);
        live.rec.vm.disk_bytes = disk_usage(&live.rec.dir);
        self.save(slot, live)
    }

    /// Makes `rec` a stopped VM whose disk is the frozen stack of the snapshot in `snap`.
    fn finish_stop(&self, rec: &mut Record, snap: &Path) -> Result<(), DaemonError> {
        let shot = specc_vmm::snapshot_dir::read(snap).map_err(|e| DaemonError::Vm {
            id: rec.vm.id.clone(),
            op: "stop",
            message: format!("reading {}: {}", snap.display(), chain(&e)),
        })?;
        // Layers inside the snapshot directory are recorded relative to it.
        let disks = shot
            .disks
            .first()
            .map(|d| {
                d.layers
                    .iter()
                    .map(|l| specc_vmm::snapshot_dir::resolve(snap, l))
                    .collect()
            })
            .unwrap_or_default();
        let cmdline = if shot.cmdline.trim().is_empty() {
            DEFAULT_CMDLINE.to_owned()
        } else {
            shot.cmdline
        };
        rec.restore = RestorePoint::Boot {
            cmdline,
            vcpus: shot.vcpus,
            mem_bytes: shot.mem_bytes,
            disks,
            top: rec.dir.join(format!("boot-{}.diff", rec.generation)),
        };
        rec.vm.state = VmState::Stopped;
        rec.vm.pid = None;
        rec.run_dir = None;
        Ok(())
    }

    /// The kernel a stopped VM of `rec` boots: the layer's own, else `--kernel`, else the
    /// guest kernel `specc kernel build` left in the cache.
    fn kernel_for(&self, rec: &Record) -> Result<PathBuf, DaemonError> {
        let missing =
            |why: String| DaemonError::Source(format!("no kernel to boot VM {}: {why}", rec.vm.id));
        let mut key = rec.layer.as_deref().and_then(specc_plan::Digest::parse);
        while let Some(k) = key {
            let Ok(Some(layer)) = self.store.layer(&k) else {
                break;
            };
            if let Some(part) = layer.part(specc_store::Role::Kernel) {
                let p = self.store.blob_path(&part.digest);
                if p.is_file() {
                    return Ok(p);
                }
            }
            key = layer.parents.first().copied();
        }
        if let Some(k) = &self.config.kernel {
            return if k.is_file() {
                Ok(k.clone())
            } else {
                Err(missing(format!("--kernel {} does not exist", k.display())))
            };
        }
        match specc_guestkit::kernel::cached_kernel(specc_guestkit::kernel::KernelKind::Guest) {
            Ok(Some(k)) if k.vmlinux.is_file() => Ok(k.vmlinux),
            Ok(_) => Err(missing(
                "its layers carry none, specd has no --kernel, and no guest kernel is built \
                 (`specc kernel build`)"
                    .into(),
            )),
            Err(e) => Err(missing(chain(&e))),
        }
    }

    /// Makes a VM run: a stopped one cold-boots from its kernel and its own disk (what the
    /// guest had written to disk is there, memory and `/tmp` are not); a suspended one wakes, a
    /// paused one resumes. Returns whether anything had to be done.
    pub fn start(&self, id: &str) -> Result<(Vm, bool), DaemonError> {
        let slot = self.slot(id)?;
        let mut live = Self::lock_settled(&slot, id)?;
        if live.rec.vm.state != VmState::Stopped {
            let woke = self.wake_locked(&slot, &mut live)?;
            return Ok((live.rec.vm.clone(), woke));
        }
        let t0 = Instant::now();
        live.rec.vm.state = VmState::Starting;
        self.save(&slot, &mut live)?;
        let r = self.start_vm(&mut live, "start");
        self.metrics.observe("start", t0.elapsed(), r.is_ok());
        if let Err(e) = r {
            live.rec.vm.state = VmState::Stopped;
            live.rec.run_dir = None;
            self.save(&slot, &mut live)?;
            return Err(e);
        }
        live.rec.vm.state = VmState::Running;
        live.rec.vm.error = None;
        live.rec.vm.disk_bytes = disk_usage(&live.rec.dir);
        slot.last_active.store(now_ms(), Ordering::Relaxed);
        self.save(&slot, &mut live)?;
        Ok((live.rec.vm.clone(), true))
    }

    /// Deletes a VM: its process ends and its files go (those its fork children still need
    /// stay until the last of them is deleted).
    pub fn delete(&self, id: &str) -> Result<(), DaemonError> {
        let slot = self.slot(id)?;
        let mut live = Self::lock(&slot, id)?;
        self.delete_locked(&mut live)?;
        drop(live);
        self.forget(id);
        Ok(())
    }

    fn delete_locked(&self, live: &mut Live) -> Result<(), DaemonError> {
        if let Some(mut m) = live.machine.take() {
            let _ = m.kill();
        }
        self.db().delete(&live.rec.vm.id)?;
        live.deleted = true;
        Ok(())
    }

    fn forget(&self, id: &str) {
        let _ = self.db().delete(id);
        self.slots().remove(id);
        self.sweep_files();
    }

    /// Removes the directories of deleted VMs that no living VM descends from.
    fn sweep_files(&self) {
        let Ok(records) = self.db().all() else {
            return;
        };
        let needed: std::collections::HashSet<String> = records
            .iter()
            .flat_map(|r| r.lineage.iter().cloned().chain([r.vm.id.clone()]))
            .collect();
        // State dirs are named by id, run dirs `<id>-<generation>`.
        for root in [&self.config.state_dir, &self.config.run_dir] {
            let Ok(entries) = std::fs::read_dir(root.join("vms")) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.split_once('-').map_or(name.as_str(), |(id, _)| id);
                if !needed.contains(id)
                    && let Err(err) = std::fs::remove_dir_all(e.path())
                {
                    tracing::warn!(dir = %e.path().display(), "cannot remove: {err}");
                }
            }
        }
        // Pins of VMs that are gone (only this daemon's: other daemons may share the store).
        let alive: std::collections::HashSet<String> =
            records.iter().map(|r| self.pin_name(&r.vm.id)).collect();
        let prefix = self.pin_name("");
        if let Ok(pins) = self.store.pins() {
            for name in pins.keys() {
                if name.starts_with(&prefix)
                    && !alive.contains(name)
                    && let Err(e) = self.store.unpin(name)
                {
                    tracing::warn!(pin = %name, "cannot unpin: {}", chain(&e));
                }
            }
        }
    }

    /// The store pin of VM `id`: this daemon's (by its state directory) and the VM's.
    fn pin_name(&self, id: &str) -> String {
        format!("{}{id}", pin_prefix(&self.config.state_dir))
    }

    /// Pins the store layer `rec` restores from, so `specc gc` keeps its blobs while the VM
    /// exists (even while the daemon is down).
    fn pin(&self, rec: &Record) -> Result<(), DaemonError> {
        let key = rec
            .layer
            .as_deref()
            .or(match &rec.vm.source {
                Source::Layer { key } => Some(key.as_str()),
                _ => None,
            })
            .and_then(specc_plan::Digest::parse);
        let Some(key) = key else {
            return Ok(());
        };
        let owner = format!(
            "specd {} VM {} ({})",
            self.config.state_dir.display(),
            rec.vm.id,
            rec.vm.name
        );
        self.store
            .pin(&self.pin_name(&rec.vm.id), &owner, &[key])
            .map_err(|e| DaemonError::Source(format!("pinning the VM's layer: {}", chain(&e))))
    }

    // ---------------------------------------------------------------- fork

    /// Forks a running (or paused, or suspended: it is woken first) VM into `count` new VMs,
    /// in `mode`.
    pub fn fork(
        &self,
        id: &str,
        count: u32,
        mode: api::ForkMode,
    ) -> Result<api::Forked, DaemonError> {
        let t0 = Instant::now();
        let r = self.fork_inner(id, count, mode);
        self.metrics.observe("fork", t0.elapsed(), r.is_ok());
        r
    }

    fn fork_inner(
        &self,
        id: &str,
        count: u32,
        mode: api::ForkMode,
    ) -> Result<api::Forked, DaemonError> {
        if count == 0 || count > 64 {
            return Err(DaemonError::BadRequest(format!(
                "fork count is 1 to 64, got {count}"
            )));
        }
        let slot = self.slot(id)?;
        let mut live = Self::lock_settled(&slot, id)?;
        self.refuse_failed(&slot, &mut live)?;
        self.wake_locked(&slot, &mut live)?;
        let now = now_ms();
        let mut children = Vec::new();
        for i in 0..count {
            let cid = random_id()?;
            let dir = self.config.state_dir.join("vms").join(&cid);
            let run_dir = self.run_dir_of(&cid, 1);
            std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            let mut lineage = vec![id.to_owned()];
            lineage.extend(live.rec.lineage.iter().cloned());
            let rec = Record {
                vm: Vm {
                    id: cid.clone(),
                    name: child_name(&live.rec.vm.name, i, &cid),
                    state: VmState::Creating,
                    source: live.rec.vm.source.clone(),
                    parent: Some(id.to_owned()),
                    persistence: live.rec.vm.persistence,
                    idle: live.rec.vm.idle,
                    ports: Vec::new(),
                    net: live.rec.vm.net,
                    created_ms: now,
                    last_active_ms: now,
                    pid: None,
                    disk_bytes: 0,
                    suspends: 0,
                    error: None,
                },
                dir,
                restore: RestorePoint::Forked,
                run_dir: Some(run_dir),
                generation: 1,
                lineage,
                layer: live.rec.layer.clone(),
            };
            self.pin(&rec)?;
            self.db().put(&rec)?;
            children.push(rec);
        }
        let dirs: Vec<PathBuf> = children.iter().filter_map(|c| c.run_dir.clone()).collect();
        let vmm_mode = match mode {
            api::ForkMode::Cow => specc_vmm::snapshot::ForkMode::Cow,
            api::ForkMode::Precopy => specc_vmm::snapshot::ForkMode::Precopy,
        };
        let forked = self.machine(&live, "fork").and_then(|m| {
            m.fork_with_report(&dirs, Some(vmm_mode))
                .map_err(|e| vm_error(&live.rec, "fork", &e))
        });
        let (vmm_report, machines) = match forked {
            Ok(f) => f,
            Err(e) => {
                for c in &children {
                    let _ = self.db().delete(&c.vm.id);
                }
                drop(live);
                self.sweep_files();
                return Err(e);
            }
        };
        slot.last_active.store(now_ms(), Ordering::Relaxed);
        if let RestorePoint::Boot { disks, top, .. } = &mut live.rec.restore {
            // The fork froze the booted source's top diff beside it (`<top>.fork<n>`) and the
            // source goes on in a fresh one: the frozen layer is now part of its boot stack.
            for layer in fork_frozen_layers(top) {
                if !disks.contains(&layer) {
                    disks.push(layer);
                }
            }
            self.save(&slot, &mut live)?;
        }
        let source_ports = live.rec.vm.ports.clone();
        drop(live);
        let report = fork_report(&vmm_report, &children, &machines);
        let mut vms = Vec::new();
        let mut failures = Vec::new();
        for (mut rec, fm) in children.into_iter().zip(machines) {
            let cid = rec.vm.id.clone();
            let Some(mut machine) = fm.machine else {
                failures.push(format!("{cid}: {}", fm.report.error.unwrap_or_default()));
                let _ = self.db().delete(&cid);
                continue;
            };
            let hello = machine
                .connect_agent(self.config.agent_timeout)
                .and_then(|mut a| Machine::announce_restored(&mut a, &rec.vm.name));
            if let Err(e) = hello {
                let _ = machine.kill();
                failures.push(format!("{cid}: {}", chain(&e)));
                let _ = self.db().delete(&cid);
                continue;
            }
            rec.vm.state = VmState::Running;
            rec.vm.disk_bytes = disk_usage(&rec.dir);
            rec.vm.last_active_ms = now_ms();
            let slot = self.insert(rec, Some(machine));
            let mut live = Self::lock(&slot, &cid)?;
            self.save(&slot, &mut live)?;
            drop(live);
            let guest_ports: Vec<u16> = source_ports.iter().map(|p| p.guest).collect();
            self.expose(&slot, &cid, &guest_ports)?;
            vms.push(self.show(&cid)?);
        }
        self.sweep_files();
        if vms.is_empty() && !failures.is_empty() {
            return Err(DaemonError::Vm {
                id: id.to_owned(),
                op: "fork",
                message: failures.join("; "),
            });
        }
        for f in &failures {
            tracing::warn!(vm = id, "fork child failed: {f}");
        }
        Ok(api::Forked {
            pause_us: report.pause_us,
            report,
            vms,
        })
    }

    // ---------------------------------------------------------------- exec and files

    /// Makes the VM runnable (waking or resuming it) and marks a call in flight; returns the
    /// agent's vsock socket and whether it had to wake.
    fn enter(&self, id: &str) -> Result<(Arc<Slot>, PathBuf, bool), DaemonError> {
        let slot = self.slot(id)?;
        let mut live = Self::lock_settled(&slot, id)?;
        // A VMM that ended by itself is not restored behind the caller's back: what the VM did
        // since its last snapshot is gone, and the caller must know before running anything.
        self.refuse_failed(&slot, &mut live)?;
        let woke = self.wake_locked(&slot, &mut live)?;
        let vsock = live
            .rec
            .run_dir
            .as_ref()
            .map(|d| d.join("vsock.sock"))
            .ok_or_else(|| conflict(&live.rec, live.rec.vm.state, "reach the agent"))?;
        slot.busy.fetch_add(1, Ordering::AcqRel);
        slot.last_active.store(now_ms(), Ordering::Relaxed);
        drop(live);
        Ok((slot, vsock, woke))
    }

    /// Connects to the VM's agent, waiting up to the agent timeout for a slow guest, but not
    /// for one whose VMM is found gone between attempts.
    fn agent(
        &self,
        slot: &Slot,
        id: &str,
        vsock: &Path,
    ) -> Result<AgentClient<UnixStream>, DaemonError> {
        let deadline = Instant::now() + self.config.agent_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Attempts long enough for a starved guest to answer one connection rather than
            // abandon it and pile up new ones.
            match AgentClient::connect_uds(vsock, AGENT_VSOCK_PORT, left.min(AGENT_ATTEMPT)) {
                Ok(agent) => return Ok(agent),
                Err(specc_protocol::client::ClientError::Timeout { .. })
                    if deadline > Instant::now() =>
                {
                    // The caller may hold the lock (a stop syncing the guest): then the VMM is
                    // its business.
                    if let Ok(mut live) = slot.live.try_lock()
                        && self.notice_exit(slot, &mut live)
                    {
                        return Err(Self::failed(&live.rec));
                    }
                }
                Err(e) => {
                    return Err(DaemonError::Vm {
                        id: id.to_owned(),
                        op: "connect to the agent",
                        message: chain(&e),
                    });
                }
            }
        }
    }

    /// Runs a command in the VM (waking it if needed), streaming its output to `sink`; the
    /// last event is `Exit`.
    pub fn exec(
        &self,
        id: &str,
        req: &api::Exec,
        mut sink: impl FnMut(ExecEvent),
    ) -> Result<(), DaemonError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        if req.argv.is_empty() {
            return Err(DaemonError::BadRequest("exec needs a command".into()));
        }
        let stdin = req
            .stdin_b64
            .as_deref()
            .map(|s| b64.decode(s))
            .transpose()
            .map_err(|e| DaemonError::BadRequest(format!("stdin_b64: {e}")))?;
        if stdin.is_some() && req.stdin_stream {
            return Err(DaemonError::BadRequest(
                "stdin_b64 and stdin_stream exclude each other".into(),
            ));
        }
        let feed = req.stdin_stream.then(random_id).transpose()?;
        let t0 = Instant::now();
        let (slot, vsock, woke) = self.enter(id)?;
        let _busy = Busy(&slot);
        let mut agent = self.agent(&slot, id, &vsock)?;
        // Two bounds, so that a lost connection never hangs the call. Until the agent reports
        // the process started, the wait is for the guest to pick the request up, which on a
        // starved guest takes as long as connecting can: the agent timeout. The exec's own
        // timeout counts in the agent from the spawn, so the wait for the exit is bounded
        // from `ExecStarted` on: that timeout plus a grace for the agent's answer, or none
        // without a timeout (a command may run for as long as it likes).
        let asked = Instant::now();
        let _ = agent
            .get_ref()
            .set_read_timeout(Some(self.config.agent_timeout));
        let exit_bound = req
            .timeout_ms
            .map(|t| Duration::from_millis(t) + EXEC_GRACE);
        let started = std::cell::Cell::new(None);
        let mut er = ExecRequest::new(req.argv.clone());
        er.env.clone_from(&req.env);
        er.cwd.clone_from(&req.cwd);
        er.timeout_ms = req.timeout_ms;
        er.stdin = req.stdin_stream;
        let sink = std::cell::RefCell::new(&mut sink);
        let on_started = |s: &UnixStream, pid: i32| {
            started.set(Some((pid, Instant::now())));
            let _ = s.set_read_timeout(exit_bound);
            let mut name = feed.clone();
            if let Some(exec) = &feed {
                match s.try_clone() {
                    Ok(conn) => {
                        self.feeds_map().insert(
                            exec.clone(),
                            Arc::new(Feed {
                                vm: id.to_owned(),
                                conn,
                                taken: AtomicBool::new(false),
                            }),
                        );
                    }
                    Err(e) => {
                        // Without a second handle nobody can feed stdin: close it now rather
                        // than leave the process waiting for input that cannot come.
                        tracing::warn!(
                            vm = id,
                            "exec stdin: cannot clone the agent connection: {e}"
                        );
                        let mut w = s;
                        let _ = specc_protocol::write_frame(&mut w, &AgentRequest::StdinEof);
                        name = None;
                    }
                }
            }
            (sink.borrow_mut())(ExecEvent::Started { pid, stdin: name });
        };
        let out = |d: &[u8]| {
            (sink.borrow_mut())(ExecEvent::Stdout {
                data_b64: b64.encode(d),
            });
        };
        let err = |d: &[u8]| {
            (sink.borrow_mut())(ExecEvent::Stderr {
                data_b64: b64.encode(d),
            });
        };
        let status = match stdin {
            Some(bytes) => agent.exec_with(&er, Some(&mut bytes.as_slice()), on_started, out, err),
            None => agent.exec_with(&er, None, on_started, out, err),
        };
        if let Some(exec) = &feed
            && let Some(f) = self.feeds_map().remove(exec)
        {
            // A feeder still writing learns that the exec is over.
            let _ = f.conn.shutdown(std::net::Shutdown::Both);
        }
        self.metrics.observe("exec", t0.elapsed(), status.is_ok());
        let connect = asked.duration_since(t0).as_secs_f64();
        match started.get() {
            Some((pid, at)) => tracing::debug!(
                vm = id,
                pid,
                connect_s = connect,
                start_s = at.duration_since(asked).as_secs_f64(),
                run_s = at.elapsed().as_secs_f64(),
                ok = status.is_ok(),
                "exec"
            ),
            None => tracing::debug!(
                vm = id,
                connect_s = connect,
                wait_s = asked.elapsed().as_secs_f64(),
                "exec not started"
            ),
        }
        let status = status.map_err(|e| {
            let timed_out = matches!(&e, specc_protocol::client::ClientError::Frame(
                specc_protocol::FrameError::Io(io)) if matches!(io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
            let message = match (started.get(), timed_out) {
                (None, true) => format!(
                    "the agent did not start the process within {:?} of the request \
                     (connected after {connect:.1} s)",
                    self.config.agent_timeout,
                ),
                (Some((pid, at)), true) => format!(
                    "no exit within {:?} of the start (pid {pid}, started {:.1} s after \
                     the request)",
                    exit_bound.unwrap_or_default(),
                    at.duration_since(asked).as_secs_f64(),
                ),
                (None, false) => format!("before the start: {}", chain(&e)),
                (Some((pid, _)), false) => format!("pid {pid}: {}", chain(&e)),
            };
            DaemonError::Vm {
                id: id.to_owned(),
                op: "exec",
                message,
            }
        })?;
        (sink.borrow_mut())(ExecEvent::Exit {
            code: status.code,
            signal: status.signal,
            woke,
        });
        Ok(())
    }

    fn feeds_map(&self) -> MutexGuard<'_, HashMap<String, Arc<Feed>>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds `body` to the stdin of `exec`, a running exec with `stdin_stream` on VM `id`, as
    /// it arrives, then closes that stdin; returns the number of bytes forwarded.
    pub fn feed_stdin(
        &self,
        id: &str,
        exec: &str,
        body: &mut dyn Read,
    ) -> Result<u64, DaemonError> {
        let feed = self
            .feeds_map()
            .get(exec)
            .filter(|f| f.vm == id)
            .cloned()
            .ok_or_else(|| {
                DaemonError::NotFound(format!("{id}: no running exec {exec} that takes stdin"))
            })?;
        if feed.taken.swap(true, Ordering::AcqRel) {
            return Err(DaemonError::Conflict {
                id: id.to_owned(),
                state: "being fed stdin",
                op: "feed the same exec's stdin twice",
            });
        }
        let slot = self.slot(id)?;
        let over = |e: specc_protocol::FrameError| DaemonError::Vm {
            id: id.to_owned(),
            op: "feed stdin",
            message: format!("the exec is over: {}", chain(&e)),
        };
        let mut conn = &feed.conn;
        let mut buf = vec![0u8; specc_protocol::MAX_CHUNK];
        let mut total = 0u64;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A broken upload must not look like the end of the input: the process
                    // would act on a truncated stdin. Stop it instead.
                    let _ =
                        specc_protocol::write_frame(&mut conn, &AgentRequest::Kill { signal: 9 });
                    return Err(DaemonError::BadRequest(format!(
                        "reading the stdin body: {e} (the process was killed)"
                    )));
                }
            };
            specc_protocol::write_frame(
                &mut conn,
                &AgentRequest::Stdin {
                    data: buf[..n].to_vec(),
                },
            )
            .map_err(over)?;
            total += n as u64;
            slot.last_active.store(now_ms(), Ordering::Relaxed);
        }
        specc_protocol::write_frame(&mut conn, &AgentRequest::StdinEof).map_err(over)?;
        Ok(total)
    }

    /// Reads a file from the guest.
    pub fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, DaemonError> {
        self.with_agent(id, "read a file", |a| a.read_file(path))
    }

    /// Writes a file in the guest (parents created).
    pub fn write_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: &[u8],
    ) -> Result<(), DaemonError> {
        let mut req = WriteFileRequest::new(path);
        req.mode = mode;
        req.create_parents = true;
        self.with_agent(id, "write a file", |a| a.write_file(&req, data))
    }

    /// Lists a guest directory.
    pub fn list_dir(&self, id: &str, path: &str) -> Result<Vec<api::DirEntry>, DaemonError> {
        let entries = self.with_agent(id, "list a directory", |a| a.list_dir(path))?;
        Ok(entries
            .into_iter()
            .map(|e| api::DirEntry {
                name: e.name,
                kind: format!("{:?}", e.stat.kind).to_ascii_lowercase(),
                size: e.stat.size,
            })
            .collect())
    }

    fn with_agent<T>(
        &self,
        id: &str,
        op: &'static str,
        f: impl FnOnce(&mut AgentClient<UnixStream>) -> Result<T, specc_protocol::client::ClientError>,
    ) -> Result<T, DaemonError> {
        let (slot, vsock, _) = self.enter(id)?;
        let _busy = Busy(&slot);
        let mut agent = self.agent(&slot, id, &vsock)?;
        f(&mut agent).map_err(|e| match &e {
            specc_protocol::client::ClientError::Agent(info) => {
                DaemonError::BadRequest(format!("{op}: {}", info.message))
            }
            _ => DaemonError::Vm {
                id: id.to_owned(),
                op,
                message: chain(&e),
            },
        })
    }

    // ---------------------------------------------------------------- ports

    /// Listens on the daemon host's loopback for each guest port (on the host port recorded
    /// before, after a restart) and records the mapping. Each connection wakes the VM if it
    /// has to and is carried host → vsock → agent → the guest's loopback; its bytes count as
    /// activity. With a mirror (in the rig), returns once the host listens on the same port
    /// numbers too, or has said why it cannot.
    fn expose(&self, slot: &Arc<Slot>, id: &str, ports: &[u16]) -> Result<(), DaemonError> {
        if ports.is_empty() {
            return Ok(());
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return Ok(());
        };
        let mut live = Self::lock(slot, id)?;
        let mut mapped = Vec::new();
        for &guest in ports {
            let previous = live
                .rec
                .vm
                .ports
                .iter()
                .find(|p| p.guest == guest)
                .map(|p| p.host);
            let listener = previous
                .and_then(|h| std::net::TcpListener::bind(("127.0.0.1", h)).ok())
                .map_or_else(|| std::net::TcpListener::bind(("127.0.0.1", 0)), Ok)
                .map_err(|e| {
                    let hint = if e.kind() == io::ErrorKind::AddrNotAvailable {
                        " on 127.0.0.1 (is the loopback interface up?)"
                    } else {
                        ""
                    };
                    DaemonError::Io {
                        what: format!("listening for guest port {guest}{hint}"),
                        source: e,
                    }
                })?;
            let host = listener
                .local_addr()
                .map_err(io_err("reading a listener's address"))?
                .port();
            mapped.push(Port {
                guest,
                host,
                unreachable: None,
            });
            if let Some(m) = self.mirror.get() {
                m.listen(host);
            }
            let (d, slot, id) = (me.clone(), slot.clone(), id.to_owned());
            std::thread::Builder::new()
                .name(format!("specd-port-{host}"))
                .spawn(move || d.accept_loop(&slot, &id, guest, &listener))
                .map_err(io_err("starting a port listener"))?;
        }
        live.rec.vm.ports = mapped;
        self.save(slot, &mut live)
    }

    fn accept_loop(&self, slot: &Slot, id: &str, guest: u16, listener: &std::net::TcpListener) {
        // The host's mirror of this listener goes with it.
        struct Unmirror<'a>(Option<&'a specc_rig::bridge::RigPorts>, Option<u16>);
        impl Drop for Unmirror<'_> {
            fn drop(&mut self) {
                if let (Some(m), Some(port)) = (self.0, self.1) {
                    m.unlisten(port);
                }
            }
        }
        let _unmirror = Unmirror(
            self.mirror.get().map(|m| &**m),
            listener.local_addr().ok().map(|a| a.port()),
        );
        // Non-blocking with a short sleep, so the listener closes soon after the VM is deleted.
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        loop {
            let deleted = slot.live.lock().map(|l| l.deleted).unwrap_or(true);
            if deleted {
                return;
            }
            match listener.accept() {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nonblocking(false);
                    if let Err(e) = self.proxy(id, guest, tcp) {
                        tracing::warn!(vm = id, guest, "proxied connection: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    tracing::warn!(vm = id, guest, "accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Carries one connection (on threads of its own once the guest side is up).
    fn proxy(&self, id: &str, guest: u16, tcp: std::net::TcpStream) -> Result<(), DaemonError> {
        let (slot, vsock, woke) = self.enter(id)?;
        let busy = Busy(&slot);
        let pipe = self
            .agent(&slot, id, &vsock)?
            .connect_port(guest)
            .map_err(|e| DaemonError::Vm {
                id: id.to_owned(),
                op: "connect to a guest port",
                message: chain(&e),
            });
        drop(busy);
        let pipe = pipe?;
        if woke {
            tracing::info!(vm = id, guest, "woken by a connection");
        }
        slot.busy.fetch_add(1, Ordering::AcqRel);
        let pump = |mut from: Box<dyn Read + Send>,
                    mut to: Box<dyn io::Write + Send>,
                    done: Box<dyn FnOnce() + Send>,
                    slot: Arc<Slot>| {
            move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    slot.last_active.store(now_ms(), Ordering::Relaxed);
                }
                done();
            }
        };
        let clone = |e: io::Error| DaemonError::Io {
            what: "cloning a proxied socket".into(),
            source: e,
        };
        let (tcp_r, pipe_r) = (
            tcp.try_clone().map_err(clone)?,
            pipe.try_clone().map_err(clone)?,
        );
        let (tcp_w, pipe_w) = (tcp, pipe);
        let (tcp_s, pipe_s) = (
            tcp_w.try_clone().map_err(clone)?,
            pipe_w.try_clone().map_err(clone)?,
        );
        // The client's EOF reaches the guest service as EOF (the VMM's vsock passes a host
        // half-close on as SHUTDOWN(SEND)) while its answer still comes back; the guest's
        // close ends both directions.
        let pipe_half = pipe_w.try_clone().map_err(clone)?;
        let up = pump(
            Box::new(tcp_r),
            Box::new(pipe_w),
            Box::new(move || {
                let _ = pipe_half.shutdown(std::net::Shutdown::Write);
            }),
            slot.clone(),
        );
        let down = pump(
            Box::new(pipe_r),
            Box::new(tcp_w),
            Box::new(move || {
                let _ = tcp_s.shutdown(std::net::Shutdown::Both);
                let _ = pipe_s.shutdown(std::net::Shutdown::Both);
            }),
            slot.clone(),
        );
        std::thread::spawn(move || {
            let up = std::thread::spawn(up);
            down();
            let _ = up.join();
            // Ends the busy mark taken when the connection was carried.
            drop(Busy(&slot));
        });
        Ok(())
    }

    // ---------------------------------------------------------------- timers

    /// One pass of the idle timers and the storage budget.
    pub fn tick(&self) {
        let slots: Vec<(String, Arc<Slot>)> = self
            .slots()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = now_ms();
        for (id, slot) in slots {
            // A VM in a transition is somebody else's business this tick.
            let Ok(mut live) = slot.live.try_lock() else {
                continue;
            };
            if live.deleted {
                continue;
            }
            self.notice_exit(&slot, &mut live);
            let mut vm = live.rec.vm.clone();
            vm.last_active_ms = slot.last_active.load(Ordering::Relaxed);
            let busy = slot.busy.load(Ordering::Acquire) > 0;
            let Some(action) = policy::idle_action(&vm, now, busy) else {
                continue;
            };
            tracing::info!(vm = %id, ?action, idle_s = (now - vm.last_active_ms) / 1000, "idle timer");
            let r = match action {
                IdleAction::Pause => self.pause_locked(&slot, &mut live),
                IdleAction::Suspend => self.suspend_locked(&slot, &mut live),
                IdleAction::Delete => self.delete_locked(&mut live),
            };
            if let Err(e) = r {
                tracing::warn!(vm = %id, "idle {action:?} failed: {e}");
            }
            if action == IdleAction::Delete {
                drop(live);
                self.forget(&id);
            }
        }
        self.enforce_budget();
    }

    /// Evicts sticky VMs at rest while the VMs' files exceed the budget.
    fn enforce_budget(&self) {
        // Only VMs not in a transition: waiting for a VM that is being created or woken would
        // hold up the timer thread (and every other VM's idle timer) for seconds. Those in a
        // transition are not at rest, so they are not evicted anyway; their bytes count at the
        // next tick.
        let slots: Vec<_> = self.slots().values().cloned().collect();
        let vms: Vec<Vm> = slots
            .iter()
            .filter_map(|s| {
                let live = s.live.try_lock().ok()?;
                (!live.deleted).then(|| {
                    let mut vm = live.rec.vm.clone();
                    vm.last_active_ms = s.last_active.load(Ordering::Relaxed);
                    vm
                })
            })
            .collect();
        for id in policy::evictions(&vms, self.config.budget_bytes) {
            tracing::info!(vm = %id, budget = self.config.budget_bytes, "evicting under the storage budget");
            // Counted before the VM disappears from the API (its files go after), so whoever
            // sees it gone also sees the eviction.
            let r = self.slot(&id).and_then(|slot| {
                let mut live = Self::lock(&slot, &id)?;
                self.delete_locked(&mut live)?;
                self.metrics.evicted();
                Ok(())
            });
            match r {
                Ok(()) => self.forget(&id),
                Err(e) => tracing::warn!(vm = %id, "eviction failed: {e}"),
            }
        }
    }

    /// Lets every VM run on without the daemon (graceful shutdown).
    pub fn release_all(&self) {
        for slot in self.slots().values() {
            let mut live = slot.live.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = live.machine.take() {
                let _ = m.release();
            }
        }
    }
}

fn conflict(rec: &Record, state: VmState, op: &'static str) -> DaemonError {
    DaemonError::Conflict {
        id: rec.vm.id.clone(),
        state: state.as_str(),
        op,
    }
}

fn vm_error(rec: &Record, op: &'static str, e: &specc_machine::MachineError) -> DaemonError {
    DaemonError::Vm {
        id: rec.vm.id.clone(),
        op,
        message: chain(e),
    }
}

/// The API's view of the VMM's fork report; the children's come from `machines` (in request
/// order, like `children`, the records they were registered under).
fn fork_report(
    r: &specc_vmm::snapshot::ForkReport,
    children: &[Record],
    machines: &[specc_machine::ForkedMachine],
) -> api::ForkReport {
    let copy = |p: &specc_vmm::promote::PromotionReport| api::MemoryCopy {
        precopy_us: p.precopy_us,
        copy_us: p.copy_us,
        devices_stopped_us: p.devices_stopped_us,
        copied_bytes: p.copied_bytes,
        rounds: p.rounds,
        round_pages: p.round_pages,
        final_pages: p.final_pages,
        swap_us: p.swap_us,
    };
    let ph = &r.phases;
    api::ForkReport {
        mode: match r.mode {
            specc_vmm::snapshot::ForkMode::Cow => api::ForkMode::Cow,
            specc_vmm::snapshot::ForkMode::Precopy => api::ForkMode::Precopy,
        },
        pause_us: r.pause_us,
        owner_us: r.owner_us,
        phases: api::ForkPhases {
            vcpu_stop_us: ph.vcpu_stop_us,
            devices_stop_us: ph.devices_stop_us,
            promotion_swap_us: ph.promotion_swap_us,
            final_copy_us: ph.final_copy_us,
            capture_us: ph.capture_us,
            fork_us: ph.fork_us,
            devices_resume_us: ph.devices_resume_us,
            vcpu_resume_us: ph.vcpu_resume_us,
        },
        precopy: r.precopy.as_ref().map(copy),
        promotion: r.promotion.as_ref().map(copy),
        children: children
            .iter()
            .zip(machines)
            .map(|(rec, m)| api::ForkChild {
                id: rec.vm.id.clone(),
                pid: m.report.pid,
                ready_us: m.report.ready_us,
                error: m.report.error.clone(),
            })
            .collect(),
    }
}

/// The hostname of fork child `i` of `parent`: unique through the child's id.
fn child_name(parent: &str, _i: u32, cid: &str) -> String {
    let mut base: String = parent.chars().take(63 - cid.len() - 1).collect();
    base = base.trim_end_matches('-').to_owned();
    format!("{base}-{cid}")
}

/// The snapshot directory a `Suspending` record is writing.
fn pending_snapshot(rec: &Record) -> PathBuf {
    rec.dir.join(format!("snap-{}", rec.vm.suspends + 1))
}

/// Whether the VM's memory is mapped from snapshot files, so a snapshot needs only the pages
/// written since (a fork child's and a booted VM's memory is anonymous: written whole).
fn memory_is_file_backed(restore: &RestorePoint) -> bool {
    matches!(
        restore,
        RestorePoint::Image { .. } | RestorePoint::Snapshot { .. }
    )
}

/// The layers a live fork froze from the disk diff `top` (the VMM names them `<top>.fork<n>`),
/// oldest first.
fn fork_frozen_layers(top: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (top.parent(), top.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.fork", name.to_string_lossy());
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let seq = n.strip_prefix(&prefix)?.parse().ok()?;
                    Some((seq, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// The snapshot directory a stop of the current VMM writes (its disk stack is what is kept).
fn stop_snapshot(rec: &Record) -> PathBuf {
    rec.dir.join(format!("stop-{}", rec.generation))
}

fn stop_complete(rec: &Record) -> bool {
    rec.vm.state == VmState::Stopping
        && stop_snapshot(rec)
            .join(specc_vmm::snapshot_dir::VMSTATE_FILE)
            .is_file()
}

/// Removes the memory files of every snapshot of a stopped VM: it boots from its disk only.
/// (Fork children never read them: their memory is their own.)
fn discard_memory(rec: &Record) {
    let Ok(entries) = std::fs::read_dir(&rec.dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("snap-")
            || name.starts_with("stop-")
            || name.starts_with(compact::MERGED_PREFIX))
        {
            continue;
        }
        for f in [
            specc_vmm::snapshot_dir::MEMORY_FILE,
            specc_vmm::snapshot_dir::MEMORY_DIFF_FILE,
        ] {
            match std::fs::remove_file(e.path().join(f)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(vm = %rec.vm.id, "cannot discard {name}/{f}: {err}"),
            }
        }
    }
}

fn snapshot_complete(rec: &Record) -> bool {
    rec.vm.state == VmState::Suspending
        && pending_snapshot(rec)
            .join(specc_vmm::snapshot_dir::VMSTATE_FILE)
            .is_file()
}
