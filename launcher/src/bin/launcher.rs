//! `launcher`: runs one VM per process, serves its control API, snapshots it and
//! migrates it to another launcher. See ARCHITECTURE.md for the contract.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use launcher::launch::{self, api, runtime, LaunchError, VERSION};
use vmm::config::parse_size;
use vmm::{Vm, VmConfig};

#[derive(Parser)]
#[command(name = "launcher", version = VERSION, about = "Run one KVM virtual machine, live-migratable to another launcher")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM (or continue one from a snapshot or an incoming migration) and run it.
    Run(RunArgs),
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
    Migrate(launcher::migrate_cli::MigrateArgs),
    /// Print what this launcher supports, as one JSON object.
    Capabilities,
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: a PVH ELF (32- or 64-bit) or a Linux bzImage.
    #[arg(long, conflicts_with_all = ["restore", "incoming"])]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest memory, e.g. 128M, 1G, 512Mi.
    #[arg(long)]
    memory: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Machine type (versioned name, or the alias q35).
    #[arg(long, default_value = "q35")]
    machine_type: String,
    /// Serial console: stdio, or a file that is appended to.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Serve the control API on this Unix socket (created with mode 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Continue the VM saved in this snapshot file.
    #[arg(long, conflicts_with = "incoming")]
    restore: Option<PathBuf>,
    /// Wait for one incoming migration on this URI (unix:PATH or tcp:HOST:PORT).
    #[arg(long)]
    incoming: Option<String>,
    /// TLS for a tcp: --incoming: a directory with ca.pem, cert.pem and key.pem.
    #[arg(long, requires = "incoming", conflicts_with = "insecure")]
    tls_dir: Option<PathBuf>,
    /// Allow a plain, unauthenticated and unencrypted tcp: --incoming.
    #[arg(long, requires = "incoming")]
    insecure: bool,
    /// Do not install seccomp filters (for debugging; see launch/seccomp.rs).
    #[arg(long)]
    no_seccomp: bool,
    /// Data disk (virtio-blk on a raw file): path=FILE[,readonly=on][,shared=on]; repeatable.
    #[arg(long = "disk", value_name = "SPEC", conflicts_with_all = ["restore", "incoming"])]
    disks: Vec<String>,
    /// Network interface (virtio-net on an existing TAP): tap=NAME[,mac=MAC] or
    /// fd=N[,mac=MAC]; repeatable. With --restore or --incoming: the TAPs on this side (one
    /// per interface of the VM, in order; the VM keeps its MAC).
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAUNCHER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Snapshot {
            api_socket,
            file,
            stop,
        } => snapshot(&api_socket, &file, stop),
        Command::Migrate(args) => launcher::migrate_cli::run(&args),
        Command::Capabilities => {
            println!("{}", launcher::capabilities());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("launcher: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage(msg: impl Into<String>) -> LaunchError {
    LaunchError::Usage(msg.into())
}

fn run(args: RunArgs) -> Result<i32, LaunchError> {
    launch::signals::install();
    if !args.no_seccomp {
        launch::seccomp::install_process_filter().map_err(|e| usage(e.to_string()))?;
        vmm::vstate::vcpu::set_thread_start_hook(launch::seccomp::vcpu_thread_start);
    }
    let serial = runtime::SerialTarget::parse(&args.serial);
    let mut nets = args
        .nets
        .iter()
        .map(|n| vmm::config::NetConfig::parse_spec(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| usage(e.to_string()))?;
    if args.incoming.is_some() {
        // Attach this side's TAPs now: errors show at once, and the TAPs have a carrier
        // before the VM arrives.
        vmm::devices::virtio::netcfg::attach_early(&mut nets).map_err(|e| usage(e.to_string()))?;
    }
    let mut reboot_files = None;
    let runtime_handle = if let Some(uri) = &args.incoming {
        let rt = runtime::Runtime::new(None, serial);
        rt.set_incoming_nets(nets.clone());
        let security =
            launcher::migrate_glue::tcp_security(args.tls_dir.as_deref(), args.insecure, None)
                .map_err(usage)?;
        launcher::migrate_glue::start_incoming_with(uri, rt.clone(), &security)?;
        rt
    } else if let Some(path) = &args.restore {
        let f = std::fs::File::open(path).map_err(|source| LaunchError::File {
            what: "cannot open snapshot",
            path: path.display().to_string(),
            source,
        })?;
        let (mut state, ram) =
            vmm::snapshot::read(&mut std::io::BufReader::with_capacity(1 << 20, f))?;
        vmm::devices::virtio::netcfg::attach_incoming(&mut state.config.nets, Vec::new(), &nets)
            .map_err(usage)?;
        let vm = Vm::restore(state, ram, serial.open()?)?;
        vm.start_restored()?;
        runtime::Runtime::new(Some(vm), serial)
    } else {
        let kernel = args
            .kernel
            .as_ref()
            .ok_or_else(|| usage("one of --kernel, --restore or --incoming is required"))?;
        let memory = args
            .memory
            .as_deref()
            .ok_or_else(|| usage("--memory is required with --kernel (e.g. --memory 128M)"))?;
        let memory_bytes = parse_size(memory).map_err(|e| usage(e.to_string()))?;
        let vcpus = u8::try_from(args.vcpus)
            .ok()
            .filter(|v| *v >= 1 && *v <= vmm::config::MAX_VCPUS)
            .ok_or_else(|| {
                usage(format!(
                    "--vcpus {} is invalid: use 1 to {}",
                    args.vcpus,
                    vmm::config::MAX_VCPUS
                ))
            })?;
        check_memory(memory_bytes)?;
        let machine_type = launcher::resolve_machine_type(&args.machine_type).map_err(usage)?;
        let config = VmConfig {
            memory_bytes,
            vcpus,
            machine_type: machine_type.to_string(),
            kernel: kernel.display().to_string(),
            initrd: args.initrd.as_ref().map(|p| p.display().to_string()),
            cmdline: args.cmdline.clone(),
            disks: args
                .disks
                .iter()
                .map(|d| vmm::config::DiskConfig::parse(d))
                .collect::<Result<_, _>>()
                .map_err(|e| usage(e.to_string()))?,
            nets: nets.iter().map(|(n, _)| n.clone()).collect(),
        };
        config.validate().map_err(|e| usage(e.to_string()))?;
        let files = runtime::read_boot_files(&config)?;
        let vm = Vm::boot(config, &files.0, files.1.as_deref(), serial.open()?)?;
        reboot_files = Some(files);
        runtime::Runtime::new(Some(vm), serial)
    };
    if let Some(sock) = &args.api_socket {
        let listener = api::bind(sock)?;
        api::serve(
            listener,
            runtime_handle.clone(),
            Arc::new(launcher::migrate_glue::Handler::default()),
        );
    }
    let code = runtime_handle.main_loop(reboot_files);
    if let Some(sock) = &args.api_socket {
        let _ = std::fs::remove_file(sock);
    }
    code
}

/// Refuse memory sizes the host cannot back, before KVM or the kernel says something obscure.
fn check_memory(bytes: u64) -> Result<(), LaunchError> {
    if bytes < vmm::vstate::memory::MIN_MEMORY {
        return Err(usage(format!(
            "--memory {bytes} bytes is too small: at least 2 MiB is needed"
        )));
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages > 0 && page > 0 {
        let host = pages as u64 * page as u64;
        if bytes > host {
            return Err(usage(format!(
                "--memory {} MiB is more than this host has ({} MiB)",
                bytes >> 20,
                host >> 20
            )));
        }
    }
    Ok(())
}

fn snapshot(
    api_socket: &std::path::Path,
    file: &std::path::Path,
    stop: bool,
) -> Result<i32, LaunchError> {
    let file = std::path::absolute(file).map_err(|source| LaunchError::File {
        what: "invalid snapshot path",
        path: file.display().to_string(),
        source,
    })?;
    let body = serde_json::json!({"path": file.display().to_string(), "stop": stop});
    let (status, reply) = contracts::http::request_with_timeout(
        api_socket,
        "PUT",
        "/v1/snapshot",
        Some(&body),
        Some(std::time::Duration::from_secs(600)),
    )
    .map_err(|e| LaunchError::Api {
        path: api_socket.display().to_string(),
        why: format!(
            "{e} (is a launcher running with --api-socket {}?)",
            api_socket.display()
        ),
    })?;
    if status != 200 {
        let msg = reply
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown error");
        return Err(LaunchError::Api {
            path: api_socket.display().to_string(),
            why: format!("snapshot refused: {msg}"),
        });
    }
    println!("{reply}");
    Ok(0)
}
