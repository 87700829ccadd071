//! Logging to stderr, which is `/dev/console` (the serial port) when the agent is PID 1 and the
//! journal under systemd. One line per event, prefixed so it stands out in a boot log.

/// Logs one line.
macro_rules! log {
    ($($arg:tt)*) => {{
        eprintln!("specc-agent: {}", format_args!($($arg)*));
    }};
}
pub(crate) use log;
