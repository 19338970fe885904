//! Network interface configuration: the launcher's `--net` option, the guest MAC, and how
//! an incoming VM (migration or snapshot restore) re-attaches its interfaces to TAPs.
//!
//! A [`NetConfig`] travels in `VmConfig` (snapshots, migration streams), so the guest's MAC
//! is the same in every launcher the VM ever runs in. The backend is named by `tap` (a TAP
//! interface opened by name in the launcher's network namespace) or `fd` (a descriptor this
//! process holds open: inherited from whoever started it, or handed over by the previous
//! launcher in a local migration). An `fd` is only meaningful in the process that holds it,
//! so an incoming launcher always replaces it ([`attach_incoming`]).

use std::os::fd::{IntoRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Most network interfaces per VM (one PCI slot each, from [`super::FIRST_NET_SLOT`]).
pub const MAX_NETS: usize = 4;

/// One network interface: virtio-net on a TAP device.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (unicast; stable for the life of the VM).
    pub mac: [u8; 6],
    /// Name of an existing TAP interface, opened with `TUNSETIFF` (no privilege needed
    /// for a persistent TAP owned by the launcher's user).
    pub tap: Option<String>,
    /// A TAP file descriptor this process holds open (used before `tap`).
    pub fd: Option<i32>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with `-`); refuses multicast and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac={s} is not a MAC address like 52:54:00:12:34:56");
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
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={s} is a multicast address: the guest needs a unicast one (even first byte)"
        ));
    }
    if mac == [0; 6] {
        return Err(format!("mac={s}: the all-zero address is not usable"));
    }
    Ok(mac)
}

