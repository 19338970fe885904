//! The API requests the reconciliation loop answers, and the views it builds from its
//! state. Handlers only record intent (a new state, written first); the loop's next
//! reconciliation acts on it.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::coordinator::{StopCause, VmState, VmStatus};
use super::daemon::{Daemon, Vm, MAX_SOCKET_PATH};
use super::launchers::{commit_install, Capabilities, InstalledLauncher};
use super::metrics::{render, Gauges};
use super::settings::{ApprovalStrategy, WorkloadUpdateMethod};
use super::spec::{parse_spec, resolve_machine_type, RunStrategy};
use super::store::VmRow;
use super::views::{now_ms, rfc3339, Condition, LauncherView, MigrationView, NodeStatus, VmView};

/// A request to the loop.
#[derive(Debug)]
pub enum Req {
    /// `GET /v1/status`.
    Status,
    /// `GET /v1/vms`.
    ListVms,
    /// `GET /v1/vms/{name}`.
    GetVm(String),
    /// `POST /v1/vms` with a spec.
    CreateVm(Value),
    /// `PUT /v1/vms/{name}/start`.
    StartVm(String),
    /// `PUT /v1/vms/{name}/stop`.
    StopVm(String),
    /// `DELETE /v1/vms/{name}`.
    DeleteVm(String),
    /// `GET /v1/vms/{name}/migrations`.
    Migrations(String),
    /// `GET /v1/launchers`.
    ListLaunchers,
    /// `POST /v1/launchers`, after the API task staged and probed the copy.
    RegisterLauncher {
        /// What the copy reported.
        caps: Capabilities,
        /// The staged copy.
        staged: PathBuf,
    },
    /// `PUT /v1/update/approve`.
    Approve,
    /// `GET /v1/config`.
    GetConfig,
    /// `PUT /v1/config` with a partial settings document.
    SetConfig(Value),
    /// `GET /metrics`.
    Metrics,
}

/// A reply body.
#[derive(Debug)]
pub enum Body {
    /// JSON.
    Json(Value),
    /// Plain text (metrics).
    Text(String),
}

/// A reply.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Body,
}

fn ok(v: Value) -> Reply {
    Reply {
        status: 200,
        body: Body::Json(v),
    }
}

