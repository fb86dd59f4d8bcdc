//! The identity tables in the control plane's one SQLite database.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Consumed, IdentityRecord, NewEnrollment, TokenRow};
use crate::enroll::EnrollError;
use crate::model::now_ms;
use crate::store::{Store, StoreError};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS enrollments (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    pool TEXT NOT NULL,
    labels TEXT NOT NULL,
    agent_name TEXT NOT NULL DEFAULT '',
    uses_left INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_identities (
    name TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    labels TEXT NOT NULL,
    enrollment_id TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL,
    cert_not_after_ms INTEGER NOT NULL DEFAULT 0,
    revoked_ms INTEGER NOT NULL DEFAULT 0
);
"#;

fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

pub(super) async fn init(store: &Store) -> Result<Vec<IdentityRecord>, StoreError> {
    store
        .with(|c| {
            c.execute_batch(SCHEMA)
                .map_err(q("create identity tables"))?;
            list_in(c)
        })
        .await
}

pub(super) async fn list(store: &Store) -> Result<Vec<IdentityRecord>, StoreError> {
    store.with(|c| list_in(c)).await
}

pub(super) async fn get(store: &Store, name: String) -> Result<Option<IdentityRecord>, StoreError> {
    store.with(move |c| get_in(c, &name)).await
}

pub(super) async fn insert_enrollment(store: &Store, e: NewEnrollment) -> Result<(), StoreError> {
    store
        .with(move |c| {
            c.execute(
                "INSERT INTO enrollments (id, token_hash, pool, labels, agent_name, uses_left, expires_ms, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    e.id,
                    e.token_hash,
                    e.pool,
                    super::labels_json(&e.labels),
                    e.agent_name,
                    e.uses,
                    e.expires_ms,
                    now_ms()
                ],
            )
            .map_err(q("insert enrollment"))?;
            Ok(())
        })
        .await
}

/// One enrolment in one transaction of the store's one writer.
pub(super) async fn enroll<T, F>(
    store: &Store,
    token_hash: String,
    name: String,
    sign: F,
) -> Result<Result<(Consumed, T), EnrollError>, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Consumed) -> Result<(T, i64), EnrollError> + Send + 'static,
{
    store
        .with(move |c| {
            let tx = c.transaction().map_err(q("begin enroll"))?;
            let row = tx
                .query_row(
                    "SELECT id, pool, labels, agent_name, uses_left, expires_ms FROM enrollments WHERE token_hash = ?1",
                    params![token_hash],
                    |r| {
                        Ok(TokenRow {
                            id: r.get(0)?,
                            pool: r.get(1)?,
                            labels: r.get(2)?,
                            pinned: r.get(3)?,
                            uses_left: r.get(4)?,
                            expires_ms: r.get(5)?,
                        })
                    },
                )
                .optional()
                .map_err(q("find enrollment"))?;
            let existing = get_in(&tx, &name)?;
            let admitted = match super::admit(row, existing, name.clone(), now_ms(), sign) {
                Ok(a) => a,
                Err(e) => return Ok(Err(e)),
            };
            let id = &admitted.consumed.enrollment_id;
            tx.execute(
                "UPDATE enrollments SET uses_left = uses_left - 1 WHERE id = ?1",
                params![id],
            )
            .map_err(q("consume enrollment"))?;
            tx.execute(
                "INSERT INTO agent_identities (name, pool, labels, enrollment_id, enrolled_ms, cert_not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET pool = ?2, labels = ?3, enrollment_id = ?4,
                     enrolled_ms = ?5, cert_not_after_ms = ?6",
                params![
                    name,
                    admitted.consumed.pool,
                    admitted.labels,
                    id,
                    now_ms(),
                    admitted.not_after_ms
                ],
            )
            .map_err(q("record identity"))?;
            tx.commit().map_err(q("commit enroll"))?;
            Ok(Ok((admitted.consumed, admitted.out)))
        })
        .await
}

pub(super) async fn renewed(
    store: &Store,
    name: String,
    not_after_ms: i64,
) -> Result<(), StoreError> {
    store
        .with(move |c| {
            c.execute(
                "UPDATE agent_identities SET cert_not_after_ms = ?2 WHERE name = ?1",
                params![name, not_after_ms],
            )
            .map_err(q("record renewal"))?;
            Ok(())
        })
        .await
}

pub(super) async fn revoke(
    store: &Store,
    name: String,
    when_ms: i64,
) -> Result<IdentityRecord, StoreError> {
    store
        .with(move |c| {
            c.execute(
                "INSERT INTO agent_identities (name, pool, labels, enrollment_id, enrolled_ms, revoked_ms)
                 VALUES (?1, '', '{}', '', 0, ?2)
                 ON CONFLICT(name) DO UPDATE SET revoked_ms = CASE WHEN revoked_ms = 0 THEN ?2 ELSE revoked_ms END",
                params![name, when_ms],
            )
            .map_err(q("revoke agent"))?;
            get_in(c, &name)?.ok_or_else(|| StoreError::NotFound(name.clone()))
        })
        .await
}

pub(super) async fn known_agent(store: &Store, name: String) -> Result<bool, StoreError> {
    store
        .with(move |c| {
            let n: i64 = c
                .query_row(
                    "SELECT (SELECT COUNT(*) FROM agents WHERE id = ?1) + (SELECT COUNT(*) FROM agent_identities WHERE name = ?1)",
                    params![name],
                    |r| r.get(0),
                )
                .map_err(q("find agent"))?;
            Ok(n > 0)
        })
        .await
}

fn get_in(c: &Connection, name: &str) -> Result<Option<IdentityRecord>, StoreError> {
    c.query_row(
        "SELECT name, pool, labels, enrollment_id, cert_not_after_ms, revoked_ms FROM agent_identities WHERE name = ?1",
        params![name],
        row,
    )
    .optional()
    .map_err(q("get identity"))
}

fn list_in(c: &Connection) -> Result<Vec<IdentityRecord>, StoreError> {
    let mut stmt = c
        .prepare(
            "SELECT name, pool, labels, enrollment_id, cert_not_after_ms, revoked_ms FROM agent_identities ORDER BY name",
        )
        .map_err(q("prepare list identities"))?;
    let rows = stmt.query_map([], row).map_err(q("list identities"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(q("read identity row"))
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<IdentityRecord> {
    let labels: String = r.get(2)?;
    Ok(IdentityRecord {
        name: r.get(0)?,
        pool: r.get(1)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        enrollment_id: r.get(3)?,
        cert_not_after_ms: r.get(4)?,
        revoked_ms: r.get(5)?,
    })
}
