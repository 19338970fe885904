//! RAII helpers of the sender: dirty logging that turns itself off, and the
//! auto-converge throttle thread that stops itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm::Vm;

use super::{SendError, THROTTLE_PERIOD};

/// Turns KVM dirty logging on, and off again on drop, whatever happens.
pub(super) struct DirtyLogging<'a>(&'a Vm);

impl<'a> DirtyLogging<'a> {
    /// Also says which mechanism KVM uses (ring or bitmap), for the report.
    pub(super) fn on(vm: &'a Vm) -> Result<(Self, vmm::machine::DirtyTracking), SendError> {
        // From a clean slate: what was written before now is sent by iteration 0.
        let mode = vm
            .start_dirty_log()
            .map_err(|e| SendError::Vm(e.to_string()))?;
        Ok((Self(vm), mode))
    }
}

impl Drop for DirtyLogging<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.stop_dirty_log() {
            tracing::error!("cannot turn dirty logging off: {e}");
        }
    }
}

/// Throttles the vCPUs from a helper thread while alive (auto-converge).
pub(super) struct Throttler {
    percent: Arc<std::sync::atomic::AtomicU8>,
    stop: Arc<AtomicBool>,
    stalled_us: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttler {
    pub(super) fn start(vm: Arc<Vm>) -> Self {
        let percent = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let stalled_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (p, s, st) = (percent.clone(), stop.clone(), stalled_us.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let pct = u32::from(p.load(Ordering::Relaxed));
                    if pct > 0 {
                        let slice = THROTTLE_PERIOD * pct / 100;
                        vm.throttle(slice);
                        st.fetch_add(slice.as_micros() as u64, Ordering::Relaxed);
                    }
                    std::thread::park_timeout(THROTTLE_PERIOD);
                }
            })
            .ok();
        Self {
            percent,
            stop,
            stalled_us,
            thread,
        }
    }

    pub(super) fn set(&self, pct: u8) {
        self.percent.store(pct, Ordering::Relaxed);
    }

    pub(super) fn stalled(&self) -> Duration {
        Duration::from_micros(self.stalled_us.load(Ordering::Relaxed))
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
