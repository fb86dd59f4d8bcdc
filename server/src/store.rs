//! The embedded durable store (SQLite, WAL, `synchronous=FULL`): jobs, their
//! logs and the agents seen.
//!
//! **Invariant:** a log offset is acknowledged to an agent only after the
//! transaction that wrote it committed, so an acknowledged byte survives a
//! server crash or restart. Logs are stored contiguously from offset 0; a chunk
//! that would leave a gap is refused and a chunk that repeats stored bytes is
//! trimmed, so each byte is stored exactly once.
//!
//! **Invariant:** every lease-scoped write checks `(job_id, epoch, agent)`
//! against the current lease inside the same transaction (fencing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{Connection, params};

use crate::model::{AgentInfo, Job, JobSpec, JobState, StatusReport, now_ms};

/// Artifact reports (fenced like every lease-scoped write).
mod artifacts;
/// Retention: pruning final jobs and shrinking the file.
mod prune;
pub use prune::{PruneRule, Pruned, StoreSize};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store query failed: {op}")]
    Query {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("stored job {id} is corrupt: {what}")]
    Corrupt { id: String, what: String },
    #[error("job {0} not found")]
    NotFound(String),
    #[error("stale lease for job {job_id}: epoch {epoch} is not the current lease of this agent")]
    Stale { job_id: String, epoch: u64 },
    #[error("log chunk for job {job_id} starts at {offset} but the store holds {acked} bytes")]
    Gap {
        job_id: String,
        offset: u64,
        acked: u64,
    },
    #[error("store task failed")]
    Join,
    #[error(
        "the store {path} is an empty file: refusing to start with no jobs; restore it from a backup, or remove it to start with an empty store"
    )]
    Empty { path: PathBuf },
    #[error("the store {path} failed its integrity check: {detail}")]
    Integrity { path: PathBuf, detail: String },
    #[error("the store's files are not private")]
    Private(#[source] outpost_agent::statedir::StateDirError),
}

fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// A handle on the store; cheap to clone. Every call runs on the blocking pool.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// Duration of every call (`outpost_store_call_seconds`).
    latency: Arc<crate::metrics::Histogram>,
}

const SCHEMA: &str = r#"
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

const JOB_COLS: &str = "id, spec, state, epoch, agent_id, exit_code, message, oom_killed, created_ms, started_ms, finished_ms, lease_deadline_ms, cancel_requested, log_acked, log_total";

/// What happened to an expired lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// Back in the queue; the next lease gets a higher epoch.
    Requeued(Job),
    /// A cancel was pending: the job ends as cancelled.
    Cancelled(Job),
}

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

