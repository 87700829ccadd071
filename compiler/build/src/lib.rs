//! Layer builds: apply a layer's steps through the guest agent, snapshot, store, export.

pub mod builder;
pub mod explain;
pub mod keys;
pub mod steps;
