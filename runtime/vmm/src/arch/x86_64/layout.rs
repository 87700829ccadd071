//! The guest physical address map. Everything the boot path writes lives below 1 MiB except
//! the kernel; the MMIO hole sits under 4 GiB, and RAM that does not fit below it continues at
//! 4 GiB.

/// Boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT (empty: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// The four page directories (2 MiB pages) that identity-map the first 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// Number of page directories after [`PD_ADDR`].
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line we accept (the 64-bit boot protocol allows 2048 by default and the
/// setup header may announce more).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory: kernels load here and above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB. Guest RAM never overlaps `[MMIO_HOLE_START, 4 GiB)`.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
/// Size of the MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_HOLE_START;
/// Where RAM continues above the hole.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// The virtio-mmio windows start here, one [`MMIO_WINDOW_SIZE`] each.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_HOLE_START;
/// Size of one virtio-mmio window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Room for virtio-mmio windows before the IOAPIC/LAPIC region.
pub const VIRTIO_MMIO_LIMIT: u64 = 0xfe00_0000;
/// IOAPIC MMIO base (in-kernel device).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC MMIO base (in-kernel device).
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for real-mode emulation on Intel.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// First GSI handed to virtio devices: 0-4 are the legacy PIC/serial lines.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Last GSI the IOAPIC routes (24 pins).
pub const IOAPIC_LAST_GSI: u32 = 23;
/// GSI of the COM1 serial port.
pub const SERIAL_GSI: u32 = 4;

// The boot stack grows down from between the zero page and the page tables.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_ADDR && BOOT_STACK_POINTER > ZERO_PAGE_ADDR + 0x1000);
const _: () = assert!(
    VIRTIO_MMIO_LIMIT <= IOAPIC_ADDR && MMIO_HOLE_START + MMIO_HOLE_SIZE == FIRST_ADDR_PAST_32BITS
);

/// The RAM regions `(guest address, length)` for a guest of `mem_bytes`, skipping the MMIO hole.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (FIRST_ADDR_PAST_32BITS, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_ADDR, 0x20),
            (BOOT_IDT_ADDR, 0x8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000 * PD_COUNT),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }
}
