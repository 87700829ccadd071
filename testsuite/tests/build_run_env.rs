//! `specc run` runs its command as the spec's last layer leaves things: the folded `env`
//! (spec-wide and per layer), `workdir` and `user`, both on a built head (restored from its
//! snapshot) and on one that is not built (every layer applied at boot). `specc build` and
//! `specc run` re-run themselves inside the rig on machines without hardware KVM.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

mod build_common;

use build_common::{DISK, build_ok, events_of, marker, prepare_on_host, run_ok};

fn run_cmd(spec: &std::path::Path) -> String {
    run_ok(spec, "echo \"$GREETING $TARGET\"; pwd; id -u")
}

#[test]
fn specc_run_gets_the_final_env_workdir_and_user() {
    prepare_on_host();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let m = marker();
    let spec = dir.path().join("env.kdl");
    std::fs::write(
        &spec,
        format!(
            r#"spec "env" {{
    base "busybox"
    vm vcpus=1 memory="128MiB" disk="{DISK}"
    env GREETING="hello"

    layer "app" {{
        run "mkdir -p /srv/app && echo {m} > /srv/app/marker"
        env TARGET="world"
        workdir "/srv/app"
        user "nobody"
    }}
}}
"#
        ),
    )
    .unwrap();
    let want = "hello world\n/srv/app\n65534\n";
    // Not built: the layers are applied at boot, then the command runs.
    assert_eq!(run_cmd(&spec), want, "unbuilt");
    let built = build_ok(&spec, &[]);
    assert_eq!(
        events_of(&built, "app"),
        ["started", "finished"],
        "{built:?}"
    );
    assert_eq!(run_cmd(&spec), want, "restored from the built head");
}
