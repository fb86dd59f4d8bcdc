//! The schema, its versioned migrations, and reading job rows.
//!
//! Migrations are an ordered list of `(version, sql)`; each is applied once,
//! in a transaction of its own that first takes a transaction-scoped
//! advisory lock, so replicas starting at once apply each exactly once
//! (the others wait, then find it recorded in `schema_migrations`).
//! Versions increase along the list but need not be contiguous: each is
//! looked up on its own, so a version added later below a recorded one is
//! still applied.

use tokio_postgres::{GenericClient, Row};

use super::pg;
use crate::model::{Job, now_ms};
use crate::store::StoreError;

/// The advisory lock key serializing migrations ("outpost" in ASCII).
const MIGRATION_LOCK: i64 = 0x006f_7574_706f_7374;

/// The migrations, in order. Never edit one that shipped: add another.
pub(super) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    selector JSONB NOT NULL DEFAULT '{}',
    queue_timeout_ms BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 0,
    agent_id TEXT,
    exit_code BIGINT,
    message TEXT NOT NULL DEFAULT '',
    oom_killed BOOLEAN NOT NULL DEFAULT FALSE,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT NOT NULL DEFAULT 0,
    finished_ms BIGINT NOT NULL DEFAULT 0,
    lease_deadline_ms BIGINT NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    log_acked BIGINT NOT NULL DEFAULT 0,
    log_total BIGINT,
    undelivered BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs (state, seq);
CREATE INDEX jobs_active_agent ON jobs (agent_id) WHERE state IN ('leased','running');
CREATE INDEX jobs_active_deadline ON jobs (lease_deadline_ms) WHERE state IN ('leased','running');
CREATE TABLE logs (
    job_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    off BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (job_id, epoch, off)
);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    labels TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT FALSE,
    last_seen_ms BIGINT NOT NULL
);
CREATE TABLE artifacts (
    job_id TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    path TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    etag TEXT NOT NULL,
    uploaded_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, epoch, path)
);
"#,
    ),
    (2, crate::iac::store::postgres::SCHEMA),
    (3, IDENTITIES_AND_NOTIFICATIONS),
    (4, MIGRATION_4),
];

