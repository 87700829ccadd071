//! The VMM process's control API (docs/vmm.md): newline-delimited JSON on a unix socket, one
//! reply line per request line. The daemon, the builder and the machine crate drive a running
//! VM through it: pause, resume, snapshot, fork, stop.
//!
//! Requests are handed to the thread that owns the VM (the process's main loop) and answered
//! in order; the control thread itself never touches the VM, so a fork happens on the owner's
//! thread with the control thread parked on its reply channel.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use crate::exit::Waker;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the VM running or paused.
    Status,
    /// Stop the vCPUs (devices keep their state; the guest clock is told it was stopped).
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Write a snapshot to `dir` (created; must not exist).
    Snapshot {
        /// The snapshot directory.
        dir: PathBuf,
        /// Write only the pages that differ from the memory file the VM was restored from.
        #[serde(default)]
        diff: bool,
        /// What the VM does afterwards.
        #[serde(default)]
        then: After,
    },
    /// Live fork: one child VM per run directory.
    Fork {
        /// The children's run directories.
        children: Vec<PathBuf>,
        /// How the children get memory; absent: the VM's `fork_mode`. `cow` gives children
        /// within milliseconds at a pause that grows with memory, `precopy` a pause that does
        /// not, after a copy of the touched RAM (docs/fork.md).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<crate::snapshot::ForkMode>,
    },
    /// Move a restored VM's guest RAM into anonymous huge pages now, ahead of its first fork
    /// (`Vmm::promote_memory`; running or paused). The result is the `PromotionReport`, or
    /// null if there was nothing to promote.
    Promote,
    /// For a guest that stopped answering: the vCPUs (mp_state, LAPIC IRR/ISR), the
    /// devices' IOAPIC pins, every virtqueue's indices in guest memory beside the device's,
    /// the interrupt status registers and the vsock connection table (`inspect::Inspection`).
    /// A running VM is paused for the moment of the reading.
    Inspect,
    /// By hand, for a stuck guest: raise every device's interrupt (`interrupts`, the default)
    /// and/or signal every queue as if the driver had notified it (`queues`).
    Kick {
        /// Raise the used-ring interrupt of every device.
        #[serde(default = "yes")]
        interrupts: bool,
        /// Signal every queue's notification event.
        #[serde(default)]
        queues: bool,
    },
    /// End the VM (the process exits 0).
    Stop,
}

fn yes() -> bool {
    true
}

/// What a VM does after a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    /// Run on (or stay paused if it was).
    #[default]
    Resume,
    /// Stay paused.
    Pause,
    /// End: the process exits 0 once the reply is sent (suspend to disk).
    Exit,
}

/// A reply: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The request's result.
    #[serde(default)]
    pub result: serde_json::Value,
}

impl Reply {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Reply {
            ok: true,
            error: None,
            result,
        }
    }

    /// A failure.
    pub fn err(error: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(error.into()),
            result: serde_json::Value::Null,
        }
    }
}

/// A request waiting for the VM's owner, with where its reply goes.
#[derive(Debug)]
pub struct Pending {
    /// The request.
    pub request: Request,
    /// Send exactly one reply here.
    pub reply: Sender<Reply>,
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the socket failed.
    #[error("binding the control socket {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
    /// Connecting to a VMM failed.
    #[error("connecting to the VMM control socket {}", .0.display())]
    Connect(PathBuf, #[source] std::io::Error),
    /// Reading or writing the socket failed.
    #[error("talking to the VMM control socket")]
    Io(#[from] std::io::Error),
    /// The VMM closed the connection without replying (it exited).
    #[error("the VMM closed the control connection without replying")]
    Closed,
    /// A line was not valid JSON of the expected shape.
    #[error("malformed control message")]
    Json(#[from] serde_json::Error),
    /// The VMM refused or failed the request.
    #[error("{0}")]
    Failed(String),
}

/// Serves the control socket at `path` on background threads: every request becomes a
/// [`Pending`] on `to_owner`, and `waker` interrupts the owner's wait. A stale socket file
/// is replaced.
pub fn serve(path: &Path, to_owner: Sender<Pending>, waker: Waker) -> Result<(), Error> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| Error::Bind(path.to_owned(), e))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = to_owner.clone();
                let waker = waker.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(conn, &tx, &waker));
            }
        })
        .map_err(|e| Error::Bind(path.to_owned(), e))?;
    Ok(())
}

