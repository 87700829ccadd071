//! Register accesses of a hostile driver on the virtio-mmio transport.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    specc_devices::fuzzing::mmio_ops(data);
});
