//! A VM as a supervised `specc-vmm` process: start it, wait for its agent, stop it.
//!
//! Every caller that runs a guest (`specc run`, the builder, the daemon, the end-to-end tests)
//! goes through [`Machine`]: one VMM process per VM (the daemon never shares an address space
//! with a guest), a private run directory holding the VM's configuration, console log and vsock
//! socket, and a process that cannot outlive its owner (`PR_SET_PDEATHSIG`, kill on drop).
//!
//! A daemon that must keep its VMs across its own restart launches them detached
//! ([`Launch::detached`]: no parent-death signal, a session of their own), lets go of them
//! with [`Machine::release`], and takes them back after the restart with [`Machine::attach`].

use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use specc_protocol::AGENT_VSOCK_PORT;
use specc_protocol::client::{Client, ClientError};
use specc_vmm::VmConfig;

/// The guest context id every VM gets: each VM has its own vsock device and host socket, so
/// ids need not be unique across VMs.
pub const GUEST_CID: u64 = 3;

/// The kernel command line for our guest kernel and rootfs images (root on the first
/// virtio-blk disk; the VMM appends the virtio-mmio device parameters).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 quiet loglevel=4";

/// What to boot.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// The root disk.
    pub disk: Disk,
    /// Give the guest a network through passt.
    pub net: bool,
}

/// A layered copy-on-write disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Disk {
    /// Read-only layers, bottom first (the base image, then frozen diffs).
    pub layers: Vec<PathBuf>,
    /// The writable diff on top (created empty if missing).
    pub top: PathBuf,
}

