//! Saving and restoring device state for snapshots and live fork.
//!
//! A `State` is plain data (serde) and **untrusted** on restore: it may come from a corrupt or
//! hostile snapshot file, so `restore` validates every field and returns an error instead of
//! panicking or building a device that a later guest access could crash.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Save/restore of one component (Firecracker's `snapshot::Persist` shape).
pub trait Persist: Sized {
    /// The saved state: plain data, serializable, comparable (round-trip tests compare states).
    type State: Serialize + DeserializeOwned + Clone + Debug + PartialEq;
    /// What restore needs besides the state: new backends, guest memory, interrupts.
    type ConstructorArgs;
    /// Why a restore was refused.
    type Error: std::error::Error;

    /// Capture the state. The caller has quiesced the device (vCPUs paused, worker stopped).
    fn save(&self) -> Self::State;
    /// Build the component from an untrusted state and fresh constructor arguments.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
