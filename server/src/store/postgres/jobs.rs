//! Jobs: submission, lookups and pages, the queue, queue timeouts and
//! cancellation.

use std::collections::BTreeMap;

use tokio_postgres::types::ToSql;

use super::leases::pgc;
use super::schema::{
    JOB_COLS, forget_secrets, get_job, lock_job, one_job, row_to_job, select_jobs,
};
use super::{PgStore, pg};
use crate::model::{Job, JobSpec, JobState, now_ms};
use crate::store::{CancelOutcome, JobFilter, JobPage, StoreError};

impl PgStore {
    /// Queued jobs per label set they select (`k=v,k=v`).
    pub async fn queue_depth(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let rows = pgc(&o)
                .query(
                    "SELECT selector::text, COUNT(*) FROM jobs WHERE state = 'queued' GROUP BY selector",
                    &[],
                )
                .await
                .map_err(pg("queue depth"))?;
            let mut depth = BTreeMap::new();
            for row in rows {
                let selector: String = row.try_get(0).map_err(pg("queue depth"))?;
                let n: i64 = row.try_get(1).map_err(pg("queue depth"))?;
                let selector: BTreeMap<String, String> = serde_json::from_str(&selector)
                    .map_err(|e| StoreError::Corrupt {
                        id: format!("(a queued job selecting {selector})"),
                        what: e.to_string(),
                    })?;
                *depth
                    .entry(crate::metrics::label_set(&selector))
                    .or_insert(0) += n.max(0) as u64;
            }
            Ok(depth)
        })
        .await
    }

    pub async fn insert_job(&self, id: String, spec: JobSpec) -> Result<Job, StoreError> {
        self.timed(async {
            let corrupt = |e: serde_json::Error| StoreError::Corrupt {
                id: id.clone(),
                what: e.to_string(),
            };
            let json = serde_json::to_string(&spec).map_err(corrupt)?;
            let selector = serde_json::to_string(&spec.selector).map_err(corrupt)?;
            let timeout = super::schema::big(spec.queue_timeout_ms);
            let o = self.client().await?;
            let sql = format!(
                "INSERT INTO jobs (id, spec, selector, queue_timeout_ms, state, created_ms)
                 VALUES ($1, $2, $3::text::jsonb, $4, 'queued', $5) RETURNING {JOB_COLS}"
            );
            one_job(
                pgc(&o),
                "insert job",
                &sql,
                &[&id, &json, &selector, &timeout, &now_ms()],
            )
            .await?
            .ok_or_else(|| StoreError::NotFound(id.clone()))
        })
        .await
    }

    pub async fn get_job(&self, id: String) -> Result<Option<Job>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            get_job(pgc(&o), &id).await
        })
        .await
    }

    /// The newest `limit` jobs matching `filter`, newest first, with the
    /// number of matching jobs over all pages.
    pub async fn list_jobs(&self, filter: JobFilter, limit: u32) -> Result<JobPage, StoreError> {
        self.timed(async {
            let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            let mut arg = |v: Box<dyn ToSql + Sync + Send>| {
                args.push(v);
                format!("${}", args.len())
            };
            let mut conds = Vec::new();
            if !filter.states.is_empty() {
                let states: Vec<String> = filter
                    .states
                    .iter()
                    .map(|s| s.as_str().to_string())
                    .collect();
                conds.push(format!("state = ANY({}::text[])", arg(Box::new(states))));
            }
            for (k, v) in &filter.labels {
                let k = arg(Box::new(k.clone()));
                let v = arg(Box::new(v.clone()));
                conds.push(format!("(selector ->> {k}::text) = {v}::text"));
            }
            let matching = if conds.is_empty() {
                "TRUE".to_string()
            } else {
                conds.join(" AND ")
            };
            let before = arg(Box::new(filter.before.unwrap_or(i64::MAX)));
            let lim = arg(Box::new(i64::from(limit) + 1));
            let o = self.client().await?;
            let c = pgc(&o);
            let params: Vec<&(dyn ToSql + Sync)> = args
                .iter()
                .map(|a| a.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let n_match = params.len() - 2;
            let total: i64 = c
                .query_one(
                    format!("SELECT COUNT(*) FROM jobs WHERE {matching}").as_str(),
                    &params[..n_match],
                )
                .await
                .map_err(pg("count jobs"))?
                .try_get(0)
                .map_err(pg("count jobs"))?;
            let sql = format!(
                "SELECT {JOB_COLS}, seq FROM jobs WHERE {matching} AND seq < {before}
                 ORDER BY seq DESC LIMIT {lim}"
            );
            let rows = c
                .query(sql.as_str(), &params)
                .await
                .map_err(pg("list jobs"))?;
            let mut jobs = Vec::with_capacity(rows.len());
            let mut seqs = Vec::with_capacity(rows.len());
            for r in &rows {
                jobs.push(row_to_job(r)?);
                seqs.push(r.try_get::<_, i64>(15).map_err(pg("read job seq"))?);
            }
            let next = if jobs.len() > limit as usize {
                jobs.truncate(limit as usize);
                seqs.truncate(limit as usize);
                seqs.last().copied()
            } else {
                None
            };
            Ok(JobPage {
                jobs,
                total: total.max(0) as u64,
                next,
                seqs,
            })
        })
        .await
    }

    /// Ends every job still waiting for its first lease past its queue
    /// timeout: `timed_out`, with `why(job)` as its message.
    pub async fn expire_queued(
        &self,
        why: impl Fn(&Job) -> String + Send + 'static,
    ) -> Result<Vec<Job>, StoreError> {
        // Moved in: a borrow of `why` across an await would need it `Sync`.
        self.timed(async move {
            let mut o = self.client().await?;
            let client: &mut tokio_postgres::Client = &mut o;
            let tx = client
                .transaction()
                .await
                .map_err(pg("begin expire queued"))?;
            let now = now_ms();
            let sql = format!(
                "SELECT {JOB_COLS} FROM jobs WHERE state = 'queued' AND epoch = 0
                     AND queue_timeout_ms > 0 AND created_ms + queue_timeout_ms <= $1
                 ORDER BY seq FOR UPDATE SKIP LOCKED"
            );
            let expired = select_jobs(&tx, "select expired queued jobs", &sql, &[&now]).await?;
            let update = format!(
                "UPDATE jobs SET state = 'timed_out', message = $2, finished_ms = $3
                 WHERE id = $1 AND state = 'queued' RETURNING {JOB_COLS}"
            );
            let mut out = Vec::with_capacity(expired.len());
            for job in expired {
                let message = why(&job);
                let params: [&(dyn ToSql + Sync); 3] = [&job.id, &message, &now];
                if let Some(j) = one_job(&tx, "expire queued job", &update, &params).await? {
                    out.push(forget_secrets(&tx, j).await?);
                }
            }
            tx.commit().await.map_err(pg("commit expire queued"))?;
            Ok(out)
        })
        .await
    }

    /// Queued jobs in submission order.
    pub async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let sql =
                format!("SELECT {JOB_COLS} FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT $1");
            select_jobs(pgc(&o), "queued jobs", &sql, &[&i64::from(limit)]).await
        })
        .await
    }

    pub async fn request_cancel(&self, id: String) -> Result<CancelOutcome, StoreError> {
        self.timed(async {
            let mut o = self.client().await?;
            let client: &mut tokio_postgres::Client = &mut o;
            let tx = client.transaction().await.map_err(pg("begin cancel"))?;
            let job = lock_job(&tx, &id)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.clone()))?;
            let gone = || StoreError::NotFound(id.clone());
            let out = match job.state {
                JobState::Queued => {
                    let sql = format!(
                        "UPDATE jobs SET state = 'cancelled', cancel_requested = TRUE, finished_ms = $2,
                             message = 'cancelled before it started' WHERE id = $1 RETURNING {JOB_COLS}"
                    );
                    let j = one_job(&tx, "cancel queued job", &sql, &[&id, &now_ms()])
                        .await?
                        .ok_or_else(gone)?;
                    CancelOutcome::Dequeued(forget_secrets(&tx, j).await?)
                }
                s if s.is_active() => {
                    let sql = format!(
                        "UPDATE jobs SET cancel_requested = TRUE WHERE id = $1 RETURNING {JOB_COLS}"
                    );
                    let j = one_job(&tx, "request cancel", &sql, &[&id])
                        .await?
                        .ok_or_else(gone)?;
                    CancelOutcome::Requested(j)
                }
                _ => CancelOutcome::AlreadyFinal(job),
            };
            tx.commit().await.map_err(pg("commit cancel"))?;
            Ok(out)
        })
        .await
    }

    /// Ends a queued job `failed` before any lease (it could never be
    /// delivered). `None` if it is no longer queued.
    pub async fn fail_queued(&self, id: String, reason: String) -> Result<Option<Job>, StoreError> {
        self.timed(async {
            let mut o = self.client().await?;
            let client: &mut tokio_postgres::Client = &mut o;
            let tx = client
                .transaction()
                .await
                .map_err(pg("begin fail queued"))?;
            let sql = format!(
                "UPDATE jobs SET state = 'failed', finished_ms = $2, log_total = 0, message = $3
                 WHERE id = $1 AND state = 'queued' RETURNING {JOB_COLS}"
            );
            let Some(job) =
                one_job(&tx, "fail queued job", &sql, &[&id, &now_ms(), &reason]).await?
            else {
                return Ok(None);
            };
            let job = forget_secrets(&tx, job).await?;
            tx.commit().await.map_err(pg("commit fail queued"))?;
            Ok(Some(job))
        })
        .await
    }
}
