//! `specd`: serve the VM API until SIGTERM; VMs keep running when the daemon stops and are
//! attached again when it starts.
//!
//! On a host without hardware KVM the daemon places itself in the rig, like `specc build`:
//! this process boots the rig, runs a second `specd` inside it on the same (host) state
//! directory and store, and carries connections to its own API socket (and `--tcp`) into the
//! rig over the rig's bridge (`specc_rig::bridge`, docs/rig.md). The VMs' exposed ports are
//! mirrored the same way: the daemon inside announces each listener it opens or closes on the
//! rig's loopback, and this process listens on the same port of the host's loopback and
//! carries each connection to it. SIGTERM or SIGINT here asks the daemon inside to stop; a
//! second one kills the rig.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use specd::api::VmState;
use specd::daemon::{Config, Daemon};

/// The specc host daemon: runs VMs from snapshot artifacts.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where the state database and the VMs' files live [default: $SPECC_HOME/specd].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Sockets and the VMs' run directories [default: <state>/run]. On the same filesystem as
    /// the state (a snapshot moves a VM's disk diff from here into the state directory) and
    /// one where unix sockets can be bound (not 9p). When specd places itself in the rig, its
    /// VMs' run directories are the rig's own tmpfs and this only places the default socket.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// The API's unix socket [default: $SPECD_SOCKET, else <run-dir>/specd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also serve the API on this TCP address (e.g. 127.0.0.1:7070). No authentication: bind
    /// to loopback only.
    #[arg(long, value_name = "ADDR")]
    tcp: Option<String>,
    /// The store artifacts are read from [default: $SPECC_HOME/store].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Disk budget for the VMs' own files (bytes, or with a K, M, G or T suffix); sticky VMs
    /// at rest are evicted above it.
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = parse_size)]
    budget: u64,
    /// Seconds a restored guest's agent may take to answer.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    agent_timeout: u64,
    /// The kernel stopped VMs cold-boot with when their layers carry none [default: the guest
    /// kernel `specc kernel build` made].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// How often the idle timers run, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    tick_ms: u64,
    /// Inside the rig: also serve the connections the host's specd bridges in on this
    /// virtio-serial port. Set by the host's specd when it places itself in the rig.
    #[arg(long, value_name = "PORT", hide = true)]
    rig_bridge: Option<PathBuf>,
}

/// Where the daemon's files are, as the user gave them (or their defaults).
#[derive(Debug)]
struct Paths {
    state: PathBuf,
    run_dir: PathBuf,
    socket: PathBuf,
    store: PathBuf,
}

impl Paths {
    fn of(args: &Args) -> Paths {
        let state = args.state.clone().unwrap_or_else(specd::default_state_dir);
        let run_dir = args.run_dir.clone().unwrap_or_else(|| state.join("run"));
        let socket = args
            .socket
            .clone()
            .or_else(|| std::env::var_os("SPECD_SOCKET").map(PathBuf::from))
            .unwrap_or_else(|| run_dir.join("specd.sock"));
        let store = args
            .store
            .clone()
            .unwrap_or_else(|| specc_plan::store::specc_home().join("store"));
        Paths {
            state,
            run_dir,
            socket,
            store,
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPECD_LOG")
                .unwrap_or_else(|_| "specd=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let signals = block_stop_signals()?;
    let decision = specc_rig::decide().context("looking at /dev/kvm")?;
    if decision.placement == specc_rig::Placement::Rig {
        eprintln!("{}", decision.line);
        let code = serve_through_rig(&args, signals)?;
        std::process::exit(code);
    }
    let Paths {
        state,
        run_dir,
        socket,
        store,
    } = Paths::of(&args);
    let config = Config {
        state_dir: state.clone(),
        run_dir,
        store,
        budget_bytes: args.budget,
        agent_timeout: Duration::from_secs(args.agent_timeout),
        tick: Duration::from_millis(args.tick_ms),
        kernel: args.kernel.clone(),
    };
    if args.rig_bridge.is_some() {
        // The rig's init leaves the loopback down; exposed ports listen on it, and the bridge
        // connects the host's mirrors of them to it.
        specc_rig::bridge::loopback_up().context("bringing the rig's loopback interface up")?;
    }
    let daemon = Daemon::open(config).context("opening the daemon's state")?;
    // In a rig placed by a host specd, every exposed port answers on the host's loopback too.
    let mirror = args.rig_bridge.is_some().then(|| {
        let ports = specc_rig::bridge::RigPorts::new();
        daemon.mirror_ports(ports.clone());
        ports
    });
    let server = Arc::new(
        specd::server::bind_unix(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?,
    );
    tracing::info!(socket = %socket.display(), state = %state.display(), mode = daemon.mode(), vms = daemon.list().len(), "specd listening");
    if let Some(addr) = &args.tcp {
        let tcp = tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
        let d = daemon.clone();
        std::thread::spawn(move || specd::server::serve(&d, &tcp));
    }
    {
        let d = daemon.clone();
        let tick = Duration::from_millis(args.tick_ms);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(tick);
                d.tick();
            }
        });
    }
    // Placed in the rig by a host specd: the rig, and every VM in it, ends with this process.
    let rig_ends_with_us = args.rig_bridge.is_some();
    {
        let server = server.clone();
        let d = daemon.clone();
        stop_on_signal(signals, move || {
            if rig_ends_with_us {
                tracing::info!("stopping: the rig ends with the daemon, so its VMs are suspended");
                suspend_all(&d);
            } else {
                tracing::info!(
                    "stopping: VMs keep running and are attached again at the next start"
                );
            }
            d.release_all();
            server.unblock();
        });
    }
    if let (Some(port), Some(mirror)) = (args.rig_bridge.clone(), mirror) {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let stop = || {
                // SAFETY: kill(2) on our own pid; the sigwait thread of stop_on_signal takes it.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            };
            if let Err(e) = specc_rig::bridge::serve_in_rig(&port, &socket, &mirror, stop) {
                tracing::error!(
                    "the bridge to the host failed: {}",
                    specc_vmm::error_chain(&e)
                );
            }
            // Without the bridge nobody can reach the daemon: stop it.
            stop();
        });
    }
    specd::server::serve(&daemon, &server);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Suspends every running or paused VM (an ephemeral one is deleted, as its suspend does).
fn suspend_all(d: &Daemon) {
    for vm in d.list() {
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            continue;
        }
        match d.suspend(&vm.id) {
            Ok(Some(_)) => tracing::info!(vm = %vm.id, "suspended"),
            Ok(None) => tracing::info!(vm = %vm.id, "deleted (ephemeral)"),
            Err(e) => tracing::warn!(vm = %vm.id, "suspending failed: {e}"),
        }
    }
}

