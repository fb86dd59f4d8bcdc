//! Deliveries and the global targets in the control plane's one SQLite
//! database.

use rusqlite::types::Value;
use rusqlite::{OptionalExtension, params};

use super::Delivery;
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

pub(super) async fn create(store: &Store) -> Result<(), StoreError> {
    store
        .with(|c| c.execute_batch(SCHEMA).map_err(q("create notify tables")))
        .await
}

pub(super) async fn insert(store: &Store, d: Delivery, body: String) -> Result<(), StoreError> {
    store
        .with(move |c| {
            c.execute(
                "INSERT INTO notify_deliveries (id, stack, state, next_at_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![d.id, d.event.stack, d.state, d.next_at_ms, body],
            )
            .map_err(q("insert delivery"))?;
            Ok(())
        })
        .await
}

pub(super) async fn save(store: &Store, d: Delivery, body: String) -> Result<(), StoreError> {
    store
        .with(move |c| {
            c.execute(
                "UPDATE notify_deliveries SET state = ?2, next_at_ms = ?3, body = ?4 WHERE id = ?1",
                params![d.id, d.state, d.next_at_ms, body],
            )
            .map_err(q("save delivery"))?;
            Ok(())
        })
        .await
}

pub(super) async fn due(
    store: &Store,
    now: i64,
    limit: u32,
) -> Result<Vec<(String, String)>, StoreError> {
    rows(
        store,
        "SELECT id, body FROM notify_deliveries WHERE state = 'pending' AND next_at_ms <= ?1 ORDER BY seq LIMIT ?2",
        vec![Value::Integer(now), Value::Integer(limit.into())],
    )
    .await
}

pub(super) async fn list(
    store: &Store,
    stack: Option<String>,
    limit: u32,
) -> Result<Vec<(String, String)>, StoreError> {
    rows(
        store,
        "SELECT id, body FROM notify_deliveries WHERE (?1 IS NULL OR stack = ?1) ORDER BY seq DESC LIMIT ?2",
        vec![
            stack.map(Value::Text).unwrap_or(Value::Null),
            Value::Integer(limit.into()),
        ],
    )
    .await
}

/// `(id, body)` of the rows `sql` selects.
async fn rows(
    store: &Store,
    sql: &'static str,
    args: Vec<Value>,
) -> Result<Vec<(String, String)>, StoreError> {
    store
        .with(move |c| {
            let mut stmt = c.prepare_cached(sql).map_err(q("prepare deliveries"))?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(q("list deliveries"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(q("read delivery row"))
        })
        .await
}

pub(super) async fn global(store: &Store) -> Result<Option<String>, StoreError> {
    store
        .with(|c| {
            c.query_row("SELECT body FROM notify_global WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(q("read global targets"))
        })
        .await
}

pub(super) async fn set_global(store: &Store, body: String) -> Result<(), StoreError> {
    store
        .with(move |c| {
            c.execute(
                "INSERT INTO notify_global (id, body) VALUES (1, ?1) ON CONFLICT(id) DO UPDATE SET body = ?1",
                params![body],
            )
            .map_err(q("write global targets"))?;
            Ok(())
        })
        .await
}
