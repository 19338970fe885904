//! The launcher's command line as data: what noded (or a test) wants a launcher to run,
//! turned into `launcher run` arguments by one builder ([`LaunchOptions::to_argv`]), and
//! the grammar of the `--disk` and `--net` values, parsed and printed here once. The
//! launcher's clap definition (`launcher::cli`) is tested against every argv built here.

use serde::{Deserialize, Serialize};

use crate::limits::{format_mac, parse_mac};

/// A `--disk` value: `path=FILE[,readonly=on][,shared=on]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskArg {
    /// The image file (made absolute by the launcher).
    pub path: String,
    /// Shown to the guest as read-only.
    pub readonly: bool,
    /// On storage that other hosts reach too.
    pub shared: bool,
}

impl DiskArg {
    /// The `--disk` value.
    pub fn to_arg(&self) -> String {
        let mut a = format!("path={}", self.path);
        if self.readonly {
            a.push_str(",readonly=on");
        }
        if self.shared {
            a.push_str(",shared=on");
        }
        a
    }

    /// Parses a `--disk` value (the path as given).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = |why: String| format!("invalid disk {spec:?}: {why}");
        let mut disk = DiskArg::default();
        let mut path = None;
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let flag = || match v {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(bad(format!("{k}={v}: use on or off"))),
            };
            match k {
                "path" if !v.is_empty() => path = Some(v),
                "readonly" => disk.readonly = flag()?,
                "shared" => disk.shared = flag()?,
                _ => {
                    return Err(bad(format!(
                        "unknown or empty key {k:?} (path, readonly, shared)"
                    )))
                }
            }
        }
        disk.path = path
            .ok_or_else(|| bad("path=FILE is required".into()))?
            .to_string();
        Ok(disk)
    }
}

/// The backend of a `--net` value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackend {
    /// `tap=NAME`: an existing TAP interface, opened by name.
    Tap(String),
    /// `fd=N`: a TAP descriptor the launcher inherits.
    Fd(i32),
}

/// A `--net` value: `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetArg {
    /// The TAP.
    pub backend: NetBackend,
    /// The guest's MAC (the launcher picks one when absent).
    pub mac: Option<[u8; 6]>,
}

impl NetArg {
    /// The `--net` value.
    pub fn to_arg(&self) -> String {
        let mut a = match &self.backend {
            NetBackend::Tap(t) => format!("tap={t}"),
            NetBackend::Fd(fd) => format!("fd={fd}"),
        };
        if let Some(mac) = &self.mac {
            a.push_str(",mac=");
            a.push_str(&format_mac(mac));
        }
        a
    }

    /// Parses a `--net` value.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = |why: String| format!("invalid network interface {spec:?}: {why}");
        let (mut tap, mut fd, mut mac) = (None, None, None);
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match k {
                "tap" if valid_ifname(v) => tap = Some(v.to_string()),
                "tap" => {
                    return Err(bad(format!(
                        "tap={v:?} is not an interface name (1 to 15 bytes, no '/', ':', spaces)"
                    )))
                }
                "fd" => {
                    let n: i32 =
                        v.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                            bad(format!("fd={v} is not a file descriptor number"))
                        })?;
                    fd = Some(n);
                }
                "mac" => mac = Some(parse_mac(v).map_err(|e| bad(format!("mac={e}")))?),
                _ => return Err(bad(format!("unknown key {k:?} (tap, fd, mac)"))),
            }
        }
        let backend = match (tap, fd) {
            (None, None) => return Err(bad("tap=NAME or fd=N is required".into())),
            (Some(_), Some(_)) => return Err(bad("give tap=NAME or fd=N, not both".into())),
            (Some(t), None) => NetBackend::Tap(t),
            (None, Some(n)) => NetBackend::Fd(n),
        };
        Ok(NetArg { backend, mac })
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, `:` or whitespace.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// A fresh boot (`--kernel`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootOptions {
    /// Kernel image.
    pub kernel: String,
    /// Initial ramdisk.
    pub initrd: Option<String>,
    /// Kernel command line (omitted when empty).
    pub cmdline: String,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Machine type (the launcher's default when absent).
    pub machine_type: Option<String>,
    /// Data disks.
    pub disks: Vec<DiskArg>,
}

