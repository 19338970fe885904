//! Seccomp filters, per thread kind.
//!
//! - **vCPU threads** get the strictest filter: the syscalls a vCPU loop makes
//!   (KVM ioctls, and `TUNSETOFFLOAD`, which virtio-net issues when the guest's driver
//!   sets DRIVER_OK or resets the device through a register the vCPU writes; writes to the console and eventfds, disk I/O for device
//!   emulation, memory management of the allocator, sleeping for throttling) and
//!   nothing else. Anything outside it **kills the launcher** (SIGSYS): a vCPU
//!   thread runs on behalf of the guest and is the likeliest to be subverted.
//! - **virtio worker threads** (one per device, `vmm::devices::virtio::worker`) get a
//!   filter as tight: waiting on their epoll set, reading and writing eventfds, the TAP
//!   and the disk file, syncing the disk, memory management of the allocator. No ioctl
//!   at all (MSI routes are programmed by the vCPU thread that writes the MSI-X table),
//!   no socket, no open. Anything else kills the launcher, as on a vCPU thread: a worker
//!   parses guest-controlled rings.
//! - **Every other thread** (main, API, migration, incoming) inherits a process
//!   filter installed on the main thread before the VM exists. It allows what a
//!   launcher legitimately does (files, Unix/TCP sockets, memfds, threads) and
//!   refuses the rest with EPERM: no exec, no ptrace, no mount, no module or
//!   BPF loading. EPERM rather than a kill, because these threads run error paths
//!   that are rare, and an error message is better than a dead VM there.
//!
//! `launcher run --no-seccomp` turns both off (for debugging with strace, say).
//! The hidden test-only flag `launcher run --seccomp-selftest[=vcpu|worker]` makes each vCPU
//! thread (or each virtio worker thread) call a forbidden syscall right after its filter is
//! installed: the test suite uses it to prove that the filter kills the process rather than
//! letting the call succeed. It is a command-line flag, never read from the environment.

use std::collections::BTreeMap;
use std::convert::TryInto;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter does not compile.
    #[error("cannot build the {0} seccomp filter: {1}")]
    Build(&'static str, String),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter: {1} (run with --no-seccomp to do without)")]
    Install(&'static str, String),
}

/// The KVM ioctl type byte (`KVMIO`): bits 8..16 of every KVM ioctl number.
const KVMIO: u64 = 0xae;

/// What every thread that runs on the guest's behalf needs: the allocator, futexes,
/// signals returning, its own exit.
const THREAD_BASICS: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_close,
    libc::SYS_restart_syscall,
];

/// Device I/O: eventfds, the console, TAPs and disk files, and syncing a disk.
const DEVICE_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// vCPU threads only: throttling sleeps, the kick signal, seeking the console.
const VCPU_ONLY: &[i64] = &[
    libc::SYS_lseek,
    libc::SYS_rt_sigaction,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
];

/// virtio worker threads only: waiting on their epoll set.
const WORKER_ONLY: &[i64] = &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait];

fn vcpu_syscalls() -> Vec<i64> {
    [THREAD_BASICS, DEVICE_IO, VCPU_ONLY].concat()
}

fn worker_syscalls() -> Vec<i64> {
    [THREAD_BASICS, DEVICE_IO, WORKER_ONLY].concat()
}

const PROCESS_SYSCALLS: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_ioctl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_tgkill,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_umask,
    libc::SYS_eventfd2,
    libc::SYS_prlimit64,
    libc::SYS_sysinfo,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_uname,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_restart_syscall,
    // The switch-over boost (migration/src/boost.rs): the calling thread's own policy.
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_getparam,
    libc::SYS_setpriority,
    libc::SYS_getpriority,
    // Installing a further filter (the vCPU threads' own) can only narrow what is allowed.
    libc::SYS_seccomp,
];

fn compile(
    what: &'static str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(what, e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(what, e.to_string()))
}

/// The vCPU thread filter.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = vcpu_syscalls()
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    // ioctl: KVM ioctls only (type byte KVMIO), on any fd.
    let kvm_only = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )
    .map_err(|e| SeccompError::Build("vCPU", e.to_string()))?;
    let rule =
        SeccompRule::new(vec![kvm_only]).map_err(|e| SeccompError::Build("vCPU", e.to_string()))?;
    // ...and TUNSETOFFLOAD exactly (virtio-net's `Net::activate` and reset run on the vCPU
    // thread that writes the device status). Its argument is a flag word, no pointer.
    let tun_offload = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::TUNSETOFFLOAD,
    )
    .map_err(|e| SeccompError::Build("vCPU", e.to_string()))?;
    let tun_rule = SeccompRule::new(vec![tun_offload])
        .map_err(|e| SeccompError::Build("vCPU", e.to_string()))?;
    rules.insert(libc::SYS_ioctl, vec![rule, tun_rule]);
    compile("vCPU", rules, SeccompAction::KillProcess)
}

/// The virtio worker thread filter.
pub fn worker_filter() -> Result<BpfProgram, SeccompError> {
    let rules = worker_syscalls()
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    compile("virtio worker", rules, SeccompAction::KillProcess)
}

/// The virtio worker thread start hook: install the worker filter on the calling thread.
pub fn worker_thread_start(name: &str) -> Result<(), String> {
    let prog = worker_filter().map_err(|e| e.to_string())?;
    seccompiler::apply_filter(&prog).map_err(|e| {
        format!(
            "{name}: {}",
            SeccompError::Install("virtio worker", e.to_string())
        )
    })?;
    if selftest_is(Selftest::Worker) {
        forbidden_syscall(&format!("virtio worker thread {name}"))?;
    }
    Ok(())
}

