//! The API requests the reconciliation loop answers, and the views it builds from its
//! state. Handlers only record intent (a new state, written first); the loop's next
//! reconciliation acts on it.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::coordinator::{StopCause, VmState, VmStatus};
use super::daemon::{Daemon, Vm, MAX_SOCKET_PATH};
use super::launchers::{commit_install, Capabilities, Channel, InstalledLauncher};
use super::settings::ApprovalStrategy;
use super::spec::{parse_spec, resolve_machine_type, RunStrategy, SpecError, VmSpec};
use super::store::VmRow;
use super::views::{now_ms, rfc3339, LauncherView, MigrationView, VmView};

/// A request to the loop.
#[derive(Debug)]
pub enum Req {
    /// `GET /v1/status`.
    Status,
    /// `GET /v1/vms`.
    ListVms,
    /// `GET /v1/vms/{name}`.
    GetVm(String),
    /// `POST /v1/vms` with a spec; `true`: dry run (validate, answer, store nothing).
    CreateVm(Value, bool),
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
    /// `PUT /v1/vms/{name}` with a full spec: applied at once to a stopped VM, and to
    /// a running one as far as it can be (the rest is pending until the next restart).
    UpdateVm(String, Value, bool),
    /// `POST /v1/launchers`, after the API task staged and probed the copy.
    RegisterLauncher {
        /// What the copy reported.
        caps: Capabilities,
        /// The staged copy.
        staged: PathBuf,
        /// The channel it is installed on.
        channel: Channel,
        /// Install even if it drops a machine type in use.
        force: bool,
    },
    /// `PUT /v1/update/approve`.
    Approve,
    /// `GET /v1/config`.
    GetConfig,
    /// `PUT /v1/config` with a partial settings document (and the dry-run flag).
    SetConfig(Value, bool),
    /// `GET /v1/vms/{name}/events`.
    Events(String),
    /// `PUT /v1/vms/{name}/resolve-handover` with `{"outcome": ...}`.
    ResolveHandover(String, Value),
    /// `GET /metrics`.
    Metrics,
    /// `POST /v1/vms/receive`: `{"spec", "listen", "tlsDir"}` (see remote.rs).
    Receive(Value),
    /// `PUT /v1/vms/{name}/migrate`: `{"to", "tlsDir", "tlsServerName"}` (see remote.rs).
    MigrateOut(String, Value),
}

impl Req {
    /// Whether answering changes nothing (watchers are not woken for these).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Req::Status
                | Req::ListVms
                | Req::GetVm(_)
                | Req::Migrations(_)
                | Req::Events(_)
                | Req::ListLaunchers
                | Req::GetConfig
                | Req::Metrics
                | Req::CreateVm(_, true)
                | Req::UpdateVm(_, _, true)
                | Req::SetConfig(_, true)
        )
    }
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

pub(crate) fn not_found(name: &str) -> Reply {
    err(404, format!("VM {name} not found"))
}

/// Refuses a body that is not an object or has a field outside `allowed`.
pub(crate) fn only_fields(body: &Value, allowed: &[&str]) -> Result<(), Reply> {
    let Some(obj) = body.as_object() else {
        return Err(err(400, "body must be a JSON object"));
    };
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(err(
            400,
            format!("unknown field {k:?} (allowed: {})", allowed.join(", ")),
        )),
        None => Ok(()),
    }
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
        StopCause::MovedAway(to) => {
            format!("moved to another node ({to}); not restarted here (nodectl vm delete)")
        }
        StopCause::ReceiveFailed(why) => format!(
            "incoming migration failed: {why}; the VM still runs on the source node (nodectl vm delete)"
        ),
        StopCause::Fenced(why) => format!(
            "killed when this node fenced itself ({why}); the cluster restarts it as its runStrategy says"
        ),
    }
}

