//! Leases: granting one with the next epoch, renewing, expiring, and
//! giving one back. Every lease-scoped write is fenced by `(job, epoch, agent)`.

use rusqlite::{Connection, params};

use super::schema::{JOB_COLS, current, forget_secrets, get_job, select_jobs};
use super::{SqliteStore, StoreError, q};
use crate::model::{Job, JobState, StatusReport, now_ms};

/// What happened to an expired lease; `agent` held it (its slot is free).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// Back in the queue; the next lease gets a higher epoch.
    Requeued { job: Job, agent: String },
    /// A cancel was pending: the job ends as cancelled.
    Cancelled { job: Job, agent: String },
}

impl SqliteStore {
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
        self.with_held(move |c, held| {
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
            held.lock().sync(c, &id)?;
            get_job(c, &id)
        })
        .await
    }

    /// Leases each `(job, agent)` of a dispatch pass with its next epoch in
    /// one transaction (one commit for the whole pass); per pair, the job
    /// as leased, or `None` if it is no longer queued.
    pub async fn lease_jobs(
        &self,
        pairs: Vec<(String, String)>,
        ttl_ms: u64,
    ) -> Result<Vec<Option<Job>>, StoreError> {
        self.with_held(move |c, held| {
            let tx = c.transaction().map_err(q("begin lease jobs"))?;
            let deadline = now_ms() + ttl_ms as i64;
            let mut out = Vec::with_capacity(pairs.len());
            {
                let mut update = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'leased', epoch = epoch + 1, agent_id = ?2, lease_deadline_ms = ?3,
                             log_acked = 0, log_total = NULL
                         WHERE id = ?1 AND state = 'queued' AND cancel_requested = 0",
                    )
                    .map_err(q("lease job"))?;
                for (id, agent) in &pairs {
                    let n = update
                        .execute(params![id, agent, deadline])
                        .map_err(q("lease job"))?;
                    out.push(if n == 0 { None } else { get_job(&tx, id)? });
                }
            }
            tx.commit().map_err(q("commit lease jobs"))?;
            // After the commit: the table mirrors only durable leases.
            let mut h = held.lock();
            for ((id, _), job) in pairs.iter().zip(&out) {
                if job.is_some() {
                    h.sync(c, id)?;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Puts a leased job back in the queue (the agent declined it).
    pub async fn requeue(&self, id: String, epoch: u64, agent: String) -> Result<bool, StoreError> {
        self.with_held(move |c, held| {
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
            held.lock().sync(c, &id)?;
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

    /// Renews the listed leases held by `agent` durably (a session's
    /// start); returns (renewed, revoked).
    pub async fn renew(
        &self,
        agent: String,
        leases: Vec<(String, u64)>,
        ttl_ms: u64,
    ) -> Result<(Vec<Job>, Vec<(String, u64)>), StoreError> {
        // Most sessions start holding nothing (and a reconnect storm is
        // thousands of them at once): no store trip then.
        if leases.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        self.with_held(move |c, held| {
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
            for j in &renewed {
                held.lock().sync(c, &j.id)?;
            }
            Ok((renewed, revoked))
        })
        .await
    }

    /// Records a status report for the current lease. Final states end the
    /// lease. Returns the updated job once it is committed (with other
    /// reports and log chunks: `batch`).
    pub async fn report(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<Job, StoreError> {
        self.report_queued(id, epoch, agent, report).await?.await
    }

    /// Queues a status report for the next batch (in the order of the
    /// calls) and returns what resolves once its batch is committed.
    pub async fn report_queued(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<crate::store::Committed<Job>, StoreError> {
        self.batch.report(id, epoch, agent, report).await
    }

    /// Ends or re-queues every lease whose deadline passed (deadlines as
    /// renewed in memory; the lease itself is checked in the database).
    pub async fn expire_leases(&self) -> Result<Vec<Expired>, StoreError> {
        // Most sweeps find nothing: no trip to the database then.
        if self.held.lock().expired(now_ms()).is_empty() {
            return Ok(Vec::new());
        }
        self.with_held(move |c, held| {
            let candidates = held.lock().expired(now_ms());
            let tx = c.transaction().map_err(q("begin expire"))?;
            let mut expired = Vec::new();
            for (id, epoch, agent) in &candidates {
                match current(&tx, id, *epoch, agent) {
                    Ok(job) => expired.push(job),
                    Err(StoreError::Stale { .. } | StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            let mut out = Vec::new();
            for job in expired {
                let agent = job.agent_id.clone().unwrap_or_default();
                if job.cancel_requested {
                    tx.execute(
                        "UPDATE jobs SET state = 'cancelled', message = 'cancelled; the agent did not confirm before its lease expired',
                             finished_ms = ?2, lease_deadline_ms = 0 WHERE id = ?1",
                        params![job.id, now_ms()],
                    )
                    .map_err(q("cancel expired job"))?;
                    forget_secrets(&tx, &job.id)?;
                    if let Some(j) = get_job(&tx, &job.id)? {
                        out.push(Expired::Cancelled { job: j, agent });
                    }
                } else {
                    tx.execute(
                        "UPDATE jobs SET state = 'queued', agent_id = NULL, lease_deadline_ms = 0,
                             message = 'lease expired; re-queued' WHERE id = ?1",
                        params![job.id],
                    )
                    .map_err(q("requeue expired job"))?;
                    if let Some(j) = get_job(&tx, &job.id)? {
                        out.push(Expired::Requeued { job: j, agent });
                    }
                }
            }
            tx.commit().map_err(q("commit expire"))?;
            for (id, _, _) in &candidates {
                held.lock().sync(c, id)?;
            }
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
        self.with_held(move |c, held| {
            let deadline = now_ms() + ttl.as_millis() as i64;
            let n = c
                .execute(
                    "UPDATE jobs SET lease_deadline_ms = MAX(lease_deadline_ms, ?1)
                     WHERE state IN ('leased','running')",
                    params![deadline],
                )
                .map_err(q("extend leases"))?;
            held.lock().extend_all(deadline);
            Ok(n)
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
        self.with_held(move |c, held| {
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
            held.lock().sync(c, &id)?;
            Ok(job)
        })
        .await
    }

    /// Number of leases `agent` holds (from memory).
    pub async fn active_count(&self, agent: String) -> Result<u32, StoreError> {
        Ok(self.held_count(&agent))
    }

    /// Number of leases `agent` holds (from memory).
    pub fn held_count(&self, agent: &str) -> u32 {
        self.held.lock().count(agent)
    }

    /// Jobs `agent` holds a lease of: (job, epoch), from memory.
    pub fn held_by(&self, agent: &str) -> Vec<(String, u64)> {
        self.held.lock().held_by(agent)
    }

    /// Renews the listed leases held by `agent` in memory (a heartbeat):
    /// (renewed with their stored log offsets, revoked). Nothing is
    /// written: see `held` for why a lost renewal is never needed.
    pub fn renew_held(
        &self,
        agent: &str,
        leases: Vec<(String, u64)>,
        ttl_ms: u64,
    ) -> super::held::Renewal {
        self.held
            .lock()
            .renew(agent, leases, now_ms() + ttl_ms as i64)
    }
}

/// Leases in a row an agent could not take before a job ends `failed`.
pub const MAX_UNDELIVERED: i64 = 5;

/// A status report of the current lease, inside the caller's transaction.
pub(super) fn report_in(
    c: &Connection,
    id: &str,
    epoch: u64,
    agent: &str,
    report: &StatusReport,
) -> Result<Job, StoreError> {
    let job = current(c, id, epoch, agent)?;
    let now = now_ms();
    if report.state.is_final() {
        c.execute(
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
        forget_secrets(c, id)?;
    } else if report.state == JobState::Running && job.state == JobState::Leased {
        c.execute(
            "UPDATE jobs SET state = 'running', started_ms = ?2, undelivered = 0 WHERE id = ?1",
            params![id, now],
        )
        .map_err(q("record running"))?;
    }
    get_job(c, id)?.ok_or_else(|| StoreError::NotFound(id.to_string()))
}
