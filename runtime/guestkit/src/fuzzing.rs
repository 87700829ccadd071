//! Entry points that feed untrusted bytes to the image unpacker (OCI layers from a registry or
//! a layout on disk), shared by the cargo-fuzz target in `runtime/guestkit/fuzz/` and the
//! property tests below; not part of the guest kit's API.
//!
//! The invariant checked is the unpacker's: whatever the archives hold, nothing outside the
//! unpack root changes, and every outcome is a value or an error (never a panic).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::oci::unpack::Tree;

/// File data one case may write (a bomb of sparse or repeated entries stays small).
const BUDGET: u64 = 4 << 20;

/// A directory removed on drop, unique per process and case.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "specc-unpack-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("creating the fuzz scratch directory");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Everything under `dir` (not following symlinks): kind, mode, size, link target, content.
fn listing(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(&p).ok())
            } else if m.is_dir() {
                todo.push(p.clone());
                format!("dir {:o}", m.mode())
            } else {
                format!("file {:o} {:?}", m.mode(), fs::read(&p).ok())
            };
            out.insert(p, what);
        }
    }
    out
}

/// Unpacks up to three layers (`data[0]` picks how many; the rest is cut into that many
/// pieces on 512-byte tar block boundaries) into a fresh tree beside a directory of "host"
/// files, and panics if any of those changed.
pub fn unpack_layers(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(sel % 3) + 1;
    let piece = rest.len().div_ceil(n).next_multiple_of(512).max(512);
    let scratch = Scratch::new();
    let outside = scratch.0.join("outside");
    fs::create_dir_all(outside.join("a")).expect("creating the outside directory");
    fs::write(outside.join("secret"), "host file").expect("writing the host file");
    std::os::unix::fs::symlink("/etc", outside.join("etc")).expect("symlinking");
    let before = listing(&outside);
    let Ok(mut tree) = Tree::create(&scratch.0.join("root"), BUDGET) else {
        return;
    };
    for layer in rest.chunks(piece) {
        if tree.apply_layer(layer).is_err() {
            break;
        }
    }
    assert_eq!(
        listing(&outside),
        before,
        "a layer changed something outside the unpack root"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A layer that tries the classic escapes: a symlink out of the root, then writes
    /// through it, a `..` name and a hard link to a host file.
    fn escaping_layer(outside: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "evil", outside).unwrap();
        for name in ["evil/secret", "evil/a/new"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(4);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &b"pwnd"[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "hard", format!("{outside}/secret"))
            .unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn an_escaping_layer_is_contained() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "the unpacker tests need root");
        for target in ["/", "../outside", "/../../outside"] {
            unpack_layers(&[&[0u8][..], &escaping_layer(target)].concat());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn mutated_escaping_layers_are_contained(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
            sel in any::<u8>(),
        ) {
            let mut data = [&[sel][..], &escaping_layer("../outside")].concat();
            for (at, x) in flips {
                let i = at.index(data.len() - 1) + 1;
                data[i] ^= x;
            }
            unpack_layers(&data);
        }

        #[test]
        fn random_bytes_are_contained(data in prop::collection::vec(any::<u8>(), 0..4096)) {
            unpack_layers(&data);
        }
    }
}