impl Store {
    /// Opens (creating if needed) the store at `path`. The file and its
    /// WAL are `0600`; an existing empty file is refused (it is a lost
    /// store, not a new one), and so is one failing SQLite's quick check.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let io_err = |source: std::io::Error| {
            StoreError::Private(outpost_agent::statedir::StateDirError::Io {
                op: "create",
                path: path.to_path_buf(),
                source,
            })
        };
        match std::fs::metadata(path) {
            Ok(m) if m.len() == 0 => {
                return Err(StoreError::Empty {
                    path: path.to_path_buf(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Created here with its final mode; SQLite gives the WAL
                // and shared-memory files the mode of the database file.
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            outpost_agent::statedir::private_file(Path::new(&p)).map_err(StoreError::Private)?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        // `auto_vacuum` takes effect only on a new database (before its
        // first table): stores created earlier reuse freed pages but do
        // not shrink.
        conn.execute_batch(
            "PRAGMA auto_vacuum=INCREMENTAL; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000; PRAGMA secure_delete=ON;",
        )
        .map_err(open_err)?;
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(open_err)?;
        if check != "ok" {
            return Err(StoreError::Integrity {
                path: path.to_path_buf(),
                detail: check,
            });
        }
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        migrate(&conn).map_err(open_err)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            latency: Arc::new(crate::metrics::Histogram::new(
                &crate::metrics::LATENCY_BUCKETS,
            )),
        })
    }

    /// Runs `f` with the connection on the blocking pool (also used by the
    /// IaC layer's tables, `crate::iac::store`, which share the database).
    pub(crate) async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock();
            f(&mut guard)
        })
        .await
        .map_err(|_| StoreError::Join)?;
        self.latency.observe(started.elapsed());
        result
    }

    /// Latency of store calls so far.
    pub fn latency(&self) -> &crate::metrics::Histogram {
        &self.latency
    }

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

    /// Appends a log chunk of the current lease; returns the new contiguous
    /// acknowledged offset. Duplicated bytes are dropped, a gap is refused.
    pub async fn append_log(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<u64, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin append"))?;
            let job = current(&tx, &id, epoch, &agent)?;
            let acked = job.log_acked;
            let end = offset + data.len() as u64;
            if offset > acked {
                return Err(StoreError::Gap {
                    job_id: id,
                    offset,
                    acked,
                });
            }
            if end <= acked {
                return Ok(acked);
            }
            let skip = (acked - offset) as usize;
            let fresh = &data[skip..];
            tx.execute(
                "INSERT INTO logs (job_id, epoch, offset, data) VALUES (?1, ?2, ?3, ?4)",
                params![id, epoch as i64, acked as i64, fresh],
            )
            .map_err(q("insert log chunk"))?;
            tx.execute(
                "UPDATE jobs SET log_acked = ?2 WHERE id = ?1",
                params![id, end as i64],
            )
            .map_err(q("advance log offset"))?;
            tx.commit().map_err(q("commit append"))?;
            Ok(end)
        })
        .await
    }

    /// Reads stored log bytes of attempt `epoch` from `offset`, at most about `max` bytes.
    pub async fn read_log(
        &self,
        id: String,
        epoch: u64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.with(move |c| {
            // The chunk containing `offset` starts at the greatest offset <= it.
            let mut stmt = c
                .prepare_cached(
                    "SELECT offset, data FROM logs WHERE job_id = ?1 AND epoch = ?3 AND offset >= COALESCE(
                        (SELECT MAX(offset) FROM logs WHERE job_id = ?1 AND epoch = ?3 AND offset <= ?2), 0)
                     ORDER BY offset",
                )
                .map_err(q("prepare read log"))?;
            let mut rows = stmt
                .query(params![id, offset as i64, epoch as i64])
                .map_err(q("read log"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(q("read log row"))? {
                let start: i64 = row.get(0).map_err(q("read log offset"))?;
                let data: Vec<u8> = row.get(1).map_err(q("read log data"))?;
                let start = start as u64;
                let end = start + data.len() as u64;
                if end <= offset {
                    continue;
                }
                let from = offset.saturating_sub(start) as usize;
                out.extend_from_slice(&data[from..]);
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
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

    pub async fn upsert_agent(&self, info: AgentInfo) -> Result<(), StoreError> {
        self.with(move |c| {
            let labels = serde_json::to_string(&info.labels).unwrap_or_else(|_| "{}".into());
            c.execute(
                "INSERT INTO agents (id, version, labels, capacity, draining, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET version = ?2, labels = ?3, capacity = ?4,
                     draining = ?5, last_seen_ms = ?6",
                params![
                    info.id,
                    info.version,
                    labels,
                    info.capacity,
                    info.draining,
                    info.last_seen_ms
                ],
            )
            .map_err(q("upsert agent"))?;
            Ok(())
        })
        .await
    }

    /// Records that `id` drains (it said so itself).
    pub async fn set_agent_draining(&self, id: String) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute("UPDATE agents SET draining = 1 WHERE id = ?1", params![id])
                .map_err(q("mark agent draining"))?;
            Ok(())
        })
        .await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, version, labels, capacity, draining, last_seen_ms FROM agents ORDER BY id",
                )
                .map_err(q("prepare list agents"))?;
            let rows = stmt
                .query_map([], |r| {
                    let labels: String = r.get(2)?;
                    Ok(AgentInfo {
                        id: r.get(0)?,
                        version: r.get(1)?,
                        labels: serde_json::from_str::<BTreeMap<String, String>>(&labels)
                            .unwrap_or_default(),
                        capacity: r.get(3)?,
                        draining: r.get(4)?,
                        last_seen_ms: r.get(5)?,
                    })
                })
                .map_err(q("list agents"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(q("read agent row"))
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

/// Brings a store made by an earlier version up to the current schema.
fn migrate(c: &Connection) -> rusqlite::Result<()> {
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

fn current(c: &Connection, id: &str, epoch: u64, agent: &str) -> Result<Job, StoreError> {
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
fn forget_secrets(c: &Connection, id: &str) -> Result<(), StoreError> {
    let Some(job) = get_job(c, id)? else {
        return Ok(());
    };
    if !job.spec.holds_secret_values() {
        return Ok(());
    }
    let json = serde_json::to_string(&job.spec.without_secret_values()).map_err(|e| {
        StoreError::Corrupt {
            id: id.to_string(),
            what: e.to_string(),
        }
    })?;
    c.execute("UPDATE jobs SET spec = ?2 WHERE id = ?1", params![id, json])
        .map_err(q("forget secrets"))?;
    Ok(())
}

fn get_job(c: &Connection, id: &str) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1");
    Ok(select_jobs(c, &sql, params![id])?.into_iter().next())
}

fn select_jobs(
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

fn row_to_job(r: &rusqlite::Row<'_>) -> Result<Job, StoreError> {
    let g = q("read job column");
    let id: String = r.get(0).map_err(q("read job id"))?;
    let spec: String = r.get(1).map_err(q("read job spec"))?;
    let state: String = r.get(2).map_err(q("read job state"))?;
    let spec: JobSpec = serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt {
        id: id.clone(),
        what: format!("spec: {e}"),
    })?;
    let state = JobState::parse(&state).ok_or_else(|| StoreError::Corrupt {
        id: id.clone(),
        what: format!("state {state:?}"),
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            image: "img".into(),
            command: vec!["true".into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn secret_values_are_dropped_once_the_job_is_final() {
        use crate::model::{JobSecret, StatusReport};
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let with_secret = || JobSpec {
            secrets: vec![JobSecret {
                name: "token".into(),
                value: b"canary-7f3a".to_vec(),
            }],
            ..spec()
        };
        s.insert_job("j1".into(), with_secret()).await.unwrap();
        s.insert_job("j2".into(), with_secret()).await.unwrap();
        let j = s
            .lease_job("j1".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        // A running job keeps them (a re-lease needs them again).
        assert!(j.spec.holds_secret_values());
        let done = s
            .report(
                "j1".into(),
                j.epoch,
                "a".into(),
                StatusReport {
                    state: JobState::Succeeded,
                    exit_code: Some(0),
                    message: String::new(),
                    log_total: 0,
                    oom_killed: false,
                },
            )
            .await
            .unwrap();
        assert!(!done.spec.holds_secret_values());
        assert_eq!(done.spec.secrets[0].name, "token");
        let j1 = s.get_job("j1".into()).await.unwrap().unwrap();
        assert!(!j1.spec.holds_secret_values());
        // Cancelled before it ran.
        s.request_cancel("j2".into()).await.unwrap();
        let j2 = s.get_job("j2".into()).await.unwrap().unwrap();
        assert!(!j2.spec.holds_secret_values());
        assert_eq!(j2.spec.secrets.len(), 1);
    }

    #[tokio::test]
    async fn log_append_is_exactly_once_and_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.insert_job("j1".into(), spec()).await.unwrap();
        let j = s
            .lease_job("j1".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(j.epoch, 1);
        let b = |s: &str| bytes::Bytes::from(s.to_string());
        assert_eq!(
            s.append_log("j1".into(), 1, "a".into(), 0, b("hello "))
                .await
                .unwrap(),
            6
        );
        // duplicate, overlap, gap
        assert_eq!(
            s.append_log("j1".into(), 1, "a".into(), 0, b("hello "))
                .await
                .unwrap(),
            6
        );
        assert_eq!(
            s.append_log("j1".into(), 1, "a".into(), 3, b("lo world"))
                .await
                .unwrap(),
            11
        );
        assert!(matches!(
            s.append_log("j1".into(), 1, "a".into(), 20, b("x")).await,
            Err(StoreError::Gap { .. })
        ));
        // stale epoch and wrong agent
        assert!(matches!(
            s.append_log("j1".into(), 0, "a".into(), 11, b("x")).await,
            Err(StoreError::Stale { .. })
        ));
        assert!(matches!(
            s.append_log("j1".into(), 1, "b".into(), 11, b("x")).await,
            Err(StoreError::Stale { .. })
        ));
        assert_eq!(
            s.read_log("j1".into(), 1, 0, 1 << 20).await.unwrap(),
            b"hello world"
        );
        assert_eq!(
            s.read_log("j1".into(), 1, 4, 1 << 20).await.unwrap(),
            b"o world"
        );
        assert_eq!(s.read_log("j1".into(), 1, 11, 1 << 20).await.unwrap(), b"");
        assert_eq!(s.read_log("j1".into(), 2, 0, 1 << 20).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn expired_lease_requeues_and_next_lease_has_higher_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.insert_job("j1".into(), spec()).await.unwrap();
        s.lease_job("j1".into(), "a".into(), 0)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let exp = s.expire_leases().await.unwrap();
        assert!(matches!(&exp[..], [Expired::Requeued(j)] if j.state == JobState::Queued));
        // the old lease is refused
        let r = StatusReport {
            state: JobState::Succeeded,
            exit_code: Some(0),
            message: String::new(),
            log_total: 0,
            oom_killed: false,
        };
        assert!(matches!(
            s.report("j1".into(), 1, "a".into(), r.clone()).await,
            Err(StoreError::Stale { .. })
        ));
        let j = s
            .lease_job("j1".into(), "b".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(j.epoch, 2);
        let j = s.report("j1".into(), 2, "b".into(), r).await.unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        assert!(j.log_complete());
    }

    #[tokio::test]
    async fn a_lease_never_taken_ends_the_job_failed_after_a_bounded_number_of_tries() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.insert_job("j".into(), spec()).await.unwrap();
        for n in 1..=MAX_UNDELIVERED {
            let j = s
                .lease_job("j".into(), "a".into(), 60_000)
                .await
                .unwrap()
                .expect("queued again");
            // A stale lease is not counted.
            assert!(
                s.lease_not_taken("j".into(), j.epoch - 1, "a".into(), "x".into())
                    .await
                    .unwrap()
                    .is_none()
            );
            let after = s
                .lease_not_taken("j".into(), j.epoch, "a".into(), "cannot decode".into())
                .await
                .unwrap()
                .unwrap();
            if n < MAX_UNDELIVERED {
                assert_eq!(after.state, JobState::Queued, "try {n}");
            } else {
                assert_eq!(after.state, JobState::Failed);
                assert!(after.message.contains("cannot decode"), "{}", after.message);
                assert!(after.log_complete());
            }
        }
        // A job that ran once starts counting afresh.
        s.insert_job("k".into(), spec()).await.unwrap();
        let j = s
            .lease_job("k".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        s.lease_not_taken("k".into(), j.epoch, "a".into(), "x".into())
            .await
            .unwrap();
        let j = s
            .lease_job("k".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        let running = StatusReport {
            state: JobState::Running,
            exit_code: None,
            message: String::new(),
            log_total: 0,
            oom_killed: false,
        };
        s.report("k".into(), j.epoch, "a".into(), running)
            .await
            .unwrap();
        // Its session breaks while running: re-queued, never failed for it.
        let after = s
            .lease_not_taken("k".into(), j.epoch, "a".into(), "x".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.state, JobState::Queued);
    }

    #[tokio::test]
    async fn an_empty_store_file_is_refused_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, b"").unwrap();
        let e = Store::open(&path).err().expect("refused");
        assert!(matches!(e, StoreError::Empty { .. }), "{e}");
        std::fs::remove_file(&path).unwrap();
        let s = Store::open(&path).unwrap();
        s.insert_job("j".into(), spec()).await.unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let p = format!("{}{suffix}", path.display());
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{p}");
        }
    }

    #[tokio::test]
    async fn list_jobs_filters_by_state_and_label_and_pages_with_a_total() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        for i in 0..7 {
            let team = if i % 2 == 0 { "a" } else { "b" };
            let spec = JobSpec {
                selector: [("team".to_string(), team.to_string())].into(),
                ..spec()
            };
            s.insert_job(format!("j{i}"), spec).await.unwrap();
        }
        s.request_cancel("j6".into()).await.unwrap();
        s.request_cancel("j5".into()).await.unwrap();
        let ids = |p: &JobPage| p.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>();

        let all = s.list_jobs(JobFilter::default(), 3).await.unwrap();
        assert_eq!(
            (ids(&all), all.total),
            (vec!["j6".into(), "j5".into(), "j4".into()], 7)
        );
        let next = JobFilter {
            before: all.next,
            ..Default::default()
        };
        let p2 = s.list_jobs(next.clone(), 3).await.unwrap();
        assert_eq!(ids(&p2), ["j3", "j2", "j1"]);
        let p3 = s
            .list_jobs(
                JobFilter {
                    before: p2.next,
                    ..next
                },
                3,
            )
            .await
            .unwrap();
        assert_eq!((ids(&p3), p3.next, p3.total), (vec!["j0".into()], None, 7));

        let queued_a = JobFilter {
            states: vec![JobState::Queued],
            labels: [("team".to_string(), "a".to_string())].into(),
            before: None,
        };
        let p = s.list_jobs(queued_a, 10).await.unwrap();
        assert_eq!(
            (ids(&p), p.total),
            (vec!["j4".into(), "j2".into(), "j0".into()], 3)
        );
        let cancelled = JobFilter {
            states: vec![JobState::Cancelled, JobState::Failed],
            ..Default::default()
        };
        assert_eq!(s.list_jobs(cancelled, 10).await.unwrap().total, 2);
        // A quote in a label cannot escape the query.
        let odd = JobFilter {
            labels: [("team'\"".to_string(), "a') OR 1=1 --".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(s.list_jobs(odd, 10).await.unwrap().total, 0);
    }

    #[tokio::test]
    async fn queued_jobs_past_their_queue_timeout_end_timed_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let with_timeout = |ms| JobSpec {
            queue_timeout_ms: ms,
            ..spec()
        };
        s.insert_job("short".into(), with_timeout(1)).await.unwrap();
        s.insert_job("long".into(), with_timeout(3_600_000))
            .await
            .unwrap();
        s.insert_job("none".into(), spec()).await.unwrap();
        s.insert_job("leased".into(), with_timeout(1))
            .await
            .unwrap();
        s.lease_job("leased".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let gone = s
            .expire_queued(|j| format!("waited too long: {}", j.id))
            .await
            .unwrap();
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert_eq!(gone[0].id, "short");
        assert_eq!(gone[0].state, JobState::TimedOut);
        assert_eq!(gone[0].message, "waited too long: short");
        assert!(gone[0].finished_ms > 0);
        // Once timed out it can never be leased.
        assert!(
            s.lease_job("short".into(), "a".into(), 1)
                .await
                .unwrap()
                .is_none()
        );
        for id in ["long", "none"] {
            let j = s.get_job(id.into()).await.unwrap().unwrap();
            assert_eq!(j.state, JobState::Queued, "{id}");
        }
    }

    #[tokio::test]
    async fn jobs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            s.insert_job("j1".into(), spec()).await.unwrap();
            s.insert_job("j2".into(), spec()).await.unwrap();
        }
        let s = Store::open(&path).unwrap();
        let q = s.queued_jobs(10).await.unwrap();
        assert_eq!(
            q.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["j1", "j2"]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Chunks delivered out of order and duplicated, with the agent
        /// resending from the acknowledged offset (as it does after every
        /// reconnect), reassemble into exactly the original log.
        #[test]
        fn log_reassembles_from_out_of_order_and_duplicated_chunks(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..4000),
            cuts in proptest::collection::vec(1usize..400, 1..30),
            order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 1..60),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let s = Store::open(&dir.path().join("db")).unwrap();
                s.insert_job("j".into(), spec()).await.unwrap();
                s.lease_job("j".into(), "a".into(), 60_000).await.unwrap().unwrap();
                // Split into chunks at arbitrary points.
                let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
                let mut pos = 0usize;
                for c in cuts.iter().cycle() {
                    if pos >= data.len() { break; }
                    let end = (pos + c).min(data.len());
                    chunks.push((pos as u64, data[pos..end].to_vec()));
                    pos = end;
                }
                // Deliver a random sequence (out of order, with duplicates).
                let mut acked = 0u64;
                for i in &order {
                    let (off, d) = i.get(&chunks).clone();
                    match s.append_log("j".into(), 1, "a".into(), off, d.into()).await {
                        Ok(a) => { assert!(a >= acked, "the ack never goes back"); acked = a; }
                        Err(StoreError::Gap { acked: a, .. }) => assert_eq!(a, acked),
                        Err(e) => panic!("{e}"),
                    }
                }
                // The agent resends everything from the acknowledged offset.
                for (off, d) in &chunks {
                    if off + d.len() as u64 > acked {
                        acked = s.append_log("j".into(), 1, "a".into(), *off, d.clone().into()).await.unwrap();
                    }
                }
                assert_eq!(acked, data.len() as u64);
                assert_eq!(s.read_log("j".into(), 1, 0, usize::MAX).await.unwrap(), data);
            });
        }
    }
}
