//! The IaC tables in the embedded SQLite database: the queries behind
//! [`Tx`], one transaction on the store's one connection. SQLite runs one
//! transaction at a time on that connection, so the stack and row locks
//! of the facade are already held by the transaction itself.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Task, corrupt};
use crate::iac::drift::DriftState;
use crate::iac::model::{Run, RunKind, Stack};
use crate::iac::state::StateVersion;
use crate::store::StoreError;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS stacks (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    stack TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_stack ON runs(stack, seq);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state, seq);
CREATE TABLE IF NOT EXISTS stack_drift (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS iac_jobs (
    job_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    task TEXT NOT NULL
);
"#;

const STATE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS iac_state_versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stack TEXT NOT NULL,
    serial INTEGER NOT NULL,
    lineage TEXT NOT NULL,
    digest TEXT NOT NULL,
    written_by TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS iac_state_versions_stack ON iac_state_versions(stack, seq);
"#;

/// `kind` of a run row (rows written before kinds existed are tracked).
const KIND: &str = "COALESCE(json_extract(body, '$.kind'), 'tracked')";

/// Runs in progress.
const IN_PROGRESS: &str = "state IN ('QUEUED','PLANNING','UNCONFIRMED','CONFIRMED','APPLYING')";

const STATE_COLS: &str = "stack, serial, lineage, digest, written_by, at_ms";

fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// Creates the tables of stacks, runs, drift and run jobs if needed.
pub(super) fn create(c: &mut Connection) -> Result<(), StoreError> {
    c.execute_batch(SCHEMA).map_err(q("create iac tables"))
}

/// Creates the table of state versions if needed.
pub(in crate::iac) fn create_state(c: &mut Connection) -> Result<(), StoreError> {
    c.execute_batch(STATE_SCHEMA)
        .map_err(q("create state table"))
}

/// Reads `(key, body)` rows and parses each body.
fn bodies<T: serde::de::DeserializeOwned>(
    c: &Connection,
    op: &'static str,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut stmt = c.prepare_cached(sql).map_err(q(op))?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(q(op))?;
    let mut out = Vec::new();
    for row in rows {
        let (key, body) = row.map_err(q(op))?;
        let value = serde_json::from_str(&body).map_err(|e| corrupt(&key, e))?;
        out.push((key, value));
    }
    Ok(out)
}

fn state_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StateVersion> {
    Ok(StateVersion {
        stack: r.get(0)?,
        serial: r.get::<_, i64>(1)? as u64,
        lineage: r.get(2)?,
        digest: r.get(3)?,
        written_by: r.get(4)?,
        at_ms: r.get(5)?,
    })
}

/// One transaction on the embedded store's connection (rolled back if
/// dropped before [`Tx::commit`]).
pub(in crate::iac) struct Tx<'c>(Transaction<'c>);

