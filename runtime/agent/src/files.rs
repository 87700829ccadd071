//! File operations on the guest's filesystem, run as the agent's user (root in a guest).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use specc_protocol::{
    DirEntry, ErrorInfo, ErrorKind, FileKind, FileStat, MAX_CHUNK, Response, WriteFileRequest,
};

use crate::conn::Outbox;

const DIR_BATCH: usize = 512;

fn absolute(path: &str) -> Result<&Path, ErrorInfo> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(ErrorInfo::new(
            ErrorKind::InvalidInput,
            format!("{path:?} is not an absolute path"),
        ))
    }
}

fn io_err(what: &str, path: &Path) -> impl Fn(io::Error) -> ErrorInfo {
    let context = format!("{what} {}", path.display());
    move |e| ErrorInfo::from_io(&context, &e)
}

fn stat_of(meta: &fs::Metadata, path: &Path) -> FileStat {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
        symlink_target: (kind == FileKind::Symlink)
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

/// Streams `len` bytes (or the rest) of `path` from `offset` as `FileData` frames, then
/// `FileEnd`.
pub fn read_file(path: &str, offset: u64, len: Option<u64>, out: &Outbox) -> Result<(), ErrorInfo> {
    let p = absolute(path)?;
    let mut f = File::open(p).map_err(io_err("open", p))?;
    if offset > 0 {
        f.seek(SeekFrom::Start(offset)).map_err(io_err("seek", p))?;
    }
    let mut left = len.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK];
    while left > 0 {
        let want = usize::try_from(left.min(MAX_CHUNK as u64)).unwrap_or(MAX_CHUNK);
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ErrorInfo::from_io(&format!("read {path}"), &e)),
        };
        out.send(&Response::FileData {
            data: buf[..n].to_vec(),
        })
        .map_err(|e| ErrorInfo::new(ErrorKind::Io, format!("send: {e}")))?;
        sent += n as u64;
        left -= n as u64;
    }
    out.send(&Response::FileEnd { size: sent })
        .map_err(|e| ErrorInfo::new(ErrorKind::Io, format!("send: {e}")))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written: opened at the `WriteFile` header, fed by `WriteData`, committed at
/// `WriteEnd`. The first failure is kept and reported at the end, after the host has sent
/// everything, so the stream stays in step.
#[derive(Debug)]
pub struct Writer {
    req: WriteFileRequest,
    target: PathBuf,
    tmp: Option<PathBuf>,
    file: Option<File>,
    err: Option<ErrorInfo>,
}

impl Writer {
    /// Opens the target (append) or a temporary file beside it (replace).
    pub fn open(req: WriteFileRequest) -> Self {
        let mut w = Writer {
            target: PathBuf::from(&req.path),
            req,
            tmp: None,
            file: None,
            err: None,
        };
        if let Err(e) = w.try_open() {
            w.err = Some(e);
        }
        w
    }

