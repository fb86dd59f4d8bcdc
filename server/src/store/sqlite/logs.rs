//! Job logs: appended contiguously from offset 0, each byte exactly once,
//! fenced by the current lease; read back from any offset.

use rusqlite::{Connection, params};

use super::schema::current;
use super::{SqliteStore, StoreError, q};

impl SqliteStore {
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
    ) -> Result<crate::store::Committed<u64>, StoreError> {
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
        self.with(move |c| {
            // The chunk containing `offset` starts at the greatest offset <= it.
            let mut stmt = c
                .prepare_cached(
                    "SELECT offset, data FROM logs WHERE job_id = ?1 AND epoch = ?3 AND offset >= COALESCE(
                        (SELECT MAX(offset) FROM logs WHERE job_id = ?1 AND epoch = ?3 AND offset <= ?2), 0)
                     ORDER BY offset",
                )
                .map_err(q("prepare read log"))?;
            let mut rows = stmt
                .query(params![id, offset as i64, epoch as i64])
                .map_err(q("read log"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(q("read log row"))? {
                let start: i64 = row.get(0).map_err(q("read log offset"))?;
                let data: Vec<u8> = row.get(1).map_err(q("read log data"))?;
                let start = start as u64;
                let end = start + data.len() as u64;
                if end <= offset {
                    continue;
                }
                let from = offset.saturating_sub(start) as usize;
                out.extend_from_slice(&data[from..]);
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Appends a chunk inside the caller's transaction; returns the new
/// acknowledged offset.
pub(super) fn append_in(
    c: &Connection,
    id: &str,
    epoch: u64,
    agent: &str,
    offset: u64,
    data: &[u8],
) -> Result<u64, StoreError> {
    let job = current(c, id, epoch, agent)?;
    let acked = job.log_acked;
    let end = offset + data.len() as u64;
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
    let skip = (acked - offset) as usize;
    let fresh = &data[skip..];
    c.execute(
        "INSERT INTO logs (job_id, epoch, offset, data) VALUES (?1, ?2, ?3, ?4)",
        params![id, epoch as i64, acked as i64, fresh],
    )
    .map_err(q("insert log chunk"))?;
    c.execute(
        "UPDATE jobs SET log_acked = ?2 WHERE id = ?1",
        params![id, end as i64],
    )
    .map_err(q("advance log offset"))?;
    Ok(end)
}
