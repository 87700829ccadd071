//! `kill -9` of `specc build` while a later layer of a networked spec builds: no VMM and no
//! passt (the VMM's network backend) outlives the builder, the
//! store stays consistent (the finished layers are complete and verify, the killed layer is
//! not there, leftovers are only scratch files that the next build removes), and the next
//! build finds the finished layers cached and builds only the rest. Runs next to the build
//! VMs (inside the rig on machines without hardware KVM), so the kill reaches the builder
//! that owns them; killing the host side of a rig is `rig_cleanup.rs`.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

mod build_common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use build_common::{
    DISK, build_ok, events_of, files_under, isolated_home, keys_of, marker, passt_processes,
    prepare_on_host, processes_named, specc, store_verify,
};
use specc_rig::testing::run_in_rig_unless_hardware;

#[test]
fn a_killed_build_leaves_a_consistent_store_and_the_next_build_resumes() {
    prepare_on_host();
    if run_in_rig_unless_hardware(
        "a_killed_build_leaves_a_consistent_store_and_the_next_build_resumes",
    )
    .ran_in_rig()
    {
        return;
    }
    assert!(
        processes_named("specc-vmm").is_empty(),
        "a VMM runs before the test starts"
    );
    assert!(
        passt_processes().is_empty(),
        "a passt runs before the test starts"
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = dir.path().join("home");
    isolated_home(&home);
    let m = marker();
    let spec = dir.path().join("chain.kdl");
    std::fs::write(
        &spec,
        format!(
            r#"spec "chain" {{
    base "busybox"
    vm vcpus=1 memory="128MiB" disk="{DISK}" network=#true

    layer "one" {{
        run "echo one-{m} > /root/one"
    }}

    layer "two" {{
        run "echo two-{m}; sleep 15; echo two > /root/two"
    }}

    layer "three" {{
        run "cat /root/one /root/two > /root/three"
    }}
}}
"#
        ),
    )
    .unwrap();

    let mut child = specc(&["build", "--json"])
        .arg(&spec)
        .env("SPECC_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting specc build");
    let stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut passt_while_building = Vec::new();
    // Until layer two's step has started (after one's `finished`), then kill -9.
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading specc build's events");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let two_runs = v["event"] == "output"
            && v["layer"] == "two"
            && v["text"].as_str().is_some_and(|t| t.contains(&m));
        if v["event"] != "output" {
            seen.push(v);
        }
        if two_runs {
            passt_while_building = passt_processes();
            child.kill().expect("kill -9 specc build");
            break;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "specc build ended before the kill: {status}\n{seen:?}"
    );
    assert_eq!(events_of(&seen, "one"), ["started", "finished"], "{seen:?}");
    assert_eq!(events_of(&seen, "two"), ["started"], "{seen:?}");
    let keys = keys_of(&seen);
    assert!(
        !passt_while_building.is_empty(),
        "no passt ran while layer two built"
    );

    // The VMM dies with its builder (PR_SET_PDEATHSIG), and passt with the VMM (`--one-off`:
    // it quits when the VMM's end of its socket closes); give the kernel a moment to reap them.
    let t0 = Instant::now();
    let left = || [processes_named("specc-vmm"), passt_processes()];
    while left().iter().any(|p| !p.is_empty()) && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let [vmms, passts] = left();
    assert_eq!(vmms, Vec::<u32>::new(), "a VMM outlived the killed builder");
    assert_eq!(
        passts,
        Vec::<u32>::new(),
        "a passt outlived the killed builder"
    );

    // Consistent: base and one complete and intact, two absent; the killed layer's VM files
    // are in its scratch directory only.
    let store = home.join("store");
    let report = store_verify(&home);
    assert!(report.contains("2 layers checked, 0 bad blobs"), "{report}");
    for (layer, complete) in [("base", true), ("one", true), ("two", false)] {
        assert_eq!(
            store
                .join("layers")
                .join(&keys[layer])
                .join("layer.json")
                .is_file(),
            complete,
            "layer {layer}"
        );
    }
    let scratch = files_under(&store.join("building"));
    let two_prefix = format!("build-{}-", &keys["two"][..12]);
    assert!(
        scratch.iter().any(|f| f.starts_with(&two_prefix)),
        "the killed layer's scratch directory: {scratch:?}"
    );

    // Resumes: base and one cached, only two and three built; the dead scratch is gone.
    let again = build_ok(&spec, &[("SPECC_HOME", &home)]);
    for layer in ["base", "one"] {
        assert_eq!(events_of(&again, layer), ["cached"], "{again:?}");
    }
    for layer in ["two", "three"] {
        assert_eq!(
            events_of(&again, layer),
            ["started", "finished"],
            "{again:?}"
        );
    }
    assert_eq!(files_under(&store.join("building")), Vec::<String>::new());
    assert_eq!(files_under(&store.join("tmp")), Vec::<String>::new());
    let report = store_verify(&home);
    assert!(report.contains("4 layers checked, 0 bad blobs"), "{report}");
    let out = specc(&["run"])
        .arg(&spec)
        .env("SPECC_HOME", &home)
        .args(["--", "cat", "/root/three"])
        .output()
        .expect("running specc run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("one-{m}\ntwo\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
