//! A store on a nearly full tmpfs: a layer restored from its parent runs a step that writes
//! 16 MiB into guest memory, far more than the tmpfs has left, and the build ends with one
//! error naming the store and ENOSPC when the snapshot does not fit, nothing half-written.
//! It used to hang: a private mapping of a tmpfs file takes a tmpfs page for every hole of the
//! memory file the guest touches, the guest's access failed mid-step once the tmpfs was full,
//! and the VM never answered again. The VMM now maps the holes anonymous (only holes beyond its
//! bound on mappings stay on the file, and `specc build` refuses up front when even those do
//! not fit), so the step runs and only the snapshot's write meets the full tmpfs. Once space is
//! freed, the same build succeeds. The tmpfs is mounted inside the rig (the build VMs run
//! there on machines without hardware KVM).

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

mod build_common;

use std::process::Command;

use build_common::{
    DISK, build, build_ok, events_of, files_under, isolated_home, marker, prepare_on_host, sh,
};
use specc_rig::testing::run_in_rig_unless_hardware;

/// The tmpfs, unmounted however the test ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_nearly_full_tmpfs_store_fails_the_layer_with_one_error() {
    prepare_on_host();
    if run_in_rig_unless_hardware("a_nearly_full_tmpfs_store_fails_the_layer_with_one_error")
        .ran_in_rig()
    {
        return;
    }
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "this test mounts a small tmpfs for the store, which needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=400m tmpfs {}",
        home.display()
    ));
    let _mounted = Tmpfs(home.clone());
    isolated_home(&home);
    let m = marker();
    let vm = format!("vm vcpus=1 memory=\"128MiB\" disk=\"{DISK}\"");
    let base_only = dir.path().join("base.kdl");
    std::fs::write(
        &base_only,
        format!("spec \"t\" {{\n    base \"busybox\"\n    {vm}\n}}\n"),
    )
    .unwrap();
    let spec = dir.path().join("t.kdl");
    std::fs::write(
        &spec,
        format!(
            "spec \"t\" {{\n    base \"busybox\"\n    {vm}\n    layer \"a\" {{\n        run \"mkdir -p /mnt/m && mount -t tmpfs -o size=32m tmpfs /mnt/m && yes {m} | head -c 16777216 > /mnt/m/noise && echo {m}\"\n    }}\n}}\n"
        ),
    )
    .unwrap();
    let first = build_ok(&base_only, &[("SPECC_HOME", &home)]);
    assert_eq!(
        events_of(&first, "base"),
        ["started", "finished"],
        "{first:?}"
    );
    let store = home.join("store");
    let layers_before = files_under(&store.join("layers"));

    // Leave 6 MiB: far less than the holes of the base's 128 MiB memory file and than the
    // 16 MiB the layer's step writes into guest memory that the snapshot left out (over the
    // file, those writes faulted on the full tmpfs and the build hung), and than the diff of
    // those 16 MiB, which is where the build must stop.
    sh(&format!(
        "avail=$(df -B1 --output=avail {h} | tail -1); \
         dd if=/dev/zero of={h}/ballast bs=1M count=$(( (avail >> 20) - 6 )) 2>/dev/null",
        h = home.display()
    ));
    let out = build(&spec, &[("SPECC_HOME", &home)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error: {stderr}");
    assert!(
        errors[0].contains(&format!("store {} is out of disk space", store.display()))
            && errors[0].contains("ENOSPC"),
        "the snapshot's write fails with the store full (not the up-front refusal: the VMM \
         maps the memory file's long holes anonymous): {stderr}"
    );
    let failed = build_common::events(&out.stdout);
    assert_eq!(events_of(&failed, "a"), ["started", "failed"], "{failed:?}");
    assert_eq!(
        files_under(&store.join("layers")),
        layers_before,
        "no layer entry"
    );
    assert_eq!(files_under(&store.join("building")), Vec::<String>::new());

    std::fs::remove_file(home.join("ballast")).unwrap();
    let again = build_ok(&spec, &[("SPECC_HOME", &home)]);
    assert_eq!(events_of(&again, "base"), ["cached"], "{again:?}");
    assert_eq!(events_of(&again, "a"), ["started", "finished"], "{again:?}");
}
