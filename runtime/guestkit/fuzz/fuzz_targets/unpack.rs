//! Untrusted OCI layers (raw tar streams, one to three per case) unpacked beside a directory of
//! host files, which must not change.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    specc_guestkit::fuzzing::unpack_layers(data);
});
