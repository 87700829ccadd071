//! Long-mode register state for the 64-bit boot protocol: general registers, FPU, segment and
//! control registers, and the identity-mapped page tables they point at.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX, kvm_segment_from_gdt};
use super::layout::{
    BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER, PD_ADDR, PD_COUNT, PDPT_ADDR, PML4_ADDR,
    ZERO_PAGE_ADDR,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

/// Errors of setting up boot registers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_SET_REGS failed.
    #[error("KVM_SET_REGS")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("KVM_SET_FPU")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("KVM_GET_SREGS")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("KVM_SET_SREGS")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("writing boot tables to guest memory")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
}

/// Sets the general registers: entry point, boot stack, `rsi` = zero page (boot protocol).
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), Error> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::SetRegs)
}

/// Sets the x87 control word and MXCSR to their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::SetFpu)
}

/// Writes the GDT, an empty IDT and the identity map into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))
            .map_err(Error::WriteTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(Error::WriteTables)?;
    // Identity-map the first 4 GiB with 2 MiB pages: the kernel's early code and the test
    // guests (which touch the MMIO hole) both run on it until the kernel builds its own.
    mem.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR))
        .map_err(Error::WriteTables)?;
    for d in 0..PD_COUNT {
        let pd = PD_ADDR + d * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR + d * 8))
            .map_err(Error::WriteTables)?;
        let mut entries = [0u8; 4096];
        for (i, chunk) in entries.chunks_exact_mut(8).enumerate() {
            let addr = ((d << 9) + i as u64) << 21;
            chunk.copy_from_slice(&(addr | PTE_PRESENT_RW | PDE_HUGE).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(Error::WriteTables)?;
    }
    Ok(())
}

/// The special registers for long mode on the boot tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&BOOT_GDT) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Puts the vCPU in long mode on the boot tables (which [`write_boot_tables`] wrote).
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), Error> {
    let sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(Error::SetSregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn identity_map_translates_mmio_hole_addresses_to_themselves() {
        let m = mem();
        write_boot_tables(&m).unwrap();
        for va in [0u64, 0x20_0000, 0x1234_5678, 0xd000_0000, 0xffff_f000] {
            let pml4e: u64 = m
                .read_obj(GuestAddress(PML4_ADDR + ((va >> 39) & 0x1ff) * 8))
                .unwrap();
            let pdpte: u64 = m
                .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
                .unwrap();
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pde & PDE_HUGE, PDE_HUGE);
            assert_eq!((pde & !0x1f_ffff & !0xfff) | (va & 0x1f_ffff), va);
        }
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_lma() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.gdt.limit, 31);
    }
}
