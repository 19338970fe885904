//! Checks made before noded acts on a request, and `?dryRun=true`: the answer a
//! request would get, computed by the same code, with nothing stored.

use serde_json::Value;

use super::coordinator::VmStatus;
use super::daemon::{Daemon, Vm};
use super::requests::{err, Body, Reply};
use super::spec::VmSpec;
use super::views::now_ms;

/// Which files a spec names that do not exist here (kernel, disks), as far as noded
/// can tell; a launcher would fail on them at start.
pub(crate) fn missing_files(spec: &VmSpec) -> Option<String> {
    let mut missing = Vec::new();
    let mut check = |what: &str, path: &str| match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => missing.push(format!("{what} {path} is a directory")),
        Ok(_) => {}
        Err(e) => missing.push(format!("{what} {path}: {e}")),
    };
    check("kernel", &spec.kernel);
    for d in &spec.disks {
        check(&format!("disk {}", d.name), &d.path);
    }
    (!missing.is_empty()).then(|| {
        format!(
            "invalid spec: {} (paths are read on this node)",
            missing.join("; ")
        )
    })
}

impl Daemon {
    /// The view a VM would have if `spec` were created now (for `--dry-run`).
    pub(crate) fn dry_run_view(&mut self, spec: VmSpec, status: u16) -> Reply {
        let now = now_ms();
        let name = spec.name.clone();
        let serial_log = self.vm_dir(&name).join("console.log");
        self.vms.insert(
            name.clone(),
            Vm {
                status: VmStatus::new(&spec, now),
                spec,
                serial_log,
                created_at: now,
                launched_at: now,
                source_exit: None,
                target_exit: None,
            },
        );
        let plan = self.plan(now);
        let reply = match self.vms.get(&name) {
            Some(vm) => {
                let mut v = serde_json::to_value(self.view(vm, &plan, true)).unwrap_or(Value::Null);
                v["dryRun"] = Value::Bool(true);
                Reply {
                    status,
                    body: Body::Json(v),
                }
            }
            None => err(500, "VM vanished"),
        };
        self.vms.remove(&name);
        reply
    }
}
