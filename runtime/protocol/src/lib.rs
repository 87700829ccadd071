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
#[doc(hidden)]
pub mod fuzzing;
pub mod messages;

pub use client::{Client, ClientError, Output};
pub use frame::{FrameError, MAX_CHUNK, MAX_FRAME_LEN, decode, encode, read_frame, write_frame};
pub use messages::*;

/// The newest protocol version this crate speaks. Version 2 added [`Request::Connect`].
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version this crate still speaks: a VM restored from an old snapshot
/// runs the agent of that day.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
