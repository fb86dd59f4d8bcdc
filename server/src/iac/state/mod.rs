//! Managed state: for stacks without a backend of their own, the control
//! plane keeps every state version an apply wrote (serial, lineage, the
//! SHA-256 of its ciphertext, who wrote it, when). The content is sealed to
//! the pool key by the agent (or by an operator holding the pool's public
//! key) and kept as a blob: the control plane never holds a state in clear.
//!
//! **Fencing:** a run writes state only through the current lease of its
//! apply job, while the run is `APPLYING` with that job (checked in the
//! transaction that records the version, with the run's row locked and
//! the stack's lock held, so replicas sharing a PostgreSQL database record
//! a stack's versions one at a time); a revoked or expired lease's
//! epoch is refused by `current_lease` before anything is stored. The
//! stack's lock is its one tracked run at a time, and it is released when
//! that run ends, however it ends.

pub mod cli;

use super::IacError;
use super::model::RunState;
use super::store::{Db, IacStore, sqlite, transact};

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

impl IacStore {
    /// Creates the state table if needed (on PostgreSQL, the store's
    /// migrations did).
    pub async fn open_state(&self) -> Result<(), IacError> {
        if let Db::Sqlite(store) = &self.db {
            store.with(sqlite::create_state).await?;
        }
        Ok(())
    }

    /// The stack's current state version.
    pub async fn current_state(&self, stack: String) -> Result<Option<StateVersion>, IacError> {
        Ok(transact!(&self.db, |tx| {
            tx.current_state(&stack).await
        })?)
    }

    /// The stack's versions, newest first.
    pub async fn state_versions(
        &self,
        stack: String,
        limit: u32,
    ) -> Result<Vec<StateVersion>, IacError> {
        Ok(transact!(&self.db, |tx| {
            tx.state_versions(&stack, limit).await
        })?)
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
        transact!(&self.db, |tx| {
            tx.lock_stack(&stack).await?;
            let written_by = match &writer {
                Writer::Admin(who) => who.clone(),
                Writer::Apply { run_id, job_id } => {
                    let run = tx.lock_run(run_id).await?;
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
            if let Some(cur) = tx.current_state(&stack).await?
                && cur.lineage == lineage
                && serial < cur.serial
            {
                return Ok(Err(IacError::Conflict(format!(
                    "state serial {serial} is older than the current serial {} of lineage {lineage}",
                    cur.serial
                ))));
            }
            let v = StateVersion {
                stack: stack.clone(),
                serial,
                lineage: lineage.clone(),
                digest: digest.clone(),
                written_by,
                at_ms: crate::model::now_ms(),
            };
            tx.insert_state(&v).await?;
            Ok(Ok(v))
        })?
    }
}
