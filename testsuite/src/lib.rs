//! End-to-end tests that boot real guests, and the specc-bench benchmark binary.

pub mod bench;
