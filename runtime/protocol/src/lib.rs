//! The host <-> guest agent protocol: versioned, framed messages, and a blocking host client.
//!
//! Wire format (see `docs/agent-protocol.md`): each frame is a 4-byte big-endian length and a
//! JSON body of at most [`MAX_FRAME_LEN`] bytes; byte strings are base64. The first exchange on
//! a connection is `Hello`, which fixes the protocol version. A connection runs one request at
//! a time; concurrency comes from more connections.
#![deny(missing_docs)]

mod b64;
pub mod client;
pub mod frame;
pub mod messages;

pub use client::{Client, ClientError, Output};
pub use frame::{FrameError, MAX_CHUNK, MAX_FRAME_LEN, decode, encode, read_frame, write_frame};
pub use messages::*;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
