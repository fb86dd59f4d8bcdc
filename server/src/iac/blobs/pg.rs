//! Blobs as rows of the PostgreSQL store's `iac_blobs` table (migration 4),
//! one `INSERT … ON CONFLICT DO NOTHING` each: every replica sees a blob
//! once the replica that put it has returned, and two replicas putting the
//! same bytes at once store one row.

use deadpool_postgres::Pool;

use crate::iac::IacError;
use crate::model::now_ms;
use crate::store::postgres::{pg, pool_err};

/// The table's handle; cheap to clone.
#[derive(Clone)]
pub(super) struct PgBlobs {
    pool: Pool,
}

impl PgBlobs {
    pub(super) fn new(pool: Pool) -> PgBlobs {
        PgBlobs { pool }
    }

    /// Inserts `data` as `digest` unless a row of that digest exists.
    pub(super) async fn put(&self, digest: &str, data: Vec<u8>) -> Result<(), IacError> {
        let client = self.pool.get().await.map_err(pool_err("put a blob"))?;
        let size = i64::try_from(data.len()).unwrap_or(i64::MAX);
        client
            .execute(
                "INSERT INTO iac_blobs (digest, data, size, created_ms)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (digest) DO NOTHING",
                &[&digest, &data, &size, &now_ms()],
            )
            .await
            .map_err(pg("put a blob"))?;
        Ok(())
    }

    /// The stored bytes of `digest`, unverified, or `None`.
    pub(super) async fn get(&self, digest: &str) -> Result<Option<Vec<u8>>, IacError> {
        let client = self.pool.get().await.map_err(pool_err("get a blob"))?;
        let row = client
            .query_opt("SELECT data FROM iac_blobs WHERE digest = $1", &[&digest])
            .await
            .map_err(pg("get a blob"))?;
        Ok(row
            .map(|r| r.try_get::<_, Vec<u8>>(0))
            .transpose()
            .map_err(pg("read a blob"))?)
    }
}
