//! Prints store and artifact throughput figures for a sparse file (default: 1 GiB long, 100 MiB
//! of data in 1 MiB chunks, each half noise and half a repeating pattern, like guest memory):
//! put into the store, pack as sparse tar+gzip, unpack into a second store, verify.
//!
//! `cargo run --release -p specc-store --example pack_bench [-- LEN_MIB DATA_MIB [sha256|sparse]]`
//! (the last argument picks how blobs are named; default `sparse`, what the builder uses).

use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Instant;

use specc_store::{Algorithm, Store, sparse};

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut args = argv
        .iter()
        .take(2)
        .map(|a| a.parse::<u64>().expect("a number of MiB"));
    let len_mib = args.next().unwrap_or(1024);
    let data_mib = args.next().unwrap_or(100);
    let algo = match argv.get(2).map(String::as_str) {
        None | Some("sparse") => Algorithm::SparseSha256,
        Some("sha256") => Algorithm::Sha256,
        Some(other) => panic!("unknown algorithm {other}: sha256 or sparse"),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("memory");
    let f = File::create(&src).expect("create");
    f.set_len(len_mib << 20).expect("set_len");
    let stride = (len_mib / data_mib) << 20;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..data_mib {
        for (j, b) in chunk.iter_mut().enumerate() {
            if j < (1 << 19) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x.to_le_bytes()[0];
            } else {
                *b = u8::try_from(j % 61).expect("small") + 1;
            }
        }
        f.write_all_at(&chunk, i * stride).expect("write");
    }
    f.sync_all().expect("sync");
    drop(f);
    let mib = |n: u64| n as f64 / f64::from(1u32 << 20);

    let a = Store::open(dir.path().join("a")).expect("store");
    let t = Instant::now();
    let info = a.put_file_as(&src, algo).expect("put_file");
    let put = t.elapsed();
    // What the builder does with a fresh snapshot file: hash it in place and rename it in.
    let fresh = dir.path().join("fresh");
    sparse::copy_sparse(
        &File::open(&src).expect("open"),
        &File::create(&fresh).expect("create"),
        |_| {},
    )
    .expect("copy");
    let t = Instant::now();
    let adopted = a.adopt_file_as(&fresh, algo).expect("adopt");
    let adopt = t.elapsed();
    assert_eq!(adopted, info);

    let packed = dir.path().join("memory.tar.gz");
    let t = Instant::now();
    let out = BufWriter::with_capacity(1 << 20, File::create(&packed).expect("create"));
    sparse::pack(&a.blob_path(&info.digest), "memory", out)
        .expect("pack")
        .into_inner()
        .expect("flush");
    let pack = t.elapsed();
    let packed_len = std::fs::metadata(&packed).expect("meta").len();

    let b = Store::open(dir.path().join("b")).expect("store");
    let t = Instant::now();
    let mut w = b.blob_writer_as(algo).expect("writer");
    sparse::unpack(
        std::io::BufReader::with_capacity(1 << 20, File::open(&packed).expect("open")),
        &mut w,
        Some(info.size),
    )
    .expect("unpack");
    let got = w.finish(Some(&info.digest)).expect("finish");
    let unpack = t.elapsed();
    let t = Instant::now();
    b.verify_blob(&got.digest).expect("verify");
    let verify = t.elapsed();
    let blocks = std::fs::metadata(b.blob_path(&got.digest))
        .expect("meta")
        .blocks()
        * 512;

    println!(
        "sparse file: {len_mib} MiB long, {data_mib} MiB data, blobs named by {}",
        algo.name()
    );
    println!(
        "put_file_as (copy + digest): {put:.2?}  ({:.0} MiB/s of data)",
        data_mib as f64 / put.as_secs_f64()
    );
    println!(
        "adopt_file_as (digest in place + fsync + rename): {adopt:.2?}  ({:.0} MiB/s of data)",
        data_mib as f64 / adopt.as_secs_f64()
    );
    println!(
        "pack (sparse tar + gzip -1): {pack:.2?}  ({:.0} MiB/s of data), {:.1} MiB packed",
        data_mib as f64 / pack.as_secs_f64(),
        mib(packed_len)
    );
    println!(
        "unpack into the store (gunzip + digest + holes): {unpack:.2?}  ({:.0} MiB/s of data), {:.1} MiB allocated",
        data_mib as f64 / unpack.as_secs_f64(),
        mib(blocks)
    );
    println!("verify_blob: {verify:.2?}");
}
