//! virtio-rng: entropy from the host's `getrandom(2)`.

mod device;
mod event_handler;
mod persist;

pub use device::Rng;
pub use persist::{RngError, RngState};

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::persist::Persist;
    use crate::virtio::mmio::{MmioTransport, MmioTransportArgs};
    use crate::virtio::test_utils::{TestDriver, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use crate::virtio::{VirtioDeviceState, status};

    #[test]
    fn rng_fills_guest_buffers_with_distinct_random_bytes() {
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        let a = d.alloc(64);
        let b = d.alloc(64);
        let head = d.add_chain(0, &[(a, 32, true), (a + 32, 32, true)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 64));
        let head = d.add_chain(0, &[(b, 64, true)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 64));
        let (x, y) = (d.read_mem(a, 64), d.read_mem(b, 64));
        assert_ne!(x, vec![0; 64]);
        assert_ne!(x, y);
    }

    #[test]
    fn buffer_outside_guest_memory_fails_the_device_until_reset() {
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        d.add_chain(0, &[(1 << 40, 64, true)]);
        d.notify(0);
        d.wait_needs_reset();
        assert!(d.try_used(0).is_none());
        // A reset and a fresh init bring the device back.
        d.init(16);
        assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        let a = d.alloc(16);
        let head = d.add_chain(0, &[(a, 16, true)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 16));
    }

    #[test]
    fn descriptor_loop_fails_the_device() {
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        let a = d.alloc(16);
        // Two descriptors pointing at each other.
        d.add_raw(
            0,
            &[
                (a, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                (a + 8, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0),
            ],
        );
        d.notify(0);
        d.wait_needs_reset();
    }

    #[test]
    fn next_index_out_of_range_fails_the_device() {
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        let a = d.alloc(16);
        d.add_raw(0, &[(a, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 999)]);
        d.notify(0);
        d.wait_needs_reset();
    }

    #[test]
    fn oversized_chain_fails_the_device() {
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        let a = d.alloc(2 << 20);
        d.add_chain(0, &[(a, 1 << 20, true), (a + (1 << 20), 1 << 20, true)]);
        d.notify(0);
        d.wait_needs_reset();
    }

    #[test]
    fn indirect_table_outside_guest_memory_fails_the_device() {
        const VIRTQ_DESC_F_INDIRECT: u16 = 4;
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        d.add_raw(0, &[(1 << 40, 64, VIRTQ_DESC_F_INDIRECT, 0)]);
        d.notify(0);
        d.wait_needs_reset();
    }

    #[test]
    fn valid_indirect_table_is_served() {
        const VIRTQ_DESC_F_INDIRECT: u16 = 4;
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        let buf = d.alloc(32);
        // An indirect table of two writable descriptors.
        let mut table = Vec::new();
        for (addr, next, flags) in [
            (buf, 1u16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT),
            (buf + 16, 0, VIRTQ_DESC_F_WRITE),
        ]
        .into_iter()
        {
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&16u32.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&next.to_le_bytes());
        }
        let t = d.alloc_with(&table);
        let head = d.add_raw(0, &[(t, 32, VIRTQ_DESC_F_INDIRECT, 0)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 32));
        assert_ne!(d.read_mem(buf, 32), vec![0; 32]);
    }

    #[test]
    fn readable_after_writable_fails_the_device() {
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        let a = d.alloc(16);
        d.add_chain(0, &[(a, 8, true), (a + 8, 8, false)]);
        d.notify(0);
        d.wait_needs_reset();
    }

    #[test]
    fn rng_state_round_trips_and_the_restored_device_keeps_serving() {
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(16);
        let a = d.alloc(16);
        let head = d.add_chain(0, &[(a, 16, true)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 16));
        d.transport.pause();
        let saved = d.transport.save();
        let VirtioDeviceState::Rng(rs) = &saved.device else {
            panic!("not an rng state: {saved:?}");
        };
        let rng = Rng::restore((), rs).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let parsed = serde_json::from_str(&json).unwrap();
        assert_eq!(saved, parsed);
        let restored = MmioTransport::restore(
            MmioTransportArgs {
                mem: d.mem.clone(),
                device: Box::new(rng),
                irq: d.irq.clone(),
            },
            &parsed,
        )
        .unwrap();
        assert_eq!(restored.save(), saved);
        // The old transport goes away; the restored one continues the same rings.
        d.transport = restored;
        let b = d.alloc(16);
        let head = d.add_chain(0, &[(b, 16, true)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 16));
    }

    #[test]
    fn restore_refuses_unoffered_features() {
        assert!(
            Rng::restore(
                (),
                &RngState {
                    acked_features: 1 << 5
                }
            )
            .is_err()
        );
    }

    #[test]
    fn transport_round_trip_keeps_the_irq_line() {
        // The restored transport raises interrupts through the line passed to restore.
        let irq = Arc::new(crate::virtio::test_utils::TestIrq::default());
        let mut d = TestDriver::new(Box::new(Rng::new()));
        d.init(8);
        let s = d.transport.save();
        let t = MmioTransport::restore(
            MmioTransportArgs {
                mem: d.mem.clone(),
                device: Box::new(Rng::new()),
                irq: irq.clone(),
            },
            &s,
        )
        .unwrap();
        d.transport = t;
        d.irq = irq;
        let a = d.alloc(8);
        let head = d.add_chain(0, &[(a, 8, true)]);
        d.notify(0);
        assert_eq!(d.wait_used(0), (head, 8));
        assert!(d.irq.count() > 0);
    }
}
