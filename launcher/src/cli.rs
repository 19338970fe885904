//! The launcher's command line (clap), and its interpretation into VMM types. The
//! grammar of `--disk` and `--net` values is `contracts::launch` (noded builds launcher
//! command lines with [`contracts::launch::LaunchOptions::to_argv`]; the tests below
//! check that every such argv parses here).

use std::os::fd::IntoRawFd;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use contracts::launch::{DiskArg, NetArg, NetBackend};
use vmm::config::{DiskConfig, NetConfig};

use crate::launch::VERSION;

/// `launcher`.
#[derive(Parser, Debug)]
#[command(name = "launcher", version = VERSION, about = "Run one KVM virtual machine, live-migratable to another launcher")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a VM (or continue one from a snapshot or an incoming migration) and run it.
    Run(Box<RunArgs>),
    /// Write a snapshot of the VM that the launcher at --api-socket runs.
    Snapshot {
        /// The launcher's API socket.
        #[arg(long)]
        api_socket: PathBuf,
        /// Snapshot file to write.
        file: PathBuf,
        /// Stop the VM after writing (the snapshot becomes its only continuation).
        #[arg(long)]
        stop: bool,
    },
    /// Live-migrate the VM that the launcher at --api-socket runs.
    Migrate(crate::migrate_cli::MigrateArgs),
    /// Print what this launcher supports, as one JSON object.
    Capabilities,
    /// Calls to a running launcher's API (status, pause, resume, shutdown,
    /// migrate-status, migrate-cancel).
    #[command(flatten)]
    Api(crate::api_cli::ApiCmd),
}

/// `launcher run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel: a PVH ELF (32- or 64-bit) or a Linux bzImage.
    #[arg(long, conflicts_with_all = ["restore", "incoming"])]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory as a Kubernetes quantity: 128Mi, 1Gi (powers of 1024) or 500M, 1G
    /// (powers of 1000, rounded up to whole 4 KiB pages).
    #[arg(long)]
    pub memory: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Machine type (versioned name, or the alias q35) [default: q35].
    #[arg(long)]
    pub machine_type: Option<String>,
    /// Serial console: stdio, or a file that is appended to.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// Serve the control API on this Unix socket (created with mode 0600).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Continue the VM saved in this snapshot file.
    #[arg(long, conflicts_with = "incoming")]
    pub restore: Option<PathBuf>,
    /// Wait for one incoming migration on this URI (unix:PATH or tcp:HOST:PORT).
    #[arg(long)]
    pub incoming: Option<String>,
    /// TLS for a tcp: --incoming: a directory with ca.pem, cert.pem and key.pem.
    #[arg(long, requires = "incoming", conflicts_with = "insecure")]
    pub tls_dir: Option<PathBuf>,
    /// Allow a plain, unauthenticated and unencrypted tcp: --incoming.
    #[arg(long, requires = "incoming")]
    pub insecure: bool,
    /// Do not install seccomp filters (for debugging; see launch/seccomp.rs).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Dirty-page tracking for live migration: KVM's dirty ring where the host has it
    /// (on, the default), or the dirty bitmap only (off).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    pub dirty_ring: bool,
    /// Data disk (virtio-blk on a raw file): path=FILE[,readonly=on][,shared=on]; repeatable.
    #[arg(long = "disk", value_name = "SPEC", conflicts_with_all = ["restore", "incoming"])]
    pub disks: Vec<String>,
    /// Network interface (virtio-net on an existing TAP): tap=NAME[,mac=MAC] or
    /// fd=N[,mac=MAC]; repeatable. With --restore or --incoming: the TAPs on this side (one
    /// per interface of the VM, in order; the VM keeps its MAC).
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// Fence through a watchdog: a file that noded keeps touching. When its mtime is
    /// older than --watchdog-timeout-ms, or it is missing or unreadable (at start too),
    /// the launcher kills itself with SIGKILL at once (see launcher/src/watchdog.rs).
    #[arg(long, value_name = "PATH")]
    pub watchdog_file: Option<PathBuf>,
    /// How long the watchdog file may go untouched, in milliseconds (500 to 600000)
    /// [default: 5000]; needs --watchdog-file.
    #[arg(long, value_name = "MS")]
    pub watchdog_timeout_ms: Option<u64>,
    /// Test only: each thread of the kind named (vcpu, the default, or worker: the virtio
    /// device workers) makes a forbidden system call once its seccomp filter is installed,
    /// which must kill the process (tests/tests/security.rs).
    #[arg(long, hide = true, value_name = "vcpu|worker", num_args = 0..=1,
          default_missing_value = "vcpu", value_parser = selftest_kind)]
    pub seccomp_selftest: Option<crate::launch::seccomp::Selftest>,
    /// Give up a migration stream after this many milliseconds without a byte moving
    /// [default: 60000]. noded sets 15000 in a cluster, so that a migration to a node
    /// that died behind a dead link ends (the source resumes) well before the operator
    /// would notice; tests that stall connections on purpose set less.
    #[arg(long, value_name = "MS")]
    pub migration_stall_timeout_ms: Option<u64>,
}

