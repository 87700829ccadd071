//! A blocking host-side client of the agent, over any `Read + Write` stream, and the dialers
//! that open such a stream: through the VMM's vsock unix socket (`CONNECT <port>\n`, the
//! Firecracker convention) or straight to an agent listening on a unix socket (host tests).
//!
//! One [`Client`] is one connection and runs one request at a time; run requests concurrently
//! by opening more connections (see `docs/agent-protocol.md` for why).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::frame::{self, FrameError, MAX_CHUNK};
use crate::messages::{
    AgentInfo, DirEntry, ErrorInfo, ExecRequest, ExitStatus, FileStat, Request, Response,
    RestoredAck, RestoredRequest, WriteFileRequest,
};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The unix socket could not be connected.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The deadline passed before the agent answered.
    #[error("no answer from the agent at {} within {timeout:?}", path.display())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout given.
        timeout: Duration,
    },
    /// The VMM's vsock socket answered the `CONNECT` line with something other than `OK`.
    #[error("vsock CONNECT {port} was refused: {reply:?}")]
    VsockRefused {
        /// The guest port.
        port: u32,
        /// The reply line.
        reply: String,
    },
    /// Reading or writing a frame failed.
    #[error("agent connection failed")]
    Frame(#[from] FrameError),
    /// The agent closed the connection.
    #[error("the agent closed the connection")]
    Closed,
    /// The agent refused the request.
    #[error("the agent refused the request: {0}")]
    Agent(ErrorInfo),
    /// The agent sent a frame that does not fit the request in flight. The connection cannot
    /// be used any more.
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// A description of what came.
        got: String,
    },
    /// The agent speaks an older protocol version that lacks the request.
    #[error("{request} needs protocol version {needs}; the agent speaks {version}")]
    AgentTooOld {
        /// The request.
        request: &'static str,
        /// The first version that has it.
        needs: u32,
        /// The version of this connection.
        version: u32,
    },
    /// An earlier error left this connection out of step with the agent.
    #[error("the connection is broken by an earlier error")]
    Broken,
    /// Reading the caller's stdin source or writing the caller's sink failed.
    #[error("local I/O failed")]
    Local(#[source] io::Error),
}

