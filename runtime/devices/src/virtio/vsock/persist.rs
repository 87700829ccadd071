use serde::{Deserialize, Serialize};

use super::device::{Vsock, VsockConfig, VsockError};
use crate::persist::Persist;
use crate::virtio::features::TRANSPORT;

/// Saved virtio-vsock state. Connections are not saved: their host ends do not survive a
/// restore (or belong to the parent of a fork), so the restored device tells the guest with a
/// TRANSPORT_RESET event and the guest drops them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID (the guest's driver cached it).
    pub guest_cid: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a saved virtio-vsock state was refused.
#[derive(Debug, thiserror::Error)]
pub enum VsockRestoreError {
    /// The new host socket could not be set up.
    #[error("creating the restored vsock device failed")]
    Create(#[from] VsockError),
    /// The configuration gives another CID than the guest knows.
    #[error("restored CID {got} differs from the snapshot's {saved}")]
    Cid {
        /// In the state.
        saved: u64,
        /// In the configuration.
        got: u64,
    },
    /// The state claims features the device never offers.
    #[error("saved features {0:#x} were never offered")]
    Features(u64),
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockConfig;
    type Error = VsockRestoreError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.config.guest_cid,
            acked_features: self.acked_features,
        }
    }

    fn restore(config: VsockConfig, state: &VsockState) -> Result<Self, VsockRestoreError> {
        if config.guest_cid != state.guest_cid {
            return Err(VsockRestoreError::Cid {
                saved: state.guest_cid,
                got: config.guest_cid,
            });
        }
        if state.acked_features & !TRANSPORT != 0 {
            return Err(VsockRestoreError::Features(state.acked_features));
        }
        let mut v = Vsock::new(config)?;
        v.acked_features = state.acked_features;
        v.reset_pending = true;
        Ok(v)
    }
}
