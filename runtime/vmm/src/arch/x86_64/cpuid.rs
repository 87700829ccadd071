//! Shapes `KVM_GET_SUPPORTED_CPUID` into what each vCPU sees: its APIC id, the hypervisor bit,
//! and a topology of `n` single-thread cores in one package (leaves 0x1, 0x4, 0xb, 0x1f,
//! 0x8000_0001, 0x8000_0008, 0x8000_001e).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EAX_TURBO: u32 = 1 << 1;
const ECX_ENERGY_PERF_BIAS: u32 = 1 << 3;
const ECX_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
const CLFLUSH_LINE_8_QWORDS: u32 = 8;

const ECX_CX16: u32 = 1 << 13;

const ECX_TSC_DEADLINE: u32 = 1 << 24;

const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;

/// Hides KVM's asynchronous page faults from the guest (leaf 0x4000_0001), so a guest never
/// turns them on. With them, a guest task that touches a page the host must first read in
/// (every restored VM's RAM is a private mapping of its memory file) is put to sleep until
/// KVM sends "page ready". That wake-up is state in the host kernel that no snapshot carries:
/// a task waiting at a snapshot sleeps for ever in every VM restored from it. And on AMD
/// (the rig's emulated CPU) tasks of restored VMs stopped waking up under load: a `true`
/// that never exited, then every fork of the agent behind it (docs/benchmarks.md, issue 7;
/// Firecracker and Cloud Hypervisor hide the feature for the same hangs). Without them
/// the vCPU itself waits for the page, which is all a one-process-per-VM guest loses.
pub fn hide_async_pf(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_KVM_FEATURES)
    {
        e.eax &= !(KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_VMEXIT | KVM_FEATURE_ASYNC_PF_INT);
    }
}

/// Announces the LAPIC TSC-deadline timer. KVM emulates it in the in-kernel LAPIC but leaves the
/// bit out of KVM_GET_SUPPORTED_CPUID (KVM_CAP_TSC_DEADLINE_TIMER says whether it can);
/// without it Linux calibrates the LAPIC timer against the PIT, which fails under emulation
/// ("APIC timer disabled due to verification failure") and leaves the guest without
/// high-resolution timers.
pub fn set_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        e.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Hides what KVM's instruction emulator cannot emulate, for hosts (PVM) where unmodified
/// guests run under it (docs/pvm.md): `cmpxchg16b` (CX16), which SLUB's lockless fast path
/// uses; without it SLUB takes its locked path. (XSAVE cannot be hidden this way: PVM keeps
/// reporting it whatever KVM_SET_CPUID2 says; docs/pvm.md has the guest-side workaround.)
pub fn hide_unemulated(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        e.ecx &= !ECX_CX16;
    }
}

/// Bits needed to number `n` things: the x2APIC id shift of a topology level.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `num_cpus`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, num_cpus: u8) {
    let id = u32::from(cpu_id);
    let n = u32::from(num_cpus.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (id << 24) | (n << 16) | (CLFLUSH_LINE_8_QWORDS << 8);
                e.ecx |= ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let level = (e.eax >> 5) & 0x7;
                // No SMT: L1/L2 are per core; the last level is shared by the whole package.
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
            }
            LEAF_THERMAL_POWER => {
                e.eax &= !EAX_TURBO;
                e.ecx &= !ECX_ENERGY_PERF_BIAS;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = LEVEL_SMT << 8;
                    }
                    1 => {
                        e.eax = id_bits(n);
                        e.ebx = n;
                        e.ecx = (LEVEL_CORE << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff;
                    }
                }
            }
            LEAF_EXT_FEATURES => {
                // CmpLegacy means "HTT counts cores"; only true with more than one.
                if n > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDR_SIZES => {
                // AMD: ECX[7:0] = cores - 1, ECX[15:12] = APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(n) << 12) | (n - 1);
            }
            LEAF_EXT_APIC_ID => {
                e.eax = id;
                e.ebx &= !0xff00; // one thread per core
                e.ecx &= !0x7ff; // node 0, one node
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        let mut l4 = leaf(LEAF_CACHE_PARAMS, 2);
        l4.eax = (3 << 5) | 0x1; // L3 unified
        vec![
            leaf(LEAF_FEATURES, 0),
            l4,
            leaf(LEAF_TOPOLOGY, 0),
            leaf(LEAF_TOPOLOGY, 1),
            leaf(LEAF_TOPOLOGY, 2),
            leaf(LEAF_EXT_APIC_ID, 0),
            leaf(LEAF_EXT_ADDR_SIZES, 0),
        ]
    }

    #[test]
    fn each_vcpu_gets_its_own_apic_id_and_the_hypervisor_bit() {
        for cpu in 0..4u8 {
            let mut e = sample();
            filter(&mut e, cpu, 4);
            assert_eq!(e[0].ebx >> 24, u32::from(cpu));
            assert_eq!((e[0].ebx >> 16) & 0xff, 4);
            assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
            assert_ne!(e[0].edx & EDX_HTT, 0);
            assert_eq!(e[2].edx, u32::from(cpu));
            assert_eq!(e[5].eax, u32::from(cpu));
        }
    }

    #[test]
    fn topology_leaf_describes_n_cores_in_one_package() {
        let mut e = sample();
        filter(&mut e, 0, 6);
        assert_eq!((e[2].ebx, e[2].ecx >> 8), (1, LEVEL_SMT));
        assert_eq!(
            (e[3].eax, e[3].ebx, (e[3].ecx >> 8) & 0xff),
            (3, 6, LEVEL_CORE)
        );
        assert_eq!((e[4].ebx, (e[4].ecx >> 8) & 0xff), (0, 0));
        assert_eq!(e[1].eax >> 26, 5);
        assert_eq!((e[1].eax >> 14) & 0xfff, 5);
        assert_eq!(e[6].ecx & 0xff, 5);
    }

    #[test]
    fn hide_unemulated_clears_cx16_only() {
        let mut e = sample();
        e[0].ecx = ECX_CX16 | 1;
        hide_unemulated(&mut e);
        assert_eq!(e[0].ecx, 1);
    }

    #[test]
    fn hide_async_pf_clears_the_three_async_pf_bits_of_the_kvm_leaf_only() {
        let mut e = sample();
        let mut kvm = leaf(LEAF_KVM_FEATURES, 0);
        // clocksource2 (3), async PF (4), steal time (5), async PF vmexit (10), async PF
        // int (14), clocksource stable (24).
        kvm.eax = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 10) | (1 << 14);
        kvm.edx = 1 << 4;
        e.push(kvm);
        e[0].eax = 1 << 4;
        hide_async_pf(&mut e);
        assert_eq!(e[7].eax, (1 << 3) | (1 << 5));
        assert_eq!(e[7].edx, 1 << 4, "only eax holds KVM feature bits");
        assert_eq!(e[0].eax, 1 << 4, "other leaves are untouched");
    }

    #[test]
    fn tsc_deadline_bit_is_set_in_leaf_1() {
        let mut e = sample();
        set_tsc_deadline(&mut e);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e[1].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn single_vcpu_clears_htt() {
        let mut e = sample();
        e[0].edx = EDX_HTT;
        filter(&mut e, 0, 1);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(5), 3);
    }
}
