//! noded's persistent state in SQLite (`DIR/state.db`).
//!
//! Every state change is written here *before* the daemon acts on it (write-ahead), so a
//! daemon killed at any instant finds, on restart, each VM with the launcher it was
//! running or starting, and each migration it was in the middle of. Each row keeps the
//! full status as JSON (the source of truth) plus a few plain columns for humans
//! inspecting the database with `sqlite3`.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::coordinator::{Millis, VmState, VmStatus};
use super::launchers::{Capabilities, Channel, InstalledLauncher};
use super::spec::VmSpec;

/// Most recent finished migration records kept per VM (as KubeVirt keeps 5).
pub const MIGRATION_RECORDS_KEPT: usize = 5;

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored JSON document does not parse (a damaged or foreign database).
    #[error("state database: damaged record {what}: {reason}")]
    Damaged {
        /// Which record.
        what: String,
        /// Parser error.
        reason: String,
    },
    /// The VM already exists.
    #[error("VM {0} already exists")]
    Exists(String),
}

/// One VM row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    /// The spec (machine type resolved).
    pub spec: VmSpec,
    /// The status.
    pub status: VmStatus,
    /// The console log path.
    pub serial_log: String,
    /// Creation time (ms).
    pub created_at: Millis,
}

/// A migration record. Outcomes: `Running`, `Succeeded`, `Failed`, `Cancelled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    /// Row id.
    pub id: i64,
    /// VM name.
    pub vm: String,
    /// Start (ms).
    pub started_at: Millis,
    /// End (ms), when finished.
    pub finished_at: Option<Millis>,
    /// Outcome.
    pub outcome: String,
    /// Version migrated from.
    pub source_version: String,
    /// Version migrated to.
    pub target_version: String,
    /// The launcher's migration report, or `{"error": ...}`.
    pub report: serde_json::Value,
}

/// The database handle (used by the reconciliation loop only).
pub struct Store {
    pub(crate) conn: Connection,
}

