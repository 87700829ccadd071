//! Anonymous memory over the holes of a privately mapped memory file.
//!
//! A memory file is sparse: zero pages are holes. A `MAP_PRIVATE` mapping reads a hole as
//! zeros, but the page fault first gives the file a page-cache page for it, and on tmpfs that
//! page is the file system's own: every hole page the guest touches (read or write, before the
//! copy-on-write) takes a page of the tmpfs. A store on a nearly full tmpfs then fails the
//! fault (`SIGBUS` in the VMM, or a guest that never answers again). Mapping anonymous memory
//! over the holes (`MAP_FIXED`) makes them what they are in a booted VM: zero pages until
//! written, then the process's own memory, on every file system.
//!
//! Every hole mapped anonymous splits the file's mapping (two more VMAs), and a process may
//! hold `vm.max_map_count` (65530 by default) of them, with the diff overlays
//! ([`crate::map_overlay`]) needing their share. So only the [`MAX_HOLES`] longest holes per
//! mapping (of at least [`MIN_HOLE`]) are filled: what is left is reported
//! ([`HoleStats::file_hole_bytes`]), so a caller can still check that the file system has room
//! for it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::memory::{PAGE_SIZE, PageRange};

/// Holes shorter than this stay file-backed. One page: every hole counts, and [`MAX_HOLES`]
/// alone bounds the mappings. Measured on the memory files of this machine's test builds
/// (128 and 256 MiB guests, 114 to 987 holes each), a 64 KiB minimum left 1 to 12 MiB of short
/// holes to the file, 16 KiB still 0.6 to 3 MiB; every hole of each file fits the bound.
pub const MIN_HOLE: u64 = PAGE_SIZE;

/// Most holes filled per mapped range (the longest ones; each adds up to two VMAs).
pub const MAX_HOLES: usize = 1024;

/// What [`fill_holes`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoleStats {
    /// Holes mapped anonymous.
    pub filled: usize,
    /// Their bytes.
    pub filled_bytes: u64,
    /// Bytes of holes left file-backed (shorter than [`MIN_HOLE`] or beyond [`MAX_HOLES`]):
    /// on tmpfs, the most the guest can take from the file system.
    pub file_hole_bytes: u64,
}

impl HoleStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: HoleStats) {
        self.filled += other.filled;
        self.filled_bytes += other.filled_bytes;
        self.file_hole_bytes += other.file_hole_bytes;
    }
}

fn lseek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: lseek on a descriptor this function borrows; it only moves the file offset,
    // which nothing else here relies on (reads use pread).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset` before the end of the file.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(u64::try_from(r).unwrap_or(0)))
}

/// The data of `file` within `lo..hi` (page aligned), from `SEEK_DATA`/`SEEK_HOLE`, widened to
/// whole pages and merged where they touch. A file system without hole reporting reports all
/// of it as data (the kernel's generic `lseek`), which leaves nothing to fill.
pub fn data_extents(file: &File, lo: u64, hi: u64) -> io::Result<Vec<PageRange>> {
    let mut out: Vec<PageRange> = Vec::new();
    let mut pos = lo;
    while pos < hi {
        let Some(data) = lseek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= hi {
            break;
        }
        // Every file has an implicit hole at its end, so SEEK_HOLE finds one.
        let hole = lseek(file, data, libc::SEEK_HOLE)?.unwrap_or(hi);
        let start = (data / PAGE_SIZE * PAGE_SIZE).max(lo);
        let end = hole.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE).min(hi);
        match out.last_mut() {
            Some(last) if last.offset + last.len >= start => {
                last.len = end.max(last.offset + last.len) - last.offset;
            }
            _ => out.push(PageRange {
                offset: start,
                len: end - start,
            }),
        }
        if hole <= pos {
            // Cannot happen (SEEK_HOLE from data lands past it); never loop on it.
            break;
        }
        pos = hole;
    }
    Ok(out)
}

/// The holes of `lo..hi` around `data` (sorted, disjoint, inside `lo..hi`, as
/// [`data_extents`] returns them).
pub fn holes_between(data: &[PageRange], lo: u64, hi: u64) -> Vec<PageRange> {
    let mut holes = Vec::with_capacity(data.len() + 1);
    let mut at = lo;
    for d in data {
        if d.offset > at {
            holes.push(PageRange {
                offset: at,
                len: d.offset - at,
            });
        }
        at = at.max(d.offset + d.len);
    }
    if hi > at {
        holes.push(PageRange {
            offset: at,
            len: hi - at,
        });
    }
    holes
}

/// Of `holes` (sorted, disjoint), those worth mapping anonymous: at least `min_hole` long,
/// and at most `max_holes` of them, the longest (the earlier of equal ones), in file order.
/// Also returns the bytes of the holes left out.
pub fn holes_to_fill(
    mut holes: Vec<PageRange>,
    min_hole: u64,
    max_holes: usize,
) -> (Vec<PageRange>, u64) {
    let total: u64 = holes.iter().map(|h| h.len).sum();
    holes.retain(|h| h.len >= min_hole);
    if holes.len() > max_holes {
        // Longest first, earlier first among equals: deterministic for one file.
        holes.sort_by(|a, b| b.len.cmp(&a.len).then(a.offset.cmp(&b.offset)));
        holes.truncate(max_holes);
        holes.sort_by_key(|h| h.offset);
    }
    let kept: u64 = holes.iter().map(|h| h.len).sum();
    (holes, total - kept)
}