/// Errors of starting, reaching or stopping a VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The `specc-vmm` binary was not found.
    #[error(
        "cannot find the specc-vmm binary (looked at $SPECC_VMM and beside {exe}); \
         build it with `cargo build -p specc-vmm` or set SPECC_VMM"
    )]
    NoVmm {
        /// The running executable.
        exe: String,
    },
    /// Preparing the run directory or writing the configuration failed.
    #[error("cannot prepare the VM's run directory {}", dir.display())]
    RunDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start {}", vmm.display())]
    Spawn {
        /// The binary.
        vmm: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The VMM exited before the agent answered.
    #[error("the VM stopped before its agent answered ({status}); console:\n{console}")]
    EarlyExit {
        /// How the VMM ended.
        status: ExitStatus,
        /// The last lines of the guest console.
        console: String,
    },
    /// The agent did not answer in time.
    #[error(
        "the guest agent did not answer within {timeout:?}; is the kernel right for this \
         rootfs? console:\n{console}"
    )]
    AgentTimeout {
        /// How long we waited.
        timeout: Duration,
        /// The last lines of the guest console.
        console: String,
    },
    /// Talking to the agent failed.
    #[error("talking to the guest agent failed")]
    Agent(#[from] ClientError),
    /// Waiting for or killing the VMM process failed.
    #[error("supervising the VMM process failed")]
    Wait(#[source] io::Error),
    /// [`Machine::attach`] was given a pid that is not a running specc-vmm.
    #[error("process {pid} is not a running specc-vmm: {why}")]
    NotAVmm {
        /// The pid.
        pid: i32,
        /// What was found instead.
        why: String,
    },
    /// A control request failed.
    #[error("VMM control request failed")]
    Control(#[from] specc_vmm::control::Error),
}

/// How long a control connection may take to come up (a VMM that is still starting).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// A running VM.
#[derive(Debug)]
pub struct Machine {
    child: Option<Child>,
    /// A VMM known by pid only: a fork child (the source VMM forked it) or one taken over
    /// with [`Machine::attach`] (maybe our child from before a [`Machine::release`]).
    forked: Option<i32>,
    dir: PathBuf,
    started: Instant,
}

/// A snapshot request's memory mode and what the VM does afterwards.
pub use specc_vmm::control::After;

/// Where a VM launched with [`Machine::launch`] comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Boot the kernel (as [`Machine::start`]).
    Boot,
    /// Restore a snapshot directory (as [`Machine::restore`]).
    Snapshot(&'a Path),
    /// Restore a state file with an explicit memory image (as [`Machine::restore_image`]).
    Image {
        /// The vmstate file.
        vmstate: &'a Path,
        /// The guest memory.
        memory: &'a specc_vmm::snapshot_dir::MemoryImage,
    },
}

/// How the VMM process is launched.
#[derive(Debug, Clone, Copy, Default)]
pub struct Launch {
    /// Let the VMM outlive this process: no `PR_SET_PDEATHSIG`, and a session of its own
    /// (`setsid`), so neither our death nor a signal to our terminal's process group reaches
    /// it. Dropping the [`Machine`] still kills it; [`Machine::release`] lets it go.
    ///
    /// Without it the parent-death signal fires when the *thread* that launched the VMM
    /// exits (that is how `PR_SET_PDEATHSIG` works), so a VM launched attached from a
    /// short-lived thread dies with that thread.
    pub detached: bool,
}

/// What a fork reported about one child, and the child as a [`Machine`].
#[derive(Debug)]
pub struct ForkedMachine {
    /// The child (None if it failed).
    pub machine: Option<Machine>,
    /// The VMM's report.
    pub report: specc_vmm::snapshot::ChildReport,
}

impl Machine {
    /// Starts a VMM process for `config`, keeping its configuration, console log, vsock and
    /// control sockets in `dir` (created; it must be private to this VM).
    pub fn start(config: &MachineConfig, dir: &Path) -> Result<Machine, MachineError> {
        Self::spawn(config, dir, None, Launch::default())
    }

    /// Starts a VMM process for `config` in `dir` from `source`, launched as `launch` says:
    /// [`Machine::start`], [`Machine::restore`] and [`Machine::restore_image`] with the
    /// launch options as a parameter.
    pub fn launch(
        config: &MachineConfig,
        dir: &Path,
        source: Source<'_>,
        launch: Launch,
    ) -> Result<Machine, MachineError> {
        let restore = match source {
            Source::Boot => None,
            Source::Snapshot(dir) => Some((dir, None)),
            Source::Image { vmstate, memory } => Some((vmstate, Some(memory))),
        };
        Self::spawn(config, dir, restore, launch)
    }

    /// Supervises a VMM that is already running in `dir` as process `pid`: one launched
    /// detached before this process restarted, or a fork child. Checks that `pid` is a live
    /// specc-vmm (a pid recorded long ago may have been reused), not that it is `dir`'s.
    pub fn attach(dir: &Path, pid: i32) -> Result<Machine, MachineError> {
        let not_vmm = |why: String| MachineError::NotAVmm { pid, why };
        if pid <= 0 {
            return Err(not_vmm("not a process id".into()));
        }
        if !process_alive(pid) {
            // A released child of ours that ended is a zombie until someone reaps it.
            let _ = reap(pid, libc::WNOHANG);
            return Err(not_vmm("no such process (or it has exited)".into()));
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| not_vmm(format!("cannot read its executable: {e}")))?;
        let name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A VMM whose binary was rebuilt since it started shows "specc-vmm (deleted)".
        if name.strip_suffix(" (deleted)").unwrap_or(&name) != "specc-vmm" {
            return Err(not_vmm(format!("it runs {}", exe.display())));
        }
        Ok(Machine {
            child: None,
            forked: Some(pid),
            dir: dir.to_owned(),
            started: Instant::now(),
        })
    }

    /// Lets go of the VMM without stopping it and returns its pid: dropping the handle then
    /// leaves the VM running. With a VMM launched [`Launch::detached`] the VM also survives
    /// this process; [`Machine::attach`] takes it back. `None` if it had already been reaped.
    /// A released VMM that ends while this process (its parent) lives stays a zombie until
    /// an attached `Machine` (or [`Machine::attach`] itself) reaps it.
    pub fn release(mut self) -> Option<i32> {
        let pid = self.pid().and_then(|p| i32::try_from(p).ok());
        // Dropping a std `Child` neither kills nor waits.
        self.child = None;
        self.forked = None;
        pid
    }

    /// Starts a VMM process that restores the snapshot in `snapshot` instead of booting:
    /// `config` gives the run-time settings (the shape comes from the snapshot; the disk's
    /// layers are the snapshot's when `config.disk.layers` is empty, and its top must be a
    /// fresh path).
    pub fn restore(
        snapshot: &Path,
        config: &MachineConfig,
        dir: &Path,
    ) -> Result<Machine, MachineError> {
        Self::spawn(config, dir, Some((snapshot, None)), Launch::default())
    }

    /// Like [`Machine::restore`], from a state file with guest memory given as `memory`
    /// (absolute paths): a layer whose snapshot files are blobs in the store.
    pub fn restore_image(
        vmstate: &Path,
        memory: &specc_vmm::snapshot_dir::MemoryImage,
        config: &MachineConfig,
        dir: &Path,
    ) -> Result<Machine, MachineError> {
        Self::spawn(
            config,
            dir,
            Some((vmstate, Some(memory))),
            Launch::default(),
        )
    }

    fn spawn(
        config: &MachineConfig,
        dir: &Path,
        restore: Option<(&Path, Option<&specc_vmm::snapshot_dir::MemoryImage>)>,
        launch: Launch,
    ) -> Result<Machine, MachineError> {
        Self::spawn_vmm(&vmm_binary()?, config, dir, restore, launch)
    }

    fn spawn_vmm(
        vmm: &Path,
        config: &MachineConfig,
        dir: &Path,
        restore: Option<(&Path, Option<&specc_vmm::snapshot_dir::MemoryImage>)>,
        launch: Launch,
    ) -> Result<Machine, MachineError> {
        let run_dir = |source| MachineError::RunDir {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(run_dir)?;
        let vsock = dir.join("vsock.sock");
        match std::fs::remove_file(&vsock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(run_dir(e)),
        }
        // Built as JSON so that every field this caller does not care about takes the VMM's
        // own default; parsing it back validates it against the VMM's schema.
        let mut vm = serde_json::json!({
            "vcpus": config.vcpus,
            "mem_bytes": config.mem_bytes,
            "kernel": config.kernel,
            "cmdline": config.cmdline,
            "serial": { "log": dir.join("console.log") },
            "disks": [config.disk],
            "vsock": { "guest_cid": GUEST_CID, "uds_path": vsock },
            "rng": true,
            "control": dir.join("control.sock"),
        });
        if config.net {
            vm["net"] = serde_json::json!({ "backend": { "kind": "passt" } });
        }
        let vm: VmConfig = serde_json::from_value(vm).map_err(|e| run_dir(io::Error::other(e)))?;
        let json = serde_json::to_vec_pretty(&vm).map_err(|e| run_dir(io::Error::other(e)))?;
        let config_path = dir.join("vm.json");
        std::fs::write(&config_path, json).map_err(run_dir)?;
        let log = std::fs::File::create(dir.join("vmm.log")).map_err(run_dir)?;

        let mut cmd = Command::new(vmm);
        if let Some((snap, memory)) = restore {
            cmd.arg("--restore").arg(snap);
            if let Some(image) = memory {
                let path = dir.join("memory-image.json");
                let json = serde_json::to_vec(image).map_err(|e| run_dir(io::Error::other(e)))?;
                std::fs::write(&path, json).map_err(run_dir)?;
                cmd.arg("--memory-image").arg(path);
            }
        }
        cmd.arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(run_dir)?)
            .stderr(log);
        let detached = launch.detached;
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) or
        // setsid(2), which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if detached {
                    // Its own session: Ctrl-C on the daemon's terminal and the end of the
                    // daemon's session do not reach the VM.
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    // The VMM dies with its owner: no orphaned VMs after a crash or kill -9.
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| MachineError::Spawn {
            vmm: vmm.to_owned(),
            source,
        })?;
        tracing::debug!(pid = child.id(), dir = %dir.display(), detached, "started specc-vmm");
        Ok(Machine {
            child: Some(child),
            forked: None,
            dir: dir.to_owned(),
            started: Instant::now(),
        })
    }

    /// The VMM's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .or_else(|| self.forked.and_then(|p| u32::try_from(p).ok()))
    }

    /// The VMM's control socket.
    pub fn control_path(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Sends one control request to the VMM.
    pub fn control(
        &self,
        request: &specc_vmm::control::Request,
    ) -> Result<serde_json::Value, MachineError> {
        let mut c = specc_vmm::control::Client::connect(&self.control_path(), CONTROL_TIMEOUT)?;
        Ok(c.call(request)?)
    }

    /// Pauses the vCPUs; returns how long the VMM took, in microseconds.
    pub fn pause(&self) -> Result<u64, MachineError> {
        let r = self.control(&specc_vmm::control::Request::Pause)?;
        Ok(r["pause_us"].as_u64().unwrap_or(0))
    }

    /// Resumes the vCPUs; returns how long the VMM took, in microseconds.
    pub fn resume(&self) -> Result<u64, MachineError> {
        let r = self.control(&specc_vmm::control::Request::Resume)?;
        Ok(r["resume_us"].as_u64().unwrap_or(0))
    }

    /// Writes a snapshot into `dir` (which must not exist).
    pub fn snapshot(
        &self,
        dir: &Path,
        diff: bool,
        then: After,
    ) -> Result<specc_vmm::snapshot_dir::SnapshotReport, MachineError> {
        let r = self.control(&specc_vmm::control::Request::Snapshot {
            dir: dir.to_owned(),
            diff,
            then,
        })?;
        serde_json::from_value(r).map_err(|e| MachineError::Control(e.into()))
    }

    /// Live fork into one child per run directory; returns the source's pause in
    /// microseconds and the children.
    pub fn fork(&self, dirs: &[PathBuf]) -> Result<(u64, Vec<ForkedMachine>), MachineError> {
        let (report, children) = self.fork_with_report(dirs, None)?;
        Ok((report.pause_us, children))
    }

    /// [`Machine::fork`] in `mode` (`None`: the VM's `fork_mode`), with the VMM's whole report:
    /// the pause's phases, guest memory's backing, the precopy or promotion (docs/fork.md). Its
    /// `children` are moved into the returned machines.
    pub fn fork_with_report(
        &self,
        dirs: &[PathBuf],
        mode: Option<specc_vmm::snapshot::ForkMode>,
    ) -> Result<(specc_vmm::snapshot::ForkReport, Vec<ForkedMachine>), MachineError> {
        let r = self.control(&specc_vmm::control::Request::Fork {
            children: dirs.to_vec(),
            mode,
        })?;
        let mut report: specc_vmm::snapshot::ForkReport =
            serde_json::from_value(r).map_err(|e| MachineError::Control(e.into()))?;
        let children = std::mem::take(&mut report.children)
            .into_iter()
            .map(|c| ForkedMachine {
                machine: (c.error.is_none() && c.pid > 0).then(|| Machine {
                    child: None,
                    forked: Some(c.pid),
                    dir: c.dir.clone(),
                    started: Instant::now(),
                }),
                report: c,
            })
            .collect();
        Ok((report, children))
    }

    /// Tells the agent the VM was restored or forked: the host's wall clock, fresh entropy for
    /// the kernel RNG, and a new hostname and machine id.
    pub fn announce_restored(
        client: &mut Client<UnixStream>,
        hostname: &str,
    ) -> Result<specc_protocol::messages::RestoredAck, MachineError> {
        let req = specc_protocol::messages::RestoredRequest::fresh(Some(hostname.to_owned()))
            .map_err(MachineError::Wait)?;
        Ok(client.restored(&req)?)
    }

    /// The VM's run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host side of the VM's vsock device.
    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The guest console log.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// When the VMM process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Connects to the guest agent, waiting up to `timeout` for it to come up. Fails early,
    /// with the console's last lines, if the VMM exits first.
    pub fn connect_agent(&mut self, timeout: Duration) -> Result<Client<UnixStream>, MachineError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(MachineError::EarlyExit {
                    status,
                    console: self.console_tail(40),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let mut console = self.console_tail(40);
                // What the VMM says of its vCPUs: a guest that runs but does not answer, or
                // vCPUs that never get into the guest.
                if let Ok(mut c) = specc_vmm::control::Client::connect(
                    &self.control_path(),
                    Duration::from_millis(200),
                ) && let Ok(status) = c.call(&specc_vmm::control::Request::Status)
                {
                    console.push_str(&format!("\n--- VMM status ---\n{status}"));
                }
                return Err(MachineError::AgentTimeout { timeout, console });
            }
            // Attempts long enough for a slow guest (one just restored, under load) to answer
            // one connection instead of abandoning it and piling up new ones; a VMM that dies
            // is still noticed between attempts.
            match Client::connect_uds(
                &self.vsock_path(),
                AGENT_VSOCK_PORT,
                left.min(Duration::from_secs(10)),
            ) {
                Ok(client) => return Ok(client),
                Err(ClientError::Timeout { .. } | ClientError::Connect { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Opens a new connection to the guest agent and turns it into a raw byte pipe to TCP
    /// `guest_port` on the guest's loopback (the agent's `connect`): what an exposed port's
    /// proxy copies a client connection into. Waits up to `timeout` for the agent. Nothing
    /// listening in the guest is `MachineError::Agent(ClientError::Agent(e))` with
    /// `e.kind == ErrorKind::ConnectionRefused`.
    ///
    /// Half-close works both ways: shutting down the stream's write side reaches the guest
    /// service as EOF while its answer still comes back, and a guest service closing its side
    /// reaches the host as EOF with the other direction still open.
    pub fn connect_port(
        &self,
        guest_port: u16,
        timeout: Duration,
    ) -> Result<UnixStream, MachineError> {
        let client = Client::connect_uds(&self.vsock_path(), AGENT_VSOCK_PORT, timeout)?;
        Ok(client.connect_port(guest_port)?)
    }

    /// Asks the guest to power off and waits up to `timeout` for the VMM to exit; kills it
    /// after that.
    pub fn power_off(
        mut self,
        client: &mut Client<UnixStream>,
        timeout: Duration,
    ) -> Result<ExitStatus, MachineError> {
        // The agent may drop the connection as the guest goes down: that is success too.
        if let Err(e) = client.power_off() {
            tracing::debug!("power-off request: {e}");
        }
        self.wait_timeout(timeout)
    }

    /// Waits up to `timeout` for the VMM to exit on its own, then kills it.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, MachineError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return self.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the VMM and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, MachineError> {
        if let Some(pid) = self.forked.take() {
            // SAFETY: kill(2) on a pid we were told is this VM's VMM.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // Reaped here if it is our child (attached after a release), by its parent
            // otherwise (waitpid then fails with ECHILD at once).
            let status = match reap(pid, 0) {
                Reaped::Exited(status) => status,
                Reaped::Running | Reaped::NotOurs => libc::SIGKILL,
            };
            return Ok(std::os::unix::process::ExitStatusExt::from_raw(status));
        }
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| MachineError::Wait(io::Error::other("already reaped")))?;
        // ESRCH (it exited meanwhile) is fine: wait() reaps it either way.
        let _ = child.kill();
        let status = child.wait().map_err(MachineError::Wait)?;
        self.child = None;
        Ok(status)
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, MachineError> {
        Ok(self.poll_exit()?.map(|status| {
            status.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(0))
        }))
    }

    /// Whether the VMM has ended by itself (reaping it if it is our child): `None` while it
    /// runs, else how it ended, as a sentence. A VMM that is not our child (a fork child, or
    /// one attached after a restart of its launcher) can only be seen gone: its exit status
    /// is its parent's to read.
    pub fn ended(&mut self) -> Option<String> {
        match self.poll_exit() {
            Ok(None) => None,
            Ok(Some(Some(status))) => Some(format!("the VMM process ended: {status}")),
            Ok(Some(None)) => {
                Some("the VMM process is gone (its exit status is not ours to read)".into())
            }
            Err(e) => Some(format!("the VMM process cannot be waited for: {e}")),
        }
    }

    /// `Some(status)` once the VMM ended, the status `None` when it is not ours to read.
    fn poll_exit(&mut self) -> Result<Option<Option<ExitStatus>>, MachineError> {
        if let Some(pid) = self.forked {
            match reap(pid, libc::WNOHANG) {
                // Our child (attached after a release): it ended, and now we know how.
                Reaped::Exited(status) => {
                    self.forked = None;
                    return Ok(Some(Some(std::os::unix::process::ExitStatusExt::from_raw(
                        status,
                    ))));
                }
                // Our child, still running (maybe its other threads still winding down
                // after the main one ended, which /proc would show as a zombie).
                Reaped::Running => return Ok(None),
                Reaped::NotOurs => {}
            }
            // Not our child: all we can learn is whether it still exists (its parent reaps
            // it at once, so a dead one does not linger as a zombie for long).
            if process_alive(pid) {
                return Ok(None);
            }
            self.forked = None;
            return Ok(Some(None));
        }
        let Some(child) = self.child.as_mut() else {
            return Err(MachineError::Wait(io::Error::other("already reaped")));
        };
        let status = child.try_wait().map_err(MachineError::Wait)?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status.map(Some))
    }

    /// The last `lines` lines of the guest console and of the VMM's own log.
    pub fn console_tail(&self, lines: usize) -> String {
        let mut out = tail(&self.console_path(), lines);
        let vmm = tail(&self.dir.join("vmm.log"), lines);
        if !vmm.trim().is_empty() {
            out.push_str("\n--- specc-vmm log ---\n");
            out.push_str(&vmm);
        }
        out
    }
}

/// What `waitpid` said of a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaped {
    /// Our child, ended and now reaped: its raw wait status.
    Exited(i32),
    /// Our child, still running (only with `WNOHANG`).
    Running,
    /// Not a child of ours (ECHILD), e.g. a fork child of another VMM.
    NotOurs,
}

