//! The IaC tables on PostgreSQL, shared by every control-plane replica:
//! the queries behind [`Tx`]. Several replicas run these transactions at
//! once, so the locks the facade asks for are real here:
//! - the stack lock is a transaction-scoped advisory lock keyed on the
//!   stack's name (`pg_advisory_xact_lock(STACK_LOCK, hashtext(name))`),
//!   held until `COMMIT`; it needs no row, so it also serializes a stack
//!   being created or deleted;
//! - a run or drift row read to be changed is locked (`FOR UPDATE`), so
//!   concurrent changes of one row run one after the other, each on the
//!   row the other committed.
//!
//! Every transaction takes the stack lock (if any) before a row lock and
//! at most one of each, so two transactions never wait on each other in a
//! cycle; one PostgreSQL aborts anyway (deadlock, serialization) runs
//! again, up to [`TRIES`] times (see `transact!`).

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::{Task, corrupt};
use crate::iac::drift::DriftState;
use crate::iac::model::{Run, RunKind, Stack};
use crate::iac::state::StateVersion;
use crate::store::StoreError;
use crate::store::postgres::{pg, pool_err};

/// The IaC tables (migration 2 of `store::postgres::schema`). A run's
/// kind is a column of its own.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE stacks (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE runs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    stack TEXT NOT NULL,
    state TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX runs_stack ON runs (stack, seq);
CREATE INDEX runs_state ON runs (state, seq);
CREATE TABLE stack_drift (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE iac_jobs (
    job_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    task TEXT NOT NULL
);
CREATE TABLE iac_state_versions (
    seq BIGSERIAL PRIMARY KEY,
    stack TEXT NOT NULL,
    serial BIGINT NOT NULL,
    lineage TEXT NOT NULL,
    digest TEXT NOT NULL,
    written_by TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX iac_state_versions_stack ON iac_state_versions (stack, seq);
"#;

/// The first key of the stacks' advisory locks ("stak"); the second is
/// the hash of the stack's name.
const STACK_LOCK: i32 = 0x7374_616b;

/// Whole transactions run at most when PostgreSQL aborts one.
pub(in crate::iac) const TRIES: u32 = 3;

/// Runs in progress.
const IN_PROGRESS: &str = "state IN ('QUEUED','PLANNING','UNCONFIRMED','CONFIRMED','APPLYING')";

const STATE_COLS: &str = "stack, serial, lineage, digest, written_by, at_ms";

/// Whether a transaction that failed with `e` may simply run again.
pub(in crate::iac) fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Pg { source, .. } if source.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    }))
}

/// A pooled connection.
pub(in crate::iac) async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(pool_err("take a connection"))
}

/// Parses `(key, body)` rows.
fn bodies<T: serde::de::DeserializeOwned>(
    op: &'static str,
    rows: Vec<tokio_postgres::Row>,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let key: String = row.try_get(0).map_err(pg(op))?;
        let body: String = row.try_get(1).map_err(pg(op))?;
        let value = serde_json::from_str(&body).map_err(|e| corrupt(&key, e))?;
        out.push((key, value));
    }
    Ok(out)
}

fn state_row(op: &'static str, r: &tokio_postgres::Row) -> Result<StateVersion, StoreError> {
    Ok(StateVersion {
        stack: r.try_get(0).map_err(pg(op))?,
        serial: r.try_get::<_, i64>(1).map_err(pg(op))? as u64,
        lineage: r.try_get(2).map_err(pg(op))?,
        digest: r.try_get(3).map_err(pg(op))?,
        written_by: r.try_get(4).map_err(pg(op))?,
        at_ms: r.try_get(5).map_err(pg(op))?,
    })
}

/// One transaction on a pooled connection (rolled back if dropped before
/// [`Tx::commit`]).
pub(in crate::iac) struct Tx<'c>(tokio_postgres::Transaction<'c>);

