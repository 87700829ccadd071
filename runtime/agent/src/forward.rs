//! `connect`: a host connection becomes a raw byte pipe to a TCP port on the guest's loopback.
//!
//! One thread per direction, each a blocking copy loop: a pipe lives as long as its TCP
//! connection, and blocking copies are the simplest thing that keeps both directions
//! independent (a slow reader on one side never stalls the other direction).
//!
//! End of stream is carried as a half-close: EOF from the host shuts the TCP socket's write
//! side, EOF from the guest service shuts the host connection's write side, and the other
//! direction goes on until it ends too. A failure in either direction (a reset, a write to a
//! side that is gone) tears down both, so neither copy loop is left blocked.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use specc_protocol::ErrorInfo;

/// How long a loopback connect may take: only a service whose accept queue is full makes
/// it wait at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Copy buffer per direction.
const BUF_LEN: usize = 64 << 10;

/// Connects to `port` on IPv4 loopback, then on IPv6 loopback if nothing answered there
/// (a service bound to `[::1]` only). The error names the IPv4 attempt, which is what
/// nearly every service listens on.
pub fn connect(port: u16) -> Result<TcpStream, ErrorInfo> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let tcp = match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e4) => TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT)
            .map_err(|_| ErrorInfo::from_io(&format!("connect to {v4}"), &e4))?,
    };
    // The host side already decided how to batch its writes: do not add Nagle's delay.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// `shutdown(2)` on the host connection, which is a socket (vsock or unix) or, on a serial
/// port, not: there is no half-close to carry then, and ENOTSOCK is ignored.
fn shutdown_conn(conn: &File, how: Shutdown) {
    let how = match how {
        Shutdown::Read => libc::SHUT_RD,
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) on a descriptor owned by `conn`, which outlives the call.
    unsafe { libc::shutdown(conn.as_raw_fd(), how) };
}

/// Copies `from` to `to` until EOF (`Ok`) or an error on either side.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_LEN];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Pipes `conn` (the host connection, whose bytes up to here were `pending`: read ahead by
/// the frame reader after the `connect` request) and `tcp` both ways until both directions
/// have ended.
pub fn pipe(conn: File, pending: &[u8], tcp: TcpStream) -> io::Result<()> {
    let mut conn_rd = conn.try_clone()?;
    let mut tcp_wr = tcp.try_clone()?;
    let (conn_ctl, tcp_ctl) = (conn.try_clone()?, tcp.try_clone()?);
    let mut pending = pending.to_vec();
    let to_guest = std::thread::Builder::new()
        .name("fwd-in".into())
        .spawn(move || {
            let r = tcp_wr
                .write_all(&std::mem::take(&mut pending))
                .and_then(|()| copy(&mut conn_rd, &mut tcp_wr));
            match &r {
                Ok(()) => {
                    let _ = tcp_wr.shutdown(Shutdown::Write);
                }
                Err(_) => {
                    let _ = tcp_wr.shutdown(Shutdown::Both);
                    shutdown_conn(&conn_rd, Shutdown::Both);
                }
            }
            r
        })?;
    let (mut tcp_rd, mut conn_wr) = (tcp, conn);
    let from_guest = copy(&mut tcp_rd, &mut conn_wr);
    match &from_guest {
        Ok(()) => shutdown_conn(&conn_wr, Shutdown::Write),
        Err(_) => {
            let _ = tcp_ctl.shutdown(Shutdown::Both);
            shutdown_conn(&conn_ctl, Shutdown::Both);
        }
    }
    let to_guest = to_guest
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the forwarding thread panicked")));
    // A peer that reset the connection or closed it before reading everything is the normal
    // end of many TCP conversations: not worth an error in the agent's log.
    let benign = |r: io::Result<()>| match r {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::NotConnected
            ) =>
        {
            Ok(())
        }
        r => r,
    };
    benign(from_guest).and(benign(to_guest))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn listener() -> (TcpListener, u16) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    /// A unix socket pair standing in for the vsock connection: the agent's end as the
    /// `File` the accept loop hands over, and the host's end.
    fn conn_pair() -> (File, UnixStream) {
        let (agent, host) = UnixStream::pair().unwrap();
        (File::from(OwnedFd::from(agent)), host)
    }

    #[test]
    fn connect_to_a_port_nobody_listens_on_is_connection_refused() {
        let (l, port) = listener();
        drop(l);
        let e = connect(port).unwrap_err();
        assert_eq!(e.kind, specc_protocol::ErrorKind::ConnectionRefused, "{e}");
        assert_eq!(e.errno, Some(libc::ECONNREFUSED));
        assert!(e.message.contains(&format!("127.0.0.1:{port}")), "{e}");
    }

    #[test]
    fn connect_falls_back_to_ipv6_loopback() {
        let Ok(l) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) else {
            panic!("this test needs IPv6 on lo (::1)");
        };
        let port = l.local_addr().unwrap().port();
        let _tcp = connect(port).unwrap();
        let (_, peer) = l.accept().unwrap();
        assert!(peer.is_ipv6(), "{peer}");
    }

    #[test]
    fn pipe_carries_bytes_both_ways_and_half_closes_each_direction() {
        let (l, port) = listener();
        let service = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"greeting\n").unwrap();
            // Read the whole request (to the host's half-close), then answer after it.
            let mut req = Vec::new();
            s.read_to_end(&mut req).unwrap();
            s.write_all(&req.to_ascii_uppercase()).unwrap();
            req
        });
        let (conn, mut host) = conn_pair();
        let tcp = connect(port).unwrap();
        let agent = std::thread::spawn(move || pipe(conn, b"read ahead, ", tcp));

        let mut greeting = [0u8; 9];
        host.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"greeting\n");
        // A megabyte, more than any socket buffer on the way holds, so both copy loops block
        // and resume.
        let body: Vec<u8> = (0..1u32 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        host.write_all(&body).unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        host.read_to_end(&mut answer).unwrap();

        let mut expected = b"read ahead, ".to_vec();
        expected.extend_from_slice(&body);
        assert_eq!(service.join().unwrap(), expected);
        assert_eq!(answer.len(), expected.len());
        assert!(answer == expected.to_ascii_uppercase(), "answer differs");
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn pipe_ends_when_the_service_closes_and_the_host_hangs_up() {
        let (l, port) = listener();
        let service = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"bye\n").unwrap();
        });
        let (conn, mut host) = conn_pair();
        let tcp = connect(port).unwrap();
        let agent = std::thread::spawn(move || pipe(conn, &[], tcp));
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye\n");
        service.join().unwrap();
        drop(host);
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn pipe_tears_down_the_service_side_when_the_host_vanishes() {
        let (l, port) = listener();
        let (conn, host) = conn_pair();
        let tcp = connect(port).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let agent = std::thread::spawn(move || pipe(conn, &[], tcp));
        drop(host);
        // The host's EOF reaches the service as EOF; the service's answer then finds nobody,
        // which ends the other direction too.
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty());
        let _ = s.write_all(b"too late\n");
        drop(s);
        agent.join().unwrap().unwrap();
    }
}
