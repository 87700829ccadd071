//! The host <-> guest agent protocol: versioned, framed messages.
