//! ICH9-style ACPI power-management I/O block at [`crate::layout::ACPI_PM_BASE`].
//!
//! This is the fixed hardware the FADT describes (see `crate::acpi`):
//!
//! | offset | size | register |
//! |---|---|---|
//! | `0x00` | 2 | PM1a_STS (write 1 to clear) |
//! | `0x02` | 2 | PM1a_EN |
//! | `0x04` | 2 | PM1a_CNT: SCI_EN, SLP_TYP, SLP_EN |
//! | `0x08` | 4 | PM_TMR: 24-bit counter at 3.579545 MHz |
//! | `0x20` | 8 | GPE0_STS (write 1 to clear) |
//! | `0x28` | 8 | GPE0_EN |
//!
//! The only action is power-off: writing PM1a_CNT with SLP_EN and the S5
//! sleep type of the DSDT's `\_S5_` package (0) returns
//! [`VmEvent::PowerOff`]. Everything else is register storage, so that an OS
//! that enables events and reads them back sees consistent values.
//!
//! Accesses of any width and alignment work byte by byte, so a guest that
//! writes only the high byte of PM1a_CNT (`0x605`) still powers off.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{BusDevice, VmEvent};

/// Ports decoded at [`crate::layout::ACPI_PM_BASE`] (the ICH9 PMBASE block).
pub const ACPI_PM_PORT_COUNT: u64 = 0x80;

/// Offset of PM1a_STS.
pub const PM1_STS: u64 = 0x00;
/// Offset of PM1a_EN.
pub const PM1_EN: u64 = 0x02;
/// Offset of PM1a_CNT.
pub const PM1_CNT: u64 = 0x04;
/// Offset of PM_TMR.
pub const PM_TMR: u64 = 0x08;
/// Offset of the GPE0 block (status half, then enable half).
pub const GPE0_BLK: u64 = 0x20;
/// Length of the GPE0 block in bytes (status and enable, 8 bytes each).
pub const GPE0_BLK_LEN: u64 = 0x10;
/// Length of PM1a_EVT (status + enable).
pub const PM1_EVT_LEN: u8 = 4;
/// Length of PM1a_CNT.
pub const PM1_CNT_LEN: u8 = 2;
/// Length of PM_TMR.
pub const PM_TMR_LEN: u8 = 4;

/// PM1_CNT.SCI_EN: events raise an SCI rather than an SMI.
pub const SCI_EN: u16 = 1 << 0;
/// PM1_CNT.SLP_EN: enter the sleep state in SLP_TYP (write-only).
pub const SLP_EN: u16 = 1 << 13;
/// PM1_CNT.SLP_TYP field position.
const SLP_TYP_SHIFT: u16 = 10;
/// PM1_CNT.SLP_TYP field mask.
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
/// The SLP_TYP value for S5 (soft off); must match `\_S5_` in the DSDT.
pub const SLP_TYP_S5: u16 = 0;
/// PM1_CNT bits kept as state: SCI_EN, BM_RLD, SLP_TYP. GBL_RLS (bit 2) and
/// SLP_EN are write-only triggers and read as zero.
const PM1_CNT_STORED: u16 = SCI_EN | (1 << 1) | SLP_TYP_MASK;
/// PM1_STS bits that exist: TMR_STS, BM_STS, GBL_STS, PWRBTN_STS, SLPBTN_STS,
/// RTC_STS, PCIEXP_WAKE_STS, WAK_STS.
const PM1_STS_VALID: u16 = 0x0001 | 0x0010 | 0x0020 | 0x0100 | 0x0200 | 0x0400 | 0x4000 | 0x8000;
/// PM1_EN bits that exist: TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN, PCIEXP_WAKE_DIS.
const PM1_EN_VALID: u16 = 0x0001 | 0x0020 | 0x0100 | 0x0200 | 0x0400 | 0x4000;

/// PM timer frequency (Hz), fixed by the ACPI specification.
pub const PM_TIMER_HZ: u128 = 3_579_545;
/// The PM timer is 24 bits wide (the FADT does not set TMR_VAL_EXT).
const PM_TIMER_MASK: u32 = 0x00ff_ffff;

/// The saved registers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AcpiPmState {
    /// PM1a_STS.
    pub pm1_sts: u16,
    /// PM1a_EN.
    pub pm1_en: u16,
    /// PM1a_CNT (without the write-only bits).
    pub pm1_cnt: u16,
    /// PM_TMR value at save time; the restored timer counts on from here.
    pub pm_timer: u32,
    /// GPE0_STS bytes.
    pub gpe0_sts: [u8; 8],
    /// GPE0_EN bytes.
    pub gpe0_en: [u8; 8],
}

impl Default for AcpiPmState {
    /// Power-on state. SCI_EN starts set: the FADT has no SMI_CMD port, which
    /// tells the OS the machine is always in ACPI mode.
    fn default() -> Self {
        AcpiPmState {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: SCI_EN,
            pm_timer: 0,
            gpe0_sts: [0; 8],
            gpe0_en: [0; 8],
        }
    }
}

