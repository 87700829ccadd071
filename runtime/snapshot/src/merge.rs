//! Merging a chain of diff files into one.
//!
//! A VM suspended and woken many times has a chain `base, diff1, .., diffN` (each diff the
//! pages written since the restore before it). Restoring maps every diff, so the restore's
//! mappings, open files and disk use grow with every cycle even when the same pages are
//! rewritten. [`merge_diffs`] writes one diff that reads exactly like the chain above the base:
//! its range list is the union of the chain's, and each page comes from the newest diff whose
//! ranges hold it. A page that diff holds as zero (a hole inside its ranges) is a hole inside
//! the merged ranges: still zero, never the base's older page. Pages no diff holds are outside
//! the merged ranges, so the base shows through as before. The inputs are not modified (base
//! files are shared and content-addressed).
//!
//! The range lists come from a vmstate, which may come from anywhere: they are validated like
//! [`crate::map_overlay`] validates them, and every file's length is checked, before anything
//! is written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::memory::{self, PAGE_SIZE, PageRange};

/// Bytes read and written per system call.
const CHUNK: u64 = 8 << 20;

/// Errors of merging a diff chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing to merge.
    #[error("a merge needs at least one diff")]
    Empty,
    /// A diff file cannot be opened, is not guest memory's length, or has an invalid range
    /// list.
    #[error("diff {index} of the chain ({path})")]
    Input {
        /// Its position in the chain, oldest first.
        index: usize,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: memory::Error,
    },
    /// Reading a diff failed.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating, writing or committing the merged file failed.
    #[error("writing merged diff {path}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One diff of a chain: its file and the memory-file ranges it holds.
#[derive(Debug, Clone, Copy)]
pub struct ChainDiff<'a> {
    /// The diff file (guest RAM's length, sparse).
    pub file: &'a Path,
    /// Its ranges: page-aligned, sorted, disjoint, non-empty.
    pub ranges: &'a [PageRange],
}

/// What [`merge_diffs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeStats {
    /// Diffs merged.
    pub diffs: usize,
    /// The sum of the input diffs' range bytes.
    pub input_range_bytes: u64,
    /// The merged diff's range bytes (their union).
    pub range_bytes: u64,
    /// Bytes of data written (non-zero pages; the rest of the ranges are holes).
    pub data_bytes: u64,
    /// Wall time, including the fsync.
    pub elapsed: Duration,
}