/// Where the VM of a launcher comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmSource {
    /// Boot a kernel.
    Boot(BootOptions),
    /// Continue a snapshot file.
    Restore(String),
    /// Wait for one incoming migration.
    Incoming {
        /// `unix:PATH` or `tcp:HOST:PORT`.
        uri: String,
        /// TLS directory for a `tcp:` URI.
        tls_dir: Option<String>,
        /// Plain TCP.
        insecure: bool,
    },
}

/// Everything `launcher run` is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchOptions {
    /// Where the VM comes from.
    pub source: VmSource,
    /// Network interfaces (with `Restore`/`Incoming`: this side's TAPs, in order).
    pub nets: Vec<NetArg>,
    /// Serial console: `stdio` or a file (the launcher's default when absent).
    pub serial: Option<String>,
    /// Control API socket.
    pub api_socket: Option<String>,
    /// `--watchdog-file`: a file noded keeps touching; the launcher kills itself
    /// (SIGKILL, fencing its VM) when the file's mtime is older than the timeout, or the
    /// file is missing (docs/cluster.md: a frozen noded's VMs must stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_file: Option<String>,
    /// `--watchdog-timeout-ms` (the launcher's default, 5000, when absent); only with
    /// `watchdog_file` (the launcher refuses it alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_timeout_ms: Option<u64>,
    /// `--migration-stall-timeout-ms`: how long a migration's connection may carry
    /// nothing before the launcher gives it up (the launcher's default when absent).
    /// Cluster nodes shorten it: a peer that died behind a dead link sends no RST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_stall_timeout_ms: Option<u64>,
}

/// The `--memory` value: the shortest exact binary quantity (`64Mi`, `12Ki`), which
/// every launcher version reads the same (see [`crate::quantity`]).
pub fn memory_arg(bytes: u64) -> String {
    crate::quantity::format_binary(bytes)
}

