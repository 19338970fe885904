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
//! **Polling.** A device may name a queue to poll ([`super::VirtioDevice::poll_queue`],
//! virtio-net: TX). After a pass that took a request, the worker keeps looking, for a
//! window, at that queue (through the ring, with the driver's notifications of it off) and
//! at its epoll set (timeout 0) instead of sleeping; every request taken extends the
//! window. The window adapts as QEMU's `poll-grow`/`poll-shrink` do: it grows (4 µs,
//! doubling, up to the device's maximum) while the next request keeps arriving soon after
//! the worker went to sleep, and halves down to nothing when the device goes quiet, so an
//! idle device never spins. On this nested-KVM host a sleeping worker's wake-up (an idle
//! CPU halts, and waking it goes through the outer hypervisor) costs about 35 µs, which
//! polling saves for request/response traffic. Polling stops, and notifications are on
//! again, when the window ends, at a pause ([`Worker::hold`]: the pause does not compete
//! with a polling worker for the transport's lock) and at a resume (which processes every
//! queue).
//!
//! Every pass runs under the transport's lock through [`VirtioPciDevice::process`], which
//! completes what it takes, so a pause (which takes that lock) never sees a request in
//! flight. Completions are signalled from this thread through an irqfd (MSI-X vector or
//! INTx), again without the VMM on the guest's path.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// Set from a pause until the resume: the worker does not poll (it would take the
    /// transport's lock over and over, while the pause waits for it).
    hold: Arc<AtomicBool>,
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
    /// A queue to poll after activity, and for how long ([`VirtioDevice::poll_queue`]).
    ///
    /// [`VirtioDevice::poll_queue`]: super::VirtioDevice::poll_queue
    pub poll: Option<(usize, Duration)>,
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
        let hold = Arc::new(AtomicBool::new(false));
        let hold2 = hold.clone();
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread_name = name.clone();
        let join = std::thread::Builder::new().name(name).spawn(move || {
            let started = WORKER_START_HOOK
                .get()
                .map_or(Ok(()), |hook| hook(&thread_name));
            let ok = started.is_ok();
            let _ = started_tx.send(started);
            if ok {
                run(&epoll, &transport, &fds, &stop2, &hold2);
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
            hold,
            control,
            join: Some(join),
            _keep: keep,
        })
    }

    /// Make the worker process every queue once (after a resume).
    pub fn kick(&self) {
        let _ = self.control.write(1);
    }

    /// A pause is coming (`true`, before it takes the transport's lock) or is over
    /// (`false`, before the [`Self::kick`]): stop polling, and wake the worker so that it
    /// leaves a poll window now, or may poll again.
    pub fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
        if on {
            self.kick();
        }
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

/// The adaptive poll window of a worker (as QEMU's `poll-grow`/`poll-shrink`): it grows
/// while the next request keeps coming soon after the window ended (polling longer would
/// have caught it without a sleep and a wake-up), and shrinks to nothing when the device
/// goes quiet, so an idle device never spins.
#[derive(Debug)]
struct PollWindow {
    max: Duration,
    now: Duration,
}

/// The first window after a quiet spell, and the shortest kept before polling stops.
const POLL_MIN: Duration = Duration::from_micros(4);

impl PollWindow {
    /// The worker slept `slept` after a window of `self.now` before the next request.
    fn adapt(&mut self, slept: Duration) {
        if self.now + slept <= self.max {
            self.now = (self.now * 2).clamp(POLL_MIN, self.max);
        } else {
            self.now /= 2;
            if self.now < POLL_MIN {
                self.now = Duration::ZERO;
            }
        }
    }
}

fn run(
    epoll: &Epoll,
    transport: &Mutex<VirtioPciDevice>,
    fds: &WorkerFds,
    stop: &AtomicBool,
    hold: &AtomicBool,
) {
    let mut events = vec![EpollEvent::default(); fds.queues.len() + 2];
    // Process everything once at start: a restored device may have requests posted
    // whose notification went to the previous process.
    let mut all = true;
    let mut window = fds.poll.map(|(_, max)| PollWindow {
        max,
        now: Duration::ZERO,
    });
    // While polling: until when (each pass that takes a request extends it).
    let mut poll_until: Option<Instant> = None;
    // When the worker last went to sleep after a poll window, to adapt the window.
    let mut slept_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut pending: u64 = 0;
        {
            let mut t = lock(transport);
            if all {
                // Also turns the polled queue's notifications on again.
                t.process_all();
                poll_until = None;
            }
            all = false;
            // Polling: only look. Otherwise the backend's timed event (announcements), if
            // any, bounds the wait.
            let timeout = match poll_until {
                Some(_) => 0,
                None => t.device_timer().map_or(-1, |d| d.as_millis().max(1) as i32),
            };
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
        if all {
            continue;
        }
        let mut t = lock(transport);
        let mut active = false;
        for q in 0..fds.queues.len().min(64) {
            if pending & (1 << q) != 0 {
                active |= match (poll_until, fds.poll) {
                    (Some(_), Some((pq, _))) if pq == q => t.poll(q),
                    _ => t.process(q),
                };
            }
        }
        let (Some((pq, _)), Some(w)) = (fds.poll, window.as_mut()) else {
            continue;
        };
        if poll_until.is_some() {
            active |= t.poll(pq);
        }
        let now = Instant::now();
        if active {
            if let Some(at) = slept_at.take() {
                w.adapt(now - at);
            }
            if w.now.is_zero() || hold.load(Ordering::SeqCst) {
                if poll_until.take().is_some() {
                    t.process(pq); // notifications on again
                }
                slept_at = Some(now); // no window: straight to sleep
                continue;
            }
            if poll_until.is_none() {
                t.suppress_notifications(pq);
            }
            poll_until = Some(now + w.now);
        } else if poll_until.is_some_and(|u| now >= u) {
            // Quiet for the whole window: notifications on again (serving what came
            // before they were), then sleep.
            poll_until = None;
            if t.process(pq) {
                t.suppress_notifications(pq);
                poll_until = Some(now + w.now);
            } else {
                slept_at = Some(now);
            }
        }
        drop(t);
        if poll_until.is_some() {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_window_grows_with_close_traffic_and_vanishes_when_quiet() {
        let us = Duration::from_micros;
        let mut w = PollWindow {
            max: us(50),
            now: Duration::ZERO,
        };
        // Requests that come right after the worker went to sleep: 4, 8, ... up to 50 µs.
        let grown: Vec<_> = (0..5)
            .map(|_| {
                w.adapt(us(1));
                w.now
            })
            .collect();
        assert_eq!(grown, [us(4), us(8), us(16), us(32), us(50)]);
        // Past the longest window, even a close request would not have been caught by
        // polling longer: the window halves.
        w.adapt(us(1));
        assert_eq!(w.now, us(25));
        // Requests long after the window: it halves, and below the minimum it is gone, so
        // an idle device does not spin.
        let shrunk: Vec<_> = (0..4)
            .map(|_| {
                w.adapt(Duration::from_millis(10));
                w.now
            })
            .collect();
        let ns = Duration::from_nanos;
        assert_eq!(
            shrunk,
            [ns(12_500), ns(6_250), Duration::ZERO, Duration::ZERO]
        );
    }
}