impl RunArgs {
    /// The `--disk` values, parsed (an error is one line for the user, exit status 1).
    pub fn disk_args(&self) -> Result<Vec<DiskArg>, String> {
        self.disks.iter().map(|d| DiskArg::parse(d)).collect()
    }

    /// The `--net` values, parsed.
    pub fn net_args(&self) -> Result<Vec<NetArg>, String> {
        self.nets.iter().map(|n| NetArg::parse(n)).collect()
    }

    /// The watchdog of `--watchdog-file` and `--watchdog-timeout-ms`, checked (None
    /// without `--watchdog-file`).
    pub fn watchdog(&self) -> Result<Option<crate::watchdog::Watchdog>, String> {
        crate::watchdog::Watchdog::from_args(
            self.watchdog_file.as_deref(),
            self.watchdog_timeout_ms,
        )
        .map_err(|e| e.to_string())
    }
}

/// The VMM's interface for a `--net` value (`true`: the MAC was given; without one a
/// random `52:54:00:xx:xx:xx` is chosen, which then stays with the VM).
pub fn net_config(arg: &NetArg) -> (NetConfig, bool) {
    let (tap, fd) = match &arg.backend {
        NetBackend::Tap(t) => (Some(t.clone()), None),
        NetBackend::Fd(fd) => (None, Some(*fd)),
    };
    let mac = arg.mac.unwrap_or_else(contracts::limits::random_mac);
    (NetConfig { mac, tap, fd }, arg.mac.is_some())
}

/// The VMM's disk for a `--disk` value; a relative path is made absolute against the
/// current directory (a migration destination may run elsewhere).
pub fn disk_config(arg: &DiskArg) -> Result<DiskConfig, String> {
    let path = std::path::absolute(&arg.path)
        .map_err(|e| format!("invalid disk {:?}: {e}", arg.to_arg()))?;
    Ok(DiskConfig {
        path: path.display().to_string(),
        readonly: arg.readonly,
        shared: arg.shared,
    })
}

/// Attach the TAPs of an incoming launcher's `--net` options now, at start-up, rather
/// than when the VM arrives: a wrong name is reported at once, and the TAP has a carrier
/// (its bridge port forwards) long before the switch-over. Without that, a bridge can
/// take up to a second to notice the new carrier and drops what the guest sends first
/// (the RARP announcement). Each `tap=NAME` gets the attached descriptor as its `fd`
/// (kept open for the life of the process); an `fd=N` is checked.
pub fn attach_early(
    nets: &mut [(NetConfig, bool)],
) -> Result<(), vmm::devices::virtio::tap::TapError> {
    use vmm::devices::virtio::tap::Tap;
    for (n, _) in nets.iter_mut() {
        match (n.fd, &n.tap) {
            (Some(fd), _) => drop(Tap::from_fd(fd)?),
            (None, Some(name)) => {
                let tap = Tap::open_named(name)?;
                n.fd = Some(tap.into_fd().into_raw_fd());
            }
            (None, None) => {}
        }
    }
    Ok(())
}

