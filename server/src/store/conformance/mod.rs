//! The behavioural tests every [`Backend`](super::Backend) must pass: one
//! body per case, written against the [`Store`] facade, run once on the
//! embedded SQLite store (`sqlite_<case>`, a file in a temporary
//! directory) and once on PostgreSQL (`postgres_<case>`, a fresh database
//! of the throwaway cluster of `postgres::testdb`, which prints `SKIPPED`
//! and passes where PostgreSQL cannot run, unless `OUTPOST_REQUIRE_PG=1`).
//!
//! What only one backend does (SQLite's file, its permissions, restarts
//! and vacuum; several PostgreSQL replicas) is tested in that backend's
//! own tests.

use crate::model::{JobSpec, JobState, StatusReport};

/// Agents and artifacts.
mod agents;
/// Jobs: listing, queue timeouts, cancellation and secrets.
mod jobs;
/// Leases: expiry, epochs, renewals, leases never taken.
mod leases;
/// Logs: exactly-once appends, fencing, group commit.
mod logs;
/// Retention: pruning.
mod retention;

/// Whether two strings are equal, at compile time.
pub(crate) const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// For each `case => sqlite_case, postgres_case;`, the two tests running
/// the `async fn case(s: Store)` of the calling module on each backend
/// (the names are checked to be `sqlite_` and `postgres_` followed by the
/// case's name).
macro_rules! conformance {
    ($($case:ident => $sqlite:ident, $postgres:ident;)+) => {
        $(
            const _: () = assert!(
                $crate::store::conformance::same(
                    stringify!($sqlite),
                    concat!("sqlite_", stringify!($case))
                ) && $crate::store::conformance::same(
                    stringify!($postgres),
                    concat!("postgres_", stringify!($case))
                ),
                concat!("misnamed tests of ", stringify!($case))
            );

            #[tokio::test]
            async fn $sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let s = $crate::store::Store::open(&dir.path().join("db")).unwrap();
                $case(s).await;
            }

            #[tokio::test]
            async fn $postgres() {
                let Some(url) = $crate::store::postgres::testdb::fresh_db().await else {
                    return;
                };
                let s = $crate::store::Store::postgres(&url).await.unwrap();
                $case(s).await;
            }
        )+
    };
}
pub(crate) use conformance;

/// A job that runs `true` in `img`.
pub(super) fn spec() -> JobSpec {
    JobSpec {
        image: "img".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

/// A final report: succeeded, exit code 0, no log.
pub(super) fn done() -> StatusReport {
    StatusReport {
        state: JobState::Succeeded,
        exit_code: Some(0),
        message: String::new(),
        log_total: 0,
        oom_killed: false,
    }
}

/// A report that the job started.
pub(super) fn running() -> StatusReport {
    StatusReport {
        state: JobState::Running,
        exit_code: None,
        ..done()
    }
}

/// `s` as a log chunk.
pub(super) fn b(s: &str) -> bytes::Bytes {
    bytes::Bytes::from(s.to_string())
}
