//! Sparse files: finding their data, writing them back with holes, and carrying them inside a
//! tar+gzip blob.
//!
//! Memory snapshots and disk diffs are multi-GiB files of which only the touched pages hold data.
//! Everything here keeps holes as holes: reading uses `SEEK_DATA`/`SEEK_HOLE`, writing skips
//! all-zero 4 KiB blocks, and the tar entry is a GNU sparse entry (the `tar` crate writes those
//! from the file's data map, and reads them back as a stream with the holes filled by zeros).

use std::borrow::Borrow;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use sha2::Digest as _;
use specc_plan::ir::Digest;

/// The block size at which zeros become holes. Pages of guest memory and blocks of the disk diff
/// are 4 KiB, so nothing smaller is worth a hole.
pub const BLOCK: usize = 4096;

const ZEROS: [u8; BLOCK] = [0; BLOCK];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    /// Reading the source file failed.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the output failed.
    #[error("cannot write the {what}")]
    Write {
        /// What was being written.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tar stream could not be read (bad gzip, bad tar headers, truncated data).
    #[error("the sparse tar+gzip stream is malformed")]
    Malformed(#[source] io::Error),
    /// The tar stream holds something other than exactly one regular or sparse file.
    #[error("the sparse tar+gzip stream must hold exactly one file: {0}")]
    Shape(String),
}

/// `min(len, cap)` as a `usize`.
pub(crate) fn clamp(len: u64, cap: usize) -> usize {
    usize::try_from(len).map_or(cap, |l| l.min(cap))
}

/// `true` if every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // Comparing against a zero block compiles to memcmp, which is much faster than a byte loop.
    buf.chunks(BLOCK).all(|c| c == &ZEROS[..c.len()])
}

/// The data extents `(offset, len)` of `file`, in order, from `SEEK_DATA`/`SEEK_HOLE`. A file
/// system without hole support reports the whole file as one extent.
pub fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let lseek = |off: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let off = i64::try_from(off).map_err(|_| io::Error::other("offset beyond i64"))?;
        // SAFETY: lseek on a file descriptor we own (borrowed from `file` for this call); it
        // only moves the file offset, which nothing else relies on here.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(
            u64::try_from(r).map_err(|_| io::Error::other("negative offset"))?,
        ))
    };
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match lseek(pos, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(0, len)]),
            Err(e) => return Err(e),
        };
        let end = lseek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        extents.push((start, end - start));
        pos = end;
    }
    Ok(extents)
}