/// Which holes of `file` within `ranges` (sorted, disjoint, page aligned) to map anonymous,
/// with [`MIN_HOLE`] and at most [`MAX_HOLES`] over all of them, and the hole bytes left to
/// the file. The same answer [`fill_holes`] acts on, for a caller that only wants to know.
pub fn plan_holes(file: &File, ranges: &[PageRange]) -> io::Result<(Vec<PageRange>, u64)> {
    let mut holes = Vec::new();
    for r in ranges {
        let hi = r.offset + r.len;
        holes.extend(holes_between(
            &data_extents(file, r.offset, hi)?,
            r.offset,
            hi,
        ));
    }
    Ok(holes_to_fill(holes, MIN_HOLE, MAX_HOLES))
}

/// Maps anonymous zero memory over the holes [`plan_holes`] picks in `ranges` of a private
/// mapping of `file`; `host(offset)` is where file offset `offset` of a range is mapped and
/// that range's protection. The filled holes get `MADV_NOHUGEPAGE`: a
/// write there then takes one 4 KiB page, as it does over the file, so the pages a diff
/// snapshot takes as written stay exactly those written.
///
/// On an error, part of the holes may be anonymous already; their contents are zero either
/// way, so the mapping stays valid.
///
/// # Safety
/// For every range `r`, `host(r.offset)..host(r.offset) + r.len` must be a private mapping of
/// `file` from offset `r.offset` that the caller owns and that nothing uses meanwhile (no
/// vCPU, no device, no KVM memory slot yet), and `host(o).0` must be `host(r.offset).0 + (o -
/// r.offset)` inside it; the file must not change while it is mapped.
pub unsafe fn fill_holes(
    file: &File,
    ranges: &[PageRange],
    host: &dyn Fn(u64) -> (*mut u8, i32),
) -> io::Result<HoleStats> {
    let (holes, left) = plan_holes(file, ranges)?;
    let mut stats = HoleStats {
        file_hole_bytes: left,
        ..HoleStats::default()
    };
    for h in &holes {
        let n = usize::try_from(h.len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let (at, prot) = host(h.offset);
        // SAFETY: the hole lies inside one of the caller's ranges (holes are found per
        // range), so MAP_FIXED replaces exactly these pages of the caller's private mapping,
        // which nothing uses meanwhile, with anonymous zero pages: the same bytes a hole
        // reads as. The caller's unmap of its whole range later includes the replacement.
        let addr = unsafe {
            libc::mmap(
                at.cast(),
                n,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if addr.cast::<u8>() != at {
            return Err(io::Error::other("mmap ignored MAP_FIXED"));
        }
        // SAFETY: exactly the mapping just made; only changes how the kernel backs it.
        if unsafe { libc::madvise(addr, n, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        stats.filled += 1;
        stats.filled_bytes += h.len;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use proptest::prelude::*;

    use super::*;

    const P: u64 = PAGE_SIZE;

    fn r(offset: u64, len: u64) -> PageRange {
        PageRange { offset, len }
    }

    /// A sparse file of `pages` pages with data (byte = page index + 1) on the pages listed.
    fn sparse(pages: u64, data: &[u64]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(pages * P).unwrap();
        for &p in data {
            let byte = u8::try_from(p % 250).unwrap() + 1;
            f.as_file().write_all_at(&vec![byte; 4096], p * P).unwrap();
        }
        f.as_file().sync_all().unwrap();
        f
    }

    #[test]
    fn data_extents_finds_written_pages_and_merges_neighbours() {
        let f = sparse(64, &[0, 1, 2, 10, 40, 41, 63]);
        let got = data_extents(f.as_file(), 0, 64 * P).unwrap();
        // Some file systems allocate in larger blocks; none reports less than what was written.
        for p in [0, 1, 2, 10, 40, 41, 63] {
            assert!(
                got.iter()
                    .any(|e| e.offset <= p * P && p * P < e.offset + e.len),
                "page {p} not in {got:?}"
            );
        }
        for w in got.windows(2) {
            assert!(w[0].offset + w[0].len < w[1].offset, "{got:?}");
        }
        // Clipped to the window asked for.
        let mid = data_extents(f.as_file(), 8 * P, 48 * P).unwrap();
        assert!(
            mid.iter()
                .all(|e| e.offset >= 8 * P && e.offset + e.len <= 48 * P),
            "{mid:?}"
        );
        assert!(
            mid.iter()
                .any(|e| e.offset <= 10 * P && 10 * P < e.offset + e.len)
        );
    }

    #[test]
    fn data_extents_of_a_file_of_holes_is_empty() {
        let f = sparse(32, &[]);
        assert_eq!(data_extents(f.as_file(), 0, 32 * P).unwrap(), vec![]);
    }

    #[test]
    fn holes_to_fill_skips_short_holes_and_counts_them() {
        let data = [r(0, P), r(2 * P, P), r(100 * P, P)];
        let (holes, left) = holes_to_fill(holes_between(&data, 0, 200 * P), 16 * P, 10);
        assert_eq!(holes, vec![r(3 * P, 97 * P), r(101 * P, 99 * P)]);
        assert_eq!(left, P, "the one-page hole at page 1");
    }

    #[test]
    fn holes_to_fill_keeps_the_longest_when_there_are_too_many() {
        // Holes of 20, 30, 20, 50 pages between one-page data extents.
        let data = [r(0, P), r(21 * P, P), r(52 * P, P), r(73 * P, P)];
        let (holes, left) = holes_to_fill(holes_between(&data, 0, 124 * P), P, 2);
        assert_eq!(holes, vec![r(22 * P, 30 * P), r(74 * P, 50 * P)]);
        assert_eq!(left, 40 * P);
        // Ties: the earlier one.
        let (holes, _) = holes_to_fill(holes_between(&data, 0, 124 * P), P, 3);
        assert_eq!(
            holes,
            vec![r(P, 20 * P), r(22 * P, 30 * P), r(74 * P, 50 * P)]
        );
    }

    #[test]
    fn holes_to_fill_of_no_data_is_the_whole_range() {
        let (holes, left) = holes_to_fill(holes_between(&[], 8 * P, 40 * P), P, 1);
        assert_eq!((holes, left), (vec![r(8 * P, 32 * P)], 0));
    }

    proptest! {
        /// Whatever the layout: the holes filled are sorted, disjoint, inside the range, off
        /// every data extent, each at least `min_hole`, at most `max_holes`, and with the bytes
        /// left out they add up to all of the range's holes.
        #[test]
        fn holes_to_fill_partitions_the_holes(
            pages in proptest::collection::btree_set(0u64..512, 0..80),
            min in 1u64..8,
            max in 0usize..20,
        ) {
            let mut data: Vec<PageRange> = Vec::new();
            for p in pages {
                match data.last_mut() {
                    Some(l) if l.offset + l.len == p * P => l.len += P,
                    _ => data.push(r(p * P, P)),
                }
            }
            let (holes, left) = holes_to_fill(holes_between(&data, 0, 512 * P), min * P, max);
            prop_assert!(holes.len() <= max);
            for w in holes.windows(2) {
                prop_assert!(w[0].offset + w[0].len <= w[1].offset);
            }
            for h in &holes {
                prop_assert!(h.len >= min * P && h.offset + h.len <= 512 * P);
                for d in &data {
                    prop_assert!(h.offset + h.len <= d.offset || d.offset + d.len <= h.offset);
                }
            }
            let data_bytes: u64 = data.iter().map(|d| d.len).sum();
            let filled: u64 = holes.iter().map(|h| h.len).sum();
            prop_assert_eq!(filled + left + data_bytes, 512 * P);
        }
    }

    /// A private mapping with its holes filled: reads the file's data and zeros, writes stay
    /// private, the holes are anonymous mappings of their own, and the file is untouched.
    #[test]
    fn fill_holes_maps_anonymous_zeros_over_holes_only() {
        let pages = 256u64;
        let f = sparse(pages, &[0, 1, 100, 255]);
        let len = usize::try_from(pages * P).unwrap();
        // SAFETY: a new private mapping of the test's own file.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                f.as_file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let host = host.cast::<u8>();
        // SAFETY: the mapping above, of this file from offset 0, used by nobody else.
        let stats = unsafe {
            fill_holes(f.as_file(), &[r(0, pages * P)], &|o| {
                (
                    host.wrapping_add(usize::try_from(o).unwrap()),
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            })
        }
        .unwrap();
        // ext4 and tmpfs report holes page by page.
        assert_eq!(
            stats,
            HoleStats {
                filled: 2,
                filled_bytes: (98 + 154) * P,
                file_hole_bytes: 0
            }
        );
        // SAFETY: the whole mapping, still ours.
        let mem = unsafe { std::slice::from_raw_parts_mut(host, len) };
        for p in 0..pages {
            let want = if [0, 1, 100, 255].contains(&p) {
                u8::try_from(p % 250).unwrap() + 1
            } else {
                0
            };
            let at = usize::try_from(p * P).unwrap();
            assert!(mem[at..at + 4096].iter().all(|&b| b == want), "page {p}");
        }
        mem[50 * 4096] = 7;
        mem[100 * 4096] = 9;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let (lo, hi) = (host as usize, host as usize + len);
        let inside: Vec<&str> = maps
            .lines()
            .filter(|l| {
                let (a, b) = l.split(' ').next().unwrap().split_once('-').unwrap();
                let (a, b) = (
                    usize::from_str_radix(a, 16).unwrap(),
                    usize::from_str_radix(b, 16).unwrap(),
                );
                a < hi && b > lo
            })
            .collect();
        // file, hole, file, hole, file.
        assert_eq!(inside.len(), 5, "{inside:#?}");
        let mut back = vec![0u8; len];
        f.as_file().read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back[50 * 4096], 0);
        assert_eq!(back[100 * 4096], 101);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(host.cast(), len) };
    }
}
