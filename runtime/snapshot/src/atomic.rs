//! Files that appear complete or not at all: written under a temporary name in the target's
//! directory, synced, renamed over the target, and the directory synced.
//!
//! Besides crash safety this matters for memory files: a running VM restored from `mem` still
//! maps `mem`'s inode, so rewriting it in place would change the guest's unfaulted pages under
//! it, while a rename leaves that inode alive for the mapping.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary file that becomes `dest` on [`AtomicFile::commit`] and is removed if dropped
/// before.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl AtomicFile {
    pub(crate) fn create(dest: &Path) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = dest.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name")
        })?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".tmp.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        Ok(Self {
            file,
            tmp,
            dest: dest.to_path_buf(),
            dir,
            committed: false,
        })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Syncs the data, renames the file into place and syncs the directory entry.
    pub(crate) fn commit(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.dest)?;
        self.committed = true;
        File::open(&self.dir)?.sync_all()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the name is ours alone; a leftover is harmless but untidy.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn dropped_file_leaves_nothing_and_committed_file_replaces_dest() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        std::fs::write(&dest, b"old").unwrap();
        let mut a = AtomicFile::create(&dest).unwrap();
        a.file.write_all(b"new").unwrap();
        drop(a);
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        let mut a = AtomicFile::create(&dest).unwrap();
        a.file.write_all(b"new").unwrap();
        a.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
