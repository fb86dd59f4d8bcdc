//! Renewals: at a session's start (durable, loading the agent's leases
//! into this replica's table) and by heartbeats (in memory, written by the
//! flusher: see `local`); the counts of leases per agent.

use super::leases::pgc;
use super::leases::{TRIES, retryable};
use super::schema::{ACTIVE, JOB_COLS, big, one_job, select_jobs};
use super::{PgStore, pg};
use crate::model::{Job, now_ms};
use crate::store::Renewal;
use crate::store::StoreError;

impl PgStore {
    /// Renews the listed leases held by `agent` durably (a session's
    /// start) and loads every durable lease of `agent` into this replica's
    /// table (its session is here now); returns (renewed, revoked).
    pub async fn renew(
        &self,
        agent: String,
        leases: Vec<(String, u64)>,
        ttl_ms: u64,
    ) -> Result<(Vec<Job>, Vec<(String, u64)>), StoreError> {
        self.timed(async {
            let mut o = self.client().await?;
            let deadline = now_ms().saturating_add(big(ttl_ms));
            let (mut renewed, mut revoked) = (Vec::new(), Vec::new());
            let mut tries = 0;
            while !leases.is_empty() {
                tries += 1;
                match renew_pass(&mut o, &agent, &leases, deadline).await {
                    Err(e) if tries < TRIES && retryable(&e) => continue,
                    r => {
                        (renewed, revoked) = r?;
                        break;
                    }
                }
            }
            let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE agent_id = $1 AND {ACTIVE}");
            let held = select_jobs(pgc(&o), "load an agent's leases", &sql, &[&agent]).await?;
            let mut local = self.local.lock();
            for j in renewed.iter().chain(&held) {
                local.apply(j);
            }
            Ok((renewed, revoked))
        })
        .await
    }

    /// Number of leases `agent` holds on this replica (from memory).
    pub async fn active_count(&self, agent: String) -> Result<u32, StoreError> {
        Ok(self.held_count(&agent))
    }

    /// Number of leases `agent` holds on this replica (from memory).
    pub fn held_count(&self, agent: &str) -> u32 {
        self.local.lock().count(agent)
    }

    /// Jobs `agent` holds a lease of on this replica: (job, epoch), from
    /// memory.
    pub fn held_by(&self, agent: &str) -> Vec<(String, u64)> {
        self.local.lock().held_by(agent)
    }

    /// Renews the listed leases held by `agent` in memory (a heartbeat):
    /// (renewed with their stored log offsets, revoked). The deadlines are
    /// written within [`super::FLUSH_EVERY`]; a lease this replica does not
    /// hold is answered revoked.
    pub fn renew_held(&self, agent: &str, leases: Vec<(String, u64)>, ttl_ms: u64) -> Renewal {
        self.local
            .lock()
            .renew(agent, leases, now_ms().saturating_add(big(ttl_ms)))
    }
}

/// One attempt at a session start's renewals, in its own transaction.
async fn renew_pass(
    o: &mut deadpool_postgres::Object,
    agent: &str,
    leases: &[(String, u64)],
    deadline: i64,
) -> Result<(Vec<Job>, Vec<(String, u64)>), StoreError> {
    let client: &mut tokio_postgres::Client = o;
    let tx = client.transaction().await.map_err(pg("begin renew"))?;
    let sql = format!(
        "UPDATE jobs SET lease_deadline_ms = GREATEST(lease_deadline_ms, $4)
         WHERE id = $1 AND epoch = $2 AND agent_id = $3 AND {ACTIVE}
         RETURNING {JOB_COLS}"
    );
    let mut renewed = Vec::new();
    let mut revoked = Vec::new();
    for (id, epoch) in leases {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [id, &big(*epoch), &agent, &deadline];
        match one_job(&tx, "renew lease", &sql, &params).await? {
            Some(j) => renewed.push(j),
            None => revoked.push((id.clone(), *epoch)),
        }
    }
    tx.commit().await.map_err(pg("commit renew"))?;
    Ok((renewed, revoked))
}
