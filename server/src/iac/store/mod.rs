//! The IaC tables: `stacks`, `runs`, `stack_drift`, `iac_jobs` (which job
//! is which phase of which run, and the task pushed with its lease) and
//! `iac_state_versions` (`super::state`), in the control plane's store:
//! the embedded SQLite database (`sqlite`) or PostgreSQL shared by
//! several replicas (`postgres`, migration 2 of `store::postgres::schema`).
//!
//! [`IacStore`] is the one facade: each of its calls is one transaction
//! (`transact!`) whose logic is written here once, over the primitive
//! queries of a backend's `Tx` (the same methods, with the same meaning,
//! in `sqlite.rs` and `postgres.rs`; only their SQL differs).
//!
//! **Invariant:** the stack lock: a tracked run leaves `QUEUED` only inside
//! the transaction that finds no other tracked run of its stack in a
//! lock-holding state (`PLANNING`, `UNCONFIRMED`, `CONFIRMED`, `APPLYING`)
//! and no drift check planning; a drift check starts only inside the
//! transaction that finds no tracked run of its stack queued or holding the
//! lock. Proposed runs take no lock. Every transaction that checks this
//! (and every one that adds or deletes a stack's runs or state versions)
//! first takes the stack's lock (`Tx::lock_stack`: on PostgreSQL an
//! advisory lock held until `COMMIT`), so replicas sharing one database
//! start one tracked run of a stack at a time; a run or drift row read to
//! be changed is locked (`Tx::lock_run`, `Tx::lock_drift`).

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::Pool;

use super::IacError;
use super::drift::DriftState;
use super::model::{Run, RunKind, RunState, Stack};
use crate::store::{Store, StoreError};

/// The queries on PostgreSQL.
pub(crate) mod postgres;
/// The queries on the embedded store.
pub(in crate::iac) mod sqlite;
#[cfg(test)]
mod tests;

pub(in crate::iac) fn corrupt(id: &str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        id: id.to_string(),
        what: e.to_string(),
    }
}

/// The task pushed with a run job's lease (what `outpost.agent.v1.IacTask` carries).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Task {
    pub run_id: String,
    pub stack: String,
    pub phase: String,
    pub source_digest: String,
    pub tool: String,
    pub plan_policy: String,
    pub variables: std::collections::BTreeMap<String, String>,
    /// Apply: the approved digest, the sealed bundle, the planned-against state.
    #[serde(default)]
    pub plan_digest: String,
    #[serde(default)]
    pub bundle_digest: String,
    #[serde(default)]
    pub state_serial: u64,
    #[serde(default)]
    pub state_lineage: String,
    /// A tracked run queued to revert drift.
    #[serde(default)]
    pub drift: bool,
}

/// Where the tables are.
#[derive(Clone)]
pub(in crate::iac) enum Db {
    /// The embedded store's connection.
    Sqlite(Store),
    /// The PostgreSQL pool.
    Pg(Pool),
}

/// Runs `$body` (a block over the transaction `$tx`, returning
/// `Result<_, StoreError>`) in one transaction of `$db`, committed if it
/// returns `Ok`. On SQLite it runs on the store's connection (its queries
/// never wait, so its future completes at once); on PostgreSQL on a pooled
/// connection, run again (up to `postgres::TRIES` times) if PostgreSQL
/// aborted it to break a deadlock, as long as `$again` (default `true`)
/// says the body may run again: a body that consumed a closure given by
/// its caller is not run twice (the locks are all taken before that, so
/// no abort comes later). The body must not move what it captures.
macro_rules! transact {
    ($db:expr, |$tx:ident| $body:block) => {
        $crate::iac::store::transact!($db, again true, |$tx| $body)
    };
    ($db:expr, again $again:expr, |$tx:ident| $body:block) => {
        match $db {
            $crate::iac::store::Db::Sqlite(store) => {
                store
                    .with(move |c| {
                        let $tx = $crate::iac::store::sqlite::Tx::begin(c)?;
                        let out: Result<_, $crate::store::StoreError> =
                            ::futures::executor::block_on(async { $body });
                        let out = out?;
                        $tx.commit()?;
                        Ok(out)
                    })
                    .await
            }
            $crate::iac::store::Db::Pg(pool) => {
                let mut tries = 0u32;
                loop {
                    tries += 1;
                    let attempt: Result<_, $crate::store::StoreError> = async {
                        let mut o = $crate::iac::store::postgres::client(pool).await?;
                        let $tx = $crate::iac::store::postgres::Tx::begin(&mut o).await?;
                        let out: Result<_, $crate::store::StoreError> = async { $body }.await;
                        let out = out?;
                        $tx.commit().await?;
                        Ok(out)
                    }
                    .await;
                    match attempt {
                        Err(e)
                            if tries < $crate::iac::store::postgres::TRIES
                                && $crate::iac::store::postgres::retryable(&e)
                                && $again =>
                        {
                            continue;
                        }
                        out => break out,
                    }
                }
            }
        }
    };
}
pub(in crate::iac) use transact;

