//! A hostile driver's guest memory for virtio-net (rings, descriptor chains, buffers), as
//! corruptions of a well-behaved driver's memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use specc_devices::fuzzing::{Target, queues_over_seed};

fuzz_target!(|data: &[u8]| {
    queues_over_seed(Target::Net, data);
});
