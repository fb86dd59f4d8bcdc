//! The embedded store (SQLite, WAL, `synchronous=FULL`): jobs, their
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

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::Connection;

/// Agents seen: registration, draining, listing.
mod agents;
/// Artifact reports (fenced like every lease-scoped write).
mod artifacts;
/// Group commit of log chunks and status reports.
mod batch;
/// The leases held now, in memory (renewals, counts per agent, expiry).
mod held;
/// Jobs: submission, queries, queue timeouts, cancellation.
mod jobs;
/// Leases: granting, renewing, expiring, declining (fencing by epoch).
mod leases;
/// Job logs: appending (fenced, exactly once) and reading.
mod logs;
/// Retention: pruning final jobs and shrinking the file.
mod prune;
/// The schema, its migrations and reading job rows.
mod schema;

use held::Held;
pub use held::{HeldLease, Renewal};
pub use jobs::{CancelOutcome, JobFilter, JobPage};
pub use leases::{Expired, MAX_UNDELIVERED};
pub use prune::{PruneRule, Pruned, StoreSize};
pub(crate) use schema::current;
use schema::{SCHEMA, migrate};

use super::StoreError;

pub(crate) fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// A handle on the store; cheap to clone. Every call that reads or writes
/// the database runs on the blocking pool; lease renewals and counts are
/// answered from memory (`held`).
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The leases held now (taken after `conn` when both are held).
    held: Arc<Mutex<Held>>,
    /// The group-commit writer (`batch`).
    batch: crate::store::batch::Writer,
    /// Duration of every call (`outpost_store_call_seconds`).
    latency: Arc<crate::metrics::Histogram>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`. The file and its
    /// WAL are `0600`; an existing empty file is refused (it is a lost
    /// store, not a new one), and so is one failing SQLite's quick check.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
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
        let held = Arc::new(Mutex::new(Held::load(&conn)?));
        let conn = Arc::new(Mutex::new(conn));
        let latency = Arc::new(crate::metrics::Histogram::new(
            &crate::metrics::LATENCY_BUCKETS,
        ));
        let batch = batch::spawn_writer(Arc::downgrade(&conn), held.clone(), latency.clone())
            .map_err(StoreError::Writer)?;
        Ok(SqliteStore {
            conn,
            held,
            batch,
            latency,
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

    /// Runs `f` with the connection and the held-lease table on the
    /// blocking pool, for writes that change leases.
    pub(super) async fn with_held<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Mutex<Held>) -> Result<T, StoreError> + Send + 'static,
    {
        let held = self.held.clone();
        self.with(move |c| f(c, &held)).await
    }

    /// Latency of store calls so far.
    pub fn latency(&self) -> &crate::metrics::Histogram {
        &self.latency
    }
}

#[cfg(test)]
mod tests;
