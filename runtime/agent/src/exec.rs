//! Running processes: fork/exec by hand, one reaper for every child, streaming output.
//!
//! Architecture invariant: the agent never uses `std::process`. As PID 1 it must reap every
//! orphan with `waitpid(-1)`, and std's `Command::spawn` reaps a child whose exec failed itself
//! (asserting that it succeeds), which races with a global reaper. So the agent forks and execs
//! with raw system calls, and exactly one thread ([`start_reaper`]) ever waits for children;
//! it hands each exit status to whoever registered that pid.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use specc_protocol::{ErrorInfo, ErrorKind, ExecRequest, ExitStatus, MAX_CHUNK, PtySize, Response};

use crate::conn::Outbox;
use crate::log::log;
use crate::users;

/// Default `PATH` for processes whose request does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the main process exits, output still arriving is forwarded until the pipes have been
/// quiet this long: a background process that keeps the pipe open must not hold the exec.
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(100);
/// ...and for at most this long in total, for a background process that keeps writing.
const MAX_DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Errors of spawning a process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A system call in the agent failed before the fork.
    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The child could not get ready to run the program.
    #[error("{stage} failed in the child")]
    Child {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SpawnError {
    fn info(&self) -> ErrorInfo {
        let (context, source) = match self {
            SpawnError::Sys { op, source } => (format!("exec: {op}"), source),
            SpawnError::Child { stage, source } => (format!("exec: {stage}"), source),
        };
        ErrorInfo::from_io(&context, source)
    }
}

struct Waiter {
    status: Mutex<Option<i32>>,
    notify_w: OwnedFd,
}

#[derive(Default)]
struct ReaperState {
    waiters: HashMap<i32, Arc<Waiter>>,
    /// Bumped by every fork, so the reaper never sleeps through a child born after its
    /// `waitpid` said ECHILD.
    generation: u64,
}

#[derive(Default)]
struct Reaper {
    state: Mutex<ReaperState>,
    cond: Condvar,
}

static REAPER: OnceLock<Arc<Reaper>> = OnceLock::new();

fn reaper() -> &'static Arc<Reaper> {
    REAPER.get_or_init(Default::default)
}

/// Starts the one thread that waits for children (and, as PID 1, every orphan).
pub fn start_reaper() {
    let r = reaper().clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reaper_loop(&r))
        .expect("spawning the reaper thread");
}