/// Collected result of [`Client::exec_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// A connection to the agent that has completed the `Hello` handshake.
#[derive(Debug)]
pub struct Client<S: Read + Write> {
    stream: S,
    info: AgentInfo,
    broken: bool,
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Reads one `\n`-terminated line byte by byte, so nothing after it is consumed.
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > 128 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// One dial attempt; `Ok(None)` means "not there yet, try again".
type Attempt = Result<Option<UnixStream>, ClientError>;

fn dial_with_retry(
    path: &Path,
    timeout: Duration,
    mut attempt: impl FnMut(UnixStream, Duration) -> Attempt,
) -> Result<Client<UnixStream>, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(5);
    loop {
        let Some(left) = remaining(deadline) else {
            return Err(ClientError::Timeout {
                path: path.to_owned(),
                timeout,
            });
        };
        match UnixStream::connect(path) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(left))
                    .map_err(ClientError::Local)?;
                stream
                    .set_write_timeout(Some(left))
                    .map_err(ClientError::Local)?;
                if let Some(stream) = attempt(stream, left)? {
                    match Client::handshake(stream) {
                        Ok(client) => {
                            client
                                .stream
                                .set_read_timeout(None)
                                .map_err(ClientError::Local)?;
                            client
                                .stream
                                .set_write_timeout(None)
                                .map_err(ClientError::Local)?;
                            return Ok(client);
                        }
                        // The agent may be restarting (or the guest not yet listening behind
                        // the VMM): a dropped connection during Hello is worth a retry.
                        Err(ClientError::Frame(FrameError::Io(e))) if retryable(&e) => {}
                        Err(ClientError::Frame(FrameError::Truncated))
                        | Err(ClientError::Closed) => {}
                        Err(ClientError::Frame(FrameError::Io(e)))
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            return Err(ClientError::Timeout {
                                path: path.to_owned(),
                                timeout,
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) if retryable(&e) => {}
            Err(source) => {
                return Err(ClientError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        std::thread::sleep(backoff.min(remaining(deadline).unwrap_or_default()));
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
}

impl Client<UnixStream> {
    /// Connects to guest `port` through the VMM's vsock unix socket at `path`: writes
    /// `CONNECT <port>\n`, expects `OK <n>\n`, then does the `Hello` handshake. Retries (with a
    /// short backoff) while the socket does not exist yet or the guest is not listening yet,
    /// until `timeout` has passed.
    pub fn connect_uds(path: &Path, port: u32, timeout: Duration) -> Result<Self, ClientError> {
        dial_with_retry(path, timeout, |mut stream, _| {
            if let Err(e) = stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
                return if retryable(&e) {
                    Ok(None)
                } else {
                    Err(ClientError::Local(e))
                };
            }
            match read_line(&mut stream) {
                Ok(reply) if reply.starts_with("OK ") => Ok(Some(stream)),
                Ok(reply) => Err(ClientError::VsockRefused { port, reply }),
                // Firecracker-style muxers close the connection while nobody listens on the
                // guest port: the agent is not up yet.
                Err(e) if retryable(&e) => Ok(None),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    Err(ClientError::Timeout {
                        path: path.to_owned(),
                        timeout,
                    })
                }
                Err(e) => Err(ClientError::Local(e)),
            }
        })
    }

    /// Connects to an agent listening directly on the unix socket `path`
    /// (`specc-agent --listen unix:PATH`), retrying until `timeout` while it is not there yet.
    pub fn connect_unix(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        dial_with_retry(path, timeout, |stream, _| Ok(Some(stream)))
    }
}

impl<S: Read + Write> Client<S> {
    /// Does the `Hello` handshake on an already open stream.
    pub fn handshake(mut stream: S) -> Result<Self, ClientError> {
        frame::write_frame(
            &mut stream,
            &Request::Hello {
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                client: concat!("specc-protocol/", env!("CARGO_PKG_VERSION")).to_owned(),
            },
        )?;
        match frame::read_frame::<_, Response>(&mut stream)? {
            Some(Response::Hello(info))
                if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&info.version) =>
            {
                Ok(Client {
                    stream,
                    info,
                    broken: false,
                })
            }
            Some(Response::Hello(info)) => Err(ClientError::Unexpected {
                expected: "a protocol version this client speaks",
                got: format!("version {}", info.version),
            }),
            Some(Response::Error(e)) => Err(ClientError::Agent(e)),
            Some(other) => Err(ClientError::Unexpected {
                expected: "hello",
                got: describe(&other),
            }),
            None => Err(ClientError::Closed),
        }
    }

    /// What the agent said about itself in the handshake.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// The underlying stream (e.g. to set timeouts).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        frame::write_frame(&mut self.stream, req).inspect_err(|_| self.broken = true)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        match frame::read_frame(&mut self.stream) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => {
                self.broken = true;
                Err(ClientError::Closed)
            }
            Err(e) => {
                self.broken = true;
                Err(e.into())
            }
        }
    }

    fn unexpected<T>(&mut self, expected: &'static str, got: Response) -> Result<T, ClientError> {
        if let Response::Error(e) = got {
            return Err(ClientError::Agent(e));
        }
        self.broken = true;
        Err(ClientError::Unexpected {
            expected,
            got: describe(&got),
        })
    }

    /// Sends a request whose only answer is `Ok`.
    fn simple(&mut self, req: &Request) -> Result<(), ClientError> {
        self.send(req)?;
        match self.recv()? {
            Response::Ok => Ok(()),
            other => self.unexpected("ok", other),
        }
    }

    /// Liveness probe; returns the guest's uptime.
    pub fn ping(&mut self) -> Result<Duration, ClientError> {
        self.send(&Request::Ping)?;
        match self.recv()? {
            Response::Pong { uptime_ns } => Ok(Duration::from_nanos(uptime_ns)),
            other => self.unexpected("pong", other),
        }
    }

    /// Runs a process with stdin from `/dev/null` (whatever `req.stdin` says), streaming its
    /// output to the callbacks as the agent sends it.
    pub fn exec(
        &mut self,
        req: &ExecRequest,
        on_stdout: impl FnMut(&[u8]),
        on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let req = ExecRequest {
            stdin: false,
            ..req.clone()
        };
        self.exec_inner(&req, None, |_, _| {}, on_stdout, on_stderr)
    }

    /// Runs a process whose stdin is fed from `stdin` (read to its end, then closed).
    ///
    /// All of `stdin` is sent before the output is read: the agent buffers stdin, so this never
    /// deadlocks, but the input cannot depend on the output (no interactive sessions here).
    pub fn exec_with_stdin(
        &mut self,
        req: &ExecRequest,
        stdin: &mut dyn Read,
        on_stdout: impl FnMut(&[u8]),
        on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let req = ExecRequest {
            stdin: true,
            ..req.clone()
        };
        self.exec_inner(&req, Some(stdin), |_, _| {}, on_stdout, on_stderr)
    }

    /// Runs a process like [`Client::exec`] and [`Client::exec_with_stdin`], and calls
    /// `on_started` with the stream and the guest pid as soon as the agent reports the process
    /// running, before anything else is sent or read.
    ///
    /// The agent's `timeout_ms` counts from that moment, not from the request: a busy guest may
    /// pick the request up long after it was sent. A caller that bounds its wait for the exit
    /// (a read timeout on the stream) starts that bound here.
    ///
    /// `req.stdin` decides whether the process gets a stdin pipe. With `stdin` given it is sent
    /// whole, then closed. With `req.stdin` set and no `stdin`, the caller feeds the pipe
    /// itself while the output streams: it writes [`Request::Stdin`] frames and one
    /// [`Request::StdinEof`] to a clone of the stream taken in `on_started` (this client writes
    /// nothing on the connection after `ExecStarted` then).
    pub fn exec_with(
        &mut self,
        req: &ExecRequest,
        stdin: Option<&mut dyn Read>,
        on_started: impl FnOnce(&S, i32),
        on_stdout: impl FnMut(&[u8]),
        on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let req = ExecRequest {
            stdin: req.stdin || stdin.is_some(),
            ..req.clone()
        };
        self.exec_inner(&req, stdin, on_started, on_stdout, on_stderr)
    }

    /// Runs a process (stdin from `/dev/null`) and collects its output.
    pub fn exec_output(&mut self, req: &ExecRequest) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self.exec(
            req,
            |d| stdout.extend_from_slice(d),
            |d| stderr.extend_from_slice(d),
        )?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    fn exec_inner(
        &mut self,
        req: &ExecRequest,
        stdin: Option<&mut dyn Read>,
        on_started: impl FnOnce(&S, i32),
        mut on_stdout: impl FnMut(&[u8]),
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        self.send(&Request::Exec(req.clone()))?;
        match self.recv()? {
            Response::ExecStarted { pid } => on_started(&self.stream, pid),
            other => return self.unexpected("exec_started", other),
        }
        let mut local_err = None;
        if let Some(stdin) = stdin {
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.send(&Request::Stdin {
                        data: buf[..n].to_vec(),
                    })?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Stop the process rather than let it run on a truncated input.
                        self.send(&Request::Kill { signal: 9 })?;
                        local_err = Some(e);
                        break;
                    }
                }
            }
            self.send(&Request::StdinEof)?;
        }
        loop {
            match self.recv()? {
                Response::Stdout { data } => on_stdout(&data),
                Response::Stderr { data } => on_stderr(&data),
                Response::Exit(status) => {
                    return match local_err {
                        Some(e) => Err(ClientError::Local(e)),
                        None => Ok(status),
                    };
                }
                other => return self.unexpected("stdout, stderr or exit", other),
            }
        }
    }

    /// Reads a whole file.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_to(path, 0, None, &mut out)?;
        Ok(out)
    }

    /// Reads up to `len` bytes (all when `None`) of a file from `offset` into `sink`; returns
    /// the number of bytes read.
    pub fn read_file_to(
        &mut self,
        path: &str,
        offset: u64,
        len: Option<u64>,
        sink: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        self.send(&Request::ReadFile {
            path: path.to_owned(),
            offset,
            len,
        })?;
        let mut local_err = None;
        loop {
            match self.recv()? {
                Response::FileData { data } => {
                    if local_err.is_none() {
                        local_err = sink.write_all(&data).err();
                    }
                }
                Response::FileEnd { size } => {
                    return match local_err {
                        Some(e) => Err(ClientError::Local(e)),
                        None => Ok(size),
                    };
                }
                other => return self.unexpected("file_data or file_end", other),
            }
        }
    }

    /// Writes a whole file from memory.
    pub fn write_file(&mut self, req: &WriteFileRequest, data: &[u8]) -> Result<(), ClientError> {
        let mut src = data;
        self.write_file_from(req, &mut src).map(|_| ())
    }

    /// Writes a file from `src` (read to its end); returns the number of bytes sent.
    pub fn write_file_from(
        &mut self,
        req: &WriteFileRequest,
        src: &mut dyn Read,
    ) -> Result<u64, ClientError> {
        self.send(&Request::WriteFile(req.clone()))?;
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut total = 0u64;
        let mut local_err = None;
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n as u64;
                    self.send(&Request::WriteData {
                        data: buf[..n].to_vec(),
                    })?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    local_err = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = local_err {
            // A truncated source must not replace the file: abandon the write.
            self.send(&Request::WriteAbort)?;
            match self.recv()? {
                Response::Ok | Response::Error(_) => return Err(ClientError::Local(e)),
                other => return self.unexpected("ok", other),
            }
        }
        self.send(&Request::WriteEnd)?;
        match self.recv()? {
            Response::Ok => Ok(total),
            other => self.unexpected("ok", other),
        }
    }

    /// Lists a directory (entries in the order the guest's `readdir` returned them, without
    /// `.` and `..`).
    pub fn list_dir(&mut self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        self.send(&Request::ListDir {
            path: path.to_owned(),
        })?;
        let mut all = Vec::new();
        loop {
            match self.recv()? {
                Response::DirEntries { entries } => all.extend(entries),
                Response::DirEnd => return Ok(all),
                other => return self.unexpected("dir_entries or dir_end", other),
            }
        }
    }

    /// Metadata of `path`, following a final symlink when `follow_symlinks`.
    pub fn stat(&mut self, path: &str, follow_symlinks: bool) -> Result<FileStat, ClientError> {
        self.send(&Request::Stat {
            path: path.to_owned(),
            follow_symlinks,
        })?;
        match self.recv()? {
            Response::Stat(st) => Ok(st),
            other => self.unexpected("stat", other),
        }
    }

    /// Creates a directory with exactly `mode`; `parents` is `mkdir -p`.
    pub fn mkdir(&mut self, path: &str, mode: u32, parents: bool) -> Result<(), ClientError> {
        self.simple(&Request::Mkdir {
            path: path.to_owned(),
            mode,
            parents,
        })
    }

    /// Removes a path; `recursive` is `rm -r`.
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.simple(&Request::Remove {
            path: path.to_owned(),
            recursive,
        })
    }

    /// Tells the agent the VM was restored or forked: new clock, entropy and identity.
    pub fn restored(&mut self, req: &RestoredRequest) -> Result<RestoredAck, ClientError> {
        self.send(&Request::Restored(req.clone()))?;
        match self.recv()? {
            Response::Restored(ack) => Ok(ack),
            other => self.unexpected("restored", other),
        }
    }

    /// Asks the guest to sync and power off; returns once the agent acknowledged.
    pub fn power_off(&mut self) -> Result<(), ClientError> {
        self.simple(&Request::PowerOff)
    }

    /// Asks the guest to sync and reboot; returns once the agent acknowledged.
    pub fn reboot(&mut self) -> Result<(), ClientError> {
        self.simple(&Request::Reboot)
    }

    /// Turns this connection into a raw byte pipe to TCP `port` on the guest's loopback
    /// (protocol 2): once the agent has connected, the returned stream carries the TCP
    /// stream's bytes both ways, unframed. Shutting down its write side reaches the guest
    /// socket as a half-close where the transport carries one. Nothing listening in the guest
    /// is `ClientError::Agent` with [`crate::ErrorKind::ConnectionRefused`].
    pub fn connect_port(mut self, port: u16) -> Result<S, ClientError> {
        const NEEDS: u32 = 2;
        if self.info.version < NEEDS {
            return Err(ClientError::AgentTooOld {
                request: "connect",
                needs: NEEDS,
                version: self.info.version,
            });
        }
        self.send(&Request::Connect { port })?;
        match self.recv()? {
            Response::Ok => Ok(self.stream),
            other => self.unexpected("ok", other),
        }
    }
}

