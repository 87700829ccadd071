//! virtio-vsock with a userspace host side: one unix socket per VM (Firecracker's convention).
//!
//! - Host to guest: the host connects to `uds_path` and writes `CONNECT <port>\n`; the device
//!   opens a stream to guest port `<port>` and answers `OK <host_port>\n` once the guest accepts;
//!   then bytes flow both ways.
//! - Guest to host: a guest connection to host port P (CID 2) is connected to the unix socket
//!   `<uds_path>_P`.
//!
//! The device implements the stream packet protocol (REQUEST, RESPONSE, RW, CREDIT_UPDATE,
//! CREDIT_REQUEST, SHUTDOWN, RST), credit flow control in both directions, and the event queue
//! (TRANSPORT_RESET after a snapshot restore: host connections do not survive one).

mod connection;
mod device;
mod event_handler;
mod packet;
mod persist;

pub use device::{Vsock, VsockConfig, VsockError};
pub use persist::{VsockRestoreError, VsockState};

/// The CID of the host.
pub const HOST_CID: u64 = 2;

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;

    use vm_memory::{ByteValued, Bytes, GuestAddress};

    use super::packet::*;
    use super::*;
    use crate::persist::Persist;
    use crate::virtio::VirtioDeviceState;
    use crate::virtio::mmio::{MmioTransport, MmioTransportArgs};
    use crate::virtio::test_utils::{DEADLINE, TestDriver};

    const CID: u64 = 3;

    struct Guest {
        d: TestDriver,
        rx_bufs: HashMap<u16, u64>,
    }

    impl Guest {
        fn new(uds: &Path) -> Guest {
            let v = Vsock::new(VsockConfig {
                guest_cid: CID,
                uds_path: uds.to_owned(),
            })
            .unwrap();
            Guest::over(TestDriver::new(Box::new(v)))
        }

        fn over(mut d: TestDriver) -> Guest {
            d.init(64);
            let mut g = Guest {
                d,
                rx_bufs: HashMap::new(),
            };
            for _ in 0..16 {
                g.post_rx();
            }
            g
        }

        fn post_rx(&mut self) {
            let a = self.d.alloc(HEADER_LEN + 4096);
            let head = self.d.add_chain(
                0,
                &[
                    (a, HEADER_LEN as u32, true),
                    (a + HEADER_LEN as u64, 4096, true),
                ],
            );
            self.rx_bufs.insert(head, a);
            self.d.notify(0);
        }

        fn recv(&mut self) -> (Header, Vec<u8>) {
            let (head, len) = self.d.wait_used(0);
            let a = self.rx_bufs.remove(&head).expect("unknown rx buffer");
            let h: Header = self
                .d
                .mem
                .read_obj::<Header>(GuestAddress(a))
                .unwrap()
                .swap_le();
            assert_eq!(len as usize, HEADER_LEN + h.len as usize);
            let data = self.d.read_mem(a + HEADER_LEN as u64, h.len as usize);
            self.post_rx();
            (h, data)
        }

        fn send(&mut self, h: Header, data: &[u8]) {
            let mut h = h;
            h.len = u32::try_from(data.len()).unwrap();
            let ha = self.d.alloc_with(h.swap_le().as_slice());
            let mut bufs = vec![(ha, HEADER_LEN as u32, false)];
            if !data.is_empty() {
                bufs.push((self.d.alloc_with(data), h.len, false));
            }
            let head = self.d.add_chain(1, &bufs);
            self.d.notify(1);
            assert_eq!(self.d.wait_used(1).0, head);
        }
    }

    fn pkt(src_port: u32, dst_port: u32, op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn host_connect(uds: &Path, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(uds).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        s
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            assert_eq!(s.read(&mut b).unwrap(), 1, "stream closed before newline");
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    /// Host connects, guest accepts; returns (guest, host stream, host-side port).
    fn established(uds: &Path, guest_buf: u32) -> (Guest, UnixStream, u32) {
        let mut g = Guest::new(uds);
        let mut host = host_connect(uds, 1234);
        let (h, _) = g.recv();
        assert_eq!(
            (h.op, h.src_cid, h.dst_cid, h.dst_port),
            (OP_REQUEST, HOST_CID, CID, 1234)
        );
        let local = h.src_port;
        g.send(pkt(1234, local, OP_RESPONSE, guest_buf, 0), &[]);
        assert_eq!(read_line(&mut host), format!("OK {local}\n"));
        (g, host, local)
    }

    #[test]
    fn host_initiated_connection_carries_bytes_both_ways_and_closes() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let (mut g, mut host, local) = established(&uds, 65536);
        host.write_all(b"hello").unwrap();
        let (h, data) = g.recv();
        assert_eq!(
            (h.op, h.dst_port, data.as_slice()),
            (OP_RW, 1234, &b"hello"[..])
        );
        g.send(pkt(1234, local, OP_RW, 65536, 5), b"world");
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"world");
        drop(host);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
        g.send(pkt(1234, local, OP_RST, 0, 0), &[]);
    }

    #[test]
    fn host_half_close_lets_the_guest_answer_before_the_connection_ends() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let (mut g, mut host, local) = established(&uds, 65536);
        host.write_all(b"request").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let (h, data) = g.recv();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"request"[..]));
        // The host will send no more, but still reads: SHUTDOWN(SEND) only, no close.
        let (h, _) = g.recv();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        g.send(pkt(1234, local, OP_RW, 65536, 7), b"reply");
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"reply");
        let mut h = pkt(1234, local, OP_SHUTDOWN, 65536, 7);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(h, &[]);
        let (h, _) = g.recv();
        assert_eq!({ h.op }, OP_RST);
        assert_eq!(host.read(&mut buf).unwrap(), 0, "host side sees EOF");
    }

    #[test]
    fn guest_initiated_connection_reaches_the_port_socket() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
        let mut g = Guest::new(&uds);
        g.send(pkt(999, 5000, OP_REQUEST, 65536, 0), &[]);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 999));
        let (mut host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(DEADLINE)).unwrap();
        g.send(pkt(999, 5000, OP_RW, 65536, 0), b"ping");
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        host.write_all(b"pong").unwrap();
        let (h, data) = g.recv();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"pong"[..]));
        g.send(pkt(999, 5000, OP_SHUTDOWN, 65536, 4), &[]);
        // SHUTDOWN without flags changes nothing; with both flags the device resets.
        let mut h = pkt(999, 5000, OP_SHUTDOWN, 65536, 4);
        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        g.send(h, &[]);
        let (h, _) = g.recv();
        assert_eq!({ h.op }, OP_RST);
        assert_eq!(host.read(&mut buf).unwrap(), 0, "host side sees EOF");
    }

    #[test]
    fn guest_connect_to_a_port_nobody_listens_on_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Guest::new(&dir.path().join("v.sock"));
        g.send(pkt(1000, 4242, OP_REQUEST, 65536, 0), &[]);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 4242, 1000));
        // So is data for a connection that does not exist.
        g.send(pkt(1001, 4243, OP_RW, 65536, 0), b"x");
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_RST, 1001));
    }

    #[test]
    fn host_to_guest_data_respects_guest_credit() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let (mut g, mut host, local) = established(&uds, 8);
        host.write_all(&[7u8; 20]).unwrap();
        let mut got = 0usize;
        let mut fwd = 0u32;
        while got < 20 {
            let (h, data) = g.recv();
            assert_eq!({ h.op }, OP_RW);
            // Never more than the window the guest opened.
            assert!(
                data.len() <= 8,
                "{} bytes sent into an 8-byte window",
                data.len()
            );
            got += data.len();
            fwd += u32::try_from(data.len()).unwrap();
            // The window is full: a CREDIT_REQUEST is answered before any more data.
            g.send(
                pkt(
                    1234,
                    local,
                    OP_CREDIT_REQUEST,
                    8,
                    fwd - u32::try_from(data.len()).unwrap(),
                ),
                &[],
            );
            let (h, _) = g.recv();
            assert_eq!(
                (h.op, h.buf_alloc),
                (OP_CREDIT_UPDATE, connection::TX_BUF_CAP)
            );
            g.send(pkt(1234, local, OP_CREDIT_UPDATE, 8, fwd), &[]);
        }
        assert_eq!(got, 20);
    }

    #[test]
    fn forwarding_guest_data_sends_credit_updates() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let (mut g, mut host, local) = established(&uds, 65536);
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            host.read_exact(&mut buf).unwrap();
            host
        });
        g.send(pkt(1234, local, OP_RW, 65536, 0), &vec![1u8; 65536]);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.fwd_cnt), (OP_CREDIT_UPDATE, 65536));
        drop(reader.join().unwrap());
    }

    #[test]
    fn a_slow_host_reader_still_returns_the_guests_credit() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let (mut g, mut host, local) = established(&uds, 65536);
        // The guest fills the device's whole buffer while the host reads nothing: more than
        // the unix socket holds, so part of it waits in the device.
        let cap = connection::TX_BUF_CAP;
        for i in 0..4 {
            g.send(
                pkt(1234, local, OP_RW, 65536, 0),
                &vec![i; (cap / 4) as usize],
            );
        }
        let mut buf = vec![0u8; cap as usize];
        host.read_exact(&mut buf).unwrap();
        // The guest is now out of credit and sends nothing; the device must still hand the
        // credit back. Updates are batched (one per CREDIT_UPDATE_THRESHOLD bytes forwarded),
        // so the last one may leave up to that much unreported: the guest's credit, `fwd_cnt`
        // here, must come back to within one batch of the whole buffer.
        loop {
            let (h, _) = g.recv();
            assert_eq!({ h.op }, OP_CREDIT_UPDATE);
            if h.fwd_cnt > cap - connection::CREDIT_UPDATE_THRESHOLD {
                break;
            }
        }
    }

    #[test]
    fn guest_that_never_answers_a_connect_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut g = Guest::new(&uds);
        let mut host = host_connect(&uds, 1234);
        let (h, _) = g.recv();
        assert_eq!({ h.op }, OP_REQUEST);
        // No RESPONSE: after the handshake timeout the host sees EOF and the guest an RST.
        let mut b = [0u8; 1];
        assert_eq!(host.read(&mut b).unwrap(), 0);
        let (r, _) = g.recv();
        assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, h.src_port, 1234));
    }

    /// 4 MiB each way through one connection with both sides' credit enforced: the guest
    /// only sends within the device's advertised window, and grants the device a 256 KiB
    /// window it refreshes as it consumes. Prints the rate (a figure, not a threshold).
    #[test]
    fn bulk_transfer_both_ways_under_credit_flow() {
        const TOTAL: usize = 4 << 20;
        const GUEST_BUF: u32 = 256 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let (mut g, host, local) = established(&uds, GUEST_BUF);
        let pattern = |i: usize| (i % 251) as u8;
        let start = std::time::Instant::now();

        // Host -> guest.
        let mut writer = host.try_clone().unwrap();
        let w = std::thread::spawn(move || {
            let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
            writer.write_all(&data).unwrap();
        });
        let mut got = 0usize;
        let mut granted = 0usize;
        while got < TOTAL {
            let (h, data) = g.recv();
            if { h.op } != OP_RW {
                continue;
            }
            for (k, b) in data.iter().enumerate() {
                assert_eq!(*b, pattern(got + k), "byte {} corrupted", got + k);
            }
            got += data.len();
            assert!(
                got - granted <= GUEST_BUF as usize,
                "device overran the guest window"
            );
            if got - granted >= 64 * 1024 {
                granted = got;
                g.send(
                    pkt(1234, local, OP_CREDIT_UPDATE, GUEST_BUF, got as u32),
                    &[],
                );
            }
        }
        w.join().unwrap();
        let down = start.elapsed();

        // Guest -> host, honouring the device's window.
        let mut reader = host;
        let r = std::thread::spawn(move || {
            let mut buf = vec![0u8; TOTAL];
            reader.read_exact(&mut buf).unwrap();
            buf
        });
        let (mut dev_buf, mut dev_fwd) = (connection::TX_BUF_CAP, 0u32);
        let mut sent = 0usize;
        let start = std::time::Instant::now();
        while sent < TOTAL {
            let window = dev_buf as usize - (sent - dev_fwd as usize);
            if window == 0 {
                // Wait for the device's CREDIT_UPDATE.
                let (h, _) = g.recv();
                if { h.op } == OP_CREDIT_UPDATE {
                    dev_buf = h.buf_alloc;
                    dev_fwd = h.fwd_cnt;
                }
                continue;
            }
            let n = window.min(4096).min(TOTAL - sent);
            let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
            g.send(pkt(1234, local, OP_RW, GUEST_BUF, got as u32), &chunk);
            sent += n;
            // Pick up credit updates the device sent meanwhile.
            while let Some((head, _)) = g.d.try_used(0) {
                let a = g.rx_bufs.remove(&head).unwrap();
                let h: Header =
                    g.d.mem
                        .read_obj::<Header>(GuestAddress(a))
                        .unwrap()
                        .swap_le();
                g.post_rx();
                if { h.op } == OP_CREDIT_UPDATE {
                    dev_buf = h.buf_alloc;
                    dev_fwd = h.fwd_cnt;
                }
            }
        }
        let buf = r.join().unwrap();
        let up = start.elapsed();
        assert!(
            buf.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            "host received corrupted data"
        );
        let mib = TOTAL as f64 / f64::from(1 << 20);
        eprintln!(
            "virtio-vsock 4 MiB: host->guest {:.0} MiB/s, guest->host {:.0} MiB/s (test driver, 4 KiB packets)",
            mib / down.as_secs_f64(),
            mib / up.as_secs_f64()
        );
    }

    #[test]
    fn malformed_connect_line_closes_the_host_stream() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let _g = Guest::new(&uds);
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(b"HELLO 1\n").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn payload_shorter_than_header_len_fails_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Guest::new(&dir.path().join("v.sock"));
        let mut h = pkt(1, 2, OP_RW, 0, 0);
        h.len = 100;
        let ha = g.d.alloc_with(h.swap_le().as_slice());
        g.d.add_chain(1, &[(ha, HEADER_LEN as u32, false)]);
        g.d.notify(1);
        g.d.wait_needs_reset();
    }

    #[test]
    fn restored_device_round_trips_and_sends_transport_reset() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut g = Guest::new(&uds);
        let ev = g.d.alloc(4);
        g.d.mem.write_obj(0xffff_ffffu32, GuestAddress(ev)).unwrap();
        let head = g.d.add_chain(2, &[(ev, 4, true)]);
        g.d.notify(2);
        g.d.transport.pause();
        let saved = g.d.transport.save();
        let VirtioDeviceState::Vsock(vs) = &saved.device else {
            panic!("not a vsock state: {saved:?}");
        };
        let uds2 = dir.path().join("child.sock");
        let v = Vsock::restore(
            VsockConfig {
                guest_cid: CID,
                uds_path: uds2.clone(),
            },
            vs,
        )
        .unwrap();
        let t = MmioTransport::restore(
            MmioTransportArgs {
                mem: g.d.mem.clone(),
                device: Box::new(v),
                irq: g.d.irq.clone(),
            },
            &saved,
        )
        .unwrap();
        g.d.transport = t;
        assert_eq!(g.d.wait_used(2), (head, 4));
        let id: u32 = g.d.mem.read_obj(GuestAddress(ev)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        // The round trip: the restored device saves the same state (queue positions moved by
        // the event are the only difference, and only on the event queue).
        let again = g.d.transport.save();
        assert_eq!(again.device, saved.device);
        assert_eq!(again.queues[..2], saved.queues[..2]);
        assert_eq!(
            again.queues[2].next_used,
            saved.queues[2].next_used.wrapping_add(1)
        );
        // The restored device serves its new socket.
        let mut host = host_connect(&uds2, 77);
        let (h, _) = g.recv();
        assert_eq!((h.op, h.dst_port), (OP_REQUEST, 77));
        g.send(pkt(77, h.src_port, OP_RESPONSE, 4096, 0), &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", { h.src_port }));
    }

    #[test]
    fn reserved_cid_and_wrong_restore_cid_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        assert!(
            Vsock::new(VsockConfig {
                guest_cid: 2,
                uds_path: uds.clone()
            })
            .is_err()
        );
        let state = VsockState {
            guest_cid: 5,
            acked_features: 1 << 32,
        };
        assert!(matches!(
            Vsock::restore(
                VsockConfig {
                    guest_cid: 6,
                    uds_path: uds
                },
                &state
            ),
            Err(VsockRestoreError::Cid { .. })
        ));
    }

    #[test]
    fn vsock_state_save_restore_save_is_identical() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = VsockConfig {
            guest_cid: 9,
            uds_path: dir.path().join("a.sock"),
        };
        let mut v = Vsock::new(cfg.clone()).unwrap();
        crate::virtio::VirtioDevice::set_acked_features(&mut v, 1 << 32);
        let s = v.save();
        drop(v);
        let r = Vsock::restore(cfg, &s).unwrap();
        assert_eq!(r.save(), s);
    }
}
