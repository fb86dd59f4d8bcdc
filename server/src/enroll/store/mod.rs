//! The identity tables: `enrollments` (a bootstrap token's hash, its pool,
//! labels, uses and expiry) and `agent_identities` (each enrolled or
//! revoked agent name: its pool, the labels it may claim, its last
//! certificate's expiry, when it was revoked), in the embedded SQLite
//! database (`sqlite`) or in PostgreSQL (`postgres`, shared by several
//! replicas). What an enrolment checks is written once ([`admit`]); the
//! backends differ only in their SQL and in how they serialize.
//!
//! **Invariant:** a bootstrap token is stored only as its SHA-256; it is
//! consumed in the same transaction that records the identity and signs the
//! certificate, so a refused or failed enrolment consumes nothing. On
//! PostgreSQL that transaction first takes a transaction-scoped advisory
//! lock on the agent's name, then locks the token's row (`FOR UPDATE`):
//! two replicas enrolling the same name, or using the same token, run one
//! after the other, so a one-time token is used once across replicas.

use std::collections::BTreeMap;

use super::{EnrollError, IdentityRecord};
use crate::store::{Store, StoreError};

/// The same tables in PostgreSQL (migration 3 of `store::postgres::schema`).
mod postgres;
/// The tables in the embedded SQLite database.
mod sqlite;

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

/// An enrolment as read for its token, inside the enrolling transaction.
struct TokenRow {
    id: String,
    pool: String,
    /// JSON, as stored.
    labels: String,
    /// Empty: any name.
    pinned: String,
    uses_left: i64,
    expires_ms: i64,
}

/// What an admitted enrolment writes: the certificate's expiry, and the
/// labels as stored (JSON).
struct Admitted<T> {
    consumed: Consumed,
    out: T,
    not_after_ms: i64,
    labels: String,
}

/// Decides, inside the enrolling transaction, whether the token's row
/// `row` enrols `name` given what is recorded under that name, and if so
/// runs `sign`. Any refusal leaves the transaction to be rolled back.
fn admit<T, F>(
    row: Option<TokenRow>,
    existing: Option<IdentityRecord>,
    name: String,
    now: i64,
    sign: F,
) -> Result<Admitted<T>, EnrollError>
where
    F: FnOnce(&Consumed) -> Result<(T, i64), EnrollError>,
{
    let row = row.ok_or(EnrollError::UnknownToken)?;
    if row.uses_left <= 0 {
        return Err(EnrollError::TokenUsed);
    }
    if row.expires_ms <= now {
        return Err(EnrollError::TokenExpired {
            expires: super::show_time(row.expires_ms),
        });
    }
    if !row.pinned.is_empty() && row.pinned != name {
        return Err(EnrollError::NameNotAllowed {
            name,
            allowed: row.pinned,
        });
    }
    if let Some(existing) = existing {
        if existing.revoked_ms > 0 {
            return Err(EnrollError::Revoked { name });
        }
        if existing.pool != row.pool {
            return Err(EnrollError::NameTaken {
                name,
                pool: existing.pool,
            });
        }
    }
    let consumed = Consumed {
        enrollment_id: row.id,
        pool: row.pool,
        labels: serde_json::from_str(&row.labels).unwrap_or_default(),
    };
    let (out, not_after_ms) = sign(&consumed)?;
    Ok(Admitted {
        consumed,
        out,
        not_after_ms,
        labels: row.labels,
    })
}

/// Labels as stored (JSON).
fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

/// Creates the tables if needed (the embedded store; PostgreSQL's come
/// with its migrations) and reads every identity.
pub async fn init(store: &Store) -> Result<Vec<IdentityRecord>, StoreError> {
    match store.pg() {
        Some(pool) => postgres::list(pool).await,
        None => sqlite::init(store).await,
    }
}

/// Every identity, by name.
pub async fn list(store: &Store) -> Result<Vec<IdentityRecord>, StoreError> {
    match store.pg() {
        Some(pool) => postgres::list(pool).await,
        None => sqlite::list(store).await,
    }
}

/// The identity recorded under `name`, if any.
pub async fn get(store: &Store, name: String) -> Result<Option<IdentityRecord>, StoreError> {
    match store.pg() {
        Some(pool) => postgres::get(pool, &name).await,
        None => sqlite::get(store, name).await,
    }
}

pub async fn insert_enrollment(store: &Store, e: NewEnrollment) -> Result<(), StoreError> {
    match store.pg() {
        Some(pool) => postgres::insert_enrollment(pool, e).await,
        None => sqlite::insert_enrollment(store, e).await,
    }
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
    match store.pg() {
        Some(pool) => postgres::enroll(pool, token_hash, name, sign).await,
        None => sqlite::enroll(store, token_hash, name, sign).await,
    }
}

/// Records the expiry of a renewed certificate.
pub async fn renewed(store: &Store, name: String, not_after_ms: i64) -> Result<(), StoreError> {
    match store.pg() {
        Some(pool) => postgres::renewed(pool, &name, not_after_ms).await,
        None => sqlite::renewed(store, name, not_after_ms).await,
    }
}

/// Marks `name` revoked (creating its row for an agent whose certificate
/// was issued by hand). Revoking twice keeps the first time. Returns the
/// record.
pub async fn revoke(
    store: &Store,
    name: String,
    when_ms: i64,
) -> Result<IdentityRecord, StoreError> {
    match store.pg() {
        Some(pool) => postgres::revoke(pool, name, when_ms).await,
        None => sqlite::revoke(store, name, when_ms).await,
    }
}

/// Whether the control plane has ever seen agent `name` (connected or enrolled).
pub async fn known_agent(store: &Store, name: String) -> Result<bool, StoreError> {
    match store.pg() {
        Some(pool) => postgres::known_agent(pool, &name).await,
        None => sqlite::known_agent(store, name).await,
    }
}
