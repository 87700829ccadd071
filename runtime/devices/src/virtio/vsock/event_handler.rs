//! The vsock worker: the three queues, the host listener and every connection in one epoll loop.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::HOST_CID;
use super::connection::{Conn, State};
use super::device::VsockConfig;
use super::packet::*;
use crate::virtio::chain::{ChainError, ChainReader, ChainWriter, complete, pop_chain};
use crate::virtio::inspect::VsockInspect;
use crate::virtio::worker::{EventHandler, epoll_add, epoll_modify, epoll_remove};
use crate::virtio::{ActivateContext, ActivateError, IrqTrigger};

const RX: usize = 0;
const TX: usize = 1;
const EVQ: usize = 2;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EVQ_TOKEN: u64 = 2;
const LISTENER_TOKEN: u64 = 3;
const TIMER_TOKEN: u64 = 4;
const FIRST_STREAM_TOKEN: u64 = 16;

/// Connections at most; more are refused with RST (host side: closed).
const MAX_CONNS: usize = 1024;
/// Control packets waiting for rx buffers at most; past that the oldest connections' packets
/// would pile up without bound if the guest never posts buffers.
const MAX_BACKLOG: usize = 4096;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// How long a host-initiated connection waits for the guest's RESPONSE, and a closing one for
/// the guest's RST, before the device gives up on it. Firecracker uses 2 s; that is too short
/// for a guest just restored from a snapshot under load (every page it touches faults in from
/// the memory file): each retry then times out too and the guest drowns in half-open
/// connections, so a restored build VM in the rig never answered.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Period of the timeout scan while a connection is waiting.
const TIMER_PERIOD: Duration = Duration::from_millis(500);
/// First local port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

type Key = (u32, u32); // (local/host port, peer/guest port)

#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct VsockHandler {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    evts: Vec<EventFd>,
    irq: IrqTrigger,
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    pending: HashMap<u64, PendingHost>,
    backlog: VecDeque<Packet>,
    next_token: u64,
    next_local_port: u32,
    reset_event_pending: bool,
    timer: HandshakeTimer,
    failed: bool,
}

/// The periodic timer that runs while some connection waits in its handshake, on a
/// non-blocking timerfd.
///
/// Non-blocking because epoll can report the timer readable and the handler can then disarm
/// it before that event is handled: `timerfd_settime` resets the expiration count, so the
/// read of the stale event would wait for an expiration that never comes. A blocking read
/// there stopped the device's worker for good, holding the handler's lock: the guest's vsock
/// went silent and the VMM's own inspect, pause and snapshot of the device blocked behind it
/// (docs/benchmarks.md, issue 7).
#[derive(Debug)]
struct HandshakeTimer {
    fd: TimerFd,
    armed: bool,
}

impl HandshakeTimer {
    fn new() -> io::Result<Self> {
        let fd = TimerFd::new().map_err(io::Error::from)?;
        // SAFETY: fcntl on an fd this struct owns; F_GETFL only reads its status flags.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; F_SETFL only sets its status flags.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(HandshakeTimer { fd, armed: false })
    }

    /// Runs the timer every `period` while `waiting`, else stops it.
    fn set(&mut self, waiting: bool, period: Duration) {
        if waiting != self.armed {
            let r = if waiting {
                self.fd.reset(period, Some(period))
            } else {
                self.fd.clear()
            };
            match r {
                Ok(()) => self.armed = waiting,
                Err(e) => tracing::error!("virtio-vsock: timer: {e}"),
            }
        }
    }

    /// Takes the expirations so far (none is fine: the event may be stale); never blocks.
    fn drain(&mut self) {
        let _ = self.fd.wait();
    }
}

