//! The schema, its migrations, and reading job rows.

use rusqlite::{Connection, params};

use super::{StoreError, q};
use crate::model::Job;

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    agent_id TEXT,
    exit_code INTEGER,
    message TEXT NOT NULL DEFAULT '',
    oom_killed INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER NOT NULL DEFAULT 0,
    finished_ms INTEGER NOT NULL DEFAULT 0,
    lease_deadline_ms INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    log_acked INTEGER NOT NULL DEFAULT 0,
    log_total INTEGER,
    undelivered INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS logs (
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, epoch, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    labels TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    draining INTEGER NOT NULL DEFAULT 0,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    path TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    etag TEXT NOT NULL,
    uploaded_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, epoch, path)
) WITHOUT ROWID;
"#;

pub(super) const JOB_COLS: &str = "id, spec, state, epoch, agent_id, exit_code, message, oom_killed, created_ms, started_ms, finished_ms, lease_deadline_ms, cancel_requested, log_acked, log_total";

/// Brings a store made by an earlier version up to the current schema.
pub(super) fn migrate(c: &Connection) -> rusqlite::Result<()> {
    let has_undelivered: bool = c.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'undelivered'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_undelivered {
        c.execute_batch("ALTER TABLE jobs ADD COLUMN undelivered INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

pub(crate) fn current(
    c: &Connection,
    id: &str,
    epoch: u64,
    agent: &str,
) -> Result<Job, StoreError> {
    let job = get_job(c, id)?.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    if job.epoch != epoch || !job.state.is_active() || job.agent_id.as_deref() != Some(agent) {
        return Err(StoreError::Stale {
            job_id: id.to_string(),
            epoch,
        });
    }
    Ok(job)
}

/// Clears the secret values of a job that just became final; the names
/// stay. With `secure_delete` the old bytes are overwritten in the database
/// file; the WAL keeps the old page until its next checkpoint.
pub(super) fn forget_secrets(c: &Connection, id: &str) -> Result<(), StoreError> {
    let Some(job) = get_job(c, id)? else {
        return Ok(());
    };
    if !job.spec.holds_secret_values() {
        return Ok(());
    }
    let (_, json) = crate::store::rows::spec_without_secrets(id, &job.spec)?;
    c.execute("UPDATE jobs SET spec = ?2 WHERE id = ?1", params![id, json])
        .map_err(q("forget secrets"))?;
    Ok(())
}

pub(super) fn get_job(c: &Connection, id: &str) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1");
    Ok(select_jobs(c, &sql, params![id])?.into_iter().next())
}

pub(super) fn select_jobs(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Job>, StoreError> {
    let mut stmt = c.prepare_cached(sql).map_err(q("prepare select jobs"))?;
    let mut rows = stmt.query(params).map_err(q("select jobs"))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(q("read job row"))? {
        out.push(row_to_job(r)?);
    }
    Ok(out)
}

pub(super) fn row_to_job(r: &rusqlite::Row<'_>) -> Result<Job, StoreError> {
    let g = q("read job column");
    let id: String = r.get(0).map_err(q("read job id"))?;
    let spec: String = r.get(1).map_err(q("read job spec"))?;
    let state: String = r.get(2).map_err(q("read job state"))?;
    let (spec, state) = crate::store::rows::spec_and_state(&id, &spec, &state)?;
    let read = || -> rusqlite::Result<Job> {
        Ok(Job {
            id: id.clone(),
            spec: spec.clone(),
            state,
            epoch: r.get::<_, i64>(3)? as u64,
            agent_id: r.get(4)?,
            exit_code: r.get(5)?,
            message: r.get(6)?,
            oom_killed: r.get(7)?,
            created_ms: r.get(8)?,
            started_ms: r.get(9)?,
            finished_ms: r.get(10)?,
            lease_deadline_ms: r.get(11)?,
            cancel_requested: r.get(12)?,
            log_acked: r.get::<_, i64>(13)? as u64,
            log_total: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
        })
    };
    read().map_err(g)
}
