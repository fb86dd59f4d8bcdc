//! The leases of this replica's agents, in memory: which agent holds which
//! job at which epoch, until when (as renewed here, and as known durable),
//! and how much of its log is stored; and the task that writes renewed
//! deadlines to the database (see the module doc of `postgres` for the
//! rules).
//!
//! **Invariant:** an entry is added or changed only from a job row read
//! back by a write that committed (never from a request), and an entry is
//! never replaced by an older epoch of the same job.

use std::collections::{HashMap, HashSet};
use std::sync::Weak;

use deadpool_postgres::Pool;
use parking_lot::Mutex;

use super::{FLUSH_EVERY, pg, pool_err};
use crate::model::Job;
use crate::store::Renewal;
use crate::store::StoreError;

/// One lease held by an agent of this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalLease {
    agent: String,
    epoch: u64,
    /// As renewed here.
    deadline_ms: i64,
    /// As last known written.
    durable_ms: i64,
    log_acked: u64,
}

/// A renewal to write: (job, epoch, agent, deadline).
pub(super) type Pending = (String, u64, String, i64);

/// The table; behind the store's `local` lock (never held across a
/// database call).
#[derive(Debug, Default)]
pub struct Local {
    leases: HashMap<String, LocalLease>,
    per_agent: HashMap<String, u32>,
}

impl Local {
    fn insert(&mut self, id: String, lease: LocalLease) {
        *self.per_agent.entry(lease.agent.clone()).or_insert(0) += 1;
        if let Some(old) = self.leases.insert(id, lease) {
            self.forget_agent(&old.agent);
        }
    }

    fn forget_agent(&mut self, agent: &str) {
        if let Some(n) = self.per_agent.get_mut(agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_agent.remove(agent);
            }
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.leases.remove(id) {
            self.forget_agent(&old.agent);
        }
    }

    /// Records `job` as a committed write left it: its lease if it holds
    /// one, else no lease (unless the table already knows a later epoch).
    pub(super) fn apply(&mut self, job: &Job) {
        let old = self.leases.get(&job.id);
        if old.is_some_and(|o| o.epoch > job.epoch) {
            return;
        }
        if !job.state.is_active() {
            self.remove(&job.id);
            return;
        }
        let agent = job.agent_id.clone().unwrap_or_default();
        let mut lease = LocalLease {
            agent,
            epoch: job.epoch,
            deadline_ms: job.lease_deadline_ms,
            durable_ms: job.lease_deadline_ms,
            log_acked: job.log_acked,
        };
        // The same lease keeps the deadline its renewals gave it.
        if let Some(o) = old
            && o.epoch == lease.epoch
            && o.agent == lease.agent
        {
            lease.deadline_ms = lease.deadline_ms.max(o.deadline_ms);
            lease.log_acked = lease.log_acked.max(o.log_acked);
        }
        self.insert(job.id.clone(), lease);
    }

    /// Drops lease `(id, epoch)` if the table holds exactly it.
    pub(super) fn forget(&mut self, id: &str, epoch: u64) {
        if self.leases.get(id).is_some_and(|l| l.epoch == epoch) {
            self.remove(id);
        }
    }

    /// Leases `agent` holds.
    pub(super) fn count(&self, agent: &str) -> u32 {
        self.per_agent.get(agent).copied().unwrap_or(0)
    }

    /// Jobs `agent` holds: (job, epoch).
    pub(super) fn held_by(&self, agent: &str) -> Vec<(String, u64)> {
        if self.count(agent) == 0 {
            return Vec::new();
        }
        self.leases
            .iter()
            .filter(|(_, l)| l.agent == agent)
            .map(|(id, l)| (id.clone(), l.epoch))
            .collect()
    }

    /// Renews the listed leases if `agent` holds them here: (renewed with
    /// their stored log offsets, revoked).
    pub(super) fn renew(
        &mut self,
        agent: &str,
        leases: Vec<(String, u64)>,
        deadline_ms: i64,
    ) -> Renewal {
        let mut renewed = Vec::new();
        let mut revoked = Vec::new();
        for (id, epoch) in leases {
            match self.leases.get_mut(&id) {
                Some(l) if l.epoch == epoch && l.agent == agent => {
                    l.deadline_ms = l.deadline_ms.max(deadline_ms);
                    renewed.push((id, epoch, l.log_acked));
                }
                _ => revoked.push((id, epoch)),
            }
        }
        (renewed, revoked)
    }

