//! The in-guest agent: PID 1 or a systemd service, serving exec and files over vsock.

fn main() {}