fn damaged(what: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
    StoreError::Damaged {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Store {
    /// Opens (creating if needed) the database, in WAL mode with full sync, because a
    /// state write that is lost on power failure breaks the write-ahead promise.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS vms (
                name TEXT PRIMARY KEY,
                spec TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                serial_log TEXT NOT NULL,
                phase TEXT NOT NULL,
                launcher_version TEXT,
                pid INTEGER,
                api_socket TEXT,
                state TEXT NOT NULL,
                last_error TEXT,
                backoff_until INTEGER,
                status TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS launchers (
                version TEXT PRIMARY KEY,
                path TEXT NOT NULL,
                installed_at INTEGER NOT NULL,
                capabilities TEXT NOT NULL,
                channel TEXT NOT NULL DEFAULT 'stable'
            );
            CREATE TABLE IF NOT EXISTS migrations (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                vm TEXT NOT NULL,
                started_at INTEGER NOT NULL,
                finished_at INTEGER,
                outcome TEXT NOT NULL,
                source_version TEXT NOT NULL,
                target_version TEXT NOT NULL,
                report TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS migrations_vm ON migrations(vm, id);
            CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        // Databases from before channels: add the column (every launcher was stable).
        let has_channel = conn
            .prepare("SELECT channel FROM launchers LIMIT 0")
            .is_ok();
        if !has_channel {
            conn.execute_batch(
                "ALTER TABLE launchers ADD COLUMN channel TEXT NOT NULL DEFAULT 'stable'",
            )?;
        }
        Ok(Store { conn })
    }

    /// Inserts a new VM; refuses an existing name.
    pub fn insert_vm(&self, row: &VmRow) -> Result<(), StoreError> {
        let exists: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM vms WHERE name = ?1",
                [&row.spec.name],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::Exists(row.spec.name.clone()));
        }
        self.conn.execute(
            "INSERT INTO vms (name, spec, created_at, serial_log, phase, state, status) VALUES (?1, ?2, ?3, ?4, '', '', '')",
            params![row.spec.name, to_json(&row.spec), row.created_at, row.serial_log],
        )?;
        self.update_status(&row.spec.name, &row.status, row.created_at)
    }

    /// Replaces a VM's spec (used when `vm start` turns Halted into Always).
    pub fn update_spec(&self, spec: &VmSpec) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE vms SET spec = ?2 WHERE name = ?1",
            params![spec.name, to_json(spec)],
        )?;
        Ok(())
    }

    /// Writes a VM's status (the write-ahead record).
    pub fn update_status(&self, name: &str, st: &VmStatus, now: Millis) -> Result<(), StoreError> {
        let backoff_until = match &st.state {
            VmState::Backoff { until, .. } => Some(*until),
            _ => None,
        };
        let state_name = serde_json::to_value(&st.state)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .unwrap_or_default();
        self.conn.execute(
            "UPDATE vms SET phase = ?2, launcher_version = ?3, pid = ?4, api_socket = ?5, state = ?6,
                last_error = ?7, backoff_until = ?8, status = ?9 WHERE name = ?1",
            params![
                name,
                st.state.phase(now),
                st.launcher_version,
                st.pid,
                st.api_socket,
                state_name,
                st.last_error,
                backoff_until,
                to_json(st)
            ],
        )?;
        Ok(())
    }

    /// Deletes a VM and its migration records.
    pub fn delete_vm(&self, name: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM vms WHERE name = ?1", [name])?;
        self.conn
            .execute("DELETE FROM migrations WHERE vm = ?1", [name])?;
        Ok(())
    }

    /// All VMs, by name.
    pub fn load_vms(&self) -> Result<Vec<VmRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, spec, status, serial_log, created_at FROM vms ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, spec, status, serial_log, created_at) = row?;
            out.push(VmRow {
                spec: serde_json::from_str(&spec)
                    .map_err(|e| damaged(format!("vm {name} spec"), e))?,
                status: serde_json::from_str(&status)
                    .map_err(|e| damaged(format!("vm {name} status"), e))?,
                serial_log,
                created_at,
            });
        }
        Ok(out)
    }

    /// Records an installed launcher.
    pub fn insert_launcher(&self, l: &InstalledLauncher) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO launchers (version, path, installed_at, capabilities, channel) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![l.version, l.path, l.installed_at, to_json(&l.capabilities), l.channel.as_str()],
        )?;
        Ok(())
    }

    /// All installed launchers (unordered; callers sort by version).
    pub fn launchers(&self) -> Result<Vec<InstalledLauncher>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT version, path, installed_at, capabilities, channel FROM launchers")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (version, path, installed_at, caps, channel) = row?;
            let channel = Channel::parse(&channel).ok_or_else(|| {
                damaged(
                    format!("launcher {version}"),
                    format!("unknown channel {channel:?}"),
                )
            })?;
            let capabilities: Capabilities = serde_json::from_str(&caps)
                .map_err(|e| damaged(format!("launcher {version}"), e))?;
            out.push(InstalledLauncher {
                version,
                path,
                installed_at,
                capabilities,
                channel,
            });
        }
        Ok(out)
    }

    /// Reads a JSON value from the key-value table.
    pub fn get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        v.map(|s| serde_json::from_str(&s).map_err(|e| damaged(key, e)))
            .transpose()
    }

    /// Writes a JSON value to the key-value table.
    pub fn set<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)",
            params![key, to_json(value)],
        )?;
        Ok(())
    }

    /// Removes a key of the key-value table (absent is fine).
    pub fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM kv WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Opens a migration record (outcome `Running`); returns its id.
    pub fn migration_started(
        &self,
        vm: &str,
        source: &str,
        target: &str,
        at: Millis,
    ) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO migrations (vm, started_at, outcome, source_version, target_version, report) VALUES (?1, ?2, 'Running', ?3, ?4, 'null')",
            params![vm, at, source, target],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Closes a migration record and prunes the VM's records to the most recent
    /// [`MIGRATION_RECORDS_KEPT`] finished ones.
    pub fn migration_finished(
        &self,
        id: i64,
        at: Millis,
        outcome: &str,
        report: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE migrations SET finished_at = ?2, outcome = ?3, report = ?4 WHERE id = ?1",
            params![id, at, outcome, to_json(report)],
        )?;
        self.conn.execute(
            "DELETE FROM migrations WHERE finished_at IS NOT NULL
               AND vm = (SELECT vm FROM migrations WHERE id = ?1)
               AND id NOT IN (SELECT id FROM migrations WHERE finished_at IS NOT NULL
                   AND vm = (SELECT vm FROM migrations WHERE id = ?1) ORDER BY id DESC LIMIT ?2)",
            params![id, MIGRATION_RECORDS_KEPT as i64],
        )?;
        Ok(())
    }

    /// A VM's migration records, newest first.
    pub fn migrations(&self, vm: &str) -> Result<Vec<MigrationRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, vm, started_at, finished_at, outcome, source_version, target_version, report
             FROM migrations WHERE vm = ?1 ORDER BY id DESC",
        )?;
        let rows = stmt.query_map([vm], |r| {
            Ok((
                MigrationRecord {
                    id: r.get(0)?,
                    vm: r.get(1)?,
                    started_at: r.get(2)?,
                    finished_at: r.get(3)?,
                    outcome: r.get(4)?,
                    source_version: r.get(5)?,
                    target_version: r.get(6)?,
                    report: serde_json::Value::Null,
                },
                r.get::<_, String>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut rec, report) = row?;
            rec.report = serde_json::from_str(&report)
                .map_err(|e| damaged(format!("migration {}", rec.id), e))?;
            out.push(rec);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launchers::Range;
    use crate::spec::parse_spec_text;

    fn row(name: &str) -> VmRow {
        let spec = parse_spec_text(&format!("name: {name}\nkernel: /k\nmemory: 64Mi")).unwrap();
        let status = VmStatus::new(&spec, 5);
        VmRow {
            spec,
            status,
            serial_log: format!("/s/{name}/console.log"),
            created_at: 5,
        }
    }

    #[test]
    fn vm_round_trip_and_status_updates() {
        let s = Store::in_memory().unwrap();
        let r = row("a");
        s.insert_vm(&r).unwrap();
        assert!(matches!(s.insert_vm(&r), Err(StoreError::Exists(_))));
        let mut st = r.status.clone();
        st.state = VmState::Backoff {
            until: 99,
            last_error: "x".into(),
        };
        st.pid = Some(42);
        st.launcher_version = Some("1.0.0".into());
        s.update_status("a", &st, 10).unwrap();
        let rows = s.load_vms().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, st);
        assert_eq!(rows[0].spec, r.spec);
        assert_eq!(rows[0].serial_log, "/s/a/console.log");
        s.delete_vm("a").unwrap();
        assert!(s.load_vms().unwrap().is_empty());
    }

    #[test]
    fn launchers_and_kv_round_trip() {
        let s = Store::in_memory().unwrap();
        let l = InstalledLauncher {
            version: "1.2.3".into(),
            path: "/d/launchers/1.2.3/launcher".into(),
            installed_at: 7,
            capabilities: Capabilities {
                version: "1.2.3".into(),
                machine_types: vec!["q35-1.0".into()],
                migration_protocol: Range { min: 1, max: 2 },
                snapshot_format: Range { min: 1, max: 1 },
            },
            channel: Channel::Candidate,
        };
        s.insert_launcher(&l).unwrap();
        assert_eq!(s.launchers().unwrap(), vec![l]);
        assert_eq!(s.get::<String>("approved").unwrap(), None);
        s.set("approved", &"1.2.3").unwrap();
        assert_eq!(
            s.get::<String>("approved").unwrap().as_deref(),
            Some("1.2.3")
        );
    }

    #[test]
    fn migration_records_are_capped_at_five_finished() {
        let s = Store::in_memory().unwrap();
        for i in 0..8 {
            let id = s.migration_started("a", "1.0.0", "2.0.0", i).unwrap();
            s.migration_finished(id, i + 1, "Failed", &serde_json::json!({"n": i}))
                .unwrap();
        }
        let other = s.migration_started("b", "1.0.0", "2.0.0", 0).unwrap();
        s.migration_finished(other, 1, "Succeeded", &serde_json::json!({}))
            .unwrap();
        let running = s.migration_started("a", "1.0.0", "2.0.0", 100).unwrap();
        let recs = s.migrations("a").unwrap();
        assert_eq!(recs.len(), 6);
        assert_eq!(recs[0].id, running);
        assert_eq!(recs[0].outcome, "Running");
        assert_eq!(recs[1].report["n"], 7);
        assert_eq!(recs[5].report["n"], 3);
        assert_eq!(s.migrations("b").unwrap().len(), 1);
        s.migration_finished(running, 101, "Succeeded", &serde_json::json!({}))
            .unwrap();
        assert_eq!(s.migrations("a").unwrap().len(), 5);
    }

    #[test]
    fn reopen_on_disk_keeps_everything() {
        let dir = std::env::temp_dir().join(format!("store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        {
            let s = Store::open(&path).unwrap();
            s.insert_vm(&row("a")).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_vms().unwrap()[0].spec.name, "a");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
