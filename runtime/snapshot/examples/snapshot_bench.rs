//! Prints figures for the snapshot file paths (a benchmark binary, never a test):
//! `cargo run --release -p specc-snapshot --example snapshot_bench [-- DIR]`.
//! Run it once with DIR on a disk and once on tmpfs (/dev/shm), where fsync costs nothing, to
//! tell the scan and copy from the disk.
//!
//! - write_memory of a 1 GiB anonymous guest with 64 MiB touched (1024 runs of 64 KiB spread
//!   over the whole range), with and without `skip_unpopulated`, each on a fresh mapping, with
//!   4 KiB pages and with transparent huge pages (where every touched run faults in 2 MiB);
//! - write_memory_diff and map_overlay of a diff with 1000 scattered dirty pages (mapped) and
//!   with 8192 (over the mapping bound: copied);
//! - merge_diffs of a chain of 5 overlapping diffs of 4096 pages each;
//! - encode/decode of a ~100 KB vmstate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use specc_snapshot::fuzzing::{SampleVmState, sample_state};
use specc_snapshot::memory::PAGE_SIZE;
use specc_snapshot::merge::{ChainDiff, merge_diffs};
use specc_snapshot::{
    DirtyPages, WriteOptions, decode, encode, map_overlay, write_memory, write_memory_diff,
};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

const GIB: usize = 1 << 30;
const RUN: usize = 64 << 10;

fn guest(thp: bool) -> Result<GuestMemoryMmap, Box<dyn std::error::Error>> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GIB)])?;
    let advice = if thp {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    for r in mem.iter() {
        // SAFETY: exactly the region's own fresh mapping; only changes how it is backed.
        if unsafe { libc::madvise(r.as_ptr().cast(), r.size(), advice) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    // 1024 runs of 64 KiB, one per MiB: 64 MiB of data spread over the whole GiB.
    let mut buf = vec![0u8; RUN];
    for run in 0..1024u64 {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u64 ^ run).to_le_bytes()[0] | 1;
        }
        mem.write_slice(&buf, GuestAddress(run << 20))?;
    }
    Ok(mem)
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("specc-snapshot-bench"));
    std::fs::create_dir_all(&dir)?;
    let base = dir.join("mem");

    for (skip, thp) in [(true, false), (false, false), (true, true)] {
        for rep in 0..3 {
            let mem = guest(thp)?;
            let s = write_memory(
                &mem,
                &base,
                &WriteOptions {
                    skip_unpopulated: skip,
                },
            )?;
            println!(
                "write_memory 1 GiB, 64 MiB touched, skip_unpopulated={skip}, THP={thp} (run {rep}): {:.1} ms, \
                 scanned {} pages, wrote {} MiB ({:.0} MiB/s of guest RAM, {:.0} MiB/s of data)",
                s.elapsed.as_secs_f64() * 1e3,
                s.pages_scanned,
                s.data_bytes >> 20,
                mib_s(s.total_bytes, s.elapsed),
                mib_s(s.data_bytes, s.elapsed),
            );
        }
    }

    let mem = guest(false)?;
    write_memory(&mem, &base, &WriteOptions::default())?;
    for (pages, label) in [
        (1000u64, "mapped"),
        (8192, "copied: over the mapping bound"),
    ] {
        let mut dirty = DirtyPages::none(&mem);
        // Every other page of a stride, so no two dirty pages coalesce into one range.
        let stride = (GIB as u64 / PAGE_SIZE) / pages;
        for i in 0..pages {
            let addr = GuestAddress(i * stride * PAGE_SIZE);
            mem.write_obj(i | 1, addr)?;
            dirty.mark_range(&mem, addr, 8)?;
        }
        let diff = dir.join(format!("diff{pages}"));
        let (ranges, s) = write_memory_diff(&mem, &diff, &dirty)?;
        println!(
            "write_memory_diff {} dirty pages of 1 GiB: {:.2} ms ({} ranges)",
            s.pages_scanned,
            s.elapsed.as_secs_f64() * 1e3,
            ranges.len()
        );
        let mut times = Vec::new();
        for _ in 0..5 {
            let restored = map_file(&base, &mem)?;
            let t = Instant::now();
            map_overlay(&restored, &diff, &ranges)?;
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "map_overlay {} ranges ({label}): median {:.2} ms, min {:.2} ms",
            ranges.len(),
            times[2].as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3
        );
    }

    // A suspend chain to compact: 5 diffs of 4096 dirty pages (16 MiB) each, every one
    // rewriting half of the previous one's pages and adding as many new ones.
    let mut chain = Vec::new();
    for d in 0..5u64 {
        let mut dirty = DirtyPages::none(&mem);
        for i in 0..4096u64 {
            let page = (d * 2048 + i) * 61 % (GIB as u64 / PAGE_SIZE);
            let addr = GuestAddress(page * PAGE_SIZE);
            mem.write_obj(d << 32 | i | 1, addr)?;
            dirty.mark_range(&mem, addr, 8)?;
        }
        let diff = dir.join(format!("chain{d}"));
        let (ranges, _) = write_memory_diff(&mem, &diff, &dirty)?;
        chain.push((diff, ranges));
    }
    let links: Vec<ChainDiff<'_>> = chain
        .iter()
        .map(|(file, ranges)| ChainDiff { file, ranges })
        .collect();
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let (_, s) = merge_diffs(GIB as u64, &links, &dir.join("merged"))?;
        times.push(s.elapsed);
        last = Some(s);
    }
    times.sort();
    if let Some(s) = last {
        println!(
            "merge_diffs of {} diffs ({} MiB of ranges, {} MiB covered, {} MiB data written): median {:.1} ms, min {:.1} ms",
            s.diffs,
            s.input_range_bytes >> 20,
            s.range_bytes >> 20,
            s.data_bytes >> 20,
            times[1].as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3
        );
    }

    let state = sample_state(5);
    let bytes = encode(&state)?;
    let payload = &bytes[specc_snapshot::state::HEADER_LEN..bytes.len() - 8];
    let mut enc = Vec::new();
    let mut dec = Vec::new();
    let mut post = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        std::hint::black_box(postcard::from_bytes::<SampleVmState>(payload)?);
        post.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(encode(&state)?);
        enc.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(decode::<SampleVmState>(&bytes, 1 << 20)?);
        dec.push(t.elapsed());
    }
    enc.sort();
    dec.sort();
    post.sort();
    println!(
        "vmstate of {} bytes: encode median {:.1} us, decode (checks + CRC64 + postcard) median {:.1} us, p95 {:.1} us",
        bytes.len(),
        enc[100].as_secs_f64() * 1e6,
        dec[100].as_secs_f64() * 1e6,
        dec[190].as_secs_f64() * 1e6
    );
    println!(
        "  of which postcard alone: median {:.1} us",
        post[100].as_secs_f64() * 1e6
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Guest memory of `like`'s layout mapped MAP_PRIVATE from the memory file at `path`.
fn map_file(
    path: &Path,
    like: &GuestMemoryMmap,
) -> Result<GuestMemoryMmap, Box<dyn std::error::Error>> {
    let file = std::sync::Arc::new(std::fs::File::open(path)?);
    let mut off = 0;
    let mut regions = Vec::new();
    for r in like.iter() {
        let region = MmapRegionBuilder::new(usize::try_from(r.len())?)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), off))
            .build()?;
        off += r.len();
        regions.push(GuestRegionMmap::new(region, r.start_addr()).ok_or("region")?);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}
