//! The `/dev/kvm` handle: capability checks, the supported CPUID and the MSR index list,
//! and which flavour of KVM this host has.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm as KvmFd};

/// The capabilities the VMM cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 10] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
];

/// Errors of opening and querying KVM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be opened.
    #[error(
        "cannot open /dev/kvm (is KVM available? without hardware virtualization, run the VMM \
         inside the rig)"
    )]
    Open(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("KVM API version {0}, expected 12")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("KVM lacks {0}")]
    MissingCap(&'static str),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_GET_MSR_INDEX_LIST failed.
    #[error("KVM_GET_MSR_INDEX_LIST")]
    MsrIndexList(#[source] kvm_ioctls::Error),
}

/// Which KVM implementation backs `/dev/kvm`; benchmarks report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmFlavor {
    /// kvm_intel or kvm_amd: hardware virtualization.
    Hardware,
    /// kvm_pvm: page-table based, unmodified guests run under the instruction emulator.
    Pvm,
    /// Neither module is visible (e.g. KVM built into the kernel).
    Unknown,
}

impl KvmFlavor {
    /// Detects the flavour from the loaded kernel modules.
    pub fn detect() -> Self {
        let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            KvmFlavor::Pvm
        } else if loaded("kvm_intel") || loaded("kvm_amd") {
            KvmFlavor::Hardware
        } else {
            KvmFlavor::Unknown
        }
    }
}

/// An open `/dev/kvm` with what the VMM needs from it read once.
#[derive(Debug)]
pub struct Kvm {
    /// The system fd.
    pub fd: KvmFd,
    /// KVM_GET_SUPPORTED_CPUID.
    pub supported_cpuid: CpuId,
    /// KVM_GET_MSR_INDEX_LIST.
    pub msr_index_list: Vec<u32>,
    /// Which KVM this is.
    pub flavor: KvmFlavor,
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC has the TSC-deadline mode.
    pub tsc_deadline: bool,
}

impl Kvm {
    /// Opens `/dev/kvm` and checks the API version and the capabilities the VMM needs.
    pub fn new() -> Result<Self, Error> {
        let fd = KvmFd::new().map_err(Error::Open)?;
        let version = fd.get_api_version();
        if version != 12 {
            return Err(Error::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !fd.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let supported_cpuid = fd
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        let msr_index_list = fd
            .get_msr_index_list()
            .map_err(Error::MsrIndexList)?
            .as_slice()
            .to_vec();
        let tsc_deadline = fd.check_extension(Cap::TscDeadlineTimer);
        Ok(Kvm {
            fd,
            supported_cpuid,
            msr_index_list,
            flavor: KvmFlavor::detect(),
            tsc_deadline,
        })
    }
}
