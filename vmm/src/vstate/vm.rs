//! The KVM VM: its file descriptor, in-kernel irqchip and PIT, interrupt routing,
//! memory slots and dirty logging, and the VM-wide part of the saved state.

use kvm_bindings::{
    kvm_clock_data, kvm_irq_routing_entry, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region, KvmIrqRouting, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::dirty_ring::DirtyRings;
use super::memory::{GuestRam, PAGE_SIZE};

static DIRTY_RING_ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether this host's KVM offers the dirty ring at the size we use.
pub fn dirty_ring_available() -> bool {
    let need = (super::dirty_ring::RING_ENTRIES as usize
        * std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>()) as i32;
    Kvm::new().is_ok_and(|k| k.check_extension_int(Cap::DirtyLogRing) >= need)
}

/// Whether VMs created from now on may use KVM's dirty ring where the host has it
/// (default yes; `launcher run --dirty-ring off` says no and keeps the bitmap).
pub fn allow_dirty_ring(allowed: bool) {
    DIRTY_RING_ALLOWED.store(allowed, std::sync::atomic::Ordering::Relaxed);
}

/// Errors from VM-level KVM calls.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing or cannot be opened.
    #[error(
        "cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm read-write?)"
    )]
    OpenKvm(kvm_ioctls::Error),
    /// The KVM API version is not the one we speak.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A capability the VMM cannot work without.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// Any other KVM ioctl failure, with what we were doing.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
}

fn ring_error(what: &'static str, e: std::io::Error) -> VmError {
    VmError::Ioctl {
        what,
        source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Ioctl { what, source })
}

/// VM-wide state saved with a snapshot or a migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// How KVM reports the pages the guest wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DirtyTracking {
    /// Per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`): cost proportional to the pages
    /// written, not to the memory size.
    Ring,
    /// `KVM_GET_DIRTY_LOG` bitmaps, one per slot (the fallback).
    Bitmap,
}

impl DirtyTracking {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            DirtyTracking::Ring => "ring",
            DirtyTracking::Bitmap => "bitmap",
        }
    }
}

/// Host capabilities probed once (invariant: optional is optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostCaps {
    /// `KVM_CAP_XSAVE2` size, when the kernel has it.
    pub xsave2_size: Option<usize>,
    /// `KVM_CAP_ADJUST_CLOCK` is present.
    pub adjust_clock: bool,
}

/// A KVM VM with its memory registered.
pub struct KvmVm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    router: Arc<GsiRouter>,
    caps: HostCaps,
    /// (slot, gpa, size, host address) of every RAM slot.
    slots: Vec<(u32, u64, u64, u64)>,
    /// The dirty rings, when the host has them and they are allowed.
    ring: Option<DirtyRings>,
}