/// The process-wide filter for every other thread. Besides [`PROCESS_SYSCALLS`], it
/// allows `kill` of this process only (the pid when the filter is built): the watchdog
/// fences with `kill(getpid(), SIGKILL)` (crate::watchdog); no other process may be
/// signalled.
pub fn process_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        PROCESS_SYSCALLS.iter().map(|&s| (s, Vec::new())).collect();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let own_pid = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid as u64)
        .map_err(|e| SeccompError::Build("process", e.to_string()))?;
    let rule = SeccompRule::new(vec![own_pid])
        .map_err(|e| SeccompError::Build("process", e.to_string()))?;
    rules.insert(libc::SYS_kill, vec![rule]);
    compile("process", rules, SeccompAction::Errno(libc::EPERM as u32))
}

/// Install the process filter on the calling thread (the main thread, before the
/// VM's threads exist, so that they inherit it).
pub fn install_process_filter() -> Result<(), SeccompError> {
    let prog = process_filter()?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install("process", e.to_string()))
}

/// Which threads make a forbidden system call right after installing their filter
/// (`launcher run --seccomp-selftest[=vcpu|worker]`, a hidden, test-only flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selftest {
    /// Every vCPU thread.
    Vcpu,
    /// Every virtio worker thread.
    Worker,
}

/// The self-test in force: 0 none, 1 vCPU, 2 worker.
static SELFTEST: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// With `Some(kind)`, every thread of that kind makes a forbidden system call right after
/// installing its filter, which must kill the process: how tests/tests/security.rs proves
/// the filter is active. Set before the VM's threads start.
pub fn set_selftest(kind: Option<Selftest>) {
    let v = match kind {
        None => 0,
        Some(Selftest::Vcpu) => 1,
        Some(Selftest::Worker) => 2,
    };
    SELFTEST.store(v, std::sync::atomic::Ordering::Relaxed);
}

fn selftest_is(kind: Selftest) -> bool {
    let want = match kind {
        Selftest::Vcpu => 1,
        Selftest::Worker => 2,
    };
    SELFTEST.load(std::sync::atomic::Ordering::Relaxed) == want
}

/// The self-test's forbidden call: `socket(2)`, which the process filter allows and the
/// vCPU and worker filters do not, so only the thread's own filter can stop it.
fn forbidden_syscall(thread: &str) -> Result<(), String> {
    tracing::warn!("seccomp self-test: making a forbidden syscall (socket) from {thread}");
    // SAFETY: socket(2) with constant arguments; the filter kills the process before
    // it returns, and if it ever returned we would close the fd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: we own the fd we just got.
        unsafe { libc::close(fd) };
        return Err(format!(
            "seccomp self-test: a forbidden syscall succeeded on {thread}"
        ));
    }
    Ok(())
}

/// The vCPU thread start hook: install the vCPU filter on the calling thread.
pub fn vcpu_thread_start(vcpu: u8) -> Result<(), String> {
    let prog = vcpu_filter().map_err(|e| e.to_string())?;
    seccompiler::apply_filter(&prog)
        .map_err(|e| SeccompError::Install("vCPU", e.to_string()).to_string())?;
    if selftest_is(Selftest::Vcpu) {
        forbidden_syscall(&format!("vCPU thread {vcpu}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile() {
        assert!(!vcpu_filter().unwrap().is_empty());
        assert!(!process_filter().unwrap().is_empty());
        assert!(!worker_filter().unwrap().is_empty());
    }

    #[test]
    fn the_worker_filter_is_a_subset_of_the_process_filter_and_has_no_ioctl() {
        for s in &worker_syscalls() {
            assert!(
                PROCESS_SYSCALLS.contains(s),
                "syscall {s} allowed on worker threads only"
            );
        }
        for s in [
            libc::SYS_ioctl,
            libc::SYS_socket,
            libc::SYS_openat,
            libc::SYS_execve,
        ] {
            assert!(
                !worker_syscalls().contains(&s),
                "worker threads may call {s}"
            );
        }
    }

    /// In a forked child (the filter applies to that process only): `kill` of its own pid
    /// is allowed (the watchdog's fence), `kill` of another process is refused.
    #[test]
    fn the_process_filter_allows_kill_of_this_process_only() {
        // SAFETY: fork(2); the child builds the filter for its own pid (glibc's malloc is
        // fork-safe), makes system calls, takes no other lock and leaves with _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let code = match process_filter() {
                Err(_) => 10,
                Ok(prog) => {
                    if seccompiler::apply_filter(&prog).is_err() {
                        11
                    } else {
                        // SAFETY: signal 0 only checks that the target exists and may be
                        // signalled; nothing is delivered.
                        let own = unsafe { libc::kill(libc::getpid(), 0) };
                        // SAFETY: as above, to the parent (the test process).
                        let parent = unsafe { libc::kill(libc::getppid(), 0) };
                        let errno = std::io::Error::last_os_error().raw_os_error();
                        if own != 0 {
                            12
                        } else if parent != -1 || errno != Some(libc::EPERM) {
                            13
                        } else {
                            // SAFETY: the fence itself: SIGKILL of this child.
                            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                            14
                        }
                    }
                }
            };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid on the child just forked, into a local.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "the child did not end by its own SIGKILL: exit code {}",
            libc::WEXITSTATUS(status)
        );
    }

    #[test]
    fn the_vcpu_filter_is_a_subset_of_the_process_filter() {
        for s in &vcpu_syscalls() {
            assert!(
                PROCESS_SYSCALLS.contains(s),
                "syscall {s} allowed on vCPU threads only"
            );
        }
    }
}