fn serve_connection(conn: UnixStream, to_owner: &Sender<Pending>, waker: &Waker) {
    let Ok(read) = conn.try_clone() else { return };
    let mut out = conn;
    for line in BufReader::new(read).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::err(format!("malformed request: {e}")),
            Ok(request) => {
                let (tx, rx) = channel();
                if to_owner.send(Pending { request, reply: tx }).is_err() || !waker.wake() {
                    Reply::err("the VM has ended")
                } else {
                    rx.recv()
                        .unwrap_or_else(|_| Reply::err("the VM ended before replying"))
                }
            }
        };
        let Ok(mut text) = serde_json::to_string(&reply) else {
            return;
        };
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// A client of one VMM's control socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
}

impl Client {
    /// Connects, retrying until `timeout` while the socket does not exist or refuses (a VMM
    /// that is still starting).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    let writer = s.try_clone()?;
                    return Ok(Client {
                        reader: BufReader::new(s),
                        writer,
                        path: path.to_owned(),
                    });
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(Error::Connect(path.to_owned(), e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and returns its result, or the VMM's error.
    pub fn call(&mut self, request: &Request) -> Result<serde_json::Value, Error> {
        let mut text = serde_json::to_string(request)?;
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(Error::Closed);
        }
        let reply: Reply = serde_json::from_str(&line)?;
        if reply.ok {
            Ok(reply.result)
        } else {
            Err(Error::Failed(reply.error.unwrap_or_default()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request =
            serde_json::from_str(r#"{"op":"snapshot","dir":"/s","diff":true,"then":"exit"}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                dir: "/s".into(),
                diff: true,
                then: After::Exit
            }
        );
        let f: Request = serde_json::from_str(r#"{"op":"fork","children":["/a","/b"]}"#).unwrap();
        assert_eq!(
            f,
            Request::Fork {
                children: vec!["/a".into(), "/b".into()],
                mode: None
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"fork","children":["/a"],"mode":"cow"}"#)
                .unwrap(),
            Request::Fork {
                children: vec!["/a".into()],
                mode: Some(crate::snapshot::ForkMode::Cow)
            }
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"fork","children":[],"mode":"copy"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"fork","children":[],"x":1}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"promote"}"#).unwrap(),
            Request::Promote
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"inspect"}"#).unwrap(),
            Request::Inspect
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"kick"}"#).unwrap(),
            Request::Kick {
                interrupts: true,
                queues: false
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"kick","interrupts":false,"queues":true}"#)
                .unwrap(),
            Request::Kick {
                interrupts: false,
                queues: true
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn a_served_socket_hands_requests_to_the_owner_and_returns_its_replies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let (tx, rx) = channel::<Pending>();
        let (wtx, wrx) = channel();
        serve(&path, tx, Waker(wtx)).unwrap();
        let owner = std::thread::spawn(move || {
            for _ in 0..2 {
                let p = rx.recv().unwrap();
                assert!(matches!(wrx.recv().unwrap(), crate::exit::Event::Wake));
                let reply = match p.request {
                    Request::Status => Reply::ok(serde_json::json!({"state": "running"})),
                    _ => Reply::err("no"),
                };
                p.reply.send(reply).unwrap();
            }
        });
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(
            c.call(&Request::Status).unwrap(),
            serde_json::json!({"state": "running"})
        );
        assert!(matches!(c.call(&Request::Pause), Err(Error::Failed(m)) if m == "no"));
        owner.join().unwrap();
        // The owner is gone: requests fail cleanly instead of hanging.
        assert!(c.call(&Request::Status).is_err());
    }
}
