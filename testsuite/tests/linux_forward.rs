//! Port forwarding end to end: a busybox guest runs a TCP service (`nc -l -e`) on its
//! loopback, and the host reaches it through `Machine::connect_port` (a fresh vsock
//! connection to the agent turned into a raw pipe by `connect`). Bytes go both ways in
//! volume, the guest service's close reaches the host as EOF, a port nobody listens on is
//! refused, a host half-close reaches the guest service as EOF while its reply still comes
//! back, and the agent keeps serving other connections while a pipe is open. Runs directly
//! on hardware KVM, inside the rig elsewhere.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use specc_machine::{Launch, Machine, MachineConfig, MachineError, Source};
use specc_protocol::{ClientError, ErrorKind, ExecRequest};
use specc_rig::testing::run_in_rig_unless_hardware;

const PORT: u16 = 8080;
/// Bytes the host sends to the guest service.
const UPLOAD: usize = 1 << 20;
/// The guest service's output before it reads: `seq 1 SEQ_TO`.
const SEQ_TO: u32 = 50_000;

fn refused(e: &MachineError) -> bool {
    matches!(e, MachineError::Agent(ClientError::Agent(info)) if info.kind == ErrorKind::ConnectionRefused)
}

fn busybox_config(run: &std::path::Path) -> MachineConfig {
    specc_testsuite::prepare_busybox_guest().config(run.join("disk.diff"), false)
}

#[test]
fn busybox_guest_service_is_reachable_through_connect_port() {
    let run = tempfile::tempdir().unwrap();
    let config = busybox_config(run.path());
    if run_in_rig_unless_hardware("busybox_guest_service_is_reachable_through_connect_port")
        .ran_in_rig()
    {
        return;
    }
    let t0 = Instant::now();
    let mut vm = Machine::start(&config, run.path()).expect("starting specc-vmm");
    let mut agent = vm
        .connect_agent(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    let ready = t0.elapsed();

    // Nothing listens yet: a clear refusal, not a hang or a dead pipe.
    let err = vm
        .connect_port(PORT, Duration::from_secs(60))
        .expect_err("nothing listens on the port yet");
    assert!(refused(&err), "expected connection refused, got: {err:?}");

    // The service: write a known stream, then hash exactly UPLOAD bytes of input and exit
    // (its close is the host's EOF). It runs as an exec on its own agent connection.
    let service = serve(
        &vm,
        PORT,
        &format!("seq 1 {SEQ_TO}; head -c {UPLOAD} | sha256sum"),
    );

    let t_listen = Instant::now();
    let mut pipe = connect_when_listening(&vm, PORT);
    let connected = t_listen.elapsed();

    // While the pipe is open the agent serves other requests on other connections.
    let out = agent
        .exec_output(&ExecRequest::new(["echo", "alongside"]))
        .expect("exec while a pipe is open");
    assert_eq!(out.stdout, b"alongside\n");

    let upload: Vec<u8> = (0..UPLOAD)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 256).unwrap())
        .collect();
    let expected_hash = format!("{:x}", Sha256::digest(&upload));
    let t_xfer = Instant::now();
    let mut writer = pipe.try_clone().unwrap();
    let upload_thread = std::thread::spawn(move || writer.write_all(&upload));
    let mut got = Vec::new();
    pipe.read_to_end(&mut got)
        .expect("reading the guest service's output");
    let xfer = t_xfer.elapsed();
    upload_thread
        .join()
        .unwrap()
        .expect("writing to the guest service");

    let mut expected: String = (1..=SEQ_TO).map(|i| format!("{i}\n")).collect();
    let seq_len = expected.len();
    expected.push_str(&format!("{expected_hash}  -\n"));
    let got = String::from_utf8(got).expect("the service writes text");
    assert_eq!(
        got.len(),
        expected.len(),
        "output length (tail: {:?})",
        &got[got.len().saturating_sub(200)..]
    );
    assert!(
        got == expected,
        "the guest's stream or hash differs: tail {:?}",
        &got[seq_len.min(got.len())..]
    );
    drop(pipe);

    let nc = service.join().expect("the service thread");
    assert!(
        nc.status.success(),
        "nc in the guest: {:?}, stderr {}",
        nc.status,
        String::from_utf8_lossy(&nc.stderr)
    );

    // A request/response service that answers only after its input ends: the host's
    // half-close must reach the guest as EOF while the way back stays open.
    let half = PORT + 1;
    let service = serve(&vm, half, "cat | sha256sum");
    let mut pipe = connect_when_listening(&vm, half);
    let request = vec![b'q'; 64 << 10];
    pipe.write_all(&request).expect("sending the request");
    pipe.shutdown(std::net::Shutdown::Write)
        .expect("half-closing the pipe");
    let mut reply = String::new();
    pipe.read_to_string(&mut reply)
        .expect("reading the reply after the half-close");
    assert_eq!(reply, format!("{:x}  -\n", Sha256::digest(&request)));
    let nc = service.join().expect("the half-close service thread");
    assert!(nc.status.success(), "half-close nc: {:?}", nc.status);

    let status = vm
        .power_off(&mut agent, Duration::from_secs(60))
        .expect("power off");
    assert!(status.success(), "specc-vmm ended with {status}");
    eprintln!(
        "linux forward: agent ready after {:.0} ms; port reachable {:.0} ms after starting nc; \
         {} KiB up + {} KiB down in {:.0} ms; whole run {:.0} ms",
        ready.as_secs_f64() * 1e3,
        connected.as_secs_f64() * 1e3,
        UPLOAD >> 10,
        seq_len >> 10,
        xfer.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
}