/// The PM I/O block.
#[derive(Debug)]
pub struct AcpiPm {
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe0_sts: [u8; 8],
    gpe0_en: [u8; 8],
    /// The PM timer is `timer_base + ticks since timer_start`, from a
    /// monotonic clock, so it never goes backwards and needs no thread.
    timer_start: Instant,
    timer_base: u32,
}

impl Default for AcpiPm {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes `[off, off + len)` of a write, merged into a register of `N` bytes at
/// `reg`: the written value and a mask of the bytes written.
fn merge<const N: usize>(reg: u64, off: u64, data: &[u8]) -> Option<(u64, u64)> {
    let (mut value, mut mask) = (0u64, 0u64);
    for (i, b) in data.iter().enumerate() {
        let Some(a) = off.checked_add(i as u64) else {
            break;
        };
        if let Some(idx) = a.checked_sub(reg).filter(|idx| *idx < N as u64) {
            value |= u64::from(*b) << (idx * 8);
            mask |= 0xff << (idx * 8);
        }
    }
    (mask != 0).then_some((value, mask))
}

impl AcpiPm {
    /// A PM block in its power-on state.
    pub fn new() -> Self {
        Self::from_state(&AcpiPmState::default())
    }

    /// Rebuild from saved registers.
    pub fn from_state(s: &AcpiPmState) -> Self {
        AcpiPm {
            pm1_sts: s.pm1_sts & PM1_STS_VALID,
            pm1_en: s.pm1_en & PM1_EN_VALID,
            pm1_cnt: s.pm1_cnt & PM1_CNT_STORED,
            gpe0_sts: s.gpe0_sts,
            gpe0_en: s.gpe0_en,
            timer_start: Instant::now(),
            timer_base: s.pm_timer & PM_TIMER_MASK,
        }
    }

