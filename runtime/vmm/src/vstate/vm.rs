//! The KVM VM: memory slots, the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, irqfds, and
//! the VM-wide state a snapshot needs (irqchip, PIT, kvmclock).

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::Kvm;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// Errors of VM setup and VM state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM")]
    Create(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("KVM_SET_TSS_ADDR")]
    TssAddr(#[source] kvm_ioctls::Error),
    /// KVM_SET_IDENTITY_MAP_ADDR failed.
    #[error("KVM_SET_IDENTITY_MAP_ADDR")]
    IdentityMap(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("KVM_CREATE_IRQCHIP")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("KVM_CREATE_PIT2")]
    Pit(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot}")]
    MemorySlot {
        /// The slot.
        slot: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IRQFD failed.
    #[error("KVM_IRQFD for GSI {gsi}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading VM state failed.
    #[error("reading VM state ({0})")]
    SaveState(&'static str, #[source] kvm_ioctls::Error),
    /// Writing VM state failed.
    #[error("writing VM state ({0})")]
    RestoreState(&'static str, #[source] kvm_ioctls::Error),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG for slot {slot}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its guest memory registered.
#[derive(Debug)]
pub struct Vm {
    /// The VM fd.
    pub fd: VmFd,
    /// Guest RAM, registered as slots 0..n.
    pub memory: GuestMemoryMmap,
}

/// The VM-wide state a snapshot carries: plain data, untrusted on restore (KVM validates it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

impl Vm {
    /// Creates the VM, its in-kernel irqchip and PIT, and registers `memory`.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, Error> {
        let fd = kvm.fd.create_vm().map_err(Error::Create)?;
        fd.set_tss_address(usize::try_from(KVM_TSS_ADDR).unwrap_or(usize::MAX))
            .map_err(Error::TssAddr)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(Error::IdentityMap)?;
        fd.create_irq_chip().map_err(Error::Irqchip)?;
        // The speaker port is a dummy: there is no sound, but Linux pokes port 0x61.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::Pit)?;
        let vm = Vm { fd, memory };
        vm.register_memory()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), Error> {
        self.set_memory_flags(0)
    }

    /// Turns KVM's dirty page log of every memory slot on or off (a flags-only slot update:
    /// the mappings stay). While it is on, every guest write and every write KVM makes on the
    /// guest's behalf (kvmclock, steal time) sets the page's bit; device emulation in this
    /// process writes through the host mapping and is not logged.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), Error> {
        self.set_memory_flags(if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        })
    }

    /// The pages of each slot written since dirty logging was turned on or since the previous
    /// call (which this call clears), one bit per 4 KiB page, slots in region order.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>, Error> {
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = u32::try_from(slot).unwrap_or(u32::MAX);
                let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
                self.fd
                    .get_dirty_log(slot, len)
                    .map_err(|source| Error::DirtyLog { slot, source })
            })
            .collect()
    }

    fn set_memory_flags(&self, flags: u32) -> Result<(), Error> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            let host = self
                .memory
                .get_host_address(region.start_addr())
                .map_err(|_| Error::MemorySlot {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self.memory`, which lives as
            // long as the VM fd (both are fields of `self`, and the slot dies with the fd).
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(|source| Error::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    /// Makes every write to `evt` raise `gsi` on the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| Error::Irqfd { gsi, source })
    }

    /// Reads the irqchip, PIT and clock state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        let chip = |id| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map(|()| c)
        };
        let mut clock = self
            .fd
            .get_clock()
            .map_err(|e| Error::SaveState("clock", e))?;
        // Only the value is kept. KVM_CLOCK_TSC_STABLE is refused by KVM_SET_CLOCK, and with
        // KVM_CLOCK_REALTIME/HOST_TSC (Linux >= 5.16) KVM_SET_CLOCK advances the clock by the
        // host time elapsed since the save while the restored TSC does not move: the guest's
        // kvmclock and TSC then disagree by the whole gap, and a restored Linux guest stalled
        // (timers, vsock) in the rig. The guest's monotonic clock continues from the
        // snapshot; the agent's `Restored` sets the wall clock.
        clock.flags = 0;
        clock.realtime = 0;
        clock.host_tsc = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)
                .map_err(|e| Error::SaveState("pic master", e))?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE).map_err(|e| Error::SaveState("pic slave", e))?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(|e| Error::SaveState("ioapic", e))?,
            pit: self.fd.get_pit2().map_err(|e| Error::SaveState("pit", e))?,
            clock,
        })
    }

    /// Writes back a state from [`Vm::save_state`]. The vCPUs must not be running.
    pub fn restore_state(&self, state: &VmState) -> Result<(), Error> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| Error::RestoreState("pit", e))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(|e| Error::RestoreState("clock", e))?;
        self.fd
            .set_irqchip(&state.pic_master)
            .map_err(|e| Error::RestoreState("pic master", e))?;
        self.fd
            .set_irqchip(&state.pic_slave)
            .map_err(|e| Error::RestoreState("pic slave", e))?;
        self.fd
            .set_irqchip(&state.ioapic)
            .map_err(|e| Error::RestoreState("ioapic", e))?;
        Ok(())
    }
}
