//! Per-VM events for `nodectl vm describe`: created, started, migration started and
//! finished (with its downtime), evicted, restarted, crashed (with the launcher's own
//! error line). Kept in SQLite beside the VM, at most [`EVENTS_KEPT`] per VM (the oldest
//! go first), and deleted with the VM.
//!
//! Also here: [`last_error_line`], which finds the launcher's own error in its log, so
//! that a VM whose launcher cannot start says why in its `message`.

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::coordinator::Millis;
use super::daemon::Daemon;
use super::store::{Store, StoreError};
use super::supervisor::MigrationResult;
use super::views::{now_ms, rfc3339};
use super::vm_state::ExitKind;

/// Events kept per VM.
pub const EVENTS_KEPT: i64 = 50;

/// Longest launcher error line copied into a VM's message.
const MAX_LINE: usize = 300;

/// One event, as `GET /v1/vms/{name}/events` returns it (Kubernetes' event fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// RFC 3339.
    pub time: String,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// CamelCase reason: `Created`, `Started`, `MigrationStarted`, ...
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

impl Store {
    /// Creates the events table if this database predates it.
    pub fn init_events(&self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                vm TEXT NOT NULL,
                at INTEGER NOT NULL,
                type TEXT NOT NULL,
                reason TEXT NOT NULL,
                message TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_vm ON events(vm, id);",
        )?;
        Ok(())
    }

    /// Appends an event and drops the VM's oldest beyond [`EVENTS_KEPT`].
    pub fn add_event(
        &self,
        vm: &str,
        at: Millis,
        warning: bool,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let kind = if warning { "Warning" } else { "Normal" };
        self.conn.execute(
            "INSERT INTO events (vm, at, type, reason, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![vm, at, kind, reason, message],
        )?;
        self.conn.execute(
            "DELETE FROM events WHERE vm = ?1 AND id NOT IN
               (SELECT id FROM events WHERE vm = ?1 ORDER BY id DESC LIMIT ?2)",
            params![vm, EVENTS_KEPT],
        )?;
        Ok(())
    }

    /// A VM's events, oldest first.
    pub fn events(&self, vm: &str) -> Result<Vec<(Millis, EventView)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT at, type, reason, message FROM events WHERE vm = ?1 ORDER BY id")?;
        let rows = st.query_map(params![vm], |r| {
            let at: Millis = r.get(0)?;
            Ok((
                at,
                EventView {
                    time: rfc3339(at),
                    type_: r.get(1)?,
                    reason: r.get(2)?,
                    message: r.get(3)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a deleted VM's events.
    pub fn delete_events(&self, vm: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM events WHERE vm = ?1", params![vm])?;
        Ok(())
    }
}

impl Daemon {
    /// Records an event; a failure to record is logged, never fatal (events are for
    /// people, the VM's state is elsewhere).
    pub(crate) fn event(&self, vm: &str, warning: bool, reason: &str, message: impl AsRef<str>) {
        let message = message.as_ref();
        if let Err(e) = self.store.add_event(vm, now_ms(), warning, reason, message) {
            tracing::warn!(vm, reason, error = %e, "cannot record event");
        }
    }
}

impl Daemon {
    /// Logs and records a launcher's end; a failure gets the launcher's own last error
    /// line from its log (`exit status 1: cannot read kernel ...`), which then becomes
    /// the VM's message.
    pub(crate) fn exit_recorded(
        &mut self,
        name: &str,
        pid: u32,
        generation: u64,
        kind: ExitKind,
    ) -> ExitKind {
        let kind = match kind {
            ExitKind::Failure(why) => {
                let log = self.vm_dir(name).join(format!("launcher-{generation}.log"));
                match last_error_line(&log) {
                    Some(line) => ExitKind::Failure(format!("{why}: {line}")),
                    None => ExitKind::Failure(why),
                }
            }
            other => other,
        };
        let (warning, reason, what) = match &kind {
            ExitKind::Clean => (
                false,
                "Stopped",
                "launcher exited (guest powered off or stopped)".to_string(),
            ),
            ExitKind::MigratedAway => (
                false,
                "MigratedAway",
                "launcher handed the VM over (exit 64)".to_string(),
            ),
            ExitKind::Failure(why) => (true, "Crashed", format!("launcher failed: {why}")),
        };
        tracing::info!(vm = name, pid, exit = %what, "launcher ended");
        if warning {
            self.counters.crashes.inc();
        }
        self.event(name, warning, reason, what);
        kind
    }

    /// Records a finished migration as an event (with its downtime, for people).
    pub(crate) fn migration_event(
        &self,
        name: &str,
        result: &MigrationResult,
        outcome: &str,
        target_version: &str,
        downtime_ms: Option<f64>,
    ) {
        match (result, downtime_ms) {
            (MigrationResult::Completed { .. }, Some(d)) => self.event(
                name,
                false,
                "MigrationSucceeded",
                format!("now on launcher {target_version}; downtime {d:.2} ms"),
            ),
            (MigrationResult::Completed { .. }, None) => self.event(
                name,
                false,
                "MigrationSucceeded",
                format!("now on launcher {target_version}"),
            ),
            (MigrationResult::Failed { error, .. }, _) => self.event(
                name,
                true,
                "MigrationFailed",
                format!("{outcome}: {error}; the VM keeps running on its launcher"),
            ),
            (MigrationResult::Unknown { error, .. }, _) => self.event(
                name,
                true,
                "MigrationOutcomeUnknown",
                format!("{error}; the VM is paused here until the target says whether it runs it"),
            ),
        }
    }
}

/// A VM's conditions, each with the time of the last event that changed it (its
/// creation time when none did).
pub fn vm_conditions(
    view: &super::views::VmView,
    created_at: Millis,
    events: &[(Millis, EventView)],
) -> Vec<super::views::VmCondition> {
    let since = |reasons: &[&str]| {
        let at = events
            .iter()
            .rev()
            .find(|(_, e)| reasons.contains(&e.reason.as_str()))
            .map(|(at, _)| *at)
            .unwrap_or(created_at);
        rfc3339(at)
    };
    let cond = |t: &str, status: bool, when: String, reason: &str, message: String| {
        super::views::VmCondition {
            type_: t.into(),
            status: if status { "True" } else { "False" }.into(),
            last_transition_time: when,
            reason: reason.into(),
            message,
        }
    };
    let ready = matches!(
        view.phase.as_str(),
        "Running" | "Migrating" | "MigratingOut"
    );
    let spec_changes = ["Created", "SpecUpdated"];
    vec![
        cond(
            "Ready",
            ready,
            since(&[
                "Started",
                "Crashed",
                "Stopped",
                "Evicted",
                "FailedStart",
                "MigratedAway",
            ]),
            &view.phase,
            view.message.clone().unwrap_or_default(),
        ),
        cond(
            "LiveMigratable",
            view.migratable,
            since(&spec_changes),
            view.migratable_reason.as_deref().unwrap_or("Migratable"),
            String::new(),
        ),
        cond(
            "UpToDate",
            !view.outdated,
            since(&["Started", "MigrationSucceeded"]),
            if view.outdated {
                "Outdated"
            } else {
                "RunsTarget"
            },
            view.reason
                .clone()
                .filter(|_| view.outdated)
                .unwrap_or_default(),
        ),
        cond(
            "RestartRequired",
            view.restart_required,
            since(&["SpecUpdated", "Started"]),
            if view.restart_required {
                "PendingChanges"
            } else {
                "AsExpected"
            },
            view.pending_changes.join(", "),
        ),
    ]
}

/// The launcher's own last error line in its log (`launcher: cannot read kernel ...`),
/// if any: the line a user needs when all noded saw was `exit status 1`. Reads only the
/// log's tail.
pub fn last_error_line(log: &std::path::Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))
        .ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let pick =
        |l: &&str| l.starts_with("launcher: ") || l.contains("ERROR") || l.contains("error:");
    let line = text.lines().map(str::trim).rev().find(pick)?;
    let line = strip_ansi(line);
    let line = line.strip_prefix("launcher: ").unwrap_or(&line);
    Some(line.chars().take(MAX_LINE).collect())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_bounded_per_vm() {
        let s = Store::in_memory().unwrap();
        s.init_events().unwrap();
        for i in 0..(EVENTS_KEPT + 10) {
            s.add_event("a", i, false, "Started", &format!("n{i}"))
                .unwrap();
        }
        s.add_event("b", 1, true, "Crashed", "x").unwrap();
        let a = s.events("a").unwrap();
        assert_eq!(a.len() as i64, EVENTS_KEPT);
        assert_eq!(a[0].1.message, "n10", "the oldest went first");
        assert_eq!(s.events("b").unwrap()[0].1.type_, "Warning");
        s.delete_events("a").unwrap();
        assert!(s.events("a").unwrap().is_empty());
        assert_eq!(s.events("b").unwrap().len(), 1);
    }

    #[test]
    fn finds_the_launchers_error_line() {
        let dir = std::env::temp_dir().join(format!("events-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("launcher-1.log");
        std::fs::write(
            &log,
            "booting\n\u{1b}[2m2026\u{1b}[0m  WARN something\nlauncher: cannot read kernel /nope: No such file or directory (os error 2)\n",
        )
        .unwrap();
        assert_eq!(
            last_error_line(&log).as_deref(),
            Some("cannot read kernel /nope: No such file or directory (os error 2)")
        );
        std::fs::write(&log, "all fine\n").unwrap();
        assert_eq!(last_error_line(&log), None);
        assert_eq!(last_error_line(&dir.join("missing.log")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
