//! Prints what a live fork costs the source VM with this VMM: pause the vCPUs, capture vCPU
//! and VM state, `fork(2)`, resume. Guest RAM is populated from the host first (every 4 KiB
//! page written) so the page-table copy is the one of a guest that used all of its memory.
//!
//! `cargo run --release -p specc-vmm --example fork_pause [MIB...]` (default 256 2048).

use std::time::{Duration, Instant};

use specc_vmm::config::SerialConfig;
use specc_vmm::vstate::memory::MemoryBacking;
use specc_vmm::{VmConfig, boot};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![256, 2048]
    } else {
        sizes
    };
    let guest = std::path::Path::new(env!("SPECC_TEST_GUESTS")).join("count.elf");
    for mib in sizes {
        let config = VmConfig {
            vcpus: 1,
            mem_bytes: mib << 20,
            kernel: guest.clone(),
            cmdline: String::new(),
            serial: SerialConfig::default(),
            disks: Vec::new(),
            vsock: None,
            net: None,
            rng: false,
            memory: MemoryBacking::Anonymous,
            hugepages: std::env::var_os("NO_THP").is_none(),
            hugetlb: std::env::var_os("HUGETLB").is_some(),
            // This example times fork(2) of the whole process itself.
            fork_mode: specc_vmm::snapshot::ForkMode::Cow,
            timeout_ms: None,
            control: None,
        };
        let mut vmm = boot(&config).expect("boot");
        let mem = vmm.memory().clone();
        let start = Instant::now();
        while mem.read_obj::<u64>(GuestAddress(0x20_0008)).unwrap_or(0) != 1 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "guest did not start"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        for r in mem.iter() {
            let mut off = 0;
            while off < r.len() {
                let a = r.start_addr().0 + off;
                // Leave the guest's own pages (code, tables, results) alone.
                if a >= 0x40_0000 {
                    mem.write_obj(1u8, GuestAddress(a)).unwrap();
                }
                off += 4096;
            }
        }
        let mut pauses = Vec::new();
        for _ in 0..7 {
            let t0 = Instant::now();
            vmm.pause().unwrap();
            let _vcpus = vmm.save_vcpu_states().unwrap();
            let _vm = vmm.save_vm_state().unwrap();
            let t_state = t0.elapsed();
            // SAFETY: quiesced process (the vCPU is paused); the child exits at once.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: immediate exit of the child, no destructors.
                unsafe { libc::_exit(0) };
            }
            let t_fork = t0.elapsed();
            vmm.resume().unwrap();
            let total = t0.elapsed();
            let mut status = 0;
            // SAFETY: pid is our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            pauses.push((total, t_state, t_fork - t_state));
        }
        pauses.sort();
        let (median, state, fork) = pauses[pauses.len() / 2];
        println!(
            "{{\"guest_mib\": {mib}, \"thp\": {}, \"pause_median_us\": {}, \"state_capture_us\": {}, \"fork_us\": {}, \"max_us\": {}}}",
            config.hugepages,
            median.as_micros(),
            state.as_micros(),
            fork.as_micros(),
            pauses.last().map(|p| p.0.as_micros()).unwrap_or(0)
        );
    }
}