impl<'c> Tx<'c> {
    pub(in crate::iac) fn begin(c: &'c mut Connection) -> Result<Tx<'c>, StoreError> {
        c.transaction().map(Tx).map_err(q("begin iac transaction"))
    }

    pub(in crate::iac) fn commit(self) -> Result<(), StoreError> {
        self.0.commit().map_err(q("commit iac transaction"))
    }

    /// The stack lock: the transaction itself holds it.
    pub(in crate::iac) async fn lock_stack(&self, _stack: &str) -> Result<(), StoreError> {
        Ok(())
    }

    pub(in crate::iac) async fn stack(&self, name: &str) -> Result<Option<Stack>, StoreError> {
        let body: Option<String> = self
            .0
            .query_row(
                "SELECT body FROM stacks WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("read stack"))?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| corrupt(name, e)))
            .transpose()
    }

    pub(in crate::iac) async fn stacks(&self) -> Result<Vec<Stack>, StoreError> {
        let rows = bodies(
            &self.0,
            "list stacks",
            "SELECT name, body FROM stacks ORDER BY name",
            [],
        )?;
        Ok(rows.into_iter().map(|(_, s)| s).collect())
    }

    pub(in crate::iac) async fn write_stack(&self, s: &Stack) -> Result<(), StoreError> {
        let body = serde_json::to_string(s).map_err(|e| corrupt(&s.spec.name, e))?;
        self.0
            .execute(
                "INSERT INTO stacks (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET body = ?2",
                params![s.spec.name, body],
            )
            .map_err(q("write stack"))?;
        Ok(())
    }

    /// Deletes the stack and its drift state; whether the stack existed.
    pub(in crate::iac) async fn delete_stack(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .0
            .execute("DELETE FROM stacks WHERE name = ?1", params![name])
            .map_err(q("delete stack"))?;
        self.0
            .execute("DELETE FROM stack_drift WHERE name = ?1", params![name])
            .map_err(q("delete stack drift"))?;
        Ok(n > 0)
    }

    /// Runs of `stack` in progress, of any kind.
    pub(in crate::iac) async fn runs_in_progress(&self, stack: &str) -> Result<i64, StoreError> {
        self.0
            .query_row(
                &format!("SELECT COUNT(*) FROM runs WHERE stack = ?1 AND {IN_PROGRESS}"),
                params![stack],
                |r| r.get(0),
            )
            .map_err(q("count active runs"))
    }

    /// Whether a tracked run of `stack` holds the lock or a drift check
    /// of it is planning.
    pub(in crate::iac) async fn stack_locked(&self, stack: &str) -> Result<bool, StoreError> {
        let n: i64 = self
            .0
            .query_row(
                &format!("SELECT COUNT(*) FROM runs WHERE stack = ?1 AND ((state IN ('PLANNING','UNCONFIRMED','CONFIRMED','APPLYING') AND {KIND} = 'tracked') OR (state = 'PLANNING' AND {KIND} = 'drift'))"),
                params![stack],
                |r| r.get(0),
            )
            .map_err(q("check stack lock"))?;
        Ok(n > 0)
    }

    /// The oldest tracked run of `stack` queued or holding the lock.
    pub(in crate::iac) async fn tracked_busy(
        &self,
        stack: &str,
    ) -> Result<Option<String>, StoreError> {
        self.0
            .query_row(
                &format!("SELECT id FROM runs WHERE stack = ?1 AND {KIND} = 'tracked' AND {IN_PROGRESS} ORDER BY seq LIMIT 1"),
                params![stack],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("find busy tracked run"))
    }

    /// The oldest queued tracked run of `stack`.
    pub(in crate::iac) async fn next_queued(
        &self,
        stack: &str,
    ) -> Result<Option<String>, StoreError> {
        self.0
            .query_row(
                &format!("SELECT id FROM runs WHERE stack = ?1 AND state = 'QUEUED' AND {KIND} = 'tracked' ORDER BY seq LIMIT 1"),
                params![stack],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("find queued run"))
    }

    /// The newest run of `stack` of `kind` in one of `states` (any if empty).
    pub(in crate::iac) async fn newest_run(
        &self,
        stack: &str,
        kind: RunKind,
        states: &[&str],
    ) -> Result<Option<String>, StoreError> {
        let list = if states.is_empty() {
            String::from("1")
        } else {
            format!(
                "state IN ({})",
                states
                    .iter()
                    .map(|s| format!("'{}'", s.replace('\'', "")))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        self.0
            .query_row(
                &format!("SELECT id FROM runs WHERE stack = ?1 AND {KIND} = ?2 AND {list} ORDER BY seq DESC LIMIT 1"),
                params![stack, kind.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("find newest run"))
    }

    pub(in crate::iac) async fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let body: Option<String> = self
            .0
            .query_row("SELECT body FROM runs WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(q("read run"))?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| corrupt(id, e)))
            .transpose()
    }

    /// The run, to change it (the transaction holds every row).
    pub(in crate::iac) async fn lock_run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        self.run(id).await
    }

    /// Newest first; `stack` filters.
    pub(in crate::iac) async fn runs(
        &self,
        stack: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Run>, StoreError> {
        let rows = bodies(
            &self.0,
            "list runs",
            "SELECT id, body FROM runs WHERE (?1 IS NULL OR stack = ?1) ORDER BY seq DESC LIMIT ?2",
            params![stack, limit],
        )?;
        Ok(rows.into_iter().map(|(_, r)| r).collect())
    }

    /// Runs in progress, oldest first.
    pub(in crate::iac) async fn open_runs(&self) -> Result<Vec<Run>, StoreError> {
        let rows = bodies(
            &self.0,
            "open runs",
            &format!("SELECT id, body FROM runs WHERE {IN_PROGRESS} ORDER BY seq"),
            [],
        )?;
        Ok(rows.into_iter().map(|(_, r)| r).collect())
    }

    pub(in crate::iac) async fn insert_run(&self, r: &Run) -> Result<(), StoreError> {
        let body = serde_json::to_string(r).map_err(|e| corrupt(&r.id, e))?;
        self.0
            .execute(
                "INSERT INTO runs (id, stack, state, body) VALUES (?1, ?2, ?3, ?4)",
                params![r.id, r.stack, r.state.as_str(), body],
            )
            .map_err(q("insert run"))?;
        Ok(())
    }

    pub(in crate::iac) async fn write_run(&self, r: &Run) -> Result<(), StoreError> {
        let body = serde_json::to_string(r).map_err(|e| corrupt(&r.id, e))?;
        self.0
            .execute(
                "UPDATE runs SET state = ?2, body = ?3 WHERE id = ?1",
                params![r.id, r.state.as_str(), body],
            )
            .map_err(q("write run"))?;
        Ok(())
    }

    /// Records `job_id` as `task`'s phase of its run.
    pub(in crate::iac) async fn insert_job(
        &self,
        job_id: &str,
        task: &Task,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(task).map_err(|e| corrupt(job_id, e))?;
        self.0
            .execute(
                "INSERT INTO iac_jobs (job_id, run_id, phase, task) VALUES (?1, ?2, ?3, ?4)",
                params![job_id, task.run_id, task.phase, json],
            )
            .map_err(q("record run job"))?;
        Ok(())
    }

    pub(in crate::iac) async fn task(&self, job_id: &str) -> Result<Option<Task>, StoreError> {
        let json: Option<String> = self
            .0
            .prepare_cached("SELECT task FROM iac_jobs WHERE job_id = ?1")
            .map_err(q("read run job"))?
            .query_row(params![job_id], |r| r.get(0))
            .optional()
            .map_err(q("read run job"))?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt(job_id, e)))
            .transpose()
    }

    pub(in crate::iac) async fn drift_states(
        &self,
    ) -> Result<Vec<(String, DriftState)>, StoreError> {
        bodies(
            &self.0,
            "drift states",
            "SELECT name, body FROM stack_drift",
            [],
        )
    }

    /// The stack's drift state, to change it.
    pub(in crate::iac) async fn lock_drift(
        &self,
        name: &str,
    ) -> Result<Option<DriftState>, StoreError> {
        let body: Option<String> = self
            .0
            .query_row(
                "SELECT body FROM stack_drift WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("read drift"))?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| corrupt(name, e)))
            .transpose()
    }

    pub(in crate::iac) async fn write_drift(
        &self,
        name: &str,
        d: &DriftState,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(d).map_err(|e| corrupt(name, e))?;
        self.0
            .execute(
                "INSERT INTO stack_drift (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET body = ?2",
                params![name, body],
            )
            .map_err(q("write drift"))?;
        Ok(())
    }

    pub(in crate::iac) async fn current_state(
        &self,
        stack: &str,
    ) -> Result<Option<StateVersion>, StoreError> {
        self.0
            .query_row(
                &format!(
                    "SELECT {STATE_COLS} FROM iac_state_versions WHERE stack = ?1 ORDER BY seq DESC LIMIT 1"
                ),
                params![stack],
                state_row,
            )
            .optional()
            .map_err(q("read current state"))
    }

    /// The stack's versions, newest first.
    pub(in crate::iac) async fn state_versions(
        &self,
        stack: &str,
        limit: u32,
    ) -> Result<Vec<StateVersion>, StoreError> {
        let mut stmt = self
            .0
            .prepare_cached(&format!(
                "SELECT {STATE_COLS} FROM iac_state_versions WHERE stack = ?1 ORDER BY seq DESC LIMIT ?2"
            ))
            .map_err(q("prepare state versions"))?;
        let rows = stmt
            .query_map(params![stack, limit], state_row)
            .map_err(q("state versions"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(q("read state version"))
    }

    pub(in crate::iac) async fn insert_state(&self, v: &StateVersion) -> Result<(), StoreError> {
        self.0
            .execute(
                "INSERT INTO iac_state_versions (stack, serial, lineage, digest, written_by, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    v.stack,
                    v.serial as i64,
                    v.lineage,
                    v.digest,
                    v.written_by,
                    v.at_ms
                ],
            )
            .map_err(q("insert state version"))?;
        Ok(())
    }
}
