use serde::{Deserialize, Serialize};

use super::device::{Net, NetConfig, NetError};
use crate::persist::Persist;
use crate::virtio::features::TRANSPORT;

/// Saved virtio-net state. Frames in flight are not saved: a network may drop them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC the guest's driver read.
    pub mac: [u8; 6],
    /// The MTU the guest's driver read.
    pub mtu: u16,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Why a saved virtio-net state was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    /// The new backend could not be started.
    #[error("creating the restored network device failed")]
    Create(#[from] NetError),
    /// The configuration's MAC or MTU differs from what the guest knows.
    #[error("restored network configuration differs from the snapshot: {0}")]
    Config(&'static str),
    /// The state claims features the device never offers.
    #[error("saved features {0:#x} were never offered")]
    Features(u64),
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetConfig;
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            mtu: self.mtu,
            acked_features: self.acked_features,
        }
    }

    fn restore(config: NetConfig, state: &NetState) -> Result<Self, NetRestoreError> {
        if config.mac != state.mac {
            return Err(NetRestoreError::Config("MAC address"));
        }
        if config.mtu != state.mtu {
            return Err(NetRestoreError::Config("MTU"));
        }
        if state.acked_features & !(Net::offered() | TRANSPORT) != 0 {
            return Err(NetRestoreError::Features(state.acked_features));
        }
        let mut net = Net::new(config)?;
        net.acked_features = state.acked_features;
        Ok(net)
    }
}