/// The IaC tables; cheap to clone.
#[derive(Clone)]
pub struct IacStore {
    pub(in crate::iac) db: Db,
}

/// Moves `run` to `PLANNING` with `plan_job` and makes its job's task;
/// `None` if it cannot (or `task` was spent).
fn begin_plan<F>(run: &mut Run, plan_job: &str, task: &mut Option<F>) -> Option<Task>
where
    F: FnOnce(&Run) -> Task,
{
    if run.go(RunState::Planning, "").is_err() {
        return None;
    }
    run.plan_job = Some(plan_job.to_string());
    task.take().map(|f| f(run))
}

/// `put_stack`'s answer for `new` over `old`, and the stack to write (the
/// source bookkeeping of `old` kept).
fn merge_stack(old: Option<Stack>, new: &Stack) -> (&'static str, Option<Stack>) {
    match old {
        None => ("created", Some(new.clone())),
        Some(o) if o.spec == new.spec => ("unchanged", None),
        Some(o) => {
            let mut s = new.clone();
            s.created_ms = o.created_ms;
            s.commit = o.commit;
            s.source_digest = o.source_digest;
            s.fetch_error = o.fetch_error;
            s.fetched_ms = o.fetched_ms;
            ("updated", Some(s))
        }
    }
}

impl IacStore {
    /// Creates the tables if needed (on PostgreSQL, the store's migrations
    /// did).
    pub async fn open(store: Store) -> Result<IacStore, IacError> {
        let db = match store.pg() {
            Some(pool) => Db::Pg(pool.clone()),
            None => {
                store.with(sqlite::create).await?;
                Db::Sqlite(store)
            }
        };
        Ok(IacStore { db })
    }

