//! The messages of protocol version 1: what the host sends ([`Request`]) and what the agent
//! answers ([`Response`]).
//!
//! Evolution rule: a new optional field gets `#[serde(default)]` and keeps the version; a new
//! request or response variant, a removed field or a changed meaning bumps
//! [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION). Unknown fields are ignored on purpose (no
//! `deny_unknown_fields`), so an older agent restored from an old snapshot still understands a
//! newer host that only added optional fields.

use serde::{Deserialize, Serialize};

/// A message from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Must be the first frame on every connection: the versions the host speaks.
    Hello {
        /// Lowest protocol version the host accepts.
        min_version: u32,
        /// Highest protocol version the host accepts.
        max_version: u32,
        /// Free text naming the client, for the agent's log.
        #[serde(default)]
        client: String,
    },
    /// Liveness probe: answered with [`Response::Pong`].
    Ping,
    /// Start a process. Answered with [`Response::ExecStarted`] (or an error), then the host may
    /// send [`Request::Stdin`], [`Request::StdinEof`] and [`Request::Kill`]; the agent streams
    /// [`Response::Stdout`] / [`Response::Stderr`] and ends with [`Response::Exit`].
    Exec(ExecRequest),
    /// Bytes for the running process's stdin (only between `ExecStarted` and `Exit`).
    Stdin {
        /// The bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// Closes the running process's stdin.
    StdinEof,
    /// Resizes the running process's pseudo-terminal (ignored without one).
    Resize(PtySize),
    /// Sends a signal to the running process's process group.
    Kill {
        /// Signal number (Linux numbering, e.g. 15 for SIGTERM).
        signal: i32,
    },
    /// Read a regular file. Answered with zero or more [`Response::FileData`] then
    /// [`Response::FileEnd`], or an error.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
        /// Byte offset to start at.
        #[serde(default)]
        offset: u64,
        /// At most this many bytes (all of the rest when absent).
        #[serde(default)]
        len: Option<u64>,
    },
    /// Write a regular file: this header, then [`Request::WriteData`] frames, then
    /// [`Request::WriteEnd`]; the agent answers [`Response::Ok`] or an error after `WriteEnd`.
    WriteFile(WriteFileRequest),
    /// A chunk of a file being written.
    WriteData {
        /// The bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// The end of a file being written.
    WriteEnd,
    /// Abandons the file being written instead of `WriteEnd`: a replaced file keeps its old
    /// content (bytes already appended in `append` mode stay). Answered with [`Response::Ok`].
    WriteAbort,
    /// List a directory: answered with [`Response::DirEntries`] batches then
    /// [`Response::DirEnd`], or an error.
    ListDir {
        /// Absolute path in the guest.
        path: String,
    },
    /// Metadata of one path: answered with [`Response::Stat`].
    Stat {
        /// Absolute path in the guest.
        path: String,
        /// Follow a final symlink (`stat`) instead of describing it (`lstat`).
        #[serde(default)]
        follow_symlinks: bool,
    },
    /// Create a directory: answered with [`Response::Ok`].
    Mkdir {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits, set exactly (no umask).
        #[serde(default = "default_dir_mode")]
        mode: u32,
        /// Create missing parents and accept an existing directory (`mkdir -p`).
        #[serde(default)]
        parents: bool,
    },
    /// Remove a path: answered with [`Response::Ok`].
    Remove {
        /// Absolute path in the guest.
        path: String,
        /// Remove directories with their contents (`rm -r`); without it only files, symlinks
        /// and empty directories are removed.
        #[serde(default)]
        recursive: bool,
    },
    /// The VM was just restored from a snapshot (or forked): take a new identity.
    Restored(RestoredRequest),
    /// Turn this connection into a raw byte pipe to a TCP port inside the guest (protocol 2).
    /// The agent connects to `127.0.0.1:port` (then `[::1]:port`) and answers
    /// [`Response::Ok`], after which every byte in either direction is the TCP stream's, with
    /// no framing, until either side closes; or it answers an error
    /// ([`ErrorKind::ConnectionRefused`] when nothing listens) and the connection stays a
    /// protocol connection.
    Connect {
        /// The guest's TCP port.
        port: u16,
    },
    /// Sync the filesystems and power the VM off. Answered with [`Response::Ok`] before the
    /// agent powers off.
    PowerOff,
    /// Sync the filesystems and reboot. Answered with [`Response::Ok`] first.
    Reboot,
}

