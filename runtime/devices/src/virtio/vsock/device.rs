use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use super::event_handler::VsockHandler;
use crate::virtio::inspect::DeviceInspect;
use crate::virtio::worker::{Running, lock};
use crate::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, device_type, read_config_bytes,
};

pub(super) const QUEUE_SIZE: u16 = 256;

/// How to build a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The host-side unix socket; guest connections to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0, 1, 2 and `u32::MAX` are reserved.
    #[error("guest CID {0} is reserved")]
    ReservedCid(u64),
    /// The host socket could not be created.
    #[error("binding the host socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    pub(super) config: VsockConfig,
    pub(super) acked_features: u64,
    /// Set on restore: the guest must drop its connections (TRANSPORT_RESET) once activated.
    pub(super) reset_pending: bool,
    listener: Arc<UnixListener>,
    config_space: [u8; 8],
    queue_sizes: [u16; 3],
    running: Option<Running<VsockHandler>>,
}

impl Vsock {
    /// Bind the host socket at `config.uds_path` (a stale socket file there is replaced).
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid <= 2 || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let bind_err = |source| VsockError::Bind {
            path: config.uds_path.clone(),
            source,
        };
        let listener = match UnixListener::bind(&config.uds_path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                std::fs::remove_file(&config.uds_path).map_err(bind_err)?;
                UnixListener::bind(&config.uds_path).map_err(bind_err)?
            }
            Err(e) => return Err(bind_err(e)),
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Vsock {
            config_space: config.guest_cid.to_le_bytes(),
            config,
            acked_features: 0,
            reset_pending: false,
            listener: Arc::new(listener),
            queue_sizes: [QUEUE_SIZE; 3],
            running: None,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.running = None;
        let _ = std::fs::remove_file(&self.config.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-vsock: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = VsockHandler::new(
            ctx,
            self.config.clone(),
            self.listener.clone(),
            std::mem::take(&mut self.reset_pending),
        )?;
        self.running =
            Some(Running::start("virtio-vsock", handler).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the handler closes every host stream.
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
        VirtioDeviceState::Vsock(crate::persist::Persist::save(self))
    }

    fn inspect(&self) -> DeviceInspect {
        match &self.running {
            Some(r) => DeviceInspect::Vsock(lock(&r.handler).inspect()),
            None => DeviceInspect::Plain,
        }
    }
}
