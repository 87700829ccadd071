//! The `inspect` and `kick` control requests: what a guest that stopped answering is waiting
//! for, read from outside (docs/vmm.md).
//!
//! `inspect` pauses a running VM for the moment it takes to read the vCPUs (a vCPU's state
//! can only be read while it is out of `KVM_RUN`), the IOAPIC and every virtio device: the
//! rings' indices in guest memory beside the device's positions, the InterruptStatus
//! register, the vsock connection table. `kick` re-raises every device's interrupt and/or
//! re-signals every queue: a guest that recovers after the first lost an interrupt, after the
//! second a notification; one that recovers from neither lost work.

use kvm_bindings::{kvm_irqchip, kvm_lapic_state};
use specc_devices::virtio::inspect::TransportInspect;

use crate::Vmm;
use crate::vstate::vcpu::VcpuState;

/// Errors of the inspection requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM has ended.
    #[error("the VM has ended")]
    Ended,
    /// Pausing the vCPUs, reading them or resuming them failed.
    #[error("reading the vCPUs")]
    Vcpus(#[source] crate::Error),
    /// Reading the irqchip failed.
    #[error("reading the irqchip")]
    Irqchip(#[source] crate::vstate::vm::Error),
}

/// One vCPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VcpuInspect {
    /// The vCPU index.
    pub id: u8,
    /// KVM_MP_STATE_*: 0 runnable, 3 halted, ...
    pub mp_state: u32,
    /// Guest RIP.
    pub rip: u64,
    /// Guest RFLAGS.
    pub rflags: u64,
    /// Interrupts enabled (RFLAGS.IF).
    pub interrupts_enabled: bool,
    /// The local APIC's task priority.
    pub tpr: u32,
    /// Vectors requested and not yet delivered (LAPIC IRR).
    pub irr: Vec<u8>,
    /// Vectors being serviced, not yet EOIed (LAPIC ISR).
    pub isr: Vec<u8>,
    /// An interrupt KVM is injecting at the next entry: (vector), if any.
    pub injecting: Option<u8>,
    /// MSR_KVM_ASYNC_PF_EN (0: KVM never parks a guest task on a page it reads in).
    pub async_pf_en: Option<u64>,
}

/// One IOAPIC pin that routes somewhere.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IoapicPin {
    /// The pin (GSI).
    pub pin: u32,
    /// The vector it delivers.
    pub vector: u8,
    /// Masked by the guest.
    pub masked: bool,
    /// Level-triggered (else edge).
    pub level: bool,
    /// Remote IRR: a level interrupt delivered and not yet EOIed.
    pub remote_irr: bool,
    /// The pin's bit in the IOAPIC's IRR.
    pub irr: bool,
}

/// One virtio device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInspect {
    /// `blk`, `net`, `vsock`, `rng`.
    pub kind: &'static str,
    /// Its MMIO window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub gsi: u32,
    /// Transport, queues, device.
    pub transport: TransportInspect,
}

/// The whole answer of `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Inspection {
    /// The vCPUs, in id order.
    pub vcpus: Vec<VcpuInspect>,
    /// KVM_RUN returns so far, per vCPU.
    pub vcpu_exits: Vec<u64>,
    /// The IOAPIC pins the virtio devices use.
    pub ioapic: Vec<IoapicPin>,
    /// The virtio devices, in attach order.
    pub devices: Vec<DeviceInspect>,
}

/// Reads everything [`Inspection`] holds; a running VM is paused meanwhile and resumed.
pub fn inspect(vmm: &mut Vmm) -> Result<Inspection, Error> {
    if vmm.ended.is_some() {
        return Err(Error::Ended);
    }
    let was_paused = vmm.paused;
    if !was_paused {
        vmm.pause().map_err(Error::Vcpus)?;
    }
    let read = (|| {
        let vcpus = vmm.save_vcpu_states().map_err(Error::Vcpus)?;
        let vm = vmm.vm.save_state().map_err(Error::Irqchip)?;
        Ok((vcpus, vm))
    })();
    // The devices are read while the guest cannot move its side of the rings.
    let devices: Vec<DeviceInspect> = vmm
        .virtio
        .iter()
        .map(|d| DeviceInspect {
            kind: d.kind,
            mmio_base: d.slot.base,
            gsi: d.slot.gsi,
            transport: d
                .transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .inspect(),
        })
        .collect();
    if !was_paused {
        vmm.resume().map_err(Error::Vcpus)?;
    }
    let (vcpus, vm) = read?;
    let gsis: Vec<u32> = devices.iter().map(|d| d.gsi).collect();
    Ok(Inspection {
        vcpus: vcpus.iter().map(vcpu).collect(),
        vcpu_exits: vmm.vcpu_exits(),
        ioapic: ioapic_pins(&vm.ioapic, &gsis),
        devices,
    })
}

