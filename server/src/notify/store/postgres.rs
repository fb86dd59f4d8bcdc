//! Deliveries and the global targets in PostgreSQL, shared by several
//! replicas; due deliveries are claimed (`SKIP LOCKED`).

use deadpool_postgres::Pool;

use super::Delivery;
use crate::store::StoreError;
use crate::store::postgres::{pg, pool_err};

async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(pool_err("take a connection"))
}

pub(super) async fn insert(pool: &Pool, d: Delivery, body: String) -> Result<(), StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    c.execute(
        "INSERT INTO notify_deliveries (id, stack, state, next_at_ms, body) VALUES ($1, $2, $3, $4, $5)",
        &[&d.id, &d.event.stack, &d.state, &d.next_at_ms, &body],
    )
    .await
    .map_err(pg("insert delivery"))?;
    Ok(())
}

pub(super) async fn save(pool: &Pool, d: Delivery, body: String) -> Result<(), StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    c.execute(
        "UPDATE notify_deliveries SET state = $2, next_at_ms = $3, body = $4 WHERE id = $1",
        &[&d.id, &d.state, &d.next_at_ms, &body],
    )
    .await
    .map_err(pg("save delivery"))?;
    Ok(())
}

/// Claims the pending deliveries due at `now` (oldest first, at most
/// `limit`) until `until`, in one statement; rows another replica is
/// claiming are skipped.
pub(super) async fn claim_due(
    pool: &Pool,
    now: i64,
    limit: u32,
    until: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    let rows = c
        .query(
            "WITH due AS (
                 SELECT seq FROM notify_deliveries
                 WHERE state = 'pending' AND next_at_ms <= $1
                 ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED
             )
             UPDATE notify_deliveries d SET next_at_ms = $3 FROM due WHERE d.seq = due.seq
             RETURNING d.seq, d.id, d.body",
            &[&now, &i64::from(limit), &until],
        )
        .await
        .map_err(pg("claim due deliveries"))?;
    let mut out = rows
        .iter()
        .map(|r| Ok((r.try_get::<_, i64>(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<Vec<(i64, String, String)>, tokio_postgres::Error>>()
        .map_err(pg("read delivery row"))?;
    out.sort_by_key(|(seq, _, _)| *seq);
    Ok(out.into_iter().map(|(_, id, body)| (id, body)).collect())
}

pub(super) async fn list(
    pool: &Pool,
    stack: Option<String>,
    limit: u32,
) -> Result<Vec<(String, String)>, StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    let rows = c
        .query(
            "SELECT id, body FROM notify_deliveries WHERE ($1::TEXT IS NULL OR stack = $1)
             ORDER BY seq DESC LIMIT $2",
            &[&stack, &i64::from(limit)],
        )
        .await
        .map_err(pg("list deliveries"))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(pg("read delivery row"))
}

pub(super) async fn global(pool: &Pool) -> Result<Option<String>, StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    let row = c
        .query_opt("SELECT body FROM notify_global WHERE id = 1", &[])
        .await
        .map_err(pg("read global targets"))?;
    row.map(|r| r.try_get(0))
        .transpose()
        .map_err(pg("read global targets"))
}

pub(super) async fn set_global(pool: &Pool, body: String) -> Result<(), StoreError> {
    let o = client(pool).await?;
    let c: &tokio_postgres::Client = &o;
    c.execute(
        "INSERT INTO notify_global (id, body) VALUES (1, $1)
         ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
        &[&body],
    )
    .await
    .map_err(pg("write global targets"))?;
    Ok(())
}
