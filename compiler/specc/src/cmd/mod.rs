//! One module per subcommand; each exposes `Args` and `run`.

pub mod build;
pub mod check;
pub mod common;
pub mod fmt;
pub mod gc;
pub mod graph;
pub mod kernel;
pub mod plan;
pub mod pull;
pub mod push;
pub mod rig;
pub mod run;
pub mod store;
pub mod vm;