    /// Every lease gets at least `deadline_ms` (already written).
    pub(super) fn extend_all(&mut self, deadline_ms: i64) {
        for l in self.leases.values_mut() {
            l.deadline_ms = l.deadline_ms.max(deadline_ms);
            l.durable_ms = l.durable_ms.max(deadline_ms);
        }
    }

    /// The stored log of lease `(id, epoch)` now ends at `acked`.
    pub(super) fn set_acked(&mut self, id: &str, epoch: u64, acked: u64) {
        if let Some(l) = self.leases.get_mut(id)
            && l.epoch == epoch
        {
            l.log_acked = l.log_acked.max(acked);
        }
    }

    /// Renewals not yet written.
    pub(super) fn pending(&self) -> Vec<Pending> {
        self.leases
            .iter()
            .filter(|(_, l)| l.deadline_ms > l.durable_ms)
            .map(|(id, l)| (id.clone(), l.epoch, l.agent.clone(), l.deadline_ms))
            .collect()
    }

    /// After `sent` was flushed: those in `kept` are durable up to their
    /// deadline, those in `revoked` are no longer current leases and are
    /// dropped, the others stay pending.
    pub(super) fn flushed(
        &mut self,
        sent: &[Pending],
        kept: &HashSet<(String, u64)>,
        revoked: &HashSet<(String, u64)>,
    ) {
        for (id, epoch, agent, deadline) in sent {
            let Some(l) = self.leases.get_mut(id) else {
                continue;
            };
            if l.epoch != *epoch || l.agent != *agent {
                continue;
            }
            let lease = (id.clone(), *epoch);
            if kept.contains(&lease) {
                l.durable_ms = l.durable_ms.max(*deadline);
            } else if revoked.contains(&lease) {
                self.remove(id);
            }
        }
    }

    /// Drops the leases this replica's agents stopped renewing (their
    /// deadline here passed): they are expired, or renewed elsewhere.
    pub(super) fn drop_lapsed(&mut self, now_ms: i64) {
        let lapsed: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline_ms < now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in lapsed {
            self.remove(&id);
        }
    }
}

/// Writes renewals `(ids, epochs, agents, deadlines)` where they are still
/// the current lease; per lease, 1 (written), 0 (its row is locked by
/// another transaction: skipped, never waited for, so this statement, which
/// locks many rows, is in no lock cycle) or -1 (no longer the current
/// lease).
const FLUSH: &str = "
WITH d AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[])
        AS d(id, epoch, agent, deadline)
), locked AS (
    SELECT jobs.id FROM jobs JOIN d ON jobs.id = d.id
    WHERE jobs.epoch = d.epoch AND jobs.agent_id = d.agent AND jobs.state IN ('leased','running')
    FOR UPDATE OF jobs SKIP LOCKED
), written AS (
    UPDATE jobs SET lease_deadline_ms = GREATEST(jobs.lease_deadline_ms, d.deadline)
    FROM d
    WHERE jobs.id = d.id AND jobs.id IN (SELECT id FROM locked)
        AND jobs.epoch = d.epoch AND jobs.agent_id = d.agent AND jobs.state IN ('leased','running')
    RETURNING jobs.id
)
SELECT d.id, d.epoch, CASE
    WHEN d.id IN (SELECT id FROM written) THEN 1
    WHEN EXISTS (SELECT 1 FROM jobs WHERE jobs.id = d.id AND jobs.epoch = d.epoch
        AND jobs.agent_id = d.agent AND jobs.state IN ('leased','running')) THEN 0
    ELSE -1 END
FROM d";

