//! A full store: `$SPECC_HOME` on a small ext4 file system, filled up so that a layer's
//! snapshot (16 MiB of non-zero guest memory: the store keeps every non-zero 4 KiB block)
//! cannot be written. The build ends with one error naming the store and ENOSPC, nothing of
//! the layer is left (no blob, temp file, scratch file or layer entry), the store verifies, and
//! once space is freed the same build succeeds.
//!
//! The file system is a loop-mounted ext4 image made on the host (mounting needs root), in the
//! target directory, which the rig shares: the rig's kernel has no loop devices, and a nearly
//! full tmpfs store is refused before the restore (a privately mapped tmpfs file takes a tmpfs
//! page for every hole the guest touches; before the check such a build hung). The build VMs
//! run inside the rig on machines without hardware KVM.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

mod build_common;

use std::process::Command;

use build_common::{
    DISK, build, build_ok, events_of, files_under, isolated_home, keys_of, marker, prepare_on_host,
    sh, store_verify,
};
use specc_rig::testing::run_in_rig_unless_hardware;

/// Where the test is, in a file beside the target directory's temp files: a rig test's own
/// output is only seen once it ends, and a slow one is killed first.
fn progress(what: &str) {
    use std::io::Write as _;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("build_full_store.progress");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(f, "{t} {what}");
    }
}

/// Free bytes on the file system of `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .expect("running df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df's answer")
}

/// The loop-mounted ext4 image, unmounted (and its image removed) however the test ends.
struct Mounted {
    at: std::path::PathBuf,
    image: std::path::PathBuf,
}

impl Mounted {
    /// A fresh 512 MiB ext4 file system at `at`, with no blocks reserved for root (the rig's
    /// QEMU writes as root, and would use them past what `df` calls available).
    fn ext4(at: std::path::PathBuf) -> Mounted {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "this test loop-mounts a small ext4 file system for the store, which needs root"
        );
        let image = at.with_extension("ext4");
        let _ = Command::new("umount").arg(&at).status();
        let _ = std::fs::remove_dir_all(&at);
        let _ = std::fs::remove_file(&image);
        std::fs::create_dir_all(&at).unwrap();
        sh(&format!(
            "truncate -s 512M {img} && mkfs.ext4 -q -F -m 0 {img} && mount -o loop {img} {at}",
            img = image.display(),
            at = at.display()
        ));
        Mounted { at, image }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Fills the file system of `dir` with a file of zeros (written, so allocated) until `keep`
/// bytes are left. Written rather than fallocated: the rig reaches the store over 9p.
fn fill_leaving(dir: &std::path::Path, keep: u64) -> std::path::PathBuf {
    use std::io::Write as _;
    let ballast = dir.join("ballast");
    let mut f = std::fs::File::create(&ballast).unwrap();
    let chunk = vec![0u8; 1 << 20];
    // Top up until the file system agrees (its own metadata takes some of what it reported).
    loop {
        let free = free_bytes(dir);
        if free <= keep + (1 << 20) {
            return ballast;
        }
        for _ in 0..(free - keep) >> 20 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
}

#[test]
fn a_full_store_fails_the_layer_cleanly_and_the_build_succeeds_once_space_is_freed() {
    prepare_on_host();
    // Inside the target directory: the rig shares the project tree, not the host's /tmp.
    let home = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("full-store-home");
    let _mounted = (!specc_rig::in_rig()).then(|| Mounted::ext4(home.clone()));
    if run_in_rig_unless_hardware(
        "a_full_store_fails_the_layer_cleanly_and_the_build_succeeds_once_space_is_freed",
    )
    .ran_in_rig()
    {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    isolated_home(&home);
    let m = marker();
    let base_only = dir.path().join("base.kdl");
    let vm = format!("vm vcpus=1 memory=\"128MiB\" disk=\"{DISK}\"");
    std::fs::write(
        &base_only,
        format!("spec \"full\" {{\n    base \"busybox\"\n    {vm}\n}}\n"),
    )
    .unwrap();
    let spec = dir.path().join("full.kdl");
    std::fs::write(
        &spec,
        format!(
            r#"spec "full" {{
    base "busybox"
    {vm}

    layer "noise" {{
        run "mkdir -p /mnt/m && mount -t tmpfs -o size=32m tmpfs /mnt/m && yes {m} | head -c 16777216 > /mnt/m/noise && echo {m}"
    }}
}}
"#
        ),
    )
    .unwrap();

    progress("building the base");
    let first = build_ok(&base_only, &[("SPECC_HOME", &home)]);
    assert_eq!(
        events_of(&first, "base"),
        ["started", "finished"],
        "{first:?}"
    );
    let store = home.join("store");
    let blobs_before = files_under(&store.join("blobs"));
    let layers_before = files_under(&store.join("layers"));

    // Leave 6 MiB: enough for the layer's disk diff and state, not for its memory.
    let ballast = fill_leaving(&home, 6 << 20);

    progress("building with the store full");
    let out = build(&spec, &[("SPECC_HOME", &home)]);
    progress("the build ended");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error: {stderr}");
    assert!(
        errors[0].contains(&format!("store {}", store.display())) && errors[0].contains("ENOSPC"),
        "the error names the store and ENOSPC: {stderr}"
    );
    let failed = build_common::events(&out.stdout);
    assert_eq!(
        events_of(&failed, "noise"),
        ["started", "failed"],
        "{failed:?}"
    );
    // Nothing half-written.
    assert_eq!(
        files_under(&store.join("blobs")),
        blobs_before,
        "no new blob"
    );
    assert_eq!(
        files_under(&store.join("layers")),
        layers_before,
        "no layer entry"
    );
    assert_eq!(files_under(&store.join("tmp")), Vec::<String>::new());
    assert_eq!(files_under(&store.join("building")), Vec::<String>::new());
    assert!(store_verify(&home).contains("1 layers checked, 0 bad blobs"));

    std::fs::remove_file(&ballast).unwrap();
    progress("building with space freed");
    let again = build_ok(&spec, &[("SPECC_HOME", &home)]);
    assert_eq!(events_of(&again, "base"), ["cached"], "{again:?}");
    assert_eq!(
        events_of(&again, "noise"),
        ["started", "finished"],
        "{again:?}"
    );
    let noise = &keys_of(&again)["noise"];
    assert!(
        store
            .join("layers")
            .join(noise)
            .join("layer.json")
            .is_file()
    );
    assert!(store_verify(&home).contains("2 layers checked, 0 bad blobs"));
}
