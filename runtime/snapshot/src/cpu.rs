//! The host CPU's identity and feature bits, saved with a snapshot and checked on restore: a
//! guest that was running with AVX-512 faults (or worse, computes garbage) on a host without
//! it, and guest kernels cache model-specific quirks at boot.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One CPUID leaf as the host returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    /// EAX input.
    pub leaf: u32,
    /// ECX input.
    pub subleaf: u32,
    /// EAX, EBX, ECX, EDX output.
    pub regs: [u32; 4],
}

/// The host CPU as far as snapshot compatibility goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFingerprint {
    /// Vendor string of leaf 0, e.g. "GenuineIntel".
    pub vendor: String,
    /// Display family (base + extended).
    pub family: u32,
    /// Display model (base + extended).
    pub model: u32,
    /// Stepping (informational: not compared).
    pub stepping: u32,
    /// The raw feature leaves 0x1, 0x7.0, 0xd.1 and 0x8000_0001 (zeros where the CPU does not
    /// have the leaf).
    pub features: Vec<CpuidLeaf>,
}

/// Why a snapshot cannot run on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuMismatch {
    /// Different CPU vendor.
    #[error("the snapshot was taken on a {saved} CPU, this host has a {host} CPU")]
    Vendor {
        /// The snapshot's vendor.
        saved: String,
        /// This host's vendor.
        host: String,
    },
    /// Same vendor, different family or model.
    #[error(
        "the snapshot was taken on CPU family {:#x} model {:#x}, this host is family {:#x} model {:#x}",
        saved.0, saved.1, host.0, host.1
    )]
    Model {
        /// The snapshot's (family, model).
        saved: (u32, u32),
        /// This host's (family, model).
        host: (u32, u32),
    },
    /// Feature bits the snapshot's CPU had and this host lacks.
    #[error(
        "this host's CPU lacks features the snapshot's CPU had: {}",
        join(missing)
    )]
    MissingFeatures {
        /// The features, by Linux /proc/cpuinfo name where known.
        missing: Vec<Feature>,
    },
}

/// One CPUID feature bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf.
    pub subleaf: u32,
    /// Register: 0 = EAX, 1 = EBX, 2 = ECX, 3 = EDX.
    pub reg: usize,
    /// Bit.
    pub bit: u32,
}

impl Feature {
    /// The /proc/cpuinfo-style name, if the bit has one.
    pub fn name(&self) -> Option<&'static str> {
        FEATURE_REGS
            .iter()
            .find(|r| r.leaf == self.leaf && r.subleaf == self.subleaf && r.reg == self.reg)
            .and_then(|r| r.names.get(self.bit as usize).copied())
            .filter(|n| !n.is_empty())
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(
                f,
                "cpuid {:#x}.{} {} bit {}",
                self.leaf,
                self.subleaf,
                ["eax", "ebx", "ecx", "edx"][self.reg & 3],
                self.bit
            ),
        }
    }
}

