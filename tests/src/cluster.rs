//! A cluster on one machine, for the cluster tests: a "switch" network namespace with a
//! bridge, a real 3-member etcd cluster (Debian's `etcd-server`) on addresses of that
//! bridge, and node "hosts" — one namespace each, joined to the bridge by a veth pair —
//! each running its own noded (in its namespace, so its launchers and migrations are
//! there too) with its own state directory, TLS identity and name.
//!
//! Addresses: 10.77.S.0/24 where S is the fabric's subnet (one per test, so tests can run
//! side by side); etcd members on .101–.103, nodes on .1, .2, .3 …
//! Nothing is configured outside the namespaces made here; all goes on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Netns;
use crate::node::Node;
use crate::tls_ca::Ca;
use crate::{TempDir, SAFETY};

/// One etcd member process.
struct Member {
    name: String,
    ip: String,
    child: Option<Child>,
}

/// The switch, the etcd members and the node hosts' namespaces.
pub struct Fabric {
    /// The subnet number S of 10.77.S.0/24.
    pub subnet: u8,
    dir: TempDir,
    data_root: PathBuf,
    members: Vec<Member>,
    /// Declared last: dropped after the members and nodes are gone.
    sw: Netns,
    hosts: Vec<Netns>,
    ca: Ca,
    tag: String,
}

/// Called first by every cluster test. They are compiled as ignored where `ip` or `etcd`
/// was missing at build time outside CI (`tests/tool_probe.rs`), so a test that runs
/// expects both: their absence is a failure that says what to install.
pub fn require_cluster_tools() {
    crate::netns::require_ip();
    assert!(
        etcd_available(),
        "the cluster tests need etcd (etcd-server); .ci/run installs it"
    );
}

