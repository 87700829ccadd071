//! Entry points that feed untrusted bytes to the host side of the protocol: what a guest (its
//! agent replaced or compromised) can send back. Shared by the cargo-fuzz target in
//! `runtime/protocol/fuzz/` and the property tests below; not part of the protocol API.
//!
//! The host must answer any byte stream with a value or an error: no panic, no unbounded
//! allocation (every frame is capped by [`crate::MAX_FRAME_LEN`]), and it must stop at the
//! end of the stream.

use std::io::{self, Cursor, Read, Write};

use crate::{AgentInfo, Client, ExecRequest, Response, RestoredRequest, WriteFileRequest};

/// A connection whose peer sends `input` and then closes; what the client writes is dropped.
struct Scripted(Cursor<Vec<u8>>);

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Turns `data` into frames with valid length prefixes (each body: a little-endian u16
/// length, then that many bytes), so that the fuzzer spends its time on the JSON bodies and
/// the client's state machine rather than on the prefix check.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let n = usize::from(u16::from_le_bytes([*a, *b])).clamp(1, tail.len().max(1));
        let body = &tail[..n.min(tail.len())];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(body);
        rest = &tail[body.len()..];
        if body.is_empty() {
            break;
        }
    }
    out
}

fn hello() -> Vec<u8> {
    crate::encode(&Response::Hello(AgentInfo {
        version: crate::PROTOCOL_VERSION,
        agent_version: "fuzz".into(),
        pid1: true,
        hostname: "fuzz".into(),
    }))
    .expect("a hello encodes")
}

/// One client session against a hostile agent. `data[0]` picks the stream's shape (raw
/// bytes, or a valid hello followed by raw bytes or by well-framed bodies) and the request
/// the client makes; the rest is what the agent sends.
pub fn client_session(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let input = match sel & 3 {
        0 => rest.to_vec(),
        1 => [hello(), rest.to_vec()].concat(),
        _ => [hello(), framed(rest)].concat(),
    };
    let total = input.len();
    let Ok(mut c) = Client::handshake(Scripted(Cursor::new(input))) else {
        return;
    };
    let mut out = 0usize;
    let mut count = |d: &[u8]| out += d.len();
    match (sel >> 2) % 8 {
        0 => drop(c.ping()),
        1 => drop(c.exec(&ExecRequest::new(["true"]), &mut count, |_| {})),
        2 => {
            let mut stdin: &[u8] = b"some input";
            drop(c.exec_with_stdin(&ExecRequest::new(["cat"]), &mut stdin, |_| {}, |_| {}));
        }
        3 => {
            if let Ok(d) = c.read_file("/etc/hostname") {
                assert!(d.len() <= total, "more file bytes than the agent sent");
            }
        }
        4 => drop(c.list_dir("/")),
        5 => drop(c.stat("/", true)),
        6 => drop(c.write_file(&WriteFileRequest::new("/tmp/f"), b"data")),
        _ => {
            let req = RestoredRequest::fresh(None).expect("reading /dev/urandom");
            drop(c.restored(&req));
        }
    }
    // Output is base64 in JSON: never more decoded bytes than the agent sent.
    assert!(out <= total, "more exec output than the agent sent");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn framed_bodies_have_valid_prefixes() {
        let f = framed(&[3, 0, b'{', b'}', b' ', 1, 0, b'x']);
        assert_eq!(f, [0, 0, 0, 3, b'{', b'}', b' ', 0, 0, 0, 1, b'x']);
    }

    #[test]
    fn a_well_behaved_exec_reply_is_read_to_its_exit() {
        let mut body = Vec::new();
        for r in [
            Response::ExecStarted { pid: 7 },
            Response::Stdout {
                data: b"hi".to_vec(),
            },
            Response::Exit(crate::ExitStatus {
                code: Some(0),
                signal: None,
                timed_out: false,
            }),
        ] {
            body.extend(crate::encode(&r).unwrap());
        }
        let input = [hello(), body].concat();
        let mut c = Client::handshake(Scripted(Cursor::new(input))).unwrap();
        let out = c.exec_output(&ExecRequest::new(["true"])).unwrap();
        assert_eq!(
            (out.stdout.as_slice(), out.status.code),
            (&b"hi"[..], Some(0))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn any_reply_bytes_end_in_a_value_or_an_error(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            client_session(&data);
        }

        /// Bodies made of JSON-ish fragments reach the decoder's deeper paths.
        #[test]
        fn json_like_replies_end_in_a_value_or_an_error(
            sel in any::<u8>(),
            parts in proptest::collection::vec(prop_oneof![
                Just(r#"{"type":"exec_started","pid":1}"#.to_owned()),
                Just(r#"{"type":"stdout","data":"aGk="}"#.to_owned()),
                Just(r#"{"type":"exit","code":0}"#.to_owned()),
                Just(r#"{"type":"file_data","data":"!!"}"#.to_owned()),
                Just(r#"{"type":"file_end","size":99}"#.to_owned()),
                Just(r#"{"type":"dir_entries","entries":[{}]}"#.to_owned()),
                Just(r#"{"type":"error","kind":"x","message":"m"}"#.to_owned()),
                "[ -~]{0,40}",
            ], 0..8),
        ) {
            let mut data = vec![sel | 2];
            for p in parts {
                let n = u16::try_from(p.len()).unwrap();
                data.extend(n.to_le_bytes());
                data.extend(p.as_bytes());
            }
            client_session(&data);
        }
    }
}
