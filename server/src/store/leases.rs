//! Leases: granting one with the next epoch, renewing, expiring, and
//! giving one back. Every lease-scoped write is fenced by `(job, epoch, agent)`.

use rusqlite::params;

use super::schema::{JOB_COLS, current, forget_secrets, get_job, select_jobs};
use super::{Store, StoreError, q};
use crate::model::{Job, JobState, StatusReport, now_ms};

/// What happened to an expired lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// Back in the queue; the next lease gets a higher epoch.
    Requeued(Job),
    /// A cancel was pending: the job ends as cancelled.
    Cancelled(Job),
}

impl Store {
    /// Jobs holding a lease (leased or running).
    pub async fn active_jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.with(move |c| {
            let sql = format!(
                "SELECT {JOB_COLS} FROM jobs WHERE state IN ('leased','running') ORDER BY seq"
            );
            select_jobs(c, &sql, [])
        })
        .await
    }

    /// Leases a queued job to `agent` with the next epoch; `None` if it is no
    /// longer queued.
    pub async fn lease_job(
        &self,
        id: String,
        agent: String,
        ttl_ms: u64,
    ) -> Result<Option<Job>, StoreError> {
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE jobs SET state = 'leased', epoch = epoch + 1, agent_id = ?2, lease_deadline_ms = ?3,
                         log_acked = 0, log_total = NULL
                     WHERE id = ?1 AND state = 'queued' AND cancel_requested = 0",
                    params![id, agent, now_ms() + ttl_ms as i64],
                )
                .map_err(q("lease job"))?;
            if n == 0 {
                return Ok(None);
            }
            get_job(c, &id)
        })
        .await
    }

    /// Puts a leased job back in the queue (the agent declined it).
    pub async fn requeue(&self, id: String, epoch: u64, agent: String) -> Result<bool, StoreError> {
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE jobs SET
                         state = CASE WHEN cancel_requested = 1 THEN 'cancelled' ELSE 'queued' END,
                         message = CASE WHEN cancel_requested = 1 THEN 'cancelled before it ran' ELSE message END,
                         agent_id = CASE WHEN cancel_requested = 1 THEN agent_id ELSE NULL END,
                         lease_deadline_ms = 0
                     WHERE id = ?1 AND epoch = ?2 AND agent_id = ?3 AND state IN ('leased','running')",
                    params![id, epoch as i64, agent],
                )
                .map_err(q("requeue job"))?;
            Ok(n > 0)
        })
        .await
    }

    /// The current lease of `id` if it is `(epoch, agent)`.
    pub async fn current_lease(
        &self,
        id: String,
        epoch: u64,
        agent: String,
    ) -> Result<Job, StoreError> {
        self.with(move |c| current(c, &id, epoch, &agent)).await
    }

    /// Renews the listed leases held by `agent`; returns (renewed, revoked).
    pub async fn renew(
        &self,
        agent: String,
        leases: Vec<(String, u64)>,
        ttl_ms: u64,
    ) -> Result<(Vec<Job>, Vec<(String, u64)>), StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin renew"))?;
            let mut renewed = Vec::new();
            let mut revoked = Vec::new();
            for (id, epoch) in leases {
                let n = tx
                    .execute(
                        "UPDATE jobs SET lease_deadline_ms = ?4
                         WHERE id = ?1 AND epoch = ?2 AND agent_id = ?3 AND state IN ('leased','running')",
                        params![id, epoch as i64, agent, now_ms() + ttl_ms as i64],
                    )
                    .map_err(q("renew lease"))?;
                if n == 0 {
                    revoked.push((id, epoch));
                } else if let Some(j) = get_job(&tx, &id)? {
                    renewed.push(j);
                }
            }
            tx.commit().map_err(q("commit renew"))?;
            Ok((renewed, revoked))
        })
        .await
    }

    /// Records a status report for the current lease. Final states end the
    /// lease. Returns the updated job.
    pub async fn report(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<Job, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin report"))?;
            let job = current(&tx, &id, epoch, &agent)?;
            let now = now_ms();
            if report.state.is_final() {
                tx.execute(
                    "UPDATE jobs SET state = ?2, exit_code = ?3, message = ?4, oom_killed = ?5,
                         finished_ms = ?6, log_total = ?7, lease_deadline_ms = 0,
                         started_ms = CASE WHEN started_ms = 0 THEN ?6 ELSE started_ms END
                     WHERE id = ?1",
                    params![
                        id,
                        report.state.as_str(),
                        report.exit_code,
                        report.message,
                        report.oom_killed,
                        now,
                        report.log_total as i64
                    ],
                )
                .map_err(q("record final status"))?;
                forget_secrets(&tx, &id)?;
            } else if report.state == JobState::Running && job.state == JobState::Leased {
                tx.execute(
                    "UPDATE jobs SET state = 'running', started_ms = ?2, undelivered = 0 WHERE id = ?1",
                    params![id, now],
                )
                .map_err(q("record running"))?;
            }
            let job = get_job(&tx, &id)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
            tx.commit().map_err(q("commit report"))?;
            Ok(job)
        })
        .await
    }

    /// Ends or re-queues every lease whose deadline passed.
    pub async fn expire_leases(&self) -> Result<Vec<Expired>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin expire"))?;
            let sql = format!(
                "SELECT {JOB_COLS} FROM jobs WHERE state IN ('leased','running') AND lease_deadline_ms < ?1"
            );
            let expired = select_jobs(&tx, &sql, params![now_ms()])?;
            let mut out = Vec::new();
            for job in expired {
                if job.cancel_requested {
                    tx.execute(
                        "UPDATE jobs SET state = 'cancelled', message = 'cancelled; the agent did not confirm before its lease expired',
                             finished_ms = ?2, lease_deadline_ms = 0 WHERE id = ?1",
                        params![job.id, now_ms()],
                    )
                    .map_err(q("cancel expired job"))?;
                    forget_secrets(&tx, &job.id)?;
                    if let Some(j) = get_job(&tx, &job.id)? {
                        out.push(Expired::Cancelled(j));
                    }
                } else {
                    tx.execute(
                        "UPDATE jobs SET state = 'queued', agent_id = NULL, lease_deadline_ms = 0,
                             message = 'lease expired; re-queued' WHERE id = ?1",
                        params![job.id],
                    )
                    .map_err(q("requeue expired job"))?;
                    if let Some(j) = get_job(&tx, &job.id)? {
                        out.push(Expired::Requeued(j));
                    }
                }
            }
            tx.commit().map_err(q("commit expire"))?;
            Ok(out)
        })
        .await
    }

    /// Gives every held lease `ttl` from now (at least): agents could not
    /// renew while the control plane was down. Returns how many.
    pub async fn extend_active_leases(
        &self,
        ttl: std::time::Duration,
    ) -> Result<usize, StoreError> {
        self.with(move |c| {
            c.execute(
                "UPDATE jobs SET lease_deadline_ms = MAX(lease_deadline_ms, ?1)
                 WHERE state IN ('leased','running')",
                params![now_ms() + ttl.as_millis() as i64],
            )
            .map_err(q("extend leases"))
        })
        .await
    }

    /// A lease the agent could not take (it declined it, or its session
    /// broke before it said it holds it): the job is re-queued, or, after
    /// [`MAX_UNDELIVERED`] such leases in a row, ends `failed` with `reason`.
    /// Only a lease not yet running counts. `None` if `(id, epoch, agent)`
    /// is not the current lease.
    pub async fn lease_not_taken(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        reason: String,
    ) -> Result<Option<Job>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin lease not taken"))?;
            let job = match current(&tx, &id, epoch, &agent) {
                Ok(j) => j,
                Err(StoreError::Stale { .. } | StoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            let undelivered: i64 = tx
                .query_row(
                    "SELECT undelivered FROM jobs WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .map_err(q("read undelivered count"))?;
            let counts = job.state == JobState::Leased;
            let n = undelivered + i64::from(counts);
            if job.cancel_requested {
                tx.execute(
                    "UPDATE jobs SET state = 'cancelled', message = 'cancelled before it ran',
                         finished_ms = ?2, lease_deadline_ms = 0 WHERE id = ?1",
                    params![id, now_ms()],
                )
                .map_err(q("cancel undelivered job"))?;
                forget_secrets(&tx, &id)?;
            } else if counts && n >= MAX_UNDELIVERED {
                tx.execute(
                    "UPDATE jobs SET state = 'failed', undelivered = ?2, finished_ms = ?3,
                         lease_deadline_ms = 0, log_total = 0,
                         message = ?4 WHERE id = ?1",
                    params![
                        id,
                        n,
                        now_ms(),
                        format!("no agent could take the job's lease ({n} tries); last: {reason}")
                    ],
                )
                .map_err(q("fail undelivered job"))?;
                forget_secrets(&tx, &id)?;
            } else {
                tx.execute(
                    "UPDATE jobs SET state = 'queued', agent_id = NULL, lease_deadline_ms = 0,
                         undelivered = ?2 WHERE id = ?1",
                    params![id, n],
                )
                .map_err(q("requeue undelivered job"))?;
            }
            let job = get_job(&tx, &id)?;
            tx.commit().map_err(q("commit lease not taken"))?;
            Ok(job)
        })
        .await
    }

    /// Number of leases `agent` holds.
    pub async fn active_count(&self, agent: String) -> Result<u32, StoreError> {
        self.with(move |c| {
            c.query_row(
                "SELECT COUNT(*) FROM jobs WHERE agent_id = ?1 AND state IN ('leased','running')",
                params![agent],
                |r| r.get::<_, u32>(0),
            )
            .map_err(q("count active jobs"))
        })
        .await
    }
}

/// Leases in a row an agent could not take before a job ends `failed`.
pub const MAX_UNDELIVERED: i64 = 5;
