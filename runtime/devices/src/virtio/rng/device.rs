use super::event_handler::RngHandler;
use crate::virtio::worker::Running;
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, device_type};

pub(super) const QUEUE_SIZE: u16 = 256;

/// The virtio-rng device. One request queue; every writable buffer is filled from the host's
/// `getrandom(2)`.
#[derive(Debug)]
pub struct Rng {
    pub(super) acked_features: u64,
    queue_sizes: [u16; 1],
    running: Option<Running<RngHandler>>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new, not yet activated device.
    pub fn new() -> Self {
        Rng {
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE],
            running: None,
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = RngHandler::new(ctx)?;
        self.running = Some(Running::start("virtio-rng", handler).map_err(ActivateError::Worker)?);
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
        VirtioDeviceState::Rng(crate::persist::Persist::save(self))
    }
}
