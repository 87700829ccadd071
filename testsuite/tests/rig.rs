//! Proof that the rig works: it runs host commands with their output, exit code, cwd and
//! environment, leaves no QEMU behind, and offers a hardware-style `/dev/kvm` on which a tiny
//! real-mode guest runs to completion with dirty-page logging.
//!
//! These tests run on plain `cargo test`: where `/dev/kvm` is not hardware-backed (PVM here),
//! the KVM test re-runs itself inside the rig.

// An integration test file is a test module of its own.
#![allow(clippy::tests_outside_test_module)]

use std::fs;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use specc_rig::testing::run_in_rig_unless_hardware;
use specc_rig::{KvmMode, Rig, RigCommand, RigConfig};

/// The tests here check that no QEMU child is left, so their rigs must not overlap.
static ONE_RIG: Mutex<()> = Mutex::new(());

fn one_rig() -> MutexGuard<'static, ()> {
    ONE_RIG.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Child processes of this process whose command name is QEMU's.
fn qemu_children() -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if field("PPid:").as_deref() == Some(me.to_string().as_str())
            && field("Name:").is_some_and(|n| n.starts_with("qemu-system"))
        {
            found.push(pid);
        }
    }
    found
}

#[test]
fn rig_runs_a_host_command_with_its_streams_exit_code_cwd_and_env() {
    let _one = one_rig();
    let project = Path::new(env!("CARGO_MANIFEST_DIR"));
    let marker = project.join("target-rig-proof.txt");
    fs::remove_file(&marker).ok();
    let script = format!(
        "echo out:$(pwd):$RIG_PROOF:$SPECC_IN_RIG; echo err >&2; test -c /dev/kvm && echo kvm; \
         echo written-inside > {}; exit 7",
        marker.display()
    );
    let mut cmd = RigCommand::new(["/bin/sh", "-c", &script]).expect("cwd");
    cmd.cwd = project.to_path_buf();
    cmd.env.push(("RIG_PROOF".into(), "it's here".into()));
    cmd.capture = true;
    let outcome = Rig::new(RigConfig::default()).run(&cmd).expect("rig run");
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    eprintln!("{}", outcome.timings);
    assert_eq!(
        stdout,
        format!("out:{}:it's here:1\nkvm\n", project.display())
    );
    assert_eq!(stderr, "err\n");
    assert_eq!(outcome.status.code(), Some(7));
    let written = fs::read_to_string(&marker).expect("file written inside the rig");
    assert_eq!(written, "written-inside\n");
    fs::remove_file(&marker).ok();
    assert_eq!(qemu_children(), Vec::<u32>::new(), "QEMU left behind");
}

#[test]
fn rig_reports_a_missing_program_as_exit_code_127() {
    let _one = one_rig();
    let mut cmd = RigCommand::new(["/nonexistent/program"]).expect("cwd");
    cmd.capture = true;
    let outcome = Rig::new(RigConfig::default()).run(&cmd).expect("rig run");
    assert_eq!(
        outcome.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&outcome.stderr)
    );
    assert_eq!(qemu_children(), Vec::<u32>::new(), "QEMU left behind");
}

/// Real-mode code at 0x1000: `mov al, 0x42; mov [0x2000], al; out 0x10, al; hlt`.
const TINY_GUEST: &[u8] = &[0xB0, 0x42, 0xA2, 0x00, 0x20, 0xE6, 0x10, 0xF4];
const MEM_SIZE: usize = 0x4000;

#[test]
fn rig_kvm_has_the_vmm_capabilities_and_runs_a_tiny_guest() {
    let _one = one_rig();
    if run_in_rig_unless_hardware("rig_kvm_has_the_vmm_capabilities_and_runs_a_tiny_guest")
        .ran_in_rig()
    {
        return;
    }
    let detection = specc_rig::detect();
    assert_eq!(detection.mode, KvmMode::Hardware, "{detection}");

    let kvm = Kvm::new().expect("open /dev/kvm");
    let mut missing = Vec::new();
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SyncMmu, "KVM_CAP_SYNC_MMU"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "/dev/kvm lacks {missing:?}");

    let started = Instant::now();
    // The in-kernel irqchip works, but on its own VM: with an in-kernel LAPIC, `hlt` blocks in
    // the kernel instead of exiting to userspace, and this guest ends with `hlt`.
    let irq_vm = kvm.create_vm().expect("create VM");
    irq_vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    irq_vm
        .create_pit2(kvm_bindings::kvm_pit_config::default())
        .expect("KVM_CREATE_PIT2");
    drop(irq_vm);
    let vm = kvm.create_vm().expect("create VM");
    // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED, "mmap guest memory");
    // SAFETY: the mapping is MEM_SIZE bytes, readable and writable, and TINY_GUEST fits at
    // offset 0x1000.
    unsafe {
        std::ptr::copy_nonoverlapping(
            TINY_GUEST.as_ptr(),
            mem.cast::<u8>().add(0x1000),
            TINY_GUEST.len(),
        );
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the region points at our mapping, which outlives the VM (unmapped at the end).
    unsafe { vm.set_user_memory_region(region) }.expect("set user memory region");

    let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
    let mut sregs = vcpu.get_sregs().expect("get sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("get regs");
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");

    let mut outs = Vec::new();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => outs.push((port, data.to_vec())),
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(outs, vec![(0x10, vec![0x42])]);
    // SAFETY: offset 0x2000 lies inside the MEM_SIZE mapping.
    let written = unsafe { *mem.cast::<u8>().add(0x2000) };
    assert_eq!(written, 0x42, "the guest's store reached guest memory");
    let dirty = vm.get_dirty_log(0, MEM_SIZE).expect("KVM_GET_DIRTY_LOG");
    assert_ne!(
        dirty[0] & (1 << 2),
        0,
        "page 0x2000 not in the dirty log: {dirty:x?}"
    );
    eprintln!(
        "tiny guest: VM setup + run to hlt took {:.3} ms",
        elapsed.as_secs_f64() * 1e3
    );
    drop(vcpu);
    drop(vm);
    // SAFETY: the VM using the mapping is gone; we own the mapping.
    unsafe { libc::munmap(mem, MEM_SIZE) };
}
