//! vCPUs: configuration (CPUID, MSRs, boot registers), the per-vCPU thread that
//! runs `KVM_RUN`, pausing and kicking, and the saved per-vCPU state.
//!
//! Each vCPU thread owns its `VcpuFd` and obeys commands sent over a channel.
//! To make a running vCPU look at its commands, the controller sets
//! `immediate_exit` in the shared `kvm_run` page and sends the thread a signal:
//! the signal interrupts a `KVM_RUN` in progress, and `immediate_exit` makes the
//! next one return at once, so no kick is lost between the check and the entry.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::{Bus, VmEvent};

/// Errors from vCPU setup, state and control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: KVM {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        id: u8,
        /// The operation.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread is gone (it hit a fatal error or was stopped).
    #[error("vCPU {0} thread is not running")]
    ThreadGone(u8),
    /// The vCPU did not acknowledge a command in time.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    /// Thread creation failed.
    #[error("cannot start vCPU {0} thread: {1}")]
    Spawn(u8, std::io::Error),
    /// Restored state does not fit this host.
    #[error("vCPU {id}: cannot restore {what}: {why}")]
    Restore {
        /// vCPU index.
        id: u8,
        /// Which part.
        what: &'static str,
        /// Why.
        why: String,
    },
}

/// Why the VM must stop, as reported by a vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStop {
    /// The guest powered off (ACPI S5, or KVM system event).
    PowerOff,
    /// The guest asked for a reset (i8042, 0xcf9, triple fault).
    Reset,
    /// The guest wrote the debug-exit port.
    DebugExit(u8),
    /// A vCPU hit an error it cannot continue from.
    Error(String),
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// The CPUID the guest saw; restored verbatim so the guest sees no change.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

fn ioctl<T>(id: u8, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
    r.map_err(|source| VcpuError::Ioctl { id, what, source })
}

