//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! its IOAPIC and how the ISA interrupts are wired.
//!
//! The table is assembled as little-endian bytes (no packed structs, no unsafe) and placed at
//! the start of the EBDA, where Linux's `find_smp_config` scans.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, HIMEM_START, IOAPIC_ADDR, IOAPIC_LAST_GSI};

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
// Family 6 model 15 stepping 11 with FPU and APIC: what Linux expects from a modern CPU.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const MP_IRQDIR_DEFAULT: u16 = 0;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// The most vCPUs the table describes: APIC ids are one byte and the IOAPIC takes the id
/// after the last CPU.
pub const MAX_CPUS: u8 = 254;

/// Errors of writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Zero vCPUs, or more than [`MAX_CPUS`].
    #[error("{0} vCPUs cannot be described in an MP table (1..={MAX_CPUS})")]
    CpuCount(u8),
    /// The table does not fit between the EBDA start and high memory.
    #[error("the MP table for {0} vCPUs does not fit below high memory")]
    TooLarge(u8),
    /// Writing the table into guest memory failed.
    #[error("writing the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// The IOAPIC's APIC id: the first one after the CPUs.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Builds the floating pointer and the configuration table for `num_cpus` CPUs, to be placed at
/// guest address `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::CpuCount(num_cpus));
    }
    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut entries: Vec<u8> = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[0, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        entry_count += 1;
    }
    // One ISA bus, id 0.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    let ioapic = ioapic_id(num_cpus);
    entries.extend_from_slice(&[2, ioapic, APIC_VERSION, 1]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_ADDR).unwrap_or(0).to_le_bytes());
    entry_count += 1;
    // Identity-route every ISA/GSI line to the same IOAPIC pin.
    for irq in 0..=IOAPIC_LAST_GSI {
        let irq = u8::try_from(irq).unwrap_or(u8::MAX);
        entries.extend_from_slice(&[3, MP_IRQ_INT]);
        entries.extend_from_slice(&MP_IRQDIR_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, irq, ioapic, irq]);
        entry_count += 1;
    }
    // LINT0 takes the 8259's ExtINT, LINT1 takes NMI, on every local APIC.
    for (kind, lint) in [(MP_IRQ_EXTINT, 0u8), (MP_IRQ_NMI, 1u8)] {
        entries.extend_from_slice(&[4, kind]);
        entries.extend_from_slice(&MP_IRQDIR_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, 0, 0xff, lint]);
        entry_count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let table_len_u16 = u16::try_from(table_len).map_err(|_| Error::TooLarge(num_cpus))?;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len_u16.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"SPECC   ");
    table.extend_from_slice(b"SPECC-VMM   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&u32::try_from(APIC_ADDR).unwrap_or(0).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(
        &u32::try_from(table_addr)
            .map_err(|_| Error::TooLarge(num_cpus))?
            .to_le_bytes(),
    );
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision
    out.push(0); // checksum, patched below
    out.extend_from_slice(&[0u8; 5]); // no default configuration, no IMCR
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    // Past the EBDA comes the legacy video/BIOS window, which is not RAM in the e820 map, so
    // the kernel never allocates it; only the kernel's load address is a hard limit.
    if base + out.len() as u64 > HIMEM_START {
        return Err(Error::TooLarge(num_cpus));
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` CPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    let bytes = build(num_cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_of_floating_pointer_and_table_are_zero() {
        for cpus in [1u8, 2, 8, 32] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let len = usize::from(u16::from_le_bytes([t[20], t[21]]));
            assert_eq!(&t[16..20], b"PCMP");
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0);
        }
    }

    #[test]
    fn table_lists_one_enabled_cpu_entry_per_vcpu_and_one_bsp() {
        let t = build(4, EBDA_START).unwrap();
        let count = usize::from(u16::from_le_bytes([t[16 + 34], t[16 + 35]]));
        let mut off = 16 + HEADER_LEN;
        let (mut cpus, mut bsps) = (0, 0);
        for _ in 0..count {
            let len = if t[off] == 0 { 20 } else { 8 };
            if t[off] == 0 {
                assert_eq!(t[off + 1], cpus);
                cpus += 1;
                bsps += usize::from(t[off + 3] & CPU_BOOTPROCESSOR != 0);
            }
            off += len;
        }
        assert_eq!(off, t.len());
        assert_eq!((cpus, bsps), (4, 1));
    }

    #[test]
    fn zero_or_too_many_cpus_are_refused() {
        assert!(matches!(build(0, EBDA_START), Err(Error::CpuCount(0))));
        assert!(matches!(build(255, EBDA_START), Err(Error::CpuCount(255))));
    }

    #[test]
    fn maximum_cpu_count_fits_below_high_memory() {
        build(MAX_CPUS, EBDA_START).unwrap();
    }
}
