//! A hostile driver's guest memory (rings, descriptor chains, buffers) for virtio-vsock.
#![no_main]

use libfuzzer_sys::fuzz_target;
use specc_devices::fuzzing::{Target, queues};

fuzz_target!(|data: &[u8]| {
    queues(Target::Vsock, data);
});