impl KvmVm {
    /// Open KVM and create a VM with an in-kernel irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        let caps = HostCaps {
            xsave2_size: (xsave2 > 0).then_some(xsave2 as usize),
            adjust_clock: kvm.check_extension(Cap::AdjustClock),
        };
        let fd = ioctl("KVM_CREATE_VM", kvm.create_vm())?;
        // The ring must be enabled before the first vCPU exists; optional, as every cap.
        let ring = if DIRTY_RING_ALLOWED.load(std::sync::atomic::Ordering::Relaxed) {
            DirtyRings::enable(&fd, kvm.check_extension_int(Cap::DirtyLogRing))
        } else {
            None
        };
        ioctl("KVM_SET_TSS_ADDR", fd.set_tss_address(0xfffb_d000))?;
        ioctl(
            "KVM_SET_IDENTITY_MAP_ADDR",
            fd.set_identity_map_address(0xfffb_c000),
        )?;
        ioctl("KVM_CREATE_IRQCHIP", fd.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        ioctl("KVM_CREATE_PIT2", fd.create_pit2(pit))?;
        let fd = Arc::new(fd);
        let router = Arc::new(GsiRouter {
            vm: fd.clone(),
            inner: Mutex::new(RouterInner {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        });
        router.commit(&router.lock())?;
        Ok(Self {
            kvm,
            fd,
            router,
            caps,
            slots: Vec::new(),
            ring,
        })
    }

    /// The GSI routing table, shared with the devices that program MSI routes.
    pub fn router(&self) -> Arc<GsiRouter> {
        self.router.clone()
    }

    /// The VM fd, for vCPU creation and irqfds.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The KVM system fd, for supported CPUID and MSR lists.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Probed host capabilities.
    pub fn caps(&self) -> &HostCaps {
        &self.caps
    }

    /// Register every RAM region as a KVM memory slot.
    pub fn register_memory(&mut self, ram: &GuestRam) -> Result<(), VmError> {
        self.record_slots(ram)?;
        self.map_slots()
    }

    /// Note the RAM regions as memory slots without telling KVM yet (see [`KvmVm::map_slots`]).
    pub fn record_slots(&mut self, ram: &GuestRam) -> Result<(), VmError> {
        for (i, r) in ram.regions().iter().enumerate() {
            let host = ram
                .host_address(i)
                .ok_or(VmError::MissingCap("host mapping of guest RAM"))?;
            self.slots.push((i as u32, r.gpa, r.size, host));
        }
        Ok(())
    }

    /// Hand the recorded slots to KVM. This ioctl costs several milliseconds on a nested
    /// KVM whatever the size, so a boot runs it on a helper thread while it sets up the
    /// devices and vCPUs.
    pub fn map_slots(&self) -> Result<(), VmError> {
        self.update_slots(0)
    }

    fn update_slots(&self, flags: u32) -> Result<(), VmError> {
        for &(slot, gpa, size, host) in &self.slots {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a live shared mapping of `size` bytes owned by the
            // `GuestRam` that outlives this VM (the Vm struct drops the VM fd first).
            ioctl("KVM_SET_USER_MEMORY_REGION", unsafe {
                self.fd.set_user_memory_region(region)
            })?;
        }
        Ok(())
    }

    /// Turn KVM's dirty-page logging on or off for every RAM slot.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        self.update_slots(if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// How this VM tracks the guest's dirty pages.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        if self.ring.is_some() {
            DirtyTracking::Ring
        } else {
            DirtyTracking::Bitmap
        }
    }

    /// Map the dirty ring of a vCPU just created on this VM (nothing without a ring).
    pub fn attach_vcpu(&self, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), VmError> {
        match &self.ring {
            Some(r) => r
                .attach(vcpu)
                .map_err(|e| ring_error("mapping the dirty ring", e)),
            None => Ok(()),
        }
    }

    fn slot_pages(&self) -> Vec<u64> {
        self.slots.iter().map(|s| s.2 / PAGE_SIZE).collect()
    }

    /// Pages the guest wrote since the previous harvest, one bitmap per RAM slot (one bit
    /// per 4 KiB page, in 64-bit words), cleared in KVM as they are read.
    pub fn harvest_dirty(&self) -> Result<Vec<Vec<u64>>, VmError> {
        match &self.ring {
            Some(r) => r
                .harvest(&self.fd, &self.slot_pages())
                .map_err(|e| ring_error("harvesting the dirty rings", e)),
            None => (0..self.slots.len())
                .map(|i| self.take_dirty_log(i))
                .collect(),
        }
    }

    /// Empty the dirty rings into the pending set so that no vCPU waits on a full ring
    /// (call often during a long copy; nothing to do with the bitmap).
    pub fn drain_dirty_rings(&self) -> Result<(), VmError> {
        match &self.ring {
            Some(r) => r
                .drain(&self.fd, &self.slot_pages())
                .map_err(|e| ring_error("draining the dirty rings", e)),
            None => Ok(()),
        }
    }

    /// Fetch and clear KVM's dirty bitmap of RAM region `index` (one bit per 4 KiB page).
    fn take_dirty_log(&self, index: usize) -> Result<Vec<u64>, VmError> {
        let &(slot, _, size, _) = self
            .slots
            .get(index)
            .ok_or(VmError::MissingCap("memory slot"))?;
        debug_assert_eq!(size % PAGE_SIZE, 0);
        ioctl(
            "KVM_GET_DIRTY_LOG",
            self.fd.get_dirty_log(slot, size as usize),
        )
    }

    /// Save the irqchips, PIT and clock. Call with every vCPU paused.
    pub fn save(&self) -> Result<VmKvmState, VmError> {
        let mut irqchips = Vec::new();
        for chip in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut c = kvm_irqchip {
                chip_id: chip,
                ..Default::default()
            };
            ioctl("KVM_GET_IRQCHIP", self.fd.get_irqchip(&mut c))?;
            irqchips.push(c);
        }
        let pit = ioctl("KVM_GET_PIT2", self.fd.get_pit2())?;
        let clock = ioctl("KVM_GET_CLOCK", self.fd.get_clock())?;
        Ok(VmKvmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Restore what [`KvmVm::save`] captured, before any vCPU runs.
    pub fn restore(&self, state: &VmKvmState) -> Result<(), VmError> {
        ioctl("KVM_SET_PIT2", self.fd.set_pit2(&state.pit))?;
        if self.caps.adjust_clock {
            let mut clock = state.clock;
            // Only the clock value is restorable; the flags describe the source host.
            clock.flags &= !KVM_CLOCK_TSC_STABLE;
            clock.flags = 0;
            ioctl("KVM_SET_CLOCK", self.fd.set_clock(&clock))?;
        }
        for c in &state.irqchips {
            ioctl("KVM_SET_IRQCHIP", self.fd.set_irqchip(c))?;
        }
        Ok(())
    }
}

