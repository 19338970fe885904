//! Network interface configuration: the guest MAC, the backend of each interface, and how
//! an incoming VM (migration or snapshot restore) re-attaches its interfaces to TAPs.
//!
//! A [`NetConfig`] travels in `VmConfig` (snapshots, migration streams), so the guest's MAC
//! is the same in every launcher the VM ever runs in. The backend is named by `tap` (a TAP
//! interface opened by name in the launcher's network namespace) or `fd` (a descriptor this
//! process holds open: inherited from whoever started it, or handed over by the previous
//! launcher in a local migration). An `fd` is only meaningful in the process that holds it,
//! so it is never serialised (it travels as "none") and an incoming launcher always
//! supplies its own ([`attach_incoming`]). The launcher's `--net` grammar lives in
//! `contracts::launch`, its interpretation in the launcher.

use std::os::fd::{IntoRawFd, OwnedFd};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::ConfigError;
pub use contracts::limits::format_mac;

/// Most network interfaces per VM (one PCI slot each, from [`super::FIRST_NET_SLOT`]).
pub const MAX_NETS: usize = contracts::limits::MAX_NETS;

/// One network interface: virtio-net on a TAP device.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (unicast; stable for the life of the VM).
    pub mac: [u8; 6],
    /// Name of an existing TAP interface, opened with `TUNSETIFF` (no privilege needed
    /// for a persistent TAP owned by the launcher's user).
    pub tap: Option<String>,
    /// A TAP file descriptor this process holds open (used before `tap`). Process-local:
    /// serialised as none and read back as none, whatever the bytes say, so that it never
    /// reaches a snapshot or a migration stream (the field stays in the encoding so that
    /// the layout is the one older launchers read).
    #[serde(serialize_with = "fd_as_none", deserialize_with = "fd_dropped")]
    pub fd: Option<i32>,
}

fn fd_as_none<S: Serializer>(_: &Option<i32>, s: S) -> Result<S::Ok, S::Error> {
    None::<i32>.serialize(s)
}

fn fd_dropped<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    Option::<i32>::deserialize(d).map(|_| None)
}

impl NetConfig {
    /// How the backend is named, for messages.
    pub fn describe(&self) -> String {
        match (&self.tap, self.fd) {
            (_, Some(fd)) => format!("fd {fd}"),
            (Some(t), None) => format!("TAP {t}"),
            (None, None) => "no backend".into(),
        }
    }
}

/// Check a list of interfaces: count, backends, distinct MACs.
pub fn validate(nets: &[NetConfig]) -> Result<(), ConfigError> {
    contracts::limits::check_nets(nets.len())
        .map_err(|e| ConfigError::Net(format!("list: {e}")))?;
    for (i, n) in nets.iter().enumerate() {
        contracts::limits::check_mac(&n.mac).map_err(|e| ConfigError::Net(format!("{i}: {e}")))?;
        if nets[..i].iter().any(|o| o.mac == n.mac) {
            return Err(ConfigError::Net(format!(
                "{i}: MAC {} is given twice",
                format_mac(&n.mac)
            )));
        }
        if let Some(t) = &n.tap {
            if !contracts::launch::valid_ifname(t) {
                return Err(ConfigError::Net(format!("{i}: bad TAP name {t:?}")));
            }
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
    fn a_process_local_fd_is_never_serialised() {
        let with_fd = NetConfig {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            tap: Some("t0".into()),
            fd: Some(7),
        };
        let without = NetConfig {
            fd: None,
            ..with_fd.clone()
        };
        let bytes = bincode::serialize(&with_fd).unwrap();
        assert_eq!(bytes, bincode::serialize(&without).unwrap());
        let back: NetConfig = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, without);
        // Bytes that do carry an fd (an older launcher's) are read without it.
        let old =
            bincode::serialize(&([0x52u8, 0x54, 0, 1, 2, 3], Some("t0"), Some(7i32))).unwrap();
        assert_eq!(bincode::deserialize::<NetConfig>(&old).unwrap().fd, None);
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
        let new = |mac| NetConfig {
            mac,
            tap: Some("new".into()),
            fd: None,
        };
        let o = (new(vm[0].mac), false);
        attach_incoming(&mut n, Vec::new(), &[o]).unwrap();
        assert_eq!(n[0].tap.as_deref(), Some("new"));
        assert_eq!(n[0].mac, vm[0].mac);
        let mut n = vm.clone();
        let o = (new([0x52, 0x54, 0, 9, 9, 9]), true);
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
