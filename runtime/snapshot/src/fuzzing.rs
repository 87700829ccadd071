//! Entry points for the fuzz targets (`fuzz/`) and the property tests that run the same code
//! on stable Rust. Not part of the API the VMM uses.

use serde::{Deserialize, Serialize};

use crate::cpu::{CpuFingerprint, CpuidLeaf};
use crate::memory::PageRange;
use crate::state::{self, FORMAT_VERSION};

/// The byte limit the fuzz entry points decode with.
pub const FUZZ_LIMIT: u64 = 1 << 20;

/// A stand-in for the VMM's vmstate with its shape: nested structs of u64 fields, byte
/// vectors, vectors of structs, enums with data, options and strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleVmState {
    /// Where the state came from.
    pub note: String,
    /// The CPU it was taken on.
    pub cpu: CpuFingerprint,
    /// One entry per vCPU.
    pub vcpus: Vec<SampleVcpu>,
    /// Opaque in-kernel irqchip state.
    pub irqchip: Vec<u8>,
    /// PIT channels.
    pub pit: [SamplePitChannel; 3],
    /// kvmclock, if the guest enabled it.
    pub clock: Option<u64>,
    /// Every device.
    pub devices: Vec<SampleDevice>,
    /// Guest memory layout.
    pub memory: SampleMemory,
}

/// A vCPU's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleVcpu {
    /// Index.
    pub id: u32,
    /// General-purpose registers, rip, rflags.
    pub regs: [u64; 18],
    /// Segment and control registers.
    pub sregs: Vec<u64>,
    /// MSR index/value pairs.
    pub msrs: Vec<(u32, u64)>,
    /// XSAVE area.
    pub xsave: Vec<u8>,
    /// Local APIC page.
    pub lapic: Vec<u8>,
    /// XCRs.
    pub xcrs: Vec<(u32, u64)>,
    /// Run state.
    pub mp_state: SampleMpState,
    /// Pending events, if any.
    pub events: Option<SampleEvents>,
    /// CPUID entries given to the vCPU.
    pub cpuid: Vec<CpuidLeaf>,
}

/// A vCPU's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SampleMpState {
    /// Running.
    Runnable,
    /// Waiting for INIT/SIPI.
    Uninitialized,
    /// HLT.
    Halted,
    /// Received INIT.
    InitReceived,
}

/// Pending exception/interrupt/NMI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleEvents {
    /// Exception vector and error code.
    pub exception: Option<(u8, u32)>,
    /// Interrupt vector.
    pub interrupt: Option<u8>,
    /// NMI pending.
    pub nmi: bool,
}

/// A PIT channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplePitChannel {
    /// Counter.
    pub count: u32,
    /// Latched value.
    pub latched: u16,
    /// Mode.
    pub mode: u8,
    /// Time the count was loaded.
    pub load_time: u64,
}

/// A device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SampleDevice {
    /// 8250 UART.
    Serial {
        /// Registers.
        regs: [u8; 8],
        /// Unread input.
        fifo: Vec<u8>,
    },
    /// A virtio-mmio device.
    Virtio {
        /// Device type.
        device_type: u32,
        /// Negotiated features.
        features: u64,
        /// Queues.
        queues: Vec<SampleQueue>,
        /// Config space.
        config: Vec<u8>,
        /// What it is connected to.
        backend: SampleBackend,
    },
    /// i8042.
    Keyboard(u8),
}

/// A virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleQueue {
    /// Size.
    pub size: u16,
    /// Ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available index.
    pub next_avail: u16,
    /// Next used index.
    pub next_used: u16,
}

/// A device backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SampleBackend {
    /// A disk layer.
    Block {
        /// Path of the top layer.
        path: String,
        /// Read only.
        read_only: bool,
    },
    /// vsock.
    Vsock {
        /// Guest CID.
        cid: u64,
        /// Host socket.
        uds: String,
    },
    /// Network.
    Net {
        /// MAC address.
        mac: [u8; 6],
    },
    /// Entropy.
    Rng,
}

/// Guest memory layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleMemory {
    /// Total bytes.
    pub size: u64,
    /// (guest address, length) per region.
    pub regions: Vec<(u64, u64)>,
    /// Ranges of the diff file, if this is a diff snapshot.
    pub diff: Option<Vec<PageRange>>,
}