/// A random locally administered unicast MAC in QEMU's `52:54:00` range.
pub fn random_mac() -> [u8; 6] {
    let mut r = [0u8; 3];
    // SAFETY: getrandom writes at most `r.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    if n != r.len() as isize {
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

impl NetConfig {
    /// Parse the launcher's `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`. Without `mac=` a
    /// random `52:54:00:xx:xx:xx` is chosen (it then stays with the VM).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let (net, _) = Self::parse_spec(spec)?;
        Ok(net)
    }

    /// Like [`NetConfig::parse`], also telling whether `mac=` was given.
    pub fn parse_spec(spec: &str) -> Result<(Self, bool), ConfigError> {
        let bad = |why: String| ConfigError::Net(format!("{spec:?}: {why}"));
        let mut net = NetConfig::default();
        let mut mac = None;
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match k {
                "tap" if valid_ifname(v) => net.tap = Some(v.to_string()),
                "tap" => {
                    return Err(bad(format!(
                        "tap={v:?} is not an interface name (1 to 15 bytes, no '/', ':', spaces)"
                    )))
                }
                "fd" => {
                    let fd: i32 =
                        v.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                            bad(format!("fd={v} is not a file descriptor number"))
                        })?;
                    net.fd = Some(fd);
                }
                "mac" => mac = Some(parse_mac(v).map_err(bad)?),
                _ => return Err(bad(format!("unknown key {k:?} (tap, fd, mac)"))),
            }
        }
        match (&net.tap, net.fd) {
            (None, None) => return Err(bad("tap=NAME or fd=N is required".into())),
            (Some(_), Some(_)) => return Err(bad("give tap=NAME or fd=N, not both".into())),
            _ => {}
        }
        net.mac = mac.unwrap_or_else(random_mac);
        Ok((net, mac.is_some()))
    }

    /// How the backend is named, for messages.
    pub fn describe(&self) -> String {
        match (&self.tap, self.fd) {
            (_, Some(fd)) => format!("fd {fd}"),
            (Some(t), None) => format!("TAP {t}"),
            (None, None) => "no backend".into(),
        }
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, `:` or whitespace.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// Check a list of interfaces: count, backends, distinct MACs.
pub fn validate(nets: &[NetConfig]) -> Result<(), ConfigError> {
    if nets.len() > MAX_NETS {
        return Err(ConfigError::Net(format!(
            "list: {} interfaces, at most {MAX_NETS} are supported",
            nets.len()
        )));
    }
    for (i, n) in nets.iter().enumerate() {
        if n.mac[0] & 1 != 0 || n.mac == [0; 6] {
            return Err(ConfigError::Net(format!(
                "{i}: MAC {} is not a unicast address",
                format_mac(&n.mac)
            )));
        }
        if nets[..i].iter().any(|o| o.mac == n.mac) {
            return Err(ConfigError::Net(format!(
                "{i}: MAC {} is given twice",
                format_mac(&n.mac)
            )));
        }
        if let Some(t) = &n.tap {
            if !valid_ifname(t) {
                return Err(ConfigError::Net(format!("{i}: bad TAP name {t:?}")));
            }
        }
    }
    Ok(())
}

/// Attach the TAPs of an incoming launcher's `--net` options now, at start-up, rather
/// than when the VM arrives: a wrong name is reported at once, and the TAP has a carrier
/// (its bridge port forwards) long before the switch-over. Without that, a bridge can
/// take up to a second to notice the new carrier and drops what the guest sends first
/// (the RARP announcement). Each `tap=NAME` gets the attached descriptor as its `fd`
/// (kept open for the life of the process); an `fd=N` is checked.
pub fn attach_early(nets: &mut [(NetConfig, bool)]) -> Result<(), super::tap::TapError> {
    for (n, _) in nets.iter_mut() {
        match (n.fd, &n.tap) {
            (Some(fd), _) => drop(super::tap::Tap::from_fd(fd)?),
            (None, Some(name)) => {
                let tap = super::tap::Tap::open_named(name)?;
                n.fd = Some(tap.into_fd().into_raw_fd());
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// Re-attach the interfaces of an incoming VM (`nets`, from its saved configuration) to
/// this process's backends:
///
/// * `handed` — TAP fds received from the previous launcher (local migration): one per
///   interface, in order. They stay open for the life of this process (like an inherited
///   fd) and become the interfaces' `fd`.
/// * otherwise `overrides` — this launcher's own `--net` options: one per interface, in
///   order; each replaces the backend (a MAC given there must be the VM's own).
/// * otherwise each interface's `tap` name is opened here again (its `fd` meant nothing
///   outside the old process); an interface that was attached by fd only needs `--net`.
pub fn attach_incoming(
    nets: &mut [NetConfig],
    handed: Vec<OwnedFd>,
    overrides: &[(NetConfig, bool)],
) -> Result<(), String> {
    if !handed.is_empty() {
        if handed.len() != nets.len() {
            return Err(format!(
                "{} TAP file descriptors arrived for {} network interfaces",
                handed.len(),
                nets.len()
            ));
        }
        if !overrides.is_empty() {
            tracing::info!("local migration: the handed-over TAPs are used, --net is ignored");
        }
        for (n, fd) in nets.iter_mut().zip(handed) {
            n.fd = Some(fd.into_raw_fd());
        }
        return Ok(());
    }
    if !overrides.is_empty() {
        if overrides.len() != nets.len() {
            return Err(format!(
                "the VM has {} network interfaces but {} --net options were given",
                nets.len(),
                overrides.len()
            ));
        }
        for (i, (n, (o, mac_given))) in nets.iter_mut().zip(overrides).enumerate() {
            if *mac_given && o.mac != n.mac {
                return Err(format!(
                    "--net {i}: mac={} differs from the VM's MAC {} (a VM keeps its MAC)",
                    format_mac(&o.mac),
                    format_mac(&n.mac)
                ));
            }
            n.tap = o.tap.clone();
            n.fd = o.fd;
        }
        return Ok(());
    }
    for (i, n) in nets.iter_mut().enumerate() {
        if n.tap.is_none() {
            return Err(format!(
                "network interface {i} (MAC {}) was attached by file descriptor: give this \
                 launcher --net tap=NAME or --net fd=N for it",
                format_mac(&n.mac)
            ));
        }
        n.fd = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        let n = NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let n = NetConfig::parse("fd=3").unwrap();
        assert_eq!(n.fd, Some(3));
        assert_eq!(&n.mac[..3], &[0x52, 0x54, 0]);
        for bad in [
            "",
            "tap=",
            "tap=a/b",
            "tap=waytoolonginterfacename",
            "fd=-1",
            "fd=x",
            "tap=t,fd=3",
            "mac=52:54:00:12:34:56",
            "tap=t,mac=zz",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,mac=00:00:00:00:00:00",
            "tap=t,queues=2",
        ] {
            let e = NetConfig::parse(bad);
            assert!(e.is_err(), "{bad:?}");
        }
        let e = NetConfig::parse("tap=t,mac=zz").unwrap_err().to_string();
        assert!(e.contains("not a MAC address"), "{e}");
    }

    #[test]
    fn incoming_attach_rules() {
        let vm = vec![NetConfig {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            tap: Some("old".into()),
            fd: Some(9),
        }];
        let mut n = vm.clone();
        attach_incoming(&mut n, Vec::new(), &[]).unwrap();
        assert_eq!((n[0].tap.as_deref(), n[0].fd), (Some("old"), None));
        let mut n = vm.clone();
        let o = NetConfig::parse_spec("tap=new").unwrap();
        attach_incoming(&mut n, Vec::new(), &[o]).unwrap();
        assert_eq!(n[0].tap.as_deref(), Some("new"));
        assert_eq!(n[0].mac, vm[0].mac);
        let mut n = vm.clone();
        let o = NetConfig::parse_spec("tap=new,mac=52:54:00:09:09:09").unwrap();
        assert!(attach_incoming(&mut n, Vec::new(), &[o])
            .unwrap_err()
            .contains("differs"));
        let mut n = vec![NetConfig {
            tap: None,
            ..vm[0].clone()
        }];
        assert!(attach_incoming(&mut n, Vec::new(), &[])
            .unwrap_err()
            .contains("--net"));
    }
}
