//! The limits of a VM that both the launcher (which enforces them) and noded (which
//! validates specs before it starts a launcher) must agree on, and the MAC address
//! grammar they share. Kept here, once, so that noded never accepts a spec that the
//! launcher then refuses (vCPUs 255, memory 1 MiB).

/// Most vCPUs a VM may have (the MADT and the CPUID topology fit 255 APIC ids).
pub const MAX_VCPUS: u8 = 254;

/// Least guest memory a VM may have (what the VMM's memory layout needs).
pub const MIN_MEMORY_BYTES: u64 = 2 << 20;

/// Most network interfaces per VM (one PCI slot each).
pub const MAX_NETS: usize = 4;

/// Most data disks per VM (one PCI slot and one IOAPIC pin each).
pub const MAX_DISKS: usize = 8;

/// A limit that a VM description exceeds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// vCPU count out of range.
    #[error("{0} vCPUs is invalid: use 1 to {MAX_VCPUS}")]
    Vcpus(u64),
    /// Too little memory.
    #[error("{0} bytes of memory is too small: at least {mib} MiB is needed", mib = MIN_MEMORY_BYTES >> 20)]
    Memory(u64),
    /// Too many network interfaces.
    #[error("{0} network interfaces; at most {MAX_NETS} are supported")]
    Nets(usize),
    /// Too many disks.
    #[error("{0} disks; at most {MAX_DISKS} are supported")]
    Disks(usize),
    /// A MAC address that does not parse or is not usable by a guest.
    #[error("{0}")]
    Mac(String),
}

/// Checks a vCPU count against [`MAX_VCPUS`]; returns it as the VMM's type.
pub fn check_vcpus(n: u64) -> Result<u8, LimitError> {
    u8::try_from(n)
        .ok()
        .filter(|v| (1..=MAX_VCPUS).contains(v))
        .ok_or(LimitError::Vcpus(n))
}

/// Checks a memory size against [`MIN_MEMORY_BYTES`].
pub fn check_memory(bytes: u64) -> Result<u64, LimitError> {
    if bytes < MIN_MEMORY_BYTES {
        return Err(LimitError::Memory(bytes));
    }
    Ok(bytes)
}

/// Checks a count of network interfaces against [`MAX_NETS`].
pub fn check_nets(n: usize) -> Result<(), LimitError> {
    if n > MAX_NETS {
        return Err(LimitError::Nets(n));
    }
    Ok(())
}

/// Checks a count of disks against [`MAX_DISKS`].
pub fn check_disks(n: usize) -> Result<(), LimitError> {
    if n > MAX_DISKS {
        return Err(LimitError::Disks(n));
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with `-`); refuses multicast and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], LimitError> {
    let bad = || LimitError::Mac(format!("{s} is not a MAC address like 52:54:00:12:34:56"));
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    check_mac(&mac).map_err(|_| {
        LimitError::Mac(if mac == [0; 6] {
            format!("{s}: the all-zero address is not usable")
        } else {
            format!("{s} is a multicast address: the guest needs a unicast one (even first byte)")
        })
    })?;
    Ok(mac)
}

/// Refuses a multicast or all-zero MAC (a guest cannot use it as its own address).
pub fn check_mac(mac: &[u8; 6]) -> Result<(), LimitError> {
    if mac[0] & 1 != 0 || *mac == [0; 6] {
        return Err(LimitError::Mac(format!(
            "MAC {} is not a unicast address",
            format_mac(mac)
        )));
    }
    Ok(())
}

/// A random locally administered unicast MAC in QEMU's `52:54:00` range.
pub fn random_mac() -> [u8; 6] {
    use std::io::Read;
    let mut r = [0u8; 3];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut r));
    if read.is_err() {
        // No entropy source: fall back on the clock and pid (still unique enough per host).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        r.copy_from_slice(&t.to_le_bytes()[..3]);
    }
    [0x52, 0x54, 0x00, r[0], r[1], r[2]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_and_memory_bounds() {
        assert_eq!(check_vcpus(1), Ok(1));
        assert_eq!(check_vcpus(254), Ok(254));
        for bad in [0, 255, 256, u64::MAX] {
            assert_eq!(check_vcpus(bad), Err(LimitError::Vcpus(bad)));
        }
        assert!(check_memory(2 << 20).is_ok());
        let e = check_memory(1 << 20).unwrap_err().to_string();
        assert!(e.contains("at least 2 MiB"), "{e}");
        assert!(check_nets(MAX_NETS).is_ok() && check_nets(MAX_NETS + 1).is_err());
        assert!(check_disks(MAX_DISKS).is_ok() && check_disks(MAX_DISKS + 1).is_err());
    }

    #[test]
    fn macs_round_trip_and_bad_ones_are_refused() {
        let m = parse_mac("52:54:00:AB:cd:0f").unwrap();
        assert_eq!(format_mac(&m), "52:54:00:ab:cd:0f");
        assert_eq!(parse_mac("52-54-00-ab-cd-0f").unwrap(), m);
        for bad in [
            "",
            "zz",
            "52:54:00:12:34",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
        ] {
            let e = parse_mac(bad).unwrap_err().to_string();
            assert!(e.contains("not a MAC address"), "{bad}: {e}");
        }
        let e = parse_mac("01:00:5e:00:00:01").unwrap_err().to_string();
        assert!(e.contains("multicast"), "{e}");
        let e = parse_mac("00:00:00:00:00:00").unwrap_err().to_string();
        assert!(e.contains("all-zero"), "{e}");
        let r = random_mac();
        assert_eq!(&r[..3], &[0x52, 0x54, 0]);
        assert!(check_mac(&r).is_ok());
    }
}
