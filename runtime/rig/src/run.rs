//! Booting the rig and running one command in it.
//!
//! The host side of one run:
//! 1. ensure the rig kernel (`specc-guestkit`) and the initramfs are cached;
//! 2. write `job.sh` (cwd, environment, argv, shell-quoted) and `mounts` into a run directory
//!    under `$SPECC_HOME/rig/runs/`, which the rig reads through its read-only view of `/`;
//! 3. spawn QEMU (TCG, `-cpu max`, microvm without ACPI, so its virtio-mmio devices go on the
//!    kernel command line) with the host's `/` as a read-only 9p export, the writable shares as
//!    more 9p exports, and three virtio-serial ports on socketpairs: stdout, stderr, control;
//! 4. relay stdout/stderr until the control port says `exit N`, then kill QEMU.
//!
//! Architecture invariant: QEMU never outlives the run. It is killed on the exit line, on
//! drop (any error or panic in between), and by `PR_SET_PDEATHSIG` if this process dies.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use specc_guestkit::kernel::{self, KernelError, KernelKind};

use crate::bridge::HostBridge;
use crate::detect::IN_RIG_ENV;
use crate::initramfs::{self, InitramfsError};

/// QEMU's microvm machine has this many virtio-mmio transports.
const MAX_VIRTIO_DEVICES: usize = 8;
/// Devices every run may use besides the writable shares: the virtio-serial device, the
/// read-only root export and the placeholder in the RTC's slot.
const FIXED_DEVICES: usize = 3;
/// Without ACPI, microvm wires its transports to IRQs 12 down to 5 in creation order, so the
/// fifth device shares IRQ 8 with the RTC and its driver fails to get the interrupt. That slot
/// gets a device the rig kernel has no driver for (virtio-balloon), which never asks for it.
const RTC_IRQ_SLOT: usize = 4;

/// How the rig is shaped.
#[derive(Debug, Clone)]
pub struct RigConfig {
    /// vCPUs of the rig (`-smp`). Default 2, or `SPECC_RIG_SMP`.
    pub smp: u32,
    /// Memory of the rig in MiB (`-m`). Default 4096, or `SPECC_RIG_MEMORY_MIB`.
    pub memory_mib: u64,
    /// The QEMU binary. Default `qemu-system-x86_64` from `PATH`.
    pub qemu: PathBuf,
    /// Host directories to make writable inside, beyond the defaults (the project tree around
    /// the command's cwd, `$SPECC_HOME`, `$CARGO_TARGET_DIR`).
    pub extra_shares: Vec<PathBuf>,
    /// Which image of the rig kernel QEMU boots.
    pub boot: BootImage,
}

/// Which image of the rig kernel QEMU loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootImage {
    /// The ELF vmlinux through its PVH entry point: no decompression under emulation.
    Vmlinux,
    /// The compressed bzImage through the Linux boot protocol.
    BzImage,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Default for RigConfig {
    fn default() -> Self {
        RigConfig {
            smp: env_num("SPECC_RIG_SMP", 2),
            memory_mib: env_num("SPECC_RIG_MEMORY_MIB", 4096),
            qemu: PathBuf::from("qemu-system-x86_64"),
            extra_shares: Vec::new(),
            boot: BootImage::Vmlinux,
        }
    }
}

/// One command to run inside the rig.
#[derive(Debug, Clone)]
pub struct RigCommand {
    /// Program and arguments; the program is looked up in the command's `PATH` inside.
    pub argv: Vec<OsString>,
    /// The whole environment of the command (`SPECC_IN_RIG=1` is added).
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; must exist on the host.
    pub cwd: PathBuf,
    /// Print start-up overhead to stderr when the run ends.
    pub timings: bool,
    /// Collect stdout/stderr into the outcome instead of streaming them to this process's.
    pub capture: bool,
    /// Kill the rig and fail if CMD has not exited after this long (boot included).
    pub timeout: Option<Duration>,
    /// Carry connections to these host listeners to a unix socket CMD serves inside (CMD
    /// calls [`crate::bridge::serve_in_rig`] on [`crate::bridge::RIG_PORT`]).
    pub bridge: Option<HostBridge>,
}

