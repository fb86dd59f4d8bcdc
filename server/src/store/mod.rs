//! The control plane's durable store, behind one trait ([`Backend`]) with
//! two implementations: the embedded SQLite store (`sqlite`, the default:
//! one file, one process) and PostgreSQL (`postgres`: several replicas
//! against one database). Callers hold a [`Store`], which derefs to the
//! backend it was opened with.
//!
//! **Invariants every backend keeps** (and the shared behavioural tests,
//! `conformance`, check on each: every case runs once on SQLite and once
//! on PostgreSQL):
//! - a log offset is acknowledged only after the transaction that wrote it
//!   committed; logs are stored contiguously from offset 0, each byte once;
//! - every lease-scoped write checks `(job_id, epoch, agent)` against the
//!   current lease inside the same transaction (fencing), and a job's epoch
//!   only increases: a re-lease gets a higher one;
//! - secret values of a job are forgotten once it is final.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::model::{AgentInfo, Artifact, Job, JobSpec, StatusReport};

/// What both backends' group commit shares.
mod batch;
/// The behavioural tests every backend must pass, run on each.
#[cfg(test)]
pub(crate) mod conformance;
/// The same store on PostgreSQL, for several control-plane replicas.
pub mod postgres;
/// Decoding a job row's text columns, for both backends.
mod rows;
/// The embedded store (SQLite).
pub mod sqlite;

