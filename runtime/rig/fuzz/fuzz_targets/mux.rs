//! The bridge's byte stream as either side reads it from the virtio-serial port: frames
//! (`kind, id, len`, payload), each checked to encode back to its bytes, with the `Ports` and
//! `PortsAck` payloads parsed and an acknowledgement applied to a port set.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    specc_rig::bridge::fuzzing::mux_stream(data);
});
