//! Agents seen by the control plane (what `outpost agents` lists).

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

use super::{SqliteStore, StoreError, q};
use crate::model::AgentInfo;

impl SqliteStore {
    /// Records an agent that connected (committed with other writes of
    /// its batch: `batch`).
    pub async fn upsert_agent(&self, info: AgentInfo) -> Result<(), StoreError> {
        self.batch.agent(info).await?.await
    }

    /// Records that `id` drains (it said so itself).
    pub async fn set_agent_draining(&self, id: String) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute("UPDATE agents SET draining = 1 WHERE id = ?1", params![id])
                .map_err(q("mark agent draining"))?;
            Ok(())
        })
        .await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, version, labels, capacity, draining, last_seen_ms FROM agents ORDER BY id",
                )
                .map_err(q("prepare list agents"))?;
            let rows = stmt
                .query_map([], |r| {
                    let labels: String = r.get(2)?;
                    Ok(AgentInfo {
                        id: r.get(0)?,
                        version: r.get(1)?,
                        labels: serde_json::from_str::<BTreeMap<String, String>>(&labels)
                            .unwrap_or_default(),
                        capacity: r.get(3)?,
                        draining: r.get(4)?,
                        last_seen_ms: r.get(5)?,
                    })
                })
                .map_err(q("list agents"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(q("read agent row"))
        })
        .await
    }
}

/// Records an agent inside the caller's transaction.
pub(super) fn upsert_in(c: &Connection, info: &AgentInfo) -> Result<(), StoreError> {
    let labels = serde_json::to_string(&info.labels).unwrap_or_else(|_| "{}".into());
    c.execute(
        "INSERT INTO agents (id, version, labels, capacity, draining, last_seen_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO UPDATE SET version = ?2, labels = ?3, capacity = ?4,
             draining = ?5, last_seen_ms = ?6",
        params![
            info.id,
            info.version,
            labels,
            info.capacity,
            info.draining,
            info.last_seen_ms
        ],
    )
    .map_err(q("upsert agent"))?;
    Ok(())
}
