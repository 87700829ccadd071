//! A spec with `vm network=#true`: a `run` step fetches a file over HTTP from a server of this
//! test (reached through the passt gateway, which passt maps to the host's loopback), the
//! file is in the built layer (`specc run` restores the head and reads it), and a rebuild is
//! cached without fetching again. Each layer restored from a parent waits for its new passt
//! through the agent itself, not the guest's `arping` (the `gateway` timing of its `finished`
//! event; `build_debian_net.rs` has a guest without `arping`). Runs next to the build VMs: inside the rig on machines
//! without hardware KVM (the rig has no network, so the server is inside it too).

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

mod build_common;

use build_common::{
    DISK, build_ok, events_of, loopback_up, marker, prepare_on_host, run_ok, serve,
};
use specc_rig::testing::run_in_rig_unless_hardware;

#[test]
fn a_run_step_fetches_over_the_network_into_the_layer() {
    prepare_on_host();
    if run_in_rig_unless_hardware("a_run_step_fetches_over_the_network_into_the_layer").ran_in_rig()
    {
        return;
    }
    loopback_up();
    let m = marker();
    let body = format!("fetched over passt {m}\n");
    let (port, seen) = serve(body.clone());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let spec = dir.path().join("net.kdl");
    std::fs::write(
        &spec,
        format!(
            r#"spec "net" {{
    base "busybox"
    vm vcpus=1 memory="128MiB" disk="{DISK}" network=#true

    layer "fetch" {{
        run "gw=$(ip route show default | awk '{{print $3; exit}}'); wget -q -O /root/fetched http://$gw:{port}/file-{m}"
    }}

    layer "after" {{
        run "wc -c < /root/fetched > /root/size"
    }}
}}
"#
        ),
    )
    .unwrap();

    let first = build_ok(&spec, &[]);
    for layer in ["fetch", "after"] {
        assert_eq!(
            events_of(&first, layer),
            ["started", "finished"],
            "{first:?}"
        );
    }
    // Every restored layer waited for its gateway through the agent; the base booted and got
    // its address by DHCP instead.
    let gateway_ms = |layer: &str| {
        first
            .iter()
            .find(|v| v["layer"] == layer && v["event"] == "finished")
            .and_then(|v| v["timings_ms"]["gateway"].as_u64())
    };
    assert_eq!(gateway_ms("base"), None, "{first:?}");
    for layer in ["fetch", "after"] {
        assert!(gateway_ms(layer).is_some(), "{layer}: {first:?}");
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "one fetch by the guest: {seen:?}");
        assert!(seen[0].starts_with(&format!("GET /file-{m} ")), "{seen:?}");
    }

    // The fetched file is in the built head's disk: `specc run` restores the snapshot (with
    // its network device, over a new passt) and reads it.
    assert_eq!(
        run_ok(&spec, "cat /root/fetched; cat /root/size"),
        format!("{body}{}\n", body.len())
    );

    // Cached: the key covers the command, not what it fetched (docs/spec-language.md), so no
    // second request reaches the server.
    let again = build_ok(&spec, &[]);
    for layer in ["base", "fetch", "after"] {
        assert_eq!(events_of(&again, layer), ["cached"], "{again:?}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "a cached layer fetches nothing"
    );
}
