//! The identity tables, in the control plane's one SQLite database:
//! `enrollments` (a bootstrap token's hash, its pool, labels, uses and
//! expiry) and `agent_identities` (each enrolled or revoked agent name: its
//! pool, the labels it may claim, its last certificate's expiry, when it
//! was revoked).
//!
//! **Invariant:** a bootstrap token is stored only as its SHA-256; it is
//! consumed in the same transaction that records the identity and signs the
//! certificate, so a refused or failed enrolment consumes nothing.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::{EnrollError, IdentityRecord};
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

/// A new enrolment, as stored.
#[derive(Debug, Clone)]
pub struct NewEnrollment {
    pub id: String,
    pub token_hash: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub agent_name: String,
    pub uses: u32,
    pub expires_ms: i64,
}

/// The enrolment a token named, once consumed.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub enrollment_id: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
}

pub async fn init(store: &Store) -> Result<Vec<IdentityRecord>, StoreError> {
    store
        .with(|c| {
            c.execute_batch(SCHEMA)
                .map_err(q("create identity tables"))?;
            list(c)
        })
        .await
}

pub async fn insert_enrollment(store: &Store, e: NewEnrollment) -> Result<(), StoreError> {
    store
        .with(move |c| {
            let labels = serde_json::to_string(&e.labels).unwrap_or_else(|_| "{}".into());
            c.execute(
                "INSERT INTO enrollments (id, token_hash, pool, labels, agent_name, uses_left, expires_ms, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    e.id,
                    e.token_hash,
                    e.pool,
                    labels,
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

/// Consumes one use of the token with `token_hash` for agent `name`, then
/// runs `sign` (which makes the certificate, returning its expiry in ms)
/// and records the identity, all in one transaction: any refusal or
/// failure leaves the token as it was.
pub async fn enroll<T, F>(
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
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, i64>(5)?,
                        ))
                    },
                )
                .optional()
                .map_err(q("find enrollment"))?;
            let Some((id, pool, labels, pinned, uses_left, expires_ms)) = row else {
                return Ok(Err(EnrollError::UnknownToken));
            };
            if uses_left <= 0 {
                return Ok(Err(EnrollError::TokenUsed));
            }
            if expires_ms <= now_ms() {
                return Ok(Err(EnrollError::TokenExpired {
                    expires: super::show_time(expires_ms),
                }));
            }
            if !pinned.is_empty() && pinned != name {
                return Ok(Err(EnrollError::NameNotAllowed {
                    name,
                    allowed: pinned,
                }));
            }
            if let Some(existing) = get(&tx, &name)? {
                if existing.revoked_ms > 0 {
                    return Ok(Err(EnrollError::Revoked { name }));
                }
                if existing.pool != pool {
                    return Ok(Err(EnrollError::NameTaken {
                        name,
                        pool: existing.pool,
                    }));
                }
            }
            let consumed = Consumed {
                enrollment_id: id.clone(),
                pool: pool.clone(),
                labels: serde_json::from_str(&labels).unwrap_or_default(),
            };
            let (out, not_after_ms) = match sign(&consumed) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
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
                params![name, pool, labels, id, now_ms(), not_after_ms],
            )
            .map_err(q("record identity"))?;
            tx.commit().map_err(q("commit enroll"))?;
            Ok(Ok((consumed, out)))
        })
        .await
}

/// Records the expiry of a renewed certificate.
pub async fn renewed(store: &Store, name: String, not_after_ms: i64) -> Result<(), StoreError> {
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

/// Marks `name` revoked (creating its row for an agent whose certificate
/// was issued by hand). Returns the record.
pub async fn revoke(
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
            get(c, &name)?.ok_or_else(|| StoreError::NotFound(name.clone()))
        })
        .await
}

/// Whether the control plane has ever seen agent `name` (connected or enrolled).
pub async fn known_agent(store: &Store, name: String) -> Result<bool, StoreError> {
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

fn get(c: &Connection, name: &str) -> Result<Option<IdentityRecord>, StoreError> {
    c.query_row(
        "SELECT name, pool, labels, enrollment_id, cert_not_after_ms, revoked_ms FROM agent_identities WHERE name = ?1",
        params![name],
        row,
    )
    .optional()
    .map_err(q("get identity"))
}

fn list(c: &Connection) -> Result<Vec<IdentityRecord>, StoreError> {
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
