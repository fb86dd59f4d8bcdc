//! Leases: granting one with the next epoch, renewing, expiring, and
//! giving one back. Every lease-scoped write is fenced by `(job, epoch,
//! agent)` on the job's locked row.

use tokio_postgres::error::SqlState;

use super::schema::{ACTIVE, JOB_COLS, big, current, forget_secrets, one_job, select_jobs};
use super::{PgStore, pg};
use crate::model::{Job, JobState, now_ms};
use crate::store::{Expired, MAX_UNDELIVERED, StoreError};

/// Leases ended per expiry sweep at most (the next sweep ends the rest).
const EXPIRE_PER_SWEEP: i64 = 1000;

/// Whole transactions retried at most when PostgreSQL aborts one to break
/// a deadlock.
pub(super) const TRIES: u32 = 3;

fn lease_sql() -> String {
    format!(
        "UPDATE jobs SET state = 'leased', epoch = epoch + 1, agent_id = $2, lease_deadline_ms = $3,
             log_acked = 0, log_total = NULL
         WHERE id = $1 AND state = 'queued' AND NOT cancel_requested
         RETURNING {JOB_COLS}"
    )
}

/// Whether the transaction that failed with `e` may simply run again.
pub(super) fn is_retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

pub(super) fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Pg { source, .. } if is_retryable(source))
}

/// The plain client of a pooled connection.
pub(super) fn pgc(o: &deadpool_postgres::Object) -> &tokio_postgres::Client {
    o
}

