//! Retention: deleting final jobs with their logs and artifact records,
//! and the database's size.
//!
//! **Invariant:** only final jobs are ever deleted (checked on the job's
//! locked row in the deleting transaction), and every step is a short
//! transaction of its own (a few log chunks), so leases, heartbeats and
//! log appends never wait long behind retention. Freed space is reclaimed
//! by PostgreSQL's autovacuum, not here.

use super::leases::pgc;
use super::{PgStore, pg};
use crate::model::now_ms;
use crate::store::{PruneRule, Pruned, StoreError, StoreSize};

/// Final states, as stored.
const FINAL: &str = "state NOT IN ('queued','leased','running')";

/// Log chunks deleted per transaction (a chunk is at most 64 KiB).
const LOG_ROWS_PER_STEP: i64 = 32;

impl PgStore {
    /// Final jobs selected by `rule`, oldest first, at most `limit`.
    pub async fn prunable(&self, rule: PruneRule, limit: u32) -> Result<Vec<String>, StoreError> {
        if rule.older_than_ms.is_none() && rule.keep.is_none() {
            return Ok(Vec::new());
        }
        self.timed(async {
            let before = rule
                .older_than_ms
                .map(|age| now_ms().saturating_sub(age.min(i64::MAX as u64) as i64));
            let keep = rule.keep.map(|k| k.min(i64::MAX as u64) as i64);
            let sql = format!(
                "SELECT id FROM jobs WHERE {FINAL} AND (
                     ($1::bigint IS NOT NULL AND finished_ms < $1)
                     OR ($2::bigint IS NOT NULL AND seq NOT IN
                         (SELECT seq FROM jobs WHERE {FINAL} ORDER BY seq DESC LIMIT $2)))
                 ORDER BY seq LIMIT $3"
            );
            let o = self.client().await?;
            let rows = pgc(&o)
                .query(sql.as_str(), &[&before, &keep, &i64::from(limit)])
                .await
                .map_err(pg("select prunable"))?;
            rows.iter()
                .map(|r| r.try_get::<_, String>(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(pg("read prunable"))
        })
        .await
    }

    /// Deletes one final job: its log a few chunks per transaction, then its
    /// artifact records and its row. Returns the log bytes deleted, or
    /// `None` if the job is not final (or gone).
    pub async fn delete_final_job(&self, id: String) -> Result<Option<u64>, StoreError> {
        let mut bytes = 0u64;
        loop {
            match self.timed(self.prune_step(&id)).await? {
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

    /// One transaction of [`PgStore::delete_final_job`]: (bytes, done).
    async fn prune_step(&self, id: &str) -> Result<Option<(u64, bool)>, StoreError> {
        let mut o = self.client().await?;
        let client: &mut tokio_postgres::Client = &mut o;
        let tx = client.transaction().await.map_err(pg("begin prune"))?;
        let is_final: Option<bool> = tx
            .query_opt(
                format!("SELECT {FINAL} FROM jobs WHERE id = $1 FOR UPDATE").as_str(),
                &[&id],
            )
            .await
            .map_err(pg("check job before prune"))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(pg("check job before prune"))?;
        if is_final != Some(true) {
            return Ok(None);
        }
        let rows = tx
            .query(
                "DELETE FROM logs WHERE (job_id, epoch, off) IN
                     (SELECT job_id, epoch, off FROM logs WHERE job_id = $1 LIMIT $2)
                 RETURNING octet_length(data)",
                &[&id, &LOG_ROWS_PER_STEP],
            )
            .await
            .map_err(pg("prune log chunks"))?;
        let mut deleted = 0u64;
        for r in &rows {
            let n: i32 = r.try_get(0).map_err(pg("read pruned chunk"))?;
            deleted += n.max(0) as u64;
        }
        let done = (rows.len() as i64) < LOG_ROWS_PER_STEP;
        if done {
            tx.execute("DELETE FROM artifacts WHERE job_id = $1", &[&id])
                .await
                .map_err(pg("prune artifacts"))?;
            tx.execute("DELETE FROM jobs WHERE id = $1", &[&id])
                .await
                .map_err(pg("prune job"))?;
        }
        tx.commit().await.map_err(pg("commit prune"))?;
        Ok(Some((deleted, done)))
    }

    /// Deletes every final job `rule` selects (see [`PgStore::delete_final_job`]).
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

    /// Nothing to do: PostgreSQL's autovacuum reclaims the space of deleted
    /// rows. Returns 0 (no free pages waiting for this store).
    pub async fn vacuum_step(&self, pages: u32) -> Result<u64, StoreError> {
        let _ = pages;
        Ok(0)
    }

    /// Nothing to do: PostgreSQL's autovacuum reclaims the space of deleted
    /// rows.
    pub async fn vacuum(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Size of the database (`pg_database_size`) and its number of jobs.
    /// `free_bytes` is 0 (PostgreSQL does not report its free space cheaply)
    /// and `incremental_vacuum` true: the database reclaims the space of
    /// deleted rows itself (autovacuum), nothing waits for this store to
    /// give it back.
    pub async fn size(&self) -> Result<StoreSize, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let row = pgc(&o)
                .query_one(
                    "SELECT pg_database_size(current_database()), (SELECT COUNT(*) FROM jobs)",
                    &[],
                )
                .await
                .map_err(pg("read store size"))?;
            let bytes: i64 = row.try_get(0).map_err(pg("read store size"))?;
            let jobs: i64 = row.try_get(1).map_err(pg("read store size"))?;
            Ok(StoreSize {
                bytes: bytes.max(0) as u64,
                free_bytes: 0,
                jobs: jobs.max(0) as u64,
                incremental_vacuum: true,
            })
        })
        .await
    }
}
