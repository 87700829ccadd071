//! A `base "debian"` spec with `vm network=#true`: the base boots systemd, whose
//! systemd-networkd must get the guest's address from passt by DHCP (it needs udev for that:
//! without it every link stays "pending" and the base layer fails waiting for a default
//! route), then a `run` step restored from the base fetches a file over HTTP with what
//! Debian's minbase has (`apt-helper download-file`, apt's own HTTP client) from a server of
//! this test reached through the passt gateway. The file is in the built layer (`specc run`
//! reads it back), the layer's `service` is a systemd unit still running in a VM restored from
//! the built head, and a rebuild is cached without fetching again.
//!
//! The debootstrap tree and the image are made on the host first (root and the Debian mirror:
//! minutes the first time, cached under `$SPECC_HOME` after). The build itself runs inside
//! the rig on machines without hardware KVM; the rig has no network, so the server is inside
//! it too (passt maps its gateway address to the rig's loopback).

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

mod build_common;

use build_common::{build_ok, events_of, loopback_up, marker, prepare_on_host, run_ok, serve};
use specc_guestkit::rootfs::{self, Base, DEFAULT_DISK_BYTES, RootfsOptions};
use specc_rig::testing::run_in_rig_unless_hardware;

/// The spec's disk: the default image size, so the image the guest kit's own debian test
/// builds is this one too.
const DEBIAN_DISK: &str = "1GiB";

/// On the host: the debian bookworm image `specc build` will find cached (debootstrap needs
/// root and the mirror, neither of which the rig has).
fn prepare_debian_on_host() {
    if specc_rig::in_rig() {
        return;
    }
    assert_eq!(DEFAULT_DISK_BYTES, 1 << 30, "DEBIAN_DISK must match");
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "base \"debian\" runs debootstrap, which needs root: run this test as root"
    );
    let agent = rootfs::agent_binary().expect("building the static agent");
    rootfs::ensure_rootfs(
        &Base::Debian {
            suite: "bookworm".into(),
        },
        &RootfsOptions {
            disk_bytes: DEFAULT_DISK_BYTES,
            agent_path: agent,
        },
    )
    .expect("building the debian bookworm rootfs (needs the Debian mirror)");
}

#[test]
fn a_debian_base_gets_dhcp_and_a_run_step_fetches_over_the_network() {
    prepare_on_host();
    prepare_debian_on_host();
    if run_in_rig_unless_hardware("a_debian_base_gets_dhcp_and_a_run_step_fetches_over_the_network")
        .ran_in_rig()
    {
        return;
    }
    loopback_up();
    let m = marker();
    let body = format!("fetched by apt over passt {m}\n");
    let (port, seen) = serve(body.clone());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let spec = dir.path().join("debian-net.kdl");
    // /tmp first: apt-helper drops to its `_apt` user for the download and /root is not
    // theirs.
    std::fs::write(
        &spec,
        format!(
            r#"spec "debian-net" {{
    base "debian" suite="bookworm"
    vm vcpus=1 memory="256MiB" disk="{DEBIAN_DISK}" network=#true

    layer "fetch" {{
        run "gw=$(ip route show default | awk '{{print $3; exit}}'); /usr/lib/apt/apt-helper download-file http://$gw:{port}/file-{m} /tmp/fetched && mv /tmp/fetched /root/fetched && networkctl list --no-pager --no-legend > /root/links"
        service "ticker" exec="while :; do date +%s%N > /run/ticker.new; mv /run/ticker.new /run/ticker; sleep 0.2; done"
    }}
}}
"#
        ),
    )
    .unwrap();

    let started = std::time::Instant::now();
    let first = build_ok(&spec, &[]);
    eprintln!(
        "first build (debian base boot + fetch layer): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        events_of(&first, "fetch"),
        ["started", "finished"],
        "{first:?}"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "one fetch by the guest: {seen:?}");
        assert!(seen[0].starts_with(&format!("GET /file-{m} ")), "{seen:?}");
    }

    // The fetched file is in the built head's disk, and networkd had configured the link
    // (by DHCP in the base; the restored layer kept it).
    let stdout = run_ok(&spec, "cat /root/fetched; cat /root/links");
    let (fetched, links) = stdout.split_at(body.len().min(stdout.len()));
    assert_eq!(fetched, body, "{stdout}");
    let ether: Vec<&str> = links.lines().filter(|l| l.contains(" ether ")).collect();
    assert!(
        !ether.is_empty()
            && ether
                .iter()
                .all(|l| l.contains("routable") && l.contains("configured")),
        "every ethernet link configured and routable by networkd: {links}"
    );

    // The layer's service is a systemd unit, enabled, and still running in a VM restored
    // from the built head: its file keeps changing.
    let ticker = run_ok(
        &spec,
        "systemctl is-enabled ticker.service; systemctl is-active ticker.service; \
         a=$(cat /run/ticker); sleep 1; b=$(cat /run/ticker); \
         [ \"$b\" -gt \"$a\" ] && echo ticking",
    );
    assert!(
        ticker
            .split_whitespace()
            .eq(["enabled", "active", "ticking"]),
        "the ticker service after restore: {ticker}"
    );

    // Cached: the key covers the command, not what it fetched, so no second request.
    let again = build_ok(&spec, &[]);
    for layer in ["base", "fetch"] {
        assert_eq!(events_of(&again, layer), ["cached"], "{again:?}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "a cached layer fetches nothing"
    );
}
