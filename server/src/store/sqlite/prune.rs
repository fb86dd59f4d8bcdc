//! Retention: deleting final jobs with their logs and artifact records, and
//! giving the space back to the file system.
//!
//! **Invariant:** only final jobs are ever deleted (checked in the deleting
//! transaction), and every step is a short transaction of its own — a few
//! log chunks, or a few hundred pages of incremental vacuum — so leases,
//! heartbeats and log appends never wait long behind retention.

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, StoreError, q};
use crate::model::now_ms;

/// Final states, as stored.
const FINAL: &str = "state NOT IN ('queued','leased','running')";

/// Log chunks deleted per transaction (a chunk is at most 64 KiB).
const LOG_ROWS_PER_STEP: i64 = 32;

/// Which final jobs to delete: those finished more than `older_than_ms`
/// ago, and those beyond the newest `keep` final jobs. `None`: no such
/// limit; both `None` selects nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneRule {
    pub older_than_ms: Option<u64>,
    pub keep: Option<u64>,
}

/// What a prune deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub log_bytes: u64,
}

/// Size of the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreSize {
    /// Bytes of the database (pages in use and free pages).
    pub bytes: u64,
    /// Bytes of free pages, given back to the file system by the
    /// incremental vacuum (with `auto_vacuum = incremental`).
    pub free_bytes: u64,
    pub jobs: u64,
    /// Whether the store shrinks (`auto_vacuum = incremental`); stores
    /// created by older versions only reuse their free pages.
    pub incremental_vacuum: bool,
}