/// Build the CPUID for vCPU `id` of `count`: the host's supported set with the
/// topology, the hypervisor bit and the KVM signature leaf.
pub fn build_cpuid(kvm: &Kvm, id: u8, count: u8) -> Result<Vec<kvm_cpuid_entry2>, VcpuError> {
    let supported = ioctl(
        id,
        "KVM_GET_SUPPORTED_CPUID",
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
    )?;
    let mut entries = supported.as_slice().to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; no cache shared by threads.
                e.eax = (e.eax & 0x3ff) | (((count as u32).saturating_sub(1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                e.edx = id as u32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // SMT level
                    }
                    1 => {
                        e.eax = 8;
                        e.ebx = count as u32;
                        e.ecx = (2 << 8) | 1; // core level
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xff) | ((count as u32).saturating_sub(1) & 0xff);
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == 0x4000_0000) {
        // "KVMKVMKVM\0\0\0": lets a guest find kvmclock and the other paravirt features.
        entries.push(kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: 0x4b4d_564b,
            ecx: 0x564b_4d56,
            edx: 0x4d,
            ..Default::default()
        });
    }
    Ok(entries)
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Everything a freshly created vCPU needs before its first instruction,
/// except the boot registers, which depend on the boot protocol.
pub fn configure(vcpu: &VcpuFd, id: u8, cpuid: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
    let cpuid = CpuId::from_entries(cpuid).map_err(|_| VcpuError::Restore {
        id,
        what: "CPUID",
        why: "too many entries".into(),
    })?;
    ioctl(id, "KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
    let msrs: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    set_msrs(vcpu, id, &msrs)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    ioctl(id, "KVM_SET_FPU", vcpu.set_fpu(&fpu))?;
    // LINT0 as ExtINT (the 8259 reaches the BSP through it), LINT1 as NMI.
    let mut lapic = ioctl(id, "KVM_GET_LAPIC", vcpu.get_lapic())?;
    set_lapic_reg(&mut lapic, 0x350, 7 << 8);
    set_lapic_reg(&mut lapic, 0x360, 4 << 8);
    ioctl(id, "KVM_SET_LAPIC", vcpu.set_lapic(&lapic))?;
    Ok(())
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    let bytes = value.to_le_bytes();
    for (i, b) in bytes.iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

fn set_msrs(vcpu: &VcpuFd, id: u8, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| VcpuError::Restore {
        id,
        what: "MSRs",
        why: "too many entries".into(),
    })?;
    let n = ioctl(id, "KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
    if n < entries.len() {
        // Optional is optional: an MSR this host refuses is reported, not fatal.
        tracing::warn!(
            vcpu = id,
            msr = format_args!("{:#x}", entries[n].index),
            "host refused MSR; continuing without it"
        );
    }
    Ok(())
}

/// The MSRs to save: every index KVM lists that reads back on this host.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    // KVM_GET_MSRS reads entries in order and stops at the first it cannot read, so one
    // call usually settles the whole list; on a short read, drop the refused index and
    // go on from the next one (a boot pays for one ioctl, not one per MSR).
    let mut remaining: Vec<u32> = list.as_slice().to_vec();
    let mut ok = Vec::with_capacity(remaining.len());
    while !remaining.is_empty() {
        let entries: Vec<kvm_msr_entry> = remaining
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            break;
        };
        let n = vcpu.get_msrs(&mut msrs).unwrap_or(0).min(remaining.len());
        ok.extend_from_slice(&remaining[..n]);
        // Skip the refused MSR at position n.
        remaining.drain(..(n + 1).min(remaining.len()));
    }
    ok
}

/// Read every piece of a paused vCPU's state.
pub fn save_state(
    vcpu: &mut VcpuFd,
    id: u8,
    cpuid: &[kvm_cpuid_entry2],
    msr_list: &[u32],
) -> Result<VcpuState, VcpuError> {
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Restore {
        id,
        what: "MSRs",
        why: "too many entries".into(),
    })?;
    let n = ioctl(id, "KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?;
    let msrs = msrs.as_slice()[..n].to_vec();
    Ok(VcpuState {
        id,
        cpuid: cpuid.to_vec(),
        mp_state: ioctl(id, "KVM_GET_MP_STATE", vcpu.get_mp_state())?,
        regs: ioctl(id, "KVM_GET_REGS", vcpu.get_regs())?,
        sregs: ioctl(id, "KVM_GET_SREGS", vcpu.get_sregs())?,
        xsave: ioctl(id, "KVM_GET_XSAVE", vcpu.get_xsave())?,
        xcrs: ioctl(id, "KVM_GET_XCRS", vcpu.get_xcrs())?,
        debugregs: ioctl(id, "KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?,
        lapic: ioctl(id, "KVM_GET_LAPIC", vcpu.get_lapic())?,
        msrs,
        events: ioctl(id, "KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?,
    })
}

/// Load a saved state into a fresh vCPU (order as Firecracker: CPUID first, events last).
pub fn restore_state(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuError> {
    let id = state.id;
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Restore {
        id,
        what: "CPUID",
        why: "too many entries".into(),
    })?;
    ioctl(id, "KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
    ioctl(id, "KVM_SET_MP_STATE", vcpu.set_mp_state(state.mp_state))?;
    ioctl(id, "KVM_SET_REGS", vcpu.set_regs(&state.regs))?;
    ioctl(id, "KVM_SET_SREGS", vcpu.set_sregs(&state.sregs))?;
    // SAFETY: `state.xsave` is a complete legacy `kvm_xsave` area of the size KVM_SET_XSAVE
    // reads (the legacy call, not XSAVE2), saved by KVM_GET_XSAVE.
    ioctl(id, "KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&state.xsave) })?;
    ioctl(id, "KVM_SET_XCRS", vcpu.set_xcrs(&state.xcrs))?;
    ioctl(
        id,
        "KVM_SET_DEBUGREGS",
        vcpu.set_debug_regs(&state.debugregs),
    )?;
    ioctl(id, "KVM_SET_LAPIC", vcpu.set_lapic(&state.lapic))?;
    set_msrs(vcpu, id, &state.msrs)?;
    ioctl(
        id,
        "KVM_SET_VCPU_EVENTS",
        vcpu.set_vcpu_events(&state.events),
    )?;
    Ok(())
}

/// Create vCPU `id` on `vm`.
pub fn create(vm: &VmFd, id: u8) -> Result<VcpuFd, VcpuError> {
    ioctl(id, "KVM_CREATE_VCPU", vm.create_vcpu(id as u64))
}

/// Commands a vCPU thread obeys.
enum Command {
    /// Stop running guest code and acknowledge once every pending I/O is complete.
    Pause(Sender<()>),
    /// Continue running guest code.
    Resume,
    /// Save the state (only while paused).
    Save(Sender<Result<VcpuState, VcpuError>>),
    /// Sleep this long, then continue: one slice of auto-converge throttling.
    Throttle(Duration),
    /// Leave the thread.
    Exit,
}

/// Pointer to the `immediate_exit` byte of a vCPU's `kvm_run` page.
#[derive(Clone, Copy)]
struct ImmediateExit(*mut u8);

// SAFETY: the pointer targets the vCPU's mmapped `kvm_run` page, which lives as long as
// the `VcpuFd`. The `VcpuHandle` owns the thread's `JoinHandle`, whose result *is* the
// `VcpuFd`, so the page outlives every use of this pointer; a single byte written with a
// volatile store is a benign race with KVM's own read of it.
unsafe impl Send for ImmediateExit {}
// SAFETY: see the `Send` implementation; the byte is only ever written as a whole.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self, value: u8) {
        // SAFETY: see the Send/Sync implementations above: the page is alive and mapped.
        unsafe { std::ptr::write_volatile(self.0, value) }
    }
}

static KICK_HANDLER: Once = Once::new();

/// Run by every vCPU thread before its first `KVM_RUN`, for example to install a
/// seccomp filter for the thread (see `launcher::launch::seccomp`). An error stops
/// the VM with that message.
pub type ThreadStartHook = fn(vcpu: u8) -> Result<(), String>;

static THREAD_START_HOOK: std::sync::OnceLock<ThreadStartHook> = std::sync::OnceLock::new();

/// Install the vCPU thread start hook (once per process; later calls are ignored).
pub fn set_thread_start_hook(hook: ThreadStartHook) {
    let _ = THREAD_START_HOOK.set(hook);
}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only purpose is to interrupt KVM_RUN with EINTR.
}

/// The controller's side of one vCPU thread.
pub struct VcpuHandle {
    id: u8,
    commands: Sender<Command>,
    immediate_exit: ImmediateExit,
    thread: Option<JoinHandle<VcpuFd>>,
}

/// Real-time priority of a vCPU thread while it is asked to pause for a switch-over.
const VCPU_BOOST_PRIORITY: i32 = 10;

/// How long a vCPU may take to acknowledge a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Where to report why the VM must stop.
    pub stop: Sender<VmStop>,
    /// CPUID as configured, kept for saving.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSR indices to save.
    pub msr_list: Vec<u32>,
    /// Start paused (restore and incoming migration start paused until told to go).
    pub start_paused: bool,
}

impl VcpuHandle {
    /// Start the thread for `vcpu`.
    pub fn spawn(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        KICK_HANDLER.call_once(|| {
            if let Err(e) =
                vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            {
                tracing::error!("cannot install vCPU kick handler: {e}");
            }
        });
        let immediate_exit = ImmediateExit(&mut vcpu.get_kvm_run().immediate_exit as *mut u8);
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                run_loop(id, &mut vcpu, ctx, rx);
                vcpu
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(Self {
            id,
            commands: tx,
            immediate_exit,
            thread: Some(thread),
        })
    }

    fn send(&self, cmd: Command) -> Result<(), VcpuError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuError::ThreadGone(self.id))?;
        self.kick();
        Ok(())
    }

    /// Make the thread leave `KVM_RUN` and look at its commands.
    fn kick(&self) {
        self.immediate_exit.set(1);
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread is alive or already exited but not joined (we hold the
            // JoinHandle), so its pthread_t is valid; the kick signal has a no-op handler.
            unsafe {
                libc::pthread_kill(t.as_pthread_t(), kick_signal());
            }
        }
    }

    /// Run this vCPU's thread at real-time priority (`SCHED_FIFO`, so that it answers a
    /// pause at once however busy the host is) or back at the normal policy. Returns
    /// whether the change was allowed.
    pub fn set_boost(&self, on: bool) -> bool {
        use std::os::unix::thread::JoinHandleExt;
        let Some(t) = &self.thread else {
            return false;
        };
        let (policy, priority) = if on {
            (libc::SCHED_FIFO, VCPU_BOOST_PRIORITY)
        } else {
            (libc::SCHED_OTHER, 0)
        };
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: the pthread is alive or exited but not joined (we hold its JoinHandle),
        // so its pthread_t is valid; `param` is a valid parameter block.
        unsafe { libc::pthread_setschedparam(t.as_pthread_t(), policy, &param) == 0 }
    }

    /// Ask the vCPU to pause; wait for its acknowledgement.
    pub fn pause(&self) -> Result<(), VcpuError> {
        let (tx, rx) = channel();
        self.send(Command::Pause(tx))?;
        wait(self.id, &rx, PAUSE_TIMEOUT)
    }

    /// Resume a paused vCPU.
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.commands
            .send(Command::Resume)
            .map_err(|_| VcpuError::ThreadGone(self.id))
    }

    /// Save the state of a paused vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = channel();
        self.commands
            .send(Command::Save(tx))
            .map_err(|_| VcpuError::ThreadGone(self.id))?;
        wait(self.id, &rx, PAUSE_TIMEOUT)?
    }

    /// Take away `d` of guest time (auto-converge).
    pub fn throttle(&self, d: Duration) -> Result<(), VcpuError> {
        self.send(Command::Throttle(d))
    }

    /// Stop the thread and get the vCPU fd back.
    pub fn stop(mut self) -> Option<VcpuFd> {
        let _ = self.send(Command::Exit);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.commands.send(Command::Exit);
            self.kick();
            let _ = t.join();
        }
    }
}

