//! The IaC tables, in the control plane's one SQLite database (so a run and
//! its jobs live in the same durable store): `stacks`, `runs` and
//! `iac_jobs` (which job is which phase of which run, and the task pushed
//! with its lease).
//!
//! **Invariant:** the stack lock: a tracked run leaves `QUEUED` only inside
//! the transaction that finds no other tracked run of its stack in a
//! lock-holding state (`PLANNING`, `UNCONFIRMED`, `CONFIRMED`, `APPLYING`)
//! and no drift check planning; a drift check starts only inside the
//! transaction that finds no tracked run of its stack queued or holding the
//! lock. Proposed runs take no lock.

use rusqlite::{Connection, OptionalExtension, params};

use super::IacError;
use super::model::{Run, RunState, Stack};
use crate::store::{Store, StoreError};

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

pub(super) fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

pub(super) fn corrupt(id: &str, e: serde_json::Error) -> StoreError {
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

/// `kind` of a run row (rows written before kinds existed are tracked).
const KIND: &str = "COALESCE(json_extract(body, '$.kind'), 'tracked')";

/// The IaC tables; cheap to clone.
#[derive(Clone)]
pub struct IacStore {
    pub(super) store: Store,
}

impl IacStore {
    /// Creates the tables if needed.
    pub async fn open(store: Store) -> Result<IacStore, IacError> {
        store
            .with(|c| c.execute_batch(SCHEMA).map_err(q("create iac tables")))
            .await?;
        Ok(IacStore { store })
    }

    /// Inserts or replaces a stack; returns `created`, `updated` or `unchanged`.
    pub async fn put_stack(&self, stack: Stack) -> Result<&'static str, IacError> {
        Ok(self
            .store
            .with(move |c| {
                let tx = c.transaction().map_err(q("begin put stack"))?;
                let old = get_stack(&tx, &stack.spec.name)?;
                let action = match &old {
                    None => "created",
                    Some(o) if o.spec == stack.spec => "unchanged",
                    Some(_) => "updated",
                };
                if action != "unchanged" {
                    let mut s = stack;
                    if let Some(o) = old {
                        s.created_ms = o.created_ms;
                        s.commit = o.commit;
                        s.source_digest = o.source_digest;
                        s.fetch_error = o.fetch_error;
                        s.fetched_ms = o.fetched_ms;
                    }
                    write_stack(&tx, &s)?;
                }
                tx.commit().map_err(q("commit put stack"))?;
                Ok(action)
            })
            .await?)
    }

    /// Rewrites a stack as it is (source bookkeeping).
    pub async fn save_stack(&self, stack: Stack) -> Result<(), IacError> {
        Ok(self.store.with(move |c| write_stack(c, &stack)).await?)
    }

    pub async fn get_stack(&self, name: String) -> Result<Option<Stack>, IacError> {
        Ok(self.store.with(move |c| get_stack(c, &name)).await?)
    }

    pub async fn list_stacks(&self) -> Result<Vec<Stack>, IacError> {
        Ok(self
            .store
            .with(|c| {
                let mut stmt = c
                    .prepare_cached("SELECT name, body FROM stacks ORDER BY name")
                    .map_err(q("prepare list stacks"))?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                    .map_err(q("list stacks"))?;
                let mut out = Vec::new();
                for row in rows {
                    let (name, body) = row.map_err(q("read stack row"))?;
                    out.push(serde_json::from_str(&body).map_err(|e| corrupt(&name, e))?);
                }
                Ok(out)
            })
            .await?)
    }

    /// Deletes a stack with no run in progress; false if it did not exist.
    pub async fn delete_stack(&self, name: String) -> Result<bool, IacError> {
        self.store
            .with(move |c| {
                let tx = c.transaction().map_err(q("begin delete stack"))?;
                let busy: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM runs WHERE stack = ?1 AND state IN ('QUEUED','PLANNING','UNCONFIRMED','CONFIRMED','APPLYING')",
                        params![name],
                        |r| r.get(0),
                    )
                    .map_err(q("count active runs"))?;
                if busy > 0 {
                    return Ok(Err(IacError::Conflict(format!(
                        "stack {name} has {busy} run(s) in progress; cancel or discard them first"
                    ))));
                }
                let n = tx
                    .execute("DELETE FROM stacks WHERE name = ?1", params![name])
                    .map_err(q("delete stack"))?;
                tx.execute("DELETE FROM stack_drift WHERE name = ?1", params![name])
                    .map_err(q("delete stack drift"))?;
                tx.commit().map_err(q("commit delete stack"))?;
                Ok(Ok(n > 0))
            })
            .await?
    }

    pub async fn insert_run(&self, run: Run) -> Result<Run, IacError> {
        Ok(self
            .store
            .with(move |c| {
                let body = serde_json::to_string(&run).map_err(|e| corrupt(&run.id, e))?;
                c.execute(
                    "INSERT INTO runs (id, stack, state, body) VALUES (?1, ?2, ?3, ?4)",
                    params![run.id, run.stack, run.state.as_str(), body],
                )
                .map_err(q("insert run"))?;
                Ok(run)
            })
            .await?)
    }

    pub async fn get_run(&self, id: String) -> Result<Option<Run>, IacError> {
        Ok(self.store.with(move |c| get_run(c, &id)).await?)
    }

    /// Newest first; `stack` filters.
    pub async fn list_runs(&self, stack: Option<String>, limit: u32) -> Result<Vec<Run>, IacError> {
        Ok(self
            .store
            .with(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT id, body FROM runs WHERE (?1 IS NULL OR stack = ?1) ORDER BY seq DESC LIMIT ?2",
                    )
                    .map_err(q("prepare list runs"))?;
                let rows = stmt
                    .query_map(params![stack, limit], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })
                    .map_err(q("list runs"))?;
                let mut out = Vec::new();
                for row in rows {
                    let (id, body) = row.map_err(q("read run row"))?;
                    out.push(serde_json::from_str(&body).map_err(|e| corrupt(&id, e))?);
                }
                Ok(out)
            })
            .await?)
    }

    /// Runs not yet final, oldest first.
    pub async fn open_runs(&self) -> Result<Vec<Run>, IacError> {
        Ok(self
            .store
            .with(|c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT id, body FROM runs WHERE state IN ('QUEUED','PLANNING','UNCONFIRMED','CONFIRMED','APPLYING') ORDER BY seq",
                    )
                    .map_err(q("prepare open runs"))?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                    .map_err(q("open runs"))?;
                let mut out = Vec::new();
                for row in rows {
                    let (id, body) = row.map_err(q("read run row"))?;
                    out.push(serde_json::from_str(&body).map_err(|e| corrupt(&id, e))?);
                }
                Ok(out)
            })
            .await?)
    }

    /// Applies `f` to the run inside one transaction; `f` returns an error
    /// message to refuse the change (nothing is written then).
    pub async fn update_run<F>(&self, id: String, f: F) -> Result<Run, IacError>
    where
        F: FnOnce(&mut Run) -> Result<(), IacError> + Send + 'static,
    {
        self.store
            .with(move |c| {
                let tx = c.transaction().map_err(q("begin update run"))?;
                let Some(mut run) = get_run(&tx, &id)? else {
                    return Ok(Err(IacError::NotFound(format!("run {id}"))));
                };
                if let Err(e) = f(&mut run) {
                    return Ok(Err(e));
                }
                write_run(&tx, &run)?;
                tx.commit().map_err(q("commit update run"))?;
                Ok(Ok(run))
            })
            .await?
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
        Ok(self
            .store
            .with(move |c| {
                let tx = c.transaction().map_err(q("begin start run"))?;
                let locked: i64 = tx
                    .query_row(
                        &format!("SELECT COUNT(*) FROM runs WHERE stack = ?1 AND ((state IN ('PLANNING','UNCONFIRMED','CONFIRMED','APPLYING') AND {KIND} = 'tracked') OR (state = 'PLANNING' AND {KIND} = 'drift'))"),
                        params![stack],
                        |r| r.get(0),
                    )
                    .map_err(q("check stack lock"))?;
                if locked > 0 {
                    return Ok(None);
                }
                let next: Option<String> = tx
                    .query_row(
                        &format!("SELECT id FROM runs WHERE stack = ?1 AND state = 'QUEUED' AND {KIND} = 'tracked' ORDER BY seq LIMIT 1"),
                        params![stack],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(q("find queued run"))?;
                let Some(id) = next else { return Ok(None) };
                let Some(mut run) = get_run(&tx, &id)? else {
                    return Ok(None);
                };
                if run.go(RunState::Planning, "").is_err() {
                    return Ok(None);
                }
                run.plan_job = Some(plan_job.clone());
                let task = task(&run);
                let json = serde_json::to_string(&task).map_err(|e| corrupt(&id, e))?;
                tx.execute(
                    "INSERT INTO iac_jobs (job_id, run_id, phase, task) VALUES (?1, ?2, ?3, ?4)",
                    params![plan_job, id, task.phase, json],
                )
                .map_err(q("record run job"))?;
                write_run(&tx, &run)?;
                tx.commit().map_err(q("commit start run"))?;
                Ok(Some((run, task)))
            })
            .await?)
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
        Ok(self
            .store
            .with(move |c| {
                let tx = c.transaction().map_err(q("begin start run"))?;
                let Some(mut run) = get_run(&tx, &run_id)? else {
                    return Ok(None);
                };
                if drift_check {
                    let busy: i64 = tx
                        .query_row(
                            &format!("SELECT COUNT(*) FROM runs WHERE stack = ?1 AND {KIND} = 'tracked' AND state IN ('QUEUED','PLANNING','UNCONFIRMED','CONFIRMED','APPLYING')"),
                            params![run.stack],
                            |r| r.get(0),
                        )
                        .map_err(q("check stack lock"))?;
                    if busy > 0 {
                        return Ok(None);
                    }
                }
                if run.go(RunState::Planning, "").is_err() {
                    return Ok(None);
                }
                run.plan_job = Some(plan_job.clone());
                let task = task(&run);
                let json = serde_json::to_string(&task).map_err(|e| corrupt(&run_id, e))?;
                tx.execute(
                    "INSERT INTO iac_jobs (job_id, run_id, phase, task) VALUES (?1, ?2, ?3, ?4)",
                    params![plan_job, run_id, task.phase, json],
                )
                .map_err(q("record run job"))?;
                write_run(&tx, &run)?;
                tx.commit().map_err(q("commit start run"))?;
                Ok(Some(run))
            })
            .await?)
    }

    /// The tracked run of `stack` that is queued or holds the lock, if any.
    pub async fn tracked_busy(&self, stack: String) -> Result<Option<String>, IacError> {
        Ok(self
            .store
            .with(move |c| {
                c.query_row(
                    &format!("SELECT id FROM runs WHERE stack = ?1 AND {KIND} = 'tracked' AND state IN ('QUEUED','PLANNING','UNCONFIRMED','CONFIRMED','APPLYING') ORDER BY seq LIMIT 1"),
                    params![stack],
                    |r| r.get(0),
                )
                .optional()
                .map_err(q("find busy tracked run"))
            })
            .await?)
    }

    /// The newest run of `stack` of `kind` in one of `states` (or any state
    /// if empty).
    pub async fn newest_run(
        &self,
        stack: String,
        kind: super::model::RunKind,
        states: &'static [&'static str],
    ) -> Result<Option<Run>, IacError> {
        Ok(self
            .store
            .with(move |c| {
                let list = if states.is_empty() {
                    String::from("1")
                } else {
                    format!(
                        "state IN ({})",
                        states.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(",")
                    )
                };
                let id: Option<String> = c
                    .query_row(
                        &format!("SELECT id FROM runs WHERE stack = ?1 AND {KIND} = ?2 AND {list} ORDER BY seq DESC LIMIT 1"),
                        params![stack, kind.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(q("find newest run"))?;
                match id {
                    None => Ok(None),
                    Some(id) => get_run(c, &id),
                }
            })
            .await?)
    }

    /// Every stack's drift state (stacks never checked are absent).
    pub async fn drift_states(
        &self,
    ) -> Result<std::collections::BTreeMap<String, super::drift::DriftState>, IacError> {
        Ok(self
            .store
            .with(|c| {
                let mut stmt = c
                    .prepare_cached("SELECT name, body FROM stack_drift")
                    .map_err(q("prepare drift states"))?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                    .map_err(q("drift states"))?;
                let mut out = std::collections::BTreeMap::new();
                for row in rows {
                    let (name, body) = row.map_err(q("read drift row"))?;
                    out.insert(
                        name.clone(),
                        serde_json::from_str(&body).map_err(|e| corrupt(&name, e))?,
                    );
                }
                Ok(out)
            })
            .await?)
    }

    /// Applies `f` to the stack's drift state in one transaction; returns
    /// what `f` returned and the new state.
    pub async fn update_drift<F, T>(
        &self,
        name: String,
        f: F,
    ) -> Result<(super::drift::DriftState, T), IacError>
    where
        F: FnOnce(&mut super::drift::DriftState) -> T + Send + 'static,
        T: Send + 'static,
    {
        Ok(self
            .store
            .with(move |c| {
                let tx = c.transaction().map_err(q("begin update drift"))?;
                let body: Option<String> = tx
                    .query_row(
                        "SELECT body FROM stack_drift WHERE name = ?1",
                        params![name],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(q("read drift"))?;
                let mut state: super::drift::DriftState = match body {
                    Some(b) => serde_json::from_str(&b).map_err(|e| corrupt(&name, e))?,
                    None => Default::default(),
                };
                let out = f(&mut state);
                let body = serde_json::to_string(&state).map_err(|e| corrupt(&name, e))?;
                tx.execute(
                    "INSERT INTO stack_drift (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET body = ?2",
                    params![name, body],
                )
                .map_err(q("write drift"))?;
                tx.commit().map_err(q("commit drift"))?;
                Ok((state, out))
            })
            .await?)
    }

    /// The task of a run's job, if `job_id` is one.
    /// The tasks of those of `job_ids` that are runs' jobs (one store
    /// call for a whole dispatch pass).
    pub async fn tasks_of(
        &self,
        job_ids: Vec<String>,
    ) -> Result<std::collections::HashMap<String, Task>, IacError> {
        Ok(self
            .store
            .with(move |c| {
                let mut stmt = c
                    .prepare_cached("SELECT task FROM iac_jobs WHERE job_id = ?1")
                    .map_err(q("read run job"))?;
                let mut out = std::collections::HashMap::new();
                for job_id in job_ids {
                    let json: Option<String> = stmt
                        .query_row(params![job_id], |r| r.get(0))
                        .optional()
                        .map_err(q("read run job"))?;
                    if let Some(j) = json {
                        let task = serde_json::from_str(&j).map_err(|e| corrupt(&job_id, e))?;
                        out.insert(job_id, task);
                    }
                }
                Ok(out)
            })
            .await?)
    }

    pub async fn task_of(&self, job_id: String) -> Result<Option<Task>, IacError> {
        Ok(self
            .store
            .with(move |c| {
                let json: Option<String> = c
                    .query_row(
                        "SELECT task FROM iac_jobs WHERE job_id = ?1",
                        params![job_id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(q("read run job"))?;
                json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt(&job_id, e)))
                    .transpose()
            })
            .await?)
    }
}

fn write_stack(c: &Connection, s: &Stack) -> Result<(), StoreError> {
    let body = serde_json::to_string(s).map_err(|e| corrupt(&s.spec.name, e))?;
    c.execute(
        "INSERT INTO stacks (name, body) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET body = ?2",
        params![s.spec.name, body],
    )
    .map_err(q("write stack"))?;
    Ok(())
}

fn get_stack(c: &Connection, name: &str) -> Result<Option<Stack>, StoreError> {
    let body: Option<String> = c
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

pub(super) fn write_run(c: &Connection, r: &Run) -> Result<(), StoreError> {
    let body = serde_json::to_string(r).map_err(|e| corrupt(&r.id, e))?;
    c.execute(
        "UPDATE runs SET state = ?2, body = ?3 WHERE id = ?1",
        params![r.id, r.state.as_str(), body],
    )
    .map_err(q("write run"))?;
    Ok(())
}

pub(super) fn get_run(c: &Connection, id: &str) -> Result<Option<Run>, StoreError> {
    let body: Option<String> = c
        .query_row("SELECT body FROM runs WHERE id = ?1", params![id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(q("read run"))?;
    body.map(|b| serde_json::from_str(&b).map_err(|e| corrupt(id, e)))
        .transpose()
}
