//! A vmstate file from an untrusted snapshot directory, decoded into a type of the VMM state's
//! shape; the input is tried as a whole file and as a payload behind a valid header and CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    specc_snapshot::fuzzing::decode_state(data);
});