/// clap value parser for an `on|off` switch.
/// clap value parser of `--seccomp-selftest`.
fn selftest_kind(s: &str) -> Result<crate::launch::seccomp::Selftest, String> {
    use crate::launch::seccomp::Selftest;
    match s {
        "vcpu" => Ok(Selftest::Vcpu),
        "worker" => Ok(Selftest::Worker),
        _ => Err(format!("{s:?} is neither vcpu nor worker")),
    }
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use contracts::launch::{BootOptions, LaunchOptions, VmSource};

    fn parses(o: &LaunchOptions) -> RunArgs {
        let mut argv = vec!["launcher".to_string()];
        argv.extend(o.to_argv());
        match Cli::try_parse_from(&argv) {
            Ok(Cli {
                command: Command::Run(r),
            }) => *r,
            Ok(other) => panic!("{argv:?} parsed as {other:?}"),
            Err(e) => panic!("{argv:?} does not parse: {e}"),
        }
    }

    #[test]
    fn every_argv_the_builder_makes_parses_to_the_same_options() {
        let nets = vec![
            NetArg::parse("tap=tap0,mac=52:54:00:00:00:07").unwrap(),
            NetArg::parse("fd=5").unwrap(),
        ];
        let boot = BootOptions {
            kernel: "/k.elf".into(),
            initrd: Some("/i".into()),
            cmdline: "every=5 x=y".into(),
            memory_bytes: (64 << 20) + 4096,
            vcpus: 3,
            machine_type: Some("q35".into()),
            disks: vec![DiskArg::parse("path=/d.img,readonly=on,shared=on").unwrap()],
        };
        let o = LaunchOptions {
            source: VmSource::Boot(boot.clone()),
            nets: nets.clone(),
            serial: Some("/s/console.log".into()),
            api_socket: Some("/s/api.sock".into()),
            watchdog_file: Some("/run/wd/vm1".into()),
            watchdog_timeout_ms: Some(2500),
            migration_stall_timeout_ms: Some(15000),
        };
        let r = parses(&o);
        assert_eq!(r.kernel, Some(PathBuf::from("/k.elf")));
        assert_eq!(r.initrd, Some(PathBuf::from("/i")));
        assert_eq!(r.cmdline.as_deref(), Some("every=5 x=y"));
        let mem = contracts::quantity::parse(r.memory.as_deref().unwrap()).unwrap();
        assert_eq!(mem, boot.memory_bytes);
        assert_eq!((r.vcpus, r.machine_type.as_deref()), (Some(3), Some("q35")));
        assert_eq!(r.disk_args().unwrap(), boot.disks);
        assert_eq!(r.net_args().unwrap(), nets);
        assert_eq!(r.serial, "/s/console.log");
        assert_eq!(r.api_socket, Some(PathBuf::from("/s/api.sock")));
        let wd = r.watchdog().unwrap().unwrap();
        assert_eq!(wd.file, PathBuf::from("/run/wd/vm1"));
        assert_eq!(wd.timeout, std::time::Duration::from_millis(2500));
        assert_eq!(r.migration_stall_timeout_ms, Some(15000));
        for source in [
            VmSource::Restore("/snap".into()),
            VmSource::Incoming {
                uri: "unix:/m.sock".into(),
                tls_dir: None,
                insecure: false,
            },
            VmSource::Incoming {
                uri: "tcp:1.2.3.4:5".into(),
                tls_dir: Some("/tls".into()),
                insecure: false,
            },
            VmSource::Incoming {
                uri: "tcp:1.2.3.4:5".into(),
                tls_dir: None,
                insecure: true,
            },
        ] {
            let o = LaunchOptions {
                source: source.clone(),
                nets: nets.clone(),
                serial: None,
                api_socket: None,
                watchdog_file: Some("/w".into()),
                watchdog_timeout_ms: None,
                migration_stall_timeout_ms: None,
            };
            let r = parses(&o);
            assert_eq!(r.net_args().unwrap(), nets);
            // The launcher's default timeout when the builder gives none.
            let wd = r.watchdog().unwrap().unwrap();
            assert_eq!(wd.timeout, crate::watchdog::DEFAULT_TIMEOUT);
            match source {
                VmSource::Restore(p) => assert_eq!(r.restore, Some(PathBuf::from(p))),
                VmSource::Incoming {
                    uri,
                    tls_dir,
                    insecure,
                } => {
                    assert_eq!(r.incoming, Some(uri));
                    assert_eq!(r.tls_dir, tls_dir.map(PathBuf::from));
                    assert_eq!(r.insecure, insecure);
                }
                VmSource::Boot(_) => unreachable!(),
            }
        }
    }

    #[test]
    fn bad_disk_and_net_values_are_refused_with_the_reason() {
        let argv = [
            "launcher",
            "run",
            "--kernel",
            "/k",
            "--net",
            "tap=t,mac=zz",
            "--disk",
            "path=/x,cache=none",
        ];
        let Cli {
            command: Command::Run(r),
        } = Cli::try_parse_from(argv).unwrap()
        else {
            panic!("not run");
        };
        let e = r.net_args().unwrap_err();
        assert!(e.contains("mac=zz is not a MAC address"), "{e}");
        let e = r.disk_args().unwrap_err();
        assert!(e.contains("unknown or empty key \"cache\""), "{e}");
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["launcher", "run", "--kernel", "/k"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(&argv) {
            Ok(Cli {
                command: Command::Run(r),
            }) => *r,
            other => panic!("{argv:?}: {other:?}"),
        }
    }

    #[test]
    fn watchdog_flags_are_checked() {
        assert!(run_args(&[]).watchdog().unwrap().is_none());
        for ms in ["500", "600000"] {
            let wd = run_args(&["--watchdog-file", "/w", "--watchdog-timeout-ms", ms])
                .watchdog()
                .unwrap()
                .unwrap();
            assert_eq!(wd.timeout.as_millis().to_string(), ms);
        }
        for ms in ["0", "499", "600001"] {
            let e = run_args(&["--watchdog-file", "/w", "--watchdog-timeout-ms", ms])
                .watchdog()
                .unwrap_err();
            assert!(
                e.contains(&format!("--watchdog-timeout-ms {ms}")) && e.contains("500 to 600000"),
                "{e}"
            );
        }
        let e = run_args(&["--watchdog-timeout-ms", "1000"])
            .watchdog()
            .unwrap_err();
        assert!(e.contains("needs --watchdog-file"), "{e}");
        // An empty path is refused (by clap, before our own check).
        let e = Cli::try_parse_from(["launcher", "run", "--kernel", "/k", "--watchdog-file", ""])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--watchdog-file"), "{e}");
    }

    #[test]
    fn values_become_vmm_configs() {
        let (n, given) = net_config(&NetArg::parse("tap=t0").unwrap());
        assert!(!given && n.tap.as_deref() == Some("t0") && n.fd.is_none());
        assert_eq!(&n.mac[..3], &[0x52, 0x54, 0]);
        let (n, given) = net_config(&NetArg::parse("fd=3,mac=52:54:00:01:02:03").unwrap());
        assert!(given && n.fd == Some(3) && n.mac == [0x52, 0x54, 0, 1, 2, 3]);
        let d = disk_config(&DiskArg::parse("shared=on,path=rel.img").unwrap()).unwrap();
        assert!(d.path.starts_with('/') && d.path.ends_with("/rel.img") && d.shared);
    }
}
