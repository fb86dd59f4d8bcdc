//! Agents seen by the control plane (what `outpost agents` lists).

use std::collections::BTreeMap;

use tokio_postgres::GenericClient;

use super::leases::pgc;
use super::{PgStore, pg};
use crate::model::AgentInfo;
use crate::store::StoreError;

impl PgStore {
    /// Records an agent that connected (committed with other writes of
    /// its batch: `batch`).
    pub async fn upsert_agent(&self, info: AgentInfo) -> Result<(), StoreError> {
        self.batch.agent(info).await?.await
    }

    /// Records that `id` drains (it said so itself).
    pub async fn set_agent_draining(&self, id: String) -> Result<(), StoreError> {
        self.timed(async {
            let o = self.client().await?;
            pgc(&o)
                .execute("UPDATE agents SET draining = TRUE WHERE id = $1", &[&id])
                .await
                .map_err(pg("mark agent draining"))?;
            Ok(())
        })
        .await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, StoreError> {
        self.timed(async {
            let o = self.client().await?;
            let rows = pgc(&o)
                .query(
                    "SELECT id, version, labels, capacity, draining, last_seen_ms FROM agents ORDER BY id",
                    &[],
                )
                .await
                .map_err(pg("list agents"))?;
            let read = |r: &tokio_postgres::Row| -> Result<AgentInfo, tokio_postgres::Error> {
                let labels: String = r.try_get(2)?;
                Ok(AgentInfo {
                    id: r.try_get(0)?,
                    version: r.try_get(1)?,
                    labels: serde_json::from_str::<BTreeMap<String, String>>(&labels)
                        .unwrap_or_default(),
                    capacity: r.try_get::<_, i64>(3)?.clamp(0, i64::from(u32::MAX)) as u32,
                    draining: r.try_get(4)?,
                    last_seen_ms: r.try_get(5)?,
                })
            };
            rows.iter()
                .map(read)
                .collect::<Result<Vec<_>, _>>()
                .map_err(pg("read agent row"))
        })
        .await
    }
}

/// Records an agent inside the caller's transaction.
pub(super) async fn upsert_in<C: GenericClient + Sync>(
    c: &C,
    info: &AgentInfo,
) -> Result<(), StoreError> {
    let labels = serde_json::to_string(&info.labels).unwrap_or_else(|_| "{}".into());
    c.execute(
        "INSERT INTO agents (id, version, labels, capacity, draining, last_seen_ms)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET version = $2, labels = $3, capacity = $4,
             draining = $5, last_seen_ms = $6",
        &[
            &info.id,
            &info.version,
            &labels,
            &i64::from(info.capacity),
            &info.draining,
            &info.last_seen_ms,
        ],
    )
    .await
    .map_err(pg("upsert agent"))?;
    Ok(())
}
