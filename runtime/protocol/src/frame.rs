//! Framing: every message is a 4-byte big-endian length followed by that many bytes of JSON.
//!
//! The reader never trusts the length: anything above [`MAX_FRAME_LEN`] (or zero) is refused
//! before a byte of the body is allocated. A body that is not a valid message is reported as
//! [`FrameError::Decode`] *after* the whole body was consumed, so the stream stays aligned on
//! frame boundaries and the receiver may answer with an error and carry on.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame body accepted or produced, in bytes.
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Largest payload put into one data frame (stdout, stdin, file chunks). Base64 makes it 4/3
/// larger on the wire, still far below [`MAX_FRAME_LEN`].
pub const MAX_CHUNK: usize = 256 << 10;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Errors of encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the stream failed.
    #[error("frame I/O failed")]
    Io(#[from] io::Error),
    /// The length prefix is zero or above the limit (the stream cannot be trusted any more).
    #[error("frame length {len} is outside 1..={max}", max = MAX_FRAME_LEN)]
    BadLength {
        /// The length the peer announced.
        len: u64,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The body is not a valid message; the stream is still aligned.
    #[error("frame body is not a valid message")]
    Decode(#[source] serde_json::Error),
    /// A message could not be serialized (or is too large to send).
    #[error("message cannot be encoded")]
    Encode(#[source] serde_json::Error),
    /// An encoded message exceeds [`MAX_FRAME_LEN`].
    #[error("encoded message is {len} bytes, above the {max}-byte frame limit", max = MAX_FRAME_LEN)]
    TooLarge {
        /// Encoded size.
        len: usize,
    },
}

impl FrameError {
    /// Whether the stream is still aligned on a frame boundary after this error, so that the
    /// connection can go on.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::Decode(_))
    }
}

/// Encodes one message as a frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, msg).map_err(FrameError::Encode)?;
    let len = buf.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len })?;
    buf[..HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(buf)
}

/// Decodes the first frame of `buf`, if it is complete.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((msg, consumed)))` otherwise. A body
/// that is not a valid message returns `Err(FrameError::Decode)`; the caller may skip
/// [`frame_len`] bytes and go on.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[HEADER_LEN..total]).map_err(FrameError::Decode)?;
    Ok(Some((msg, total)))
}

/// The total size (prefix included) of the frame at the start of `buf`, once its prefix is
/// there; an error if the prefix is out of range.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = check_len(u32::from_be_bytes(*prefix))?;
    Ok(Some(HEADER_LEN + len))
}

fn check_len(len: u32) -> Result<usize, FrameError> {
    match usize::try_from(len) {
        Ok(l) if (1..=MAX_FRAME_LEN).contains(&l) => Ok(l),
        _ => Err(FrameError::BadLength {
            len: u64::from(len),
        }),
    }
}

