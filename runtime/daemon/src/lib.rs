//! `specd`: the host daemon that runs VMs from specc snapshot artifacts.
//!
//! - [`api`]: the wire types of the HTTP/JSON API (and of its OpenAPI document).
//! - [`server`]: the API over a unix socket (TCP optional), one thread per request.
//! - [`daemon`]: the lifecycle: create, fork, pause, resume, suspend, wake, delete, recovery
//!   after a crash, idle timers, the storage budget.
//! - [`db`]: the durable state (SQLite).
//! - [`policy`]: idle and eviction decisions as pure functions.
//! - [`client`]: the client `specc vm` uses.
//! - [`metrics`]: Prometheus counters and histograms.

pub mod api;
pub mod client;
pub mod daemon;
pub mod db;
pub mod metrics;
pub mod policy;
pub mod server;

use std::path::PathBuf;

/// The daemon's default state directory: `$SPECC_HOME/specd`.
pub fn default_state_dir() -> PathBuf {
    specc_plan::store::specc_home().join("specd")
}

/// Where clients look for the API socket: `$SPECD_SOCKET`, else `<default state>/run/specd.sock`.
pub fn default_socket() -> PathBuf {
    std::env::var_os("SPECD_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| default_state_dir().join("run/specd.sock"))
}
