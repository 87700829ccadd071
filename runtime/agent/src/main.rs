//! The in-guest agent: PID 1 or a systemd service, serving exec and files over vsock.
//!
//! ```text
//! specc-agent [--listen vsock[:PORT] | --listen unix:PATH]... [--etc DIR] [--no-set-clock]
//! ```
//! Without `--listen` it listens on vsock port 1024. As PID 1 it first mounts the API
//! filesystems, opens the console, sets the hostname and brings up `lo`; unknown arguments
//! (the kernel passes stray command-line words to init) are logged and ignored there.

mod conn;
mod exec;
mod files;
mod forward;
mod gateway;
mod identity;
mod init;
mod log;
mod users;
mod vsock;

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::conn::Ctx;
use crate::identity::IdentityConfig;
use crate::log::log;

const USAGE: &str = "usage: specc-agent [--listen vsock[:PORT] | unix:PATH | serial:PATH | virtio-port:NAME]... \
[--etc DIR] [--no-set-clock] [--version]";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    Vsock(u32),
    Unix(PathBuf),
    /// A virtio-serial port (or any character device): one connection at a time.
    Serial(PathBuf),
    /// The virtio-serial port with this name (`/sys/class/virtio-ports/*/name`), wherever the
    /// kernel numbered it.
    VirtioPort(String),
}

#[derive(Debug)]
struct Args {
    listen: Vec<Listen>,
    etc: PathBuf,
    set_clock: bool,
}