impl Daemon {
    /// Answers one request.
    pub fn handle(&mut self, req: Req) -> Reply {
        if let Some(why) = &self.fenced {
            if matches!(req, Req::StartVm(_) | Req::Receive(_) | Req::MigrateOut(..)) {
                return err(
                    409,
                    format!("this node fenced itself ({why}); it starts nothing until it has rejoined the cluster"),
                );
            }
        }
        match req {
            Req::Status => {
                let mut v = to_value(&self.node_status());
                if let Some(c) = &self.cluster_status {
                    v["cluster"] = c.clone();
                }
                ok(v)
            }
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
            Req::CreateVm(spec, dry_run) => self.create_vm(&spec, dry_run),
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
            Req::UpdateVm(name, spec, dry_run) => self.update_vm(&name, &spec, dry_run),
            Req::RegisterLauncher {
                caps,
                staged,
                channel,
                force,
            } => self.register_launcher(caps, staged, channel, force),
            Req::Approve => self.approve(),
            Req::GetConfig => ok(self.settings.to_json()),
            Req::SetConfig(patch, dry_run) => self.set_config(patch, dry_run),
            Req::Events(name) => match self.store.events(&name) {
                Ok(_) if !self.vms.contains_key(&name) => not_found(&name),
                Ok(evs) => ok(Value::Array(evs.iter().map(|(_, e)| to_value(e)).collect())),
                Err(e) => err(500, e),
            },
            Req::Metrics => Reply {
                status: 200,
                body: Body::Text(self.metrics()),
            },
            Req::Receive(body) => self.receive_request(&body),
            Req::MigrateOut(name, body) => self.migrate_out_request(&name, &body),
            Req::ResolveHandover(name, body) => self.resolve_handover_request(&name, &body),
        }
    }