/// Re-raises every activated device's interrupt (`interrupts`) and/or re-signals every
/// queue (`queues`); returns how many devices were kicked.
pub fn kick(vmm: &Vmm, interrupts: bool, queues: bool) -> Result<usize, Error> {
    if vmm.ended.is_some() {
        return Err(Error::Ended);
    }
    for d in &vmm.virtio {
        d.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .kick(interrupts, queues);
    }
    Ok(vmm.virtio.len())
}

fn vcpu(s: &VcpuState) -> VcpuInspect {
    VcpuInspect {
        id: s.id,
        mp_state: s.mp_state.mp_state,
        rip: s.regs.rip,
        rflags: s.regs.rflags,
        interrupts_enabled: s.regs.rflags & (1 << 9) != 0,
        tpr: lapic_reg(&s.lapic, 0x80),
        irr: lapic_vectors(&s.lapic, 0x200),
        isr: lapic_vectors(&s.lapic, 0x100),
        injecting: (s.vcpu_events.interrupt.injected != 0).then_some(s.vcpu_events.interrupt.nr),
        async_pf_en: s
            .msrs
            .iter()
            .find(|m| m.index == crate::vstate::vcpu::MSR_KVM_ASYNC_PF_EN)
            .map(|m| m.data),
    }
}

/// The 32-bit LAPIC register at `offset` of the APIC page.
fn lapic_reg(l: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| l.regs.get(offset + i).map_or(0, |&c| c.cast_unsigned());
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// The vectors set in the 256-bit LAPIC register array at `base` (IRR, ISR: eight 32-bit
/// registers, 16 bytes apart).
fn lapic_vectors(l: &kvm_lapic_state, base: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for word in 0..8u8 {
        let bits = lapic_reg(l, base + usize::from(word) * 0x10);
        for bit in 0..32u8 {
            if bits & (1 << bit) != 0 {
                v.push(word * 32 + bit);
            }
        }
    }
    v
}

fn ioapic_pins(chip: &kvm_irqchip, gsis: &[u32]) -> Vec<IoapicPin> {
    // SAFETY: the chip was read with chip_id KVM_IRQCHIP_IOAPIC, so KVM filled the `ioapic`
    // member of the union; every bit pattern of it is a valid value.
    let ioapic = unsafe { chip.chip.ioapic };
    gsis.iter()
        .filter_map(|&gsi| {
            let idx = usize::try_from(gsi).ok()?;
            // SAFETY: `bits` covers the whole 64-bit redirection entry; any value is valid.
            let e = unsafe { ioapic.redirtbl.get(idx)?.bits };
            Some(IoapicPin {
                pin: gsi,
                vector: u8::try_from(e & 0xff).unwrap_or(0),
                remote_irr: e & (1 << 14) != 0,
                level: e & (1 << 15) != 0,
                masked: e & (1 << 16) != 0,
                irr: ioapic.irr & (1 << gsi) != 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_vectors_reads_each_set_bit_of_the_register_array() {
        let mut l = kvm_lapic_state::default();
        // IRR word 1 (vectors 32..63) bit 3 -> vector 35; word 7 bit 31 -> vector 255.
        l.regs[0x210] = 0x08;
        l.regs[0x270 + 3] = 0x80u8.cast_signed();
        l.regs[0x80] = 0x20;
        assert_eq!(lapic_vectors(&l, 0x200), vec![35, 255]);
        assert_eq!(lapic_vectors(&l, 0x100), Vec::<u8>::new());
        assert_eq!(lapic_reg(&l, 0x80), 0x20);
    }

    #[test]
    fn ioapic_pins_decode_the_redirection_entries_of_the_devices_lines() {
        let mut chip = kvm_irqchip::default();
        let mut st = kvm_bindings::kvm_ioapic_state::default();
        st.redirtbl[5].bits = 0x41 | (1 << 16); // vector 0x41, edge, masked
        st.redirtbl[6].bits = 0x42 | (1 << 15) | (1 << 14); // level, remote IRR
        st.irr = 1 << 6;
        chip.chip.ioapic = st;
        let pins = ioapic_pins(&chip, &[5, 6, 99]);
        assert_eq!(pins.len(), 2, "a GSI beyond the table is skipped");
        assert_eq!(
            (pins[0].vector, pins[0].masked, pins[0].level, pins[0].irr),
            (0x41, true, false, false)
        );
        assert_eq!(
            (
                pins[1].vector,
                pins[1].level,
                pins[1].remote_irr,
                pins[1].irr
            ),
            (0x42, true, true, true)
        );
    }
}
