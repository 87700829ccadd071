//! The boot GDT: flat 64-bit code and data segments and a TSS descriptor, and their
//! `kvm_segment` mirrors for `KVM_SET_SREGS`.

use kvm_bindings::kvm_segment;

/// Packs a segment descriptor the way the CPU reads it from the GDT.
///
/// `flags` holds the access byte in bits 0..8 and the G/DB/L/AVL nibble in bits 12..16,
/// the layout Linux's `GDT_ENTRY` macro uses.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS. Selectors are index * 8.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Index of the code segment in [`BOOT_GDT`].
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment in [`BOOT_GDT`].
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS in [`BOOT_GDT`].
pub const TSS_INDEX: u8 = 3;

// The field extractors below mask before narrowing, so the truncating casts are exact.
#[allow(clippy::cast_possible_truncation)]
fn base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
}

#[allow(clippy::cast_possible_truncation)]
fn limit(entry: u64) -> u32 {
    let raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The `kvm_segment` KVM expects for the descriptor `entry` at GDT index `index`.
#[allow(clippy::cast_possible_truncation)]
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        // An unusable segment is one that is not present.
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_decodes_as_64_bit_present_execute_read() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[1], CODE_INDEX);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.type_, 0xb);
        assert_eq!((seg.present, seg.l, seg.db, seg.s, seg.g), (1, 1, 0, 1, 1));
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn tss_segment_is_system_busy_tss() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[3], TSS_INDEX);
        assert_eq!(seg.selector, 0x18);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.s, 0);
    }

    #[test]
    fn entry_roundtrips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcde);
    }

    #[test]
    fn null_entry_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