/// Writes every pending renewal in one fenced statement.
pub(super) async fn flush(pool: &Pool, local: &Mutex<Local>) -> Result<(), StoreError> {
    let sent = local.lock().pending();
    if sent.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = sent.iter().map(|p| p.0.as_str()).collect();
    let epochs: Vec<i64> = sent.iter().map(|p| super::schema::big(p.1)).collect();
    let agents: Vec<&str> = sent.iter().map(|p| p.2.as_str()).collect();
    let deadlines: Vec<i64> = sent.iter().map(|p| p.3).collect();
    let client = pool.get().await.map_err(pool_err("flush renewals"))?;
    let mut tries = 0;
    let rows = loop {
        tries += 1;
        let r = client
            .query(FLUSH, &[&ids, &epochs, &agents, &deadlines])
            .await;
        match r {
            Err(e) if tries < 3 && super::leases::is_retryable(&e) => continue,
            r => break r.map_err(pg("flush renewals"))?,
        }
    };
    let mut kept = HashSet::new();
    let mut revoked = HashSet::new();
    let mut busy = Vec::new();
    for row in &rows {
        let id: String = row.try_get(0).map_err(pg("read flushed lease"))?;
        let epoch: i64 = row.try_get(1).map_err(pg("read flushed lease"))?;
        let outcome: i32 = row.try_get(2).map_err(pg("read flushed lease"))?;
        let lease = (id, epoch.max(0) as u64);
        match outcome {
            1 => kept.insert(lease),
            -1 => revoked.insert(lease),
            _ => {
                busy.push(lease);
                false
            }
        };
    }
    // A row another transaction holds: written alone, waiting for it (one
    // statement holding no other lock is in no lock cycle), so a job whose
    // row is written all the time still has its renewals written.
    for (id, epoch) in busy {
        let Some((_, _, agent, deadline)) = sent.iter().find(|p| p.0 == id && p.1 == epoch) else {
            continue;
        };
        let n = client
            .execute(
                "UPDATE jobs SET lease_deadline_ms = GREATEST(lease_deadline_ms, $4)
                 WHERE id = $1 AND epoch = $2 AND agent_id = $3 AND state IN ('leased','running')",
                &[&id, &super::schema::big(epoch), &agent, &deadline],
            )
            .await
            .map_err(pg("flush a renewal"))?;
        if n > 0 {
            kept.insert((id, epoch));
        } else {
            revoked.insert((id, epoch));
        }
    }
    local.lock().flushed(&sent, &kept, &revoked);
    Ok(())
}

/// Starts the task writing renewals every [`FLUSH_EVERY`]; it ends once
/// the store is gone.
pub(super) fn spawn_flusher(pool: Pool, local: Weak<Mutex<Local>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(local) = local.upgrade() else { break };
            if let Err(e) = flush(&pool, &local).await {
                tracing::warn!(error = %e, "writing renewed lease deadlines failed; retrying");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobSpec, JobState};

    fn job(id: &str, agent: &str, epoch: u64, state: JobState, deadline: i64) -> Job {
        Job {
            id: id.into(),
            spec: JobSpec::default(),
            state,
            epoch,
            agent_id: Some(agent.into()),
            exit_code: None,
            message: String::new(),
            oom_killed: false,
            created_ms: 0,
            started_ms: 0,
            finished_ms: 0,
            lease_deadline_ms: deadline,
            cancel_requested: false,
            log_acked: 0,
            log_total: None,
        }
    }

    #[test]
    fn renewals_are_fenced_pending_until_flushed_and_dropped_when_revoked() {
        let mut l = Local::default();
        l.apply(&job("j1", "a", 1, JobState::Leased, 100));
        l.apply(&job("j2", "a", 1, JobState::Running, 100));
        assert_eq!(l.count("a"), 2);
        assert!(l.pending().is_empty());
        let (renewed, revoked) = l.renew("a", vec![("j1".into(), 1), ("j2".into(), 0)], 500);
        assert_eq!(renewed, [("j1".to_string(), 1, 0)]);
        assert_eq!(revoked, [("j2".to_string(), 0)]);
        let (renewed, _) = l.renew("a", vec![("j2".into(), 1)], 500);
        assert_eq!(renewed.len(), 1);
        let mut sent = l.pending();
        sent.sort();
        assert_eq!(sent.len(), 2);
        // j2 was revoked elsewhere: the flush drops it, j1 is durable.
        let none = HashSet::new();
        let j1: HashSet<_> = [("j1".to_string(), 1)].into_iter().collect();
        let j2: HashSet<_> = [("j2".to_string(), 1)].into_iter().collect();
        // A busy row leaves both pending.
        l.flushed(&sent, &none, &none);
        assert_eq!(l.pending().len(), 2);
        l.flushed(&sent, &j1, &j2);
        assert!(l.pending().is_empty());
        assert_eq!(l.held_by("a"), [("j1".to_string(), 1)]);
        let (_, revoked) = l.renew("a", vec![("j2".into(), 1)], 900);
        assert_eq!(revoked, [("j2".to_string(), 1)]);
        // An older epoch never replaces a newer one; a final state ends it.
        l.apply(&job("j1", "b", 2, JobState::Leased, 100));
        l.apply(&job("j1", "a", 1, JobState::Succeeded, 100));
        assert_eq!((l.count("a"), l.count("b")), (0, 1));
        l.apply(&job("j1", "b", 2, JobState::Succeeded, 0));
        assert_eq!(l.count("b"), 0);
        l.apply(&job("j3", "c", 1, JobState::Leased, 100));
        l.drop_lapsed(200);
        assert_eq!(l.count("c"), 0);
    }
}
