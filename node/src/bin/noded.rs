//! `noded`: the node daemon. Keeps the VMs it is given running, one launcher process per
//! VM, and moves them to newly installed launcher versions (see docs/update-flow.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use node::daemon::{run, Options};

#[derive(Parser)]
#[command(name = "noded", version = env!("CARGO_PKG_VERSION"), about = "Node daemon and launcher update coordinator")]
struct Cli {
    /// State directory (database, installed launchers, VM logs and sockets).
    #[arg(long)]
    state_dir: PathBuf,
    /// API socket [default: STATE_DIR/noded.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Settings file (YAML or JSON), merged over the stored settings at startup.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Join an etcd cluster: its members' client URLs, comma-separated
    /// (http://A:2379,http://B:2379,http://C:2379). Without it noded is a single node.
    #[arg(long, value_delimiter = ',')]
    cluster_endpoints: Vec<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long)]
    node_name: Option<String>,
    /// IP:PORT where VMs migrating to this node from other nodes arrive (ports from
    /// PORT up); peers must reach this IP.
    #[arg(long)]
    migration_address: Option<std::net::SocketAddr>,
    /// ca.pem, cert.pem and key.pem for mutual TLS between launchers of different nodes.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Node lease TTL in seconds: a node that stops renewing it for this long is NotReady.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// Memory offered to VMs [default: the host's MemTotal], as a quantity (16Gi).
    #[arg(long)]
    capacity_memory: Option<String>,
    /// vCPUs offered to VMs [default: 10 × host CPUs, KubeVirt's cpuAllocationRatio].
    #[arg(long)]
    capacity_vcpus: Option<u32>,
    /// Also serve GET /metrics over TCP on this address (e.g. 127.0.0.1:9464), for
    /// Prometheus; the API socket serves it too.
    #[arg(long, value_name = "IP:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Log format on stderr: text, or json (one object per line).
    #[arg(long, value_enum, env = "NODED_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn cluster_options(cli: &Cli) -> Result<Option<node::cluster::ClusterOptions>, String> {
    if cli.cluster_endpoints.is_empty() {
        for (set, flag) in [
            (cli.node_name.is_some(), "--node-name"),
            (cli.migration_address.is_some(), "--migration-address"),
            (cli.tls_dir.is_some(), "--tls-dir"),
        ] {
            if set {
                return Err(format!("{flag} only applies with --cluster-endpoints"));
            }
        }
        return Ok(None);
    }
    let node_name = match &cli.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| format!("--node-name not given and no host name: {e}"))?
            .trim()
            .to_lowercase(),
    };
    let migration_address = cli
        .migration_address
        .ok_or("--migration-address IP:PORT is required in a cluster (where peers send VMs)")?;
    let tls_dir = cli
        .tls_dir
        .clone()
        .ok_or("--tls-dir DIR is required in a cluster (mutual TLS between nodes)")?;
    let memory_total = match &cli.capacity_memory {
        Some(q) => node::spec::parse_quantity(q).map_err(|e| format!("--capacity-memory {e}"))?,
        None => host_memory(),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let opts = node::cluster::ClusterOptions {
        node_name,
        endpoints: cli.cluster_endpoints.clone(),
        migration_address,
        tls_dir,
        lease_ttl: cli.lease_ttl,
        memory_total,
        vcpus_total: cli.capacity_vcpus.unwrap_or(cpus * 10),
        watchdog_file: None,
        state_dir: None,
    };
    opts.validate().map_err(|e| e.to_string())?;
    Ok(Some(opts))
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("NODED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => fmt.json().flatten_event(true).init(),
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let state_dir = match std::path::absolute(&cli.state_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("noded: {}: {e}", cli.state_dir.display());
            return ExitCode::from(1);
        }
    };
    let cluster = match cluster_options(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("noded: {e}");
            return ExitCode::from(2);
        }
    };
    let socket = cli.socket.unwrap_or_else(|| state_dir.join("noded.sock"));
    let opts = Options {
        state_dir,
        socket,
        config: cli.config,
        cluster,
        metrics_address: cli.metrics_address,
    };
    node::block_on_main(
        "noded",
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
        run(opts),
    )
}