/// `waitpid(pid, flags)` (flags 0 or `WNOHANG`).
fn reap(pid: i32, flags: i32) -> Reaped {
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) writes the status into a local we own.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            return Reaped::Exited(status);
        }
        if r == 0 {
            return Reaped::Running;
        }
        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Reaped::NotOurs;
    }
}

/// Whether `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.child.is_some() || self.forked.is_some() {
            let _ = self.kill();
        }
    }
}

/// Where the `specc-vmm` binary is: `$SPECC_VMM`, else beside the running executable (or one
/// directory up, for test binaries in `target/*/deps`).
pub fn vmm_binary() -> Result<PathBuf, MachineError> {
    if let Some(p) = std::env::var_os("SPECC_VMM") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("specc-vmm"))
        .collect::<Vec<_>>();
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| MachineError::NoVmm {
            exe: exe.display().to_string(),
        })
}

/// The last `lines` lines of a file (at most its last 64 KiB), or an empty string.
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn config(dir: &Path) -> MachineConfig {
        MachineConfig {
            kernel: dir.join("vmlinux"),
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 1,
            mem_bytes: 64 << 20,
            disk: Disk {
                layers: vec![],
                top: dir.join("disk.diff"),
            },
            net: false,
        }
    }

    /// A stand-in VMM: records its `/proc/self/stat` beside its config, then sleeps.
    fn fake_vmm(dir: &Path) -> PathBuf {
        let path = dir.join("fake-vmm");
        std::fs::write(
            &path,
            "#!/bin/sh\nd=$(dirname \"$1\")\ncat /proc/$$/stat > \"$d/stat.tmp\"\n\
             mv \"$d/stat.tmp\" \"$d/stat\"\nexec sleep 1000\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    /// The session id (field 6 of `/proc/PID/stat`) the fake VMM recorded.
    fn recorded_session(run: &Path) -> i32 {
        let stat = run.join("stat");
        for _ in 0..1000 {
            if let Ok(s) = std::fs::read_to_string(&stat) {
                let fields: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
                return fields[3].parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the fake VMM never wrote {}", stat.display());
    }

    fn our_session() -> i32 {
        // SAFETY: getsid(0) only queries this process.
        unsafe { libc::getsid(0) }
    }

    #[test]
    fn a_detached_vmm_gets_its_own_session_and_survives_release() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = fake_vmm(dir.path());
        let run = dir.path().join("run");
        let m = Machine::spawn_vmm(
            &vmm,
            &config(dir.path()),
            &run,
            None,
            Launch { detached: true },
        )
        .unwrap();
        let pid = i32::try_from(m.pid().unwrap()).unwrap();
        assert_eq!(
            recorded_session(&run),
            pid,
            "setsid makes it a session leader"
        );
        assert_eq!(m.release(), Some(pid));
        assert!(process_alive(pid), "release must not stop the VMM");
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            matches!(reap(pid, 0), Reaped::Exited(_)),
            "it is still our child to reap"
        );
    }

    #[test]
    fn a_vmm_not_detached_shares_our_session_and_dies_with_its_drop() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = fake_vmm(dir.path());
        let run = dir.path().join("run");
        let m =
            Machine::spawn_vmm(&vmm, &config(dir.path()), &run, None, Launch::default()).unwrap();
        let pid = i32::try_from(m.pid().unwrap()).unwrap();
        assert_eq!(recorded_session(&run), our_session(), "not detached");
        drop(m);
        assert!(!process_alive(pid), "dropping a Machine kills its VMM");
    }

    /// Spawns a program this test just wrote. Another test thread that forks while the copy's
    /// write descriptor is open hands that descriptor to its child until the child's exec, and
    /// exec of a file open for writing is ETXTBSY: retry, as that window closes at once.
    fn spawn_fresh(cmd: &mut Command) -> std::process::Child {
        for _ in 0..100 {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => return r.unwrap(),
            }
        }
        panic!("the copied program stayed busy (ETXTBSY) for a second");
    }

    #[test]
    fn attach_takes_over_a_released_vmm_and_reaps_it() {
        let dir = tempfile::tempdir().unwrap();
        // Any long-running program named specc-vmm passes attach's check.
        let fake = dir.path().join("specc-vmm");
        std::fs::copy("/bin/sleep", &fake).unwrap();
        let child = spawn_fresh(Command::new(&fake).arg("1000"));
        let pid = i32::try_from(child.id()).unwrap();
        drop(child);
        let mut m = Machine::attach(dir.path(), pid).unwrap();
        assert_eq!(m.pid(), Some(u32::try_from(pid).unwrap()));
        assert!(m.try_wait().unwrap().is_none());
        let status = m.kill().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // Reaped, not left a zombie.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn an_attached_child_reports_its_real_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("specc-vmm");
        std::fs::copy("/bin/sh", &fake).unwrap();
        let child = spawn_fresh(Command::new(&fake).args(["-c", "sleep 0.5; exit 3"]));
        let pid = i32::try_from(child.id()).unwrap();
        drop(child);
        let mut m = Machine::attach(dir.path(), pid).unwrap();
        let status = m.wait_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn attach_refuses_a_pid_that_is_not_a_vmm() {
        let mut sleeper = Command::new("sleep").arg("1000").spawn().unwrap();
        let pid = i32::try_from(sleeper.id()).unwrap();
        let err = Machine::attach(Path::new("/nonexistent"), pid).unwrap_err();
        assert!(matches!(err, MachineError::NotAVmm { .. }), "{err}");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        let err = Machine::attach(Path::new("/nonexistent"), pid).unwrap_err();
        assert!(matches!(err, MachineError::NotAVmm { .. }), "{err}");
        assert!(Machine::attach(Path::new("/nonexistent"), 0).is_err());
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut f = std::fs::File::create(&p).unwrap();
        for i in 0..100 {
            writeln!(f, "line {i}").unwrap();
        }
        assert_eq!(tail(&p, 2), "line 98\nline 99");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }
}