    fn try_open(&mut self) -> Result<(), ErrorInfo> {
        let target = absolute(&self.req.path)?.to_owned();
        let parent = target.parent().unwrap_or(Path::new("/")).to_owned();
        if self.req.create_parents {
            fs::create_dir_all(&parent).map_err(io_err("create parents of", &target))?;
        }
        let mode = self.req.mode & 0o7777;
        let (path, file) = if self.req.append {
            let f = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(mode)
                .open(&target)
                .map_err(io_err("open", &target))?;
            (target.clone(), f)
        } else {
            let name = target
                .file_name()
                .ok_or_else(|| ErrorInfo::new(ErrorKind::InvalidInput, "path has no file name"))?;
            let tmp = parent.join(format!(
                ".{}.specc-tmp-{}-{}",
                name.to_string_lossy(),
                std::process::id(),
                TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            self.tmp = Some(tmp.clone());
            (tmp, f)
        };
        // Exact mode, whatever the umask did.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &path))?;
        if self.req.uid.is_some() || self.req.gid.is_some() {
            std::os::unix::fs::fchown(&file, self.req.uid, self.req.gid)
                .map_err(io_err("chown", &path))?;
        }
        self.file = Some(file);
        Ok(())
    }

    /// Appends a chunk.
    pub fn data(&mut self, data: &[u8]) {
        if self.err.is_some() {
            return;
        }
        if let Some(f) = self.file.as_mut()
            && let Err(e) = f.write_all(data)
        {
            self.err = Some(ErrorInfo::from_io(&format!("write {}", self.req.path), &e));
        }
    }

    /// Commits the file (rename over the target in replace mode).
    pub fn finish(mut self) -> Result<(), ErrorInfo> {
        if let Some(e) = self.err.take() {
            self.abort();
            return Err(e);
        }
        self.file = None;
        if let Some(tmp) = self.tmp.take()
            && let Err(e) = fs::rename(&tmp, &self.target)
        {
            let _ = fs::remove_file(&tmp);
            return Err(ErrorInfo::from_io(
                &format!("rename to {}", self.req.path),
                &e,
            ));
        }
        Ok(())
    }

    /// Drops the temporary file; the target is untouched.
    pub fn abort(mut self) {
        self.file = None;
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Streams the entries of a directory in `DirEntries` batches, then `DirEnd`.
pub fn list_dir(path: &str, out: &Outbox) -> Result<(), ErrorInfo> {
    let p = absolute(path)?;
    let rd = fs::read_dir(p).map_err(io_err("list", p))?;
    let mut batch = Vec::with_capacity(DIR_BATCH);
    let send = |entries: Vec<DirEntry>| {
        out.send(&Response::DirEntries { entries })
            .map_err(|e| ErrorInfo::new(ErrorKind::Io, format!("send: {e}")))
    };
    for entry in rd {
        let entry = entry.map_err(io_err("list", p))?;
        let full = entry.path();
        // An entry removed while listing is skipped, not an error of the whole listing.
        let Ok(meta) = fs::symlink_metadata(&full) else {
            continue;
        };
        batch.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            stat: stat_of(&meta, &full),
        });
        if batch.len() == DIR_BATCH {
            send(std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        send(batch)?;
    }
    out.send(&Response::DirEnd)
        .map_err(|e| ErrorInfo::new(ErrorKind::Io, format!("send: {e}")))
}

/// Metadata of `path`.
pub fn stat(path: &str, follow_symlinks: bool) -> Result<FileStat, ErrorInfo> {
    let p = absolute(path)?;
    let meta = if follow_symlinks {
        fs::metadata(p)
    } else {
        fs::symlink_metadata(p)
    }
    .map_err(io_err("stat", p))?;
    Ok(stat_of(&meta, p))
}

/// `mkdir` (`-p` with `parents`), setting exactly `mode` on a directory it creates.
pub fn mkdir(path: &str, mode: u32, parents: bool) -> Result<(), ErrorInfo> {
    let p = absolute(path)?;
    let existed = p.is_dir();
    if parents {
        fs::create_dir_all(p).map_err(io_err("mkdir -p", p))?;
    } else {
        fs::create_dir(p).map_err(io_err("mkdir", p))?;
    }
    if !existed {
        fs::set_permissions(p, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(io_err("chmod", p))?;
    }
    Ok(())
}

/// Removes a file, symlink or empty directory; with `recursive`, a whole tree (symlinks are
/// removed, never followed).
pub fn remove(path: &str, recursive: bool) -> Result<(), ErrorInfo> {
    let p = absolute(path)?;
    if p == Path::new("/") {
        return Err(ErrorInfo::new(
            ErrorKind::InvalidInput,
            "refusing to remove /",
        ));
    }
    let meta = fs::symlink_metadata(p).map_err(io_err("stat", p))?;
    if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(p).map_err(io_err("remove", p))
        } else {
            fs::remove_dir(p).map_err(io_err("rmdir", p))
        }
    } else {
        fs::remove_file(p).map_err(io_err("remove", p))
    }
}
