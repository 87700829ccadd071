//! Waiting for the default gateway to answer ARP after a restore.
//!
//! A VM restored from a snapshot keeps its addresses and routes, but its network backend is a
//! new process on the host (passt) that may take seconds to start under emulation. Frames sent
//! before it is attached are lost; the guest's neighbour entry for the gateway then fails and
//! the first connection ends in "no route to host". The host therefore asks the agent to wait
//! until the gateway answers an ARP request. Doing it here, over a packet socket, needs no tool
//! in the guest (Debian's minbase has no `arping`; busybox does).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use specc_protocol::GatewayWait;

/// How often the request is repeated while nobody answers.
const RETRY: Duration = Duration::from_millis(250);

// From <linux/route.h>.
const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ARP_LEN: usize = 28;

/// The interface and gateway of the IPv4 default route in `/proc/net/route` text.
pub fn parse_default_route(table: &str) -> Option<(String, Ipv4Addr)> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (iface, dest, gw, flags) = (f.first()?, f.get(1)?, f.get(2)?, f.get(3)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *dest != "00000000" || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            return None;
        }
        // The kernel prints the network-order address as a host-order (little-endian) word.
        let gw = u32::from_str_radix(gw, 16).ok()?;
        Some(((*iface).to_owned(), Ipv4Addr::from(gw.to_le_bytes())))
    })
}

/// An Ethernet/IPv4 ARP request for `target` (the payload of a `SOCK_DGRAM` packet socket).
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> [u8; ARP_LEN] {
    let mut p = [0u8; ARP_LEN];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    p[8..14].copy_from_slice(&sender_mac);
    p[14..18].copy_from_slice(&sender_ip.octets());
    // The target hardware address stays zero: that is what is asked for.
    p[24..28].copy_from_slice(&target.octets());
    p
}

/// Whether `packet` is an ARP reply from `from`.
pub fn is_reply_from(packet: &[u8], from: Ipv4Addr) -> bool {
    packet.len() >= ARP_LEN
        && packet[0..2] == 1u16.to_be_bytes()
        && packet[2..4] == 0x0800u16.to_be_bytes()
        && packet[4] == 6
        && packet[5] == 4
        && packet[6..8] == ARP_REPLY.to_be_bytes()
        && packet[14..18] == from.octets()
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ifreq_for(iface: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data (a name and a union of plain data); all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= req.ifr_name.len() || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {iface:?}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    Ok(req)
}

/// The interface's index, MAC address and IPv4 address.
fn interface(iface: &str) -> io::Result<(libc::c_int, [u8; 6], Ipv4Addr)> {
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ioctl = |request: libc::c_ulong| -> io::Result<libc::ifreq> {
        let mut req = ifreq_for(iface)?;
        // SAFETY: these SIOCGIF* requests read the name and write the union of the ifreq we own.
        cvt(unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) })?;
        Ok(req)
    };
    let index = ioctl(libc::SIOCGIFINDEX)?;
    let hw = ioctl(libc::SIOCGIFHWADDR)?;
    let addr = ioctl(libc::SIOCGIFADDR)?;
    // SAFETY: SIOCGIFINDEX filled in the ifindex member.
    let index = unsafe { index.ifr_ifru.ifru_ifindex };
    // SAFETY: SIOCGIFHWADDR filled in the hwaddr member, whose data starts with the MAC.
    let hw = unsafe { hw.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data) {
        *d = s.to_ne_bytes()[0];
    }
    // SAFETY: SIOCGIFADDR filled in the addr member with a sockaddr_in (AF_INET socket).
    let sin: libc::sockaddr_in = unsafe { std::mem::transmute_copy(&addr.ifr_ifru.ifru_addr) };
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok((index, mac, ip))
}

