//! Managed state: for stacks without a backend of their own, the control
//! plane keeps every state version an apply wrote (serial, lineage, the
//! SHA-256 of its ciphertext, who wrote it, when). The content is sealed to
//! the pool key by the agent (or by an operator holding the pool's public
//! key) and kept as a blob: the control plane never holds a state in clear.
//!
//! **Fencing:** a run writes state only through the current lease of its
//! apply job, while the run is `APPLYING` with that job (checked in the
//! transaction that records the version); a revoked or expired lease's
//! epoch is refused by `current_lease` before anything is stored. The
//! stack's lock is its one tracked run at a time, and it is released when
//! that run ends, however it ends.

pub mod cli;

use rusqlite::{Connection, OptionalExtension, params};

use super::IacError;
use super::model::RunState;
use super::store::{IacStore, get_run, q};
use crate::store::StoreError;

const SCHEMA: &str = r#"
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

/// Longest lineage accepted.
const MAX_LINEAGE: usize = 128;

/// One state version (metadata; the content is the blob `digest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateVersion {
    pub stack: String,
    pub serial: u64,
    pub lineage: String,
    pub digest: String,
    pub written_by: String,
    pub at_ms: i64,
}

/// Who writes a version: an apply (fenced by its run) or an admin.
pub enum Writer {
    Apply { run_id: String, job_id: String },
    Admin(String),
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StateVersion> {
    Ok(StateVersion {
        stack: r.get(0)?,
        serial: r.get::<_, i64>(1)? as u64,
        lineage: r.get(2)?,
        digest: r.get(3)?,
        written_by: r.get(4)?,
        at_ms: r.get(5)?,
    })
}

const COLS: &str = "stack, serial, lineage, digest, written_by, at_ms";

fn current(c: &Connection, stack: &str) -> Result<Option<StateVersion>, StoreError> {
    c.query_row(
        &format!(
            "SELECT {COLS} FROM iac_state_versions WHERE stack = ?1 ORDER BY seq DESC LIMIT 1"
        ),
        params![stack],
        row,
    )
    .optional()
    .map_err(q("read current state"))
}

impl IacStore {
    /// Creates the state table if needed.
    pub async fn open_state(&self) -> Result<(), IacError> {
        Ok(self
            .store
            .with(|c| c.execute_batch(SCHEMA).map_err(q("create state table")))
            .await?)
    }

    /// The stack's current state version.
    pub async fn current_state(&self, stack: String) -> Result<Option<StateVersion>, IacError> {
        Ok(self.store.with(move |c| current(c, &stack)).await?)
    }

    /// The stack's versions, newest first.
    pub async fn state_versions(
        &self,
        stack: String,
        limit: u32,
    ) -> Result<Vec<StateVersion>, IacError> {
        Ok(self
            .store
            .with(move |c| {
                let mut stmt = c
                    .prepare_cached(&format!(
                        "SELECT {COLS} FROM iac_state_versions WHERE stack = ?1 ORDER BY seq DESC LIMIT ?2"
                    ))
                    .map_err(q("prepare state versions"))?;
                let rows = stmt
                    .query_map(params![stack, limit], row)
                    .map_err(q("state versions"))?;
                rows.collect::<Result<Vec<_>, _>>()
                    .map_err(q("read state version"))
            })
            .await?)
    }

    /// Records a version whose ciphertext is already the blob `digest`. An
    /// apply writes only while its run is `APPLYING` with that job; no
    /// writer may go back to an older serial of the current lineage.
    pub async fn record_state(
        &self,
        stack: String,
        serial: u64,
        lineage: String,
        digest: String,
        writer: Writer,
    ) -> Result<StateVersion, IacError> {
        if lineage.is_empty()
            || lineage.len() > MAX_LINEAGE
            || !lineage
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(IacError::BadRequest(format!(
                "state lineage {lineage:?} is not a Terraform lineage"
            )));
        }
        if serial > i64::MAX as u64 {
            return Err(IacError::BadRequest("state serial is out of range".into()));
        }
        self.store
            .with(move |c| {
                let tx = c.transaction().map_err(q("begin record state"))?;
                let written_by = match writer {
                    Writer::Admin(who) => who,
                    Writer::Apply { run_id, job_id } => {
                        let run = get_run(&tx, &run_id)?;
                        let ok = run.as_ref().is_some_and(|r| {
                            r.state == RunState::Applying
                                && r.apply_job.as_deref() == Some(job_id.as_str())
                        });
                        if !ok {
                            return Ok(Err(IacError::Refused(format!(
                                "job {job_id} is not the apply of a running run: its state is refused"
                            ))));
                        }
                        format!("job:{job_id}")
                    }
                };
                if let Some(cur) = current(&tx, &stack)?
                    && cur.lineage == lineage
                    && serial < cur.serial
                {
                    return Ok(Err(IacError::Conflict(format!(
                        "state serial {serial} is older than the current serial {} of lineage {lineage}",
                        cur.serial
                    ))));
                }
                let v = StateVersion {
                    stack,
                    serial,
                    lineage,
                    digest,
                    written_by,
                    at_ms: crate::model::now_ms(),
                };
                tx.execute(
                    "INSERT INTO iac_state_versions (stack, serial, lineage, digest, written_by, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![v.stack, v.serial as i64, v.lineage, v.digest, v.written_by, v.at_ms],
                )
                .map_err(q("insert state version"))?;
                tx.commit().map_err(q("commit record state"))?;
                Ok(Ok(v))
            })
            .await?
    }
}
