use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{MAX_FRAME, Transport};
use crate::virtio::chain::{ChainError, ChainReader, ChainWriter, complete, pop_chain};
use crate::virtio::worker::{EventHandler, epoll_add, epoll_modify, epoll_remove, lock};
use crate::virtio::{ActivateContext, ActivateError, IrqTrigger};

const RX: usize = 0;
const TX: usize = 1;
const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const BACKEND_TOKEN: u64 = 2;

/// `struct virtio_net_hdr_v1`: the header in front of every frame with VIRTIO_F_VERSION_1.
const NET_HDR_LEN: usize = 12;

#[derive(Debug)]
pub(super) struct NetHandler {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    evts: Vec<EventFd>,
    irq: IrqTrigger,
    transport: Arc<Mutex<Transport>>,
    /// A frame read from the backend that waits for an rx buffer.
    rx_frame: Option<Vec<u8>>,
    interest: EventSet,
    registered: bool,
    failed: bool,
}

impl NetHandler {
    pub(super) fn new(
        ctx: ActivateContext,
        transport: Arc<Mutex<Transport>>,
    ) -> Result<Self, ActivateError> {
        if ctx.queues.len() != 2 || ctx.queue_evts.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: ctx.queues.len(),
            });
        }
        Ok(NetHandler {
            mem: ctx.mem,
            queues: ctx.queues,
            evts: ctx.queue_evts,
            irq: ctx.irq,
            transport,
            rx_frame: None,
            interest: EventSet::empty(),
            registered: false,
            failed: false,
        })
    }

    fn process_tx(&mut self) -> Result<(), ChainError> {
        let max = (NET_HDR_LEN + MAX_FRAME) as u64;
        let transport = self.transport.clone();
        let mut t = lock(&transport);
        while !t.tx_blocked() {
            let Some(chain) = pop_chain(&mut self.queues[TX], &self.mem, max)? else {
                break;
            };
            let mut r = ChainReader::new(&self.mem, &chain.readable);
            let mut hdr = [0u8; NET_HDR_LEN];
            r.read_exact(&mut hdr, "virtio-net header")?;
            let mut frame = vec![0u8; r.remaining()];
            r.read_exact(&mut frame, "frame")?;
            if let Err(e) = t.send_frame(&frame) {
                tracing::warn!("virtio-net: backend write failed, dropping frames: {e}");
            }
            complete(&mut self.queues[TX], &self.mem, chain.head, 0, &self.irq)?;
        }
        Ok(())
    }

    fn process_rx(&mut self) -> Result<(), ChainError> {
        let transport = self.transport.clone();
        loop {
            if self.rx_frame.is_none() {
                match lock(&transport).next_frame() {
                    Ok(Some(f)) => self.rx_frame = Some(f),
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        tracing::warn!("virtio-net: backend read failed: {e}");
                        return Ok(());
                    }
                }
            }
            let max = (NET_HDR_LEN + MAX_FRAME) as u64 * 2;
            let Some(chain) = pop_chain(&mut self.queues[RX], &self.mem, max)? else {
                // No buffers: keep the frame and stop reading until the driver posts some.
                return Ok(());
            };
            let frame = self.rx_frame.take().unwrap_or_default();
            let space = usize::try_from(chain.writable_len()).unwrap_or(usize::MAX);
            if space < NET_HDR_LEN + frame.len() {
                // Without VIRTIO_NET_F_MRG_RXBUF every buffer must hold a whole frame; a
                // driver that posts small ones loses the frame, like a NIC with short buffers.
                tracing::debug!(
                    "virtio-net: {}-byte frame dropped for a {space}-byte buffer",
                    frame.len()
                );
                complete(&mut self.queues[RX], &self.mem, chain.head, 0, &self.irq)?;
                continue;
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            let mut w = ChainWriter::new(&self.mem, &chain.writable);
            w.write_all(&hdr, "virtio-net header")?;
            w.write_all(&frame, "frame")?;
            let len = u32::try_from(w.written()).unwrap_or(u32::MAX);
            complete(&mut self.queues[RX], &self.mem, chain.head, len, &self.irq)?;
        }
    }

    /// Read from the backend only while a frame can go somewhere; write when output waits.
    fn refresh(&mut self, epoll: &Epoll) {
        let t = lock(&self.transport);
        if t.dead {
            if self.registered {
                epoll_remove(epoll, t.raw_fd());
                self.registered = false;
            }
            return;
        }
        let mut want = EventSet::empty();
        if self.rx_frame.is_none() {
            want |= EventSet::IN;
        }
        if t.tx_blocked() {
            want |= EventSet::OUT;
        }
        if want != self.interest {
            if let Err(e) = epoll_modify(epoll, t.raw_fd(), want, BACKEND_TOKEN) {
                tracing::error!("virtio-net: epoll modify failed: {e}");
            }
            self.interest = want;
        }
    }
}

impl EventHandler for NetHandler {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        epoll_add(epoll, self.evts[RX].as_raw_fd(), EventSet::IN, RX_TOKEN)?;
        epoll_add(epoll, self.evts[TX].as_raw_fd(), EventSet::IN, TX_TOKEN)?;
        let fd = lock(&self.transport).raw_fd();
        self.interest = EventSet::IN;
        epoll_add(epoll, fd, self.interest, BACKEND_TOKEN)?;
        self.registered = true;
        Ok(())
    }

    fn kick(&mut self, epoll: &Epoll) {
        self.handle(epoll, TX_TOKEN, EventSet::IN);
    }

    fn handle(&mut self, epoll: &Epoll, token: u64, events: EventSet) {
        match token {
            RX_TOKEN => {
                let _ = self.evts[RX].read();
            }
            TX_TOKEN => {
                let _ = self.evts[TX].read();
            }
            _ => {}
        }
        if self.failed {
            return;
        }
        if token == BACKEND_TOKEN
            && events.contains(EventSet::OUT)
            && let Err(e) = lock(&self.transport).flush()
        {
            tracing::warn!("virtio-net: backend write failed: {e}");
        }
        let r = self.process_tx().and_then(|()| self.process_rx());
        if let Err(e) = r {
            self.failed = true;
            self.irq.fail_device(&format_args!("virtio-net: {e}"));
            return;
        }
        if token == BACKEND_TOKEN && events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Frames already buffered were delivered above; nothing more will come.
            lock(&self.transport).dead = true;
            tracing::warn!("virtio-net: backend hung up");
        }
        self.refresh(epoll);
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queues.iter().map(Queue::state).collect()
    }
}