/// The daemon's API socket inside the rig, on the rig's own tmpfs (fresh in every rig).
const RIG_SOCKET: &str = "/run/specd/specd.sock";
/// The VMs' run directories inside the rig, on the same tmpfs: they hold unix sockets, and 9p
/// cannot (binding one on the rig's view of a host directory fails with ENXIO).
const RIG_RUN_DIR: &str = "/run/specd/run";

/// Runs the daemon inside the rig and serves its API on this host's socket (and `--tcp`)
/// through the rig's bridge; returns the exit code of the daemon inside.
fn serve_through_rig(args: &Args, signals: libc::sigset_t) -> anyhow::Result<i32> {
    let p = Paths::of(args);
    // The daemon inside sees the host's tree at the same paths, but runs in another cwd.
    let abs = |what: &str, p: &Path| {
        std::fs::create_dir_all(p)
            .with_context(|| format!("creating the {what} {}", p.display()))?;
        std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
    };
    let state = abs("state directory", &p.state)?;
    let store = abs("store", &p.store)?;
    let mut listeners = vec![
        specc_rig::HostListener::unix(&p.socket)
            .with_context(|| format!("listening on {}", p.socket.display()))?,
    ];
    if let Some(addr) = &args.tcp {
        listeners.push(specc_rig::HostListener::tcp(addr)?);
    }
    let bridge = specc_rig::HostBridge::new(listeners);
    {
        let (socket, tcp) = (p.socket.clone(), args.tcp.clone());
        bridge.on_ready(move || {
            tracing::info!(socket = %socket.display(), tcp = tcp.as_deref().unwrap_or("-"), "specd listening (the daemon runs in the rig)");
        });
    }
    {
        let bridge = bridge.clone();
        std::thread::spawn(move || {
            loop {
                wait_signal(&signals);
                if bridge.is_ready() {
                    tracing::info!(
                        "stopping the daemon in the rig (a second signal kills the rig)"
                    );
                } else {
                    tracing::info!(
                        "stopping: the daemon in the rig is not up yet; killing the rig"
                    );
                }
                bridge.stop();
            }
        });
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut argv: Vec<OsString> = vec![exe.into(), "--state".into(), state.clone().into()];
    argv.extend(["--run-dir".into(), RIG_RUN_DIR.into()]);
    argv.extend(["--store".into(), store.clone().into()]);
    argv.extend(["--socket".into(), RIG_SOCKET.into()]);
    argv.extend(["--budget".into(), args.budget.to_string().into()]);
    argv.extend([
        "--agent-timeout".into(),
        args.agent_timeout.to_string().into(),
    ]);
    argv.extend(["--tick-ms".into(), args.tick_ms.to_string().into()]);
    if let Some(k) = &args.kernel {
        let k = std::path::absolute(k).with_context(|| format!("resolving {}", k.display()))?;
        argv.extend(["--kernel".into(), k.into()]);
    }
    argv.extend(["--rig-bridge".into(), specc_rig::bridge::RIG_PORT.into()]);
    let mut cmd = specc_rig::RigCommand::new(argv).context("reading the current directory")?;
    // Not the caller's cwd: the rig makes the project tree around its cwd writable, and a
    // service's cwd may be `/`.
    cmd.cwd = state.clone();
    cmd.bridge = Some(bridge);
    let mut config = specc_rig::RigConfig::default();
    config.extra_shares.extend([state, store]);
    let outcome = specc_rig::Rig::new(config).run(&cmd);
    let _ = std::fs::remove_file(&p.socket);
    let outcome = outcome.context("running the daemon in the rig")?;
    Ok(outcome.status.code().unwrap_or(1))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (bytes, or a number with K, M, G or T)"))
}

/// Blocks SIGTERM and SIGINT in this thread, before any other thread exists: every later
/// thread inherits the mask, so only the `sigwait` thread of [`stop_on_signal`] gets them.
fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) != 0 {
            anyhow::bail!("blocking SIGTERM");
        }
        Ok(set)
    }
}

/// Calls `f` once when SIGTERM or SIGINT arrives.
fn stop_on_signal(set: libc::sigset_t, f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        wait_signal(&set);
        f();
    });
}

/// Waits for one of the signals of `set` (blocked by [`block_stop_signals`]).
fn wait_signal(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: waits on a set initialised by block_stop_signals; `sig` is a valid out pointer.
    unsafe { libc::sigwait(set, &raw mut sig) };
}
