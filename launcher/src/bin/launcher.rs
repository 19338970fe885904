//! `launcher`: runs one VM per process, serves its control API, snapshots it and
//! migrates it to another launcher. See ARCHITECTURE.md for the contract.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use launcher::cli::{Cli, Command, RunArgs};
use launcher::launch::{self, api, runtime, LaunchError};
use vmm::{Vm, VmConfig};

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
        Command::Run(args) => run(*args),
        Command::Snapshot {
            api_socket,
            file,
            stop,
        } => snapshot(&api_socket, &file, stop),
        Command::Migrate(args) => launcher::migrate_cli::run(&args),
        Command::Capabilities => {
            println!(
                "{}",
                contracts::launcher::to_json(&launcher::capabilities())
            );
            Ok(0)
        }
        Command::Api(cmd) => launcher::api_cli::run(&cmd),
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
    refuse_inapplicable(&args)?;
    let watchdog = args.watchdog().map_err(usage)?;
    vmm::vstate::vm::allow_dirty_ring(args.dirty_ring);
    launch::signals::install();
    if !args.no_seccomp {
        launch::seccomp::install_process_filter().map_err(|e| usage(e.to_string()))?;
        launch::seccomp::set_selftest(args.seccomp_selftest);
        vmm::vstate::vcpu::set_thread_start_hook(launch::seccomp::vcpu_thread_start);
        vmm::devices::virtio::worker::set_worker_start_hook(launch::seccomp::worker_thread_start);
    }
    // Before any guest exists (boot, restore or incoming): a stale or missing file
    // fences here already, so the guest of an unfed launcher never runs.
    if let Some(w) = watchdog {
        w.start().map_err(|e| usage(e.to_string()))?;
    }
    if let Some(ms) = args.migration_stall_timeout_ms.filter(|ms| *ms > 0) {
        migration::transport::set_stall_timeout(std::time::Duration::from_millis(ms));
    }
    let serial = runtime::SerialTarget::parse(&args.serial);
    let mut nets: Vec<_> = args
        .net_args()
        .map_err(usage)?
        .iter()
        .map(launcher::cli::net_config)
        .collect();
    let mut reboot_files = None;
    let runtime_handle = if let Some(uri) = &args.incoming {
        // Attach this side's TAPs now: errors show at once, and the TAPs have a carrier
        // before the VM arrives.
        launcher::cli::attach_early(&mut nets).map_err(|e| usage(e.to_string()))?;
        let rt = runtime::Runtime::new(None, serial);
        rt.set_incoming_nets(nets);
        let security =
            launcher::migrate_glue::tcp_security(args.tls_dir.as_deref(), args.insecure, None)
                .map_err(usage)?;
        launcher::migrate_glue::start_incoming_with(uri, rt.clone(), &security)?;
        rt
    } else if let Some(path) = &args.restore {
        runtime::Runtime::new(Some(restore(path, &nets, &serial)?), serial)
    } else {
        let (vm, files) = boot(&args, nets, &serial)?;
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

/// `--restore FILE`: continue a snapshot, with this side's TAPs. The snapshot's machine
/// type must be one this launcher advertises (the capabilities are what it enforces).
fn restore(
    path: &std::path::Path,
    nets: &[(vmm::config::NetConfig, bool)],
    serial: &runtime::SerialTarget,
) -> Result<Vm, LaunchError> {
    let f = std::fs::File::open(path).map_err(|source| LaunchError::File {
        what: "cannot open snapshot",
        path: path.display().to_string(),
        source,
    })?;
    let (mut state, ram) = vmm::snapshot::read(&mut std::io::BufReader::with_capacity(1 << 20, f))?;
    launcher::check_machine_type(&state.config.machine_type).map_err(usage)?;
    vmm::devices::virtio::netcfg::attach_incoming(&mut state.config.nets, Vec::new(), nets)
        .map_err(usage)?;
    let vm = Vm::restore(state, ram, serial.open()?)?;
    vm.start_restored()?;
    Ok(vm)
}

/// `--kernel`: check the options against the shared limits and boot. Returns the VM and
/// the kernel and initrd, kept for a guest reset.
fn boot(
    args: &RunArgs,
    nets: Vec<(vmm::config::NetConfig, bool)>,
    serial: &runtime::SerialTarget,
) -> Result<(Vm, runtime::BootFiles), LaunchError> {
    let kernel = args
        .kernel
        .as_ref()
        .ok_or_else(|| usage("one of --kernel, --restore or --incoming is required"))?;
    let memory = args
        .memory
        .as_deref()
        .ok_or_else(|| usage("--memory is required with --kernel (e.g. --memory 128M)"))?;
    // Kubernetes quantities (contracts::quantity); decimal sizes are rounded up to pages.
    let memory_bytes = contracts::quantity::parse(memory)
        .map_err(|e| usage(format!("--memory {e}")))?
        .div_ceil(4096)
        * 4096;
    let vcpus = contracts::limits::check_vcpus(u64::from(args.vcpus.unwrap_or(1)))
        .map_err(|e| usage(format!("--vcpus: {e}")))?;
    check_memory(memory_bytes)?;
    let machine_type =
        launcher::resolve_machine_type(args.machine_type.as_deref().unwrap_or("q35"))
            .map_err(usage)?;
    let config = VmConfig {
        memory_bytes,
        vcpus,
        machine_type: machine_type.to_string(),
        kernel: kernel.display().to_string(),
        initrd: args.initrd.as_ref().map(|p| p.display().to_string()),
        cmdline: args.cmdline.clone().unwrap_or_default(),
        disks: args
            .disk_args()
            .map_err(usage)?
            .iter()
            .map(launcher::cli::disk_config)
            .collect::<Result<_, _>>()
            .map_err(usage)?,
        nets: nets.into_iter().map(|(n, _)| n).collect(),
    };
    config.validate().map_err(|e| usage(e.to_string()))?;
    let files = runtime::read_boot_files(&config)?;
    let vm = Vm::boot(config, &files.0, files.1.as_deref(), serial.open()?)?;
    Ok((vm, files))
}

/// `--restore` and `--incoming` continue a VM whose configuration travels with it: the
/// options that only shape a new VM would be silently ignored, so refuse them.
fn refuse_inapplicable(args: &RunArgs) -> Result<(), LaunchError> {
    let from = match (&args.restore, &args.incoming) {
        (Some(_), _) => "--restore",
        (None, Some(_)) => "--incoming",
        (None, None) => return Ok(()),
    };
    let given: Vec<&str> = [
        ("--memory", args.memory.is_some()),
        ("--vcpus", args.vcpus.is_some()),
        ("--cmdline", args.cmdline.is_some()),
        ("--initrd", args.initrd.is_some()),
        ("--machine-type", args.machine_type.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if given.is_empty() {
        return Ok(());
    }
    Err(usage(format!(
        "{} cannot be used with {from}: the VM keeps the configuration it was created with (drop {})",
        given.join(", "),
        if given.len() == 1 { "it" } else { "them" }
    )))
}

/// Refuse memory sizes the host cannot back, before KVM or the kernel says something obscure.
fn check_memory(bytes: u64) -> Result<(), LaunchError> {
    contracts::limits::check_memory(bytes).map_err(|e| usage(format!("--memory: {e}")))?;
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
    let body = contracts::launcher::to_json(&contracts::launcher::SnapshotRequest {
        path: file.display().to_string(),
        stop,
    });
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
        let msg = serde_json::from_value::<contracts::launcher::ErrorReply>(reply)
            .map(|r| r.error)
            .unwrap_or_else(|e| format!("unreadable answer: {e}"));
        return Err(LaunchError::Api {
            path: api_socket.display().to_string(),
            why: format!("snapshot refused: {msg}"),
        });
    }
    let reply: contracts::launcher::SnapshotReply =
        serde_json::from_value(reply).map_err(|e| LaunchError::Api {
            path: api_socket.display().to_string(),
            why: format!("the launcher's answer is not a snapshot reply: {e}"),
        })?;
    let reply = contracts::launcher::to_json(&reply);
    println!("{reply}");
    Ok(0)
}