fn describe(r: &Response) -> String {
    let json = serde_json::to_string(r).unwrap_or_default();
    let mut s: String = json.chars().take(120).collect();
    if s.len() < json.len() {
        s.push('…');
    }
    s
}

impl RestoredRequest {
    /// A new identity taken now: the host's wall clock, 64 bytes from the host's
    /// `/dev/urandom`, a random machine id, and `hostname` (unchanged when `None`).
    pub fn fresh(hostname: Option<String>) -> io::Result<Self> {
        let mut random = [0u8; 80];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        let (entropy, id) = random.split_at(64);
        let machine_id = id.iter().map(|b| format!("{b:02x}")).collect();
        let unix_time_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(io::Error::other)?
            .as_nanos();
        Ok(RestoredRequest {
            unix_time_ns: u64::try_from(unix_time_ns).map_err(io::Error::other)?,
            entropy: entropy.to_vec(),
            hostname,
            machine_id: Some(machine_id),
            await_gateway_ms: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    use super::*;

    /// A stand-in for the VMM's vsock muxer plus a minimal agent: the first `refuse`
    /// connections are closed after the CONNECT line (nobody listening in the guest yet).
    fn fake_muxer(path: &Path, refuse: usize) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for i in 0.. {
                let (mut s, _) = listener.accept().unwrap();
                let line = read_line(&mut s).unwrap();
                lines.push(line);
                if i < refuse {
                    continue;
                }
                s.write_all(b"OK 52\n").unwrap();
                let hello: Request = frame::read_frame(&mut s).unwrap().unwrap();
                assert!(matches!(hello, Request::Hello { min_version: 1, .. }));
                frame::write_frame(
                    &mut s,
                    &Response::Hello(AgentInfo {
                        version: 2,
                        agent_version: "test".into(),
                        pid1: true,
                        hostname: "guest".into(),
                    }),
                )
                .unwrap();
                let ping: Request = frame::read_frame(&mut s).unwrap().unwrap();
                assert_eq!(ping, Request::Ping);
                frame::write_frame(&mut s, &Response::Pong { uptime_ns: 5 }).unwrap();
                break;
            }
            lines
        })
    }

