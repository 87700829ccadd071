//! Live fork of a Linux guest that has a network (virtio-net over passt). The source takes its
//! address by DHCP from its passt before the fork; the VMM starts a passt of its own for every
//! fork child, and each child must keep a working interface without reconfiguring it: eth0 is
//! up with the address, and a TCP connection to the gateway address reaches a listener on the
//! host's loopback (passt maps the gateway address to the host) carrying that VM's own name.
//! The source must still reach it after the fork too. Runs directly on hardware KVM, inside
//! the rig elsewhere.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::io::BufRead;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use specc_machine::Machine;
use specc_protocol::ExecRequest;
use specc_protocol::client::Client;
use specc_rig::testing::run_in_rig_unless_hardware;

/// busybox udhcpc hands the lease to a script; this one applies it.
const DHCP_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    ;;
esac
"#;

fn sh(agent: &mut Client<UnixStream>, script: &str) -> String {
    let out = agent
        .exec_output(&ExecRequest::new(["sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    assert!(
        out.status.success(),
        "{script:?} failed: {:?} {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Inside the rig: the rig has no network, and passt needs an interface with a default route
/// to take its addresses from (a tap device nobody opens does), and a user namespace to
/// sandbox itself in. Fails with the reason when the rig cannot give passt that.
fn prepare_rig_network() {
    let run = |script: &str| {
        std::process::Command::new("sh")
            .args(["-c", script])
            .output()
            .unwrap_or_else(|e| panic!("running {script:?}: {e}"))
    };
    let out = run("ip route show default");
    if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
        let out = run("ip tuntap add specc-net0 mode tap && \
             ip addr add 10.0.2.15/24 dev specc-net0 && ip link set specc-net0 up && \
             ip route add default via 10.0.2.2 dev specc-net0 onlink && ip link set lo up");
        assert!(
            out.status.success(),
            "setting up the rig's interface for passt: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run("unshare -U true");
    assert!(
        out.status.success(),
        "passt cannot run inside the rig: it sandboxes itself in a user namespace, and \
         creating one fails here ({}). The rig runs commands chrooted into the host tree \
         (runtime/rig/src/run.rs), and the kernel refuses CLONE_NEWUSER to a chrooted process; \
         the rig must make the host tree its root with a root switch (mount --move onto / and \
         chroot, as switch_root does) instead.",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// eth0 is up with an IPv4 address, and `name` sent to the gateway's `port` arrives at the
/// host's listener.
fn assert_network(
    agent: &mut Client<UnixStream>,
    name: &str,
    port: u16,
    got: &mpsc::Receiver<String>,
) {
    let addr = sh(agent, "ip -o -4 addr show dev eth0");
    assert!(
        addr.contains("inet "),
        "{name}: eth0 has no IPv4 address: {addr}"
    );
    // The kernel's link watch updates operstate from a delayed work item (up to a second
    // after the carrier comes), so a fresh interface can read "down" with traffic flowing.
    let state = sh(
        agent,
        "i=0; while s=$(cat /sys/class/net/eth0/operstate); [ \"$s\" != up ] && \
         [ $i -lt 50 ]; do i=$((i + 1)); sleep 0.1 2>/dev/null || sleep 1; done; echo $s",
    );
    assert_eq!(state, "up", "{name}: eth0 is {state}");
    let gateway = sh(agent, "ip route show default | awk '{print $3; exit}'");
    assert!(!gateway.is_empty(), "{name}: no default route");
    sh(agent, &format!("echo {name} | nc -w 10 {gateway} {port}"));
    let line = got
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{name}: nothing reached the host's listener"));
    assert_eq!(line, name, "{name}: the host received another VM's message");
    eprintln!("{name}: {addr}; reached the host through gateway {gateway}");
}

#[test]
fn fork_children_of_a_linux_guest_each_have_a_working_network() {
    let guest = specc_testsuite::prepare_busybox_guest();
    if run_in_rig_unless_hardware("fork_children_of_a_linux_guest_each_have_a_working_network")
        .ran_in_rig()
    {
        return;
    }
    if specc_rig::in_rig() {
        prepare_rig_network();
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("listening on the host's loopback");
    let port = listener.local_addr().expect("listener address").port();
    let (tx, got) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            if std::io::BufReader::new(&conn).read_line(&mut line).is_ok() {
                let _ = tx.send(line.trim().to_owned());
            }
        }
    });

    let run = tempfile::tempdir().unwrap();
    let config = guest.config(run.path().join("source/disk.diff"), true);
    let mut source = Machine::start(&config, &run.path().join("source")).expect("starting");
    let mut agent = source
        .connect_agent(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    sh(
        &mut agent,
        &format!("cat > /run/dhcp.sh <<'EOF'\n{DHCP_SCRIPT}EOF\nchmod 755 /run/dhcp.sh"),
    );
    sh(
        &mut agent,
        "ip link set eth0 up && udhcpc -i eth0 -n -q -f -t 10 -s /run/dhcp.sh",
    );
    assert_network(&mut agent, "source", port, &got);

    let dirs: Vec<PathBuf> = (0..2)
        .map(|i| run.path().join(format!("fork{i}")))
        .collect();
    let (pause_us, children) = source.fork(&dirs).expect("fork");
    eprintln!("fork: source paused {pause_us} us");
    let mut vms = Vec::new();
    for (i, c) in children.into_iter().enumerate() {
        let mut m = c
            .machine
            .unwrap_or_else(|| panic!("fork child {i} failed: {:?}", c.report));
        let mut a = m
            .connect_agent(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("fork child {i}: {e}"));
        Machine::announce_restored(&mut a, &format!("fork{i}")).expect("restored");
        vms.push((format!("fork{i}"), m, a));
    }
    for (name, _, a) in &mut vms {
        assert_network(a, name, port, &got);
    }
    assert_network(&mut agent, "source", port, &got);
    for (name, m, mut a) in vms {
        let status = m
            .power_off(&mut a, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{name}: power off: {e}"));
        assert!(status.success(), "{name}: specc-vmm ended with {status}");
    }
    let status = source
        .power_off(&mut agent, Duration::from_secs(60))
        .expect("power off");
    assert!(status.success(), "source: specc-vmm ended with {status}");
}