fn default_dir_mode() -> u32 {
    0o755
}

fn default_file_mode() -> u32 {
    0o644
}

/// A user to run as: a name from the guest's `/etc/passwd`, or a numeric uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum User {
    /// A numeric uid; its primary group comes from `/etc/passwd` when the uid is listed there,
    /// otherwise gid = uid.
    Uid(u32),
    /// A user name from `/etc/passwd`.
    Name(String),
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` without a `/` is searched in the `PATH` of `env` (or the
    /// default `PATH`).
    pub argv: Vec<String>,
    /// Environment on top of the defaults (`PATH`, `HOME`, `USER`, `LOGNAME`, `SHELL` from the
    /// user's passwd entry). Nothing is inherited from the agent's own environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the user's home directory (or `/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as; root when absent.
    #[serde(default)]
    pub user: Option<User>,
    /// Whether the host will send stdin frames; when false stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group with SIGKILL after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Run on a new pseudo-terminal of this size instead of pipes: stdin, stdout and stderr
    /// are all the terminal (its controlling tty), everything comes back as `stdout`, and
    /// `TERM` defaults to `xterm-256color`.
    #[serde(default)]
    pub pty: Option<PtySize>,
}

/// Size of a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl ExecRequest {
    /// A request for `argv` as root, with defaults for everything else.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            stdin: false,
            timeout_ms: None,
            pty: None,
        }
    }
}

/// How a file is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits, set exactly (no umask).
    #[serde(default = "default_file_mode")]
    pub mode: u32,
    /// Create missing parent directories (mode 0755, owned by root).
    #[serde(default)]
    pub create_parents: bool,
    /// Append to an existing file instead of replacing it. Without it the file is written to a
    /// temporary name beside the target and renamed over it, so readers never see half a file.
    #[serde(default)]
    pub append: bool,
    /// Owner uid (root when absent).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Owner gid (root when absent).
    #[serde(default)]
    pub gid: Option<u32>,
}

impl WriteFileRequest {
    /// A replace-write of `path` with mode 0644, no parents, owned by root.
    pub fn new(path: impl Into<String>) -> Self {
        WriteFileRequest {
            path: path.into(),
            mode: default_file_mode(),
            create_parents: false,
            append: false,
            uid: None,
            gid: None,
        }
    }
}

/// The new identity of a restored or forked VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredRequest {
    /// The host's wall clock, nanoseconds since the Unix epoch, taken just before sending.
    pub unix_time_ns: u64,
    /// Fresh random bytes from the host, mixed into the guest kernel's pool and credited.
    #[serde(with = "crate::b64")]
    pub entropy: Vec<u8>,
    /// New hostname (`sethostname` and `/etc/hostname`), unchanged when absent.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New machine id: 32 lowercase hex digits (`/etc/machine-id`), unchanged when absent.
    #[serde(default)]
    pub machine_id: Option<String>,
    /// Before answering, wait up to this many milliseconds for the IPv4 default gateway to
    /// answer ARP: a restored VM talks to a new network backend that may still be starting,
    /// and a connection made before it answers fails once the guest's ARP gives up. No wait
    /// when absent. An agent that predates the field ignores it and answers without
    /// [`RestoredAck::gateway`].
    #[serde(default)]
    pub await_gateway_ms: Option<u32>,
}

