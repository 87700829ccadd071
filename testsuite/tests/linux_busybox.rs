//! The Linux end to end: the busybox spec's guest (our kernel, our rootfs, our agent as PID 1)
//! boots in our VMM, the agent answers over virtio-vsock, runs `echo hello`, writes and reads a
//! file, and the guest powers off. Runs directly on hardware KVM, inside the rig elsewhere.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::time::{Duration, Instant};

use specc_machine::Machine;
use specc_protocol::{ExecRequest, WriteFileRequest};
use specc_rig::testing::run_in_rig_unless_hardware;

#[test]
fn busybox_guest_boots_execs_writes_files_and_powers_off() {
    let guest = specc_testsuite::prepare_busybox_guest();
    if run_in_rig_unless_hardware("busybox_guest_boots_execs_writes_files_and_powers_off")
        .ran_in_rig()
    {
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let config = guest.config(run.path().join("disk.diff"), false);
    let t0 = Instant::now();
    let mut vm = Machine::start(&config, run.path()).expect("starting specc-vmm");
    let mut agent = vm
        .connect_agent(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    let ready = t0.elapsed();

    let out = agent
        .exec_output(&ExecRequest::new(["echo", "hello"]))
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(out.status.success(), "{:?}", out.status);

    let mut req = WriteFileRequest::new("/root/e2e/note.txt");
    req.create_parents = true;
    agent
        .write_file(&req, b"written by the host\n")
        .expect("write");
    assert_eq!(
        agent.read_file("/root/e2e/note.txt").expect("read"),
        b"written by the host\n"
    );
    let uname = agent
        .exec_output(&ExecRequest::new(["uname", "-r"]))
        .expect("uname");
    let status = vm
        .power_off(&mut agent, Duration::from_secs(60))
        .expect("power off");
    assert!(status.success(), "specc-vmm ended with {status}");
    eprintln!(
        "linux e2e: kernel {} agent ready after {:.0} ms, whole run {:.0} ms",
        String::from_utf8_lossy(&uname.stdout).trim(),
        ready.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
}