/// Waits up to `timeout` for the default gateway to answer ARP, asking every [`RETRY`].
pub fn await_gateway(timeout: Duration) -> io::Result<GatewayWait> {
    let started = Instant::now();
    let table = std::fs::read_to_string("/proc/net/route")?;
    let Some((iface, gateway)) = parse_default_route(&table) else {
        return Ok(GatewayWait {
            gateway: None,
            answered: false,
            waited_ms: 0,
        });
    };
    let (ifindex, mac, ip) = interface(&iface)
        .map_err(|e| io::Error::new(e.kind(), format!("interface {iface}: {e}")))?;
    let proto = u16::try_from(libc::ETH_P_ARP)
        .map_err(io::Error::other)?
        .to_be();
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    })?;
    // SAFETY: fd is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = u16::try_from(libc::AF_PACKET).map_err(io::Error::other)?;
    ll.sll_protocol = proto;
    ll.sll_ifindex = ifindex;
    let ll_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
        .map_err(io::Error::other)?;
    // SAFETY: ll is a valid sockaddr_ll of ll_len bytes.
    cvt(unsafe { libc::bind(sock.as_raw_fd(), (&raw const ll).cast(), ll_len) })?;
    let mut to = ll;
    to.sll_halen = 6;
    to.sll_addr[..6].fill(0xff);
    let request = arp_request(mac, ip, gateway);
    let mut buf = [0u8; 1500];
    loop {
        // SAFETY: request and `to` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const to).cast(),
                ll_len,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let next = Instant::now() + RETRY;
        loop {
            let now = Instant::now();
            let waited = now.duration_since(started);
            if waited >= timeout {
                return Ok(GatewayWait {
                    gateway: Some(gateway),
                    answered: false,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                });
            }
            let wait = next
                .saturating_duration_since(now)
                .min(timeout - waited)
                .max(Duration::from_millis(1));
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one pollfd that we own.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                if Instant::now() >= next {
                    break;
                }
                continue;
            }
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if let Ok(n) = usize::try_from(n)
                && is_reply_from(&buf[..n], gateway)
            {
                return Ok(GatewayWait {
                    gateway: Some(gateway),
                    answered: true,
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";

    #[test]
    fn default_route_is_found_with_its_gateway_in_network_order() {
        assert_eq!(
            parse_default_route(ROUTES),
            Some(("eth0".to_owned(), Ipv4Addr::new(10, 0, 2, 2)))
        );
    }

    #[test]
    fn no_default_route_when_only_link_routes_or_down() {
        let header = ROUTES.lines().next().unwrap();
        let link_only = format!("{header}\n{}\n", ROUTES.lines().nth(1).unwrap());
        assert_eq!(parse_default_route(&link_only), None);
        let down = ROUTES.replace("\t0003\t", "\t0002\t");
        assert_eq!(parse_default_route(&down), None);
        assert_eq!(parse_default_route(""), None);
    }

    #[test]
    fn arp_request_layout_and_reply_matching() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let me = Ipv4Addr::new(10, 0, 2, 15);
        let gw = Ipv4Addr::new(10, 0, 2, 2);
        let req = arp_request(mac, me, gw);
        assert_eq!(&req[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&req[8..14], &mac);
        assert_eq!(&req[14..18], &me.octets());
        assert_eq!(&req[18..24], &[0; 6]);
        assert_eq!(&req[24..28], &gw.octets());
        // The request itself is not a reply.
        assert!(!is_reply_from(&req, gw));
        // A reply: operation 2, the gateway as sender.
        let mut reply = req;
        reply[6..8].copy_from_slice(&2u16.to_be_bytes());
        reply[8..14].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        reply[14..18].copy_from_slice(&gw.octets());
        reply[18..24].copy_from_slice(&mac);
        reply[24..28].copy_from_slice(&me.octets());
        assert!(is_reply_from(&reply, gw));
        assert!(!is_reply_from(&reply, Ipv4Addr::new(10, 0, 2, 3)));
        assert!(!is_reply_from(&reply[..20], gw));
    }
}
