//! Adoption after a restart: the launchers recorded in the store that still run are
//! adopted, the others' ends are applied, and interrupted jobs are resumed, so that a
//! daemon killed at any instant carries on where it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::coordinator::{ExitKind, VmState};
use super::daemon::Daemon;
use super::supervisor::{self, MigrationJob};
use super::views::now_ms;

impl Daemon {
    /// After a restart: finds the launchers recorded in the store, adopts those still
    /// running, and resumes interrupted jobs.
    pub async fn adopt(&mut self) {
        let now = now_ms();
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let Some(vm) = self.vms.get(&name) else {
                continue;
            };
            let state = vm.status.state.clone();
            let sock = vm.status.api_socket.clone();
            let grace = Duration::from_secs(vm.spec.termination_grace_period_seconds);
            let alive = match (&sock, vm.status.pid) {
                (Some(s), Some(pid)) => supervisor::pid_runs(pid, s),
                _ => false,
            };
            let answered = match &sock {
                Some(s) => supervisor::status(Path::new(s)).await,
                None => None,
            };
            let answered_pid = answered
                .as_ref()
                .map(|a| a.pid)
                .filter(|p| supervisor::pid_alive(*p));
            let pid = if alive { vm.status.pid } else { answered_pid };
            tracing::info!(vm = %name, phase = state.phase(super::views::now_ms()), pid = pid.unwrap_or(0), "reconciling after restart");
            match state {
                VmState::Stopped { .. } => {}
                VmState::Starting { .. } => {
                    // A launcher spawned just before the daemon died may not answer on
                    // its API socket yet: it is found by its command line, adopted, and
                    // never started a second time.
                    let pid =
                        pid.or_else(|| sock.as_deref().and_then(supervisor::find_pid_with_arg));
                    if let Some(pid) = pid {
                        let Some(vm) = self.vms.get_mut(&name) else {
                            continue;
                        };
                        vm.status.pid = Some(pid);
                        if let Some(a) = &answered {
                            vm.status.launcher_version = Some(a.version.clone());
                        }
                        vm.status.state = VmState::Running { since: now };
                        vm.launched_at = now;
                        supervisor::watch_pid(name.clone(), pid, self.events.clone());
                        self.persist(&name);
                    }
                }
                VmState::Running { .. }
                | VmState::Backoff { .. }
                | VmState::Evicting { .. }
                | VmState::Stopping { .. } => match pid {
                    Some(pid) => {
                        if let Some(vm) = self.vms.get_mut(&name) {
                            vm.status.pid = Some(pid);
                        }
                        self.persist(&name);
                        supervisor::watch_pid(name.clone(), pid, self.events.clone());
                        if matches!(state, VmState::Evicting { .. } | VmState::Stopping { .. }) {
                            if let Some(s) = sock {
                                supervisor::shutdown(PathBuf::from(s), pid, grace);
                            }
                        }
                    }
                    None => self.apply_exit(&name, &ExitKind::from_status(None, None), now),
                },
                VmState::Receiving { .. } | VmState::MigratingOut { .. } => {
                    self.adopt_remote(&name, pid)
                }
                VmState::Migrating {
                    target_pid,
                    target_api_socket,
                    incoming,
                    record,
                    ..
                } => {
                    let target_pid =
                        match target_pid.filter(|p| supervisor::pid_runs(*p, &target_api_socket)) {
                            Some(p) => Some(p),
                            None => match supervisor::status(Path::new(&target_api_socket))
                                .await
                                .map(|a| a.pid)
                            {
                                Some(p) => Some(p),
                                // Spawned but not recorded, API not up yet: find it by
                                // its command line so it cannot be left behind.
                                None => supervisor::find_pid_with_arg(&target_api_socket),
                            },
                        };
                    let Some(vm) = self.vms.get_mut(&name) else {
                        continue;
                    };
                    if let VmState::Migrating { target_pid: t, .. } = &mut vm.status.state {
                        *t = target_pid;
                    }
                    vm.status.pid = pid.or(vm.status.pid);
                    let source_pid = vm.status.pid.unwrap_or(0);
                    let job = MigrationJob {
                        vm: name.clone(),
                        record,
                        source_socket: PathBuf::from(sock.unwrap_or_default()),
                        source_pid,
                        target_socket: PathBuf::from(&target_api_socket),
                        target_pid: target_pid.unwrap_or(0),
                        incoming: PathBuf::from(incoming),
                        memory_bytes: vm.spec.memory_bytes,
                        config: self.settings.live_migration_config.clone(),
                        resume: true,
                    };
                    self.persist(&name);
                    supervisor::watch_pid(name.clone(), source_pid, self.events.clone());
                    if let Some(t) = target_pid {
                        supervisor::watch_pid(name.clone(), t, self.events.clone());
                    }
                    supervisor::migrate(job, self.events.clone());
                }
            }
        }
    }
}
