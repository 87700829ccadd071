//! Many execs at once on one Linux guest, each on its own agent connection, as the daemon
//! makes them: every one must return its own output and exit code. A reply lost anywhere
//! between the guest's agent, the vsock device and the host shows up here as a missing
//! answer (reported with how many came back), not as a hang. Booted, then restored from a
//! snapshot (what the daemon serves). Runs directly on hardware KVM, inside the rig elsewhere.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::sync::mpsc;
use std::time::{Duration, Instant};

use specc_machine::{After, Disk, Machine, MachineConfig};
use specc_protocol::ExecRequest;
use specc_rig::testing::run_in_rig_unless_hardware;

/// Execs in flight at once.
const AT_ONCE: usize = 20;
const ROUNDS: usize = 3;

#[test]
fn twenty_concurrent_execs_on_one_guest_all_answer() {
    let guest = specc_testsuite::prepare_busybox_guest();
    if run_in_rig_unless_hardware("twenty_concurrent_execs_on_one_guest_all_answer").ran_in_rig() {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let config = guest.config(run.path().join("disk.diff"), false);
    let mut vm = Machine::start(&config, run.path()).expect("starting specc-vmm");
    let agent = vm
        .connect_agent(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));

    rounds(&vm, "booted");

    // The daemon serves VMs restored from snapshots: the same again on one.
    let snap = run.path().join("snap");
    drop(agent);
    vm.snapshot(&snap, false, After::Exit).expect("snapshot");
    drop(vm);
    let restored_config = MachineConfig {
        disk: Disk {
            layers: Vec::new(),
            top: run.path().join("restored/disk.diff"),
        },
        ..config
    };
    let mut vm =
        Machine::restore(&snap, &restored_config, &run.path().join("restored")).expect("restoring");
    let mut agent = vm
        .connect_agent(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("restored: {e}"));
    Machine::announce_restored(&mut agent, "restored").expect("restored");
    rounds(&vm, "restored");
    let status = vm
        .power_off(&mut agent, Duration::from_secs(60))
        .expect("power off");
    assert!(status.success(), "specc-vmm ended with {status}");
}

fn rounds(vm: &Machine, who: &str) {
    for round in 0..ROUNDS {
        let t0 = Instant::now();
        let (tx, rx) = mpsc::channel();
        for i in 0..AT_ONCE {
            let vsock = vm.vsock_path();
            let tx = tx.clone();
            std::thread::spawn(move || {
                let r = specc_protocol::Client::connect_uds(
                    &vsock,
                    specc_protocol::AGENT_VSOCK_PORT,
                    Duration::from_secs(120),
                )
                .and_then(|mut c| {
                    c.exec_output(&ExecRequest::new([
                        "sh",
                        "-c",
                        &format!("echo {round}.{i}; exit {}", i % 7),
                    ]))
                });
                let _ = tx.send((i, r));
            });
        }
        drop(tx);
        let deadline = t0 + Duration::from_secs(300);
        let mut answered = 0;
        while answered < AT_ONCE {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((i, r)) = rx.recv_timeout(left) else {
                panic!(
                    "{who} round {round}: only {answered} of {AT_ONCE} concurrent execs answered within \
                     300 s\nconsole:\n{}",
                    vm.console_tail(40)
                );
            };
            let out = r.unwrap_or_else(|e| panic!("{who} round {round}, exec {i}: {e}"));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{round}.{i}\n"),
                "exec {i} got another exec's output"
            );
            assert_eq!(out.status.code, Some(i32::try_from(i % 7).unwrap()));
            answered += 1;
        }
        eprintln!(
            "{who} round {round}: {AT_ONCE} concurrent execs answered in {:.0} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
}
