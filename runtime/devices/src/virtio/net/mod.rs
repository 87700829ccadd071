//! virtio-net with a user-mode backend: `passt` (QEMU's stream netdev protocol over a unix
//! socket: a 4-byte big-endian length, then one Ethernet frame) or an already-connected stream
//! socket speaking the same protocol, or a tap device (raw frames).

mod backend;
mod device;
mod event_handler;
mod persist;

pub use backend::{NetBackend, PasstConfig};
pub use device::{Net, NetConfig, NetError};
pub use persist::{NetRestoreError, NetState};

/// virtio-net feature bits offered.
pub mod features {
    /// `mtu` in config is valid.
    pub const VIRTIO_NET_F_MTU: u32 = 3;
    /// `mac` in config is valid.
    pub const VIRTIO_NET_F_MAC: u32 = 5;
    /// `status` in config is valid (link up).
    pub const VIRTIO_NET_F_STATUS: u32 = 16;
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::persist::Persist;
    use crate::virtio::VirtioDeviceState;
    use crate::virtio::mmio::{MmioTransport, MmioTransportArgs};
    use crate::virtio::test_utils::{DEADLINE, TestDriver};

    const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x12, 0x34, 0x56];
    const HDR: usize = 12;
    const RXBUF: u32 = 2048;

    struct Guest {
        d: TestDriver,
        rx: HashMap<u16, u64>,
    }

    impl Guest {
        fn new(backend: NetBackend) -> Guest {
            let net = Net::new(NetConfig {
                mac: MAC,
                mtu: 1500,
                backend,
            })
            .unwrap();
            let mut d = TestDriver::new(Box::new(net));
            d.init(64);
            Guest {
                d,
                rx: HashMap::new(),
            }
        }

        fn post_rx(&mut self, len: u32) {
            let a = self.d.alloc(len as usize);
            let head = self.d.add_chain(0, &[(a, len, true)]);
            self.rx.insert(head, a);
            self.d.notify(0);
        }

        fn recv(&mut self) -> Vec<u8> {
            let (head, len) = self.d.wait_used(0);
            let a = self.rx.remove(&head).unwrap();
            let data = self.d.read_mem(a, len as usize);
            assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1, "num_buffers");
            data[HDR..].to_vec()
        }

        fn send(&mut self, frame: &[u8]) {
            let h = self.d.alloc(HDR);
            let f = self.d.alloc_with(frame);
            let head = self
                .d
                .add_chain(1, &[(h, HDR as u32, false), (f, frame.len() as u32, false)]);
            self.d.notify(1);
            assert_eq!(self.d.wait_used(1).0, head);
        }
    }

    fn frame(n: u8, len: usize) -> Vec<u8> {
        let mut f = vec![n; len];
        f[..6].copy_from_slice(&MAC);
        f
    }

    fn host_send(s: &mut UnixStream, f: &[u8]) {
        s.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
        s.write_all(f).unwrap();
    }

    fn host_recv(s: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).unwrap();
        f
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(DEADLINE)).unwrap();
        (a, b)
    }

    #[test]
    fn frames_are_relayed_both_ways_with_length_prefix() {
        let (dev, mut host) = pair();
        let mut g = Guest::new(NetBackend::Stream(dev));
        let mut mac = [0u8; 6];
        crate::bus::BusDevice::read(&mut g.d.transport, 0x100, &mut mac);
        assert_eq!(mac, MAC);
        let f = frame(1, 60);
        g.send(&f);
        assert_eq!(host_recv(&mut host), f);
        g.post_rx(RXBUF);
        let f2 = frame(2, 1514);
        host_send(&mut host, &f2);
        assert_eq!(g.recv(), f2);
    }

    #[test]
    fn frames_wait_for_rx_buffers_and_keep_their_order() {
        let (dev, mut host) = pair();
        let mut g = Guest::new(NetBackend::Stream(dev));
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|i| frame(10 + i, 100 + usize::from(i)))
            .collect();
        for f in &frames {
            host_send(&mut host, f);
        }
        for _ in 0..3 {
            g.post_rx(RXBUF);
        }
        for f in &frames {
            assert_eq!(&g.recv(), f);
        }
    }

    #[test]
    fn frame_larger_than_the_buffer_is_dropped_and_the_next_one_delivered() {
        let (dev, mut host) = pair();
        let mut g = Guest::new(NetBackend::Stream(dev));
        g.post_rx(256);
        g.post_rx(RXBUF);
        host_send(&mut host, &frame(1, 1000));
        host_send(&mut host, &frame(2, 100));
        let (_, len) = g.d.wait_used(0);
        assert_eq!(len, 0, "the short buffer comes back empty");
        let (head, len) = g.d.wait_used(0);
        let a = g.rx[&head];
        assert_eq!(
            g.d.read_mem(a + HDR as u64, len as usize - HDR),
            frame(2, 100)
        );
    }

    #[test]
    fn backend_breaking_the_framing_does_not_hurt_the_device() {
        let (dev, mut host) = pair();
        let mut g = Guest::new(NetBackend::Stream(dev));
        host.write_all(&u32::MAX.to_be_bytes()).unwrap();
        g.post_rx(RXBUF);
        // TX keeps completing (frames are dropped), and the device does not need a reset.
        g.send(&frame(3, 60));
        g.send(&frame(4, 60));
        assert_eq!(g.d.status() & crate::virtio::status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn tx_chain_without_net_header_fails_the_device() {
        let (dev, _host) = pair();
        let mut g = Guest::new(NetBackend::Stream(dev));
        let f = g.d.alloc(4);
        g.d.add_chain(1, &[(f, 4, false)]);
        g.d.notify(1);
        g.d.wait_needs_reset();
    }

    #[test]
    fn net_state_round_trips_through_the_transport() {
        let (dev, _host) = pair();
        let mut g = Guest::new(NetBackend::Stream(dev));
        g.d.transport.pause();
        let saved = g.d.transport.save();
        let VirtioDeviceState::Net(ns) = &saved.device else {
            panic!("not a net state: {saved:?}");
        };
        let (dev2, mut host2) = pair();
        let cfg = NetConfig {
            mac: MAC,
            mtu: 1500,
            backend: NetBackend::Stream(dev2),
        };
        let net = Net::restore(cfg, ns).unwrap();
        let t = MmioTransport::restore(
            MmioTransportArgs {
                mem: g.d.mem.clone(),
                device: Box::new(net),
                irq: g.d.irq.clone(),
            },
            &saved,
        )
        .unwrap();
        assert_eq!(t.save(), saved);
        g.d.transport = t;
        let f = frame(5, 64);
        g.send(&f);
        assert_eq!(host_recv(&mut host2), f);
        let (dev3, _h3) = pair();
        let other_mac = NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            backend: NetBackend::Stream(dev3),
        };
        assert!(Net::restore(other_mac, ns).is_err());
    }

    /// An AF_PACKET socket on interface `ifname` (raw Ethernet frames in and out).
    fn packet_socket(ifname: &str) -> (std::os::fd::OwnedFd, libc::sockaddr_ll) {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        // SAFETY: binds fd to a valid sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: DEADLINE.as_secs() as i64,
            tv_usec: 0,
        };
        // SAFETY: sets a receive timeout from a valid timeval.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        (fd, sll)
    }

    /// The tap backend (needs root/CAP_NET_ADMIN and /dev/net/tun): a guest frame comes out of
    /// the interface, and a frame sent on the interface reaches the guest.
    #[test]
    fn tap_backend_relays_frames() {
        use std::os::fd::AsRawFd;
        let name = format!("spcc{}", std::process::id() % 100_000);
        let mut g = Guest::new(NetBackend::Tap(name.clone()));
        let up = std::process::Command::new("ip")
            .args(["link", "set", &name, "up"])
            .status()
            .expect("running ip (iproute2)");
        assert!(up.success(), "ip link set {name} up failed");
        let (sock, sll) = packet_socket(&name);

        // Guest -> interface. Use an EtherType nothing else on the link sends.
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&MAC);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f[14..20].copy_from_slice(b"specc!");
        g.send(&f);
        let mut buf = vec![0u8; 2048];
        loop {
            // SAFETY: reads into a buffer we own, of the given length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(
                n >= 0,
                "no frame from the guest on {name}: {}",
                std::io::Error::last_os_error()
            );
            if buf[12..14] == [0x88, 0xb5] {
                assert_eq!(&buf[14..20], b"specc!");
                break;
            }
        }

        // Interface -> guest.
        for _ in 0..8 {
            g.post_rx(RXBUF);
        }
        let mut out = [0u8; 60];
        out[..6].copy_from_slice(&MAC);
        out[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        out[12..14].copy_from_slice(&[0x88, 0xb6]);
        out[14..20].copy_from_slice(b"to-vm!");
        // SAFETY: sends a buffer we own to a valid sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                out.as_ptr().cast(),
                out.len(),
                0,
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(n, 60, "sendto: {}", std::io::Error::last_os_error());
        loop {
            let f = g.recv();
            g.post_rx(RXBUF);
            if f.len() >= 20 && f[12..14] == [0x88, 0xb6] {
                assert_eq!(&f[14..20], b"to-vm!");
                break;
            }
        }
    }

    /// The real passt binary (Debian package `passt`): an ARP request from the guest is
    /// answered by passt through the device.
    #[test]
    fn real_passt_answers_arp() {
        let which = std::process::Command::new("sh")
            .args(["-c", "command -v passt"])
            .output()
            .unwrap();
        assert!(
            which.status.success(),
            "passt is not installed (apt-get install passt; testsuite/scripts/setup-host.sh)"
        );
        let mut g = Guest::new(NetBackend::Passt(PasstConfig::default()));
        for _ in 0..8 {
            g.post_rx(RXBUF);
        }
        let mut arp = Vec::new();
        arp.extend_from_slice(&[0xff; 6]);
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0, 0, 0, 0]); // sender IP: probe
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[203, 0, 113, 1]);
        arp.resize(60, 0);
        g.send(&arp);
        // passt may also send unsolicited frames (router advertisements); look for the reply.
        loop {
            let f = g.recv();
            g.post_rx(RXBUF);
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
                assert_eq!(&f[0..6], &MAC, "reply addressed to the guest");
                assert_eq!(&f[20..22], &[0, 2], "ARP reply");
                assert_eq!(&f[28..32], &[203, 0, 113, 1], "for the address asked");
                break;
            }
        }
    }
}