impl PgStore {
    /// Jobs holding a lease (leased or running).
    pub async fn active_jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE {ACTIVE} ORDER BY seq");
            select_jobs(pgc(&o), "active jobs", &sql, &[]).await
        })
        .await
    }

    /// Leases a queued job to `agent` with the next epoch; `None` if it is no
    /// longer queued (or another replica leased it first).
    pub async fn lease_job(
        &self,
        id: String,
        agent: String,
        ttl_ms: u64,
    ) -> Result<Option<Job>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let deadline = now_ms().saturating_add(big(ttl_ms));
            let job = one_job(
                pgc(&o),
                "lease job",
                &lease_sql(),
                &[&id, &agent, &deadline],
            )
            .await?;
            if let Some(j) = &job {
                self.local.lock().apply(j);
            }
            Ok(job)
        })
        .await
    }

    /// Leases each `(job, agent)` of a dispatch pass with its next epoch in
    /// one transaction; per pair, the job as leased, or `None` if it is no
    /// longer queued. Rows are updated in the order of their ids (so two
    /// replicas' passes never deadlock).
    pub async fn lease_jobs(
        &self,
        pairs: Vec<(String, String)>,
        ttl_ms: u64,
    ) -> Result<Vec<Option<Job>>, StoreError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        self.timed(async {
            let mut order: Vec<usize> = (0..pairs.len()).collect();
            order.sort_by(|a, b| pairs[*a].0.cmp(&pairs[*b].0));
            let mut o = self.client().await?;
            let mut tries = 0;
            let out = loop {
                tries += 1;
                match lease_pass(&mut o, &pairs, &order, ttl_ms).await {
                    Err(e) if tries < TRIES && retryable(&e) => continue,
                    r => break r?,
                }
            };
            // After the commit: the table holds only durable leases.
            let mut local = self.local.lock();
            for j in out.iter().flatten() {
                local.apply(j);
            }
            Ok(out)
        })
        .await
    }

    /// Puts a leased job back in the queue (the agent declined it).
    pub async fn requeue(&self, id: String, epoch: u64, agent: String) -> Result<bool, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let sql = format!(
                "UPDATE jobs SET
                     state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
                     message = CASE WHEN cancel_requested THEN 'cancelled before it ran' ELSE message END,
                     agent_id = CASE WHEN cancel_requested THEN agent_id ELSE NULL END,
                     lease_deadline_ms = 0
                 WHERE id = $1 AND epoch = $2 AND agent_id = $3 AND {ACTIVE}
                 RETURNING {JOB_COLS}"
            );
            let mut o = o;
            let client: &mut tokio_postgres::Client = &mut o;
            let tx = client.transaction().await.map_err(pg("begin requeue"))?;
            let job = one_job(&tx, "requeue job", &sql, &[&id, &big(epoch), &agent]).await?;
            let Some(job) = job else { return Ok(false) };
            let job = if job.state.is_final() {
                forget_secrets(&tx, job).await?
            } else {
                job
            };
            tx.commit().await.map_err(pg("commit requeue"))?;
            self.local.lock().apply(&job);
            Ok(true)
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
        self.timed(async {
            let o = self.client().await?;
            current(pgc(&o), &id, epoch, &agent, false).await
        })
        .await
    }

    /// Ends or re-queues every lease whose durable deadline passed, after
    /// writing this replica's pending renewals. Safe on every replica at
    /// once: each lease is ended by one sweep (`SKIP LOCKED`).
    pub async fn expire_leases(&self) -> Result<Vec<Expired>, StoreError> {
        self.timed(async {
            let now = now_ms();
            super::local::flush(&self.pool, &self.local).await?;
            let mut o = self.client().await?;
            let client: &mut tokio_postgres::Client = &mut o;
            let tx = client.transaction().await.map_err(pg("begin expire"))?;
            let sql = format!(
                "SELECT {JOB_COLS} FROM jobs WHERE {ACTIVE} AND lease_deadline_ms < $1
                 ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED"
            );
            let due = select_jobs(&tx, "select expired leases", &sql, &[&now, &EXPIRE_PER_SWEEP])
                .await?;
            let mut out = Vec::with_capacity(due.len());
            for job in due {
                let agent = job.agent_id.clone().unwrap_or_default();
                if job.cancel_requested {
                    let sql = format!(
                        "UPDATE jobs SET state = 'cancelled',
                             message = 'cancelled; the agent did not confirm before its lease expired',
                             finished_ms = $2, lease_deadline_ms = 0 WHERE id = $1
                         RETURNING {JOB_COLS}"
                    );
                    if let Some(j) = one_job(&tx, "cancel expired job", &sql, &[&job.id, &now_ms()])
                        .await?
                    {
                        let j = forget_secrets(&tx, j).await?;
                        out.push(Expired::Cancelled { job: j, agent });
                    }
                } else {
                    let sql = format!(
                        "UPDATE jobs SET state = 'queued', agent_id = NULL, lease_deadline_ms = 0,
                             message = 'lease expired; re-queued' WHERE id = $1
                         RETURNING {JOB_COLS}"
                    );
                    if let Some(j) = one_job(&tx, "requeue expired job", &sql, &[&job.id]).await? {
                        out.push(Expired::Requeued { job: j, agent });
                    }
                }
            }
            tx.commit().await.map_err(pg("commit expire"))?;
            let mut local = self.local.lock();
            for e in &out {
                let (Expired::Requeued { job, .. } | Expired::Cancelled { job, .. }) = e;
                local.apply(job);
            }
            local.drop_lapsed(now);
            Ok(out)
        })
        .await
    }

    /// Gives every active lease `ttl` from now (at least): agents could not
    /// renew while this replica was down. With other replicas up this only
    /// delays the expiry of an abandoned lease by one `ttl`. Returns how many.
    pub async fn extend_active_leases(
        &self,
        ttl: std::time::Duration,
    ) -> Result<usize, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            let deadline = now_ms().saturating_add(ttl_ms);
            let sql = format!(
                "UPDATE jobs SET lease_deadline_ms = GREATEST(lease_deadline_ms, $1) WHERE {ACTIVE}"
            );
            let mut tries = 0;
            let n = loop {
                tries += 1;
                match pgc(&o).execute(sql.as_str(), &[&deadline]).await {
                    Err(e) if tries < TRIES && is_retryable(&e) => continue,
                    r => break r.map_err(pg("extend leases"))?,
                }
            };
            self.local.lock().extend_all(deadline);
            Ok(n as usize)
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
        self.timed(async {
            let mut o = self.client().await?;
            let client: &mut tokio_postgres::Client = &mut o;
            let tx = client
                .transaction()
                .await
                .map_err(pg("begin lease not taken"))?;
            let job = match current(&tx, &id, epoch, &agent, true).await {
                Ok(j) => j,
                Err(StoreError::Stale { .. } | StoreError::NotFound(_)) => {
                    self.local.lock().forget(&id, epoch);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let undelivered: i64 = tx
                .query_one("SELECT undelivered FROM jobs WHERE id = $1", &[&id])
                .await
                .map_err(pg("read undelivered count"))?
                .try_get(0)
                .map_err(pg("read undelivered count"))?;
            let counts = job.state == JobState::Leased;
            let n = undelivered + i64::from(counts);
            let after = if job.cancel_requested {
                let sql = format!(
                    "UPDATE jobs SET state = 'cancelled', message = 'cancelled before it ran',
                         finished_ms = $2, lease_deadline_ms = 0 WHERE id = $1 RETURNING {JOB_COLS}"
                );
                let j = one_job(&tx, "cancel undelivered job", &sql, &[&id, &now_ms()]).await?;
                match j {
                    Some(j) => Some(forget_secrets(&tx, j).await?),
                    None => None,
                }
            } else if counts && n >= MAX_UNDELIVERED {
                let sql = format!(
                    "UPDATE jobs SET state = 'failed', undelivered = $2, finished_ms = $3,
                         lease_deadline_ms = 0, log_total = 0, message = $4
                     WHERE id = $1 RETURNING {JOB_COLS}"
                );
                let why =
                    format!("no agent could take the job's lease ({n} tries); last: {reason}");
                let j = one_job(
                    &tx,
                    "fail undelivered job",
                    &sql,
                    &[&id, &n, &now_ms(), &why],
                )
                .await?;
                match j {
                    Some(j) => Some(forget_secrets(&tx, j).await?),
                    None => None,
                }
            } else {
                let sql = format!(
                    "UPDATE jobs SET state = 'queued', agent_id = NULL, lease_deadline_ms = 0,
                         undelivered = $2 WHERE id = $1 RETURNING {JOB_COLS}"
                );
                one_job(&tx, "requeue undelivered job", &sql, &[&id, &n]).await?
            };
            tx.commit().await.map_err(pg("commit lease not taken"))?;
            if let Some(j) = &after {
                self.local.lock().apply(j);
            }
            Ok(after)
        })
        .await
    }
}

/// One attempt at a dispatch pass, in its own transaction.
async fn lease_pass(
    o: &mut deadpool_postgres::Object,
    pairs: &[(String, String)],
    order: &[usize],
    ttl_ms: u64,
) -> Result<Vec<Option<Job>>, StoreError> {
    let client: &mut tokio_postgres::Client = o;
    let tx = client.transaction().await.map_err(pg("begin lease jobs"))?;
    let deadline = now_ms().saturating_add(big(ttl_ms));
    let stmt = tx
        .prepare(&lease_sql())
        .await
        .map_err(pg("prepare lease job"))?;
    let mut out = vec![None; pairs.len()];
    for &i in order {
        let (id, agent) = &pairs[i];
        let row = tx
            .query_opt(&stmt, &[id, agent, &deadline])
            .await
            .map_err(pg("lease job"))?;
        out[i] = row.as_ref().map(super::schema::row_to_job).transpose()?;
    }
    tx.commit().await.map_err(pg("commit lease jobs"))?;
    Ok(out)
}