fn join(features: &[Feature]) -> String {
    features
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A register of feature bits that a restore host must have, with the bits that do not count.
struct FeatureReg {
    leaf: u32,
    subleaf: u32,
    reg: usize,
    /// Bits that are not CPU capabilities a guest could depend on.
    ignore: u32,
    names: [&'static str; 32],
}

/// Leaf 1 ECX bit 31 says "running under a hypervisor": a snapshot taken in a VM must still
/// restore on bare metal and the other way round.
const HYPERVISOR_BIT: u32 = 1 << 31;

#[rustfmt::skip]
const FEATURE_REGS: [FeatureReg; 8] = [
    FeatureReg { leaf: 1, subleaf: 0, reg: 2, ignore: HYPERVISOR_BIT, names: [
        "pni", "pclmulqdq", "dtes64", "monitor", "ds_cpl", "vmx", "smx", "est",
        "tm2", "ssse3", "cid", "sdbg", "fma", "cx16", "xtpr", "pdcm",
        "", "pcid", "dca", "sse4_1", "sse4_2", "x2apic", "movbe", "popcnt",
        "tsc_deadline_timer", "aes", "xsave", "osxsave", "avx", "f16c", "rdrand", "hypervisor",
    ]},
    FeatureReg { leaf: 1, subleaf: 0, reg: 3, ignore: 0, names: [
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce",
        "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
        "pat", "pse36", "pn", "clflush", "", "dts", "acpi", "mmx",
        "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe",
    ]},
    FeatureReg { leaf: 7, subleaf: 0, reg: 1, ignore: 0, names: [
        "fsgsbase", "tsc_adjust", "sgx", "bmi1", "hle", "avx2", "fdp_excptn_only", "smep",
        "bmi2", "erms", "invpcid", "rtm", "cqm", "zero_fcs_fds", "mpx", "rdt_a",
        "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit", "clflushopt",
        "clwb", "intel_pt", "avx512pf", "avx512er", "avx512cd", "sha_ni", "avx512bw", "avx512vl",
    ]},
    FeatureReg { leaf: 7, subleaf: 0, reg: 2, ignore: 0, names: [
        "prefetchwt1", "avx512vbmi", "umip", "pku", "ospke", "waitpkg", "avx512_vbmi2", "shstk",
        "gfni", "vaes", "vpclmulqdq", "avx512_vnni", "avx512_bitalg", "tme", "avx512_vpopcntdq", "",
        "la57", "", "", "", "", "", "rdpid", "keylocker",
        "bus_lock_detect", "cldemote", "", "movdiri", "movdir64b", "enqcmd", "sgx_lc", "pks",
    ]},
    FeatureReg { leaf: 7, subleaf: 0, reg: 3, ignore: 0, names: [
        "", "", "avx512_4vnniw", "avx512_4fmaps", "fsrm", "uintr", "", "",
        "avx512_vp2intersect", "srbds_ctrl", "md_clear", "rtm_always_abort", "", "tsx_force_abort", "serialize", "hybrid_cpu",
        "tsxldtrk", "", "pconfig", "arch_lbr", "ibt", "", "amx_bf16", "avx512_fp16",
        "amx_tile", "amx_int8", "spec_ctrl", "intel_stibp", "flush_l1d", "arch_capabilities", "core_capabilities", "spec_ctrl_ssbd",
    ]},
    FeatureReg { leaf: 0xd, subleaf: 1, reg: 0, ignore: 0, names: [
        "xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ]},
    FeatureReg { leaf: 0x8000_0001, subleaf: 0, reg: 2, ignore: 0, names: [
        "lahf_lm", "cmp_legacy", "svm", "extapic", "cr8_legacy", "abm", "sse4a", "misalignsse",
        "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", "", "lwp",
        "fma4", "tce", "", "nodeid_msr", "", "tbm", "topoext", "perfctr_core",
        "perfctr_nb", "", "bpext", "ptsc", "perfctr_llc", "mwaitx", "", "",
    ]},
    FeatureReg { leaf: 0x8000_0001, subleaf: 0, reg: 3, ignore: 0, names: [
        "", "", "", "", "", "", "", "",
        "", "", "", "syscall", "", "", "", "",
        "", "", "", "mp", "nx", "", "mmxext", "",
        "", "fxsr_opt", "pdpe1gb", "rdtscp", "", "lm", "3dnowext", "3dnow",
    ]},
];

/// The leaves a fingerprint records.
const LEAVES: [(u32, u32); 4] = [(1, 0), (7, 0), (0xd, 1), (0x8000_0001, 0)];

impl CpuFingerprint {
    /// This host's CPU.
    pub fn host() -> CpuFingerprint {
        Self::from_cpuid(cpuid)
    }

    /// Builds a fingerprint from a CPUID function (the host's, or a recorded one in tests).
    pub fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> CpuFingerprint {
        let [max_basic, b, c, d] = cpuid(0, 0);
        let mut vendor = Vec::with_capacity(12);
        for r in [b, d, c] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let vendor = String::from_utf8_lossy(&vendor)
            .trim_end_matches('\0')
            .to_string();
        let max_ext = cpuid(0x8000_0000, 0)[0];
        let features: Vec<CpuidLeaf> = LEAVES
            .iter()
            .map(|&(leaf, subleaf)| {
                let max = if leaf >= 0x8000_0000 {
                    max_ext
                } else {
                    max_basic
                };
                // Leaves past the maximum return another leaf's data on Intel: record zeros.
                let regs = if leaf <= max && (leaf < 0x8000_0000) == (max < 0x8000_0000) {
                    cpuid(leaf, subleaf)
                } else {
                    [0; 4]
                };
                CpuidLeaf {
                    leaf,
                    subleaf,
                    regs,
                }
            })
            .collect();
        let sig = features[0].regs[0];
        let base_family = (sig >> 8) & 0xf;
        let base_model = (sig >> 4) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((sig >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            base_model | (((sig >> 16) & 0xf) << 4)
        } else {
            base_model
        };
        CpuFingerprint {
            vendor,
            family,
            model,
            stepping: sig & 0xf,
            features,
        }
    }

    /// Whether a snapshot taken on `saved` can run on this CPU (`self`): same vendor, family
    /// and model, and every feature bit `saved` had (leaves 0x1, 0x7.0, 0xd.1, 0x8000_0001,
    /// except the "hypervisor" bit) present here.
    pub fn check_compatible(&self, saved: &CpuFingerprint) -> Result<(), CpuMismatch> {
        if self.vendor != saved.vendor {
            return Err(CpuMismatch::Vendor {
                saved: saved.vendor.clone(),
                host: self.vendor.clone(),
            });
        }
        if (self.family, self.model) != (saved.family, saved.model) {
            return Err(CpuMismatch::Model {
                saved: (saved.family, saved.model),
                host: (self.family, self.model),
            });
        }
        let mut missing = Vec::new();
        for fr in &FEATURE_REGS {
            let want = saved.reg(fr.leaf, fr.subleaf, fr.reg) & !fr.ignore;
            let have = self.reg(fr.leaf, fr.subleaf, fr.reg);
            let mut lacking = want & !have;
            while lacking != 0 {
                let bit = lacking.trailing_zeros();
                lacking &= lacking - 1;
                missing.push(Feature {
                    leaf: fr.leaf,
                    subleaf: fr.subleaf,
                    reg: fr.reg,
                    bit,
                });
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CpuMismatch::MissingFeatures { missing })
        }
    }

    /// A register of a recorded leaf; zero if the fingerprint lacks the leaf.
    fn reg(&self, leaf: u32, subleaf: u32, reg: usize) -> u32 {
        self.features
            .iter()
            .find(|l| l.leaf == leaf && l.subleaf == subleaf)
            .and_then(|l| l.regs.get(reg).copied())
            .unwrap_or(0)
    }
}

fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_mut(fp: &mut CpuFingerprint, leaf: u32, subleaf: u32) -> &mut [u32; 4] {
        &mut fp
            .features
            .iter_mut()
            .find(|l| l.leaf == leaf && l.subleaf == subleaf)
            .unwrap()
            .regs
    }

    #[test]
    fn host_fingerprint_has_a_vendor_and_is_compatible_with_itself() {
        let host = CpuFingerprint::host();
        assert!(
            [
                "GenuineIntel",
                "AuthenticAMD",
                "HygonGenuine",
                "CentaurHauls",
                "  Shanghai  "
            ]
            .contains(&host.vendor.as_str()),
            "{host:?}"
        );
        // Every x86_64 CPU has fpu, tsc, cx8, cmov, sse2 (leaf 1 EDX) and lm (0x8000_0001 EDX).
        let edx1 = host.reg(1, 0, 3);
        assert_eq!(
            edx1 & (1 | 1 << 4 | 1 << 8 | 1 << 15 | 1 << 26),
            1 | 1 << 4 | 1 << 8 | 1 << 15 | 1 << 26
        );
        assert_ne!(host.reg(0x8000_0001, 0, 3) & 1 << 29, 0);
        host.check_compatible(&host).unwrap();
        host.check_compatible(&CpuFingerprint::host()).unwrap();
    }

    #[test]
    fn saved_features_missing_here_are_listed_by_name() {
        let host = CpuFingerprint::host();
        let mut saved = host.clone();
        leaf_mut(&mut saved, 7, 0)[1] |= 1 << 16; // avx512f
        leaf_mut(&mut saved, 0xd, 1)[0] |= 1 << 3; // xsaves
        leaf_mut(&mut saved, 0x8000_0001, 0)[3] |= 1 << 1; // unnamed bit
        let mut here = host.clone();
        leaf_mut(&mut here, 7, 0)[1] &= !(1 << 16);
        leaf_mut(&mut here, 0xd, 1)[0] &= !(1 << 3);
        leaf_mut(&mut here, 0x8000_0001, 0)[3] &= !(1 << 1);
        let err = here.check_compatible(&saved).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this host's CPU lacks features the snapshot's CPU had: \
             avx512f, xsaves, cpuid 0x80000001.0 edx bit 1"
        );
        // The other direction: a host with more features than the snapshot's is fine.
        saved.check_compatible(&here).unwrap();
    }

    #[test]
    fn vendor_and_model_must_match_hypervisor_bit_need_not() {
        let host = CpuFingerprint::host();
        let mut other = host.clone();
        other.vendor = "OtherVendor!".into();
        assert!(matches!(
            host.check_compatible(&other),
            Err(CpuMismatch::Vendor { .. })
        ));
        let mut other = host.clone();
        other.model ^= 1;
        let err = host.check_compatible(&other).unwrap_err();
        assert!(matches!(err, CpuMismatch::Model { .. }));
        assert!(err.to_string().contains("model"), "{err}");
        let mut other = host.clone();
        leaf_mut(&mut other, 1, 0)[2] ^= HYPERVISOR_BIT;
        host.check_compatible(&other).unwrap();
        other.check_compatible(&host).unwrap();
        // Stepping differs between otherwise identical parts in one fleet: not compared.
        let mut other = host.clone();
        other.stepping ^= 1;
        host.check_compatible(&other).unwrap();
    }

    #[test]
    fn signature_is_decoded_with_extended_family_and_model() {
        // Intel Sapphire Rapids: family 6, model 0x8f, stepping 8 (eax 0x000806f8).
        let spr = CpuFingerprint::from_cpuid(|leaf, _| match leaf {
            0 => [
                0x20,
                u32::from_le_bytes(*b"Genu"),
                u32::from_le_bytes(*b"ntel"),
                u32::from_le_bytes(*b"ineI"),
            ],
            1 => [0x0008_06f8, 0, 0, 0],
            0x8000_0000 => [0x8000_0008, 0, 0, 0],
            _ => [0; 4],
        });
        assert_eq!(
            (spr.vendor.as_str(), spr.family, spr.model, spr.stepping),
            ("GenuineIntel", 6, 0x8f, 8)
        );
        // AMD Zen 4: base family 0xf + extended 0xa = 0x19, model 0x11 (eax 0x00a10f11).
        let zen = CpuFingerprint::from_cpuid(|leaf, _| match leaf {
            0 => [0x10, 0, 0, 0],
            1 => [0x00a1_0f11, 0, 0, 0],
            7 => [0, 0xffff_ffff, 0, 0],
            _ => [0; 4],
        });
        assert_eq!((zen.family, zen.model, zen.stepping), (0x19, 0x11, 1));
        // Max basic leaf 0x10 covers leaf 7; max extended leaf 0 means no 0x8000_0001.
        assert_eq!(zen.reg(7, 0, 1), 0xffff_ffff);
        assert_eq!(zen.reg(0x8000_0001, 0, 3), 0);
    }

    #[test]
    fn fingerprint_round_trips_through_a_state_file() {
        let host = CpuFingerprint::host();
        let bytes = crate::state::encode(&host).unwrap();
        let back: CpuFingerprint = crate::state::decode(&bytes, 1 << 16).unwrap();
        assert_eq!(back, host);
    }
}
