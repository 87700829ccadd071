//! One worker thread per activated device, running one explicit epoll loop.
//!
//! The loop owns no device state: it holds the device's handler behind a mutex, so the device
//! handle (on the VMM side) can stop the loop, save the state, and start a new loop later
//! (pause/resume around a snapshot) without losing queues or connections.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Token reserved for the worker's own stop event.
const STOP_TOKEN: u64 = u64::MAX;

/// Device worker threads that died of a panic (a bug: guest input must never panic a device).
static WORKER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// How many device worker threads panicked in this process. Always 0 unless there is a bug;
/// fuzzers and tests check it.
pub fn worker_panics() -> usize {
    WORKER_PANICS.load(Ordering::SeqCst)
}

/// The device side of a worker loop.
pub(crate) trait EventHandler: Send + 'static {
    /// Register every fd the handler currently waits on (called by the thread starting the
    /// loop, so errors reach it).
    fn register(&mut self, epoll: &Epoll) -> io::Result<()>;
    /// First thing on the worker thread: process work that arrived while no loop ran
    /// (activation, resume), so that it never runs on the caller's (a vCPU's) thread.
    fn kick(&mut self, epoll: &Epoll);
    /// One ready event. `token` is what the handler registered the fd with.
    fn handle(&mut self, epoll: &Epoll, token: u64, events: EventSet);
    /// The live queue states, for snapshots.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
}

/// An activated device: its handler and the thread running it (absent while paused).
#[derive(Debug)]
pub(crate) struct Running<H: EventHandler> {
    pub(crate) handler: Arc<Mutex<H>>,
    worker: Option<Worker>,
    name: String,
}

impl<H: EventHandler> Running<H> {
    pub(crate) fn start(name: &str, handler: H) -> io::Result<Self> {
        let handler = Arc::new(Mutex::new(handler));
        let worker = Worker::spawn(name, handler.clone())?;
        Ok(Running {
            handler,
            worker: Some(worker),
            name: name.to_owned(),
        })
    }

    pub(crate) fn pause(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }

    pub(crate) fn resume(&mut self) -> io::Result<()> {
        if self.worker.is_none() {
            self.worker = Some(Worker::spawn(&self.name, self.handler.clone())?);
        }
        Ok(())
    }

    pub(crate) fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        lock(&self.handler).queue_states()
    }
}

/// Lock a handler even if a previous holder panicked: the state is still the best we have and a
/// panic in one event must not wedge snapshotting.
pub(crate) fn lock<H>(m: &Mutex<H>) -> MutexGuard<'_, H> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Add `fd` to `epoll` for `events` under `token`.
pub(crate) fn epoll_add(epoll: &Epoll, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

/// Change the events `fd` waits for.
#[allow(dead_code)] // TEMP(devices): used by vsock and net, next commits.
pub(crate) fn epoll_modify(
    epoll: &Epoll,
    fd: RawFd,
    events: EventSet,
    token: u64,
) -> io::Result<()> {
    epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
}

/// Remove `fd` from `epoll`; errors (fd already gone) are not interesting.
#[allow(dead_code)] // TEMP(devices): used by vsock and net, next commits.
pub(crate) fn epoll_remove(epoll: &Epoll, fd: RawFd) {
    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
}

/// A running worker thread.
#[derive(Debug)]
pub(crate) struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start a loop over `handler`.
    pub(crate) fn spawn<H: EventHandler>(name: &str, handler: Arc<Mutex<H>>) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll_add(&epoll, stop.as_raw_fd(), EventSet::IN, STOP_TOKEN)?;
        lock(&handler).register(&epoll)?;
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&epoll, &handler))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the loop and wait for it; the handler is untouched.
    pub(crate) fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("failed to signal worker stop: {e}");
            }
            if thread.join().is_err() {
                WORKER_PANICS.fetch_add(1, Ordering::SeqCst);
                tracing::error!("device worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<H: EventHandler>(epoll: &Epoll, handler: &Mutex<H>) {
    lock(handler).kick(epoll);
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("device worker epoll failed: {e}");
                return;
            }
        };
        // Finish the whole batch before honouring a stop: a queue notify that was signalled
        // before the stop is then always processed (pause right after notify sees its effect).
        let mut stop = false;
        for ev in &events[..n] {
            if ev.data() == STOP_TOKEN {
                stop = true;
            } else {
                lock(handler).handle(epoll, ev.data(), ev.event_set());
            }
        }
        if stop {
            return;
        }
    }
}