/// The tails of noded's and the launchers' logs of `nodes`, for failure messages.
pub fn logs<'a>(nodes: impl IntoIterator<Item = &'a ClusterNode>) -> String {
    nodes
        .into_iter()
        .map(|x| {
            format!(
                "--- {}:\n{}\n{}",
                x.name,
                x.log_tail(80),
                x.launcher_logs(8)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// True when etcd (Debian `etcd-server`) is installed.
pub fn etcd_available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Fabric {
    /// A switch namespace with a bridge, and `members` etcd members started on it.
    pub fn new(tag: &str, subnet: u8, members: usize) -> Fabric {
        let sw = Netns::new(&format!("{tag}sw"));
        sw.ip("link add br0 type bridge");
        sw.ip(&format!("addr add 10.77.{subnet}.254/24 dev br0"));
        sw.ip("link set br0 up");
        let dir = TempDir::new(&format!("fabric-{tag}"));
        // etcd's write-ahead log on tmpfs: its fsyncs would otherwise make the members
        // miss heartbeats on a loaded 2-core machine.
        let shm = std::path::Path::new("/dev/shm");
        let data_root = if shm.is_dir() {
            let d = shm.join(format!("lvm-etcd-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("etcd data dir");
            d
        } else {
            dir.path().to_path_buf()
        };
        let mut f = Fabric {
            subnet,
            dir,
            data_root,
            members: Vec::new(),
            sw,
            hosts: Vec::new(),
            ca: Ca::new("cluster test CA"),
            tag: tag.to_string(),
        };
        for i in 0..members {
            let ip = format!("10.77.{subnet}.{}", 101 + i);
            f.sw.ip(&format!("addr add {ip}/24 dev br0"));
            f.members.push(Member {
                name: format!("m{}", i + 1),
                ip,
                child: None,
            });
        }
        for i in 0..members {
            f.start_member(i);
        }
        f.wait_healthy(members);
        f
    }

    /// `http://IP:2379,...` of every member.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{}:2379", m.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts, keeping its data) member `i`.
    pub fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:2380", m.name, m.ip))
            .collect();
        let m = &self.members[i];
        let data = self.data_root.join(format!("{}.etcd", m.name));
        let existing = data.exists();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(&format!("{}.log", m.name)))
            .expect("etcd log");
        // The control plane runs ahead of the guests' busy vCPUs, as it would on a real
        // host (a starved member misses heartbeats and the cluster re-elects).
        let child = self
            .sw
            .command("nice")
            .args(["-n", "-10", "etcd"])
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &format!("http://{}:2379", m.ip)])
            .args(["--advertise-client-urls", &format!("http://{}:2379", m.ip)])
            .args(["--listen-peer-urls", &format!("http://{}:2380", m.ip)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}:2380", m.ip),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-token", &format!("lvm-{}", self.tag)])
            .args([
                "--initial-cluster-state",
                if existing { "existing" } else { "new" },
            ])
            .args(["--heartbeat-interval", "200", "--election-timeout", "2000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd (apt-get install etcd-server)");
        self.members[i].child = Some(child);
    }

    /// SIGKILLs member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `n` members answer as healthy.
    pub fn wait_healthy(&self, n: usize) {
        let deadline = Instant::now() + SAFETY;
        loop {
            let healthy = self
                .members
                .iter()
                .filter(|m| {
                    self.sw
                        .command("etcdctl")
                        .args(["--endpoints", &format!("http://{}:2379", m.ip)])
                        .args(["--command-timeout=2s", "endpoint", "health"])
                        .env("ETCDCTL_API", "3")
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
                .count();
            if healthy >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy ({healthy} of {n} members):\n{}",
                self.member_logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn member_logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let t = std::fs::read_to_string(self.dir.join(&format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                format!(
                    "--- {}:\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A new host namespace joined to the switch, with address 10.77.S.`index`.
    pub fn host(&mut self, index: u8) -> (String, String) {
        let ns = Netns::new(&format!("{}h{index}", self.tag));
        let port = format!("p{}h{index}", self.tag);
        ns.ip(&format!(
            "link add eth0 type veth peer name {port} netns {}",
            self.sw.name()
        ));
        self.sw.ip(&format!("link set {port} master br0"));
        self.sw.ip(&format!("link set {port} up"));
        let ip = format!("10.77.{}.{index}", self.subnet);
        ns.ip(&format!("addr add {ip}/24 dev eth0"));
        ns.ip("link set eth0 up");
        let name = ns.name().to_string();
        self.hosts.push(ns);
        (name, ip)
    }

    /// Cuts host `index`'s link to the switch (its noded, launchers and guests go on,
    /// alone), or restores it.
    pub fn set_link(&self, index: u8, up: bool) {
        let port = format!("p{}h{index}", self.tag);
        self.sw.ip(&format!(
            "link set {port} {}",
            if up { "up" } else { "down" }
        ));
    }

    /// Starts a cluster node on a new host: its TLS identity, then noded with
    /// `--cluster-endpoints` and the given memory capacity, and `launcher` installed.
    pub fn node(
        &mut self,
        name: &str,
        index: u8,
        capacity: &str,
        launcher: &std::path::Path,
    ) -> ClusterNode {
        let (ns, ip) = self.host(index);
        let tls = self.dir.join(&format!("tls-{name}"));
        let tls = self.ca.tls_dir(&tls, &[&ip]);
        let args = vec![
            "--cluster-endpoints".to_string(),
            self.endpoints(),
            "--node-name".into(),
            name.into(),
            "--migration-address".into(),
            format!("{ip}:4800"),
            "--tls-dir".into(),
            tls,
            "--lease-ttl".into(),
            "5".into(),
            "--capacity-memory".into(),
            capacity.into(),
            // Memory is the limit these tests exercise; vCPUs never are.
            "--capacity-vcpus".into(),
            "256".into(),
        ];
        let node = Node::start_in(name, "{}\n", &ns, &args);
        node.install(launcher);
        // Joined once its node object (under its lease) is in etcd.
        node.wait_until(&format!("{name} in the node list"), || {
            let list = node.try_ctl(&["node", "list"]).ok()?;
            list.as_array()?
                .iter()
                .any(|n| n["name"] == name && n["status"] == "Ready")
                .then_some(())
        });
        ClusterNode {
            node,
            name: name.to_string(),
            ip,
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        if self.data_root.starts_with("/dev/shm") {
            let _ = std::fs::remove_dir_all(&self.data_root);
        }
    }
}

/// A noded joined to the cluster, on its own host namespace.
pub struct ClusterNode {
    /// The node (its nodectl, state and logs).
    pub node: Node,
    /// Node name.
    pub name: String,
    /// Its address.
    pub ip: String,
}

impl ClusterNode {
    /// `nodectl cluster vms` as a map name → row.
    pub fn cluster_vms(&self) -> Vec<Value> {
        self.node
            .ctl(&["cluster", "vms"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The cluster row of one VM.
    pub fn cluster_vm(&self, name: &str) -> Option<Value> {
        self.cluster_vms().into_iter().find(|v| v["name"] == name)
    }

    /// The tail of noded's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.node.log();
        let v: Vec<&str> = log.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// The cluster row of one VM, or `None` (also when this node does not answer).
    pub fn try_cluster_vm(&self, name: &str) -> Option<Value> {
        self.node
            .try_ctl(&["cluster", "vms"])
            .ok()?
            .as_array()?
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
    }

    /// The cluster's migration records, oldest first (empty when this node does not
    /// answer).
    pub fn try_migrations(&self) -> Vec<Value> {
        self.node
            .try_ctl(&["cluster", "migrations"])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The last lines of every launcher log of this node (for failure messages).
    pub fn launcher_logs(&self, lines: usize) -> String {
        let mut out = String::new();
        let Ok(vms) = std::fs::read_dir(self.node.state().join("vms")) else {
            return out;
        };
        for vm in vms.flatten() {
            let Ok(files) = std::fs::read_dir(vm.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().to_string();
                if !(name.starts_with("launcher-") && name.ends_with(".log")) {
                    continue;
                }
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                let v: Vec<&str> = text.lines().collect();
                out.push_str(&format!(
                    "  [{}/{name}]\n  {}\n",
                    vm.file_name().to_string_lossy(),
                    v[v.len().saturating_sub(lines)..].join("\n  ")
                ));
            }
        }
        out
    }

    /// Waits until `f` holds for the cluster's VM list.
    pub fn wait_cluster(&self, what: &str, mut f: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
        self.node.wait_until(what, || {
            let vms = self.node.try_ctl(&["cluster", "vms"]).ok()?;
            let vms = vms.as_array()?.clone();
            f(&vms).then_some(vms)
        })
    }

    /// Waits until the cluster keeps at least `n` migration records; returns them.
    pub fn wait_until_records(&self, n: usize) -> Vec<Value> {
        self.node.wait_until(&format!("{n} migration records"), || {
            let recs = self.node.try_ctl(&["cluster", "migrations"]).ok()?;
            let a = recs.as_array()?.clone();
            (a.len() >= n).then_some(a)
        })
    }

    /// `nodectl cluster status`.
    pub fn status(&self) -> Value {
        self.node.ctl(&["cluster", "status"])
    }
}