/// A `Write` that puts a byte stream into a file at increasing offsets and leaves every
/// all-zero 4 KiB block (aligned to the stream's offset) as a hole. The file must start empty.
#[derive(Debug)]
pub struct SparseWriter<F: Borrow<File>> {
    file: F,
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`; always a multiple of [`BLOCK`].
    base: u64,
    /// Fed every non-zero block as it is written, when the stream's sparse digest is wanted.
    hasher: Option<SparseHasher>,
}

impl<F: Borrow<File>> SparseWriter<F> {
    const CAP: usize = 256 * BLOCK;

    /// Writes into `file` (a `File` or a `&File`) from offset 0.
    pub fn new(file: F) -> Self {
        SparseWriter {
            file,
            buf: Vec::with_capacity(Self::CAP),
            base: 0,
            hasher: None,
        }
    }

    /// Like [`SparseWriter::new`], also computing the stream's [`sparse_digest`] on the way (at
    /// no extra read: the zero test that makes holes is the one the digest needs).
    pub fn with_digest(file: F) -> Self {
        SparseWriter {
            hasher: Some(SparseHasher::new()),
            ..SparseWriter::new(file)
        }
    }

    /// Skips `len` zero bytes without touching the file (a hole). Any buffered partial block is
    /// treated as followed by zeros.
    pub fn skip_zeros(&mut self, mut len: u64) -> io::Result<()> {
        // Fill the buffered partial block up to a block boundary with zeros first.
        let partial = self.buf.len() % BLOCK;
        if partial != 0 {
            let fill = clamp(len, BLOCK - partial);
            self.buf.extend_from_slice(&ZEROS[..fill]);
            len -= fill as u64;
        }
        if len == 0 {
            return Ok(());
        }
        self.flush_blocks(true)?;
        // The buffer is now empty and block aligned.
        let whole = len / BLOCK as u64 * BLOCK as u64;
        self.base += whole;
        let rest = clamp(len - whole, BLOCK);
        self.buf.extend_from_slice(&ZEROS[..rest]);
        Ok(())
    }

    /// Bytes written or skipped so far.
    pub fn position(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Writes out the buffer (the last partial block too) and sets the file length to the
    /// stream length, so a trailing hole still counts.
    pub fn finish(self) -> io::Result<u64> {
        self.finish_digest().map(|(len, _)| len)
    }

    /// [`SparseWriter::finish`], also returning the sparse digest when the writer was made by
    /// [`SparseWriter::with_digest`].
    pub fn finish_digest(mut self) -> io::Result<(u64, Option<Digest>)> {
        self.flush_blocks(true)?;
        let len = self.base;
        self.file.borrow().set_len(len)?;
        Ok((len, self.hasher.take().map(|h| h.finish(len))))
    }

    /// Writes the buffered blocks that are not all zero. With `all`, a trailing partial block
    /// goes out too (only at the end of the stream or before a hole).
    fn flush_blocks(&mut self, all: bool) -> io::Result<()> {
        let full = self.buf.len() / BLOCK * BLOCK;
        let upto = if all { self.buf.len() } else { full };
        // Coalesce runs of non-zero blocks into one pwrite each.
        let mut run_start: Option<usize> = None;
        let mut i = 0;
        while i < upto {
            let end = (i + BLOCK).min(upto);
            let zero = is_zero(&self.buf[i..end]);
            if !zero && let Some(h) = &mut self.hasher {
                h.block((self.base + i as u64) / BLOCK as u64, &self.buf[i..end]);
            }
            match (zero, run_start) {
                (false, None) => run_start = Some(i),
                (true, Some(s)) => {
                    self.file
                        .borrow()
                        .write_all_at(&self.buf[s..i], self.base + s as u64)?;
                    run_start = None;
                }
                _ => {}
            }
            i = end;
        }
        if let Some(s) = run_start {
            self.file
                .borrow()
                .write_all_at(&self.buf[s..upto], self.base + s as u64)?;
        }
        self.base += upto as u64;
        self.buf.drain(..upto);
        Ok(())
    }
}

impl<F: Borrow<File>> Write for SparseWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = Self::CAP - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == Self::CAP {
            self.flush_blocks(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Domain-separation prefix of [`sparse_digest`]; bumped if the encoding ever changes.
pub const SPARSE_DIGEST_TAG: &[u8] = b"specc-sparse-sha256-v1\0";

/// Computes the sparse digest of a byte stream from its non-zero 4 KiB blocks (see
/// [`sparse_digest`]). Blocks must come in increasing order; zero blocks may be passed or
/// left out, with the same result.
#[derive(Debug, Clone)]
pub struct SparseHasher {
    h: sha2::Sha256,
    /// The lowest block index still allowed (keeps the encoding canonical).
    next: u64,
}

impl Default for SparseHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl SparseHasher {
    /// A hasher of an empty stream.
    pub fn new() -> Self {
        let mut h = sha2::Sha256::new();
        h.update(SPARSE_DIGEST_TAG);
        SparseHasher { h, next: 0 }
    }

    /// Block `index`: the [`BLOCK`] bytes at offset `index * BLOCK` (fewer for a stream's
    /// last block). All-zero blocks are skipped, exactly like holes.
    ///
    /// # Panics
    /// If `index` is not above every index passed before, or `bytes` is longer than a block:
    /// callers walk their stream forwards, so either is a bug.
    pub fn block(&mut self, index: u64, bytes: &[u8]) {
        assert!(
            bytes.len() <= BLOCK,
            "a sparse digest block is at most {BLOCK} bytes"
        );
        if is_zero(bytes) {
            return;
        }
        assert!(index >= self.next, "sparse digest blocks out of order");
        self.h.update(index.to_le_bytes());
        self.h.update(bytes);
        self.next = index + 1;
    }

    /// The digest of a stream of `len` bytes whose non-zero blocks were all passed.
    pub fn finish(mut self, len: u64) -> Digest {
        self.h.update(len.to_le_bytes());
        Digest(self.h.finalize().into())
    }
}

/// The sparse digest of `file` and its length: SHA-256 over [`SPARSE_DIGEST_TAG`], then for
/// every 4 KiB block (aligned to the file's start; the last may be short) that is not all
/// zero, in increasing order, its index as u64 LE followed by its bytes, then the file length
/// as u64 LE (docs/artifact-format.md).
///
/// It names the file's logical bytes exactly (a missing block is zeros, and the length says
/// where the last block ends), but costs time in proportion to the data: holes are skipped
/// with `SEEK_DATA`/`SEEK_HOLE` without being read or hashed, and since a written block of
/// zeros is skipped just like a hole, how a copy allocated its zeros does not matter.
pub fn sparse_digest(file: &File) -> io::Result<(Digest, u64)> {
    let len = file.metadata()?.len();
    let blocks = len.div_ceil(BLOCK as u64);
    let mut h = SparseHasher::new();
    let mut buf = vec![0u8; 256 * BLOCK];
    let per_read = (buf.len() / BLOCK) as u64;
    let mut next = 0u64;
    for (start, elen) in data_extents(file)? {
        // Extents need not be block aligned: widen them to whole blocks, never twice over one.
        let mut b = (start / BLOCK as u64).max(next);
        let end = (start + elen).div_ceil(BLOCK as u64).min(blocks);
        while b < end {
            let n = (end - b).min(per_read);
            let off = b * BLOCK as u64;
            let bytes = clamp((n * BLOCK as u64).min(len - off), buf.len());
            file.read_exact_at(&mut buf[..bytes], off)?;
            for (i, chunk) in buf[..bytes].chunks(BLOCK).enumerate() {
                h.block(b + i as u64, chunk);
            }
            b += n;
        }
        next = next.max(end);
    }
    Ok((h.finish(len), len))
}

/// [`sparse_digest`] of bytes in memory.
pub fn sparse_digest_of(bytes: &[u8]) -> Digest {
    let mut h = SparseHasher::new();
    for (i, chunk) in bytes.chunks(BLOCK).enumerate() {
        h.block(i as u64, chunk);
    }
    h.finish(bytes.len() as u64)
}

/// Copies `src` into the empty file `dst`, holes and zero blocks staying holes, and feeds every
/// logical byte (zeros of holes included) to `observe`. Returns the length.
pub fn copy_sparse(src: &File, dst: &File, mut observe: impl FnMut(&[u8])) -> io::Result<u64> {
    let len = src.metadata()?.len();
    let mut w = SparseWriter::new(dst);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    for (start, elen) in data_extents(src)? {
        observe_zeros(start - pos, &mut observe);
        w.skip_zeros(start - pos)?;
        let mut off = start;
        let end = start + elen;
        while off < end {
            let n = clamp(end - off, buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            observe(&buf[..n]);
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        pos = end;
    }
    observe_zeros(len - pos, &mut observe);
    w.skip_zeros(len - pos)?;
    w.finish()
}

/// Copies `src` into the empty file `dst` like [`copy_sparse`] and returns `src`'s
/// [`sparse_digest`]; holes are skipped, neither read nor hashed.
pub fn copy_sparse_digest(src: &File, dst: &File) -> io::Result<Digest> {
    let len = src.metadata()?.len();
    let mut w = SparseWriter::with_digest(dst);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    for (start, elen) in data_extents(src)? {
        w.skip_zeros(start - pos)?;
        let mut off = start;
        let end = start + elen;
        while off < end {
            let n = clamp(end - off, buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        pos = end;
    }
    w.skip_zeros(len - pos)?;
    let (_, d) = w.finish_digest()?;
    d.ok_or_else(|| io::Error::other("the sparse writer lost its digest"))
}

/// Feeds `len` zero bytes to `observe` (a hash, usually).
pub fn observe_zeros(mut len: u64, observe: &mut impl FnMut(&[u8])) {
    static BIG_ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while len > 0 {
        let n = clamp(len, BIG_ZEROS.len());
        observe(&BIG_ZEROS[..n]);
        len -= n as u64;
    }
}

/// Writes `src` as a tar+gzip stream of one GNU sparse entry named `name` into `out` and returns
/// `out`. The output depends only on the file's bytes and its data map (deterministic headers,
/// no timestamps), so packing the same store blob twice gives the same digest.
pub fn pack<W: Write>(src: &Path, name: &str, out: W) -> Result<W, SparseError> {
    let mut file = File::open(src).map_err(|source| SparseError::Read {
        path: src.to_owned(),
        source,
    })?;
    let write_err = |source| SparseError::Write {
        what: "sparse tar+gzip stream",
        source,
    };
    let gz = GzEncoder::new(out, Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.sparse(true);
    tar.append_file(name, &mut file).map_err(write_err)?;
    let gz = tar.into_inner().map_err(write_err)?;
    gz.finish().map_err(write_err)
}

/// Reads a tar+gzip stream written by [`pack`] (or by GNU tar with `--sparse`) and writes its one
/// file's logical bytes into `out`. With `expect_len`, a file of any other length is refused
/// before a byte is written (a hostile header cannot make us write a petabyte of zeros). Returns
/// the file's length and the raw reader, drained to its end, so a caller hashing the compressed
/// bytes sees all of them.
pub fn unpack<R: Read, W: Write>(
    src: R,
    out: &mut W,
    expect_len: Option<u64>,
) -> Result<(u64, R), SparseError> {
    let mut archive = tar::Archive::new(GzDecoder::new(src));
    let len;
    {
        let mut entries = archive.entries().map_err(SparseError::Malformed)?;
        match entries.next() {
            None => return Err(SparseError::Shape("it is empty".into())),
            Some(entry) => {
                let mut entry = entry.map_err(SparseError::Malformed)?;
                let ty = entry.header().entry_type();
                if !(ty.is_file() || ty.is_gnu_sparse()) {
                    return Err(SparseError::Shape(format!("entry type {ty:?}")));
                }
                let expect = match entry.header().as_gnu() {
                    Some(g) if ty.is_gnu_sparse() => {
                        g.real_size().map_err(SparseError::Malformed)?
                    }
                    _ => entry.header().size().map_err(SparseError::Malformed)?,
                };
                if let Some(want) = expect_len
                    && want != expect
                {
                    return Err(SparseError::Shape(format!(
                        "the entry is {expect} bytes long, {want} were expected"
                    )));
                }
                // io::copy's 8 KiB buffer makes the zero runs of holes cost more than the data.
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                loop {
                    let got = entry.read(&mut buf).map_err(SparseError::Malformed)?;
                    if got == 0 {
                        break;
                    }
                    out.write_all(&buf[..got])
                        .map_err(|source| SparseError::Write {
                            what: "unpacked bytes",
                            source,
                        })?;
                    n += got as u64;
                }
                if n != expect {
                    return Err(SparseError::Shape(format!(
                        "the entry holds {n} bytes, its header says {expect}"
                    )));
                }
                len = n;
            }
        }
        if let Some(next) = entries.next() {
            let what = match next {
                Ok(e) => format!("a second entry {:?}", e.path().unwrap_or_default()),
                Err(e) => format!("garbage after the entry ({e})"),
            };
            return Err(SparseError::Shape(what));
        }
    }
    let mut gz = archive.into_inner();
    io::copy(&mut gz, &mut io::sink()).map_err(SparseError::Malformed)?;
    let mut raw = gz.into_inner();
    io::copy(&mut raw, &mut io::sink()).map_err(SparseError::Malformed)?;
    Ok((len, raw))
}

/// Unpacks a tar+gzip sparse stream into a new file at `dest` (holes stay holes). Returns the
/// length.
pub fn unpack_to_file(src: impl Read, dest: &Path) -> Result<u64, SparseError> {
    let file = File::create(dest).map_err(|source| SparseError::Write {
        what: "unpacked file",
        source,
    })?;
    let mut w = SparseWriter::new(&file);
    unpack(src, &mut w, None)?;
    w.finish().map_err(|source| SparseError::Write {
        what: "unpacked file",
        source,
    })
}

/// Bytes actually allocated on disk for `file` (`st_blocks * 512`).
pub fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Cursor;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A sparse file of `len` bytes with `chunks` data chunks of `chunk` bytes each, spread
    /// evenly, filled with a position-dependent pattern (compressible but not constant).
    pub(crate) fn make_sparse(path: &Path, len: u64, chunks: u64, chunk: usize) -> File {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("create sparse file");
        f.set_len(len).expect("set_len");
        let stride = len / chunks;
        let mut data = vec![0u8; chunk];
        for i in 0..chunks {
            for (j, b) in data.iter_mut().enumerate() {
                *b = ((j as u64 * 31 + i * 7) % 251) as u8 | 1;
            }
            f.write_all_at(&data, i * stride).expect("write chunk");
        }
        f.sync_all().expect("sync");
        f
    }

    fn sha(path: &Path) -> Vec<u8> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut f = File::open(path).expect("open");
        io::copy(&mut f, &mut h).expect("hash");
        h.finalize().to_vec()
    }

    #[test]
    fn sparse_digest_ignores_how_zeros_are_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let holes = dir.path().join("holes");
        let f = make_sparse(&holes, 8 << 20, 5, 10_000);
        let (d, len) = sparse_digest(&f).expect("digest");
        assert_eq!(len, 8 << 20);
        // The same logical bytes written densely, zeros and all.
        let dense = dir.path().join("dense");
        let bytes = std::fs::read(&holes).expect("read");
        std::fs::write(&dense, &bytes).expect("write");
        let dense_f = File::open(&dense).expect("open");
        assert!(
            allocated(&dense_f.metadata().expect("meta")) >= 8 << 20,
            "really dense"
        );
        assert_eq!(sparse_digest(&dense_f).expect("digest").0, d);
        assert_eq!(sparse_digest_of(&bytes), d, "in memory");
        // Through a SparseWriter (holes again, made from the stream).
        let copied = File::create(dir.path().join("copied")).expect("create");
        let mut w = SparseWriter::with_digest(&copied);
        // [2 MiB, 3 MiB) holds no chunk: it goes in as a hole.
        assert!(is_zero(&bytes[2 << 20..3 << 20]));
        w.write_all(&bytes[..2 << 20]).expect("write");
        w.skip_zeros(1 << 20).expect("hole");
        w.write_all(&bytes[3 << 20..]).expect("write");
        let (wlen, wd) = w.finish_digest().expect("finish");
        assert_eq!((wlen, wd), (8 << 20, Some(d)));
    }

    #[test]
    fn sparse_digest_changes_with_any_byte_and_with_the_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let f = make_sparse(&p, 1 << 20, 3, 5000);
        let (d, _) = sparse_digest(&f).expect("digest");
        let g = File::options().write(true).open(&p).expect("open");
        // One byte in a hole (the chunks are at 0, 349525 and 699050), then back to zero.
        g.write_all_at(&[1], 900_001).expect("write");
        let (d1, _) = sparse_digest(&f).expect("digest");
        assert_ne!(d1, d);
        g.write_all_at(&[0], 900_001).expect("write");
        assert_eq!(
            sparse_digest(&f).expect("digest").0,
            d,
            "zeros written = hole"
        );
        // One byte inside the data.
        g.write_all_at(&[0xee], 10).expect("write");
        assert_ne!(sparse_digest(&f).expect("digest").0, d);
        g.write_all_at(&[((10u64 * 31) % 251) as u8 | 1], 10)
            .expect("restore");
        assert_eq!(sparse_digest(&f).expect("digest").0, d);
        // A longer file of trailing zeros, and one ending in a short block.
        g.set_len((1 << 20) + 4096).expect("grow");
        assert_ne!(sparse_digest(&f).expect("digest").0, d);
        g.set_len((1 << 20) + 100).expect("shrink");
        g.write_all_at(&[9], (1 << 20) + 99).expect("write");
        let short = sparse_digest(&f).expect("digest").0;
        let bytes = std::fs::read(&p).expect("read");
        assert_eq!(sparse_digest_of(&bytes), short);
        assert_ne!(short, d);
        // Not the plain sha256 of the bytes.
        assert_ne!(short.0.to_vec(), sha(&p));
    }

    #[test]
    fn data_extents_finds_the_written_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let f = make_sparse(&p, 64 << 20, 4, 1 << 20);
        let ext = data_extents(&f).expect("extents");
        assert_eq!(ext.len(), 4, "{ext:?}");
        assert_eq!(ext[1], (16 << 20, 1 << 20));
    }

    #[test]
    fn sparse_writer_leaves_zero_blocks_as_holes_and_keeps_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("out"))
            .expect("create");
        let mut w = SparseWriter::new(&f);
        w.write_all(&[7u8; 100]).expect("write");
        w.skip_zeros(10 << 20).expect("skip");
        w.write_all(&vec![0u8; 3 * BLOCK]).expect("zeros");
        w.write_all(&[9u8; BLOCK + 5]).expect("write");
        w.skip_zeros(3).expect("skip tail");
        let len = w.finish().expect("finish");
        assert_eq!(len, 100 + (10 << 20) + 4 * BLOCK as u64 + 8);
        let meta = f.metadata().expect("meta");
        assert_eq!(meta.len(), len);
        assert!(
            meta.blocks() * 512 <= 4 * BLOCK as u64,
            "blocks {}",
            meta.blocks()
        );
        let mut back = vec![0u8; usize::try_from(len).expect("fits")];
        f.read_exact_at(&mut back, 0).expect("read");
        assert!(back[..100].iter().all(|&b| b == 7));
        assert!(is_zero(&back[100..100 + (10 << 20) + 3 * BLOCK]));
        let tail = 100 + (10 << 20) + 3 * BLOCK;
        assert!(back[tail..tail + BLOCK + 5].iter().all(|&b| b == 9));
        assert!(is_zero(&back[tail + BLOCK + 5..]));
    }

    #[test]
    fn pack_unpack_round_trip_keeps_bytes_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("memory");
        make_sparse(&src, 256 << 20, 8, 512 << 10);
        let packed = pack(&src, "memory", Vec::new()).expect("pack");
        assert!(packed.len() < 8 << 20, "packed {} bytes", packed.len());
        let again = pack(&src, "memory", Vec::new()).expect("pack again");
        assert_eq!(packed, again, "packing is deterministic");

        let dest = dir.path().join("back");
        let len = unpack_to_file(Cursor::new(&packed), &dest).expect("unpack");
        assert_eq!(len, 256 << 20);
        let meta = std::fs::metadata(&dest).expect("meta");
        assert_eq!(meta.len(), 256 << 20);
        assert!(
            allocated(&meta) <= 8 * (512 << 10) + 64 * 1024,
            "holes survived: {} bytes allocated",
            allocated(&meta)
        );
        assert_eq!(sha(&src), sha(&dest));
    }

    #[test]
    fn gnu_tar_reads_our_sparse_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("disk");
        make_sparse(&src, 32 << 20, 40, 4096);
        let blob = dir.path().join("disk.tar.gz");
        pack(&src, "disk", File::create(&blob).expect("create")).expect("pack");
        let out = dir.path().join("x");
        std::fs::create_dir(&out).expect("mkdir");
        let st = std::process::Command::new("tar")
            .args(["-xzSf"])
            .arg(&blob)
            .arg("-C")
            .arg(&out)
            .status()
            .expect("GNU tar must be installed to check interoperability");
        assert!(st.success());
        assert_eq!(sha(&src), sha(&out.join("disk")));
        // And the other way: GNU tar's own sparse archive unpacks here.
        let gnu = dir.path().join("gnu.tar.gz");
        let st = std::process::Command::new("tar")
            .arg("-czSf")
            .arg(&gnu)
            .arg("-C")
            .arg(dir.path())
            .arg("disk")
            .status()
            .expect("run tar");
        assert!(st.success());
        let back = dir.path().join("gnu-back");
        let len = unpack_to_file(File::open(&gnu).expect("open"), &back).expect("unpack gnu");
        assert_eq!(len, 32 << 20);
        assert_eq!(sha(&src), sha(&back));
    }

    #[test]
    fn unpack_rejects_garbage_and_two_entries() {
        let err = unpack(
            Cursor::new(b"not gzip at all".to_vec()),
            &mut io::sink(),
            None,
        )
        .expect_err("garbage");
        assert!(matches!(err, SparseError::Malformed(_)), "{err:?}");

        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for name in ["a", "b"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_cksum();
            tar.append_data(&mut h, name, &b"x"[..]).expect("append");
        }
        let bytes = tar.into_inner().expect("tar").finish().expect("gz");
        let err =
            unpack(Cursor::new(bytes.clone()), &mut io::sink(), None).expect_err("two entries");
        assert!(err.to_string().contains("exactly one file"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("one");
        make_sparse(&f, 1 << 20, 1, 4096);
        let one = pack(&f, "x", Vec::new()).expect("pack");
        let err = unpack(Cursor::new(one), &mut io::sink(), Some(5)).expect_err("wrong length");
        assert!(err.to_string().contains("5 were expected"), "{err}");
    }
}