impl RigCommand {
    /// `argv` with this process's environment and current directory.
    pub fn new<I, S>(argv: I) -> io::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Ok(RigCommand {
            argv: argv.into_iter().map(Into::into).collect(),
            env: std::env::vars_os().collect(),
            cwd: std::env::current_dir()?,
            timings: false,
            capture: false,
            timeout: None,
            bridge: None,
        })
    }

    fn env_var(&self, name: &str) -> Option<&OsStr> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_os_str())
    }
}

/// Where the time of a run went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Making sure the rig kernel and the initramfs are cached.
    pub prepare: Duration,
    /// From spawning QEMU to the init script starting CMD.
    pub to_cmd_start: Duration,
    /// The rig kernel's own uptime when CMD started (guest clock).
    pub rig_uptime_at_start: Option<Duration>,
    /// CMD's run time, as seen from the host.
    pub cmd: Duration,
    /// From the exit line to QEMU reaped.
    pub teardown: Duration,
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rig timings: prepare {:.3} s, QEMU spawn to CMD start {:.3} s",
            self.prepare.as_secs_f64(),
            self.to_cmd_start.as_secs_f64()
        )?;
        if let Some(up) = self.rig_uptime_at_start {
            write!(f, " (rig kernel uptime {:.3} s)", up.as_secs_f64())?;
        }
        write!(
            f,
            ", CMD {:.3} s, teardown {:.3} s",
            self.cmd.as_secs_f64(),
            self.teardown.as_secs_f64()
        )
    }
}

/// The result of a run.
#[derive(Debug)]
pub struct RigOutcome {
    /// CMD's exit status (a signal death inside shows as exit code 128+N).
    pub status: ExitStatus,
    /// CMD's stdout, when the command asked for capture.
    pub stdout: Vec<u8>,
    /// CMD's stderr, when the command asked for capture.
    pub stderr: Vec<u8>,
    /// Where the time went.
    pub timings: Timings,
}

