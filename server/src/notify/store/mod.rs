//! Deliveries and the global targets: `notify_deliveries` (one row per
//! event and target, with every attempt, in its JSON body) and
//! `notify_global`, in the embedded SQLite database (`sqlite`) or in
//! PostgreSQL (`postgres`, shared by several replicas). The rows' meaning
//! and their encoding are written once, here; the backends differ only in
//! their SQL.
//!
//! **Due deliveries on several replicas.** On PostgreSQL, [`NotifyStore::due`]
//! claims what it returns: in one statement it selects due rows `FOR
//! UPDATE SKIP LOCKED` and moves their next attempt [`CLAIM`] ahead, so
//! another replica's `due` skips them until the attempt is saved
//! ([`NotifyStore::save`] writes the real next attempt) or the claim
//! lapses (the replica died): an attempt is made by one replica at a time,
//! never twice. The embedded store has one process, whose sender never
//! starts an attempt already in flight: there `due` only reads.

use std::time::Duration;

use super::{Event, Target};
use crate::model::now_ms;
use crate::store::{Store, StoreError};

/// The same tables in PostgreSQL (migration 3 of `store::postgres::schema`).
mod postgres;
/// The tables in the embedded SQLite database.
mod sqlite;

/// How long a claimed delivery is left to its replica: longer than any
/// attempt (its two waits of at most a target's timeout, 60 s each).
pub const CLAIM: Duration = Duration::from_secs(300);

/// One attempt to deliver.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    pub at_ms: i64,
    /// HTTP status; zero when none came back.
    pub status: u16,
    /// Empty on success.
    pub error: String,
    pub duration_ms: u64,
}

/// One event for one target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    pub id: String,
    pub event: Event,
    /// The target as it was when the event happened (secret sealed).
    pub target: Target,
    /// pending, delivered, failed
    pub state: String,
    pub attempts: u32,
    pub next_at_ms: i64,
    pub history: Vec<Attempt>,
    pub created_ms: i64,
}

impl Delivery {
    pub fn new(target: &Target, event: &Event) -> Delivery {
        let now = now_ms();
        Delivery {
            id: uuid::Uuid::now_v7().to_string(),
            event: event.clone(),
            target: target.clone(),
            state: "pending".into(),
            attempts: 0,
            next_at_ms: now,
            history: Vec::new(),
            created_ms: now,
        }
    }
}

fn corrupt(id: &str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        id: id.to_string(),
        what: e.to_string(),
    }
}

/// A delivery's row body.
fn encode(d: &Delivery) -> Result<String, StoreError> {
    serde_json::to_string(d).map_err(|e| corrupt(&d.id, e))
}

/// A delivery from its row.
fn decode(id: &str, body: &str) -> Result<Delivery, StoreError> {
    serde_json::from_str(body).map_err(|e| corrupt(id, e))
}

/// The global targets' row body.
fn encode_global(targets: &[Target]) -> Result<String, StoreError> {
    serde_json::to_string(targets).map_err(|e| corrupt("notify_global", e))
}

/// The global targets from their row, if there is one.
fn decode_global(body: Option<String>) -> Result<Vec<Target>, StoreError> {
    body.map(|b| serde_json::from_str(&b).map_err(|e| corrupt("notify_global", e)))
        .transpose()
        .map(Option::unwrap_or_default)
}

#[derive(Clone)]
pub struct NotifyStore {
    store: Store,
}

impl NotifyStore {
    /// Opens the tables (creating them in the embedded store; PostgreSQL's
    /// come with its migrations).
    pub async fn open(store: Store) -> Result<NotifyStore, StoreError> {
        if store.pg().is_none() {
            sqlite::create(&store).await?;
        }
        Ok(NotifyStore { store })
    }

    pub async fn insert(&self, d: Delivery) -> Result<(), StoreError> {
        let body = encode(&d)?;
        match self.store.pg() {
            Some(pool) => postgres::insert(pool, d, body).await,
            None => sqlite::insert(&self.store, d, body).await,
        }
    }

    /// Records an attempt's outcome: state, next attempt, history.
    pub async fn save(&self, d: Delivery) -> Result<(), StoreError> {
        let body = encode(&d)?;
        match self.store.pg() {
            Some(pool) => postgres::save(pool, d, body).await,
            None => sqlite::save(&self.store, d, body).await,
        }
    }

    /// Pending deliveries due at `now`, oldest first, at most `limit`;
    /// on PostgreSQL claimed for [`CLAIM`] (see the module's note).
    pub async fn due(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        let rows = match self.store.pg() {
            Some(pool) => {
                postgres::claim_due(pool, now, limit, now + CLAIM.as_millis() as i64).await
            }
            None => sqlite::due(&self.store, now, limit).await,
        }?;
        rows.iter().map(|(id, body)| decode(id, body)).collect()
    }

    /// Newest first; `stack` filters.
    pub async fn list(
        &self,
        stack: Option<String>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows = match self.store.pg() {
            Some(pool) => postgres::list(pool, stack, limit).await,
            None => sqlite::list(&self.store, stack, limit).await,
        }?;
        rows.iter().map(|(id, body)| decode(id, body)).collect()
    }

    pub async fn global(&self) -> Result<Vec<Target>, StoreError> {
        let body = match self.store.pg() {
            Some(pool) => postgres::global(pool).await,
            None => sqlite::global(&self.store).await,
        }?;
        decode_global(body)
    }

    pub async fn set_global(&self, targets: Vec<Target>) -> Result<(), StoreError> {
        let body = encode_global(&targets)?;
        match self.store.pg() {
            Some(pool) => postgres::set_global(pool, body).await,
            None => sqlite::set_global(&self.store, body).await,
        }
    }
}

#[cfg(test)]
mod tests;