impl VsockHandler {
    pub(super) fn new(
        ctx: ActivateContext,
        config: VsockConfig,
        listener: Arc<UnixListener>,
        reset_event_pending: bool,
    ) -> Result<Self, ActivateError> {
        if ctx.queues.len() != 3 || ctx.queue_evts.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: ctx.queues.len(),
            });
        }
        Ok(VsockHandler {
            mem: ctx.mem,
            queues: ctx.queues,
            evts: ctx.queue_evts,
            irq: ctx.irq,
            guest_cid: config.guest_cid,
            uds_path: config.uds_path,
            listener,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            backlog: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            reset_event_pending,
            timer: HandshakeTimer::new().map_err(ActivateError::Worker)?,
            failed: false,
        })
    }

    /// The connection table, for the VMM's `inspect` request.
    pub(super) fn inspect(&self) -> VsockInspect {
        let mut conns: Vec<_> = self.conns.iter().map(|(k, c)| c.inspect(k.1)).collect();
        conns.sort_by_key(|c| (c.local_port, c.peer_port));
        VsockInspect {
            backlog: self.backlog.len(),
            pending_host: self.pending.len(),
            failed: self.failed,
            conns,
        }
    }

    fn fail(&mut self, e: &ChainError) {
        self.failed = true;
        self.irq.fail_device(&format_args!("virtio-vsock: {e}"));
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn reply(&self, hdr: &Header, op: u16, flags: u32) -> Packet {
        Packet {
            hdr: Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                len: 0,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 0,
                fwd_cnt: 0,
            },
            data: Vec::new(),
        }
    }

    fn to_guest(&self, key: Key, op: u16, flags: u32) -> Packet {
        Packet {
            hdr: Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.0,
                dst_port: key.1,
                len: 0,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 0,
                fwd_cnt: 0,
            },
            data: Vec::new(),
        }
    }

    fn push_backlog(&mut self, p: Packet) {
        if self.backlog.len() >= MAX_BACKLOG {
            tracing::warn!(
                "virtio-vsock: control backlog full (guest posts no rx buffers); dropping"
            );
            return;
        }
        self.backlog.push_back(p);
    }

    fn remove_conn(&mut self, epoll: &Epoll, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            if !c.hup {
                epoll_remove(epoll, c.stream.as_raw_fd());
            }
            self.tokens.remove(&c.token);
        }
    }

    // ---- guest -> host -------------------------------------------------------------------

    fn process_tx(&mut self, epoll: &Epoll) -> Result<(), ChainError> {
        let max = (HEADER_LEN as u64) + u64::from(MAX_PAYLOAD);
        while let Some(chain) = pop_chain(&mut self.queues[TX], &self.mem, max)? {
            let mut r = ChainReader::new(&self.mem, &chain.readable);
            let hdr: Header = r.read_obj::<Header>("packet header")?.swap_le();
            if hdr.len > MAX_PAYLOAD || hdr.len as usize > r.remaining() {
                return Err(ChainError::TooShort(
                    "packet payload shorter than its header says",
                ));
            }
            let mut data = vec![0u8; hdr.len as usize];
            r.read_exact(&mut data, "packet payload")?;
            self.guest_packet(epoll, &hdr, &data);
            complete(&mut self.queues[TX], &self.mem, chain.head, 0, &self.irq)?;
        }
        Ok(())
    }

    fn guest_packet(&mut self, epoll: &Epoll, hdr: &Header, data: &[u8]) {
        let (src_cid, dst_cid) = (hdr.src_cid, hdr.dst_cid);
        if src_cid != self.guest_cid || dst_cid != HOST_CID {
            tracing::debug!("virtio-vsock: dropping packet {src_cid}->{dst_cid}");
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                let p = self.reply(hdr, OP_RST, 0);
                self.push_backlog(p);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(epoll, hdr),
                OP_RST => {}
                _ => {
                    let p = self.reply(hdr, OP_RST, 0);
                    self.push_backlog(p);
                }
            }
            return;
        };
        conn.update_peer_credit(hdr);
        match (hdr.op, conn.state) {
            (OP_RESPONSE, State::Connecting) => {
                conn.set_state(State::Established);
                let ok = format!("OK {}\n", conn.local_port);
                conn.push_ctrl(ok.as_bytes());
                if conn.flush_to_host().is_err() {
                    self.reset_conn(epoll, key);
                }
            }
            (OP_RW, State::Established | State::Closing) => {
                if conn.peer_shut_send || conn.push_payload(data).is_err() {
                    tracing::debug!(
                        "virtio-vsock: guest overran its credit or sent after SHUTDOWN"
                    );
                    self.reset_conn(epoll, key);
                } else if conn.flush_to_host().is_err() {
                    self.reset_conn(epoll, key);
                } else if conn.needs_credit_update() {
                    let p = self.to_guest(key, OP_CREDIT_UPDATE, 0);
                    self.push_backlog(p);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => {
                let p = self.to_guest(key, OP_CREDIT_UPDATE, 0);
                self.push_backlog(p);
            }
            (OP_SHUTDOWN, _) => {
                conn.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                conn.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                if conn.peer_shut_rcv && conn.peer_shut_send {
                    // Both directions closed by the guest: forward what it sent, then RST ends
                    // the connection on both sides.
                    let _ = conn.flush_to_host();
                    self.reset_conn(epoll, key);
                } else if conn.flush_to_host().is_err() {
                    self.reset_conn(epoll, key);
                }
            }
            (OP_RST, _) => self.remove_conn(epoll, key),
            _ => {
                let op = hdr.op;
                tracing::debug!("virtio-vsock: unexpected op {op} in state {:?}", conn.state);
                self.reset_conn(epoll, key);
            }
        }
    }

    /// Tell the guest the connection is gone and forget it.
    fn reset_conn(&mut self, epoll: &Epoll, key: Key) {
        let p = self.to_guest(key, OP_RST, 0);
        self.push_backlog(p);
        self.remove_conn(epoll, key);
    }

    fn guest_connect(&mut self, epoll: &Epoll, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.len() >= MAX_CONNS {
            let p = self.reply(hdr, OP_RST, 0);
            self.push_backlog(p);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("virtio-vsock: guest connect to {}: {e}", path.display());
                let p = self.reply(hdr, OP_RST, 0);
                self.push_backlog(p);
                return;
            }
        };
        let token = self.token();
        if let Err(e) = epoll_add(epoll, stream.as_raw_fd(), EventSet::empty(), token) {
            tracing::error!("virtio-vsock: epoll add failed: {e}");
            let p = self.reply(hdr, OP_RST, 0);
            self.push_backlog(p);
            return;
        }
        let mut conn = Conn::new(stream, token, key.0, State::Established);
        conn.update_peer_credit(hdr);
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        let p = self.to_guest(key, OP_RESPONSE, 0);
        self.push_backlog(p);
    }

    // ---- host -> guest -------------------------------------------------------------------

    fn accept(&mut self, epoll: &Epoll) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let token = self.token();
                    if epoll_add(epoll, stream.as_raw_fd(), EventSet::IN, token).is_ok() {
                        self.pending.insert(
                            token,
                            PendingHost {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("virtio-vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Read the `CONNECT <port>\n` line of a new host connection.
    fn pending_readable(&mut self, epoll: &Epoll, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte: anything after the newline is payload for the guest and must stay in
        // the socket until the connection is established.
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => {
                    break std::str::from_utf8(&p.line)
                        .ok()
                        .and_then(|l| l.strip_prefix("CONNECT "))
                        .and_then(|n| n.trim().parse::<u32>().ok())
                        .ok_or(());
                }
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let Ok(peer_port) = port else {
            epoll_remove(epoll, p.stream.as_raw_fd());
            return;
        };
        let local_port = self.alloc_local_port(peer_port);
        let key = (local_port, peer_port);
        if epoll_modify(epoll, p.stream.as_raw_fd(), EventSet::empty(), token).is_err() {
            epoll_remove(epoll, p.stream.as_raw_fd());
            return;
        }
        self.conns.insert(
            key,
            Conn::new(p.stream, token, local_port, State::Connecting),
        );
        self.tokens.insert(token, key);
        let req = self.to_guest(key, OP_REQUEST, 0);
        self.push_backlog(req);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn stream_event(&mut self, epoll: &Epoll, token: u64, events: EventSet) {
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut broken = false;
        if events.contains(EventSet::OUT) {
            broken |= conn.flush_to_host().is_err();
        }
        // A guest that filled our buffer is blocked on credit and sends nothing that would
        // trigger an update: tell it as soon as the host has taken the bytes.
        let credit_update = !broken && conn.needs_credit_update();
        if events.contains(EventSet::IN) {
            broken |= conn.read_from_host().is_err();
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !conn.hup {
            // Level-triggered HUP would fire forever; take the fd out and read it directly.
            conn.hup = true;
            epoll_remove(epoll, conn.stream.as_raw_fd());
            broken |= conn.read_from_host().is_err();
            if conn.has_pending_to_host() {
                // The host is gone: what the guest still sent cannot be delivered.
                broken = true;
            }
        }
        if broken {
            self.reset_conn(epoll, key);
        } else if credit_update {
            let p = self.to_guest(key, OP_CREDIT_UPDATE, 0);
            self.push_backlog(p);
        }
    }

    /// Deliver control packets and connection data to the guest while it has rx buffers.
    fn process_rx(&mut self) -> Result<(), ChainError> {
        loop {
            let next = self.next_rx();
            let Some(kind) = next else {
                return Ok(());
            };
            let max = (HEADER_LEN as u64) + u64::from(MAX_PAYLOAD) * 2;
            let Some(chain) = pop_chain(&mut self.queues[RX], &self.mem, max)? else {
                return Ok(());
            };
            let space = usize::try_from(chain.writable_len()).unwrap_or(usize::MAX);
            if space < HEADER_LEN {
                return Err(ChainError::TooShort(
                    "rx buffer smaller than a packet header",
                ));
            }
            let mut pkt = match kind {
                RxKind::Backlog => self.backlog.pop_front().unwrap_or_else(unreachable_packet),
                RxKind::Data(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        // Cannot happen (nothing ran since next_rx); never keep a guest buffer:
                        // a zero-length completion is dropped by the driver.
                        complete(&mut self.queues[RX], &self.mem, chain.head, 0, &self.irq)?;
                        continue;
                    };
                    let n = conn.next_payload_len(space);
                    let data: Vec<u8> = conn.to_guest.drain(..n).collect();
                    conn.sent_to_guest(u32::try_from(n).unwrap_or(u32::MAX));
                    let mut p = self.to_guest(key, OP_RW, 0);
                    p.data = data;
                    p
                }
            };
            pkt.hdr.len = u32::try_from(pkt.data.len()).unwrap_or(0);
            if let Some(conn) = self.conns.get_mut(&(pkt.hdr.src_port, pkt.hdr.dst_port)) {
                conn.stamp(&mut pkt.hdr);
            }
            let mut w = ChainWriter::new(&self.mem, &chain.writable);
            w.write_all(pkt.hdr.swap_le().as_slice(), "packet header")?;
            w.write_all(&pkt.data, "packet payload")?;
            let len = u32::try_from(w.written()).unwrap_or(u32::MAX);
            complete(&mut self.queues[RX], &self.mem, chain.head, len, &self.irq)?;
        }
    }

    fn next_rx(&mut self) -> Option<RxKind> {
        if !self.backlog.is_empty() {
            return Some(RxKind::Backlog);
        }
        // Connections whose host side stopped sending and whose data is delivered get SHUTDOWN:
        // SEND only for a half-close (the guest may still send, the host still reads), both
        // flags once the host is gone entirely or the guest has stopped sending too.
        let mut closing = Vec::new();
        let mut half_closed = Vec::new();
        let mut data = None;
        for (key, c) in &self.conns {
            if c.state == State::Established
                && !c.peer_shut_rcv
                && !c.to_guest.is_empty()
                && c.peer_credit() > 0
            {
                data = Some(*key);
                break;
            }
            if c.state == State::Established && c.host_eof && c.to_guest.is_empty() {
                if c.hup || c.peer_shut_send {
                    closing.push(*key);
                } else if !c.told_guest_eof {
                    half_closed.push(*key);
                }
            }
        }
        for key in half_closed {
            if let Some(c) = self.conns.get_mut(&key) {
                c.told_guest_eof = true;
            }
            let p = self.to_guest(key, OP_SHUTDOWN, SHUTDOWN_SEND);
            self.push_backlog(p);
        }
        for key in closing {
            if let Some(c) = self.conns.get_mut(&key) {
                c.set_state(State::Closing);
            }
            let p = self.to_guest(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
            self.push_backlog(p);
        }
        if let Some(k) = data {
            return Some(RxKind::Data(k));
        }
        (!self.backlog.is_empty()).then_some(RxKind::Backlog)
    }

    /// Give up on connections stuck in a handshake; stop the timer when none waits.
    fn timeouts(&mut self, epoll: &Epoll) {
        self.timer.drain();
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state != State::Established && c.since.elapsed() >= HANDSHAKE_TIMEOUT
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!("virtio-vsock: connection {key:?} timed out in its handshake");
            self.reset_conn(epoll, key);
        }
    }

    /// Run the timer exactly while some connection waits for the guest.
    fn arm_timer(&mut self) {
        let waiting = self.conns.values().any(|c| c.state != State::Established);
        self.timer.set(waiting, TIMER_PERIOD);
    }

    fn process_evq(&mut self) -> Result<(), ChainError> {
        if !self.reset_event_pending {
            return Ok(());
        }
        let Some(chain) = pop_chain(&mut self.queues[EVQ], &self.mem, 4096)? else {
            return Ok(());
        };
        let mut w = ChainWriter::new(&self.mem, &chain.writable);
        w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes(), "event")?;
        complete(&mut self.queues[EVQ], &self.mem, chain.head, 4, &self.irq)?;
        self.reset_event_pending = false;
        Ok(())
    }

    /// After any event: read from hung-up streams the epoll set no longer reports, and keep
    /// every stream's epoll interest in line with what it can do now.
    fn refresh(&mut self, epoll: &Epoll) {
        let mut broken = Vec::new();
        for (key, c) in &mut self.conns {
            if c.hup {
                if c.wants_read() && c.read_from_host().is_err() {
                    broken.push(*key);
                }
                continue;
            }
            let want = c.desired_interest();
            if want != c.interest {
                if epoll_modify(epoll, c.stream.as_raw_fd(), want, c.token).is_err() {
                    broken.push(*key);
                }
                c.interest = want;
            }
        }
        for key in broken {
            self.reset_conn(epoll, key);
        }
    }
}

/// Connect a non-blocking unix stream socket: a listener with a full backlog makes this fail
/// (the guest gets RST) instead of stalling the device's loop.
fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall, no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own; the stream closes it on every path below.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(110);
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` is its size.
    let r = unsafe { libc::connect(fd, std::ptr::from_ref(&addr).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[derive(Debug, Clone, Copy)]
enum RxKind {
    Backlog,
    Data(Key),
}

fn unreachable_packet() -> Packet {
    // next_rx returned Backlog only with a non-empty backlog and nothing ran in between; an
    // empty RST to port 0 is harmless if that ever changes.
    Packet {
        hdr: Header {
            src_cid: HOST_CID,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        },
        data: Vec::new(),
    }
}

impl EventHandler for VsockHandler {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        for (i, token) in [RX_TOKEN, TX_TOKEN, EVQ_TOKEN].into_iter().enumerate() {
            epoll_add(epoll, self.evts[i].as_raw_fd(), EventSet::IN, token)?;
        }
        epoll_add(
            epoll,
            self.listener.as_raw_fd(),
            EventSet::IN,
            LISTENER_TOKEN,
        )?;
        epoll_add(epoll, self.timer.fd.as_raw_fd(), EventSet::IN, TIMER_TOKEN)?;
        for (token, p) in &self.pending {
            epoll_add(epoll, p.stream.as_raw_fd(), EventSet::IN, *token)?;
        }
        for c in self.conns.values_mut() {
            if !c.hup {
                c.interest = c.desired_interest();
                epoll_add(epoll, c.stream.as_raw_fd(), c.interest, c.token)?;
            }
        }
        Ok(())
    }

    fn kick(&mut self, epoll: &Epoll) {
        self.handle(epoll, TX_TOKEN, EventSet::IN);
        self.handle(epoll, EVQ_TOKEN, EventSet::IN);
    }

    fn handle(&mut self, epoll: &Epoll, token: u64, events: EventSet) {
        if self.failed {
            // Drain the event so a level-triggered fd does not spin; the driver must reset.
            if token <= EVQ_TOKEN {
                let _ = self.evts[usize::try_from(token).unwrap_or(0)].read();
            }
            return;
        }
        let r = match token {
            RX_TOKEN => {
                let _ = self.evts[RX].read();
                Ok(())
            }
            TX_TOKEN => {
                let _ = self.evts[TX].read();
                self.process_tx(epoll)
            }
            EVQ_TOKEN => {
                let _ = self.evts[EVQ].read();
                self.process_evq()
            }
            LISTENER_TOKEN => {
                self.accept(epoll);
                Ok(())
            }
            TIMER_TOKEN => {
                self.timeouts(epoll);
                Ok(())
            }
            t if self.pending.contains_key(&t) => {
                self.pending_readable(epoll, t);
                Ok(())
            }
            t => {
                self.stream_event(epoll, t, events);
                Ok(())
            }
        };
        let r = r.and_then(|()| {
            self.refresh(epoll);
            self.process_rx()
        });
        if let Err(e) = r {
            self.fail(&e);
            return;
        }
        // Delivering data freed read-ahead space: streams may want to read again.
        self.refresh(epoll);
        self.arm_timer();
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queues.iter().map(Queue::state).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_a_timer_disarmed_after_it_fired_returns_at_once() {
        // The race of the load runs: the timer fires (epoll reports it), the handler stops it
        // while handling an earlier event of the same batch, then handles the timer's event.
        let mut t = HandshakeTimer::new().unwrap();
        t.set(true, Duration::from_millis(1));
        let mut pfd = libc::pollfd {
            fd: t.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no timeout, the armed timer fires.
        assert_eq!(unsafe { libc::poll(&raw mut pfd, 1, -1) }, 1);
        t.set(false, Duration::from_millis(1));
        // A blocking timerfd waits here forever (disarming reset the expiration count).
        t.drain();
        assert!(!t.armed);
    }
}