pub use sqlite::{
    CancelOutcome, Expired, HeldLease, JobFilter, JobPage, MAX_UNDELIVERED, PruneRule, Pruned,
    Renewal, SqliteStore, StoreSize,
};

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
    #[error("store batch failed to commit: {0}")]
    Batch(String),
    #[error("failed to start the store's writer thread")]
    Writer(#[source] std::io::Error),
    #[error(
        "the store {path} is an empty file: refusing to start with no jobs; restore it from a backup, or remove it to start with an empty store"
    )]
    Empty { path: PathBuf },
    #[error("the store {path} failed its integrity check: {detail}")]
    Integrity { path: PathBuf, detail: String },
    #[error("failed to connect to PostgreSQL at {url}")]
    Connect {
        /// Without its password.
        url: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("not available with this store: {0}")]
    Unsupported(&'static str),
    #[error("the store's files are not private")]
    Private(#[source] outpost_agent::statedir::StateDirError),
    #[error("PostgreSQL query failed: {op}")]
    Pg {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the PostgreSQL connection settings are not usable")]
    PgTls(#[source] postgres::tls::TlsSetupError),
    #[error("no PostgreSQL connection: {op}")]
    PgPool {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Resolves to an operation's result once its batch committed.
pub struct Committed<T>(oneshot::Receiver<Result<T, StoreError>>);

impl<T> Committed<T> {
    pub(crate) fn new() -> (oneshot::Sender<Result<T, StoreError>>, Committed<T>) {
        let (tx, rx) = oneshot::channel();
        (tx, Committed(rx))
    }
}

impl<T> std::future::Future for Committed<T> {
    type Output = Result<T, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Join)))
    }
}

/// Why a queued job timed out, given the job (for `expire_queued`).
pub type QueueTimeout = Box<dyn Fn(&Job) -> String + Send + Sync + 'static>;

/// What the control plane needs of its store. Every call that writes is
/// durable when it returns (or, for the `_queued` calls, when the returned
/// [`Committed`] resolves).
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    // Jobs
    async fn queue_depth(&self) -> Result<BTreeMap<String, u64>, StoreError>;
    async fn insert_job(&self, id: String, spec: JobSpec) -> Result<Job, StoreError>;
    async fn get_job(&self, id: String) -> Result<Option<Job>, StoreError>;
    async fn list_jobs(&self, filter: JobFilter, limit: u32) -> Result<JobPage, StoreError>;
    async fn expire_queued(&self, why: QueueTimeout) -> Result<Vec<Job>, StoreError>;
    async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>, StoreError>;
    async fn request_cancel(&self, id: String) -> Result<CancelOutcome, StoreError>;
    async fn fail_queued(&self, id: String, reason: String) -> Result<Option<Job>, StoreError>;
    // Leases
    async fn active_jobs(&self) -> Result<Vec<Job>, StoreError>;
    async fn lease_job(
        &self,
        id: String,
        agent: String,
        ttl_ms: u64,
    ) -> Result<Option<Job>, StoreError>;
    async fn lease_jobs(
        &self,
        pairs: Vec<(String, String)>,
        ttl_ms: u64,
    ) -> Result<Vec<Option<Job>>, StoreError>;
    async fn requeue(&self, id: String, epoch: u64, agent: String) -> Result<bool, StoreError>;
    async fn current_lease(&self, id: String, epoch: u64, agent: String)
    -> Result<Job, StoreError>;
    async fn renew(
        &self,
        agent: String,
        leases: Vec<(String, u64)>,
        ttl_ms: u64,
    ) -> Result<(Vec<Job>, Vec<(String, u64)>), StoreError>;
    async fn report(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<Job, StoreError>;
    async fn report_queued(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<Committed<Job>, StoreError>;
    async fn expire_leases(&self) -> Result<Vec<Expired>, StoreError>;
    async fn extend_active_leases(&self, ttl: std::time::Duration) -> Result<usize, StoreError>;
    async fn lease_not_taken(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        reason: String,
    ) -> Result<Option<Job>, StoreError>;
    async fn active_count(&self, agent: String) -> Result<u32, StoreError>;
    fn held_count(&self, agent: &str) -> u32;
    fn held_by(&self, agent: &str) -> Vec<(String, u64)>;
    fn renew_held(&self, agent: &str, leases: Vec<(String, u64)>, ttl_ms: u64) -> Renewal;
    // Logs
    async fn append_log(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<u64, StoreError>;
    async fn append_log_queued(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<Committed<u64>, StoreError>;
    async fn read_log(
        &self,
        id: String,
        epoch: u64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError>;
    // Agents and artifacts
    async fn upsert_agent(&self, info: AgentInfo) -> Result<(), StoreError>;
    async fn set_agent_draining(&self, id: String) -> Result<(), StoreError>;
    async fn list_agents(&self) -> Result<Vec<AgentInfo>, StoreError>;
    async fn record_artifact(
        &self,
        agent: String,
        artifact: Artifact,
    ) -> Result<Artifact, StoreError>;
    async fn list_artifacts(&self, job_id: String) -> Result<Vec<Artifact>, StoreError>;
    // Retention
    async fn prunable(&self, rule: PruneRule, limit: u32) -> Result<Vec<String>, StoreError>;
    async fn delete_final_job(&self, id: String) -> Result<Option<u64>, StoreError>;
    async fn prune(&self, rule: PruneRule) -> Result<Pruned, StoreError>;
    async fn vacuum_step(&self, pages: u32) -> Result<u64, StoreError>;
    async fn vacuum(&self) -> Result<(), StoreError>;
    async fn size(&self) -> Result<StoreSize, StoreError>;
    fn latency(&self) -> &crate::metrics::Histogram;
}

/// Implements [`Backend`] for a store type by calling its inherent methods
/// of the same names.
macro_rules! delegate_backend {
    ($t:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Backend for $t {
            // Jobs
            async fn queue_depth(&self) -> Result<BTreeMap<String, u64>, StoreError> {
                <$t>::queue_depth(self).await
            }
            async fn insert_job(&self, id: String, spec: JobSpec) -> Result<Job, StoreError> {
                <$t>::insert_job(self, id, spec).await
            }
            async fn get_job(&self, id: String) -> Result<Option<Job>, StoreError> {
                <$t>::get_job(self, id).await
            }
            async fn list_jobs(
                &self,
                filter: JobFilter,
                limit: u32,
            ) -> Result<JobPage, StoreError> {
                <$t>::list_jobs(self, filter, limit).await
            }
            async fn expire_queued(&self, why: QueueTimeout) -> Result<Vec<Job>, StoreError> {
                <$t>::expire_queued(self, why).await
            }
            async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
                <$t>::queued_jobs(self, limit).await
            }
            async fn request_cancel(&self, id: String) -> Result<CancelOutcome, StoreError> {
                <$t>::request_cancel(self, id).await
            }
            async fn fail_queued(
                &self,
                id: String,
                reason: String,
            ) -> Result<Option<Job>, StoreError> {
                <$t>::fail_queued(self, id, reason).await
            }
            // Leases
            async fn active_jobs(&self) -> Result<Vec<Job>, StoreError> {
                <$t>::active_jobs(self).await
            }
            async fn lease_job(
                &self,
                id: String,
                agent: String,
                ttl_ms: u64,
            ) -> Result<Option<Job>, StoreError> {
                <$t>::lease_job(self, id, agent, ttl_ms).await
            }
            async fn lease_jobs(
                &self,
                pairs: Vec<(String, String)>,
                ttl_ms: u64,
            ) -> Result<Vec<Option<Job>>, StoreError> {
                <$t>::lease_jobs(self, pairs, ttl_ms).await
            }
            async fn requeue(
                &self,
                id: String,
                epoch: u64,
                agent: String,
            ) -> Result<bool, StoreError> {
                <$t>::requeue(self, id, epoch, agent).await
            }
            async fn current_lease(
                &self,
                id: String,
                epoch: u64,
                agent: String,
            ) -> Result<Job, StoreError> {
                <$t>::current_lease(self, id, epoch, agent).await
            }
            async fn renew(
                &self,
                agent: String,
                leases: Vec<(String, u64)>,
                ttl_ms: u64,
            ) -> Result<(Vec<Job>, Vec<(String, u64)>), StoreError> {
                <$t>::renew(self, agent, leases, ttl_ms).await
            }
            async fn report(
                &self,
                id: String,
                epoch: u64,
                agent: String,
                report: StatusReport,
            ) -> Result<Job, StoreError> {
                <$t>::report(self, id, epoch, agent, report).await
            }
            async fn report_queued(
                &self,
                id: String,
                epoch: u64,
                agent: String,
                report: StatusReport,
            ) -> Result<Committed<Job>, StoreError> {
                <$t>::report_queued(self, id, epoch, agent, report).await
            }
            async fn expire_leases(&self) -> Result<Vec<Expired>, StoreError> {
                <$t>::expire_leases(self).await
            }
            async fn extend_active_leases(
                &self,
                ttl: std::time::Duration,
            ) -> Result<usize, StoreError> {
                <$t>::extend_active_leases(self, ttl).await
            }
            async fn lease_not_taken(
                &self,
                id: String,
                epoch: u64,
                agent: String,
                reason: String,
            ) -> Result<Option<Job>, StoreError> {
                <$t>::lease_not_taken(self, id, epoch, agent, reason).await
            }
            async fn active_count(&self, agent: String) -> Result<u32, StoreError> {
                <$t>::active_count(self, agent).await
            }
            fn held_count(&self, agent: &str) -> u32 {
                <$t>::held_count(self, agent)
            }
            fn held_by(&self, agent: &str) -> Vec<(String, u64)> {
                <$t>::held_by(self, agent)
            }
            fn renew_held(&self, agent: &str, leases: Vec<(String, u64)>, ttl_ms: u64) -> Renewal {
                <$t>::renew_held(self, agent, leases, ttl_ms)
            }
            // Logs
            async fn append_log(
                &self,
                id: String,
                epoch: u64,
                agent: String,
                offset: u64,
                data: bytes::Bytes,
            ) -> Result<u64, StoreError> {
                <$t>::append_log(self, id, epoch, agent, offset, data).await
            }
            async fn append_log_queued(
                &self,
                id: String,
                epoch: u64,
                agent: String,
                offset: u64,
                data: bytes::Bytes,
            ) -> Result<Committed<u64>, StoreError> {
                <$t>::append_log_queued(self, id, epoch, agent, offset, data).await
            }
            async fn read_log(
                &self,
                id: String,
                epoch: u64,
                offset: u64,
                max: usize,
            ) -> Result<Vec<u8>, StoreError> {
                <$t>::read_log(self, id, epoch, offset, max).await
            }
            // Agents and artifacts
            async fn upsert_agent(&self, info: AgentInfo) -> Result<(), StoreError> {
                <$t>::upsert_agent(self, info).await
            }
            async fn set_agent_draining(&self, id: String) -> Result<(), StoreError> {
                <$t>::set_agent_draining(self, id).await
            }
            async fn list_agents(&self) -> Result<Vec<AgentInfo>, StoreError> {
                <$t>::list_agents(self).await
            }
            async fn record_artifact(
                &self,
                agent: String,
                artifact: Artifact,
            ) -> Result<Artifact, StoreError> {
                <$t>::record_artifact(self, agent, artifact).await
            }
            async fn list_artifacts(&self, job_id: String) -> Result<Vec<Artifact>, StoreError> {
                <$t>::list_artifacts(self, job_id).await
            }
            // Retention
            async fn prunable(
                &self,
                rule: PruneRule,
                limit: u32,
            ) -> Result<Vec<String>, StoreError> {
                <$t>::prunable(self, rule, limit).await
            }
            async fn delete_final_job(&self, id: String) -> Result<Option<u64>, StoreError> {
                <$t>::delete_final_job(self, id).await
            }
            async fn prune(&self, rule: PruneRule) -> Result<Pruned, StoreError> {
                <$t>::prune(self, rule).await
            }
            async fn vacuum_step(&self, pages: u32) -> Result<u64, StoreError> {
                <$t>::vacuum_step(self, pages).await
            }
            async fn vacuum(&self) -> Result<(), StoreError> {
                <$t>::vacuum(self).await
            }
            async fn size(&self) -> Result<StoreSize, StoreError> {
                <$t>::size(self).await
            }
            fn latency(&self) -> &crate::metrics::Histogram {
                <$t>::latency(self)
            }
        }
    };
}

delegate_backend!(SqliteStore);
delegate_backend!(postgres::PgStore);

/// `url` without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            match user.find(':') {
                Some(colon) => {
                    format!("{}{}:***{}", &url[..scheme + 3], &user[..colon], &url[at..])
                }
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A handle on the store the control plane was started with; cheap to
/// clone. It derefs to the [`Backend`].
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// The same store as `backend` when it is the embedded one.
    sqlite: Option<SqliteStore>,
    /// The same store as `backend` when it is PostgreSQL.
    pg: Option<postgres::PgStore>,
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl Store {
    /// Opens (creating if needed) the embedded store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let s = SqliteStore::open(path)?;
        Ok(Store {
            backend: Arc::new(s.clone()),
            sqlite: Some(s),
            pg: None,
        })
    }

    /// Connects to the PostgreSQL database at `url` (migrating its schema
    /// to this version's first).
    pub async fn postgres(url: &str) -> Result<Store, StoreError> {
        let s = postgres::PgStore::connect(url)
            .await
            .map_err(|e| StoreError::Connect {
                url: redact_url(url),
                source: Box::new(e),
            })?;
        Ok(Store {
            backend: Arc::new(s.clone()),
            sqlite: None,
            pg: Some(s),
        })
    }

    /// The connection pool, when this store is PostgreSQL: the control
    /// plane's other tables (stacks, runs, state, blobs, enrollments,
    /// notifications) are kept in the same database, each module with its
    /// own queries (see `postgres::schema` for their migrations).
    pub(crate) fn pg(&self) -> Option<&deadpool_postgres::Pool> {
        self.pg.as_ref().map(|p| p.pool())
    }

    /// Runs `f` with the embedded store's connection on the blocking pool
    /// (the SQLite side of the control plane's other tables: stacks, runs,
    /// state, enrollments, notifications); on PostgreSQL those modules
    /// use [`Store::pg`] instead, and this is refused.
    pub(crate) async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    {
        match &self.sqlite {
            Some(s) => s.with(f).await,
            None => Err(StoreError::Unsupported(
                "a query written for the embedded store, on PostgreSQL",
            )),
        }
    }

    /// Queued jobs whose queue timeout passed end `failed` with `why(job)`.
    pub async fn expire_queued(
        &self,
        why: impl Fn(&Job) -> String + Send + Sync + 'static,
    ) -> Result<Vec<Job>, StoreError> {
        self.backend.expire_queued(Box::new(why)).await
    }
}

#[cfg(test)]
mod location_tests {
    use super::redact_url;

    #[test]
    fn a_url_loses_its_password_only() {
        assert_eq!(
            redact_url("postgres://bob:s3cret@db:5432/outpost"),
            "postgres://bob:***@db:5432/outpost"
        );
        assert_eq!(
            redact_url("postgres://bob@db/outpost"),
            "postgres://bob@db/outpost"
        );
        assert_eq!(redact_url("postgres://db/outpost"), "postgres://db/outpost");
    }
}