/// An error reply `{"error": message}`.
pub fn err(status: u16, message: impl std::fmt::Display) -> Reply {
    Reply {
        status,
        body: Body::Json(json!({ "error": message.to_string() })),
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn not_found(name: &str) -> Reply {
    err(404, format!("VM {name} not found"))
}

/// A human sentence for why a VM is stopped.
fn stop_message(cause: &StopCause, strategy: RunStrategy) -> String {
    match cause {
        StopCause::NotStarted => {
            format!("not started (runStrategy {strategy:?}; nodectl vm start)")
        }
        StopCause::UserStop => "stopped by the user".into(),
        StopCause::PowerOff => {
            format!("guest powered off (runStrategy {strategy:?} keeps it stopped)")
        }
        StopCause::Failed(why) => {
            format!("launcher failed: {why} (runStrategy {strategy:?} keeps it stopped)")
        }
        StopCause::Evicted => {
            format!("evicted for an update (runStrategy {strategy:?} keeps it stopped)")
        }
        StopCause::MigratedAway => {
            "migrated away outside noded (exit 64); not restarted here".into()
        }
        StopCause::StartFailed(why) => format!("could not start: {why}"),
    }
}

impl Daemon {
    /// Answers one request.
    pub fn handle(&mut self, req: Req) -> Reply {
        match req {
            Req::Status => ok(to_value(&self.node_status())),
            Req::ListVms => {
                let plan = self.plan(now_ms());
                ok(Value::Array(
                    self.vms
                        .values()
                        .map(|v| to_value(&self.view(v, &plan, false)))
                        .collect(),
                ))
            }
            Req::GetVm(name) => match self.vms.get(&name) {
                Some(v) => ok(to_value(&self.view(v, &self.plan(now_ms()), true))),
                None => not_found(&name),
            },
            Req::CreateVm(spec) => self.create_vm(&spec),
            Req::StartVm(name) => self.start_request(&name),
            Req::StopVm(name) => self.stop_request(&name, false),
            Req::DeleteVm(name) => self.stop_request(&name, true),
            Req::Migrations(name) => {
                if !self.vms.contains_key(&name) {
                    return not_found(&name);
                }
                match self.store.migrations(&name) {
                    Ok(recs) => ok(Value::Array(
                        recs.iter()
                            .map(|r| to_value(&MigrationView::from(r)))
                            .collect(),
                    )),
                    Err(e) => err(500, e),
                }
            }
            Req::ListLaunchers => ok(Value::Array(
                self.launchers
                    .iter()
                    .rev()
                    .map(|l| to_value(&self.launcher_view(l)))
                    .collect(),
            )),
            Req::RegisterLauncher { caps, staged } => self.register_launcher(caps, staged),
            Req::Approve => self.approve(),
            Req::GetConfig => ok(self.settings.to_json()),
            Req::SetConfig(patch) => self.set_config(patch),
            Req::Metrics => Reply {
                status: 200,
                body: Body::Text(self.metrics()),
            },
        }
    }

    pub(crate) fn view(&self, vm: &Vm, plan: &super::coordinator::Plan, with_spec: bool) -> VmView {
        let now = now_ms();
        let verdict = plan
            .verdicts
            .get(&vm.spec.name)
            .cloned()
            .unwrap_or_default();
        let m = vm.spec.migratability();
        let message = match &vm.status.state {
            VmState::Stopped { cause } => Some(stop_message(cause, vm.spec.run_strategy)),
            _ => vm.status.last_error.clone(),
        };
        VmView {
            name: vm.spec.name.clone(),
            phase: vm.status.state.phase(now).to_string(),
            launcher_version: if vm.status.state.has_launcher() {
                vm.status.launcher_version.clone()
            } else {
                None
            },
            outdated: verdict.outdated,
            migratable: m.migratable,
            reason: verdict.reason,
            machine_type: vm.spec.machine_type.clone(),
            run_strategy: format!("{:?}", vm.spec.run_strategy),
            serial_log: vm.serial_log.display().to_string(),
            migratable_reason: m.reason,
            message,
            pid: if vm.status.state.has_launcher() {
                vm.status.pid
            } else {
                None
            },
            created_at: rfc3339(vm.created_at),
            spec: with_spec.then(|| vm.spec.clone()),
        }
    }

    fn launcher_view(&self, l: &InstalledLauncher) -> LauncherView {
        LauncherView {
            version: l.version.clone(),
            path: l.path.clone(),
            installed_at: rfc3339(l.installed_at),
            machine_types: l.capabilities.machine_types.clone(),
            target: self
                .newest()
                .map(|n| n.version == l.version)
                .unwrap_or(false),
            approved: self
                .effective()
                .map(|n| n.version == l.version)
                .unwrap_or(false),
            capabilities: to_value(&l.capabilities),
        }
    }

    fn create_vm(&mut self, value: &Value) -> Reply {
        let mut spec = match parse_spec(value) {
            Ok(s) => s,
            Err(e) => return err(400, e),
        };
        if self.vms.contains_key(&spec.name) {
            return err(409, format!("VM {} already exists", spec.name));
        }
        let Some(target) = self.effective() else {
            return err(
                409,
                "no launcher installed: run `nodectl launcher install --path PATH` first",
            );
        };
        spec.machine_type =
            match resolve_machine_type(&spec.machine_type, &target.capabilities.machine_types) {
                Ok(m) => m,
                Err(e) => return err(400, e),
            };
        let dir = self.vm_dir(&spec.name);
        if dir.join("migrate-999999.sock").as_os_str().len() > MAX_SOCKET_PATH {
            return err(
                400,
                "the state directory path is too long for the VM's unix sockets",
            );
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return err(500, format!("{}: {e}", dir.display()));
        }
        let now = now_ms();
        let row = VmRow {
            status: VmStatus::new(&spec, now),
            serial_log: dir.join("console.log").display().to_string(),
            created_at: now,
            spec,
        };
        if let Err(e) = self.store.insert_vm(&row) {
            return err(500, e);
        }
        tracing::info!(vm = %row.spec.name, machine_type = %row.spec.machine_type, "VM created");
        let name = row.spec.name.clone();
        self.vms.insert(
            name.clone(),
            Vm {
                spec: row.spec,
                status: row.status,
                serial_log: PathBuf::from(row.serial_log),
                created_at: row.created_at,
                launched_at: now,
                source_exit: None,
                target_exit: None,
            },
        );
        let plan = self.plan(now);
        match self.vms.get(&name) {
            Some(vm) => Reply {
                status: 201,
                body: Body::Json(to_value(&self.view(vm, &plan, true))),
            },
            None => err(500, "VM vanished"),
        }
    }

    fn start_request(&mut self, name: &str) -> Reply {
        let now = now_ms();
        let Some(vm) = self.vms.get_mut(name) else {
            return not_found(name);
        };
        if let VmState::Stopped { .. } = vm.status.state {
            if vm.spec.run_strategy == RunStrategy::Halted {
                // As `virtctl start` does: a started Halted VM becomes Always.
                vm.spec.run_strategy = RunStrategy::Always;
                if let Err(e) = self.store.update_spec(&vm.spec) {
                    return err(500, e);
                }
            }
            vm.status.state = VmState::Starting {
                not_before: now,
                after_eviction: false,
            };
            vm.status.crash_restarts = 0;
            vm.status.last_error = None;
            if !self.persist(name) {
                return err(500, "cannot record the state");
            }
        }
        self.handle(Req::GetVm(name.to_string()))
    }

    fn stop_request(&mut self, name: &str, delete: bool) -> Reply {
        let now = now_ms();
        let Some(vm) = self.vms.get_mut(name) else {
            return not_found(name);
        };
        match &vm.status.state {
            VmState::Migrating { .. } => {
                return err(
                    409,
                    format!("VM {name} is migrating; retry when the migration has ended"),
                )
            }
            VmState::Stopped { .. } | VmState::Starting { .. } => {
                if delete {
                    self.remove_vm(name);
                    return ok(json!({ "deleted": name }));
                }
                vm.status.state = VmState::Stopped {
                    cause: StopCause::UserStop,
                };
            }
            VmState::Stopping { .. } => {
                vm.status.state = VmState::Stopping { since: now, delete };
            }
            VmState::Running { .. } | VmState::Backoff { .. } | VmState::Evicting { .. } => {
                let was_evicting = matches!(vm.status.state, VmState::Evicting { .. });
                vm.status.state = VmState::Stopping { since: now, delete };
                let grace =
                    std::time::Duration::from_secs(vm.spec.termination_grace_period_seconds);
                let target = vm.status.api_socket.clone().zip(vm.status.pid);
                if !self.persist(name) {
                    return err(500, "cannot record the state");
                }
                if let (Some((sock, pid)), false) = (target, was_evicting) {
                    super::supervisor::shutdown(PathBuf::from(sock), pid, grace);
                }
                if delete {
                    return Reply {
                        status: 202,
                        body: Body::Json(json!({ "deleting": name })),
                    };
                }
                return self.handle(Req::GetVm(name.to_string()));
            }
        }
        if !self.persist(name) {
            return err(500, "cannot record the state");
        }
        self.handle(Req::GetVm(name.to_string()))
    }

    fn register_launcher(&mut self, caps: Capabilities, staged: PathBuf) -> Reply {
        if self.launcher(&caps.version).is_some() {
            let _ = std::fs::remove_file(&staged);
            return err(
                409,
                format!("launcher {} is already installed", caps.version),
            );
        }
        let dest = match commit_install(&staged, &self.dir.join("launchers"), &caps.version) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return err(500, e);
            }
        };
        let l = InstalledLauncher {
            version: caps.version.clone(),
            path: dest.display().to_string(),
            installed_at: now_ms(),
            capabilities: caps,
        };
        if let Err(e) = self.store.insert_launcher(&l) {
            return err(500, e);
        }
        self.launchers.push(l.clone());
        self.launchers
            .sort_by(|a, b| super::launchers::compare_versions(&a.version, &b.version));
        // The first launcher needs no approval: there is nothing to update from.
        if self.settings.approval_strategy == ApprovalStrategy::Automatic || self.approved.is_none()
        {
            self.set_approved();
        }
        tracing::info!(version = %l.version, path = %l.path, pending = self.approval_pending(), "launcher installed");
        Reply {
            status: 201,
            body: Body::Json(to_value(&self.launcher_view(&l))),
        }
    }

    fn set_approved(&mut self) {
        let newest = self.newest().map(|l| l.version.clone());
        if let Some(v) = newest {
            if let Err(e) = self.store.set("approved", &v) {
                tracing::error!(error = %e, "cannot record approval");
                return;
            }
            self.approved = Some(v);
        }
    }

    fn approve(&mut self) -> Reply {
        if !self.approval_pending() {
            let mut s = to_value(&self.node_status());
            s["message"] = Value::from("nothing waits for approval");
            return ok(s);
        }
        self.set_approved();
        tracing::info!(version = ?self.approved, "update approved");
        ok(to_value(&self.node_status()))
    }

    fn set_config(&mut self, patch: Value) -> Reply {
        let new = match super::settings::apply(&self.settings, patch) {
            Ok(s) => s,
            Err(e) => return err(400, e),
        };
        if let Err(e) = self.store.set("settings", &new) {
            return err(500, e);
        }
        let to_automatic = new.approval_strategy == ApprovalStrategy::Automatic
            && self.settings.approval_strategy == ApprovalStrategy::Manual;
        self.settings = new;
        if to_automatic {
            self.set_approved();
        }
        tracing::info!(settings = %self.settings.to_json(), "settings changed");
        ok(self.settings.to_json())
    }

    pub(crate) fn node_status(&self) -> NodeStatus {
        let now = now_ms();
        let plan = self.plan(now);
        let outdated: Vec<&String> = plan
            .verdicts
            .iter()
            .filter(|(_, v)| v.outdated)
            .map(|(n, _)| n)
            .collect();
        let count =
            |f: &dyn Fn(&VmState) -> bool| self.vms.values().filter(|v| f(&v.status.state)).count();
        let migrating = count(&|s| matches!(s, VmState::Migrating { .. }));
        let evicting = count(&|s| matches!(s, VmState::Evicting { .. }));
        let failing: Vec<&str> = self
            .vms
            .values()
            .filter(|v| match &v.status.state {
                VmState::Stopped {
                    cause: StopCause::Failed(_) | StopCause::StartFailed(_),
                } => true,
                VmState::Starting { not_before, .. } => *not_before > now,
                VmState::Backoff { .. } => true,
                _ => false,
            })
            .map(|v| v.spec.name.as_str())
            .collect();
        let blocked: Vec<String> = plan
            .verdicts
            .iter()
            .filter(|(_, v)| {
                v.outdated
                    && v.reason.as_deref().is_some_and(|r| {
                        r.contains("Evict is not enabled")
                            || r.contains("refuses eviction")
                            || r.contains("does not offer")
                    })
            })
            .map(|(n, v)| format!("{n}: {}", v.reason.as_deref().unwrap_or("")))
            .collect();
        let methods_empty = self
            .settings
            .workload_update_strategy
            .workload_update_methods
            .is_empty();
        let mut conditions = Vec::new();
        conditions.push(match self.newest() {
            Some(l) => Condition::new(
                "Available",
                true,
                "LauncherInstalled",
                format!("launcher {} installed", l.version),
            ),
            None => Condition::new(
                "Available",
                false,
                "NoLauncherInstalled",
                "install one with nodectl launcher install --path PATH",
            ),
        });
        conditions.push(if migrating + evicting > 0 {
            Condition::new(
                "Progressing",
                true,
                "UpdatingWorkloads",
                format!(
                    "{migrating} migrating, {evicting} evicting, {} outdated",
                    outdated.len()
                ),
            )
        } else if outdated.is_empty() {
            Condition::new(
                "Progressing",
                false,
                "UpToDate",
                "every VM runs the target launcher",
            )
        } else if self.approval_pending() {
            Condition::new(
                "Progressing",
                false,
                "WaitingForApproval",
                "run nodectl update approve",
            )
        } else if methods_empty {
            Condition::new(
                "Progressing",
                false,
                "WorkloadUpdatesDisabled",
                "workloadUpdateMethods is empty",
            )
        } else if blocked.len() == outdated.len() {
            Condition::new(
                "Progressing",
                false,
                "OutdatedWorkloadsBlocked",
                "every outdated VM is blocked; see Upgradeable",
            )
        } else {
            Condition::new(
                "Progressing",
                true,
                "UpdatingWorkloads",
                format!("{} outdated", outdated.len()),
            )
        });
        conditions.push(if failing.is_empty() {
            Condition::new("Degraded", false, "AsExpected", "")
        } else {
            Condition::new(
                "Degraded",
                true,
                "VMsFailing",
                format!("failing or retrying: {}", failing.join(", ")),
            )
        });
        conditions.push(if blocked.is_empty() {
            Condition::new("Upgradeable", true, "AsExpected", "")
        } else {
            Condition::new(
                "Upgradeable",
                false,
                "OutdatedWorkloadsBlocked",
                blocked.join("; "),
            )
        });
        NodeStatus {
            target_launcher_version: self.newest().map(|l| l.version.clone()),
            approval_pending: self.approval_pending(),
            approved_launcher_version: self.effective().map(|l| l.version.clone()),
            outdated_virtual_machine_instance_workloads: outdated.len(),
            conditions,
            virtual_machines: self.vms.len(),
            approval_strategy: format!("{:?}", self.settings.approval_strategy),
            workload_update_methods: self
                .settings
                .workload_update_strategy
                .workload_update_methods
                .iter()
                .map(|m| match m {
                    WorkloadUpdateMethod::LiveMigrate => "LiveMigrate".to_string(),
                    WorkloadUpdateMethod::Evict => "Evict".to_string(),
                })
                .collect(),
        }
    }

    fn metrics(&self) -> String {
        let now = now_ms();
        let plan = self.plan(now);
        let mut g = Gauges {
            outdated: plan.verdicts.values().filter(|v| v.outdated).count(),
            launchers: self.launchers.len(),
            approval_pending: self.approval_pending(),
            ..Default::default()
        };
        for v in self.vms.values() {
            *g.phases
                .entry(v.status.state.phase(now).to_string())
                .or_default() += 1;
        }
        render(&self.counters, &g)
    }
}
