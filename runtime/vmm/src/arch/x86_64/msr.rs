//! Boot MSR values and the MSR list a vCPU state snapshot reads.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// Errors of MSR setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the MSR list failed (more entries than KVM accepts).
    #[error("building the MSR list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed.
    #[error("KVM_SET_MSRS")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS set fewer MSRs than asked; the first unset one is named.
    #[error("KVM_SET_MSRS stopped at MSR {0:#x}")]
    SetMsrsPartial(u32),
}

/// The MSR values a vCPU starts the boot protocol with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Sets `entries` on the vCPU, failing unless all of them took.
pub fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), Error> {
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(Error::Fam)?;
        let n = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
        if n != chunk.len() {
            return Err(Error::SetMsrsPartial(chunk[n].index));
        }
    }
    Ok(())
}

/// Sets the boot MSRs that this host's KVM knows (`supported` is KVM_GET_MSR_INDEX_LIST).
pub fn setup_boot_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), Error> {
    let entries: Vec<_> = boot_msr_entries()
        .into_iter()
        .filter(|e| supported.contains(&e.index))
        .collect();
    set_msrs(vcpu, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_write_back_mtrrs_and_fast_strings() {
        let e = boot_msr_entries();
        let get = |i| e.iter().find(|m| m.index == i).map(|m| m.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
    }
}
