//! What a hostile guest agent can send the host client: raw bytes, or a valid hello followed
//! by raw bytes or by well-framed bodies, against each kind of request.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    specc_protocol::fuzzing::client_session(data);
});
