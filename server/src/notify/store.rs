//! Deliveries and the global targets, in the control plane's one SQLite
//! database: `notify_deliveries` (one row per event and target, with every
//! attempt) and `notify_global`.

use rusqlite::types::Value;
use rusqlite::{OptionalExtension, params};

use super::{Event, Target};
use crate::model::now_ms;
use crate::store::{Store, StoreError};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS notify_deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    stack TEXT NOT NULL,
    state TEXT NOT NULL,
    next_at_ms INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notify_due ON notify_deliveries(state, next_at_ms);
CREATE INDEX IF NOT EXISTS notify_stack ON notify_deliveries(stack, seq);
CREATE TABLE IF NOT EXISTS notify_global (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    body TEXT NOT NULL
);
"#;

fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

fn corrupt(id: &str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        id: id.to_string(),
        what: e.to_string(),
    }
}

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

#[derive(Clone)]
pub struct NotifyStore {
    store: Store,
}

impl NotifyStore {
    pub async fn open(store: Store) -> Result<NotifyStore, StoreError> {
        store
            .with(|c| c.execute_batch(SCHEMA).map_err(q("create notify tables")))
            .await?;
        Ok(NotifyStore { store })
    }

    pub async fn insert(&self, d: Delivery) -> Result<(), StoreError> {
        self.store
            .with(move |c| {
                let body = serde_json::to_string(&d).map_err(|e| corrupt(&d.id, e))?;
                c.execute(
                    "INSERT INTO notify_deliveries (id, stack, state, next_at_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![d.id, d.event.stack, d.state, d.next_at_ms, body],
                )
                .map_err(q("insert delivery"))?;
                Ok(())
            })
            .await
    }

    pub async fn save(&self, d: Delivery) -> Result<(), StoreError> {
        self.store
            .with(move |c| {
                let body = serde_json::to_string(&d).map_err(|e| corrupt(&d.id, e))?;
                c.execute(
                    "UPDATE notify_deliveries SET state = ?2, next_at_ms = ?3, body = ?4 WHERE id = ?1",
                    params![d.id, d.state, d.next_at_ms, body],
                )
                .map_err(q("save delivery"))?;
                Ok(())
            })
            .await
    }

    /// Pending deliveries due at `now`, oldest first.
    pub async fn due(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        self.rows(
            "SELECT id, body FROM notify_deliveries WHERE state = 'pending' AND next_at_ms <= ?1 ORDER BY seq LIMIT ?2",
            vec![Value::Integer(now), Value::Integer(limit.into())],
        )
        .await
    }

    /// Newest first; `stack` filters.
    pub async fn list(
        &self,
        stack: Option<String>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.rows(
            "SELECT id, body FROM notify_deliveries WHERE (?1 IS NULL OR stack = ?1) ORDER BY seq DESC LIMIT ?2",
            vec![
                stack.map(Value::Text).unwrap_or(Value::Null),
                Value::Integer(limit.into()),
            ],
        )
        .await
    }

    async fn rows(&self, sql: &'static str, args: Vec<Value>) -> Result<Vec<Delivery>, StoreError> {
        self.store
            .with(move |c| {
                let mut stmt = c.prepare_cached(sql).map_err(q("prepare deliveries"))?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(args), |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })
                    .map_err(q("list deliveries"))?;
                let mut out = Vec::new();
                for row in rows {
                    let (id, body) = row.map_err(q("read delivery row"))?;
                    out.push(serde_json::from_str(&body).map_err(|e| corrupt(&id, e))?);
                }
                Ok(out)
            })
            .await
    }

    pub async fn global(&self) -> Result<Vec<Target>, StoreError> {
        self.store
            .with(|c| {
                let body: Option<String> = c
                    .query_row("SELECT body FROM notify_global WHERE id = 1", [], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(q("read global targets"))?;
                body.map(|b| serde_json::from_str(&b).map_err(|e| corrupt("notify_global", e)))
                    .transpose()
                    .map(Option::unwrap_or_default)
            })
            .await
    }

    pub async fn set_global(&self, targets: Vec<Target>) -> Result<(), StoreError> {
        self.store
            .with(move |c| {
                let body =
                    serde_json::to_string(&targets).map_err(|e| corrupt("notify_global", e))?;
                c.execute(
                    "INSERT INTO notify_global (id, body) VALUES (1, ?1) ON CONFLICT(id) DO UPDATE SET body = ?1",
                    params![body],
                )
                .map_err(q("write global targets"))?;
                Ok(())
            })
            .await
    }
}
