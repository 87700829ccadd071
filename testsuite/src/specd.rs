//! A `specd` process for tests and benchmarks: started on a state directory, waited for until
//! `/v1/health` answers, killed with SIGKILL (the daemon's VMs are detached and live on), and
//! killed when dropped. Shared by the specd end-to-end test and `specc-bench api-create|wake|load`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ::specd::api;
use ::specd::client::Client;
use anyhow::{Context, bail};

/// A running daemon.
#[derive(Debug)]
pub struct Specd {
    child: Child,
    socket: PathBuf,
    state: PathBuf,
}

/// The `specd` binary of this build profile: beside the running executable (a binary such as
/// specc-bench) or one directory up (a test binary in `deps/`).
pub fn specd_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    let candidates = [
        Some(dir.join("specd")),
        dir.parent().map(|p| p.join("specd")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no specd binary beside {} (build it with `cargo build -p specd` in this profile)",
                exe.display()
            )
        })
}

impl Specd {
    /// Starts `specd --state STATE --run-dir STATE/run` with `extra` arguments (appending its
    /// log to `STATE/specd.log`) and waits until it answers. The state directory must be on a
    /// file system that can hold unix sockets (not the rig's 9p view of the host).
    pub fn start(state: &Path, extra: &[&str]) -> anyhow::Result<Specd> {
        let bin = specd_binary()?;
        std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
        let run_dir = state.join("run");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.join("specd.log"))
            .context("opening specd.log")?;
        let child = Command::new(&bin)
            .arg("--state")
            .arg(state)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut d = Specd {
            child,
            socket: run_dir.join("specd.sock"),
            state: state.to_owned(),
        };
        let t0 = Instant::now();
        while d
            .client()
            .call::<api::Health>("GET", "/v1/health", None::<&()>)
            .is_err()
        {
            if let Some(status) = d.child.try_wait()? {
                bail!("specd exited ({status}) before answering:\n{}", d.log());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("specd did not answer within 60 s:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// A client of its API socket.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("specd.log")).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Its state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the daemon with SIGKILL and reaps it; its VMs keep running.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill().context("killing specd")?;
        self.child.wait().context("reaping specd")?;
        Ok(())
    }
}

impl Drop for Specd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- specd log ---\n{}", self.log());
        }
        // Detached VMs left behind die with the rig, or are attached again (and cleaned up)
        // by the next daemon on this state directory.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes, when dropped, the store pins (`$SPECC_HOME/store/pins/`) that a daemon on one
/// state directory wrote: a run that fails leaves VMs in a temporary state directory that goes
/// away, and their pins would keep the layer from `specc gc` forever. Drop it after the
/// daemon (declare it before), so no daemon pins again behind it.
#[derive(Debug)]
pub struct PinSweep {
    prefix: String,
}

impl PinSweep {
    /// For the daemon on `state`.
    pub fn new(state: &Path) -> PinSweep {
        PinSweep {
            prefix: ::specd::daemon::pin_prefix(state),
        }
    }
}

impl Drop for PinSweep {
    fn drop(&mut self) {
        let Ok(store) = specc_store::Store::open_default() else {
            return;
        };
        for name in store.pins().unwrap_or_default().keys() {
            if name.starts_with(&self.prefix) {
                let _ = store.unpin(name);
            }
        }
    }
}
