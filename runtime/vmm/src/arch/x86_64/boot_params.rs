//! The Linux zero page (`struct boot_params`): setup header, command line pointer and the
//! e820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::{CMDLINE_ADDR, EBDA_START, HIMEM_START, ZERO_PAGE_ADDR, ram_regions};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// `loadflags` bit: the protected-mode kernel is loaded high (always true for us).
const LOADED_HIGH: u8 = 0x1;

/// Errors of writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest RAM is too small to hold the boot structures and a kernel above 1 MiB.
    #[error("guest memory of {0} bytes is too small (needs more than 1 MiB)")]
    MemoryTooSmall(u64),
    /// More e820 entries than the zero page holds.
    #[error("too many e820 entries")]
    E820Overflow,
    /// Writing the zero page failed.
    #[error("writing the zero page")]
    Write(#[source] linux_loader::configurator::Error),
}

/// The e820 map `(addr, size, type)` for a guest of `mem_bytes`: low RAM up to the EBDA, the
/// EBDA reserved, then RAM from 1 MiB on, around the MMIO hole.
pub fn e820_map(mem_bytes: u64) -> Result<Vec<(u64, u64, u32)>, Error> {
    if mem_bytes <= HIMEM_START {
        return Err(Error::MemoryTooSmall(mem_bytes));
    }
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_regions(mem_bytes) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    Ok(map)
}

/// Builds the zero page. `header` is the bzImage's setup header, if the kernel was one.
pub fn build(
    header: Option<setup_header>,
    cmdline_len: usize,
    mem_bytes: u64,
) -> Result<boot_params, Error> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    let map = e820_map(mem_bytes)?;
    if map.len() > params.e820_table.len() {
        return Err(Error::E820Overflow);
    }
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = u8::try_from(map.len()).map_err(|_| Error::E820Overflow)?;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), Error> {
    let bp = BootParams::new(params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{FIRST_ADDR_PAST_32BITS, MMIO_HOLE_START};

    #[test]
    fn e820_never_covers_the_mmio_hole() {
        for mem in [128u64 << 20, 3 << 30, 4 << 30, 8 << 30] {
            for (addr, size, ty) in e820_map(mem).unwrap() {
                if ty == E820_RAM {
                    assert!(addr + size <= MMIO_HOLE_START || addr >= FIRST_ADDR_PAST_32BITS);
                }
            }
            let ram: u64 = e820_map(mem)
                .unwrap()
                .iter()
                .filter(|e| e.2 == E820_RAM)
                .map(|e| e.1)
                .sum();
            assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        }
    }

    #[test]
    fn tiny_memory_is_refused() {
        assert!(matches!(e820_map(1 << 20), Err(Error::MemoryTooSmall(_))));
    }

    #[test]
    fn zero_page_carries_magic_and_cmdline() {
        let p = build(None, 42, 256 << 20).unwrap();
        let (flag, ptr, size) = (p.hdr.boot_flag, p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!(flag, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(ptr, 0x2_0000);
        assert_eq!(size, 42);
        assert_eq!(p.e820_entries, 3);
    }
}
