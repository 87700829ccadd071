//! Snapshots and live fork of a real Linux guest (our kernel, busybox, our agent as PID 1),
//! driven through the VMM's control socket and the agent, the way the builder and the daemon
//! will: fork a running VM two ways and check that the three VMs are independent (files,
//! entropy, hostnames) while a process started before the fork runs on in each; then snapshot
//! the source, restore it after a while, and check the guest's clock follows the host's.
//! Runs directly on hardware KVM, inside the rig elsewhere.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use specc_machine::{After, Disk, Machine, MachineConfig};
use specc_protocol::ExecRequest;
use specc_protocol::client::Client;
use specc_rig::testing::run_in_rig_unless_hardware;

fn sh(agent: &mut Client<UnixStream>, script: &str) -> String {
    let out = agent
        .exec_output(&ExecRequest::new(["sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    assert!(
        out.status.success(),
        "{script:?} failed: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn ticker(agent: &mut Client<UnixStream>) -> u64 {
    sh(agent, "cat /run/ticker").parse().expect("ticker value")
}

/// The ticker started before the fork still counts in this VM.
fn assert_ticking(agent: &mut Client<UnixStream>, who: &str) {
    let a = ticker(agent);
    std::thread::sleep(Duration::from_millis(1500));
    let b = ticker(agent);
    assert!(
        b > a,
        "{who}: the process started before the fork stopped ({a} -> {b})"
    );
}

#[test]
fn forks_of_a_linux_guest_are_independent_and_a_restored_snapshot_has_the_hosts_time() {
    let guest = specc_testsuite::prepare_busybox_guest();
    if run_in_rig_unless_hardware(
        "forks_of_a_linux_guest_are_independent_and_a_restored_snapshot_has_the_hosts_time",
    )
    .ran_in_rig()
    {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let config = guest.config(run.path().join("source/disk.diff"), false);
    let mut source = Machine::start(&config, &run.path().join("source")).expect("starting");
    let mut agent = source
        .connect_agent(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    sh(
        &mut agent,
        // Written aside and renamed, so a reader never sees a half-written value.
        "(i=0; while true; do i=$((i+1)); echo $i > /run/ticker.new; mv /run/ticker.new \
         /run/ticker; sleep 0.2; done) </dev/null >/dev/null 2>&1 &",
    );
    sh(&mut agent, "echo before > /root/before-fork && sync");
    assert_ticking(&mut agent, "source before the fork");

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
        let ack = Machine::announce_restored(&mut a, &format!("fork{i}")).expect("restored");
        assert!(ack.entropy_bytes > 0);
        vms.push((format!("fork{i}"), m, a));
    }
    Machine::announce_restored(&mut agent, "source").expect("restored");
    vms.push(("source".into(), source, agent));

    let mut entropy = Vec::new();
    for (name, _, a) in &mut vms {
        assert_eq!(sh(a, "cat /root/before-fork"), "before", "{name}");
        sh(a, &format!("echo {name} > /root/only-in-{name} && sync"));
        assert_eq!(sh(a, "hostname"), *name);
        entropy.push(sh(
            a,
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        ));
        assert_ticking(a, name);
    }
    for (name, _, a) in &mut vms {
        let files = sh(a, "ls /root");
        for other in ["fork0", "fork1", "source"] {
            assert_eq!(
                files.contains(&format!("only-in-{other}")),
                other == name.as_str(),
                "{name} sees /root: {files}"
            );
        }
    }
    assert_ne!(entropy[0], entropy[1], "forks read the same random bytes");
    assert_ne!(entropy[0], entropy[2]);
    assert_ne!(entropy[1], entropy[2]);

    // Snapshot the source and let it end; restore it later and check the clock.
    let (_, source, agent) = vms.pop().unwrap();
    drop(vms);
    let snap = run.path().join("snap");
    let report = source
        .snapshot(&snap, false, After::Exit)
        .expect("snapshot");
    eprintln!(
        "snapshot: paused {} us, {} of {} memory bytes written",
        report.pause_us, report.memory_data_bytes, report.memory_total_bytes
    );
    drop(agent);
    drop(source);
    std::thread::sleep(Duration::from_secs(5));
    let restored_config = MachineConfig {
        disk: Disk {
            layers: Vec::new(),
            top: run.path().join("restored/disk.diff"),
        },
        ..config
    };
    let mut restored =
        Machine::restore(&snap, &restored_config, &run.path().join("restored")).expect("restoring");
    let mut a = restored
        .connect_agent(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("restored: {e}"));
    let stale = sh(&mut a, "date +%s");
    let ack = Machine::announce_restored(&mut a, "restored").expect("restored");
    // The guest's wall clock with sub-second resolution (busybox `date` has no %N): the
    // modification time the guest kernel gives a file it touches.
    sh(&mut a, "touch /run/now");
    let guest = a.stat("/run/now", true).expect("stat").mtime_ns as f64 / 1e9;
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    eprintln!(
        "restored: guest clock was {stale}, stepped by {} ms, now {:.3} s off the host",
        ack.clock_step_ns / 1_000_000,
        guest - host
    );
    assert!(
        (guest - host).abs() < 1.0,
        "guest clock {guest} vs host {host} after Restored"
    );
    assert!(
        ack.clock_step_ns > 4_000_000_000,
        "the snapshot's clock should have been ~5 s behind, step {} ns",
        ack.clock_step_ns
    );
    assert_eq!(sh(&mut a, "cat /root/only-in-source"), "source");
    assert_ticking(&mut a, "restored");
    let status = restored
        .power_off(&mut a, Duration::from_secs(60))
        .expect("power off");
    assert!(status.success(), "specc-vmm ended with {status}");
}