/// Runs `nc -l -p PORT -e sh -c SCRIPT` in the guest as an exec on its own agent connection;
/// the thread ends with the exec's output once the service's one connection is done.
fn serve(vm: &Machine, port: u16, script: &str) -> std::thread::JoinHandle<specc_protocol::Output> {
    let vsock = vm.vsock_path();
    let req = ExecRequest::new([
        "nc",
        "-l",
        "-p",
        &port.to_string(),
        "-e",
        "sh",
        "-c",
        script,
    ]);
    std::thread::spawn(move || {
        specc_protocol::Client::connect_uds(
            &vsock,
            specc_protocol::AGENT_VSOCK_PORT,
            Duration::from_secs(60),
        )
        .expect("an agent connection for the service")
        .exec_output(&req)
        .expect("running nc in the guest")
    })
}

/// Connect to a guest port once its service listens (until then the agent refuses).
fn connect_when_listening(vm: &Machine, port: u16) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match vm.connect_port(port, Duration::from_secs(60)) {
            Ok(s) => return s,
            Err(e) if refused(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!(
                "connect_port({port}): {e:?}\nconsole:\n{}",
                vm.console_tail(40)
            ),
        }
    }
}

/// What a daemon restart looks like to a VM: launched detached, the handle released (the VM
/// keeps running without an owner), then taken back by pid, still serving, and stopped.
#[test]
fn detached_guest_survives_release_and_is_attached_again_by_pid() {
    let run = tempfile::tempdir().unwrap();
    let config = busybox_config(run.path());
    if run_in_rig_unless_hardware("detached_guest_survives_release_and_is_attached_again_by_pid")
        .ran_in_rig()
    {
        return;
    }
    let mut vm = Machine::launch(&config, run.path(), Source::Boot, Launch { detached: true })
        .expect("starting specc-vmm detached");
    vm.connect_agent(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"))
        .exec_output(&ExecRequest::new(["true"]))
        .expect("exec before release");
    let pid = vm.release().expect("a running VMM has a pid");
    // The handle is gone; the VM is not.
    // SAFETY: getsid(2) only queries the process.
    let sid = unsafe { libc::getsid(pid) };
    assert_eq!(sid, pid, "a detached VMM leads its own session");

    let mut vm = Machine::attach(run.path(), pid).expect("attaching to the released VMM");
    let mut agent = vm
        .connect_agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = agent
        .exec_output(&ExecRequest::new(["echo", "still running"]))
        .expect("exec after attach");
    assert_eq!(out.stdout, b"still running\n");
    // The attached VMM is still our child: power-off reaps it and reports how it ended.
    let status = vm
        .power_off(&mut agent, Duration::from_secs(60))
        .expect("power off");
    assert!(status.success(), "specc-vmm ended with {status}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM was reaped, not left a zombie"
    );
}
