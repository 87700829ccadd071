//! PID 1 duties on busybox and scratch guests: the early mounts, the console, the hostname,
//! the loopback interface, and powering off. (Reaping is the reaper's job, in `exec`.)

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::log::log;

/// Errors of PID 1 set-up steps; each is logged and the agent carries on without that step.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// `mount(2)` failed.
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    /// Another system call failed.
    #[error("{op}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn sys(op: &'static str) -> impl Fn(io::Error) -> InitError {
    move |source| InitError::Sys { op, source }
}

fn mount(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
) -> Result<bool, InitError> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (
        CString::new(source).expect("static str"),
        CString::new(target).expect("static str"),
        CString::new(fstype).expect("static str"),
        CString::new(data).expect("static str"),
    );
    // SAFETY: all four pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc == 0 {
        return Ok(true);
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EBUSY) {
        // Already mounted (the kernel mounts devtmpfs itself with DEVTMPFS_MOUNT).
        return Ok(false);
    }
    Err(InitError::Mount {
        fstype,
        target,
        source,
    })
}

/// Points stdin, stdout and stderr at `/dev/console`, so the log goes to the serial port.
/// `SPECC_AGENT_CONSOLE=PATH` (an init environment variable; the kernel passes `key=value`
/// command-line words to init that way) sends the log to a file instead: the PID 1 test on a
/// host uses it to keep the host's console quiet.
fn console() -> Result<(), InitError> {
    let c = match std::env::var_os("SPECC_AGENT_CONSOLE").filter(|v| !v.is_empty()) {
        Some(path) => OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(sys("open $SPECC_AGENT_CONSOLE"))?,
        None => OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .map_err(sys("open /dev/console"))?,
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard fds; `c` stays open for the duration of the call.
        if unsafe { libc::dup2(c.as_raw_fd(), fd) } < 0 {
            return Err(InitError::Sys {
                op: "dup2 console",
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

fn remount_root_rw() -> Result<(), InitError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|t| t == "ro") {
        log!("root stays read-only (kernel command line says ro)");
        return Ok(());
    }
    let root = CString::new("/").expect("static");
    // SAFETY: a remount of / with valid strings; NULL source, fstype and data are allowed.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(InitError::Sys {
            op: "remount / read-write",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_hostname_from_etc() -> Result<String, InitError> {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "specc".to_owned());
    // SAFETY: sethostname reads len bytes of the string we own.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(InitError::Sys {
            op: "sethostname",
            source: io::Error::last_os_error(),
        });
    }
    Ok(name)
}

/// Brings up `lo`; the kernel then configures 127.0.0.1 and ::1 on it by itself.
fn loopback_up() -> Result<(), InitError> {
    // SAFETY: creates a socket used only as an ioctl handle.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills ifr_ifru.ifru_flags of the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(sys("SIOCGIFFLAGS lo")(io::Error::last_os_error()));
    }
    // SAFETY: the union member written by SIOCGIFFLAGS is ifru_flags.
    unsafe {
        #[allow(clippy::cast_possible_truncation)]
        {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(sys("SIOCSIFFLAGS lo")(io::Error::last_os_error()));
    }
    Ok(())
}

/// The early set-up of a PID 1 agent. Every step is logged; a failing step is reported and
/// skipped, because an init that exits panics the kernel.
pub fn early() {
    // Before anything else: /dev, so that the console can be opened and logs go somewhere.
    let dev = mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    let console_ok = console();
    log!("starting as PID 1 (version {})", env!("CARGO_PKG_VERSION"));
    if let Err(e) = dev {
        log!("{}", chain(&e));
    }
    if let Err(e) = console_ok {
        log!("{}", chain(&e));
    }
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    #[allow(clippy::type_complexity)]
    let steps: [(
        &'static str,
        &'static str,
        &'static str,
        libc::c_ulong,
        &'static str,
    ); 8] = [
        ("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, ""),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev | libc::MS_NOEXEC,
            "",
        ),
        (
            "mqueue",
            "/dev/mqueue",
            "mqueue",
            nosuid_nodev | libc::MS_NOEXEC,
            "",
        ),
    ];
    // `proc` first: the remount decision reads /proc/cmdline.
    for (i, (src, target, fstype, flags, data)) in steps.into_iter().enumerate() {
        let r = mount(src, target, fstype, flags, data);
        match r {
            Ok(true) => log!("mounted {fstype} on {target}"),
            Ok(false) => log!("{target} was already mounted"),
            Err(e) => log!("{}", chain(&e)),
        }
        if i == 0 {
            match remount_root_rw() {
                Ok(()) => log!("root filesystem is read-write"),
                Err(e) => log!("{}", chain(&e)),
            }
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    match set_hostname_from_etc() {
        Ok(name) => log!("hostname is {name}"),
        Err(e) => log!("{}", chain(&e)),
    }
    match loopback_up() {
        Ok(()) => log!("lo is up"),
        Err(e) => log!("{}", chain(&e)),
    }
}

/// Formats an error with its whole source chain on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What a `PowerOff` or `Reboot` request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Off,
    Reboot,
}

/// Carries out a power action. As PID 1: sync and `reboot(2)` (power off with ACPI, a reset
/// without). Under systemd: ask systemd
/// (SIGRTMIN+4 is poweroff.target, SIGRTMIN+5 reboot.target) so services stop cleanly.
/// Elsewhere (an agent on a unix socket for tests) the agent itself exits.
pub fn power(action: PowerAction, pid1: bool) -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if pid1 {
        // Without ACPI (a microVM) an x86 kernel cannot power off: RB_POWER_OFF would halt the
        // CPUs and leave the VMM running. A reset through the i8042 controller is what such
        // VMMs treat as the end of the VM (Firecracker's convention), so power off becomes a
        // reset there.
        let acpi = Path::new("/sys/firmware/acpi").exists();
        let cmd = match (action, acpi) {
            (PowerAction::Off, true) => {
                log!("sync done, powering off (ACPI)");
                libc::RB_POWER_OFF
            }
            (PowerAction::Off, false) => {
                log!("sync done, powering off through a reset (no ACPI)");
                libc::RB_AUTOBOOT
            }
            (PowerAction::Reboot, _) => {
                log!("sync done, rebooting");
                libc::RB_AUTOBOOT
            }
        };
        // SAFETY: reboot(2) with a valid command; on success it does not return.
        unsafe { libc::reboot(cmd) };
        log!("reboot(2) failed: {}", io::Error::last_os_error());
        // An init must never exit; wait for the host to kill the VM.
        loop {
            std::thread::park();
        }
    }
    if Path::new("/run/systemd/system").is_dir() {
        let sig = libc::SIGRTMIN()
            + match action {
                PowerAction::Off => 4,
                PowerAction::Reboot => 5,
            };
        log!(
            "asking systemd to {}",
            if action == PowerAction::Off {
                "power off"
            } else {
                "reboot"
            }
        );
        // SAFETY: kill has no memory preconditions.
        if unsafe { libc::kill(1, sig) } == 0 {
            loop {
                std::thread::park();
            }
        }
        log!("signalling systemd failed: {}", io::Error::last_os_error());
    }
    log!("not PID 1 and no systemd: the agent exits instead of powering off");
    std::process::exit(0)
}
