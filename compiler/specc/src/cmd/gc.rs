//! `specc gc --max-size SIZE`: shrink the store to a size budget.

use std::process::ExitCode;

use anyhow::{Context, bail};
use specc_store::Store;

/// Arguments of `specc gc`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep the store's blobs within this many bytes on disk (`10G`, `512M`, `1T`, or bytes).
    /// Without it, only leftovers and unreferenced blobs are removed.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
}

/// Runs `specc gc`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open_default().context("open the store")?;
    let r = store.gc(args.max_size.unwrap_or(u64::MAX))?;
    for key in &r.removed_layers {
        println!("evicted layer {key}");
    }
    println!(
        "store {}: {} -> {} ({} layers, {} blobs, {} leftovers removed)",
        store.root().display(),
        human(r.bytes_before),
        human(r.bytes_after),
        r.removed_layers.len(),
        r.removed_blobs,
        r.removed_tmp
    );
    if r.pins > 0 {
        println!(
            "kept because of {} pins (specd VMs): {} layers, {}",
            r.pins,
            r.pinned_layers,
            human(r.pinned_bytes)
        );
    }
    if let Some(max) = args.max_size
        && r.bytes_after > max
    {
        println!(
            "still over {}: the rest is pinned (delete the VMs that need it to free it)",
            human(max)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `10G` → 10 GiB; suffixes K, M, G, T (binary, optional `iB`/`B`), or plain bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let Ok(n) = num.trim().parse::<u64>() else {
        bail!("bad size {s:?}: want e.g. 10G, 512M or a byte count");
    };
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("size {s:?} is too large"))
}

/// Bytes as a short human string.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("10G").expect("10G"), 10 << 30);
        assert_eq!(parse_size("512MiB").expect("512MiB"), 512 << 20);
        assert_eq!(parse_size("4096").expect("bytes"), 4096);
        assert_eq!(parse_size("1t").expect("1t"), 1 << 40);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
