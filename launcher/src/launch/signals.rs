//! SIGTERM/SIGINT as a flag the main loop polls: a clean stop, exit status 0.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Install the handlers for SIGTERM and SIGINT, and ignore SIGPIPE (a peer that
/// goes away mid-write must give an error, not kill the launcher).
pub fn install() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { signal(sig, SigHandler::Handler(on_stop_signal)) } {
            tracing::warn!("cannot install {sig} handler: {e}");
        }
    }
    // SAFETY: ignoring SIGPIPE installs no handler code at all.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}

/// True once SIGTERM or SIGINT arrived.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}