    /// Inserts or replaces a stack; returns `created`, `updated` or `unchanged`.
    pub async fn put_stack(&self, stack: Stack) -> Result<&'static str, IacError> {
        Ok(transact!(&self.db, |tx| {
            tx.lock_stack(&stack.spec.name).await?;
            let old = tx.stack(&stack.spec.name).await?;
            let (action, new) = merge_stack(old, &stack);
            if let Some(s) = new {
                tx.write_stack(&s).await?;
            }
            Ok(action)
        })?)
    }

    /// Rewrites a stack as it is (source bookkeeping).
    pub async fn save_stack(&self, stack: Stack) -> Result<(), IacError> {
        Ok(transact!(&self.db, |tx| { tx.write_stack(&stack).await })?)
    }

    pub async fn get_stack(&self, name: String) -> Result<Option<Stack>, IacError> {
        Ok(transact!(&self.db, |tx| { tx.stack(&name).await })?)
    }

    pub async fn list_stacks(&self) -> Result<Vec<Stack>, IacError> {
        Ok(transact!(&self.db, |tx| { tx.stacks().await })?)
    }

    /// Deletes a stack with no run in progress; false if it did not exist.
    pub async fn delete_stack(&self, name: String) -> Result<bool, IacError> {
        transact!(&self.db, |tx| {
            tx.lock_stack(&name).await?;
            let busy = tx.runs_in_progress(&name).await?;
            if busy > 0 {
                return Ok(Err(IacError::Conflict(format!(
                    "stack {name} has {busy} run(s) in progress; cancel or discard them first"
                ))));
            }
            Ok(Ok(tx.delete_stack(&name).await?))
        })?
    }

    pub async fn insert_run(&self, run: Run) -> Result<Run, IacError> {
        Ok(transact!(&self.db, |tx| {
            tx.lock_stack(&run.stack).await?;
            tx.insert_run(&run).await?;
            Ok(run.clone())
        })?)
    }

    pub async fn get_run(&self, id: String) -> Result<Option<Run>, IacError> {
        Ok(transact!(&self.db, |tx| { tx.run(&id).await })?)
    }

    /// Newest first; `stack` filters.
    pub async fn list_runs(&self, stack: Option<String>, limit: u32) -> Result<Vec<Run>, IacError> {
        Ok(transact!(&self.db, |tx| {
            tx.runs(stack.as_deref(), limit).await
        })?)
    }

    /// Runs not yet final, oldest first.
    pub async fn open_runs(&self) -> Result<Vec<Run>, IacError> {
        Ok(transact!(&self.db, |tx| { tx.open_runs().await })?)
    }

    /// Applies `f` to the run inside one transaction (the run's row
    /// locked); `f` returns an error to refuse the change (nothing is
    /// written then).
    pub async fn update_run<F>(&self, id: String, f: F) -> Result<Run, IacError>
    where
        F: FnOnce(&mut Run) -> Result<(), IacError> + Send + 'static,
    {
        let mut f = Some(f);
        transact!(&self.db, again f.is_some(), |tx| {
            let Some(mut run) = tx.lock_run(&id).await? else {
                return Ok(Err(IacError::NotFound(format!("run {id}"))));
            };
            let Some(f) = f.take() else {
                return Ok(Err(IacError::Conflict(format!("run {id} was not changed"))));
            };
            if let Err(e) = f(&mut run) {
                return Ok(Err(e));
            }
            tx.write_run(&run).await?;
            Ok(Ok(run))
        })?
    }

    /// Takes the stack lock for the oldest queued run of `stack`, if the lock
    /// is free: that run becomes `PLANNING` with `plan_job`, and the job's
    /// task is recorded. Returns the run, or `None` if nothing can start.
    pub async fn start_next(
        &self,
        stack: String,
        plan_job: String,
        task: impl FnOnce(&Run) -> Task + Send + 'static,
    ) -> Result<Option<(Run, Task)>, IacError> {
        let mut task = Some(task);
        Ok(transact!(&self.db, again task.is_some(), |tx| {
            tx.lock_stack(&stack).await?;
            if tx.stack_locked(&stack).await? {
                return Ok(None);
            }
            let Some(id) = tx.next_queued(&stack).await? else {
                return Ok(None);
            };
            let Some(mut run) = tx.lock_run(&id).await? else {
                return Ok(None);
            };
            let Some(task) = begin_plan(&mut run, &plan_job, &mut task) else {
                return Ok(None);
            };
            tx.insert_job(&plan_job, &task).await?;
            tx.write_run(&run).await?;
            Ok(Some((run, task)))
        })?)
    }

    /// Starts a run that takes no stack lock (a proposed run), or a drift
    /// check (`drift_check`: only if no tracked run of its stack is queued
    /// or holds the lock). Returns the run, or `None` if it cannot start.
    pub async fn start_unlocked(
        &self,
        run_id: String,
        plan_job: String,
        drift_check: bool,
        task: impl FnOnce(&Run) -> Task + Send + 'static,
    ) -> Result<Option<Run>, IacError> {
        let mut task = Some(task);
        Ok(transact!(&self.db, again task.is_some(), |tx| {
            let Some(stack) = tx.run(&run_id).await?.map(|r| r.stack) else {
                return Ok(None);
            };
            tx.lock_stack(&stack).await?;
            if drift_check && tx.tracked_busy(&stack).await?.is_some() {
                return Ok(None);
            }
            let Some(mut run) = tx.lock_run(&run_id).await? else {
                return Ok(None);
            };
            let Some(task) = begin_plan(&mut run, &plan_job, &mut task) else {
                return Ok(None);
            };
            tx.insert_job(&plan_job, &task).await?;
            tx.write_run(&run).await?;
            Ok(Some(run))
        })?)
    }

    /// The tracked run of `stack` that is queued or holds the lock, if any.
    pub async fn tracked_busy(&self, stack: String) -> Result<Option<String>, IacError> {
        Ok(transact!(&self.db, |tx| { tx.tracked_busy(&stack).await })?)
    }

    /// The newest run of `stack` of `kind` in one of `states` (or any state
    /// if empty).
    pub async fn newest_run(
        &self,
        stack: String,
        kind: RunKind,
        states: &'static [&'static str],
    ) -> Result<Option<Run>, IacError> {
        Ok(transact!(&self.db, |tx| {
            match tx.newest_run(&stack, kind, states).await? {
                None => Ok(None),
                Some(id) => tx.run(&id).await,
            }
        })?)
    }

    /// Every stack's drift state (stacks never checked are absent).
    pub async fn drift_states(&self) -> Result<BTreeMap<String, DriftState>, IacError> {
        Ok(transact!(&self.db, |tx| {
            Ok(tx.drift_states().await?.into_iter().collect())
        })?)
    }

    /// Applies `f` to the stack's drift state in one transaction (its row
    /// locked); returns what `f` returned and the new state.
    pub async fn update_drift<F, T>(&self, name: String, f: F) -> Result<(DriftState, T), IacError>
    where
        F: FnOnce(&mut DriftState) -> T + Send + 'static,
        T: Send + 'static,
    {
        let mut f = Some(f);
        transact!(&self.db, again f.is_some(), |tx| {
            let mut state = tx.lock_drift(&name).await?.unwrap_or_default();
            let Some(f) = f.take() else {
                return Ok(Err(IacError::Conflict(format!(
                    "the drift state of {name} was not changed"
                ))));
            };
            let out = f(&mut state);
            tx.write_drift(&name, &state).await?;
            Ok(Ok((state, out)))
        })?
    }

    /// The tasks of those of `job_ids` that are runs' jobs (one store
    /// call for a whole dispatch pass).
    pub async fn tasks_of(&self, job_ids: Vec<String>) -> Result<HashMap<String, Task>, IacError> {
        Ok(transact!(&self.db, |tx| {
            let mut out = HashMap::new();
            for job_id in &job_ids {
                if let Some(task) = tx.task(job_id).await? {
                    out.insert(job_id.clone(), task);
                }
            }
            Ok(out)
        })?)
    }

    /// The task of a run's job, if `job_id` is one.
    pub async fn task_of(&self, job_id: String) -> Result<Option<Task>, IacError> {
        Ok(self.tasks_of(vec![job_id.clone()]).await?.remove(&job_id))
    }
}