impl<'c> Tx<'c> {
    pub(in crate::iac) async fn begin(
        o: &'c mut deadpool_postgres::Object,
    ) -> Result<Tx<'c>, StoreError> {
        let client: &mut tokio_postgres::Client = o;
        client
            .transaction()
            .await
            .map(Tx)
            .map_err(pg("begin iac transaction"))
    }

    pub(in crate::iac) async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await.map_err(pg("commit iac transaction"))
    }

    async fn opt_string(
        &self,
        op: &'static str,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<String>, StoreError> {
        self.0
            .query_opt(sql, args)
            .await
            .map_err(pg(op))?
            .map(|r| r.try_get(0).map_err(pg(op)))
            .transpose()
    }

    async fn opt_body<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        key: &str,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        self.opt_string(op, sql, args)
            .await?
            .map(|b| serde_json::from_str(&b).map_err(|e| corrupt(key, e)))
            .transpose()
    }

    async fn count(
        &self,
        op: &'static str,
        sql: &str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<i64, StoreError> {
        self.0
            .query_one(sql, args)
            .await
            .map_err(pg(op))?
            .try_get(0)
            .map_err(pg(op))
    }

    /// The stack lock, held until the transaction ends.
    pub(in crate::iac) async fn lock_stack(&self, stack: &str) -> Result<(), StoreError> {
        self.0
            .execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&STACK_LOCK, &stack],
            )
            .await
            .map_err(pg("take the stack lock"))?;
        Ok(())
    }

    pub(in crate::iac) async fn stack(&self, name: &str) -> Result<Option<Stack>, StoreError> {
        self.opt_body(
            "read stack",
            name,
            "SELECT body FROM stacks WHERE name = $1",
            &[&name],
        )
        .await
    }

    pub(in crate::iac) async fn stacks(&self) -> Result<Vec<Stack>, StoreError> {
        let rows = self
            .0
            .query("SELECT name, body FROM stacks ORDER BY name", &[])
            .await
            .map_err(pg("list stacks"))?;
        Ok(bodies("list stacks", rows)?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    pub(in crate::iac) async fn write_stack(&self, s: &Stack) -> Result<(), StoreError> {
        let body = serde_json::to_string(s).map_err(|e| corrupt(&s.spec.name, e))?;
        self.0
            .execute(
                "INSERT INTO stacks (name, body) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                &[&s.spec.name, &body],
            )
            .await
            .map_err(pg("write stack"))?;
        Ok(())
    }

    /// Deletes the stack and its drift state; whether the stack existed.
    pub(in crate::iac) async fn delete_stack(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .0
            .execute("DELETE FROM stacks WHERE name = $1", &[&name])
            .await
            .map_err(pg("delete stack"))?;
        self.0
            .execute("DELETE FROM stack_drift WHERE name = $1", &[&name])
            .await
            .map_err(pg("delete stack drift"))?;
        Ok(n > 0)
    }

    /// Runs of `stack` in progress, of any kind.
    pub(in crate::iac) async fn runs_in_progress(&self, stack: &str) -> Result<i64, StoreError> {
        self.count(
            "count active runs",
            &format!("SELECT COUNT(*) FROM runs WHERE stack = $1 AND {IN_PROGRESS}"),
            &[&stack],
        )
        .await
    }

    /// Whether a tracked run of `stack` holds the lock or a drift check
    /// of it is planning.
    pub(in crate::iac) async fn stack_locked(&self, stack: &str) -> Result<bool, StoreError> {
        let n = self
            .count(
                "check stack lock",
                "SELECT COUNT(*) FROM runs WHERE stack = $1 AND ((state IN ('PLANNING','UNCONFIRMED','CONFIRMED','APPLYING') AND kind = 'tracked') OR (state = 'PLANNING' AND kind = 'drift'))",
                &[&stack],
            )
            .await?;
        Ok(n > 0)
    }

    /// The oldest tracked run of `stack` queued or holding the lock.
    pub(in crate::iac) async fn tracked_busy(
        &self,
        stack: &str,
    ) -> Result<Option<String>, StoreError> {
        self.opt_string(
            "find busy tracked run",
            &format!("SELECT id FROM runs WHERE stack = $1 AND kind = 'tracked' AND {IN_PROGRESS} ORDER BY seq LIMIT 1"),
            &[&stack],
        )
        .await
    }

    /// The oldest queued tracked run of `stack`.
    pub(in crate::iac) async fn next_queued(
        &self,
        stack: &str,
    ) -> Result<Option<String>, StoreError> {
        self.opt_string(
            "find queued run",
            "SELECT id FROM runs WHERE stack = $1 AND state = 'QUEUED' AND kind = 'tracked' ORDER BY seq LIMIT 1",
            &[&stack],
        )
        .await
    }

    /// The newest run of `stack` of `kind` in one of `states` (any if empty).
    pub(in crate::iac) async fn newest_run(
        &self,
        stack: &str,
        kind: RunKind,
        states: &[&str],
    ) -> Result<Option<String>, StoreError> {
        self.opt_string(
            "find newest run",
            "SELECT id FROM runs WHERE stack = $1 AND kind = $2 AND (cardinality($3::TEXT[]) = 0 OR state = ANY($3))
             ORDER BY seq DESC LIMIT 1",
            &[&stack, &kind.as_str(), &states],
        )
        .await
    }

    pub(in crate::iac) async fn run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        self.opt_body(
            "read run",
            id,
            "SELECT body FROM runs WHERE id = $1",
            &[&id],
        )
        .await
    }

    /// The run, its row locked until the transaction ends.
    pub(in crate::iac) async fn lock_run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        self.opt_body(
            "lock run",
            id,
            "SELECT body FROM runs WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
    }

    /// Newest first; `stack` filters.
    pub(in crate::iac) async fn runs(
        &self,
        stack: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Run>, StoreError> {
        let rows = self
            .0
            .query(
                "SELECT id, body FROM runs WHERE ($1::TEXT IS NULL OR stack = $1) ORDER BY seq DESC LIMIT $2",
                &[&stack, &i64::from(limit)],
            )
            .await
            .map_err(pg("list runs"))?;
        Ok(bodies("list runs", rows)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// Runs in progress, oldest first.
    pub(in crate::iac) async fn open_runs(&self) -> Result<Vec<Run>, StoreError> {
        let rows = self
            .0
            .query(
                &format!("SELECT id, body FROM runs WHERE {IN_PROGRESS} ORDER BY seq"),
                &[],
            )
            .await
            .map_err(pg("open runs"))?;
        Ok(bodies("open runs", rows)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    pub(in crate::iac) async fn insert_run(&self, r: &Run) -> Result<(), StoreError> {
        let body = serde_json::to_string(r).map_err(|e| corrupt(&r.id, e))?;
        self.0
            .execute(
                "INSERT INTO runs (id, stack, state, kind, body) VALUES ($1, $2, $3, $4, $5)",
                &[&r.id, &r.stack, &r.state.as_str(), &r.kind.as_str(), &body],
            )
            .await
            .map_err(pg("insert run"))?;
        Ok(())
    }

    pub(in crate::iac) async fn write_run(&self, r: &Run) -> Result<(), StoreError> {
        let body = serde_json::to_string(r).map_err(|e| corrupt(&r.id, e))?;
        self.0
            .execute(
                "UPDATE runs SET state = $2, kind = $3, body = $4 WHERE id = $1",
                &[&r.id, &r.state.as_str(), &r.kind.as_str(), &body],
            )
            .await
            .map_err(pg("write run"))?;
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
                "INSERT INTO iac_jobs (job_id, run_id, phase, task) VALUES ($1, $2, $3, $4)",
                &[&job_id, &task.run_id, &task.phase, &json],
            )
            .await
            .map_err(pg("record run job"))?;
        Ok(())
    }

    pub(in crate::iac) async fn task(&self, job_id: &str) -> Result<Option<Task>, StoreError> {
        self.opt_body(
            "read run job",
            job_id,
            "SELECT task FROM iac_jobs WHERE job_id = $1",
            &[&job_id],
        )
        .await
    }

    pub(in crate::iac) async fn drift_states(
        &self,
    ) -> Result<Vec<(String, DriftState)>, StoreError> {
        let rows = self
            .0
            .query("SELECT name, body FROM stack_drift", &[])
            .await
            .map_err(pg("drift states"))?;
        bodies("drift states", rows)
    }

    /// The stack's drift state, its row (created empty if missing)
    /// locked until the transaction ends.
    pub(in crate::iac) async fn lock_drift(
        &self,
        name: &str,
    ) -> Result<Option<DriftState>, StoreError> {
        self.0
            .execute(
                "INSERT INTO stack_drift (name, body) VALUES ($1, '{}') ON CONFLICT (name) DO NOTHING",
                &[&name],
            )
            .await
            .map_err(pg("create drift row"))?;
        self.opt_body(
            "lock drift",
            name,
            "SELECT body FROM stack_drift WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await
    }

    pub(in crate::iac) async fn write_drift(
        &self,
        name: &str,
        d: &DriftState,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(d).map_err(|e| corrupt(name, e))?;
        self.0
            .execute(
                "INSERT INTO stack_drift (name, body) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body",
                &[&name, &body],
            )
            .await
            .map_err(pg("write drift"))?;
        Ok(())
    }

    pub(in crate::iac) async fn current_state(
        &self,
        stack: &str,
    ) -> Result<Option<StateVersion>, StoreError> {
        let op = "read current state";
        self.0
            .query_opt(
                &format!(
                    "SELECT {STATE_COLS} FROM iac_state_versions WHERE stack = $1 ORDER BY seq DESC LIMIT 1"
                ),
                &[&stack],
            )
            .await
            .map_err(pg(op))?
            .map(|r| state_row(op, &r))
            .transpose()
    }

    /// The stack's versions, newest first.
    pub(in crate::iac) async fn state_versions(
        &self,
        stack: &str,
        limit: u32,
    ) -> Result<Vec<StateVersion>, StoreError> {
        let op = "state versions";
        self.0
            .query(
                &format!(
                    "SELECT {STATE_COLS} FROM iac_state_versions WHERE stack = $1 ORDER BY seq DESC LIMIT $2"
                ),
                &[&stack, &i64::from(limit)],
            )
            .await
            .map_err(pg(op))?
            .iter()
            .map(|r| state_row(op, r))
            .collect()
    }

    pub(in crate::iac) async fn insert_state(&self, v: &StateVersion) -> Result<(), StoreError> {
        let serial = i64::try_from(v.serial).map_err(|_| StoreError::Corrupt {
            id: v.stack.clone(),
            what: "state serial out of range".into(),
        })?;
        self.0
            .execute(
                "INSERT INTO iac_state_versions (stack, serial, lineage, digest, written_by, at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &v.stack,
                    &serial,
                    &v.lineage,
                    &v.digest,
                    &v.written_by,
                    &v.at_ms,
                ],
            )
            .await
            .map_err(pg("insert state version"))?;
        Ok(())
    }
}
