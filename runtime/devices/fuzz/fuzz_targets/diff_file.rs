//! A diff layer file from an untrusted artifact: header, bitmap and data.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    specc_devices::fuzzing::diff_file(data);
});
