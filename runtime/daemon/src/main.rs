//! `specd`: serve the VM API until SIGTERM; VMs keep running when the daemon stops and are
//! attached again when it starts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
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
    /// one where unix sockets can be bound (not 9p).
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
        anyhow::bail!(
            "{}\nspecd: its API socket would be inside the rig, where this host cannot reach \
             it; run the daemon and its clients inside the rig together, e.g. \
             `specc rig run -- sh -c 'specd & sleep 1; specc vm ls'`",
            decision.line
        );
    }
    let home = specc_plan::store::specc_home();
    let state = args.state.unwrap_or_else(specd::default_state_dir);
    let run_dir = args.run_dir.unwrap_or_else(|| state.join("run"));
    let socket = args
        .socket
        .or_else(|| std::env::var_os("SPECD_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| run_dir.join("specd.sock"));
    let config = Config {
        state_dir: state.clone(),
        run_dir,
        store: args.store.unwrap_or_else(|| home.join("store")),
        budget_bytes: args.budget,
        agent_timeout: Duration::from_secs(args.agent_timeout),
        tick: Duration::from_millis(args.tick_ms),
        kernel: args.kernel,
    };
    let daemon = Daemon::open(config).context("opening the daemon's state")?;
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
    {
        let server = server.clone();
        let d = daemon.clone();
        stop_on_signal(signals, move || {
            tracing::info!("stopping: VMs keep running and are attached again at the next start");
            d.release_all();
            server.unblock();
        });
    }
    specd::server::serve(&daemon, &server);
    let _ = std::fs::remove_file(&socket);
    Ok(())
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
        let mut sig = 0;
        // SAFETY: waits on a set initialised by block_stop_signals.
        unsafe { libc::sigwait(&raw const set, &raw mut sig) };
        f();
    });
}
