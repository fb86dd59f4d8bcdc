//! Artifacts agents uploaded for jobs.
//!
//! **Invariant:** an artifact report is recorded only if `(job_id, epoch,
//! agent)` is the job's current lease, checked in the same transaction as
//! the write; a stale epoch is refused ([`StoreError::Stale`]). Reports are
//! idempotent per `(job_id, epoch, path)`.

use rusqlite::params;

use super::{SqliteStore, StoreError, current, q};
use crate::model::{Artifact, now_ms};

impl SqliteStore {
    /// Records an artifact reported by `agent` for its current lease.
    pub async fn record_artifact(
        &self,
        agent: String,
        artifact: Artifact,
    ) -> Result<Artifact, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(q("begin record artifact"))?;
            current(&tx, &artifact.job_id, artifact.epoch, &agent)?;
            let uploaded_ms = now_ms();
            tx.execute(
                "INSERT INTO artifacts (job_id, epoch, path, bucket, key, size, sha256, etag, uploaded_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(job_id, epoch, path) DO UPDATE SET bucket = ?4, key = ?5, size = ?6,
                     sha256 = ?7, etag = ?8, uploaded_ms = ?9",
                params![
                    artifact.job_id,
                    artifact.epoch as i64,
                    artifact.path,
                    artifact.bucket,
                    artifact.key,
                    artifact.size as i64,
                    artifact.sha256,
                    artifact.etag,
                    uploaded_ms
                ],
            )
            .map_err(q("record artifact"))?;
            tx.commit().map_err(q("commit artifact"))?;
            Ok(Artifact {
                uploaded_ms,
                ..artifact
            })
        })
        .await
    }

    /// A job's artifacts, oldest lease first, then by path.
    pub async fn list_artifacts(&self, job_id: String) -> Result<Vec<Artifact>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT job_id, epoch, path, bucket, key, size, sha256, etag, uploaded_ms
                     FROM artifacts WHERE job_id = ?1 ORDER BY epoch, path",
                )
                .map_err(q("prepare list artifacts"))?;
            let rows = stmt
                .query_map(params![job_id], |r| {
                    Ok(Artifact {
                        job_id: r.get(0)?,
                        epoch: r.get::<_, i64>(1)? as u64,
                        path: r.get(2)?,
                        bucket: r.get(3)?,
                        key: r.get(4)?,
                        size: r.get::<_, i64>(5)? as u64,
                        sha256: r.get(6)?,
                        etag: r.get(7)?,
                        uploaded_ms: r.get(8)?,
                    })
                })
                .map_err(q("list artifacts"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(q("read artifact row"))
        })
        .await
    }
}
