//! Job logs: appended contiguously from offset 0, each byte exactly once,
//! fenced by the current lease on the job's locked row (so two writers,
//! on one replica or two, never interleave); read back from any offset.

use tokio_postgres::{GenericClient, Statement};

use super::leases::pgc;
use super::schema::{JOB_COLS, big, fenced, row_to_job};
use super::{PgStore, pg};
use crate::store::Committed;
use crate::store::StoreError;

/// Log rows read per query.
const READ_ROWS: i64 = 256;

impl PgStore {
    /// Appends a log chunk of the current lease; returns the new contiguous
    /// acknowledged offset once it is committed (with other chunks and
    /// reports: `batch`). Duplicated bytes are dropped, a gap is refused.
    pub async fn append_log(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<u64, StoreError> {
        self.append_log_queued(id, epoch, agent, offset, data)
            .await?
            .await
    }

    /// Queues a log chunk for the next batch (in the order of the calls)
    /// and returns what resolves once its batch is committed.
    pub async fn append_log_queued(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<Committed<u64>, StoreError> {
        self.batch.append(id, epoch, agent, offset, data).await
    }

    /// Reads stored log bytes of attempt `epoch` from `offset`, at most about `max` bytes.
    pub async fn read_log(
        &self,
        id: String,
        epoch: u64,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let c = pgc(&o);
            // The chunk containing `offset` starts at the greatest offset <= it.
            let first = c
                .query_one(
                    "SELECT COALESCE(MAX(off), 0) FROM logs
                     WHERE job_id = $1 AND epoch = $2 AND off <= $3",
                    &[&id, &big(epoch), &big(offset)],
                )
                .await
                .map_err(pg("find log chunk"))?
                .try_get::<_, i64>(0)
                .map_err(pg("find log chunk"))?;
            let mut from = first;
            let mut out = Vec::new();
            loop {
                let rows = c
                    .query(
                        "SELECT off, data FROM logs WHERE job_id = $1 AND epoch = $2 AND off >= $3
                         ORDER BY off LIMIT $4",
                        &[&id, &big(epoch), &from, &READ_ROWS],
                    )
                    .await
                    .map_err(pg("read log"))?;
                let last_page = (rows.len() as i64) < READ_ROWS;
                for row in &rows {
                    let start: i64 = row.try_get(0).map_err(pg("read log offset"))?;
                    let data: &[u8] = row.try_get(1).map_err(pg("read log data"))?;
                    let start = start.max(0) as u64;
                    let end = start + data.len() as u64;
                    from = i64::try_from(end).unwrap_or(i64::MAX);
                    if end <= offset {
                        continue;
                    }
                    let skip = offset.saturating_sub(start) as usize;
                    out.extend_from_slice(&data[skip..]);
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
                if last_page {
                    return Ok(out);
                }
            }
        })
        .await
    }
}

/// The statements of a log append, prepared once per connection (a chunk
/// costs three statements, each one round trip).
pub(super) struct AppendStmts {
    lock: Statement,
    insert: Statement,
    advance: Statement,
}

impl AppendStmts {
    pub(super) async fn prepare(o: &deadpool_postgres::Object) -> Result<Self, StoreError> {
        let lock = format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1 FOR UPDATE");
        Ok(AppendStmts {
            lock: o
                .prepare_cached(&lock)
                .await
                .map_err(pg("prepare lock job"))?,
            insert: o
                .prepare_cached(
                    "INSERT INTO logs (job_id, epoch, off, data) VALUES ($1, $2, $3, $4)",
                )
                .await
                .map_err(pg("prepare insert log chunk"))?,
            advance: o
                .prepare_cached("UPDATE jobs SET log_acked = $2 WHERE id = $1")
                .await
                .map_err(pg("prepare advance log offset"))?,
        })
    }
}

/// Appends a chunk inside the caller's transaction, on the job's locked
/// row; returns the new acknowledged offset.
pub(super) async fn append_in<C: GenericClient + Sync>(
    c: &C,
    stmts: &AppendStmts,
    id: &str,
    epoch: u64,
    agent: &str,
    offset: u64,
    data: &[u8],
) -> Result<u64, StoreError> {
    let row = c
        .query_opt(&stmts.lock, &[&id])
        .await
        .map_err(pg("lock job"))?;
    let job = fenced(row.as_ref().map(row_to_job).transpose()?, id, epoch, agent)?;
    let acked = job.log_acked;
    let end = offset.saturating_add(data.len() as u64);
    if offset > acked {
        return Err(StoreError::Gap {
            job_id: id.to_string(),
            offset,
            acked,
        });
    }
    if end <= acked {
        return Ok(acked);
    }
    let fresh = &data[(acked - offset) as usize..];
    c.execute(&stmts.insert, &[&id, &big(epoch), &big(acked), &fresh])
        .await
        .map_err(pg("insert log chunk"))?;
    c.execute(&stmts.advance, &[&id, &big(end)])
        .await
        .map_err(pg("advance log offset"))?;
    Ok(end)
}