    /// The VM `name` in full (its view with the spec), with `status`.
    pub(crate) fn vm_reply(&self, name: &str, status: u16) -> Reply {
        match self.vms.get(name) {
            Some(vm) => Reply {
                status,
                body: Body::Json(to_value(&self.view(vm, &self.plan(now_ms()), true))),
            },
            None => err(500, "VM vanished"),
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
        let mut view = VmView {
            conditions: Vec::new(),
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
            migratable_reason: m.reason.clone(),
            message,
            pid: if vm.status.state.has_launcher() {
                vm.status.pid
            } else {
                None
            },
            created_at: rfc3339(vm.created_at),
            restart_required: vm.status.pending.is_some(),
            pending_changes: vm
                .status
                .pending
                .as_ref()
                .map(|p| {
                    vm.spec
                        .restart_changes(p)
                        .into_iter()
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            pending_machine_type: vm
                .status
                .pending
                .as_ref()
                .filter(|p| p.machine_type != vm.spec.machine_type)
                .map(|p| p.machine_type.clone()),
            cross_host_migratable: m.cross_host_reason.is_none(),
            cross_host_reason: m.cross_host_reason,
            spec: with_spec.then(|| vm.spec.clone()),
            pending_spec: if with_spec {
                vm.status.pending.clone()
            } else {
                None
            },
        };
        if with_spec {
            let events = self.store.events(&vm.spec.name).unwrap_or_default();
            view.conditions = super::events::vm_conditions(&view, vm.created_at, &events);
        }
        view
    }

    fn launcher_view(&self, l: &InstalledLauncher) -> LauncherView {
        LauncherView {
            version: l.version.clone(),
            path: l.path.clone(),
            installed_at: rfc3339(l.installed_at),
            machine_types: l.capabilities.machine_types.clone(),
            channel: l.channel.as_str().to_string(),
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

    /// The checks every new VM's spec passes on this node, for `vm create` and for a VM
    /// received from another node: a valid spec with a new name, MACs assigned (a spec
    /// that carries them keeps them), no interface conflict, a launcher installed that
    /// offers the machine type, and socket paths that fit. Returns the spec with its
    /// machine type resolved, and the launcher that will run it.
    pub(crate) fn admit_new_vm(&self, value: &Value) -> Result<(VmSpec, InstalledLauncher), Reply> {
        let mut spec = parse_spec(value).map_err(|e| err(400, e))?;
        if self.vms.contains_key(&spec.name) {
            return Err(err(409, format!("VM {} already exists", spec.name)));
        }
        spec.assign_macs(None);
        if let Some(e) = self.interface_conflict(&spec) {
            return Err(err(409, e));
        }
        let Some(launcher) = self.effective().cloned() else {
            return Err(err(
                409,
                "no launcher installed: run `nodectl launcher install --path PATH` first",
            ));
        };
        spec.machine_type = self
            .resolve_machine_type(&spec.machine_type)
            .map_err(|e| err(400, e))?;
        let dir = self.vm_dir(&spec.name);
        if dir.join("migrate-999999.sock").as_os_str().len() > MAX_SOCKET_PATH {
            return Err(err(
                400,
                "the state directory path is too long for the VM's unix sockets",
            ));
        }
        Ok((spec, launcher))
    }

    fn create_vm(&mut self, value: &Value, dry_run: bool) -> Reply {
        let spec = match self.admit_new_vm(value) {
            Ok((spec, _)) => spec,
            Err(reply) => return reply,
        };
        if let Some(e) = super::dry_run::missing_files(&spec) {
            return err(400, e);
        }
        let dir = self.vm_dir(&spec.name);
        if dry_run {
            return self.dry_run_view(spec, 200);
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
        self.event(
            &row.spec.name,
            false,
            "Created",
            format!(
                "machine type {}, {} vCPU, memory {}, runStrategy {:?}",
                row.spec.machine_type, row.spec.vcpus, row.spec.memory, row.spec.run_strategy
            ),
        );
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
        if let VmState::Stopped {
            cause: StopCause::MovedAway(_) | StopCause::ReceiveFailed(_) | StopCause::Fenced(_),
        } = &vm.status.state
        {
            return err(
                409,
                format!("VM {name} runs on another node; starting it here would run it twice"),
            );
        }
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
            VmState::Migrating { .. }
            | VmState::MigratingOut {
                outcome_unknown: None,
                ..
            } => {
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
            // A source paused by an unknown handover outcome may be stopped: the
            // operator found the VM running on the destination (or chose to stop it).
            VmState::Running { .. }
            | VmState::Backoff { .. }
            | VmState::Evicting { .. }
            | VmState::Receiving { .. }
            | VmState::MigratingOut { .. } => {
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

    fn register_launcher(
        &mut self,
        caps: Capabilities,
        staged: PathBuf,
        channel: Channel,
        force: bool,
    ) -> Reply {
        if self.launcher(&caps.version).is_some() {
            let _ = std::fs::remove_file(&staged);
            return err(
                409,
                format!("launcher {} is already installed", caps.version),
            );
        }
        let dropped = self.machine_types_in_use_missing(&caps.machine_types);
        if !dropped.is_empty() {
            let what = dropped
                .iter()
                .map(|(mt, vms)| format!("machine type {mt} (VMs {})", vms.join(", ")))
                .collect::<Vec<_>>()
                .join("; ");
            if !force {
                let _ = std::fs::remove_file(&staged);
                return err(
                    409,
                    format!(
                        "launcher {} does not support {what}: not installed (--force installs it anyway; those VMs then stay on their current launcher)",
                        caps.version
                    ),
                );
            }
            tracing::warn!(version = %caps.version, dropped = %what, "installing a launcher that drops machine types in use (forced)");
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
            channel,
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
        tracing::info!(version = %l.version, channel = l.channel.as_str(), path = %l.path, pending = self.approval_pending(), "launcher installed");
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
        tracing::info!(
            version = self.approved.as_deref().unwrap_or("-"),
            "update approved"
        );
        ok(to_value(&self.node_status()))
    }

    fn set_config(&mut self, patch: Value, dry_run: bool) -> Reply {
        let new = match super::settings::apply(&self.settings, patch) {
            Ok(s) => s,
            Err(e) => return err(400, e),
        };
        if dry_run {
            let mut v = new.to_json();
            v["dryRun"] = Value::Bool(true);
            return ok(v);
        }
        if let Err(e) = self.store.set("settings", &new) {
            return err(500, e);
        }
        let to_automatic = new.approval_strategy == ApprovalStrategy::Automatic
            && self.settings.approval_strategy == ApprovalStrategy::Manual;
        let back_to_stable =
            self.settings.channel == Channel::Candidate && new.channel == Channel::Stable;
        self.settings = new;
        if to_automatic {
            self.set_approved();
        }
        tracing::info!(settings = %self.settings.to_json(), "settings changed");
        let mut reply = self.settings.to_json();
        if back_to_stable {
            reply["warning"] = Value::from(
                "switching from candidate back to stable is an untested update path; see nodectl status",
            );
        }
        ok(reply)
    }

    /// Resolves a requested machine type against the installed launchers: the target's
    /// list first, then the others newest first, so that an unversioned alias gets the
    /// target's preferred name. Fails with every offered name when none offers it.
    pub(crate) fn resolve_machine_type(&self, requested: &str) -> Result<String, SpecError> {
        let mut order: Vec<&InstalledLauncher> = self.effective().into_iter().collect();
        order.extend(self.launchers.iter().rev().filter(|l| self.on_channel(l)));
        for l in &order {
            if let Ok(m) = resolve_machine_type(requested, &l.capabilities.machine_types) {
                return Ok(m);
            }
        }
        let mut offered: Vec<String> = order
            .iter()
            .flat_map(|l| l.capabilities.machine_types.iter().cloned())
            .collect();
        offered.sort();
        offered.dedup();
        Err(SpecError::Field {
            field: "machineType".into(),
            reason: format!(
                "{requested:?} is not offered by any installed launcher (offered: {})",
                offered.join(", ")
            ),
        })
    }

    /// Machine types used by VMs (as created, or pending) that `offered` lacks, with the
    /// VMs using each.
    fn machine_types_in_use_missing(&self, offered: &[String]) -> Vec<(String, Vec<String>)> {
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for vm in self.vms.values() {
            let mut used = vec![&vm.spec.machine_type];
            used.extend(vm.status.pending.as_ref().map(|p| &p.machine_type));
            for mt in used {
                if !offered.contains(mt) {
                    let names = out.entry(mt.clone()).or_default();
                    if !names.contains(&vm.spec.name) {
                        names.push(vm.spec.name.clone());
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    /// Why `spec`'s interfaces clash with another VM's (stored or pending spec).
    pub(crate) fn interface_conflict(&self, spec: &VmSpec) -> Option<super::spec::SpecError> {
        let others = self
            .vms
            .values()
            .filter(|v| v.spec.name != spec.name)
            .flat_map(|v| std::iter::once(&v.spec).chain(v.status.pending.as_ref()));
        spec.interface_conflict(others)
    }

    /// Applies a new spec: at once to a VM without a launcher; to a running VM, the
    /// strategy fields at once and the rest as a pending change for its next restart
    /// (`restartRequired`), so that a running VM is never stopped by an edit.
    fn update_vm(&mut self, name: &str, value: &Value, dry_run: bool) -> Reply {
        let mut new = match parse_spec(value) {
            Ok(s) => s,
            Err(e) => return err(400, e),
        };
        if new.name != name {
            return err(
                400,
                format!(
                    "invalid spec: name: {:?} does not match VM {name} (a VM cannot be renamed)",
                    new.name
                ),
            );
        }
        let Some(vm) = self.vms.get(name) else {
            return not_found(name);
        };
        // Interfaces given without a MAC keep the one they have (pending, else stored).
        new.assign_macs(Some(vm.status.pending.as_ref().unwrap_or(&vm.spec)));
        new.assign_macs(Some(&vm.spec));
        if let Some(e) = self.interface_conflict(&new) {
            return err(409, e);
        }
        let Some(vm) = self.vms.get(name) else {
            return not_found(name);
        };
        let running = vm.status.state.has_launcher();
        // Keep the stored machine type when the request repeats it or its alias.
        new.machine_type = if resolve_machine_type(
            &new.machine_type,
            std::slice::from_ref(&vm.spec.machine_type),
        )
        .is_ok()
        {
            vm.spec.machine_type.clone()
        } else {
            match self.resolve_machine_type(&new.machine_type) {
                Ok(m) => m,
                Err(e) => return err(400, e),
            }
        };
        if let Some(e) = super::dry_run::missing_files(&new) {
            return err(400, e);
        }
        let Some(vm) = self.vms.get_mut(name) else {
            return not_found(name);
        };
        let (spec, pending): (VmSpec, Option<VmSpec>) = if running {
            let live = vm.spec.with_live_fields(&new);
            let pending = (!vm.spec.restart_changes(&new).is_empty()).then_some(new);
            (live, pending)
        } else {
            (new, None)
        };
        if dry_run {
            let mut view = self.handle(Req::GetVm(name.to_string()));
            if let Body::Json(v) = &mut view.body {
                v["spec"] = to_value(&spec);
                v["pendingSpec"] = pending.as_ref().map(to_value).unwrap_or(Value::Null);
                v["restartRequired"] = Value::Bool(pending.is_some());
                v["dryRun"] = Value::Bool(true);
            }
            return view;
        }
        if let Err(e) = self.store.update_spec(&spec) {
            return err(500, e);
        }
        let changes = if pending.is_some() {
            "changed; the rest waits for the next restart"
        } else {
            "changed"
        };
        vm.spec = spec;
        vm.status.pending = pending;
        if !self.persist(name) {
            return err(500, "cannot record the state");
        }
        if let Some(vm) = self.vms.get(name) {
            tracing::info!(
                vm = name,
                restart_required = vm.status.pending.is_some(),
                "spec updated"
            );
        }
        self.event(name, false, "SpecUpdated", format!("spec {changes}"));
        self.handle(Req::GetVm(name.to_string()))
    }
}