    #[test]
    fn connect_uds_sends_connect_and_retries_until_the_guest_listens() {
        let dir = std::env::temp_dir().join(format!("specc-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&sock);
        let muxer = fake_muxer(&sock, 2);
        let mut c = Client::connect_uds(&sock, 1024, Duration::from_secs(20)).unwrap();
        assert!(c.info().pid1);
        assert_eq!(c.info().hostname, "guest");
        assert_eq!(c.ping().unwrap(), Duration::from_nanos(5));
        let lines = muxer.join().unwrap();
        assert_eq!(lines, vec!["CONNECT 1024"; 3]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connect_uds_times_out_when_the_socket_never_appears() {
        let err = Client::connect_uds(
            Path::new("/nonexistent/specc/vsock.sock"),
            1024,
            Duration::from_millis(50),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    }

    /// A minimal agent on the other end of a socket pair that speaks `version`, answers
    /// `Connect` with `reply`, and after an `Ok` echoes the raw bytes it gets, upper-cased,
    /// until EOF, then half-closes and returns what it received.
    fn fake_connect_agent(
        mut s: UnixStream,
        version: u32,
        reply: Response,
    ) -> std::thread::JoinHandle<(Option<Request>, Vec<u8>)> {
        std::thread::spawn(move || {
            let hello: Request = frame::read_frame(&mut s).unwrap().unwrap();
            assert!(matches!(
                hello,
                Request::Hello {
                    min_version: 1,
                    max_version: 2,
                    ..
                }
            ));
            frame::write_frame(
                &mut s,
                &Response::Hello(AgentInfo {
                    version,
                    agent_version: "test".into(),
                    pid1: false,
                    hostname: "guest".into(),
                }),
            )
            .unwrap();
            let Some(req) = frame::read_frame::<_, Request>(&mut s).unwrap() else {
                return (None, Vec::new());
            };
            let ok = reply == Response::Ok;
            frame::write_frame(&mut s, &reply).unwrap();
            let mut got = Vec::new();
            if ok {
                let mut buf = [0u8; 4096];
                loop {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    s.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
            }
            (Some(req), got)
        })
    }

    #[test]
    fn connect_port_returns_the_raw_stream_after_ok() {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = fake_connect_agent(guest, 2, Response::Ok);
        let mut raw = Client::handshake(host).unwrap().connect_port(8080).unwrap();
        raw.write_all(b"no frames here\n").unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        raw.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"NO FRAMES HERE\n");
        let (req, got) = agent.join().unwrap();
        assert_eq!(req, Some(Request::Connect { port: 8080 }));
        assert_eq!(got, b"no frames here\n");
    }

    #[test]
    fn connect_port_reports_a_refused_port_as_an_agent_error() {
        let (host, guest) = UnixStream::pair().unwrap();
        let refused = ErrorInfo {
            kind: crate::ErrorKind::ConnectionRefused,
            message: "connect to 127.0.0.1:9: Connection refused".into(),
            errno: Some(111),
        };
        let agent = fake_connect_agent(guest, 2, Response::Error(refused.clone()));
        let err = Client::handshake(host)
            .unwrap()
            .connect_port(9)
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Agent(e) if *e == refused),
            "{err}"
        );
        assert_eq!(agent.join().unwrap().0, Some(Request::Connect { port: 9 }));
    }

    #[test]
    fn connect_port_to_a_version_1_agent_fails_without_sending_anything() {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = fake_connect_agent(guest, 1, Response::Ok);
        let client = Client::handshake(host).unwrap();
        assert_eq!(client.info().version, 1);
        let err = client.connect_port(80).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::AgentTooOld {
                    needs: 2,
                    version: 1,
                    ..
                }
            ),
            "{err}"
        );
        // The client was dropped: the agent saw EOF instead of a request.
        assert_eq!(agent.join().unwrap().0, None);
    }

    #[test]
    fn handshake_refuses_a_version_outside_the_range() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || {
            let _: Request = frame::read_frame(&mut guest).unwrap().unwrap();
            frame::write_frame(
                &mut guest,
                &Response::Hello(AgentInfo {
                    version: PROTOCOL_VERSION + 1,
                    agent_version: "future".into(),
                    pid1: false,
                    hostname: "guest".into(),
                }),
            )
            .unwrap();
        });
        let err = Client::handshake(host).unwrap_err();
        assert!(matches!(err, ClientError::Unexpected { .. }), "{err}");
        agent.join().unwrap();
    }

    #[test]
    fn restored_fresh_gives_distinct_identities() {
        let a = RestoredRequest::fresh(Some("a".into())).unwrap();
        let b = RestoredRequest::fresh(None).unwrap();
        assert_eq!(a.entropy.len(), 64);
        assert_ne!(a.entropy, b.entropy);
        assert_ne!(a.machine_id, b.machine_id);
        assert_eq!(a.machine_id.as_ref().unwrap().len(), 32);
    }
}
