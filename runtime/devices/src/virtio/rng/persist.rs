use serde::{Deserialize, Serialize};

use super::Rng;
use crate::persist::Persist;
use crate::virtio::features::TRANSPORT;

/// Saved virtio-rng state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a saved virtio-rng state was refused.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The state claims features the device never offers.
    #[error("saved features {0:#x} were never offered")]
    Features(u64),
}

impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs = ();
    type Error = RngError;

    fn save(&self) -> RngState {
        RngState {
            acked_features: self.acked_features,
        }
    }

    fn restore(_args: (), state: &RngState) -> Result<Self, RngError> {
        if state.acked_features & !TRANSPORT != 0 {
            return Err(RngError::Features(state.acked_features));
        }
        let mut rng = Rng::new();
        rng.acked_features = state.acked_features;
        Ok(rng)
    }
}