fn reaper_loop(r: &Reaper) {
    loop {
        let generation = r.state.lock().unwrap_or_else(|e| e.into_inner()).generation;
        let mut status = 0;
        // SAFETY: waitpid only writes the status integer we pass.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let waiter = r
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .waiters
                .remove(&pid);
            if let Some(w) = waiter {
                *w.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                let byte = [1u8];
                // SAFETY: writes one byte from a live buffer to a pipe fd the waiter owns. It
                // cannot block (one byte per waiter, pipes hold 64 KiB).
                unsafe {
                    libc::write(w.notify_w.as_raw_fd(), byte.as_ptr().cast(), 1);
                }
            }
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::ECHILD) => {
                let st = r.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.generation == generation {
                    // The timeout covers orphans re-parented to PID 1, which bump nothing.
                    let _ = r.cond.wait_timeout(st, Duration::from_secs(1));
                }
            }
            _ => {
                log!("waitpid failed: {err}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn cstring(s: impl AsRef<[u8]>, what: &str) -> Result<CString, ErrorInfo> {
    CString::new(s.as_ref().to_vec()).map_err(|_| {
        ErrorInfo::new(
            ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(SpawnError::Sys {
            op: "pipe2",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Finds `prog` in `path` like `execvp` would, but in the parent, so a missing program is a
/// clear error rather than an exit code 127.
fn find_program(prog: &str, path: &str, cwd: &Path) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog));
    }
    path.split(':').find_map(|dir| {
        let dir = if dir.is_empty() { cwd } else { Path::new(dir) };
        let cand = dir.join(prog);
        let meta = std::fs::metadata(&cand).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(cand)
    })
}

/// Builds the environment: defaults from the account, then the request's entries, later ones
/// replacing earlier ones with the same name.
fn environment(account: &users::Account, req_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), account.home.clone()),
        ("USER".into(), account.name.clone()),
        ("LOGNAME".into(), account.name.clone()),
        ("SHELL".into(), account.shell.clone()),
    ];
    for (k, v) in req_env {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// A spawned child, before its output is pumped.
struct Child {
    pid: i32,
    waiter: Arc<Waiter>,
    notify_r: OwnedFd,
    stdout: OwnedFd,
    /// None on a pty, where stderr is the terminal too.
    stderr: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    /// The pty master, for resizing.
    pty: Option<OwnedFd>,
}

/// Everything the child needs, prepared before `fork` because the child of a multithreaded
/// process may only make async-signal-safe calls (no allocation).
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    switch_user: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    pty: Option<PtySize>,
}

const STAGES: [&str; 8] = [
    "setsid",
    "dup2",
    "setgroups",
    "setgid",
    "setuid",
    "chdir",
    "execve",
    "TIOCSCTTY",
];

fn prepare(req: &ExecRequest, etc: &Path) -> Result<Prepared, ErrorInfo> {
    let Some(argv0) = req.argv.first() else {
        return Err(ErrorInfo::new(ErrorKind::InvalidInput, "exec: empty argv"));
    };
    let account = users::resolve(etc, req.user.as_ref())
        .map_err(|e| ErrorInfo::new(ErrorKind::InvalidInput, format!("exec: {e}")))?;
    let mut env = environment(&account, &req.env);
    if req.pty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    let cwd = match &req.cwd {
        Some(c) => PathBuf::from(c),
        None if Path::new(&account.home).is_dir() => PathBuf::from(&account.home),
        None => PathBuf::from("/"),
    };
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = find_program(argv0, path_var, &cwd).ok_or_else(|| {
        ErrorInfo::new(
            ErrorKind::NotFound,
            format!("exec: {argv0}: command not found in PATH={path_var}"),
        )
    })?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let switch_user = if req.user.is_none() && euid == account.uid {
        None
    } else {
        Some((account.uid, account.gid, account.groups.clone()))
    };
    Ok(Prepared {
        program: cstring(program.as_os_str().as_bytes(), "program path")?,
        argv: req
            .argv
            .iter()
            .map(|a| cstring(a, "argument"))
            .collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}"), "environment"))
            .collect::<Result<_, _>>()?,
        cwd: cstring(cwd.as_os_str().as_bytes(), "cwd")?,
        switch_user,
        pty: req.pty,
    })
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, SpawnError> {
    fd.try_clone()
        .map_err(|source| SpawnError::Sys { op: "dup", source })
}

/// A new pseudo-terminal (master, slave), both close-on-exec.
fn openpty(size: PtySize) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let (mut master, mut slave) = (0 as RawFd, 0 as RawFd);
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds; the name buffer is NULL and termios NULL (defaults).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(SpawnError::Sys {
            op: "openpty",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: both fds were just created by openpty and belong to nobody else.
    let fds = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&fds.0, &fds.1] {
        // SAFETY: F_SETFD on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(fds)
}

fn spawn(p: &Prepared, pipe_stdin: bool) -> Result<Child, SpawnError> {
    if let Some(size) = p.pty {
        let (master, slave) = openpty(size)?;
        let stdin = if pipe_stdin {
            Some(dup(&master)?)
        } else {
            None
        };
        let stdio = [dup(&slave)?, dup(&slave)?, slave];
        return spawn_with(p, stdio, dup(&master)?, None, stdin, Some(master));
    }
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (stdin_r, stdin_w) = if pipe_stdin {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        let null = File::open("/dev/null").map_err(|source| SpawnError::Sys {
            op: "open /dev/null",
            source,
        })?;
        (OwnedFd::from(null), None)
    };
    spawn_with(
        p,
        [stdin_r, out_w, err_w],
        out_r,
        Some(err_r),
        stdin_w,
        None,
    )
}

fn spawn_with(
    p: &Prepared,
    stdio: [OwnedFd; 3],
    out_r: OwnedFd,
    err_r: Option<OwnedFd>,
    stdin_w: Option<OwnedFd>,
    pty: Option<OwnedFd>,
) -> Result<Child, SpawnError> {
    let (report_r, report_w) = pipe()?;
    let (notify_r, notify_w) = pipe()?;

    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = p.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let groups: &[libc::gid_t] = p.switch_user.as_ref().map_or(&[], |s| &s.2);

    let r = reaper();
    let mut st = r.state.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the child only makes async-signal-safe system calls on data prepared above and
    // then execs or _exits; it never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the child; see child_after_fork.
        unsafe {
            child_after_fork(
                p,
                &argv,
                &envp,
                groups,
                [
                    stdio[0].as_raw_fd(),
                    stdio[1].as_raw_fd(),
                    stdio[2].as_raw_fd(),
                ],
                report_w.as_raw_fd(),
            )
        }
    }
    if pid < 0 {
        return Err(SpawnError::Sys {
            op: "fork",
            source: io::Error::last_os_error(),
        });
    }
    let waiter = Arc::new(Waiter {
        status: Mutex::new(None),
        notify_w,
    });
    st.waiters.insert(pid, waiter.clone());
    st.generation += 1;
    drop(st);
    r.cond.notify_all();

    drop((stdio, report_w));
    let mut report = Vec::new();
    let _ = File::from(report_r).read_to_end(&mut report);
    if let Some(bytes) = report.first_chunk::<5>() {
        let stage = STAGES.get(usize::from(bytes[0])).copied().unwrap_or("exec");
        let errno = i32::from_ne_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        // The child has _exited; the reaper collects it and nobody needs its status.
        r.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiters
            .remove(&pid);
        return Err(SpawnError::Child {
            stage,
            source: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(Child {
        pid,
        waiter,
        notify_r,
        stdout: out_r,
        stderr: err_r,
        stdin: stdin_w,
        pty,
    })
}

/// The child side of `fork`.
///
/// # Safety
/// Must only be called in a freshly forked child. Never returns.
unsafe fn child_after_fork(
    p: &Prepared,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    groups: &[libc::gid_t],
    stdio: [RawFd; 3],
    report: RawFd,
) -> ! {
    let fail = |stage: u8| -> ! {
        // SAFETY: __errno_location, write and _exit are async-signal-safe; the buffer is ours.
        unsafe {
            let errno = *libc::__errno_location();
            let e = errno.to_ne_bytes();
            let msg = [stage, e[0], e[1], e[2], e[3]];
            libc::write(report, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: plain system calls on fds and pointers prepared by the parent before the fork;
    // all of them are async-signal-safe.
    unsafe {
        // Rust ignores SIGPIPE in the agent; a child must get the default back.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::setsid() < 0 {
            fail(0);
        }
        // On a pty, the terminal (already on fd 0 after dup2 below) becomes the session's
        // controlling tty; do it on the slave fd itself, before the dup2s.
        if p.pty.is_some() && libc::ioctl(stdio[0], libc::TIOCSCTTY, 0) < 0 {
            fail(7);
        }
        for (target, fd) in stdio.iter().enumerate() {
            #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
            let target = target as RawFd;
            if libc::dup2(*fd, target) < 0 {
                fail(1);
            }
        }
        if let Some((uid, gid, _)) = &p.switch_user {
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0 {
                fail(2);
            }
            if libc::setgid(*gid) < 0 {
                fail(3);
            }
            if libc::setuid(*uid) < 0 {
                fail(4);
            }
        }
        if libc::chdir(p.cwd.as_ptr()) < 0 {
            fail(5);
        }
        libc::execve(p.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(6)
    }
}

fn kill_group(pid: i32, signal: i32) {
    // SAFETY: kill has no memory preconditions; a negative pid addresses the process group the
    // child created with setsid.
    unsafe {
        libc::kill(-pid, signal);
    }
}

enum StdinMsg {
    Data(Vec<u8>),
    Eof,
}

/// A running exec, as its connection sees it.
pub struct Session {
    pid: i32,
    stdin: Option<Sender<StdinMsg>>,
    done: Arc<AtomicBool>,
    pty: Option<OwnedFd>,
}

impl Session {
    /// Whether `Exit` has been sent.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Forwards stdin bytes (dropped when stdin is not a pipe or already closed).
    pub fn stdin(&self, data: Vec<u8>) {
        if let Some(tx) = &self.stdin {
            let _ = tx.send(StdinMsg::Data(data));
        }
    }

    /// Closes the child's stdin once the bytes queued before are written.
    pub fn stdin_eof(&mut self) {
        if let Some(tx) = self.stdin.take() {
            let _ = tx.send(StdinMsg::Eof);
        }
    }

    /// Resizes the pty (a no-op without one); the kernel sends SIGWINCH to the foreground
    /// process group.
    pub fn resize(&self, size: PtySize) {
        if let Some(m) = &self.pty {
            let ws = libc::winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads the winsize we own from a pty master we own.
            unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }

    /// Signals the process group, unless the exec is over.
    pub fn kill(&self, signal: i32) {
        if !self.is_done() {
            kill_group(self.pid, signal);
        }
    }
}

/// Starts `req`: sends `ExecStarted` (or returns the error to send), then streams output and
/// `Exit` from a thread of its own.
pub fn start(req: &ExecRequest, etc: &Path, out: &Outbox) -> Result<Session, ErrorInfo> {
    let prepared = prepare(req, etc)?;
    let child = spawn(&prepared, req.stdin).map_err(|e| e.info())?;
    let pid = child.pid;
    let _ = out.send(&Response::ExecStarted { pid });
    let done = Arc::new(AtomicBool::new(false));
    let stdin = child.stdin.map(|fd| {
        let (tx, rx) = mpsc::channel::<StdinMsg>();
        // Unbounded on purpose: the host sends all of stdin before reading output, so the
        // agent must never stop reading the connection because a child is slow to read stdin.
        let on_pty = req.pty.is_some();
        std::thread::spawn(move || {
            let mut pipe = File::from(fd);
            loop {
                match rx.recv() {
                    Ok(StdinMsg::Data(d)) => {
                        if pipe.write_all(&d).is_err() {
                            // The child closed stdin: the rest is dropped with the receiver.
                            break;
                        }
                    }
                    // Closing a pty master would hang up the terminal; end of input on a
                    // terminal is the EOF character (^D) instead.
                    Ok(StdinMsg::Eof) if on_pty => {
                        let _ = pipe.write_all(&[4]);
                        break;
                    }
                    Ok(StdinMsg::Eof) | Err(_) => break,
                }
            }
        });
        tx
    });
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let out = out.clone();
    let pump_done = done.clone();
    let argv0 = req.argv[0].clone();
    std::thread::spawn(move || {
        let status = pump(
            pid,
            &child.waiter,
            child.notify_r,
            child.stdout,
            child.stderr,
            timeout,
            &out,
        );
        if status.timed_out {
            log!("exec {argv0} (pid {pid}) timed out and was killed");
        }
        pump_done.store(true, Ordering::Release);
        let _ = out.send(&Response::Exit(status));
    });
    Ok(Session {
        pid,
        stdin,
        done,
        pty: child.pty,
    })
}

fn decode_status(raw: i32) -> ExitStatus {
    if libc::WIFEXITED(raw) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(raw)),
            signal: None,
            timed_out: false,
        }
    } else {
        ExitStatus {
            code: None,
            signal: libc::WIFSIGNALED(raw).then(|| libc::WTERMSIG(raw)),
            timed_out: false,
        }
    }
}

fn poll_ms(d: Option<Duration>) -> i32 {
    match d {
        None => -1,
        Some(d) => i32::try_from(d.as_millis().saturating_add(1)).unwrap_or(i32::MAX),
    }
}

fn pump(
    pid: i32,
    waiter: &Waiter,
    notify: OwnedFd,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    timeout: Option<Duration>,
    out: &Outbox,
) -> ExitStatus {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut streams = [Some(File::from(stdout)), stderr.map(File::from)];
    let mut notify = File::from(notify);
    let mut exited: Option<i32> = None;
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut buf = vec![0u8; MAX_CHUNK.min(64 << 10)];
    loop {
        if exited.is_some() && streams.iter().all(Option::is_none) {
            break;
        }
        let now = Instant::now();
        let mut wait: Option<Duration> = None;
        if let (false, Some(d)) = (timed_out, deadline) {
            if now >= d {
                kill_group(pid, libc::SIGKILL);
                timed_out = true;
                continue;
            }
            wait = Some(d - now);
        }
        if let Some(at) = exited_at {
            if now >= at + MAX_DRAIN_AFTER_EXIT {
                break;
            }
            wait = Some(wait.map_or(QUIET_AFTER_EXIT, |w| w.min(QUIET_AFTER_EXIT)));
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut which: Vec<usize> = Vec::with_capacity(3);
        for (i, s) in streams.iter().enumerate() {
            if let Some(f) = s {
                fds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        if exited.is_none() {
            fds.push(libc::pollfd {
                fd: notify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            which.push(2);
        }
        // SAFETY: fds points to fds.len() initialised pollfd structs that outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, poll_ms(wait)) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log!("poll failed: {e}");
            kill_group(pid, libc::SIGKILL);
            break;
        }
        if n == 0 {
            if exited.is_some() {
                break;
            }
            continue;
        }
        for (pfd, &idx) in fds.iter().zip(&which) {
            if pfd.revents == 0 {
                continue;
            }
            if idx == 2 {
                let mut b = [0u8; 1];
                let _ = notify.read(&mut b);
                let st = *waiter.status.lock().unwrap_or_else(|e| e.into_inner());
                if st.is_some() {
                    exited = st;
                    exited_at = Some(Instant::now());
                }
                continue;
            }
            let Some(f) = streams[idx].as_mut() else {
                continue;
            };
            match f.read(&mut buf) {
                Ok(0) => streams[idx] = None,
                Ok(k) => {
                    let data = buf[..k].to_vec();
                    let msg = if idx == 0 {
                        Response::Stdout { data }
                    } else {
                        Response::Stderr { data }
                    };
                    if out.send(&msg).is_err() {
                        // The host is gone: nobody will see the output, stop the work.
                        kill_group(pid, libc::SIGKILL);
                        streams = [None, None];
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => streams[idx] = None,
            }
        }
    }
    if exited.is_none() {
        // Only reached when poll failed or the host vanished: wait for the killed child so the
        // status is real.
        loop {
            if let Some(st) = *waiter.status.lock().unwrap_or_else(|e| e.into_inner()) {
                exited = Some(st);
                break;
            }
            let mut b = [0u8; 1];
            if notify.read(&mut b).unwrap_or(0) == 0 {
                break;
            }
        }
    }
    let mut status = exited.map_or(
        ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
            timed_out: false,
        },
        decode_status,
    );
    status.timed_out = timed_out;
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_request_entries_override_defaults_in_place() {
        let acct = users::Account {
            name: "dev".into(),
            uid: 1,
            gid: 1,
            groups: vec![1],
            home: "/home/dev".into(),
            shell: "/bin/sh".into(),
        };
        let env = environment(
            &acct,
            &[("PATH".into(), "/x".into()), ("FOO".into(), "1".into())],
        );
        assert_eq!(env[0], ("PATH".into(), "/x".into()));
        assert_eq!(env.last().unwrap(), &("FOO".to_string(), "1".to_string()));
        assert!(env.contains(&("HOME".into(), "/home/dev".into())));
    }

    #[test]
    fn find_program_searches_path_and_skips_non_executables() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("tool");
        std::fs::write(&plain, "x").unwrap();
        let bin = tempfile::tempdir().unwrap();
        let exe = bin.path().join("tool");
        std::fs::write(&exe, "x").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", dir.path().display(), bin.path().display());
        assert_eq!(find_program("tool", &path, Path::new("/")), Some(exe));
        assert_eq!(find_program("absent", &path, Path::new("/")), None);
        assert_eq!(
            find_program("./rel", &path, Path::new("/")),
            Some(PathBuf::from("./rel"))
        );
    }

    #[test]
    fn decode_status_reads_codes_and_signals() {
        assert_eq!(decode_status(3 << 8).code, Some(3));
        assert_eq!(decode_status(9).signal, Some(9));
    }
}
