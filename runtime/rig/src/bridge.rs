//! The bridge: a unix-socket service inside the rig, reachable from host listeners.
//!
//! Unix sockets inside the rig are invisible to the host (9p does not carry them), so a server
//! in the rig (specd's API) would be out of reach. The bridge carries every connection to a
//! host listener (a unix socket, or TCP) over **one extra virtio-serial port** of the rig, and
//! the rig side connects each one to the server's unix socket there:
//!
//! ```text
//! host client ─▶ host listener ─▶ [mux] ─ socketpair ─ QEMU virtserialport 4 ─ /dev/vport0p4
//!                                                            ─▶ [mux, in the served process] ─▶ unix socket
//! ```
//!
//! Why a virtio-serial port and not QEMU user networking (`-netdev user,restrict=on,hostfwd=`,
//! which Debian's QEMU has): the port sits on the virtio-serial device the rig already has, so
//! it takes none of microvm's eight virtio-mmio slots (the writable shares need them), needs no
//! kernel option and no network set-up inside (the rig stays without a network device, which
//! `net: true` VMs' passt relies on), and ends on the host at a unix socket with file
//! permissions instead of a loopback TCP port that every local user can reach without
//! authentication. The price is the small framing below.
//!
//! The framing, both directions, on one byte stream: `kind: u8, id: u32 LE, len: u32 LE`, then
//! `len` (at most 64 KiB) bytes. The host numbers connections and announces each with `Open`;
//! `Data` carries bytes as they are read (nothing waits for more, so a streamed HTTP answer
//! streams); `Eof` is a half-close (`shutdown(SHUT_WR)` on the far socket); `Close` ends a
//! connection at once (an error, or the far side could not connect). Each side may have at
//! most [`WINDOW`] bytes of one connection in flight: the receiver returns `Credit` as it
//! writes them to its socket. So the one thread that reads the port never blocks on a slow
//! socket, and a client that stops reading stalls only its own connection, never the others
//! (a streaming exec and its concurrent stdin upload are two connections). The rig side
//! says `Hello` once it serves; the host accepts connections only then (they wait in the
//! listen backlog until that). `Stop` asks the rig side to stop the served process.
//!
//! **Mirrored TCP ports.** The served process may also listen on TCP ports of the rig's
//! loopback (specd's exposed VM ports) that must answer on the host's loopback under the same
//! numbers. The rig side keeps the set ([`RigPorts`]) and sends all of it in a `Ports` frame
//! (`id` a sequence number, the payload the ports as `u16 LE`) whenever it changes and right
//! after `Hello`; the host binds `127.0.0.1:<port>` for each port it has no listener for,
//! drops the listeners of ports no longer in the set, and answers `PortsAck` with the same
//! sequence number and the ports it could not bind (`port: u16 LE, errno: i32 LE` each). A
//! connection to such a listener is announced by an `Open` whose payload is the port (`u16
//! LE`); the rig side connects it to `127.0.0.1:<port>` there (an `Open` without payload goes
//! to the served unix socket).
//!
//! Why the whole set and not listen/unlisten deltas, and why pushed rather than polled by the
//! host: each `Ports` frame says everything, so the host's listeners match the rig side's set
//! after any one frame, whatever came before (a port that failed to bind is tried again at
//! the next one; nothing is lost when the host end reconnects or frames cross); and the rig
//! side can wait for the answer, so an API call that exposes a port (specd's create, fork)
//! returns only once the host listens on it, or knows why it cannot. Polling the API from the
//! host would leave a window after every create in which the reported port does not answer.

