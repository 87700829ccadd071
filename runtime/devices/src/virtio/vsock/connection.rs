//! One stream between a guest port and a host unix socket, with both directions' credit.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{HEADER_LEN, Header};
use crate::virtio::inspect::VsockConnInspect;

/// Bytes the device buffers from the guest for one connection (its advertised `buf_alloc`).
pub(super) const TX_BUF_CAP: u32 = 256 * 1024;
/// Bytes read ahead from the host stream for the guest.
pub(super) const RX_BUF_CAP: usize = 64 * 1024;
/// Send a CREDIT_UPDATE once the guest's view of our `fwd_cnt` lags by this much, so a guest
/// that filled our buffer learns about freed space long before it would block for good.
pub(super) const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_CAP / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
    /// We sent SHUTDOWN (host closed); waiting for the guest's RST.
    Closing,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    pub(super) local_port: u32,
    pub(super) state: State,
    /// When `state` last changed (for the connect and close timeouts).
    pub(super) since: Instant,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    tx_cnt: u32,
    /// Payload bytes from the guest written to the host stream.
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last saw in a header from us.
    last_fwd_cnt_sent: u32,
    /// Bytes waiting to be written to the host; the first `ctrl_pending` are our own protocol
    /// text (`OK <port>\n`), not guest payload.
    to_host: Vec<u8>,
    ctrl_pending: usize,
    /// Bytes read from the host, not yet delivered to the guest.
    pub(super) to_guest: Vec<u8>,
    /// The host closed its side (read returned 0).
    pub(super) host_eof: bool,
    /// epoll reported a hang-up: the fd left the epoll set and is read directly when wanted.
    pub(super) hup: bool,
    /// The guest will send no more.
    pub(super) peer_shut_send: bool,
    /// The guest will receive no more.
    pub(super) peer_shut_rcv: bool,
    /// Events the fd is registered for.
    pub(super) interest: EventSet,
    host_write_shut: bool,
    /// We sent the guest SHUTDOWN(SEND) for a host half-close; the guest may still send.
    pub(super) told_guest_eof: bool,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, token: u64, local_port: u32, state: State) -> Self {
        Conn {
            stream,
            token,
            local_port,
            state,
            since: Instant::now(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: Vec::new(),
            ctrl_pending: 0,
            to_guest: Vec::new(),
            host_eof: false,
            hup: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            interest: EventSet::empty(),
            host_write_shut: false,
            told_guest_eof: false,
        }
    }

    pub(super) fn set_state(&mut self, state: State) {
        self.state = state;
        self.since = Instant::now();
    }

    /// Take the guest's credit information from any packet it sent on this connection.
    pub(super) fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Bytes the guest can still take. A guest that claims to have forwarded more than we sent
    /// gets no credit rather than a wrapped-around huge one.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Fill in our side's credit fields of a header about to be sent.
    pub(super) fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = TX_BUF_CAP;
        hdr.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Account `n` payload bytes sent to the guest.
    pub(super) fn sent_to_guest(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    pub(super) fn needs_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Queue our own text for the host (not counted as guest payload).
    pub(super) fn push_ctrl(&mut self, text: &[u8]) {
        self.to_host
            .splice(self.ctrl_pending..self.ctrl_pending, text.iter().copied());
        self.ctrl_pending += text.len();
    }

    /// Queue guest payload for the host. Fails if the guest overran the credit we gave it.
    pub(super) fn push_payload(&mut self, data: &[u8]) -> Result<(), ()> {
        let payload_pending = self.to_host.len() - self.ctrl_pending;
        if payload_pending + data.len() > TX_BUF_CAP as usize {
            return Err(());
        }
        self.to_host.extend_from_slice(data);
        Ok(())
    }

    pub(super) fn has_pending_to_host(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// Write what the host stream takes without blocking.
    pub(super) fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let ctrl = n.min(self.ctrl_pending);
                    self.ctrl_pending -= ctrl;
                    let payload = u32::try_from(n - ctrl).unwrap_or(u32::MAX);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(payload);
                    self.to_host.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.peer_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Whether reading from the host would be useful now.
    pub(super) fn wants_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.to_guest.len() < RX_BUF_CAP
            && self.peer_credit() as usize > self.to_guest.len()
    }

    pub(super) fn desired_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.wants_read() {
            e |= EventSet::IN;
        }
        if self.has_pending_to_host() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Read from the host into `to_guest`, bounded by the guest's credit and our read-ahead.
    pub(super) fn read_from_host(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while self.wants_read() {
            let room = (self.peer_credit() as usize - self.to_guest.len())
                .min(RX_BUF_CAP - self.to_guest.len())
                .min(buf.len());
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => self.host_eof = true,
                Ok(n) => self.to_guest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The connection as the VMM's `inspect` request shows it.
    pub(super) fn inspect(&self, peer_port: u32) -> VsockConnInspect {
        VsockConnInspect {
            local_port: self.local_port,
            peer_port,
            state: match self.state {
                State::Connecting => "connecting",
                State::Established => "established",
                State::Closing => "closing",
            },
            state_ms: u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            peer_buf_alloc: self.peer_buf_alloc,
            peer_fwd_cnt: self.peer_fwd_cnt,
            tx_cnt: self.tx_cnt,
            fwd_cnt: self.fwd_cnt,
            peer_credit: self.peer_credit(),
            to_host: self.to_host.len(),
            to_guest: self.to_guest.len(),
            host_eof: self.host_eof,
            hup: self.hup,
            peer_shut_send: self.peer_shut_send,
            peer_shut_rcv: self.peer_shut_rcv,
            interest: self.interest.bits(),
        }
    }

    /// Payload bytes for one RW packet into a buffer of `space` bytes (header included).
    pub(super) fn next_payload_len(&self, space: usize) -> usize {
        space
            .saturating_sub(HEADER_LEN)
            .min(self.to_guest.len())
            .min(self.peer_credit() as usize)
            .min(super::packet::MAX_PAYLOAD as usize)
    }
}
