//! The switch-over boost: while the guest is paused, the thread that sends (or loads)
//! the last pages and the state must not wait for a core behind other VMs' vCPUs.
//!
//! [`Boost::current_thread`] raises the calling thread to `SCHED_FIFO` where allowed
//! (root or `CAP_SYS_NICE`, or an `RLIMIT_RTPRIO` above 0), else lowers its nice value
//! (allowed down to `RLIMIT_NICE`), else leaves it as it is; it never fails. Dropping the
//! guard restores the thread's previous policy and nice value. What was applied, or why
//! nothing was, goes into the migration report.
//!
//! The boost is set with `SCHED_RESET_ON_FORK`: threads created while it holds (the
//! destination's vCPU and RX threads are spawned by the boosted receiver) start with the
//! normal policy and nice 0 instead of inheriting it. Without the flag a guest's vCPU
//! would run at real-time priority for ever.

/// Real-time priority used for the switch-over (low among real-time priorities, so
/// kernel threads and other real-time work still preempt it).
const FIFO_PRIORITY: i32 = 10;
/// Nice value tried when real-time scheduling is not allowed.
const BOOST_NICE: i32 = -10;

/// A boosted thread; restores its scheduling on drop.
pub struct Boost {
    tid: libc::pid_t,
    restore_policy: Option<(i32, libc::sched_param)>,
    restore_nice: Option<i32>,
    applied: String,
}

fn last_error() -> String {
    std::io::Error::last_os_error().to_string()
}

impl Boost {
    /// Boost the calling thread as far as this process may.
    pub fn current_thread() -> Self {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut b = Boost {
            tid,
            restore_policy: None,
            restore_nice: None,
            applied: String::new(),
        };
        let mut old = libc::sched_param { sched_priority: 0 };
        // SAFETY: scheduling calls on our own thread id with a valid out-pointer.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        // SAFETY: as above.
        let got = unsafe { libc::sched_getparam(tid, &mut old) };
        let fifo = libc::sched_param {
            sched_priority: FIFO_PRIORITY,
        };
        let raised = policy >= 0
            && got == 0
            // SAFETY: as above; `fifo` is a valid parameter block.
            && unsafe {
                libc::sched_setscheduler(tid, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &fifo)
            } == 0;
        if raised {
            b.restore_policy = Some((policy, old));
            b.applied = format!("SCHED_FIFO {FIFO_PRIORITY}");
            return b;
        }
        let fifo_err = last_error();
        if policy >= 0 && got == 0 {
            // Unprivileged threads may set the flag on their own policy; it keeps the nice
            // boost from being inherited too.
            // SAFETY: as above, our own thread and its current parameters.
            if unsafe { libc::sched_setscheduler(tid, policy | libc::SCHED_RESET_ON_FORK, &old) }
                == 0
            {
                b.restore_policy = Some((policy, old));
            }
        }
        // SAFETY: get/setpriority on our own thread id (Linux nice values are per thread).
        let nice = unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
        };
        // SAFETY: as above.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BOOST_NICE) } == 0 {
            b.restore_nice = Some(nice);
            b.applied = format!("nice {BOOST_NICE} (SCHED_FIFO refused: {fifo_err})");
            return b;
        }
        b.applied = format!(
            "none: SCHED_FIFO refused ({fifo_err}), nice {BOOST_NICE} refused ({}); the switch-over competes with other threads for a core",
            last_error()
        );
        b
    }

    /// What was applied, or why nothing was.
    pub fn applied(&self) -> &str {
        &self.applied
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.restore_policy.take() {
            // SAFETY: restoring our own thread's previous policy and parameters.
            if unsafe { libc::sched_setscheduler(self.tid, policy, &param) } != 0 {
                tracing::warn!("cannot restore the scheduling policy: {}", last_error());
            }
        }
        if let Some(nice) = self.restore_nice.take() {
            // SAFETY: restoring our own thread's nice value (raising it is always allowed).
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid as libc::id_t, nice) } != 0 {
                tracing::warn!("cannot restore the nice value: {}", last_error());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> i32 {
        // SAFETY: querying our own thread.
        unsafe { libc::sched_getscheduler(libc::gettid()) }
    }

    #[test]
    fn threads_spawned_while_boosted_do_not_inherit_it() {
        let b = Boost::current_thread();
        let child = std::thread::spawn(|| {
            // SAFETY: querying our own thread.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as u32) };
            (policy() & !libc::SCHED_RESET_ON_FORK, nice)
        })
        .join()
        .unwrap();
        drop(b);
        assert_eq!(
            child,
            (libc::SCHED_OTHER, 0),
            "a spawned thread inherited the boost"
        );
    }

    #[test]
    fn boost_is_reported_and_undone() {
        let before = policy();
        {
            let b = Boost::current_thread();
            assert!(!b.applied().is_empty());
            if b.applied().starts_with("SCHED_FIFO") {
                assert_eq!(policy() & !libc::SCHED_RESET_ON_FORK, libc::SCHED_FIFO);
            }
        }
        assert_eq!(policy(), before, "the policy is restored on drop");
    }
}