/// A message from the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Hello`]: the chosen version and who the agent is.
    Hello(AgentInfo),
    /// Answer to [`Request::Ping`].
    Pong {
        /// Guest uptime (CLOCK_BOOTTIME) in nanoseconds.
        uptime_ns: u64,
    },
    /// The process of an [`Request::Exec`] is running.
    ExecStarted {
        /// Its pid in the guest (also its process group and session id).
        pid: i32,
    },
    /// Output the process wrote to stdout, in the order it was read.
    Stdout {
        /// The bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// Output the process wrote to stderr, in the order it was read.
    Stderr {
        /// The bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// The process ended; the last frame of an exec.
    Exit(ExitStatus),
    /// A chunk of a file being read.
    FileData {
        /// The bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// The end of a file being read.
    FileEnd {
        /// Total bytes sent in the `FileData` frames.
        size: u64,
    },
    /// Some entries of a directory being listed.
    DirEntries {
        /// The entries of this batch.
        entries: Vec<DirEntry>,
    },
    /// The end of a directory listing.
    DirEnd,
    /// Answer to [`Request::Stat`].
    Stat(FileStat),
    /// Answer to [`Request::Restored`].
    Restored(RestoredAck),
    /// Success of a request that returns nothing else.
    Ok,
    /// Failure of the current request. The connection stays usable.
    Error(ErrorInfo),
}

/// Who the agent is; sent in answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The protocol version chosen for this connection.
    pub version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// Whether the agent is the guest's PID 1.
    pub pid1: bool,
    /// The guest's current hostname.
    pub hostname: String,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when it exited normally.
    #[serde(default)]
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Whether the agent killed it because `timeout_ms` elapsed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// True for exit code 0 without a timeout.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// The kind of a filesystem object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (not a path). Names that are not UTF-8 are converted lossily.
    pub name: String,
    /// Metadata of the entry itself (symlinks are not followed).
    pub stat: FileStat,
}

/// Metadata of a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Kind.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch (negative before it).
    pub mtime_ns: i64,
    /// Target of a symlink (when `kind` is `Symlink`).
    #[serde(default)]
    pub symlink_target: Option<String>,
}

/// Answer to `Restored`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredAck {
    /// How far the guest's wall clock was stepped (host time minus old guest time), in ns.
    pub clock_step_ns: i64,
    /// How many entropy bytes were added to (and credited in) the kernel pool.
    pub entropy_bytes: u32,
    /// The outcome of [`RestoredRequest::await_gateway_ms`]; absent when no wait was asked for
    /// or the agent predates it.
    #[serde(default)]
    pub gateway: Option<GatewayWait>,
}

/// How the wait for the default gateway after a restore went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayWait {
    /// The IPv4 default route's gateway; `None` when the guest has no default route (then
    /// nothing was waited for).
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Whether the gateway answered ARP within the time asked for.
    pub answered: bool,
    /// How long the agent waited, in milliseconds.
    pub waited_ms: u64,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The path does not exist (ENOENT).
    NotFound,
    /// Permission denied (EACCES, EPERM).
    PermissionDenied,
    /// The path already exists (EEXIST).
    AlreadyExists,
    /// A bad argument: relative path, empty argv, unknown user, not a directory...
    InvalidInput,
    /// The frame could not be decoded or was not expected at this point.
    Protocol,
    /// No common protocol version.
    UnsupportedVersion,
    /// The request is understood but not supported here (e.g. power off outside a VM).
    Unsupported,
    /// Another I/O error; see `errno`.
    Io,
    /// Nothing listens on the guest port of a [`Request::Connect`] (ECONNREFUSED).
    ConnectionRefused,
}

/// A failure report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Category.
    pub kind: ErrorKind,
    /// Human-readable message.
    pub message: String,
    /// The Linux errno, when a system call failed.
    #[serde(default)]
    pub errno: Option<i32>,
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(errno) = self.errno {
            write!(f, " (errno {errno})")?;
        }
        Ok(())
    }
}

impl ErrorInfo {
    /// An error of `kind` with `message` and no errno.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorInfo {
            kind,
            message: message.into(),
            errno: None,
        }
    }

    /// Describes an I/O error, keeping its errno and mapping its kind.
    pub fn from_io(context: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::InvalidInput | K::NotADirectory | K::IsADirectory | K::DirectoryNotEmpty => {
                ErrorKind::InvalidInput
            }
            K::Unsupported => ErrorKind::Unsupported,
            K::ConnectionRefused => ErrorKind::ConnectionRefused,
            _ => ErrorKind::Io,
        };
        ErrorInfo {
            kind,
            message: format!("{context}: {err}"),
            errno: err.raw_os_error(),
        }
    }
}
