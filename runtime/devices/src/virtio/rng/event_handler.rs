use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::chain::{ChainError, ChainWriter, complete, pop_chain};
use crate::virtio::worker::{EventHandler, epoll_add};
use crate::virtio::{ActivateContext, ActivateError, IrqTrigger};

/// Largest chain the device accepts; a driver asks for at most a page or so at a time.
const MAX_CHAIN_BYTES: u64 = 1 << 20;
/// Bytes handed out per request at most (a driver must accept short fills).
const MAX_FILL: usize = 64 * 1024;

const QUEUE_TOKEN: u64 = 0;

#[derive(Debug)]
pub(super) struct RngHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    evt: EventFd,
    irq: IrqTrigger,
    failed: bool,
    buf: Vec<u8>,
}

impl RngHandler {
    pub(super) fn new(ctx: ActivateContext) -> Result<Self, ActivateError> {
        let got = ctx.queues.len();
        let (Ok([queue]), Ok([evt])) = (
            <[Queue; 1]>::try_from(ctx.queues),
            <[EventFd; 1]>::try_from(ctx.queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        Ok(RngHandler {
            mem: ctx.mem,
            queue,
            evt,
            irq: ctx.irq,
            failed: false,
            buf: Vec::new(),
        })
    }

    fn process(&mut self) -> Result<(), ChainError> {
        while let Some(chain) = pop_chain(&mut self.queue, &self.mem, MAX_CHAIN_BYTES)? {
            let want = usize::try_from(chain.writable_len())
                .unwrap_or(MAX_FILL)
                .min(MAX_FILL);
            self.buf.resize(want, 0);
            let filled = getrandom(&mut self.buf);
            let mut w = ChainWriter::new(&self.mem, &chain.writable);
            w.write(&self.buf[..filled])?;
            let len = u32::try_from(w.written()).unwrap_or(u32::MAX);
            complete(&mut self.queue, &self.mem, chain.head, len, &self.irq)?;
        }
        Ok(())
    }
}

/// Fill `buf` from the kernel's CSPRNG; returns how many bytes were filled (all, unless the
/// syscall fails, which it does not for buffers this small once the pool is initialized).
fn getrandom(buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe the writable slice `rest`, which outlives the
        // call; getrandom writes at most `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("getrandom failed: {e}");
            break;
        }
        done += n.unsigned_abs();
    }
    done
}

impl EventHandler for RngHandler {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        epoll_add(epoll, self.evt.as_raw_fd(), EventSet::IN, QUEUE_TOKEN)?;
        // Buffers may have been posted while no loop ran (activation, resume).
        Ok(())
    }

    fn kick(&mut self, epoll: &Epoll) {
        self.handle(epoll, QUEUE_TOKEN, EventSet::IN);
    }

    fn handle(&mut self, _epoll: &Epoll, token: u64, _events: EventSet) {
        if token != QUEUE_TOKEN {
            return;
        }
        let _ = self.evt.read();
        if self.failed {
            return;
        }
        if let Err(e) = self.process() {
            self.failed = true;
            self.irq.fail_device(&format_args!("virtio-rng: {e}"));
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.queue.state()]
    }
}
