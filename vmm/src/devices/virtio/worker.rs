//! One worker thread per virtio device: an epoll loop that serves the device's queues off
//! the vCPU threads.
//!
//! The loop waits (no timeout unless the backend has a timed event, such as a pending
//! RARP announcement) on:
//! * one eventfd per queue: the KVM ioeventfd on the queue's notify address, so a guest
//!   notify costs the vCPU an in-kernel exit of about 2 µs instead of a trip to the VMM;
//! * the backend's fd when it has one (a TAP: frames to receive), edge-triggered: the
//!   device reads it until it is empty or the guest has no buffer left, and a new
//!   notification of that queue (more buffers) or a new frame starts it again;
//! * the control eventfd: process every queue (resume, driver ready) or stop.
//!
//! Every pass runs under the transport's lock through [`VirtioPciDevice::process`], which
//! completes what it takes, so a pause (which takes that lock) never sees a request in
//! flight. Completions are signalled from this thread through an irqfd (MSI-X vector or
//! INTx), again without the VMM on the guest's path.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::pci::VirtioPciDevice;
use crate::devices::bus::lock;

/// Run by every worker thread before it serves anything, to install a seccomp filter
/// for the thread (see `launcher::launch::seccomp`). An error fails the device's creation
/// with that message.
pub type WorkerStartHook = fn(name: &str) -> Result<(), String>;

static WORKER_START_HOOK: std::sync::OnceLock<WorkerStartHook> = std::sync::OnceLock::new();

/// Install the worker thread start hook (once per process; later calls are ignored).
pub fn set_worker_start_hook(hook: WorkerStartHook) {
    let _ = WORKER_START_HOOK.set(hook);
}

const CONTROL: u64 = u64::MAX;
const BACKEND: u64 = u64::MAX - 1;

/// The worker of one device; dropping it stops and joins the thread.
///
/// The descriptors and the transport are shared with the thread but owned here, so they
/// are closed on the thread that drops the worker, never on the worker thread (whose
/// seccomp filter has no `fcntl`, which the debug build's `OwnedFd` drop calls).
pub struct Worker {
    stop: Arc<AtomicBool>,
    control: EventFd,
    join: Option<JoinHandle<()>>,
    _keep: (Arc<Epoll>, Arc<WorkerFds>, Arc<Mutex<VirtioPciDevice>>),
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// The descriptors a worker waits on.
pub struct WorkerFds {
    /// Queue `q`'s notification eventfd at index `q`.
    pub queues: Vec<EventFd>,
    /// The control eventfd (the transport keeps a clone to wake the worker).
    pub control: EventFd,
    /// A backend fd and the queue to process when it becomes readable.
    pub backend: Option<(RawFd, usize)>,
}

impl Worker {
    /// Start serving `transport` on a thread called `name`.
    pub fn spawn(
        name: String,
        transport: Arc<Mutex<VirtioPciDevice>>,
        fds: WorkerFds,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, data: u64, extra: EventSet| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN | extra, data),
            )
        };
        add(fds.control.as_raw_fd(), CONTROL, EventSet::empty())?;
        for (q, e) in fds.queues.iter().enumerate() {
            add(e.as_raw_fd(), q as u64, EventSet::empty())?;
        }
        if let Some((fd, _)) = fds.backend {
            add(fd, BACKEND, EventSet::EDGE_TRIGGERED)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let control = fds.control.try_clone()?;
        let (epoll, fds) = (Arc::new(epoll), Arc::new(fds));
        let keep = (epoll.clone(), fds.clone(), transport.clone());
        let stop2 = stop.clone();
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread_name = name.clone();
        let join = std::thread::Builder::new().name(name).spawn(move || {
            let started = WORKER_START_HOOK
                .get()
                .map_or(Ok(()), |hook| hook(&thread_name));
            let ok = started.is_ok();
            let _ = started_tx.send(started);
            if ok {
                run(&epoll, &transport, &fds, &stop2);
            }
        })?;
        let started = started_rx
            .recv()
            .unwrap_or_else(|_| Err("the worker thread died at start".into()));
        if let Err(e) = started {
            let _ = join.join();
            return Err(std::io::Error::other(e));
        }
        Ok(Worker {
            stop,
            control,
            join: Some(join),
            _keep: keep,
        })
    }

    /// Make the worker process every queue once (after a resume).
    pub fn kick(&self) {
        let _ = self.control.write(1);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn run(epoll: &Epoll, transport: &Mutex<VirtioPciDevice>, fds: &WorkerFds, stop: &AtomicBool) {
    let mut events = vec![EpollEvent::default(); fds.queues.len() + 2];
    // Process everything once at start: a restored device may have requests posted
    // whose notification went to the previous process.
    let mut all = true;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut pending: u64 = 0;
        {
            let mut t = lock(transport);
            if all {
                t.process_all();
            }
            all = false;
            // The backend's timed event (announcements), if any: the wait's bound.
            let timeout = t.device_timer().map_or(-1, |d| d.as_millis().max(1) as i32);
            drop(t);
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio worker: epoll: {e}; the worker stops");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    CONTROL => {
                        let _ = fds.control.read();
                        all = true;
                    }
                    BACKEND => {
                        if let Some((_, q)) = fds.backend {
                            pending |= 1 << q;
                        }
                    }
                    q => {
                        if let Some(e) = fds.queues.get(q as usize) {
                            let _ = e.read();
                            pending |= 1 << q;
                        }
                    }
                }
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if pending != 0 && !all {
            let mut t = lock(transport);
            for q in 0..fds.queues.len().min(64) {
                if pending & (1 << q) != 0 {
                    t.process(q);
                }
            }
        }
    }
}