/// Errors of a rig run.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// The rig kernel could not be built or found.
    #[error("cannot get the rig kernel")]
    Kernel(#[from] KernelError),
    /// The initramfs could not be written.
    #[error("cannot prepare the rig initramfs")]
    Initramfs(#[from] InitramfsError),
    /// The command line is empty.
    #[error("no command to run in the rig")]
    NoCommand,
    /// A path cannot be passed into the rig.
    #[error("cannot pass {0} into the rig: {1}")]
    BadPath(PathBuf, &'static str),
    /// Too many writable shares for microvm's virtio-mmio slots.
    #[error("{0} writable shares, the rig has room for {max}", max = MAX_VIRTIO_DEVICES - FIXED_DEVICES)]
    TooManyShares(usize),
    /// Preparing the run directory or a channel failed.
    #[error("{what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot start {0} (install Debian's qemu-system-x86: apt-get install qemu-system-x86)")]
    Spawn(PathBuf, #[source] io::Error),
    /// The init script inside reported a failure before CMD ran.
    #[error("the rig failed before running the command: {message}\n{console}")]
    InitFailed {
        /// What init said.
        message: String,
        /// The tail of the rig's console and QEMU's own messages.
        console: String,
    },
    /// The command's bridge asked to end the run at once; the rig was killed.
    #[error("the run was aborted before the command exited; killed the rig")]
    Aborted,
    /// CMD did not exit within the command's timeout; the rig was killed.
    #[error("the command did not exit within {0:?} in the rig; killed it\n{console}", console = .1)]
    Timeout(Duration, String),
    /// QEMU went away without an exit status for CMD.
    #[error("the rig stopped ({status}) before the command's exit status arrived\n{console}")]
    NoExitStatus {
        /// QEMU's exit status.
        status: ExitStatus,
        /// The tail of the rig's console and QEMU's own messages.
        console: String,
    },
}

/// The rig: an emulated KVM host.
#[derive(Debug, Clone, Default)]
pub struct Rig {
    config: RigConfig,
}

/// A spawned QEMU that is killed and reaped when dropped.
#[derive(Debug)]
struct QemuGuard {
    child: Option<Child>,
}

impl QemuGuard {
    fn kill_and_wait(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // QEMU leads its own process group; nothing else lives in it.
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a process group id we created; no memory involved.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        child.kill().ok();
        child.wait().ok()
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        self.kill_and_wait();
    }
}

/// The run directory, removed on drop unless `SPECC_RIG_KEEP=1`.
#[derive(Debug)]
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("SPECC_RIG_KEEP").is_none_or(|v| v != "1") {
            fs::remove_dir_all(&self.0).ok();
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RigError {
    let path = path.to_path_buf();
    move |source| RigError::Io { what, path, source }
}

/// Appends `s` to `out` as one single-quoted shell word (any bytes but NUL survive).
fn shell_quote(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

/// `job.sh`: run by the host's `/bin/sh` inside the chroot.
fn job_script(cmd: &RigCommand) -> Vec<u8> {
    let mut s = b"# Written by specc-rig for one run.\ncd -- ".to_vec();
    shell_quote(&mut s, cmd.cwd.as_os_str().as_bytes());
    s.extend_from_slice(b" || exit 125\nexec /usr/bin/env -i");
    let mut env: Vec<&(OsString, OsString)> =
        cmd.env.iter().filter(|(k, _)| k != IN_RIG_ENV).collect();
    env.sort_by(|a, b| a.0.cmp(&b.0));
    env.dedup_by(|a, b| a.0 == b.0);
    let in_rig = (OsString::from(IN_RIG_ENV), OsString::from("1"));
    for (k, v) in env.into_iter().chain(std::iter::once(&in_rig)) {
        if k.is_empty() || k.as_bytes().contains(&b'=') {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        s.push(b' ');
        shell_quote(&mut s, &kv);
    }
    for a in &cmd.argv {
        s.push(b' ');
        shell_quote(&mut s, a.as_bytes());
    }
    s.push(b'\n');
    s
}

/// The enclosing project tree of `cwd`: the nearest ancestor with `.git`, else `cwd` itself.
fn project_root(cwd: &Path) -> PathBuf {
    cwd.ancestors()
        .find(|p| p.join(".git").exists())
        .unwrap_or(cwd)
        .to_path_buf()
}

/// Canonical, existing, de-nested share list: a share inside another is already writable.
fn normalize_shares(paths: Vec<PathBuf>) -> Result<Vec<PathBuf>, RigError> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        let c = p.canonicalize().map_err(io_err("cannot share", &p))?;
        let s = c.as_os_str().as_bytes();
        if s.contains(&b'\n') {
            return Err(RigError::BadPath(c, "it contains a newline"));
        }
        out.push(c);
    }
    out.sort();
    out.dedup();
    let mut kept: Vec<PathBuf> = Vec::new();
    for p in out {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    Ok(kept)
}

impl Rig {
    /// A rig of this shape.
    pub fn new(config: RigConfig) -> Self {
        Rig { config }
    }

    /// The writable shares a command gets: its project tree, `$SPECC_HOME`, its
    /// `$CARGO_TARGET_DIR`, and the configured extras.
    pub fn shares_for(&self, cmd: &RigCommand) -> Result<Vec<PathBuf>, RigError> {
        let home = cmd
            .env_var("SPECC_HOME")
            .filter(|v| !v.is_empty())
            .map_or_else(kernel::specc_home, PathBuf::from);
        fs::create_dir_all(&home).map_err(io_err("creating", &home))?;
        let mut shares = vec![project_root(&cmd.cwd), home];
        if let Some(t) = cmd.env_var("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
            let t = PathBuf::from(t);
            let t = if t.is_relative() { cmd.cwd.join(t) } else { t };
            fs::create_dir_all(&t).map_err(io_err("creating", &t))?;
            shares.push(t);
        }
        shares.extend(self.config.extra_shares.iter().cloned());
        let shares = normalize_shares(shares)?;
        if shares.len() > MAX_VIRTIO_DEVICES - FIXED_DEVICES {
            return Err(RigError::TooManyShares(shares.len()));
        }
        Ok(shares)
    }

    /// Boots the rig, runs `cmd` in it as root, and returns its exit status.
    pub fn run(&self, cmd: &RigCommand) -> Result<RigOutcome, RigError> {
        if cmd.argv.is_empty() {
            return Err(RigError::NoCommand);
        }
        let t0 = Instant::now();
        let kernel = kernel::ensure_kernel(KernelKind::Rig, &|m| eprintln!("specc rig: {m}"))?;
        let rig_home = kernel::specc_home().join("rig");
        let initrd = initramfs::ensure_initramfs(&rig_home)?;
        let shares = self.shares_for(cmd)?;
        let run_dir = make_run_dir(&rig_home.join("runs"))?;
        fs::write(run_dir.0.join("job.sh"), job_script(cmd))
            .map_err(io_err("writing job.sh in", &run_dir.0))?;
        let mut mounts = Vec::new();
        for (i, s) in shares.iter().enumerate() {
            mounts.extend_from_slice(format!("rw{i} ").as_bytes());
            mounts.extend_from_slice(s.as_os_str().as_bytes());
            mounts.push(b'\n');
        }
        fs::write(run_dir.0.join("mounts"), mounts)
            .map_err(io_err("writing mounts in", &run_dir.0))?;
        let prepare = t0.elapsed();

        let image = match self.config.boot {
            BootImage::Vmlinux => &kernel.vmlinux,
            BootImage::BzImage => &kernel.bzimage,
        };
        let channels = Channels::new(cmd.bridge.is_some())?;
        let console = run_dir.0.join("console.log");
        let qemu_log = run_dir.0.join("qemu.log");
        let args = self.qemu_args(image, &initrd, &run_dir.0, &console, &shares, &channels);
        let qemu_err = fs::File::create(&qemu_log).map_err(io_err("creating", &qemu_log))?;
        let mut command = Command::new(&self.config.qemu);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(qemu_err);
        let inherit = channels.guest_fds();
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-
        // safe calls (prctl, setpgid, fcntl) on plain integers.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                for &fd in &inherit {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let t_spawn = Instant::now();
        let child = command
            .spawn()
            .map_err(|e| RigError::Spawn(self.config.qemu.clone(), e))?;
        let mut guard = QemuGuard { child: Some(child) };
        let (host, bridge_port) = channels.into_host_side();
        // Ends the bridge's connections and removes its sockets on every return path.
        let _bridge = match (&cmd.bridge, bridge_port) {
            (Some(b), Some(port)) => {
                b.start(port)
                    .map_err(io_err("starting the bridge", Path::new("-")))?;
                Some(BridgeGuard(b))
            }
            _ => None,
        };
        let aborted = || cmd.bridge.as_ref().is_some_and(HostBridge::aborted);

        let relay = relay(
            host,
            &mut guard,
            cmd.capture,
            cmd.timeout.map(|t| t_spawn + t),
            &aborted,
        )?;
        let t_exit = Instant::now();
        let qemu_status = guard.kill_and_wait();
        let teardown = t_exit.elapsed();
        let tail = || console_tail(&console, &qemu_log);
        let (code, started) = match relay.end {
            End::Exit(code) => (code, relay.started.unwrap_or(t_exit)),
            End::Fail(message) => {
                return Err(RigError::InitFailed {
                    message,
                    console: tail(),
                });
            }
            End::Timeout => {
                return Err(RigError::Timeout(cmd.timeout.unwrap_or_default(), tail()));
            }
            End::Aborted => return Err(RigError::Aborted),
            End::Gone => {
                return Err(RigError::NoExitStatus {
                    status: qemu_status.unwrap_or_else(|| ExitStatus::from_raw(0)),
                    console: tail(),
                });
            }
        };
        let timings = Timings {
            prepare,
            to_cmd_start: started.duration_since(t_spawn),
            rig_uptime_at_start: relay.uptime,
            cmd: t_exit.duration_since(started),
            teardown,
        };
        if cmd.timings {
            eprintln!("{timings}");
        }
        Ok(RigOutcome {
            status: ExitStatus::from_raw((code & 0xff) << 8),
            stdout: relay.stdout,
            stderr: relay.stderr,
            timings,
        })
    }

    fn qemu_args(
        &self,
        image: &Path,
        initrd: &Path,
        run_dir: &Path,
        console: &Path,
        shares: &[PathBuf],
        ch: &Channels,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&OsStr]| a.extend(parts.iter().map(|p| p.to_os_string()));
        let s = |x: &str| OsString::from(x);
        // `-cpu max` under TCG has svm+npt (TCG has no vmx). `+invtsc` is not asked for: TCG does not
        // implement it and only warns; `tsc=reliable` is what keeps the rig off jiffies.
        // `oops=panic`: an oops leaves the rig's kernel half-working (seen under heavy nested
        // load: corrupted page tables, a stack overrun in a VMM's vCPU thread), and a command
        // in it then hangs until its caller's own limit; panicking ends QEMU (`panic=-1` with
        // `-no-reboot`), so the run fails at once with the rig console's tail.
        let cmdline = format!(
            "console=ttyS0 loglevel=4 tsc=reliable random.trust_cpu=on panic=-1 oops=panic \
             rdinit=/init specc.run={}",
            run_dir.display()
        );
        // Without its TSC rate the rig's KVM never enters a guest (see `tsc`).
        let cmdline = match crate::tsc::kernel_arg() {
            Some(arg) => format!("{cmdline} {arg}"),
            None => cmdline,
        };
        // For debugging a rig that does not come up, e.g. SPECC_RIG_APPEND=loglevel=7.
        let cmdline = match std::env::var("SPECC_RIG_APPEND") {
            Ok(extra) if !extra.is_empty() => format!("{cmdline} {extra}"),
            _ => cmdline,
        };
        let mut chardev_console = s("file,id=con,path=");
        chardev_console.push(console);
        let mut kernel_arg = s("");
        kernel_arg.push(image);
        let mut initrd_arg = s("");
        initrd_arg.push(initrd);
        push(&[
            &s("-nodefaults"),
            &s("-no-user-config"),
            &s("-display"),
            &s("none"),
            &s("-no-reboot"),
            &s("-accel"),
            &s("tcg,thread=multi"),
            &s("-cpu"),
            &s("max"),
            &s("-M"),
            &s("microvm,acpi=off,rtc=on"),
            &s("-smp"),
            &s(&self.config.smp.to_string()),
            &s("-m"),
            &s(&format!("{}M", self.config.memory_mib)),
            &s("-kernel"),
            &kernel_arg,
            &s("-initrd"),
            &initrd_arg,
            &s("-append"),
            &s(&cmdline),
            &s("-chardev"),
            &chardev_console,
            &s("-serial"),
            &s("chardev:con"),
            &s("-device"),
            // Port 0 is the (unused) console port; 1..=3 the channels, 4 the bridge.
            &s(&format!(
                "virtio-serial-device,max_ports={}",
                ch.guest_named().len() + 1
            )),
        ]);
        for (i, (name, fd)) in ch.guest_named().into_iter().enumerate() {
            push(&[
                &s("-chardev"),
                &s(&format!("socket,id={name},fd={fd}")),
                &s("-device"),
                &s(&format!(
                    "virtserialport,chardev={name},nr={},name=specc.{name}",
                    i + 1
                )),
            ]);
        }
        push(&[
            &s("-fsdev"),
            &s("local,id=fsroot,path=/,security_model=none,readonly=on,multidevs=remap"),
            &s("-device"),
            &s("virtio-9p-device,fsdev=fsroot,mount_tag=root"),
        ]);
        let mut devices = 2;
        for (i, share) in shares.iter().enumerate() {
            if devices == RTC_IRQ_SLOT {
                push(&[&s("-device"), &s("virtio-balloon-device")]);
                devices += 1;
            }
            devices += 1;
            let mut fsdev = s(&format!(
                "local,id=fsrw{i},security_model=none,multidevs=remap,path="
            ));
            // QEMU splits options at commas; a comma in a path is written twice.
            let escaped = share
                .as_os_str()
                .as_bytes()
                .iter()
                .fold(Vec::new(), |mut v, &b| {
                    v.push(b);
                    if b == b',' {
                        v.push(b',');
                    }
                    v
                });
            fsdev.push(OsStr::from_bytes(&escaped));
            push(&[
                &s("-fsdev"),
                &fsdev,
                &s("-device"),
                &s(&format!("virtio-9p-device,fsdev=fsrw{i},mount_tag=rw{i}")),
            ]);
        }
        a
    }
}

/// Re-runs this very program (same arguments, environment and cwd) inside the rig with its
/// output streamed, for binaries whose VMM needs hardware-style KVM: call it when
/// [`crate::decide`] says [`crate::Placement::Rig`], print the decision's line, and exit with the
/// returned status. Inside, `SPECC_IN_RIG=1` makes `decide` answer `Direct`.
pub fn run_self_in_rig(config: RigConfig) -> Result<ExitStatus, RigError> {
    let exe = std::env::current_exe().map_err(io_err("finding", Path::new("/proc/self/exe")))?;
    let mut argv = vec![exe.into_os_string()];
    argv.extend(std::env::args_os().skip(1));
    let cmd = RigCommand::new(argv).map_err(io_err("reading", Path::new(".")))?;
    Ok(Rig::new(config).run(&cmd)?.status)
}

fn make_run_dir(runs: &Path) -> Result<RunDir, RigError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fs::create_dir_all(runs).map_err(io_err("creating", runs))?;
    sweep_stale_runs(runs);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = runs.join(format!("{}-{n}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err("removing stale", &dir))?;
    }
    fs::create_dir(&dir).map_err(io_err("creating", &dir))?;
    if dir
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|b| b.is_ascii_whitespace() || !b.is_ascii())
    {
        return Err(RigError::BadPath(
            dir,
            "the kernel command line needs a plain ASCII path",
        ));
    }
    Ok(RunDir(dir))
}

fn console_tail(console: &Path, qemu_log: &Path) -> String {
    let tail = |p: &Path, n: usize| {
        let text = fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    format!(
        "--- rig console (last lines) ---\n{}\n--- qemu ---\n{}",
        tail(console, 40),
        tail(qemu_log, 20)
    )
}

/// The socketpairs between this process and QEMU's virtio-serial ports: stdout, stderr,
/// control, and the bridge's when the command has one.
#[derive(Debug)]
struct Channels {
    pairs: Vec<(UnixStream, UnixStream)>,
}

const CHANNEL_NAMES: [&str; 4] = ["stdout", "stderr", "control", "bridge"];

impl Channels {
    fn new(bridge: bool) -> Result<Self, RigError> {
        let pair = || UnixStream::pair().map_err(io_err("creating a socketpair", Path::new("-")));
        let n = if bridge { 4 } else { 3 };
        Ok(Channels {
            pairs: (0..n).map(|_| pair()).collect::<Result<_, _>>()?,
        })
    }

    fn guest_fds(&self) -> Vec<RawFd> {
        self.pairs.iter().map(|p| p.1.as_raw_fd()).collect()
    }

    fn guest_named(&self) -> Vec<(&'static str, RawFd)> {
        CHANNEL_NAMES
            .iter()
            .copied()
            .zip(self.guest_fds())
            .collect()
    }

    /// Drops QEMU's ends here, so EOF on ours means QEMU is gone.
    fn into_host_side(self) -> ([UnixStream; 3], Option<UnixStream>) {
        let mut host = self.pairs.into_iter().map(|(host, _guest)| host);
        let mut next = || host.next().expect("three channels");
        let three = [next(), next(), next()];
        (three, host.next())
    }
}

/// Finishes a run's bridge when the run returns.
struct BridgeGuard<'a>(&'a HostBridge);

impl Drop for BridgeGuard<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

#[derive(Debug)]
enum End {
    Exit(i32),
    Fail(String),
    Timeout,
    Aborted,
    Gone,
}

#[derive(Debug)]
struct Relay {
    end: End,
    started: Option<Instant>,
    uptime: Option<Duration>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn relay(
    streams: [UnixStream; 3],
    guard: &mut QemuGuard,
    capture: bool,
    deadline: Option<Instant>,
    aborted: &dyn Fn() -> bool,
) -> Result<Relay, RigError> {
    for s in &streams {
        s.set_nonblocking(true)
            .map_err(io_err("configuring a channel", Path::new("-")))?;
    }
    let mut r = Relay {
        end: End::Gone,
        started: None,
        uptime: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let mut open = [true; 3];
    let mut ctl_line = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds: Vec<libc::pollfd> = streams
            .iter()
            .zip(open)
            .filter(|(_, o)| *o)
            .map(|(s, _)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.is_empty() {
            return Ok(r);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            r.end = End::Timeout;
            return Ok(r);
        }
        if aborted() {
            r.end = End::Aborted;
            return Ok(r);
        }
        let nfds = libc::nfds_t::try_from(fds.len()).expect("three fds");
        // SAFETY: `fds` is a valid, exclusively borrowed array of `nfds` pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, 250) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("polling the rig's channels", Path::new("-"))(e));
            }
        }
        for (i, s) in streams.iter().enumerate() {
            if !open[i] {
                continue;
            }
            match read_available(s, &mut buf) {
                Ok((data, eof)) => {
                    if eof {
                        open[i] = false;
                    }
                    match i {
                        0 => sink(&mut r.stdout, &data, capture, true),
                        1 => sink(&mut r.stderr, &data, capture, false),
                        _ => ctl_line.extend_from_slice(&data),
                    }
                }
                Err(e) => return Err(io_err("reading a rig channel", Path::new("-"))(e)),
            }
        }
        while let Some(nl) = ctl_line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = ctl_line.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if let Some(up) = line.strip_prefix("start ") {
                r.started = Some(Instant::now());
                r.uptime = up.parse::<f64>().ok().map(Duration::from_secs_f64);
            } else if let Some(code) = line.strip_prefix("exit ") {
                r.end = End::Exit(code.parse().unwrap_or(255));
            } else if let Some(msg) = line.strip_prefix("fail ") {
                r.end = End::Fail(msg.to_string());
            }
        }
        if !matches!(r.end, End::Gone) {
            // Each guest write to a port returns only once QEMU has handed it to the socket,
            // so everything CMD printed is already in our socket buffers: drain and stop.
            for (i, s) in streams.iter().enumerate().take(2) {
                while open[i] {
                    let (data, eof) = read_available(s, &mut buf)
                        .map_err(|e| io_err("reading a rig channel", Path::new("-"))(e))?;
                    if data.is_empty() || eof {
                        open[i] = false;
                    }
                    let out = if i == 0 { &mut r.stdout } else { &mut r.stderr };
                    sink(out, &data, capture, i == 0);
                }
            }
            return Ok(r);
        }
        if let Some(child) = guard.child.as_mut()
            && let Ok(Some(_)) = child.try_wait()
        {
            // Drain whatever QEMU delivered before dying, then report it gone.
            for (i, s) in streams.iter().enumerate().take(2) {
                if let Ok((data, _)) = read_available(s, &mut buf) {
                    let out = if i == 0 { &mut r.stdout } else { &mut r.stderr };
                    sink(out, &data, capture, i == 0);
                }
            }
            return Ok(r);
        }
    }
}

/// Reads until the socket would block; returns the bytes and whether EOF was reached.
fn read_available(mut s: &UnixStream, buf: &mut [u8]) -> io::Result<(Vec<u8>, bool)> {
    let mut data = Vec::new();
    loop {
        match s.read(buf) {
            Ok(0) => return Ok((data, true)),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((data, false)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn sink(captured: &mut Vec<u8>, data: &[u8], capture: bool, stdout: bool) {
    if data.is_empty() {
        return;
    }
    if capture {
        captured.extend_from_slice(data);
    } else if stdout {
        let mut o = io::stdout().lock();
        o.write_all(data).ok();
        o.flush().ok();
    } else {
        let mut e = io::stderr().lock();
        e.write_all(data).ok();
        e.flush().ok();
    }
}

/// Removes the run directories (`<pid>-<n>`) of rigs whose launcher is gone: one SIGKILLed
/// never ran its `RunDir`'s drop. Kept with `SPECC_RIG_KEEP=1`, like a run's own.
fn sweep_stale_runs(runs: &Path) {
    if std::env::var_os("SPECC_RIG_KEEP").is_some_and(|v| v == "1") {
        return;
    }
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            fs::remove_dir_all(e.path()).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_run_dirs_of_dead_launchers_are_swept_and_live_ones_kept() {
        let runs = tempfile::tempdir().unwrap();
        // Above any pid_max (at most 2^22).
        let dead = runs.path().join("99999999-0");
        let live = runs.path().join(format!("{}-7", std::process::id()));
        let other = runs.path().join("notes");
        for d in [&dead, &live, &other] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("console.log"), b"x").unwrap();
        }
        sweep_stale_runs(runs.path());
        assert!(!dead.exists());
        assert!(live.join("console.log").exists());
        assert!(other.exists());
    }

    #[test]
    fn shell_quote_survives_quotes_and_spaces() {
        let mut out = Vec::new();
        shell_quote(&mut out, b"it's a $HOME `x`");
        let script = [b"printf %s ".as_slice(), &out].concat();
        let o = Command::new("/bin/sh")
            .arg("-c")
            .arg(OsStr::from_bytes(&script))
            .output()
            .expect("sh");
        assert_eq!(o.stdout, b"it's a $HOME `x`");
    }

    #[test]
    fn job_script_runs_argv_with_exactly_the_given_env_in_cwd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cmd = RigCommand {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "pwd; echo \"$A|$SPECC_IN_RIG|$B\"".into(),
            ],
            env: vec![
                ("A".into(), "x y'z".into()),
                ("PATH".into(), "/usr/bin:/bin".into()),
            ],
            cwd: dir.path().to_path_buf(),
            timings: false,
            capture: true,
            timeout: None,
            bridge: None,
        };
        let o = Command::new("/bin/sh")
            .arg("-c")
            .arg(OsStr::from_bytes(&job_script(&cmd)))
            .env("B", "leaked")
            .output()
            .expect("sh");
        let text = String::from_utf8_lossy(&o.stdout);
        let want = format!(
            "{}\nx y'z|1|\n",
            dir.path().canonicalize().expect("c").display()
        );
        assert_eq!(text, want);
    }

    #[test]
    fn nested_shares_collapse_into_their_parent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("b/c")).expect("mkdir");
        let got = normalize_shares(vec![a.join("b/c"), a.clone(), a.join("b")]).expect("shares");
        assert_eq!(got, vec![a.canonicalize().expect("c")]);
    }

    #[test]
    fn project_root_is_the_nearest_git_ancestor() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("p/.git")).expect("mkdir");
        fs::create_dir_all(dir.path().join("p/x/y")).expect("mkdir");
        assert_eq!(
            project_root(&dir.path().join("p/x/y")),
            dir.path().join("p")
        );
        assert_eq!(project_root(&dir.path().join("q")), dir.path().join("q"));
    }
}