/// A plausible state of `vcpus` vCPUs (about 19 KiB each, XSAVE dominating).
pub fn sample_state(vcpus: u32) -> SampleVmState {
    let vcpu = |id: u32| SampleVcpu {
        id,
        regs: std::array::from_fn(|i| (i as u64 + 1) * 0x1111_1111 + u64::from(id)),
        sregs: (0..40).map(|i| i * 0x1000).collect(),
        msrs: (0..80)
            .map(|i| (0xc000_0000 + i, u64::from(i) << 32 | 0xabcd))
            .collect(),
        xsave: (0..16 * 1024u32).map(|i| (i * 7 % 251) as u8).collect(),
        lapic: (0..1024u32).map(|i| (i % 13) as u8).collect(),
        xcrs: vec![(0, 0x2e7)],
        mp_state: if id == 0 {
            SampleMpState::Runnable
        } else {
            SampleMpState::Halted
        },
        events: Some(SampleEvents {
            exception: None,
            interrupt: Some(0x30),
            nmi: false,
        }),
        cpuid: (0..60)
            .map(|i| CpuidLeaf {
                leaf: i,
                subleaf: 0,
                regs: [i, i * 3, i * 5, i * 7],
            })
            .collect(),
    };
    let queue = |i: u64| SampleQueue {
        size: 256,
        ready: true,
        desc: 0x10_0000 * i,
        avail: 0x10_0000 * i + 0x1000,
        used: 0x10_0000 * i + 0x2000,
        next_avail: 17,
        next_used: 17,
    };
    SampleVmState {
        note: "specc sample vmstate".into(),
        cpu: CpuFingerprint::host(),
        vcpus: (0..vcpus).map(vcpu).collect(),
        irqchip: vec![0x5a; 3 * 512],
        pit: [SamplePitChannel {
            count: 0x10000,
            latched: 0,
            mode: 3,
            load_time: 123_456_789,
        }; 3],
        clock: Some(987_654_321),
        devices: vec![
            SampleDevice::Serial {
                regs: [0, 1, 2, 3, 4, 5, 6, 7],
                fifo: b"login: ".to_vec(),
            },
            SampleDevice::Virtio {
                device_type: 2,
                features: 1 << 32 | 1 << 9,
                queues: vec![queue(1)],
                config: vec![0; 60],
                backend: SampleBackend::Block {
                    path: "/var/lib/specd/vm0/disk.top".into(),
                    read_only: false,
                },
            },
            SampleDevice::Virtio {
                device_type: 19,
                features: 1 << 32,
                queues: vec![queue(2), queue(3), queue(4)],
                config: 3u64.to_le_bytes().to_vec(),
                backend: SampleBackend::Vsock {
                    cid: 3,
                    uds: "/run/specd/vm0.vsock".into(),
                },
            },
            SampleDevice::Virtio {
                device_type: 1,
                features: 1 << 32 | 1 << 5,
                queues: vec![queue(5), queue(6)],
                config: vec![2, 0, 0, 0, 0, 1],
                backend: SampleBackend::Net {
                    mac: [2, 0, 0, 0, 0, 1],
                },
            },
            SampleDevice::Virtio {
                device_type: 4,
                features: 1 << 32,
                queues: vec![queue(7)],
                config: Vec::new(),
                backend: SampleBackend::Rng,
            },
            SampleDevice::Keyboard(0x61),
        ],
        memory: SampleMemory {
            size: 512 << 20,
            regions: vec![(0, 512 << 20)],
            diff: Some(vec![PageRange {
                offset: 0x1000,
                len: 0x3000,
            }]),
        },
    }
}

/// The state-file fuzz target: `data` as a whole file, then as a payload inside a valid
/// header and checksum so that the payload decoder sees every input. Returns how far each got
/// (for tests); panics only if the reader does.
pub fn decode_state(data: &[u8]) -> (bool, bool) {
    let as_file = state::decode::<SampleVmState>(data, FUZZ_LIMIT).is_ok();
    let framed = state::frame(data, FORMAT_VERSION);
    let as_payload = state::decode::<SampleVmState>(&framed, FUZZ_LIMIT).is_ok();
    (as_file, as_payload)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sample_state_round_trips_and_is_about_100_kib_with_five_vcpus() {
        let s = sample_state(5);
        let bytes = state::encode(&s).unwrap();
        assert!(
            (80 << 10..140 << 10).contains(&bytes.len()),
            "{}",
            bytes.len()
        );
        assert_eq!(
            state::decode::<SampleVmState>(&bytes, FUZZ_LIMIT).unwrap(),
            s
        );
        assert_eq!(decode_state(&bytes), (true, false));
        let payload = &bytes[state::HEADER_LEN..bytes.len() - state::TRAILER_LEN];
        assert_eq!(decode_state(payload), (false, true));
    }

    fn small_sample() -> Vec<u8> {
        let mut s = sample_state(1);
        s.vcpus[0].xsave.truncate(64);
        s.vcpus[0].lapic.truncate(16);
        s.vcpus[0].cpuid.truncate(4);
        s.vcpus[0].msrs.truncate(4);
        s.irqchip.truncate(8);
        postcard::to_stdvec(&s).unwrap()
    }

    proptest! {
        #[test]
        fn fuzz_entry_survives_random_bytes(data in prop::collection::vec(any::<u8>(), 0..2048)) {
            decode_state(&data);
        }

        /// Mutations of a valid payload reach deep into the decoder (a random blob mostly
        /// fails at the first field).
        #[test]
        fn fuzz_entry_survives_mutated_payloads(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut data = small_sample();
            for (at, x) in flips {
                let i = at.index(data.len());
                data[i] ^= x;
            }
            let cut = cut.index(data.len() + 1);
            decode_state(&data[..cut]);
        }
    }
}