/// Migration 4: content-addressed blobs shared by the replicas
/// (`iac::blobs`); the fingerprints of the keys every replica must share
/// (`replicas::keys`).
const MIGRATION_4: &str = r#"
CREATE TABLE iac_blobs (
    digest TEXT PRIMARY KEY,
    data BYTEA NOT NULL,
    size BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE replica_keys (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL
);
"#;

/// Migration 3: agent enrolment (`crate::enroll::store`) and webhook
/// deliveries (`crate::notify::store`), as in the embedded store.
const IDENTITIES_AND_NOTIFICATIONS: &str = r#"
CREATE TABLE enrollments (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    pool TEXT NOT NULL,
    labels TEXT NOT NULL,
    agent_name TEXT NOT NULL DEFAULT '',
    uses_left BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE agent_identities (
    name TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    labels TEXT NOT NULL,
    enrollment_id TEXT NOT NULL,
    enrolled_ms BIGINT NOT NULL,
    cert_not_after_ms BIGINT NOT NULL DEFAULT 0,
    revoked_ms BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE notify_deliveries (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    stack TEXT NOT NULL,
    state TEXT NOT NULL,
    next_at_ms BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX notify_due ON notify_deliveries (next_at_ms) WHERE state = 'pending';
CREATE INDEX notify_stack ON notify_deliveries (stack, seq);
CREATE TABLE notify_global (
    id INT PRIMARY KEY CHECK (id = 1),
    body TEXT NOT NULL
);
"#;

/// The columns `row_to_job` reads, in its order.
pub(super) const JOB_COLS: &str = "id, spec, state, epoch, agent_id, exit_code, message, oom_killed, created_ms, started_ms, finished_ms, lease_deadline_ms, cancel_requested, log_acked, log_total";

/// States that hold a lease, as stored.
pub(super) const ACTIVE: &str = "state IN ('leased','running')";

/// Applies every migration not yet recorded, each once.
pub(super) async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    for &(version, sql) in MIGRATIONS {
        let tx = client.transaction().await.map_err(pg("begin migration"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg("lock migrations"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INT PRIMARY KEY,
                 applied_ms BIGINT NOT NULL
             )",
        )
        .await
        .map_err(pg("create schema_migrations"))?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&version],
            )
            .await
            .map_err(pg("read schema_migrations"))?
            .is_some();
        if !done {
            tx.batch_execute(sql).await.map_err(pg("apply migration"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                &[&version, &now_ms()],
            )
            .await
            .map_err(pg("record migration"))?;
            tracing::info!(version, "applied a schema migration");
        }
        tx.commit().await.map_err(pg("commit migration"))?;
    }
    Ok(())
}

/// The job's row, or `None`.
pub(super) async fn get_job<C: GenericClient + Sync>(
    c: &C,
    id: &str,
) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1");
    let row = c
        .query_opt(sql.as_str(), &[&id])
        .await
        .map_err(pg("get job"))?;
    row.as_ref().map(row_to_job).transpose()
}

/// The job's row locked until the transaction ends, or `None`.
pub(super) async fn lock_job<C: GenericClient + Sync>(
    c: &C,
    id: &str,
) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1 FOR UPDATE");
    let row = c
        .query_opt(sql.as_str(), &[&id])
        .await
        .map_err(pg("lock job"))?;
    row.as_ref().map(row_to_job).transpose()
}

/// The job if `(epoch, agent)` is its current lease; with `lock`, its row
/// stays locked until the transaction ends (for fenced writes).
pub(super) async fn current<C: GenericClient + Sync>(
    c: &C,
    id: &str,
    epoch: u64,
    agent: &str,
    lock: bool,
) -> Result<Job, StoreError> {
    let job = if lock {
        lock_job(c, id).await?
    } else {
        get_job(c, id).await?
    };
    fenced(job, id, epoch, agent)
}

/// `job` (as read) if `(epoch, agent)` is its current lease.
pub(super) fn fenced(
    job: Option<Job>,
    id: &str,
    epoch: u64,
    agent: &str,
) -> Result<Job, StoreError> {
    let job = job.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    if job.epoch != epoch || !job.state.is_active() || job.agent_id.as_deref() != Some(agent) {
        return Err(StoreError::Stale {
            job_id: id.to_string(),
            epoch,
        });
    }
    Ok(job)
}

/// Clears the secret values of a job that just became final (the names
/// stay); returns the job as stored.
pub(super) async fn forget_secrets<C: GenericClient + Sync>(
    c: &C,
    job: Job,
) -> Result<Job, StoreError> {
    if !job.spec.holds_secret_values() {
        return Ok(job);
    }
    let (spec, json) = crate::store::rows::spec_without_secrets(&job.id, &job.spec)?;
    c.execute("UPDATE jobs SET spec = $2 WHERE id = $1", &[&job.id, &json])
        .await
        .map_err(pg("forget secrets"))?;
    Ok(Job { spec, ..job })
}

/// Runs `sql` (selecting [`JOB_COLS`]) and reads its rows.
pub(super) async fn select_jobs<C: GenericClient + Sync>(
    c: &C,
    op: &'static str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Job>, StoreError> {
    let rows = c.query(sql, params).await.map_err(pg(op))?;
    rows.iter().map(row_to_job).collect()
}

/// Runs `sql` (returning [`JOB_COLS`]) and reads its one row, if any.
pub(super) async fn one_job<C: GenericClient + Sync>(
    c: &C,
    op: &'static str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Job>, StoreError> {
    let row = c.query_opt(sql, params).await.map_err(pg(op))?;
    row.as_ref().map(row_to_job).transpose()
}

pub(super) fn row_to_job(r: &Row) -> Result<Job, StoreError> {
    let id: String = r.try_get(0).map_err(pg("read job id"))?;
    let spec: String = r.try_get(1).map_err(pg("read job spec"))?;
    let state: String = r.try_get(2).map_err(pg("read job state"))?;
    let (spec, state) = crate::store::rows::spec_and_state(&id, &spec, &state)?;
    let read = || -> Result<Job, tokio_postgres::Error> {
        Ok(Job {
            id: id.clone(),
            spec: spec.clone(),
            state,
            epoch: r.try_get::<_, i64>(3)?.max(0) as u64,
            agent_id: r.try_get(4)?,
            exit_code: r.try_get(5)?,
            message: r.try_get(6)?,
            oom_killed: r.try_get(7)?,
            created_ms: r.try_get(8)?,
            started_ms: r.try_get(9)?,
            finished_ms: r.try_get(10)?,
            lease_deadline_ms: r.try_get(11)?,
            cancel_requested: r.try_get(12)?,
            log_acked: r.try_get::<_, i64>(13)?.max(0) as u64,
            log_total: r.try_get::<_, Option<i64>>(14)?.map(|v| v.max(0) as u64),
        })
    };
    read().map_err(pg("read job column"))
}

/// A non-negative count or offset as stored (BIGINT).
pub(super) fn big(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn migration_versions_increase_and_may_leave_gaps() {
        let versions: Vec<i32> = super::MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert!(versions.contains(&3), "{versions:?}");
    }
}
