//! One connection: the `Hello` handshake, then requests one at a time.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use specc_protocol::{
    AgentInfo, ErrorInfo, ErrorKind, FrameError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Request,
    Response, RestoredRequest, frame,
};

use crate::exec::{self, Session};
use crate::identity::{self, IdentityConfig};
use crate::init::{self, PowerAction};
use crate::log::log;
use crate::{files, forward, gateway};

/// The sending half of a connection, shared by the request loop and exec pumps; the mutex
/// keeps frames whole.
#[derive(Clone, Debug)]
pub struct Outbox(Arc<Mutex<File>>);

impl Outbox {
    /// Sends one frame.
    pub fn send(&self, r: &Response) -> Result<(), FrameError> {
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        frame::write_frame(&mut *f, r)
    }

    fn error(&self, e: ErrorInfo) {
        let _ = self.send(&Response::Error(e));
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct Ctx {
    /// Where users and groups are looked up.
    pub etc: PathBuf,
    /// What `Restored` may change.
    pub identity: IdentityConfig,
    /// Whether the agent is PID 1.
    pub pid1: bool,
}

fn uptime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn protocol_error(msg: &str) -> ErrorInfo {
    ErrorInfo::new(ErrorKind::Protocol, msg)
}

/// The version of a connection: the newest both sides speak.
fn choose_version(min_version: u32, max_version: u32) -> Option<u32> {
    let v = max_version.min(PROTOCOL_VERSION);
    (v >= min_version.max(MIN_PROTOCOL_VERSION)).then_some(v)
}

/// What the request loop does after a request.
enum Next {
    /// Read the next request.
    Request,
    /// `connect` succeeded: the connection is a raw pipe to this socket from now on.
    Pipe(std::net::TcpStream),
}

/// A new identity, then (when asked) the wait for the default gateway: the identity comes first
/// so a gateway that never answers still leaves the clone with its own identity.
fn restored(r: &RestoredRequest, cfg: &IdentityConfig) -> Result<Response, ErrorInfo> {
    let mut ack = identity::apply(r, cfg)?;
    if let Some(ms) = r.await_gateway_ms {
        let wait = gateway::await_gateway(Duration::from_millis(u64::from(ms)))
            .map_err(|e| ErrorInfo::from_io("await the default gateway", &e))?;
        log!(
            "restored: gateway {:?} {} after {} ms",
            wait.gateway,
            if wait.answered {
                "answered"
            } else {
                "did not answer"
            },
            wait.waited_ms
        );
        ack.gateway = Some(wait);
    }
    Ok(Response::Restored(ack))
}

/// Serves one connection until the host closes it.
pub fn serve(conn: File, ctx: &Ctx) -> io::Result<()> {
    let out = Outbox(Arc::new(Mutex::new(conn.try_clone()?)));
    let mut reader = BufReader::with_capacity(64 << 10, conn);
    let version = match frame::read_frame::<_, Request>(&mut reader) {
        Ok(Some(Request::Hello {
            min_version,
            max_version,
            ..
        })) => {
            let Some(version) = choose_version(min_version, max_version) else {
                out.error(ErrorInfo::new(
                    ErrorKind::UnsupportedVersion,
                    format!(
                        "agent speaks protocol {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, host asked for {min_version}..={max_version}"
                    ),
                ));
                return Ok(());
            };
            let _ = out.send(&Response::Hello(AgentInfo {
                version,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                pid1: ctx.pid1,
                hostname: identity::hostname(),
            }));
            version
        }
        Ok(Some(_)) | Err(FrameError::Decode(_)) => {
            out.error(protocol_error("the first frame must be hello"));
            return Ok(());
        }
        Ok(None) => return Ok(()),
        Err(e) => return Err(io::Error::other(e)),
    };

    let mut exec: Option<Session> = None;
    let mut writer: Option<files::Writer> = None;
    let result = loop {
        let req = match frame::read_frame::<_, Request>(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) if e.is_recoverable() => {
                out.error(protocol_error(&format!("bad frame: {}", init::chain(&e))));
                continue;
            }
            Err(e) => break Err(io::Error::other(e)),
        };
        match req {
            Request::WriteData { data } => match writer.as_mut() {
                Some(w) => w.data(&data),
                None => out.error(protocol_error("write_data without write_file")),
            },
            Request::WriteEnd => match writer.take() {
                Some(w) => match w.finish() {
                    Ok(()) => {
                        let _ = out.send(&Response::Ok);
                    }
                    Err(e) => out.error(e),
                },
                None => out.error(protocol_error("write_end without write_file")),
            },
            Request::WriteAbort => match writer.take() {
                Some(w) => {
                    w.abort();
                    let _ = out.send(&Response::Ok);
                }
                None => out.error(protocol_error("write_abort without write_file")),
            },
            // Stdin and signals for an exec that has already ended are dropped: the host may
            // still be sending stdin when the process exits.
            Request::Stdin { data } => {
                if let Some(s) = &exec {
                    s.stdin(data);
                }
            }
            Request::StdinEof => {
                if let Some(s) = exec.as_mut() {
                    s.stdin_eof();
                }
            }
            Request::Resize(size) => {
                if let Some(s) = &exec {
                    s.resize(size);
                }
            }
            Request::Kill { signal } => {
                if let Some(s) = &exec {
                    s.kill(signal);
                }
            }
            other => {
                if let Some(w) = writer.take() {
                    w.abort();
                    out.error(protocol_error("a new request arrived during write_file"));
                    continue;
                }
                if exec.as_ref().is_some_and(|s| !s.is_done()) {
                    out.error(protocol_error(
                        "an exec is still running on this connection",
                    ));
                    continue;
                }
                exec = None;
                if let Next::Pipe(tcp) = handle(other, version, ctx, &out, &mut exec, &mut writer) {
                    // Whatever the frame reader read past the request belongs to the pipe.
                    let pending = reader.buffer().to_vec();
                    break forward::pipe(reader.into_inner(), &pending, tcp);
                }
            }
        }
    };
    if let Some(s) = exec {
        // The host hung up: nobody can see the output or stop the process any more.
        s.kill(libc::SIGKILL);
    }
    if let Some(w) = writer {
        w.abort();
    }
    result
}

fn reply(out: &Outbox, r: Result<Response, ErrorInfo>) {
    match r {
        Ok(resp) => {
            let _ = out.send(&resp);
        }
        Err(e) => out.error(e),
    }
}

fn handle(
    req: Request,
    version: u32,
    ctx: &Ctx,
    out: &Outbox,
    exec: &mut Option<Session>,
    writer: &mut Option<files::Writer>,
) -> Next {
    match req {
        Request::Hello { .. } => out.error(protocol_error("hello was already done")),
        Request::Ping => reply(
            out,
            Ok(Response::Pong {
                uptime_ns: uptime_ns(),
            }),
        ),
        Request::Exec(r) => match exec::start(&r, &ctx.etc, out) {
            Ok(s) => *exec = Some(s),
            Err(e) => out.error(e),
        },
        Request::ReadFile { path, offset, len } => {
            if let Err(e) = files::read_file(&path, offset, len, out) {
                out.error(e);
            }
        }
        Request::WriteFile(r) => *writer = Some(files::Writer::open(r)),
        Request::ListDir { path } => {
            if let Err(e) = files::list_dir(&path, out) {
                out.error(e);
            }
        }
        Request::Stat {
            path,
            follow_symlinks,
        } => reply(out, files::stat(&path, follow_symlinks).map(Response::Stat)),
        Request::Mkdir {
            path,
            mode,
            parents,
        } => reply(
            out,
            files::mkdir(&path, mode, parents).map(|()| Response::Ok),
        ),
        Request::Remove { path, recursive } => {
            reply(out, files::remove(&path, recursive).map(|()| Response::Ok));
        }
        Request::Restored(r) => reply(out, restored(&r, &ctx.identity)),
        Request::Connect { .. } if version < 2 => {
            out.error(protocol_error("connect needs protocol version 2"));
        }
        Request::Connect { port } => match forward::connect(port) {
            Ok(tcp) => {
                if out.send(&Response::Ok).is_ok() {
                    return Next::Pipe(tcp);
                }
            }
            Err(e) => out.error(e),
        },
        Request::PowerOff | Request::Reboot => {
            let action = if req == Request::PowerOff {
                PowerAction::Off
            } else {
                PowerAction::Reboot
            };
            let _ = out.send(&Response::Ok);
            log!(
                "{} requested by the host",
                if action == PowerAction::Off {
                    "power off"
                } else {
                    "reboot"
                }
            );
            init::power(action, ctx.pid1);
        }
        Request::WriteData { .. }
        | Request::WriteEnd
        | Request::WriteAbort
        | Request::Stdin { .. }
        | Request::StdinEof
        | Request::Resize(_)
        | Request::Kill { .. } => unreachable!("routed by serve"),
    }
    Next::Request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_version_takes_the_newest_both_sides_speak() {
        assert_eq!(choose_version(1, 1), Some(1));
        assert_eq!(choose_version(1, 2), Some(2));
        assert_eq!(choose_version(1, 99), Some(PROTOCOL_VERSION));
        assert_eq!(choose_version(0, 1), Some(1));
        assert_eq!(choose_version(PROTOCOL_VERSION + 1, 99), None);
        assert_eq!(choose_version(0, 0), None);
    }
}