fn wait<T>(id: u8, rx: &Receiver<T>, timeout: Duration) -> Result<T, VcpuError> {
    rx.recv_timeout(timeout).map_err(|e| match e {
        RecvTimeoutError::Timeout => VcpuError::Timeout(id, timeout),
        RecvTimeoutError::Disconnected => VcpuError::ThreadGone(id),
    })
}

/// Run the guest until told to exit.
fn run_loop(id: u8, vcpu: &mut VcpuFd, ctx: VcpuContext, rx: Receiver<Command>) {
    let span = tracing::debug_span!("vcpu", id);
    let _enter = span.enter();
    if let Some(hook) = THREAD_START_HOOK.get() {
        if let Err(e) = hook(id) {
            let _ = ctx.stop.send(VmStop::Error(format!("vCPU {id}: {e}")));
            return;
        }
    }
    let mut paused = ctx.start_paused;
    if paused {
        vcpu.set_kvm_immediate_exit(1);
    }
    loop {
        // Obey commands: all of them when paused (blocking), pending ones otherwise.
        loop {
            let cmd = if paused {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            };
            match cmd {
                Command::Pause(ack) => {
                    if !paused {
                        complete_pending_io(vcpu);
                        paused = true;
                    }
                    let _ = ack.send(());
                }
                Command::Resume => {
                    if paused {
                        vcpu.set_kvm_immediate_exit(0);
                        paused = false;
                    }
                }
                Command::Save(reply) => {
                    let r = if paused {
                        save_state(vcpu, id, &ctx.cpuid, &ctx.msr_list)
                    } else {
                        Err(VcpuError::Restore {
                            id,
                            what: "state",
                            why: "vCPU is running; pause it first".into(),
                        })
                    };
                    let _ = reply.send(r);
                }
                Command::Throttle(d) => {
                    if !paused {
                        complete_pending_io(vcpu);
                        std::thread::sleep(d);
                        vcpu.set_kvm_immediate_exit(0);
                    }
                }
                Command::Exit => return,
            }
        }
        if let Some(stop) = run_once(id, vcpu, &ctx) {
            let fatal = matches!(stop, VmStop::Error(_));
            let _ = ctx.stop.send(stop);
            if fatal {
                // Park: the VM is going down; wait for Exit.
                paused = true;
                vcpu.set_kvm_immediate_exit(1);
            }
        }
    }
}