use std::collections::{BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

/// The bridge's port inside the rig: virtio-serial port 4, after stdout, stderr and control.
pub const RIG_PORT: &str = "/dev/vport0p4";

/// Bytes of one connection and direction that may be sent before the receiver has written
/// them out.
pub const WINDOW: usize = 1 << 20;

/// How long [`RigPorts::listen`] waits for the host to answer a change of the port set.
pub const PORTS_ACK_WAIT: Duration = Duration::from_secs(10);

const HEADER: usize = 9;
const MAX_PAYLOAD: usize = 64 << 10;

/// Errors of the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A server already answers on the socket.
    #[error("{} is in use by a running server", .0.display())]
    InUse(PathBuf),
    /// Setting up a listener or the port failed.
    #[error("{what} {}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// Its path or address.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BridgeError {
    let path = path.to_path_buf();
    move |source| BridgeError::Io { what, path, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello = 1,
    Open = 2,
    Data = 3,
    Eof = 4,
    Close = 5,
    Credit = 6,
    Stop = 7,
    Ports = 8,
    PortsAck = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Open,
            3 => Kind::Data,
            4 => Kind::Eof,
            5 => Kind::Close,
            6 => Kind::Credit,
            7 => Kind::Stop,
            8 => Kind::Ports,
            9 => Kind::PortsAck,
            _ => return None,
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Frame {
    kind: Kind,
    id: u32,
    payload: Vec<u8>,
}

fn encode(kind: Kind, id: u32, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let len = u32::try_from(payload.len()).expect("payloads are at most 64 KiB");
    let mut f = Vec::with_capacity(HEADER + payload.len());
    f.push(kind as u8);
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// The next frame; `None` at a clean end of the stream (between frames).
fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut head = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let kind = Kind::from_u8(head[0]).ok_or_else(|| bad(format!("frame kind {}", head[0])))?;
    let id = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes"));
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD {
        return Err(bad(format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(Frame { kind, id, payload }))
}

/// The ports of a `Ports` payload (an odd last byte is ignored).
fn ports_of(payload: &[u8]) -> Vec<u16> {
    payload
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// The ports and errnos of a `PortsAck` payload (a partial last entry is ignored).
fn failures_of(payload: &[u8]) -> HashMap<u16, i32> {
    payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_le_bytes([c[0], c[1]]),
                i32::from_le_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect()
}

/// One end of a bridged connection on this side.
#[derive(Debug)]
enum Local {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Local {
    fn try_clone(&self) -> io::Result<Local> {
        Ok(match self {
            Local::Unix(s) => Local::Unix(s.try_clone()?),
            Local::Tcp(s) => Local::Tcp(s.try_clone()?),
        })
    }

    /// Also wakes a thread blocked reading the socket (`SHUT_RD`).
    fn shutdown(&self, how: Shutdown) {
        // ENOTCONN once the peer has gone: nothing left to shut.
        let _ = match self {
            Local::Unix(s) => s.shutdown(how),
            Local::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Read for Local {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Local::Unix(s) => s.read(buf),
            Local::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Local {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Local::Unix(s) => s.write(buf),
            Local::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How many bytes of one connection this side may still send.
#[derive(Debug)]
struct Credit {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl Credit {
    fn new() -> Credit {
        Credit {
            state: Mutex::new((WINDOW, false)),
            cv: Condvar::new(),
        }
    }

    /// Waits for credit; `None` once the connection is closed.
    fn wait(&self) -> Option<usize> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while s.0 == 0 && !s.1 {
            s = self.cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        (!s.1).then_some(s.0)
    }

    fn take(&self, n: usize) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.0 = s.0.saturating_sub(n);
    }

    fn add(&self, n: usize) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.0 = s.0.saturating_add(n);
        self.cv.notify_all();
    }

    fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.1 = true;
        self.cv.notify_all();
    }
}

#[derive(Debug)]
enum Incoming {
    Data(Vec<u8>),
    Eof,
    Close,
}

#[derive(Debug)]
struct Conn {
    tx: mpsc::Sender<Incoming>,
    credit: Arc<Credit>,
    local: Local,
}

/// The connections of one side and its writing half of the port.
struct Mux {
    port: Mutex<Box<dyn Write + Send>>,
    conns: Mutex<HashMap<u32, Conn>>,
    dead: AtomicBool,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("conns", &self.conns.lock().map(|c| c.len()).unwrap_or(0))
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl Mux {
    fn new(port: Box<dyn Write + Send>) -> Arc<Mux> {
        Arc::new(Mux {
            port: Mutex::new(port),
            conns: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        })
    }

    /// Writes one frame whole; false once the port is gone.
    fn send(&self, kind: Kind, id: u32, payload: &[u8]) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        let frame = encode(kind, id, payload);
        let mut port = self.port.lock().unwrap_or_else(PoisonError::into_inner);
        if port.write_all(&frame).and_then(|()| port.flush()).is_err() {
            self.dead.store(true, Ordering::Release);
            return false;
        }
        true
    }

    /// Registers connection `id` (announcing it with `Open` and this payload first when
    /// `announce` is given, so that no frame of it can precede the announcement), then starts
    /// its two threads.
    fn attach(self: &Arc<Self>, id: u32, local: Local, announce: Option<&[u8]>) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let credit = Arc::new(Credit::new());
        let reader = local.try_clone()?;
        let shut = local.try_clone()?;
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Conn {
                    tx,
                    credit: credit.clone(),
                    local: shut,
                },
            );
        if announce.is_some_and(|open| !self.send(Kind::Open, id, open)) {
            self.forget(id);
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the bridge's port is gone",
            ));
        }
        let halves = Arc::new(AtomicU8::new(0));
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f).map(drop)
        };
        {
            let (mux, credit, halves) = (self.clone(), credit.clone(), halves.clone());
            spawn(
                format!("bridge-in-{id}"),
                Box::new(move || mux.pump(id, reader, &credit, &halves)),
            )?;
        }
        let mux = self.clone();
        spawn(
            format!("bridge-out-{id}"),
            Box::new(move || mux.write_out(id, local, &rx, &credit, &halves)),
        )
    }

    fn forget(&self, id: u32) {
        if let Some(c) = self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id)
        {
            c.credit.close();
            c.local.shutdown(Shutdown::Both);
        }
    }

    /// One direction of a connection is over; the second one removes it.
    fn half_done(&self, id: u32, halves: &AtomicU8) {
        if halves.fetch_add(1, Ordering::AcqRel) == 1 {
            self.conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }

    /// Local socket → `Data` frames, as far as the credit goes; its end → `Eof`.
    fn pump(&self, id: u32, mut local: Local, credit: &Credit, halves: &AtomicU8) {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        while let Some(avail) = credit.wait() {
            match local.read(&mut buf[..avail.min(MAX_PAYLOAD)]) {
                Ok(0) => {
                    self.send(Kind::Eof, id, &[]);
                    break;
                }
                Ok(n) => {
                    credit.take(n);
                    if !self.send(Kind::Data, id, &buf[..n]) {
                        local.shutdown(Shutdown::Both);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.send(Kind::Close, id, &[]);
                    local.shutdown(Shutdown::Both);
                    break;
                }
            }
        }
        self.half_done(id, halves);
    }

    /// Frames from the far side → the local socket, returning credit for what was written.
    fn write_out(
        &self,
        id: u32,
        mut local: Local,
        rx: &mpsc::Receiver<Incoming>,
        credit: &Credit,
        halves: &AtomicU8,
    ) {
        loop {
            match rx.recv() {
                Ok(Incoming::Data(d)) => {
                    if local.write_all(&d).is_err() {
                        self.send(Kind::Close, id, &[]);
                        credit.close();
                        local.shutdown(Shutdown::Both);
                        break;
                    }
                    let n = u32::try_from(d.len()).expect("payloads are at most 64 KiB");
                    self.send(Kind::Credit, id, &n.to_le_bytes());
                }
                Ok(Incoming::Eof) => {
                    local.shutdown(Shutdown::Write);
                    break;
                }
                Ok(Incoming::Close) | Err(_) => {
                    credit.close();
                    local.shutdown(Shutdown::Both);
                    break;
                }
            }
        }
        self.half_done(id, halves);
    }

    /// A frame about an existing connection; frames of connections already gone are dropped.
    fn dispatch(&self, f: Frame) {
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(c) = conns.get(&f.id) else {
            return;
        };
        match f.kind {
            Kind::Data => {
                let _ = c.tx.send(Incoming::Data(f.payload));
            }
            Kind::Eof => {
                let _ = c.tx.send(Incoming::Eof);
            }
            Kind::Close => {
                c.credit.close();
                let _ = c.tx.send(Incoming::Close);
            }
            Kind::Credit => {
                if let Ok(n) = <[u8; 4]>::try_from(f.payload.as_slice()) {
                    c.credit
                        .add(usize::try_from(u32::from_le_bytes(n)).unwrap_or(0));
                }
            }
            Kind::Hello | Kind::Open | Kind::Stop | Kind::Ports | Kind::PortsAck => {}
        }
    }

    /// The port is gone: end every connection.
    fn close_all(&self) {
        self.dead.store(true, Ordering::Release);
        let conns: Vec<Conn> = self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in conns {
            c.credit.close();
            c.local.shutdown(Shutdown::Both);
        }
    }
}

/// A host listener whose connections the bridge carries into the rig.
#[derive(Debug)]
pub enum HostListener {
    /// A unix socket; its file is removed when the run ends.
    Unix {
        /// The listener.
        listener: UnixListener,
        /// Its path.
        path: PathBuf,
    },
    /// A TCP listener.
    Tcp(TcpListener),
}

impl HostListener {
    /// Binds `path`, replacing a stale socket file but refusing one a server answers on, and
    /// creating its directory.
    pub fn unix(path: &Path) -> Result<HostListener, BridgeError> {
        if UnixStream::connect(path).is_ok() {
            return Err(BridgeError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        }
        let listener = UnixListener::bind(path).map_err(io_err("listening on", path))?;
        Ok(HostListener::Unix {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Binds a TCP address such as `127.0.0.1:7070`.
    pub fn tcp(addr: &str) -> Result<HostListener, BridgeError> {
        TcpListener::bind(addr)
            .map(HostListener::Tcp)
            .map_err(io_err("listening on", Path::new(addr)))
    }

    fn fd(&self) -> RawFd {
        match self {
            HostListener::Unix { listener, .. } => listener.as_raw_fd(),
            HostListener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Local> {
        Ok(match self {
            HostListener::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(false)?;
                Local::Unix(s)
            }
            HostListener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Local::Tcp(s)
            }
        })
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            HostListener::Unix { listener, .. } => listener.set_nonblocking(true),
            HostListener::Tcp(l) => l.set_nonblocking(true),
        }
    }
}

type ReadyHook = Box<dyn FnOnce() + Send>;
/// A `Ports` frame: its sequence number and the ports.
type PortSet = (u32, Vec<u16>);

#[derive(Default)]
struct HostShared {
    listeners: Mutex<Vec<HostListener>>,
    unix_paths: Mutex<Vec<PathBuf>>,
    mux: Mutex<Option<Arc<Mux>>>,
    on_ready: Mutex<Option<ReadyHook>>,
    ready: AtomicBool,
    stop_asked: AtomicBool,
    abort: AtomicBool,
    finished: AtomicBool,
    next_id: AtomicU32,
    /// To the thread that keeps the mirrored TCP ports' listeners: each `Ports` frame.
    ports: Mutex<Option<mpsc::Sender<PortSet>>>,
}

/// The host side of a bridge, given to [`crate::RigCommand::bridge`]: while the command runs,
/// connections to its listeners reach the unix socket that the command serves in the rig
/// through [`serve_in_rig`].
#[derive(Clone, Default)]
pub struct HostBridge {
    shared: Arc<HostShared>,
}

impl std::fmt::Debug for HostBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBridge")
            .field("ready", &self.shared.ready)
            .field("stop_asked", &self.shared.stop_asked)
            .field("abort", &self.shared.abort)
            .finish_non_exhaustive()
    }
}

impl HostBridge {
    /// A bridge for these listeners (bound already, so that a clash fails before the rig boots).
    pub fn new(listeners: Vec<HostListener>) -> HostBridge {
        let paths = listeners
            .iter()
            .filter_map(|l| match l {
                HostListener::Unix { path, .. } => Some(path.clone()),
                HostListener::Tcp(_) => None,
            })
            .collect();
        let b = HostBridge::default();
        *b.shared
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = listeners;
        *b.shared
            .unix_paths
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = paths;
        b
    }

    /// Calls `f` once, when the rig side says it serves.
    pub fn on_ready(&self, f: impl FnOnce() + Send + 'static) {
        *self
            .shared
            .on_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(f));
    }

    /// Whether the rig side has said it serves.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Asks the served process in the rig to stop (it gets [`serve_in_rig`]'s `on_stop`), so
    /// the run ends when it exits. Before the rig side serves, or on a second call, the run is
    /// aborted instead: the rig is killed at once.
    pub fn stop(&self) {
        let s = &self.shared;
        let mux = s.mux.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let first = !s.stop_asked.swap(true, Ordering::AcqRel);
        let sent = first && self.is_ready() && mux.is_some_and(|m| m.send(Kind::Stop, 0, &[]));
        if !sent {
            s.abort.store(true, Ordering::Release);
        }
    }

    /// The run should end now, without waiting for the command.
    pub(crate) fn aborted(&self) -> bool {
        self.shared.abort.load(Ordering::Acquire)
    }

    /// Starts serving the host end of the bridge's port.
    pub(crate) fn start(&self, port: UnixStream) -> io::Result<()> {
        let mux = Mux::new(Box::new(port.try_clone()?));
        *self
            .shared
            .mux
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(mux.clone());
        let (tx, rx) = mpsc::channel();
        *self
            .shared
            .ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
        {
            let (bridge, mux) = (self.clone(), mux.clone());
            std::thread::Builder::new()
                .name("bridge-ports".into())
                .spawn(move || bridge.mirror_ports(&rx, &mux))?;
        }
        let bridge = self.clone();
        std::thread::Builder::new()
            .name("bridge-port".into())
            .spawn(move || bridge.read_port(port, &mux))
            .map(drop)
    }

    fn read_port(&self, port: UnixStream, mux: &Arc<Mux>) {
        let mut r = BufReader::with_capacity(MAX_PAYLOAD + HEADER, port);
        while let Ok(Some(f)) = read_frame(&mut r) {
            match f.kind {
                Kind::Hello => self.serve(mux),
                Kind::Ports => {
                    let ports = ports_of(&f.payload);
                    if let Some(tx) = &*self
                        .shared
                        .ports
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                    {
                        let _ = tx.send((f.id, ports));
                    }
                }
                Kind::Open | Kind::Stop | Kind::PortsAck => {}
                _ => mux.dispatch(f),
            }
        }
        mux.close_all();
        self.shared
            .ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Keeps one host listener on `127.0.0.1:<port>` for each port of the latest `Ports`
    /// frame and answers each frame with the ports that could not be bound. A port that
    /// failed is tried again at every later frame.
    fn mirror_ports(&self, rx: &mpsc::Receiver<PortSet>, mux: &Arc<Mux>) {
        struct Mirrored {
            stop: Arc<AtomicBool>,
            thread: std::thread::JoinHandle<()>,
        }
        let mut live: HashMap<u16, Mirrored> = HashMap::new();
        let mut failed: HashMap<u16, i32> = HashMap::new();
        while let Ok((seq, ports)) = rx.recv() {
            let want: BTreeSet<u16> = ports.into_iter().collect();
            let gone: Vec<u16> = live.keys().filter(|p| !want.contains(p)).copied().collect();
            for port in gone {
                if let Some(m) = live.remove(&port) {
                    m.stop.store(true, Ordering::Release);
                    // Within one poll interval; the port is free again for a later frame.
                    let _ = m.thread.join();
                }
            }
            failed.retain(|p, _| want.contains(p));
            let mut ack = Vec::new();
            let new: Vec<u16> = want
                .iter()
                .filter(|p| !live.contains_key(p))
                .copied()
                .collect();
            for port in new {
                let bound = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).and_then(|l| {
                    let stop = Arc::new(AtomicBool::new(false));
                    let (bridge, mux, halt) = (self.clone(), mux.clone(), stop.clone());
                    let l = HostListener::Tcp(l);
                    let thread = std::thread::Builder::new()
                        .name(format!("bridge-tcp-{port}"))
                        .spawn(move || {
                            bridge.accept_loop(&l, &mux, &port.to_le_bytes(), Some(&halt));
                        })?;
                    Ok(Mirrored { stop, thread })
                });
                match bound {
                    Ok(m) => {
                        if failed.remove(&port).is_some() {
                            tracing::info!(port, "host port 127.0.0.1:{port} is listening now");
                        }
                        live.insert(port, m);
                    }
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        if failed.insert(port, errno) != Some(errno) {
                            tracing::error!(
                                port,
                                "cannot listen on the host's 127.0.0.1:{port} for the port the \
                                 rig's 127.0.0.1:{port} serves, so it does not answer on this \
                                 host: {e}"
                            );
                        }
                        ack.extend_from_slice(&port.to_le_bytes());
                        ack.extend_from_slice(&errno.to_le_bytes());
                    }
                }
            }
            mux.send(Kind::PortsAck, seq, &ack);
        }
        for m in live.into_values() {
            m.stop.store(true, Ordering::Release);
            let _ = m.thread.join();
        }
    }

    /// The rig side serves: accept on every listener.
    fn serve(&self, mux: &Arc<Mux>) {
        let s = &self.shared;
        if s.ready.swap(true, Ordering::AcqRel) {
            return;
        }
        let listeners =
            std::mem::take(&mut *s.listeners.lock().unwrap_or_else(PoisonError::into_inner));
        for l in listeners {
            let (bridge, mux) = (self.clone(), mux.clone());
            let spawned = std::thread::Builder::new()
                .name("bridge-accept".into())
                .spawn(move || bridge.accept_loop(&l, &mux, &[], None));
            if spawned.is_err() {
                s.abort.store(true, Ordering::Release);
            }
        }
        if let Some(f) = s
            .on_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            f();
        }
    }

    /// Accepts on `l` until the run ends (or `stop`), announcing each connection with `open`.
    fn accept_loop(
        &self,
        l: &HostListener,
        mux: &Arc<Mux>,
        open: &[u8],
        stop: Option<&AtomicBool>,
    ) {
        if l.set_nonblocking().is_err() {
            self.shared.abort.store(true, Ordering::Release);
            return;
        }
        while !self.shared.finished.load(Ordering::Acquire)
            && !mux.dead.load(Ordering::Acquire)
            && !stop.is_some_and(|s| s.load(Ordering::Acquire))
        {
            let mut pfd = libc::pollfd {
                fd: l.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack; the listener outlives the call.
            unsafe { libc::poll(&raw mut pfd, 1, 200) };
            match l.accept() {
                Ok(local) => {
                    let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                    // A failed attach has dropped (closed) the client's socket: it sees EOF.
                    let _ = mux.attach(id, local, Some(open));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Out of descriptors or similar: the pending client stays queued; retry later.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The run is over: stop accepting, end every connection, remove the unix sockets.
    pub(crate) fn finish(&self) {
        let s = &self.shared;
        s.finished.store(true, Ordering::Release);
        if let Some(m) = s.mux.lock().unwrap_or_else(PoisonError::into_inner).take() {
            m.close_all();
        }
        s.ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        s.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        for p in s
            .unix_paths
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The rig side of a bridge: call it in the process that serves `target` inside the rig (it
/// blocks, so from a thread of its own), once `target` accepts connections. It says so to the
/// host, connects every bridged connection to `target` (or, for a mirrored port of `ports`,
/// to that port of the rig's loopback), keeps the host's listeners in step with `ports`, and
/// calls `on_stop` when the host asks the process to stop. Returns when the host end goes
/// away.
pub fn serve_in_rig(
    port: &Path,
    target: &Path,
    ports: &RigPorts,
    on_stop: impl FnOnce() + Send + 'static,
) -> Result<(), BridgeError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)
        .map_err(io_err("opening the bridge port", port))?;
    let writer = file.try_clone().map_err(io_err("duplicating", port))?;
    serve_port(file, Box::new(writer), target, ports, on_stop)
        .map_err(io_err("serving the bridge port", port))
}

/// [`serve_in_rig`] on an open port (a socketpair in the tests).
fn serve_port(
    port: impl Read,
    writer: Box<dyn Write + Send>,
    target: &Path,
    ports: &RigPorts,
    on_stop: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    let mux = Mux::new(writer);
    if !mux.send(Kind::Hello, 0, &[]) {
        return Err(io::ErrorKind::BrokenPipe.into());
    }
    ports.connected(&mux);
    let mut on_stop = Some(on_stop);
    let mut r = BufReader::with_capacity(MAX_PAYLOAD + HEADER, port);
    let result = loop {
        match read_frame(&mut r) {
            Ok(Some(f)) => match f.kind {
                Kind::Open => {
                    let attached = match <[u8; 2]>::try_from(f.payload.as_slice()) {
                        Ok(p) => TcpStream::connect((ports.connect_to, u16::from_le_bytes(p)))
                            .and_then(|s| {
                                s.set_nodelay(true)?;
                                mux.attach(f.id, Local::Tcp(s), None)
                            }),
                        Err(_) if f.payload.is_empty() => UnixStream::connect(target)
                            .and_then(|s| mux.attach(f.id, Local::Unix(s), None)),
                        Err(_) => Err(io::ErrorKind::InvalidData.into()),
                    };
                    if attached.is_err() {
                        mux.send(Kind::Close, f.id, &[]);
                    }
                }
                Kind::PortsAck => ports.acked(f.id, &f.payload),
                Kind::Stop => {
                    if let Some(stop) = on_stop.take() {
                        stop();
                    }
                }
                Kind::Hello | Kind::Ports => {}
                _ => mux.dispatch(f),
            },
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    ports.disconnected();
    mux.close_all();
    result
}

/// The TCP ports of the rig's loopback that the host's loopback mirrors (see the module
/// docs): the served process adds each port as it starts listening and removes it when it
/// stops; [`serve_in_rig`] keeps the host's listeners in step.
#[derive(Debug)]
pub struct RigPorts {
    state: Mutex<PortsState>,
    cv: Condvar,
    /// Where the mirrored ports are connected to: the loopback (another loopback address in
    /// the tests, whose host and rig side share one machine).
    connect_to: Ipv4Addr,
}

impl Default for RigPorts {
    fn default() -> RigPorts {
        RigPorts {
            state: Mutex::default(),
            cv: Condvar::new(),
            connect_to: Ipv4Addr::LOCALHOST,
        }
    }
}

#[derive(Debug, Default)]
struct PortsState {
    set: BTreeSet<u16>,
    /// The sequence number of the last `Ports` frame sent.
    seq: u32,
    /// The sets sent and not yet answered, by sequence number.
    sent: Vec<(u32, BTreeSet<u16>)>,
    /// The set of the last answered frame, and its ports the host could not bind (errno).
    acked: Option<(u32, BTreeSet<u16>)>,
    failed: HashMap<u16, i32>,
    mux: Option<Arc<Mux>>,
}

impl RigPorts {
    /// An empty set, not connected to a host yet.
    pub fn new() -> Arc<RigPorts> {
        Arc::new(RigPorts::default())
    }

    /// Adds `port`. While the host end is connected, returns once the host has answered (it
    /// listens on the port, or [`RigPorts::host_error`] says why not), or after
    /// [`PORTS_ACK_WAIT`]; before that, the host gets the port when it connects.
    pub fn listen(&self, port: u16) {
        let mut s = self.lock();
        s.set.insert(port);
        if let Some(seq) = Self::publish(&mut s) {
            let _unanswered = self
                .cv
                .wait_timeout_while(s, PORTS_ACK_WAIT, |s| {
                    s.mux.is_some() && s.acked.as_ref().is_none_or(|(a, _)| *a < seq)
                })
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Removes `port`: the host drops its listener.
    pub fn unlisten(&self, port: u16) {
        let mut s = self.lock();
        if s.set.remove(&port) {
            Self::publish(&mut s);
        }
    }

    /// Why `port`, which the served process listens on, does not answer on the host's
    /// loopback; `None` when it does (or when it is not a port of the set).
    pub fn host_error(&self, port: u16) -> Option<String> {
        let s = self.lock();
        if !s.set.contains(&port) {
            return None;
        }
        if let Some(&errno) = s.failed.get(&port) {
            let e = io::Error::from_raw_os_error(errno);
            return Some(format!("the host cannot listen on 127.0.0.1:{port}: {e}"));
        }
        if s.mux.is_none() {
            return Some("the bridge to the host is not connected".into());
        }
        match &s.acked {
            Some((_, set)) if set.contains(&port) => None,
            _ => Some(format!(
                "the host has not confirmed a listener on 127.0.0.1:{port} yet"
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PortsState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends the whole set (under the lock, so frames go out in sequence order); its sequence
    /// number, if the host end is connected.
    fn publish(s: &mut PortsState) -> Option<u32> {
        let mux = s.mux.clone()?;
        s.seq += 1;
        // One frame holds 32768 ports: more than one process can have listeners threads for.
        let payload: Vec<u8> = s
            .set
            .iter()
            .take(MAX_PAYLOAD / 2)
            .flat_map(|p| p.to_le_bytes())
            .collect();
        s.sent.push((s.seq, s.set.clone()));
        mux.send(Kind::Ports, s.seq, &payload).then_some(s.seq)
    }

    fn connected(&self, mux: &Arc<Mux>) {
        let mut s = self.lock();
        s.mux = Some(mux.clone());
        Self::publish(&mut s);
    }

    fn acked(&self, seq: u32, payload: &[u8]) {
        let mut s = self.lock();
        let Some(i) = s.sent.iter().position(|(n, _)| *n == seq) else {
            return;
        };
        let (_, set) = s.sent.drain(..=i).next_back().expect("position found it");
        s.failed = failures_of(payload);
        s.acked = Some((seq, set));
        self.cv.notify_all();
    }

    fn disconnected(&self) {
        let mut s = self.lock();
        s.mux = None;
        s.sent.clear();
        s.acked = None;
        self.cv.notify_all();
    }
}

/// Brings the loopback interface up (the rig's init leaves it down), so that listeners on
/// `127.0.0.1` inside the rig work. Needs `CAP_NET_ADMIN` unless it is up already.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket(2); its descriptor is owned by `sock` right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = libc::c_char::try_from(*s).expect("ASCII");
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into the ifreq we own, named "lo".
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP).expect("IFF_UP fits a short");
    if flags & up != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Entry points for fuzzers and property tests.
#[doc(hidden)]
pub mod fuzzing {
    use super::{Kind, RigPorts, encode, failures_of, ports_of, read_frame};

    /// Reads `data` as the bridge's byte stream, frame by frame, as either side does: each
    /// frame read must encode back to the bytes it came from, and its payload is parsed as
    /// its kind says (a `PortsAck` is applied to a port set). Stops at the first error.
    pub fn mux_stream(data: &[u8]) {
        let ports = RigPorts::default();
        let mut rest = data;
        loop {
            let before = rest;
            match read_frame(&mut rest) {
                Ok(Some(f)) => {
                    let used = before.len() - rest.len();
                    assert_eq!(encode(f.kind, f.id, &f.payload), before[..used]);
                    match f.kind {
                        Kind::Ports => assert_eq!(ports_of(&f.payload).len(), f.payload.len() / 2),
                        Kind::PortsAck => {
                            assert!(failures_of(&f.payload).len() <= f.payload.len() / 6);
                            ports.acked(f.id, &f.payload);
                        }
                        _ => {}
                    }
                }
                Ok(None) => {
                    assert!(rest.is_empty());
                    break;
                }
                Err(_) => break,
            }
        }
        for p in [0, 1, u16::MAX] {
            assert!(ports.host_error(p).is_none(), "not a port of the set");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;

    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut bytes = encode(Kind::Data, 7, b"hello");
        bytes.extend(encode(Kind::Eof, 7, &[]));
        let mut r = &bytes[..];
        let f = read_frame(&mut r).expect("frame").expect("some");
        assert_eq!(
            f,
            Frame {
                kind: Kind::Data,
                id: 7,
                payload: b"hello".to_vec()
            }
        );
        assert_eq!(
            read_frame(&mut r).expect("frame").expect("some").kind,
            Kind::Eof
        );
        assert!(read_frame(&mut r).expect("clean end").is_none());

        let mut huge = encode(Kind::Data, 1, &[]);
        huge[5..9].copy_from_slice(&u32::try_from(MAX_PAYLOAD + 1).unwrap().to_le_bytes());
        assert!(read_frame(&mut &huge[..]).is_err());
        assert!(read_frame(&mut &[0u8, 0, 0, 0, 0, 0, 0, 0, 0][..]).is_err());
        assert!(read_frame(&mut &[10u8, 0, 0, 0, 0, 0, 0, 0, 0][..]).is_err());
        assert!(read_frame(&mut &encode(Kind::Data, 1, b"xy")[..5]).is_err());
    }

    /// A host bridge and a rig side joined by a socketpair in place of QEMU's port, serving a
    /// unix socket in a temporary directory.
    struct Joined {
        host: HostBridge,
        dir: tempfile::TempDir,
        stopped: mpsc::Receiver<()>,
    }

    fn joined(serve: impl Fn(UnixStream) + Send + Clone + 'static) -> Joined {
        joined_with_ports(serve, Arc::new(RigPorts::default()))
    }

    fn joined_with_ports(
        serve: impl Fn(UnixStream) + Send + Clone + 'static,
        ports: Arc<RigPorts>,
    ) -> Joined {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("server.sock");
        let server = UnixListener::bind(&target).expect("bind server");
        std::thread::spawn(move || {
            for s in server.incoming() {
                let serve = serve.clone();
                let s = s.expect("accept");
                std::thread::spawn(move || serve(s));
            }
        });
        let host = HostBridge::new(vec![
            HostListener::unix(&dir.path().join("host.sock")).expect("host listener"),
        ]);
        let (ready_tx, ready_rx) = mpsc::channel();
        host.on_ready(move || ready_tx.send(()).expect("ready"));
        let (host_end, rig_end) = UnixStream::pair().expect("pair");
        host.start(host_end).expect("start");
        // The rig side of QEMU's port is a character device; here it is the pair's other end.
        let (stop_tx, stopped) = mpsc::channel();
        std::thread::spawn(move || {
            let writer = Box::new(rig_end.try_clone().expect("clone"));
            serve_port(rig_end, writer, &target, &ports, move || {
                stop_tx.send(()).expect("stop")
            })
        });
        ready_rx.recv().expect("the rig side said hello");
        Joined { host, dir, stopped }
    }

    #[test]
    fn a_streamed_answer_arrives_line_by_line_while_a_second_connection_feeds_it() {
        // The server: connection "out" gets one line per line that connection "in" sends,
        // immediately; "in" ends with EOF, which ends "out" too.
        // None: the end of "in" (the server's accept thread keeps a sender alive).
        let (lines_tx, lines_rx) = mpsc::channel::<Option<String>>();
        let lines_rx = Arc::new(Mutex::new(Some(lines_rx)));
        let j = joined(move |s| {
            let mut r = io::BufReader::new(s.try_clone().expect("clone"));
            let mut first = String::new();
            r.read_line(&mut first).expect("first line");
            if first == "out\n" {
                let rx = lines_rx.lock().unwrap().take().expect("one out");
                let mut w = s;
                while let Ok(Some(l)) = rx.recv() {
                    w.write_all(format!("got:{l}").as_bytes()).expect("write");
                }
                w.write_all(b"eof\n").expect("write");
            } else {
                for l in r.lines() {
                    let l = l.expect("line");
                    lines_tx.send(Some(format!("{l}\n"))).expect("send");
                }
                lines_tx.send(None).expect("send");
            }
        });
        let sock = j.dir.path().join("host.sock");
        let mut out = UnixStream::connect(&sock).expect("connect out");
        out.write_all(b"out\n").unwrap();
        let mut input = UnixStream::connect(&sock).expect("connect in");
        input.write_all(b"in\none\n").unwrap();
        let mut answers = io::BufReader::new(out.try_clone().unwrap());
        let mut line = String::new();
        answers.read_line(&mut line).unwrap();
        // Answered while "in" is still open: nothing waited for the end.
        assert_eq!(line, "got:one\n");
        input.write_all(b"two\n").unwrap();
        input.shutdown(Shutdown::Write).unwrap();
        let mut rest = String::new();
        answers.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "got:two\neof\n");
        assert!(j.stopped.try_recv().is_err(), "nobody asked to stop");
    }

    #[test]
    fn bulk_data_beyond_the_window_passes_both_ways_intact() {
        // An echo server; the client writes 8 MiB while reading the echo on another thread.
        let j = joined(|s| {
            let mut r = s.try_clone().expect("clone");
            let mut w = s;
            io::copy(&mut r, &mut w).expect("echo");
            w.shutdown(Shutdown::Write).ok();
        });
        let s = UnixStream::connect(j.dir.path().join("host.sock")).expect("connect");
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut w = s.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || {
                w.write_all(&data).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            })
        };
        let mut back = Vec::new();
        (&s).read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the echo differs");
    }

    #[test]
    fn stop_reaches_the_rig_side_and_finish_removes_the_socket() {
        let j = joined(|_| {});
        j.host.stop();
        j.stopped.recv().expect("on_stop ran");
        assert!(
            !j.host.aborted(),
            "a first stop of a serving bridge is a request"
        );
        j.host.stop();
        assert!(j.host.aborted(), "a second stop aborts");
        let sock = j.dir.path().join("host.sock");
        assert!(sock.exists());
        j.host.finish();
        assert!(!sock.exists());
    }

    #[test]
    fn a_connection_the_rig_side_cannot_connect_is_closed() {
        let j = joined(|_| {});
        std::fs::remove_file(j.dir.path().join("server.sock")).unwrap();
        let mut s = UnixStream::connect(j.dir.path().join("host.sock")).expect("connect");
        let mut buf = Vec::new();
        assert_eq!(s.read_to_end(&mut buf).expect("EOF, not a hang"), 0);
    }

    #[test]
    fn a_unix_listener_refuses_a_path_a_server_answers_on() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let _live = UnixListener::bind(&p).unwrap();
        assert!(matches!(HostListener::unix(&p), Err(BridgeError::InUse(_))));
        drop(_live);
        HostListener::unix(&p).expect("a stale socket file is replaced");
    }

    /// The "rig's" loopback in these tests: 127.0.0.2, so that the host side can bind the same
    /// port number on 127.0.0.1 in the same machine. A server there that answers what it read
    /// until EOF upper-cased, then closes. Its port is one that is free on 127.0.0.1 too.
    fn rig_service() -> u16 {
        loop {
            let l = TcpListener::bind(("127.0.0.2", 0)).expect("bind 127.0.0.2");
            let port = l.local_addr().unwrap().port();
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let mut s = s.expect("accept");
                    std::thread::spawn(move || {
                        let mut got = Vec::new();
                        s.read_to_end(&mut got).expect("read to EOF");
                        s.write_all(&got.to_ascii_uppercase()).expect("answer");
                    });
                }
            });
            return port;
        }
    }

    fn test_ports() -> Arc<RigPorts> {
        Arc::new(RigPorts {
            connect_to: Ipv4Addr::new(127, 0, 0, 2),
            ..RigPorts::default()
        })
    }

    /// Asks the host's 127.0.0.1:`port`: writes, half-closes, reads to the end.
    fn ask(port: u16, what: &[u8]) -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(what)?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    }

    /// Hang guard, not a performance bound.
    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{what}: not within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_mirrored_port_answers_on_the_host_across_a_half_close_and_goes_with_unlisten() {
        let ports = test_ports();
        let _j = joined_with_ports(|_| {}, ports.clone());
        let port = rig_service();
        // Returns once the host has answered, so the port answers right away.
        ports.listen(port);
        assert_eq!(ports.host_error(port), None);
        assert_eq!(ask(port, b"hello").expect("ask"), b"HELLO");
        assert_eq!(ask(port, b"again").expect("ask"), b"AGAIN");
        ports.unlisten(port);
        until("the host listener closes", || {
            TcpStream::connect(("127.0.0.1", port)).is_err()
        });
    }

    #[test]
    fn ports_listened_on_before_the_host_connects_are_mirrored_when_it_does() {
        let ports = test_ports();
        let port = rig_service();
        ports.listen(port);
        assert!(
            ports
                .host_error(port)
                .is_some_and(|e| e.contains("not connected")),
            "{:?}",
            ports.host_error(port)
        );
        let _j = joined_with_ports(|_| {}, ports.clone());
        until("the host confirms the port", || {
            ports.host_error(port).is_none()
        });
        assert_eq!(ask(port, b"late").expect("ask"), b"LATE");
    }

    #[test]
    fn a_port_taken_on_the_host_is_reported_and_taken_up_once_free() {
        let ports = test_ports();
        let _j = joined_with_ports(|_| {}, ports.clone());
        let port = rig_service();
        let squatter = TcpListener::bind(("127.0.0.1", port)).expect("squat the host port");
        ports.listen(port);
        let e = ports.host_error(port).expect("the clash is reported");
        assert!(
            e.contains(&format!("127.0.0.1:{port}")) && e.contains("in use"),
            "{e}"
        );
        drop(squatter);
        // The next change of the set tries it again.
        let other = rig_service();
        ports.listen(other);
        assert_eq!(ports.host_error(port), None);
        assert_eq!(ask(port, b"now").expect("ask"), b"NOW");
        assert_eq!(ask(other, b"too").expect("ask"), b"TOO");
    }

    #[test]
    fn the_mux_stream_entry_point_takes_valid_and_broken_streams() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&80u16.to_le_bytes());
        ack.extend_from_slice(&98i32.to_le_bytes());
        let mut stream = encode(Kind::Ports, 1, &[80, 0, 81, 0]);
        stream.extend(encode(Kind::PortsAck, 1, &ack));
        stream.extend(encode(Kind::Open, 3, &80u16.to_le_bytes()));
        stream.extend(encode(Kind::Data, 3, b"x"));
        fuzzing::mux_stream(&stream);
        for cut in 0..stream.len() {
            fuzzing::mux_stream(&stream[..cut]);
        }
    }

    proptest::proptest! {
        #[test]
        fn the_mux_stream_entry_point_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            fuzzing::mux_stream(&data);
        }

        #[test]
        fn encoded_frames_read_back(frames in proptest::collection::vec((1u8..=9, proptest::num::u32::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..64)), 0..8)) {
            let mut stream = Vec::new();
            for (k, id, p) in &frames {
                stream.extend(encode(Kind::from_u8(*k).expect("kind"), *id, p));
            }
            fuzzing::mux_stream(&stream);
            let mut r = &stream[..];
            for (k, id, p) in &frames {
                let f = read_frame(&mut r).expect("frame").expect("some");
                proptest::prop_assert_eq!((f.kind as u8, f.id, &f.payload), (*k, *id, p));
            }
        }
    }
}
