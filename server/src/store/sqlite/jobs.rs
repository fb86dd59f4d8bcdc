//! Jobs: submission, lookups and pages, the queue, queue timeouts and
//! cancellation.

use std::collections::BTreeMap;

use rusqlite::params;

use super::schema::{JOB_COLS, forget_secrets, get_job, row_to_job, select_jobs};
use super::{SqliteStore, StoreError, q};
use crate::model::{Job, JobSpec, JobState, now_ms};

/// Which jobs `list_jobs` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Any of these states; empty: any state.
    pub states: Vec<JobState>,
    /// Every one of these labels in the job's selector.
    pub labels: BTreeMap<String, String>,
    /// Only jobs submitted before the one with this sequence number (the
    /// page token of the previous page).
    pub before: Option<i64>,
}

/// One page of jobs, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Jobs matching the filter over all pages.
    pub total: u64,
    /// `before` of the next page; `None` on the last one.
    pub next: Option<i64>,
    /// `seq` of each job in `jobs` (a page cut short ends at one of them).
    pub seqs: Vec<i64>,
}

/// Result of a cancel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Dequeued(Job),
    /// The job is running on an agent that must be told.
    Requested(Job),
    /// The job was already final.
    AlreadyFinal(Job),
}

impl SqliteStore {
    /// Queued jobs per label set they select (`k=v,k=v`).
    pub async fn queue_depth(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare("SELECT id, spec FROM jobs WHERE state = 'queued'")
                .map_err(q("queue depth"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(q("queue depth"))?;
            let mut depth = BTreeMap::new();
            for row in rows {
                let (id, spec) = row.map_err(q("queue depth"))?;
                let spec: JobSpec =
                    serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt {
                        id,
                        what: e.to_string(),
                    })?;
                *depth
                    .entry(crate::metrics::label_set(&spec.selector))
                    .or_insert(0) += 1;
            }
            Ok(depth)
        })
        .await
    }

    pub async fn insert_job(&self, id: String, spec: JobSpec) -> Result<Job, StoreError> {
        self.with(move |c| {
            let json = serde_json::to_string(&spec).map_err(|e| StoreError::Corrupt {
                id: id.clone(),
                what: e.to_string(),
            })?;
            c.execute(
                "INSERT INTO jobs (id, spec, state, created_ms) VALUES (?1, ?2, 'queued', ?3)",
                params![id, json, now_ms()],
            )
            .map_err(q("insert job"))?;
            get_job(c, &id)?.ok_or(StoreError::NotFound(id))
        })
        .await
    }

    pub async fn get_job(&self, id: String) -> Result<Option<Job>, StoreError> {
        self.with(move |c| get_job(c, &id)).await
    }

    /// The newest `limit` jobs matching `filter`, newest first, with the
    /// number of matching jobs over all pages.
    pub async fn list_jobs(&self, filter: JobFilter, limit: u32) -> Result<JobPage, StoreError> {
        use rusqlite::types::Value;
        self.with(move |c| {
            let mut args: Vec<Value> = Vec::new();
            let arg = |args: &mut Vec<Value>, v: Value| {
                args.push(v);
                format!("?{}", args.len())
            };
            let mut conds = Vec::new();
            if !filter.states.is_empty() {
                let states: Vec<String> = filter
                    .states
                    .iter()
                    .map(|s| arg(&mut args, Value::Text(s.as_str().into())))
                    .collect();
                conds.push(format!("state IN ({})", states.join(", ")));
            }
            for (k, v) in &filter.labels {
                let k = arg(&mut args, Value::Text(k.clone()));
                let v = arg(&mut args, Value::Text(v.clone()));
                conds.push(format!(
                    "EXISTS (SELECT 1 FROM json_each(spec, '$.selector') WHERE key = {k} AND value = {v})"
                ));
            }
            let matching = if conds.is_empty() {
                "1".to_string()
            } else {
                conds.join(" AND ")
            };
            let total: i64 = c
                .query_row(
                    &format!("SELECT COUNT(*) FROM jobs WHERE {matching}"),
                    rusqlite::params_from_iter(args.iter()),
                    |r| r.get(0),
                )
                .map_err(q("count jobs"))?;
            let before = arg(&mut args, Value::Integer(filter.before.unwrap_or(i64::MAX)));
            let lim = arg(&mut args, Value::Integer(i64::from(limit) + 1));
            let sql = format!(
                "SELECT {JOB_COLS}, seq FROM jobs WHERE {matching} AND seq < {before} ORDER BY seq DESC LIMIT {lim}"
            );
            let mut stmt = c.prepare(&sql).map_err(q("prepare list jobs"))?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(args.iter()))
                .map_err(q("list jobs"))?;
            let mut jobs = Vec::new();
            let mut seqs = Vec::new();
            while let Some(r) = rows.next().map_err(q("read job row"))? {
                jobs.push(row_to_job(r)?);
                seqs.push(r.get::<_, i64>(15).map_err(q("read job seq"))?);
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
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin expire queued"))?;
            let now = now_ms();
            let sql = format!(
                "SELECT {JOB_COLS} FROM jobs WHERE state = 'queued' AND epoch = 0
                     AND json_extract(spec, '$.queue_timeout_ms') > 0
                     AND created_ms + json_extract(spec, '$.queue_timeout_ms') <= ?1"
            );
            let expired = select_jobs(&tx, &sql, params![now])?;
            let mut out = Vec::new();
            for job in expired {
                tx.execute(
                    "UPDATE jobs SET state = 'timed_out', message = ?2, finished_ms = ?3
                     WHERE id = ?1 AND state = 'queued'",
                    params![job.id, why(&job), now],
                )
                .map_err(q("expire queued job"))?;
                forget_secrets(&tx, &job.id)?;
                if let Some(j) = get_job(&tx, &job.id)? {
                    out.push(j);
                }
            }
            tx.commit().map_err(q("commit expire queued"))?;
            Ok(out)
        })
        .await
    }

    /// Queued jobs in submission order.
    pub async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.with(move |c| {
            let sql =
                format!("SELECT {JOB_COLS} FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT ?1");
            select_jobs(c, &sql, params![limit])
        })
        .await
    }

    pub async fn request_cancel(&self, id: String) -> Result<CancelOutcome, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin cancel"))?;
            let job = get_job(&tx, &id)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
            let out = match job.state {
                JobState::Queued => {
                    tx.execute(
                        "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_ms = ?2,
                             message = 'cancelled before it started' WHERE id = ?1",
                        params![id, now_ms()],
                    )
                    .map_err(q("cancel queued job"))?;
                    forget_secrets(&tx, &id)?;
                    CancelOutcome::Dequeued(
                        get_job(&tx, &id)?.ok_or_else(|| StoreError::NotFound(id.clone()))?,
                    )
                }
                s if s.is_active() => {
                    tx.execute(
                        "UPDATE jobs SET cancel_requested = 1 WHERE id = ?1",
                        params![id],
                    )
                    .map_err(q("request cancel"))?;
                    CancelOutcome::Requested(
                        get_job(&tx, &id)?.ok_or_else(|| StoreError::NotFound(id.clone()))?,
                    )
                }
                _ => CancelOutcome::AlreadyFinal(job),
            };
            tx.commit().map_err(q("commit cancel"))?;
            Ok(out)
        })
        .await
    }

    /// Ends a queued job `failed` before any lease (it could never be
    /// delivered). `None` if it is no longer queued.
    pub async fn fail_queued(&self, id: String, reason: String) -> Result<Option<Job>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin fail queued"))?;
            let n = tx
                .execute(
                    "UPDATE jobs SET state = 'failed', finished_ms = ?2, log_total = 0, message = ?3
                     WHERE id = ?1 AND state = 'queued'",
                    params![id, now_ms(), reason],
                )
                .map_err(q("fail queued job"))?;
            if n == 0 {
                return Ok(None);
            }
            forget_secrets(&tx, &id)?;
            let job = get_job(&tx, &id)?;
            tx.commit().map_err(q("commit fail queued"))?;
            Ok(job)
        })
        .await
    }
}