/// Run once with `immediate_exit` set so that KVM completes an I/O exit we already
/// handled (an `in` result is written to the registers only on the next entry)
/// before anyone reads the registers. Leaves `immediate_exit` set.
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
}

/// One `KVM_RUN`; returns why the VM must stop, if it must.
fn run_once(id: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) -> Option<VmStop> {
    let event = match vcpu.run() {
        Ok(exit) => match exit {
            VcpuExit::IoOut(port, data) => ctx.pio.write(port as u64, data),
            VcpuExit::IoIn(port, data) => {
                ctx.pio.read(port as u64, data);
                VmEvent::None
            }
            VcpuExit::MmioRead(addr, data) => {
                ctx.mmio.read(addr, data);
                VmEvent::None
            }
            VcpuExit::MmioWrite(addr, data) => ctx.mmio.write(addr, data),
            VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => VmEvent::None,
            VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
                // The ring is full until the migration harvests it (it drains after every
                // frame): wait a little rather than spin, then try again.
                std::thread::sleep(Duration::from_micros(200));
                VmEvent::None
            }
            VcpuExit::Shutdown => VmEvent::Reset,
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                other => {
                    return Some(VmStop::Error(format!(
                        "vCPU {id}: unexpected system event {other}"
                    )))
                }
            },
            VcpuExit::FailEntry(reason, cpu) => {
                return Some(VmStop::Error(format!(
                    "vCPU {id}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )))
            }
            VcpuExit::InternalError => {
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal`
                // member of the exit union is the one KVM filled in.
                let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Some(VmStop::Error(format!(
                    "vCPU {id}: KVM internal error (suberror {sub}) at rip {rip:#x}; \
                     the guest executed an instruction this host cannot emulate"
                )));
            }
            other => {
                return Some(VmStop::Error(format!(
                    "vCPU {id}: unhandled exit {other:?}"
                )))
            }
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VmEvent::None,
        Err(e) => return Some(VmStop::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
    };
    match event {
        VmEvent::None => None,
        VmEvent::PowerOff => Some(VmStop::PowerOff),
        VmEvent::Reset => Some(VmStop::Reset),
        VmEvent::DebugExit(v) => Some(VmStop::DebugExit(v)),
    }
}
