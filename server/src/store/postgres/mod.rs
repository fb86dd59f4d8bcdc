//! The store on PostgreSQL: the same jobs, leases, logs, agents and
//! artifacts as the SQLite store, with the same methods and meanings, for
//! several control-plane replicas sharing one database.
//!
//! **Invariants kept from the SQLite store:** every lease-scoped write
//! checks `(job, epoch, agent)` against the job's row, locked (`FOR
//! UPDATE`) in the same transaction (fencing); a log is stored contiguously
//! from offset 0, each byte once; log chunks, status reports and agent
//! records go through group commit and are answered only after their
//! batch's `COMMIT`; a job's secret values are cleared in the transaction
//! that makes it final.
//!
//! **Leasing on several replicas.** A lease is an `UPDATE … WHERE state =
//! 'queued' AND NOT cancel_requested` that raises the epoch in SQL, so two
//! replicas leasing the same job from the same queue listing lease it
//! once: the second update finds the row no longer queued. A dispatch
//! pass updates its rows in the order of their ids, so two passes never
//! wait on each other in a cycle; a transaction PostgreSQL aborts anyway
//! to break a deadlock (a dispatch pass, a session's renewals, a group
//! commit batch) had no effect and runs again, up to three times.
//!
//! **Renewals (heartbeats).** Each replica keeps a local table of the
//! leases of the agents whose sessions it serves (`local`): filled by its
//! own lease writes and by `renew` at a session's start, which also loads
//! every durable lease of the agent (so `held_by` and `held_count` answer
//! for the agents connected here, and only for them). `renew_held`
//! answers from it at once; the renewed deadlines are written by a
//! background task at most every [`FLUSH_EVERY`] in one fenced `UPDATE`
//! (`GREATEST` of the stored and the renewed deadline, only where `(id,
//! epoch, agent)` still holds an active lease; rows another transaction
//! holds are skipped by it and then written one statement each, waiting
//! for the row, so a job whose row is busy all the time keeps its lease).
//! The rules:
//! - a lease enters the table only after the write that made it durable
//!   committed, so "renewed" is never answered for a lease that never was
//!   durable; a lease the table does not know is answered "revoked";
//! - a flush that finds a lease no longer current (ended or re-leased by
//!   any replica) drops it from the table, so a revoked lease is answered
//!   "renewed" at most until the next flush (one [`FLUSH_EVERY`]); such an
//!   answer grants nothing: every write of that lease is fenced in the
//!   database and refused, and its deadline is not written;
//! - a renewal never flushed (a replica that died) is lost: the lease
//!   expires at its durable deadline, on whichever replica sweeps first,
//!   unless the agent's next session (on any replica) renews it with
//!   `renew`, which writes at once.
//!
//! **Expiry.** `expire_leases` first writes this replica's pending
//! renewals (so a lease its agents renewed is never expired by its own
//! sweep, nor by another replica's after that), then ends, in one
//! transaction, the active leases whose *durable* deadline passed,
//! selected `FOR UPDATE SKIP LOCKED`: every replica may sweep at once, and
//! each lease is ended by one of them. Leases whose deadline in this
//! replica's table passed are then dropped from it (their agent stopped
//! renewing them here: expired, or renewed through another replica).
//!
//! **Start of a replica.** `extend_active_leases` gives every active lease
//! at least one time-to-live from now, as the SQLite store does after a
//! restart; with other replicas alive this only delays the expiry of a
//! lease whose agent is gone by one time-to-live.
//!
//! **Retention.** `vacuum_step` and `vacuum` do nothing: PostgreSQL's
//! autovacuum reclaims the space of deleted rows.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use parking_lot::Mutex;

use super::StoreError;

/// Agents seen: registration, draining, listing.
mod agents;
/// Artifact reports (fenced like every lease-scoped write).
mod artifacts;
/// Group commit of log chunks, status reports and agent records.
mod batch;
/// Jobs: submission, queries, queue timeouts, cancellation.
mod jobs;
/// Leases: granting, renewing, expiring, declining (fencing by epoch).
mod leases;
/// The leases of this replica's agents, in memory, and their flushing.
mod local;
/// Job logs: appending (fenced, exactly once) and reading.
mod logs;
/// Retention: pruning final jobs; the database's size.
mod prune;
/// Renewals: at a session's start, by heartbeats; counts per agent.
mod renewals;
/// Status reports (fenced, group-committed).
mod reports;
/// The schema, its versioned migrations and reading job rows.
mod schema;

use local::Local;

/// Renewed deadlines are written at most this often (and before every
/// expiry sweep).
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Connections in the pool at most.
const POOL_SIZE: usize = 16;

/// Maps a query's error to [`StoreError::Pg`] naming `op`.
pub(crate) fn pg(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Pg { op, source }
}

/// A handle on the PostgreSQL store; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// The leases of this replica's agents.
    local: Arc<Mutex<Local>>,
    /// The group-commit writer (`batch`).
    batch: tokio::sync::mpsc::Sender<batch::Op>,
    /// Duration of every call (`outpost_store_call_seconds`).
    latency: Arc<crate::metrics::Histogram>,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:pass@host/db`
    /// or `host=… dbname=…`), brings its schema up to date and starts the
    /// group-commit writer and the renewal flusher (so it needs a Tokio
    /// runtime).
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(pg("parse the database URL"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::PgPool {
                op: "build the connection pool",
                source: Box::new(e),
            })?;
        {
            let mut client = pool.get().await.map_err(pool_err("connect"))?;
            schema::migrate(&mut client).await?;
        }
        let local = Arc::new(Mutex::new(Local::default()));
        let latency = Arc::new(crate::metrics::Histogram::new(
            &crate::metrics::LATENCY_BUCKETS,
        ));
        let batch = batch::spawn_writer(pool.clone(), local.clone(), latency.clone());
        local::spawn_flusher(pool.clone(), Arc::downgrade(&local));
        Ok(PgStore {
            pool,
            local,
            batch,
            latency,
        })
    }

    /// The connection pool.
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err("take a connection"))
    }

    /// Runs `f` and records its duration.
    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let out = f.await;
        self.latency.observe(started.elapsed());
        out
    }

    /// Latency of store calls so far.
    pub fn latency(&self) -> &crate::metrics::Histogram {
        &self.latency
    }
}

/// Maps a pool's error to [`StoreError::Pg`] or [`StoreError::PgPool`].
pub(crate) fn pool_err(
    op: &'static str,
) -> impl FnOnce(deadpool_postgres::PoolError) -> StoreError {
    move |e| match e {
        deadpool_postgres::PoolError::Backend(source) => StoreError::Pg { op, source },
        e => StoreError::PgPool {
            op,
            source: Box::new(e),
        },
    }
}

#[cfg(test)]
mod replica_tests;
#[cfg(test)]
pub(crate) mod testdb;
