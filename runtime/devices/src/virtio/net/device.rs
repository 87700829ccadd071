use std::sync::{Arc, Mutex};

use super::backend::{BackendError, NetBackend, Transport};
use super::event_handler::NetHandler;
use super::features::*;
use crate::virtio::worker::Running;
use crate::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, device_type, read_config_bytes,
};

pub(super) const QUEUE_SIZE: u16 = 256;

/// How to build a network device.
#[derive(Debug)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU offered to the guest (VIRTIO_NET_F_MTU) and given to passt.
    pub mtu: u16,
    /// Where frames go.
    pub backend: NetBackend,
}

impl NetConfig {
    /// passt with default settings, MTU 1500.
    pub fn passt(mac: [u8; 6]) -> Self {
        NetConfig {
            mac,
            mtu: 1500,
            backend: NetBackend::Passt(super::PasstConfig::default()),
        }
    }
}

/// Why a network device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The backend could not be started.
    #[error("starting the network backend")]
    Backend(#[from] BackendError),
    /// The MTU is outside what Ethernet and the virtio buffers allow.
    #[error("MTU {0} outside 68..=65520")]
    Mtu(u16),
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    pub(super) mac: [u8; 6],
    pub(super) mtu: u16,
    pub(super) acked_features: u64,
    transport: Arc<Mutex<Transport>>,
    config_space: [u8; 12],
    queue_sizes: [u16; 2],
    running: Option<Running<NetHandler>>,
}

impl Net {
    /// Start the backend (for passt: spawn it) and build the device.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        if !(68..=65520).contains(&config.mtu) {
            return Err(NetError::Mtu(config.mtu));
        }
        let transport = Transport::open(config.backend, config.mtu)?;
        let mut cs = [0u8; 12];
        cs[..6].copy_from_slice(&config.mac);
        cs[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        cs[8..10].copy_from_slice(&1u16.to_le_bytes());
        cs[10..12].copy_from_slice(&config.mtu.to_le_bytes());
        Ok(Net {
            mac: config.mac,
            mtu: config.mtu,
            acked_features: 0,
            transport: Arc::new(Mutex::new(transport)),
            config_space: cs,
            queue_sizes: [QUEUE_SIZE; 2],
            running: None,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub(super) fn offered() -> u64 {
        (1u64 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU) | (1 << VIRTIO_NET_F_STATUS)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        Self::offered()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-less legacy devices.
        tracing::debug!("virtio-net: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = NetHandler::new(ctx, self.transport.clone())?;
        self.running = Some(Running::start("virtio-net", handler).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.running = None;
    }

    fn pause(&mut self) {
        if let Some(r) = &mut self.running {
            r.pause();
        }
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        match &mut self.running {
            Some(r) => r.resume().map_err(ActivateError::Worker),
            None => Ok(()),
        }
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.running.as_ref().map(Running::queue_states)
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(crate::persist::Persist::save(self))
    }
}
