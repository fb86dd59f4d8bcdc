//! Artifacts agents uploaded for jobs.
//!
//! **Invariant:** an artifact report is recorded only if `(job_id, epoch,
//! agent)` is the job's current lease, checked on the job's locked row in
//! the same transaction as the write; a stale epoch is refused
//! ([`StoreError::Stale`]). Reports are idempotent per `(job_id, epoch,
//! path)`.

use super::leases::pgc;
use super::schema::{big, current};
use super::{PgStore, pg};
use crate::model::{Artifact, now_ms};
use crate::store::StoreError;

impl PgStore {
    /// Records an artifact reported by `agent` for its current lease.
    pub async fn record_artifact(
        &self,
        agent: String,
        artifact: Artifact,
    ) -> Result<Artifact, StoreError> {
        self.timed(async {
            let mut o = self.client().await?;
            let client: &mut tokio_postgres::Client = &mut o;
            let tx = client
                .transaction()
                .await
                .map_err(pg("begin record artifact"))?;
            current(&tx, &artifact.job_id, artifact.epoch, &agent, true).await?;
            let uploaded_ms = now_ms();
            tx.execute(
                "INSERT INTO artifacts (job_id, epoch, path, bucket, key, size, sha256, etag, uploaded_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (job_id, epoch, path) DO UPDATE SET bucket = $4, key = $5, size = $6,
                     sha256 = $7, etag = $8, uploaded_ms = $9",
                &[
                    &artifact.job_id,
                    &big(artifact.epoch),
                    &artifact.path,
                    &artifact.bucket,
                    &artifact.key,
                    &big(artifact.size),
                    &artifact.sha256,
                    &artifact.etag,
                    &uploaded_ms,
                ],
            )
            .await
            .map_err(pg("record artifact"))?;
            tx.commit().await.map_err(pg("commit artifact"))?;
            Ok(Artifact {
                uploaded_ms,
                ..artifact
            })
        })
        .await
    }

    /// A job's artifacts, oldest lease first, then by path.
    pub async fn list_artifacts(&self, job_id: String) -> Result<Vec<Artifact>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let rows = pgc(&o)
                .query(
                    "SELECT job_id, epoch, path, bucket, key, size, sha256, etag, uploaded_ms
                     FROM artifacts WHERE job_id = $1 ORDER BY epoch, path",
                    &[&job_id],
                )
                .await
                .map_err(pg("list artifacts"))?;
            let read = |r: &tokio_postgres::Row| -> Result<Artifact, tokio_postgres::Error> {
                Ok(Artifact {
                    job_id: r.try_get(0)?,
                    epoch: r.try_get::<_, i64>(1)?.max(0) as u64,
                    path: r.try_get(2)?,
                    bucket: r.try_get(3)?,
                    key: r.try_get(4)?,
                    size: r.try_get::<_, i64>(5)?.max(0) as u64,
                    sha256: r.try_get(6)?,
                    etag: r.try_get(7)?,
                    uploaded_ms: r.try_get(8)?,
                })
            };
            rows.iter()
                .map(read)
                .collect::<Result<Vec<_>, _>>()
                .map_err(pg("read artifact row"))
        })
        .await
    }
}