fn parse_listen(s: &str) -> anyhow::Result<Listen> {
    if s == "vsock" {
        return Ok(Listen::Vsock(specc_protocol::AGENT_VSOCK_PORT));
    }
    if let Some(port) = s.strip_prefix("vsock:") {
        return Ok(Listen::Vsock(port.parse().context("vsock port")?));
    }
    if let Some(path) = s.strip_prefix("unix:") {
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(path) = s.strip_prefix("serial:") {
        return Ok(Listen::Serial(PathBuf::from(path)));
    }
    if let Some(name) = s.strip_prefix("virtio-port:") {
        return Ok(Listen::VirtioPort(name.to_owned()));
    }
    bail!("--listen takes vsock[:PORT], unix:PATH or serial:PATH, not {s:?}")
}

/// Parses the arguments. `lenient` (PID 1) logs and skips what it does not understand.
/// `env_listen` (`$SPECC_AGENT_LISTEN`, comma-separated `--listen` values) applies when no
/// `--listen` is given: on a kernel command line `SPECC_AGENT_LISTEN=...` reaches init as an
/// environment variable, while words after `--` would collide with parameters a VMM appends.
fn parse_args(
    argv: &[String],
    lenient: bool,
    env_listen: Option<&str>,
) -> anyhow::Result<Option<Args>> {
    let mut args = Args {
        listen: Vec::new(),
        etc: PathBuf::from("/etc"),
        set_clock: true,
    };
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let r: anyhow::Result<()> = (|| {
            match a.as_str() {
                "--listen" => args
                    .listen
                    .push(parse_listen(it.next().context("--listen needs a value")?)?),
                "--etc" => args.etc = PathBuf::from(it.next().context("--etc needs a value")?),
                "--no-set-clock" => args.set_clock = false,
                s if s.starts_with("--listen=") => args.listen.push(parse_listen(&s[9..])?),
                _ => bail!("unknown argument {a:?}"),
            }
            Ok(())
        })();
        match a.as_str() {
            "--version" => {
                println!("specc-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--help" | "-h" if !lenient => {
                println!("{USAGE}");
                return Ok(None);
            }
            _ => {}
        }
        if let Err(e) = r {
            if lenient {
                log!("ignoring argument: {e:#}");
            } else {
                bail!("{e:#}\n{USAGE}");
            }
        }
    }
    if args.listen.is_empty() {
        for l in env_listen
            .iter()
            .flat_map(|v| v.split(','))
            .filter(|v| !v.is_empty())
        {
            match parse_listen(l) {
                Ok(l) => args.listen.push(l),
                Err(e) if lenient => log!("ignoring SPECC_AGENT_LISTEN entry: {e:#}"),
                Err(e) => return Err(e),
            }
        }
    }
    if args.listen.is_empty() {
        args.listen
            .push(Listen::Vsock(specc_protocol::AGENT_VSOCK_PORT));
    }
    Ok(Some(args))
}

/// Makes sure fds 0-2 are open, so that no pipe or socket ever lands on them and is then
/// mistaken for a standard stream by a child.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: opening /dev/null with a static path; the fd is intentionally kept.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

/// Tells systemd (Type=notify) that the listeners are up.
fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = sent {
        log!("sd_notify failed: {e}");
    }
}

fn serve_connection(conn: std::fs::File, ctx: &Arc<Ctx>) {
    let ctx = ctx.clone();
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .spawn(move || {
            if let Err(e) = conn::serve(conn, &ctx) {
                log!("connection ended with an error: {e}");
            }
        });
    if let Err(e) = spawned {
        log!("cannot start a connection thread: {e}");
    }
}

fn accept_vsock(listener: &OwnedFd, ctx: &Arc<Ctx>) -> ! {
    loop {
        match vsock::accept(listener) {
            Ok(conn) => serve_connection(conn, ctx),
            Err(e) => {
                log!("vsock accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn accept_unix(listener: &UnixListener, ctx: &Arc<Ctx>) -> ! {
    loop {
        match listener.accept() {
            Ok((conn, _)) => serve_connection(std::fs::File::from(OwnedFd::from(conn)), ctx),
            Err(e) => {
                log!("unix accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Makes a tty port transparent (no echo, no line editing, no CR/LF translation).
fn make_raw(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: isatty only inspects the fd.
    if unsafe { libc::isatty(f.as_raw_fd()) } != 1 {
        return;
    }
    // SAFETY: termios is plain old data, filled by tcgetattr before use.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr/tcsetattr on an fd we own with a termios we own.
    unsafe {
        if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
}

/// The device node of the virtio-serial port named `name`, as udev would link it under
/// `/dev/virtio-ports/` (there is no udev under the agent).
fn virtio_port(name: &str) -> Option<PathBuf> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .filter_map(Result::ok)
        .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == name))
        .map(|e| PathBuf::from("/dev").join(e.file_name()))
}

/// Serves a serial port forever: one connection per open; the host side closing the port
/// ends it (reads return EOF) and the port is opened again for the next one.
fn serve_serial(what: &str, resolve: impl Fn() -> Option<PathBuf>, ctx: &Arc<Ctx>) -> ! {
    let mut attempt: u64 = 0;
    loop {
        let opened = resolve()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
            .and_then(|path| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
            });
        match opened {
            Ok(f) => {
                if attempt == 0 {
                    log!("serving on {what}");
                }
                make_raw(&f);
                let started = std::time::Instant::now();
                if let Err(e) = conn::serve(f, ctx) {
                    log!("serial connection ended with an error: {e}");
                }
                // A port without a host side reads EOF at once: do not spin on it.
                if started.elapsed() < Duration::from_millis(50) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                attempt = 1;
            }
            Err(e) => {
                if attempt.is_multiple_of(25) {
                    log!("{what} not available yet ({e}); retrying");
                }
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let pid1 = std::process::id() == 1;
    if pid1 {
        init::early();
    }
    ensure_std_fds();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let env_listen = std::env::var("SPECC_AGENT_LISTEN").ok();
    let args = match parse_args(&argv, pid1, env_listen.as_deref()) {
        Ok(Some(a)) => a,
        Ok(None) => return Ok(()),
        Err(e) => return Err(e),
    };
    exec::start_reaper();
    let ctx = Arc::new(Ctx {
        etc: PathBuf::from("/etc"),
        identity: IdentityConfig {
            etc: args.etc.clone(),
            set_clock: args.set_clock,
        },
        pid1,
    });

    // Unix listeners bind synchronously, so a test that waits for the socket file knows the
    // agent is up; vsock listeners retry in their own thread until the device appears.
    let mut threads = Vec::new();
    let mut pending_vsock = 0;
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<()>();
    for l in &args.listen {
        match l {
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path)
                    .with_context(|| format!("binding unix socket {}", path.display()))?;
                log!("listening on unix socket {}", path.display());
                let ctx = ctx.clone();
                threads.push(std::thread::spawn(move || accept_unix(&listener, &ctx)));
            }
            Listen::Serial(path) => {
                let (path, ctx) = (path.clone(), ctx.clone());
                let what = format!("serial port {}", path.display());
                threads.push(std::thread::spawn(move || {
                    serve_serial(&what, || Some(path.clone()), &ctx)
                }));
            }
            Listen::VirtioPort(name) => {
                let (name, ctx) = (name.clone(), ctx.clone());
                let what = format!("virtio port {name:?}");
                threads.push(std::thread::spawn(move || {
                    serve_serial(&what, || virtio_port(&name), &ctx)
                }));
            }
            Listen::Vsock(port) => {
                pending_vsock += 1;
                let (port, ctx, bound) = (*port, ctx.clone(), bound_tx.clone());
                threads.push(std::thread::spawn(move || {
                    let listener = vsock::bind_retrying(port);
                    let _ = bound.send(());
                    accept_vsock(&listener, &ctx)
                }));
            }
        }
    }
    if pending_vsock == 0 {
        sd_notify_ready();
    } else {
        // systemd waits for READY=1; send it once the first vsock bind worked.
        std::thread::spawn(move || {
            if bound_rx.recv().is_ok() {
                sd_notify_ready();
            }
        });
    }
    for t in threads {
        let _ = t.join();
    }
    if pid1 {
        // An init that returns panics the kernel; the listeners never end, but be sure.
        loop {
            std::thread::park();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parse_args_defaults_to_vsock_1024() {
        let a = parse_args(&[], false, None).unwrap().unwrap();
        assert_eq!(a.listen, vec![Listen::Vsock(1024)]);
        assert!(a.set_clock);
    }

    #[test]
    fn parse_args_takes_several_listeners() {
        let a = parse_args(
            &strings(&[
                "--listen",
                "unix:/tmp/a",
                "--listen=vsock:5000",
                "--listen",
                "serial:/dev/vport0p1",
                "--no-set-clock",
            ]),
            false,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            a.listen,
            vec![
                Listen::Unix("/tmp/a".into()),
                Listen::Vsock(5000),
                Listen::Serial("/dev/vport0p1".into())
            ]
        );
        assert!(!a.set_clock);
    }

    #[test]
    fn parse_args_rejects_unknown_unless_lenient() {
        assert!(parse_args(&strings(&["quiet"]), false, None).is_err());
        let a = parse_args(&strings(&["quiet", "--listen", "bogus"]), true, None)
            .unwrap()
            .unwrap();
        assert_eq!(a.listen, vec![Listen::Vsock(1024)]);
    }

    #[test]
    fn parse_args_takes_listeners_from_the_environment_unless_given() {
        let a = parse_args(&[], true, Some("serial:/dev/vport0p1,vsock:7"))
            .unwrap()
            .unwrap();
        assert_eq!(
            a.listen,
            vec![Listen::Serial("/dev/vport0p1".into()), Listen::Vsock(7)]
        );
        let a = parse_args(&strings(&["--listen", "vsock"]), true, Some("vsock:7"))
            .unwrap()
            .unwrap();
        assert_eq!(a.listen, vec![Listen::Vsock(1024)]);
    }
}