/// Writes one message as a frame and flushes.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and decodes it. `Ok(None)` means the peer closed the stream cleanly between
/// frames.
pub fn read_frame<R: Read + ?Sized, T: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = check_len(u32::from_be_bytes(prefix))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::messages::{ExecRequest, Request, Response, User};

    fn sample_requests() -> Vec<Request> {
        vec![
            Request::Hello {
                min_version: 1,
                max_version: 1,
                client: "t".into(),
            },
            Request::Ping,
            Request::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                user: Some(User::Name("nobody".into())),
                stdin: true,
                timeout_ms: Some(5),
                pty: Some(crate::messages::PtySize { rows: 24, cols: 80 }),
            }),
            Request::Exec(ExecRequest {
                user: Some(User::Uid(65534)),
                ..ExecRequest::new(["true"])
            }),
            Request::Stdin {
                data: vec![0, 1, 2, 255],
            },
            Request::WriteData { data: vec![] },
            Request::Connect { port: 8080 },
        ]
    }

    #[test]
    fn encode_then_decode_round_trips_every_sample() {
        for req in sample_requests() {
            let buf = encode(&req).unwrap();
            let (back, used) = decode::<Request>(&buf).unwrap().unwrap();
            assert_eq!(back, req);
            assert_eq!(used, buf.len());
        }
    }

    #[test]
    fn decode_of_a_prefix_asks_for_more_bytes() {
        let buf = encode(&Request::Ping).unwrap();
        for cut in 0..buf.len() {
            assert!(
                decode::<Request>(&buf[..cut]).unwrap().is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_reading_the_body() {
        let mut buf = (u32::try_from(MAX_FRAME_LEN).unwrap() + 1)
            .to_be_bytes()
            .to_vec();
        buf.extend_from_slice(b"{}");
        assert!(matches!(
            decode::<Request>(&buf),
            Err(FrameError::BadLength { .. })
        ));
        let mut reader: &[u8] = &buf;
        assert!(matches!(
            read_frame::<_, Request>(&mut reader),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn zero_length_frame_is_refused() {
        let buf = 0u32.to_be_bytes();
        assert!(matches!(
            decode::<Request>(&buf),
            Err(FrameError::BadLength { len: 0 })
        ));
    }

    #[test]
    fn invalid_body_is_recoverable_and_the_next_frame_still_reads() {
        let mut buf = 5u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"nope!");
        buf.extend_from_slice(&encode(&Request::Ping).unwrap());
        let mut reader: &[u8] = &buf;
        let err = read_frame::<_, Request>(&mut reader).unwrap_err();
        assert!(err.is_recoverable());
        assert_eq!(
            read_frame::<_, Request>(&mut reader).unwrap(),
            Some(Request::Ping)
        );
        assert_eq!(read_frame::<_, Request>(&mut reader).unwrap(), None);
    }

    #[test]
    fn eof_inside_a_frame_is_truncated() {
        let buf = encode(&Request::Ping).unwrap();
        let mut reader: &[u8] = &buf[..buf.len() - 1];
        assert!(matches!(
            read_frame::<_, Request>(&mut reader),
            Err(FrameError::Truncated)
        ));
        let mut reader: &[u8] = &buf[..2];
        assert!(matches!(
            read_frame::<_, Request>(&mut reader),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn bad_base64_in_a_byte_field_is_a_decode_error() {
        let body = br#"{"type":"stdin","data":"***"}"#;
        let mut buf = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        buf.extend_from_slice(body);
        assert!(matches!(
            decode::<Request>(&buf),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let body = br#"{"type":"ping","added_in_a_later_version":42}"#;
        let mut buf = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        buf.extend_from_slice(body);
        assert_eq!(decode::<Request>(&buf).unwrap().unwrap().0, Request::Ping);
    }

    #[test]
    fn connect_has_the_documented_wire_form_and_refuses_ports_above_u16() {
        let frame = |body: &[u8]| {
            let mut buf = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
            buf.extend_from_slice(body);
            buf
        };
        assert_eq!(
            decode::<Request>(&frame(br#"{"type":"connect","port":8080}"#))
                .unwrap()
                .unwrap()
                .0,
            Request::Connect { port: 8080 }
        );
        assert!(matches!(
            decode::<Request>(&frame(br#"{"type":"connect","port":65536}"#)),
            Err(FrameError::Decode(_))
        ));
        let refused = br#"{"type":"error","kind":"connection_refused","message":"m","errno":111}"#;
        assert!(matches!(
            decode::<Response>(&frame(refused)).unwrap().unwrap().0,
            Response::Error(crate::ErrorInfo {
                kind: crate::ErrorKind::ConnectionRefused,
                errno: Some(111),
                ..
            })
        ));
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let body = "[".repeat(100_000);
        let mut buf = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        buf.extend_from_slice(body.as_bytes());
        assert!(matches!(
            decode::<Response>(&buf),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn message_larger_than_the_limit_is_not_encoded() {
        let req = Request::Stdin {
            data: vec![7; MAX_FRAME_LEN],
        };
        assert!(matches!(encode(&req), Err(FrameError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
            let mut r: &[u8] = &bytes;
            while let Ok(Some(_)) | Err(FrameError::Decode(_)) = read_frame::<_, Request>(&mut r) {}
        }

        #[test]
        fn decode_never_panics_on_a_valid_prefix_with_garbage_body(
            body in proptest::collection::vec(any::<u8>(), 1..512),
        ) {
            let mut buf = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
            buf.extend_from_slice(&body);
            let _ = decode::<Request>(&buf);
            let _ = decode::<Response>(&buf);
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            idx in 0usize..6,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut buf = encode(&sample_requests()[idx]).unwrap();
            for (pos, val) in flips {
                let n = buf.len();
                buf[pos % n] = val;
            }
            let _ = decode::<Request>(&buf);
        }

        #[test]
        fn stdin_bytes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let req = Request::Stdin { data };
            let buf = encode(&req).unwrap();
            prop_assert_eq!(decode::<Request>(&buf).unwrap().unwrap().0, req);
        }
    }
}