impl LaunchOptions {
    /// The arguments of `launcher` (starting with `run`).
    pub fn to_argv(&self) -> Vec<String> {
        let mut a = vec!["run".to_string()];
        let mut opt = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        match &self.source {
            VmSource::Boot(b) => {
                opt("--kernel", b.kernel.clone());
                if let Some(i) = &b.initrd {
                    opt("--initrd", i.clone());
                }
                if !b.cmdline.is_empty() {
                    opt("--cmdline", b.cmdline.clone());
                }
                opt("--memory", memory_arg(b.memory_bytes));
                opt("--vcpus", b.vcpus.to_string());
                if let Some(m) = &b.machine_type {
                    opt("--machine-type", m.clone());
                }
                for d in &b.disks {
                    opt("--disk", d.to_arg());
                }
            }
            VmSource::Restore(path) => opt("--restore", path.clone()),
            VmSource::Incoming { uri, tls_dir, .. } => {
                opt("--incoming", uri.clone());
                if let Some(t) = tls_dir {
                    opt("--tls-dir", t.clone());
                }
            }
        }
        for n in &self.nets {
            opt("--net", n.to_arg());
        }
        if let Some(s) = &self.serial {
            opt("--serial", s.clone());
        }
        if let Some(s) = &self.api_socket {
            opt("--api-socket", s.clone());
        }
        if let Some(f) = &self.watchdog_file {
            opt("--watchdog-file", f.clone());
        }
        if let Some(ms) = self.watchdog_timeout_ms {
            opt("--watchdog-timeout-ms", ms.to_string());
        }
        if let Some(ms) = self.migration_stall_timeout_ms {
            opt("--migration-stall-timeout-ms", ms.to_string());
        }
        if matches!(self.source, VmSource::Incoming { insecure: true, .. }) {
            a.push("--insecure".into());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_net_values_round_trip() {
        for s in [
            "path=/d.img",
            "path=/d.img,readonly=on,shared=on",
            "path=rel.img,shared=on",
        ] {
            assert_eq!(DiskArg::parse(s).unwrap().to_arg(), s);
        }
        for s in [
            "tap=tap0",
            "fd=3,mac=52:54:00:12:34:56",
            "tap=t1,mac=52:54:00:ab:cd:ef",
        ] {
            assert_eq!(NetArg::parse(s).unwrap().to_arg(), s);
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        for bad in [
            "",
            "/x.img",
            "path=",
            "readonly=on",
            "path=/x,readonly=maybe",
            "path=/x,cache=none",
        ] {
            assert!(DiskArg::parse(bad).is_err(), "{bad:?}");
        }
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
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,queues=2",
        ] {
            assert!(NetArg::parse(bad).is_err(), "{bad:?}");
        }
        let e = NetArg::parse("tap=t,mac=zz").unwrap_err();
        assert!(e.contains("mac=zz is not a MAC address"), "{e}");
    }

    #[test]
    fn argv_of_a_boot_and_of_an_incoming_launcher() {
        let o = LaunchOptions {
            source: VmSource::Boot(BootOptions {
                kernel: "/k".into(),
                cmdline: "every=5".into(),
                memory_bytes: 64 << 20,
                vcpus: 2,
                disks: vec![DiskArg {
                    path: "/d".into(),
                    readonly: true,
                    shared: false,
                }],
                ..BootOptions::default()
            }),
            nets: vec![NetArg::parse("tap=tap0,mac=52:54:00:00:00:07").unwrap()],
            serial: Some("/s/console.log".into()),
            api_socket: Some("/s/api.sock".into()),
            watchdog_file: Some("/s/watchdog".into()),
            watchdog_timeout_ms: Some(3000),
            migration_stall_timeout_ms: Some(15000),
        };
        let a = o.to_argv();
        assert_eq!(a[0], "run");
        for pair in [
            ["--cmdline", "every=5"],
            ["--memory", "64Mi"],
            ["--disk", "path=/d,readonly=on"],
            ["--net", "tap=tap0,mac=52:54:00:00:00:07"],
            ["--api-socket", "/s/api.sock"],
            ["--watchdog-file", "/s/watchdog"],
            ["--watchdog-timeout-ms", "3000"],
            ["--migration-stall-timeout-ms", "15000"],
        ] {
            assert!(a.windows(2).any(|w| w == pair), "{pair:?} in {a:?}");
        }
        assert_eq!(memory_arg(4096 * 3), "12Ki");
        // Without a watchdog, neither flag is given (an older launcher does not know them).
        let plain = LaunchOptions {
            watchdog_file: None,
            watchdog_timeout_ms: None,
            migration_stall_timeout_ms: None,
            ..o
        };
        assert!(!plain
            .to_argv()
            .iter()
            .any(|a| a.starts_with("--watchdog") || a.starts_with("--migration-stall")));
    }

    #[test]
    fn options_stored_without_the_watchdog_fields_still_read() {
        let o = LaunchOptions {
            source: VmSource::Restore("/snap".into()),
            nets: Vec::new(),
            serial: None,
            api_socket: None,
            watchdog_file: None,
            watchdog_timeout_ms: None,
            migration_stall_timeout_ms: None,
        };
        let json = serde_json::to_string(&o).unwrap();
        assert!(!json.contains("watchdog"), "{json}");
        assert_eq!(serde_json::from_str::<LaunchOptions>(&json).unwrap(), o);
        let fed = LaunchOptions {
            watchdog_file: Some("/w".into()),
            watchdog_timeout_ms: Some(1000),
            ..o
        };
        let json = serde_json::to_string(&fed).unwrap();
        assert_eq!(serde_json::from_str::<LaunchOptions>(&json).unwrap(), fed);
    }
}