    /// The current registers.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            pm1_sts: self.pm1_sts,
            pm1_en: self.pm1_en,
            pm1_cnt: self.pm1_cnt,
            pm_timer: self.pm_timer(),
            gpe0_sts: self.gpe0_sts,
            gpe0_en: self.gpe0_en,
        }
    }

    /// The PM timer's current value.
    pub fn pm_timer(&self) -> u32 {
        let ns = self.timer_start.elapsed().as_nanos();
        let ticks = ns.saturating_mul(PM_TIMER_HZ) / 1_000_000_000;
        // Only the low 24 bits matter: truncate before adding.
        let ticks = (ticks & u128::from(PM_TIMER_MASK)) as u32;
        self.timer_base.wrapping_add(ticks) & PM_TIMER_MASK
    }

    fn read_byte(&self, addr: u64, timer: u32) -> u8 {
        let byte = |v: u64, reg: u64| (v >> ((addr - reg) * 8)) as u8;
        match addr {
            0x00..=0x01 => byte(self.pm1_sts.into(), PM1_STS),
            0x02..=0x03 => byte(self.pm1_en.into(), PM1_EN),
            0x04..=0x05 => byte(self.pm1_cnt.into(), PM1_CNT),
            0x08..=0x0b => byte(timer.into(), PM_TMR),
            0x20..=0x27 => self.gpe0_sts[(addr - GPE0_BLK) as usize],
            0x28..=0x2f => self.gpe0_en[(addr - GPE0_BLK - 8) as usize],
            _ => 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // One timer sample per access, so the bytes of a dword read agree.
        let timer = self.pm_timer();
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(a) => self.read_byte(a, timer),
                None => 0,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VmEvent {
        if let Some((v, _)) = merge::<2>(PM1_STS, offset, data) {
            // Write 1 to clear.
            self.pm1_sts &= !(v as u16);
        }
        if let Some((v, m)) = merge::<2>(PM1_EN, offset, data) {
            self.pm1_en = ((self.pm1_en & !(m as u16)) | v as u16) & PM1_EN_VALID;
        }
        // GPE0: byte registers.
        for (i, b) in data.iter().enumerate() {
            let Some(a) = offset.checked_add(i as u64) else {
                break;
            };
            match a {
                0x20..=0x27 => self.gpe0_sts[(a - GPE0_BLK) as usize] &= !*b,
                0x28..=0x2f => self.gpe0_en[(a - GPE0_BLK - 8) as usize] = *b,
                _ => {}
            }
        }
        if let Some((v, m)) = merge::<2>(PM1_CNT, offset, data) {
            let (v, m) = (v as u16, m as u16);
            let cnt = (self.pm1_cnt & !m) | v;
            self.pm1_cnt = cnt & PM1_CNT_STORED;
            if v & SLP_EN != 0 {
                let slp_typ = (cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                if slp_typ == SLP_TYP_S5 {
                    return VmEvent::PowerOff;
                }
                // Other sleep states (S1/S3) are not offered by the DSDT; a
                // guest asking for one anyway just keeps running.
                tracing::debug!("acpi_pm: sleep type {slp_typ} requested, ignored");
            }
        }
        VmEvent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd16(pm: &mut AcpiPm, off: u64) -> u16 {
        let mut d = [0u8; 2];
        pm.read(off, &mut d);
        u16::from_le_bytes(d)
    }

    fn rd32(pm: &mut AcpiPm, off: u64) -> u32 {
        let mut d = [0u8; 4];
        pm.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn s5_powers_off() {
        let mut pm = AcpiPm::new();
        assert_eq!(
            pm.write(PM1_CNT, &0x2000u16.to_le_bytes()),
            VmEvent::PowerOff
        );
        // With SCI_EN kept, as Linux writes it.
        assert_eq!(
            pm.write(PM1_CNT, &0x2001u16.to_le_bytes()),
            VmEvent::PowerOff
        );
        // High byte alone.
        assert_eq!(pm.write(PM1_CNT + 1, &[0x20]), VmEvent::PowerOff);
        // Dword write covering the register.
        assert_eq!(
            pm.write(PM1_CNT, &0x2000u32.to_le_bytes()),
            VmEvent::PowerOff
        );
    }

    #[test]
    fn other_sleep_types_and_plain_writes_do_not() {
        let mut pm = AcpiPm::new();
        // SLP_TYP=5 without SLP_EN is stored, then SLP_EN with that type is ignored.
        assert_eq!(
            pm.write(PM1_CNT, &(5u16 << 10 | 1).to_le_bytes()),
            VmEvent::None
        );
        assert_eq!(rd16(&mut pm, PM1_CNT), 5 << 10 | 1);
        assert_eq!(pm.write(PM1_CNT + 1, &[0x20 | (5 << 2)]), VmEvent::None);
        // SLP_EN reads back as zero.
        assert_eq!(rd16(&mut pm, PM1_CNT) & SLP_EN, 0);
        assert_eq!(pm.write(PM1_CNT, &[0x00]), VmEvent::None);
        assert_eq!(rd16(&mut pm, PM1_CNT) & SCI_EN, 0);
        assert_eq!(pm.write(PM1_STS, &[0xff, 0xff]), VmEvent::None);
    }

    #[test]
    fn enable_is_stored_and_status_is_write_one_to_clear() {
        let mut pm = AcpiPm::from_state(&AcpiPmState {
            pm1_sts: 0x8001,
            ..AcpiPmState::default()
        });
        pm.write(PM1_EN, &0x0120u16.to_le_bytes());
        assert_eq!(rd16(&mut pm, PM1_EN), 0x0120);
        assert_eq!(rd16(&mut pm, PM1_STS), 0x8001);
        pm.write(PM1_STS, &0x0001u16.to_le_bytes());
        assert_eq!(rd16(&mut pm, PM1_STS), 0x8000);
        // A dword write at 0x600 writes status and enable together.
        pm.write(PM1_STS, &0x0000_8000u32.to_le_bytes());
        assert_eq!(rd32(&mut pm, PM1_STS), 0);
        // GPE0.
        pm.write(GPE0_BLK + 8, &[0x0f]);
        let mut d = [0u8; 16];
        pm.read(GPE0_BLK, &mut d);
        assert_eq!(d[8], 0x0f);
    }

    #[test]
    fn timer_runs_at_3_58_mhz_and_survives_restore() {
        let mut pm = AcpiPm::new();
        let t0 = rd32(&mut pm, PM_TMR);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let t1 = rd32(&mut pm, PM_TMR);
        let delta = t1.wrapping_sub(t0) & PM_TIMER_MASK;
        // 20 ms is ~71591 ticks; allow for a slow, loaded host.
        assert!(delta >= 70_000, "delta {delta}");
        assert!(delta < 0x80_0000, "delta {delta}");
        assert_eq!(t1 & !PM_TIMER_MASK, 0);

        let state = pm.state();
        let mut r = AcpiPm::from_state(&state);
        let t2 = rd32(&mut r, PM_TMR);
        assert!(t2.wrapping_sub(state.pm_timer) & PM_TIMER_MASK < 0x40_0000);
        let mut s2 = r.state();
        s2.pm_timer = state.pm_timer;
        assert_eq!(s2, state);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut pm = AcpiPm::new();
        let mut big = [0u8; 0x100];
        pm.read(0, &mut big);
        pm.read(u64::MAX - 2, &mut big);
        pm.read(0x7f, &mut []);
        assert_eq!(pm.write(u64::MAX, &[0xff; 9]), VmEvent::None);
        assert_eq!(pm.write(0x7f, &[0xff; 3]), VmEvent::None);
        assert_eq!(pm.write(PM_TMR, &[0xff; 4]), VmEvent::None);
        assert_eq!(pm.write(0, &[]), VmEvent::None);
        // A write of the whole block: PM1_CNT gets 0xffff, SLP_TYP=7 -> not S5.
        assert_eq!(pm.write(0, &[0xff; 0x80]), VmEvent::None);
    }
}
