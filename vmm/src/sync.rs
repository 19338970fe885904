//! The one poison-ignoring lock of the workspace.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, recovering from a poisoned lock. Every mutex this is used on guards state
/// that stays consistent when a holder panics (device registers, a migration's slot, a
/// TLS buffer), and a panicking thread must not take the VM or its API down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
