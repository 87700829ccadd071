//! What to tell about a guest that KVM cannot run: the internal-error report, with RIP
//! translated through the guest's own page tables and the instruction bytes found there.
//!
//! The page-table walker reads guest-controlled memory and must never panic on it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::exit::InternalErrorReport;
use crate::vstate::vcpu::Vcpu;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The paging mode bits the walker needs.
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(addr)).ok()
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> Option<u64> {
    mem.read_obj::<u32>(GuestAddress(addr)).ok().map(u64::from)
}

/// Translates a linear address to a guest-physical one by walking the guest's page tables
/// (4- or 5-level long mode, PAE, or 2-level 32-bit). `None` if it does not map.
pub fn translate(mem: &GuestMemoryMmap, p: Paging, va: u64) -> Option<u64> {
    if p.cr0 & CR0_PG == 0 {
        return Some(va);
    }
    if p.efer & EFER_LMA != 0 {
        let levels: u32 = if p.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut table = p.cr3 & ADDR_MASK;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let entry = read_u64(mem, table + ((va >> shift) & 0x1ff) * 8)?;
            if entry & PRESENT == 0 {
                return None;
            }
            // Large pages at the PDPT (1 GiB) and PD (2 MiB) levels.
            if (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0 {
                let size = 1u64 << shift;
                return Some((entry & ADDR_MASK & !(size - 1)) | (va & (size - 1)));
            }
            table = entry & ADDR_MASK;
        }
        return Some(table | (va & 0xfff));
    }
    let va = va & 0xffff_ffff;
    if p.cr4 & CR4_PAE != 0 {
        let pdpte = read_u64(mem, (p.cr3 & 0xffff_ffe0) + ((va >> 30) & 0x3) * 8)?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read_u64(mem, (pdpte & ADDR_MASK) + ((va >> 21) & 0x1ff) * 8)?;
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & PAGE_SIZE_BIT != 0 {
            return Some((pde & ADDR_MASK & !0x1f_ffff) | (va & 0x1f_ffff));
        }
        let pte = read_u64(mem, (pde & ADDR_MASK) + ((va >> 12) & 0x1ff) * 8)?;
        return (pte & PRESENT != 0).then_some((pte & ADDR_MASK) | (va & 0xfff));
    }
    let pde = read_u32(mem, (p.cr3 & 0xffff_f000) + ((va >> 22) & 0x3ff) * 4)?;
    if pde & PRESENT == 0 {
        return None;
    }
    if p.cr4 & CR4_PSE != 0 && pde & PAGE_SIZE_BIT != 0 {
        return Some((pde & 0xffc0_0000) | (va & 0x3f_ffff));
    }
    let pte = read_u32(mem, (pde & 0xffff_f000) + ((va >> 12) & 0x3ff) * 4)?;
    (pte & PRESENT != 0).then_some((pte & 0xffff_f000) | (va & 0xfff))
}

/// Up to `max` bytes at linear address `va`, page by page, stopping where translation fails.
pub fn read_linear(mem: &GuestMemoryMmap, p: Paging, va: u64, max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(max);
    let mut addr = va;
    while out.len() < max {
        let Some(phys) = translate(mem, p, addr) else {
            break;
        };
        let mut b = [0u8; 1];
        if mem.read_slice(&mut b, GuestAddress(phys)).is_err() {
            break;
        }
        out.push(b[0]);
        addr = addr.wrapping_add(1);
    }
    out
}

/// Builds the report for a KVM_EXIT_INTERNAL_ERROR on `vcpu`.
pub fn internal_error_report(
    vcpu: &Vcpu,
    mem: &GuestMemoryMmap,
    suberror: u32,
    data: &[u64],
) -> InternalErrorReport {
    let regs = vcpu.fd.get_regs().unwrap_or_default();
    let sregs = vcpu.fd.get_sregs().unwrap_or_default();
    let paging = Paging {
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
    };
    // Outside long mode, code addresses are relative to CS.
    let linear = if sregs.efer & EFER_LMA != 0 {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip)
    };
    // KVM's own translation first (it knows every mode); our walker as the fallback.
    let rip_phys = vcpu
        .fd
        .translate_gva(linear)
        .ok()
        .filter(|t| t.valid != 0)
        .map(|t| t.physical_address)
        .or_else(|| translate(mem, paging, linear));
    let insn = read_linear(mem, paging, linear, 16);
    InternalErrorReport {
        vcpu: vcpu.id,
        suberror,
        data: data.to_vec(),
        rip: regs.rip,
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
        rip_phys,
        insn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::PML4_ADDR;
    use crate::arch::x86_64::regs::write_boot_tables;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn long_mode(cr3: u64) -> Paging {
        Paging {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        }
    }

    #[test]
    fn boot_identity_map_translates_to_itself() {
        let m = mem();
        write_boot_tables(&m).unwrap();
        for va in [0x1000u64, 0x10_0123, 0xd000_0004] {
            assert_eq!(translate(&m, long_mode(PML4_ADDR), va), Some(va));
        }
        assert_eq!(translate(&m, long_mode(PML4_ADDR), 0x1_0000_0000), None);
    }

    #[test]
    fn four_kib_mapping_of_a_high_kernel_address_translates() {
        let m = mem();
        // A -2 GiB kernel-style address mapped through 4 KiB pages.
        let va: u64 = 0xffff_ffff_8100_0123;
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        m.write_obj(pdpt | 3, GuestAddress(pml4 + ((va >> 39) & 0x1ff) * 8))
            .unwrap();
        m.write_obj(pd | 3, GuestAddress(pdpt + ((va >> 30) & 0x1ff) * 8))
            .unwrap();
        m.write_obj(pt | 3, GuestAddress(pd + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        m.write_obj(
            0x20_0000u64 | 3,
            GuestAddress(pt + ((va >> 12) & 0x1ff) * 8),
        )
        .unwrap();
        m.write_slice(&[0x0f, 0x0b], GuestAddress(0x20_0123))
            .unwrap();
        assert_eq!(translate(&m, long_mode(pml4), va), Some(0x20_0123));
        assert_eq!(&read_linear(&m, long_mode(pml4), va, 2), &[0x0f, 0x0b]);
    }

    #[test]
    fn paging_off_is_identity_and_32_bit_pse_works() {
        let m = mem();
        let off = Paging {
            cr0: 1,
            cr3: 0,
            cr4: 0,
            efer: 0,
        };
        assert_eq!(translate(&m, off, 0x1234), Some(0x1234));
        m.write_obj(0x0040_0000u32 | 0x83, GuestAddress(0x1000 + 4))
            .unwrap();
        let pse = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(translate(&m, pse, 0x0040_1234), Some(0x0040_1234));
    }

    proptest::proptest! {
        #[test]
        fn walker_never_panics_on_garbage_tables(
            words in proptest::collection::vec(proptest::prelude::any::<u64>(), 512),
            cr3: u64, cr4: u64, efer: u64, va: u64,
        ) {
            let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
            for (i, w) in words.iter().enumerate() {
                m.write_obj(*w, GuestAddress(i as u64 * 8)).unwrap();
            }
            let p = Paging { cr0: CR0_PG, cr3: cr3 & 0xfff, cr4, efer };
            let _ = translate(&m, p, va);
            let _ = read_linear(&m, p, va, 16);
        }
    }
}