/// The union of range lists as one sorted, disjoint, coalesced list. Inputs must be valid
/// (sorted and disjoint each; [`merge_diffs`] checks that).
pub fn union_ranges(lists: &[&[PageRange]]) -> Vec<PageRange> {
    let mut all: Vec<PageRange> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    all.sort_by_key(|r| r.offset);
    let mut out: Vec<PageRange> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.offset <= last.offset + last.len => {
                let end = (last.offset + last.len).max(r.offset + r.len);
                last.len = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

/// A run of the merged diff and the diff it is copied from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    len: u64,
    source: usize,
}

/// Whether `ranges` (sorted, disjoint) holds `offset`.
fn covers(ranges: &[PageRange], offset: u64) -> bool {
    let i = ranges.partition_point(|r| r.offset + r.len <= offset);
    ranges.get(i).is_some_and(|r| r.offset <= offset)
}

/// Splits the union of the diffs' ranges into runs, each taken from the newest diff holding
/// it. Every range starts and ends at a boundary, so between two consecutive boundaries the
/// set of diffs holding a byte is constant.
fn segments(diffs: &[ChainDiff<'_>]) -> Vec<Segment> {
    let mut bounds: Vec<u64> = diffs
        .iter()
        .flat_map(|d| d.ranges.iter().flat_map(|r| [r.offset, r.offset + r.len]))
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<Segment> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let Some(source) = (0..diffs.len())
            .rev()
            .find(|&i| covers(diffs[i].ranges, lo))
        else {
            continue;
        };
        match out.last_mut() {
            Some(s) if s.source == source && s.offset + s.len == lo => s.len += hi - lo,
            _ => out.push(Segment {
                offset: lo,
                len: hi - lo,
                source,
            }),
        }
    }
    out
}

/// Writes to `out` (atomically: a temporary name, fsync, rename, directory fsync) one diff of
/// `mem_len` bytes that reads like `diffs` (oldest first) laid over any base in order, and
/// returns its ranges. Zero pages stay holes. The inputs are read, never changed.
pub fn merge_diffs(
    mem_len: u64,
    diffs: &[ChainDiff<'_>],
    out: &Path,
) -> Result<(Vec<PageRange>, MergeStats), Error> {
    let start = Instant::now();
    if diffs.is_empty() {
        return Err(Error::Empty);
    }
    let mut files = Vec::with_capacity(diffs.len());
    for (index, d) in diffs.iter().enumerate() {
        let input = |source| Error::Input {
            index,
            path: d.file.to_path_buf(),
            source,
        };
        memory::check_ranges(d.ranges, mem_len).map_err(input)?;
        let file = File::open(d.file).map_err(|source| {
            input(memory::Error::Open {
                path: d.file.to_path_buf(),
                source,
            })
        })?;
        memory::check_open_file(&file, d.file, mem_len).map_err(input)?;
        files.push(file);
    }
    let werr = |source| Error::Write {
        path: out.to_path_buf(),
        source,
    };
    let dest = memory::create_sparse(out, mem_len).map_err(|e| match e {
        memory::Error::Create { source, .. } => werr(source),
        other => werr(std::io::Error::other(other)),
    })?;
    let mut data_bytes = 0u64;
    let mut buf = Vec::new();
    for seg in segments(diffs) {
        let (src, path) = (&files[seg.source], diffs[seg.source].file);
        let rerr = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        // Only the data of the source: its holes in the segment are the merged file's holes.
        for ext in
            crate::holes::data_extents(src, seg.offset, seg.offset + seg.len).map_err(rerr)?
        {
            let mut at = ext.offset;
            let end = ext.offset + ext.len;
            while at < end {
                let n = (end - at).min(CHUNK);
                buf.resize(usize::try_from(n).unwrap_or(usize::MAX), 0);
                src.read_exact_at(&mut buf, at).map_err(rerr)?;
                data_bytes += write_nonzero_runs(dest.file(), &buf, at).map_err(werr)?;
                at += n;
            }
        }
    }
    dest.commit().map_err(werr)?;
    let ranges = union_ranges(&diffs.iter().map(|d| d.ranges).collect::<Vec<_>>());
    let stats = MergeStats {
        diffs: diffs.len(),
        input_range_bytes: diffs
            .iter()
            .flat_map(|d| d.ranges.iter())
            .map(|r| r.len)
            .sum(),
        range_bytes: ranges.iter().map(|r| r.len).sum(),
        data_bytes,
        elapsed: start.elapsed(),
    };
    Ok((ranges, stats))
}

/// Writes the non-zero pages of `buf` (file offset `at`, whole pages) in runs; returns the
/// bytes written.
fn write_nonzero_runs(file: &File, buf: &[u8], at: u64) -> std::io::Result<u64> {
    let page = usize::try_from(PAGE_SIZE).unwrap_or(4096);
    let zero = |p: &[u8]| p.iter().fold(0u8, |acc, b| acc | b) == 0;
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let pages = buf.len() / page;
    for i in 0..=pages {
        let data = i < pages && !zero(&buf[i * page..(i + 1) * page]);
        match (data, run) {
            (true, None) => run = Some(i),
            (false, Some(first)) => {
                let bytes = &buf[first * page..i * page];
                file.write_all_at(bytes, at + (first * page) as u64)?;
                written += bytes.len() as u64;
                run = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    use super::*;
    use crate::memory::tests::{anon_mem, contents, file_mem, fill_page, gpa};
    use crate::memory::{DirtyPages, WriteOptions};
    use crate::{map_overlay, write_memory, write_memory_diff};

    const P: u64 = PAGE_SIZE;

    /// Writes `writes` (memory-file page, byte) into `mem` and a diff of exactly those pages.
    fn step(mem: &GuestMemoryMmap, path: &Path, writes: &[(u64, u8)]) -> (PathBuf, Vec<PageRange>) {
        let mut dirty = DirtyPages::none(mem);
        for &(page, byte) in writes {
            fill_page(mem, page * P, byte);
            dirty.mark_range(mem, gpa(mem, page * P), 1).unwrap();
        }
        let (ranges, _) = write_memory_diff(mem, path, &dirty).unwrap();
        (path.to_path_buf(), ranges)
    }

    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// Base + four diffs over two regions (a range across the boundary, pages rewritten, a page
    /// written then zeroed, a page zeroed that only the base had): base + the merged diff
    /// restores byte for byte what base + the chain restores, which is the memory itself; the
    /// zeroed pages are holes of the merged file; the inputs are untouched.
    #[test]
    fn merged_chain_restores_exactly_like_the_chain_with_holes_kept() {
        let mem = anon_mem(&[
            usize::try_from(64 * P).unwrap(),
            usize::try_from(32 * P).unwrap(),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        for page in [0u64, 5, 40, 63, 64, 90] {
            fill_page(&mem, page * P, 0xb0);
        }
        write_memory(&mem, &p("base"), &WriteOptions::default()).unwrap();
        let chain = [
            step(
                &mem,
                &p("d1"),
                &[(1, 0x11), (2, 0x11), (63, 0x11), (64, 0x11)],
            ),
            // Page 2 zeroed (written then a hole), page 5 zeroed over the base's data.
            step(&mem, &p("d2"), &[(2, 0), (5, 0), (1, 0x22), (70, 0x22)]),
            step(
                &mem,
                &p("d3"),
                &[(63, 0x33), (64, 0x33), (65, 0x33), (95, 0x33)],
            ),
            step(&mem, &p("d4"), &[(1, 0x44), (30, 0), (31, 0x44)]),
        ];
        let before: Vec<Vec<u8>> = chain
            .iter()
            .map(|(f, _)| std::fs::read(f).unwrap())
            .collect();
        let diffs: Vec<ChainDiff<'_>> = chain
            .iter()
            .map(|(file, ranges)| ChainDiff { file, ranges })
            .collect();
        let total = mem.iter().map(GuestMemoryRegion::len).sum();
        let (ranges, stats) = merge_diffs(total, &diffs, &p("merged")).unwrap();

        let by_chain = file_mem(&p("base"), &mem);
        for (f, r) in &chain {
            map_overlay(&by_chain, f, r).unwrap();
        }
        let merged = file_mem(&p("base"), &mem);
        map_overlay(&merged, &p("merged"), &ranges).unwrap();
        let want = contents(&mem);
        assert!(contents(&by_chain) == want, "the chain restores the memory");
        assert!(
            contents(&merged) == want,
            "the merged diff restores the memory"
        );

        let pages = |list: &[u64]| -> Vec<PageRange> {
            union_ranges(&[&list
                .iter()
                .map(|&pg| PageRange {
                    offset: pg * P,
                    len: P,
                })
                .collect::<Vec<_>>()])
        };
        assert_eq!(
            ranges,
            pages(&[1, 2, 5, 30, 31, 63, 64, 65, 70, 95]),
            "the union of the chain's ranges, coalesced across the region boundary"
        );
        // Written pages 1, 31, 63, 64, 65, 70, 95; the zeroed ones (2, 5, 30) are holes.
        assert_eq!(stats.data_bytes, 7 * P);
        assert_eq!(stats.range_bytes, 10 * P);
        assert_eq!(stats.input_range_bytes, 15 * P);
        assert_eq!(stats.diffs, 4);
        let merged_file = std::fs::read(p("merged")).unwrap();
        for page in [2u64, 5, 30] {
            assert!(
                merged_file[usize::try_from(page * P).unwrap()..][..4096]
                    .iter()
                    .all(|&b| b == 0)
            );
        }
        assert!(
            allocated(&p("merged")) <= 7 * P + 64 * 1024,
            "zero pages are holes"
        );
        for ((f, _), old) in chain.iter().zip(&before) {
            assert!(
                &std::fs::read(f).unwrap() == old,
                "{} untouched",
                f.display()
            );
        }
    }

    #[test]
    fn a_single_diff_merges_to_the_same_ranges_and_bytes() {
        let mem = anon_mem(&[usize::try_from(16 * P).unwrap()]);
        let dir = tempfile::tempdir().unwrap();
        let (f, r) = step(&mem, &dir.path().join("d"), &[(3, 7), (4, 0), (9, 9)]);
        let (ranges, _) = merge_diffs(
            16 * P,
            &[ChainDiff {
                file: &f,
                ranges: &r,
            }],
            &dir.path().join("m"),
        )
        .unwrap();
        assert_eq!(ranges, r);
        assert!(std::fs::read(dir.path().join("m")).unwrap() == std::fs::read(&f).unwrap());
    }

    /// A chain from an untrusted vmstate is refused before anything is written: bad ranges, a
    /// file of another length, a missing file, no diffs.
    #[test]
    fn bad_chains_are_refused_and_leave_no_output() {
        let mem = anon_mem(&[usize::try_from(16 * P).unwrap()]);
        let dir = tempfile::tempdir().unwrap();
        let (f, r) = step(&mem, &dir.path().join("d"), &[(3, 7)]);
        let out = dir.path().join("m");
        let bad_ranges: [&[PageRange]; 4] = [
            &[PageRange { offset: 0, len: 0 }],
            &[PageRange {
                offset: 100,
                len: P,
            }],
            &[PageRange {
                offset: 15 * P,
                len: 2 * P,
            }],
            &[
                PageRange {
                    offset: 4 * P,
                    len: P,
                },
                PageRange { offset: 0, len: P },
            ],
        ];
        for ranges in bad_ranges {
            let e = merge_diffs(16 * P, &[ChainDiff { file: &f, ranges }], &out).unwrap_err();
            assert!(
                matches!(e, Error::Input { index: 0, .. }),
                "{ranges:?}: {e:?}"
            );
        }
        let ok = ChainDiff {
            file: &f,
            ranges: &r,
        };
        let e = merge_diffs(32 * P, &[ok], &out).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Input {
                    source: memory::Error::FileLength { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let missing = dir.path().join("nope");
        let e = merge_diffs(
            16 * P,
            &[
                ok,
                ChainDiff {
                    file: &missing,
                    ranges: &r,
                },
            ],
            &out,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Input { index: 1, .. }), "{e:?}");
        assert!(matches!(merge_diffs(16 * P, &[], &out), Err(Error::Empty)));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("d")],
            "no output, no temporary file"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Any sequence of page writes, split into any number of diffs, merges into one diff
        /// that restores exactly what the chain restores.
        #[test]
        fn any_chain_merges_to_what_it_restores(
            steps in proptest::collection::vec(
                proptest::collection::vec((0u64..96, proptest::prelude::any::<u8>()), 0..12),
                1..6,
            ),
        ) {
            let mem = anon_mem(&[usize::try_from(64 * P).unwrap(), usize::try_from(32 * P).unwrap()]);
            let dir = tempfile::tempdir().unwrap();
            for page in (0..96).step_by(7) {
                fill_page(&mem, page * P, 0x5a);
            }
            write_memory(&mem, &dir.path().join("base"), &WriteOptions::default()).unwrap();
            let chain: Vec<_> = steps
                .iter()
                .enumerate()
                .map(|(i, s)| step(&mem, &dir.path().join(format!("d{i}")), s))
                .collect();
            let diffs: Vec<ChainDiff<'_>> =
                chain.iter().map(|(file, ranges)| ChainDiff { file, ranges }).collect();
            let (ranges, _) = merge_diffs(96 * P, &diffs, &dir.path().join("m")).unwrap();
            let merged = file_mem(&dir.path().join("base"), &mem);
            map_overlay(&merged, &dir.path().join("m"), &ranges).unwrap();
            proptest::prop_assert!(contents(&merged) == contents(&mem));
        }
    }
}