impl SqliteStore {
    /// Final jobs selected by `rule`, oldest first, at most `limit`.
    pub async fn prunable(&self, rule: PruneRule, limit: u32) -> Result<Vec<String>, StoreError> {
        if rule.older_than_ms.is_none() && rule.keep.is_none() {
            return Ok(Vec::new());
        }
        self.with(move |c| {
            let before = rule
                .older_than_ms
                .map(|age| now_ms().saturating_sub(age.min(i64::MAX as u64) as i64));
            let keep = rule.keep.map(|k| k.min(i64::MAX as u64) as i64);
            let sql = format!(
                "SELECT id FROM jobs WHERE {FINAL} AND (
                     (?1 IS NOT NULL AND finished_ms < ?1)
                     OR (?2 IS NOT NULL AND seq NOT IN
                         (SELECT seq FROM jobs WHERE {FINAL} ORDER BY seq DESC LIMIT ?2)))
                 ORDER BY seq LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(q("prepare prunable"))?;
            let rows = stmt
                .query_map(params![before, keep, limit], |r| r.get::<_, String>(0))
                .map_err(q("select prunable"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(q("read prunable"))
        })
        .await
    }

    /// Deletes one final job: its log a few chunks per transaction, then its
    /// artifact records and its row. Returns the log bytes deleted, or
    /// `None` if the job is not final (or gone).
    pub async fn delete_final_job(&self, id: String) -> Result<Option<u64>, StoreError> {
        let mut bytes = 0u64;
        loop {
            let id = id.clone();
            let step = self
                .with(move |c| {
                    let tx = c.transaction().map_err(q("begin prune"))?;
                    let is_final: Option<bool> = tx
                        .query_row(
                            &format!("SELECT {FINAL} FROM jobs WHERE id = ?1"),
                            params![id],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(q("check job before prune"))?;
                    if is_final != Some(true) {
                        return Ok(None);
                    }
                    let chunks: Vec<(i64, i64, i64)> = {
                        let mut stmt = tx
                            .prepare_cached(
                                "SELECT epoch, offset, length(data) FROM logs WHERE job_id = ?1 LIMIT ?2",
                            )
                            .map_err(q("prepare prune logs"))?;
                        let rows = stmt
                            .query_map(params![id, LOG_ROWS_PER_STEP], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                            })
                            .map_err(q("select logs to prune"))?;
                        rows.collect::<Result<_, _>>()
                            .map_err(q("read logs to prune"))?
                    };
                    let mut deleted = 0u64;
                    for (epoch, offset, len) in &chunks {
                        tx.execute(
                            "DELETE FROM logs WHERE job_id = ?1 AND epoch = ?2 AND offset = ?3",
                            params![id, epoch, offset],
                        )
                        .map_err(q("prune log chunk"))?;
                        deleted += *len as u64;
                    }
                    let done = (chunks.len() as i64) < LOG_ROWS_PER_STEP;
                    if done {
                        tx.execute("DELETE FROM artifacts WHERE job_id = ?1", params![id])
                            .map_err(q("prune artifacts"))?;
                        tx.execute("DELETE FROM jobs WHERE id = ?1", params![id])
                            .map_err(q("prune job"))?;
                    }
                    tx.commit().map_err(q("commit prune"))?;
                    Ok(Some((deleted, done)))
                })
                .await?;
            match step {
                None => return Ok(None),
                Some((deleted, done)) => {
                    bytes += deleted;
                    if done {
                        return Ok(Some(bytes));
                    }
                }
            }
        }
    }

    /// Deletes every final job `rule` selects (see [`SqliteStore::delete_final_job`]).
    pub async fn prune(&self, rule: PruneRule) -> Result<Pruned, StoreError> {
        let mut out = Pruned::default();
        loop {
            let ids = self.prunable(rule, 100).await?;
            if ids.is_empty() {
                return Ok(out);
            }
            let mut progress = false;
            for id in ids {
                if let Some(bytes) = self.delete_final_job(id).await? {
                    out.jobs += 1;
                    out.log_bytes += bytes;
                    progress = true;
                }
            }
            if !progress {
                return Ok(out);
            }
        }
    }

    /// Gives at most `pages` free pages back to the file system (a no-op on
    /// a store without incremental auto-vacuum); returns the free pages left.
    pub async fn vacuum_step(&self, pages: u32) -> Result<u64, StoreError> {
        self.with(move |c| {
            c.execute_batch(&format!("PRAGMA incremental_vacuum({pages})"))
                .map_err(q("incremental vacuum"))?;
            c.query_row("PRAGMA freelist_count", [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(q("count free pages"))
        })
        .await
    }

    /// Runs [`SqliteStore::vacuum_step`] until no free page is left (or the store
    /// cannot shrink), yielding between steps.
    pub async fn vacuum(&self) -> Result<(), StoreError> {
        let mut last = u64::MAX;
        loop {
            let free = self.vacuum_step(256).await?;
            if free == 0 || free >= last {
                return Ok(());
            }
            last = free;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Size of the store and its number of jobs.
    pub async fn size(&self) -> Result<StoreSize, StoreError> {
        self.with(move |c| {
            let get = |sql: &str| {
                c.query_row(sql, [], |r| r.get::<_, i64>(0))
                    .map(|n| n.max(0) as u64)
                    .map_err(q("read store size"))
            };
            let page = get("PRAGMA page_size")?;
            Ok(StoreSize {
                bytes: get("PRAGMA page_count")? * page,
                free_bytes: get("PRAGMA freelist_count")? * page,
                jobs: get("SELECT COUNT(*) FROM jobs")?,
                incremental_vacuum: get("PRAGMA auto_vacuum")? == 2,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobSpec, JobState, StatusReport};

    async fn finished_job(s: &SqliteStore, id: &str, log: usize) {
        s.insert_job(id.into(), JobSpec::default()).await.unwrap();
        let j = s
            .lease_job(id.into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        let mut off = 0;
        while off < log {
            let n = (log - off).min(64 * 1024);
            s.append_log(
                id.into(),
                j.epoch,
                "a".into(),
                off as u64,
                vec![b'x'; n].into(),
            )
            .await
            .unwrap();
            off += n;
        }
        s.report(
            id.into(),
            j.epoch,
            "a".into(),
            StatusReport {
                state: JobState::Succeeded,
                exit_code: Some(0),
                message: String::new(),
                log_total: log as u64,
                oom_killed: false,
            },
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn vacuum_gives_the_space_of_pruned_jobs_back_and_the_file_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = SqliteStore::open(&path).unwrap();
        for i in 0..4 {
            finished_job(&s, &format!("old{i}"), 1 << 20).await;
        }
        finished_job(&s, "new", 10).await;
        let before = s.size().await.unwrap();
        assert!(before.incremental_vacuum);
        assert!(before.bytes > 4 << 20, "{before:?}");

        let rule = PruneRule {
            older_than_ms: None,
            keep: Some(1),
        };
        let pruned = s.prune(rule).await.unwrap();
        assert_eq!((pruned.jobs, pruned.log_bytes), (4, 4 << 20));
        // Pruned pages are free until a vacuum gives them back.
        let pruned_only = s.size().await.unwrap();
        assert!(pruned_only.free_bytes > 0, "{pruned_only:?}");

        s.vacuum().await.unwrap();
        let after = s.size().await.unwrap();
        assert_eq!(after.jobs, 1);
        assert_eq!(after.free_bytes, 0);
        assert!(after.bytes < 1 << 20, "{after:?}");
        drop(s);
        // The file itself shrank (after the WAL is checkpointed on close).
        let on_disk = std::fs::metadata(&path).unwrap().len();
        assert!(on_disk < 1 << 20, "{on_disk} bytes on disk");
    }
}