/// The first GSI handed out for MSI routes (0..=23 are the IOAPIC pins).
const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routing entries (`KVM_MAX_IRQ_ROUTES`).
const MAX_GSI: u32 = 4096;

/// KVM's GSI routing table: the fixed irqchip routes plus the MSI routes that devices
/// program when the guest writes an MSI-X table entry. `KVM_SET_GSI_ROUTING` replaces
/// the whole table, so one owner keeps it and every change commits all of it.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    inner: Mutex<RouterInner>,
}

struct RouterInner {
    /// gsi -> (address, data) of the MSI routes in force.
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
}

impl std::fmt::Debug for GsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsiRouter").finish_non_exhaustive()
    }
}

impl GsiRouter {
    fn lock(&self) -> std::sync::MutexGuard<'_, RouterInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve `n` consecutive GSIs for MSI vectors; returns the first.
    pub fn allocate(&self, n: u32) -> Result<u32, VmError> {
        let mut r = self.lock();
        let first = r.next_gsi;
        let end = first
            .checked_add(n)
            .filter(|e| *e <= MAX_GSI)
            .ok_or(VmError::MissingCap("free GSIs for MSI-X vectors"))?;
        r.next_gsi = end;
        Ok(first)
    }

    /// Set (`Some((address, data))`) or remove (`None`) the MSI route of each GSI given,
    /// then hand the whole table to KVM once. Nothing is sent when nothing changed.
    pub fn set_msi(&self, routes: &[(u32, Option<(u64, u32)>)]) -> Result<(), VmError> {
        let mut r = self.lock();
        let mut changed = false;
        for &(gsi, route) in routes {
            let old = match route {
                Some(m) => r.msi.insert(gsi, m),
                None => r.msi.remove(&gsi),
            };
            changed |= old != route;
        }
        if changed {
            self.commit(&r)?;
        }
        Ok(())
    }

    /// Route GSIs as QEMU q35 does: GSI 0 (the PIT) to IOAPIC pin 2, GSI n to pin n,
    /// and the ISA GSIs also to the 8259s (the default KVM routing sends the PIT to pin 0,
    /// which disagrees with the MADT's interrupt source override); then the MSI routes.
    fn commit(&self, r: &RouterInner) -> Result<(), VmError> {
        let mut entries = Vec::new();
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            e
        };
        for gsi in 0..24u32 {
            if gsi < 16 && gsi != 2 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip(gsi, chip, gsi % 8));
            }
            let pin = if gsi == 0 { 2 } else { gsi };
            if gsi != 2 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, pin));
            }
        }
        for (&gsi, &(address, data)) in &r.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| VmError::MissingCap("GSI routing table"))?;
        ioctl("KVM_SET_GSI_ROUTING", self.vm.set_gsi_routing(&routing))
    }
}
