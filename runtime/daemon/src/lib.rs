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
