//! The leases held now, in memory: which agent holds which job at which
//! epoch, until when, and how much of its log is stored.
//!
//! **Invariant:** the table mirrors the durable lease of every job in
//! `leased` or `running`: it is loaded when the store opens and every write
//! that can change a job's lease re-reads the job's row into it inside the
//! same store call, after the write (so in the order of the writes).
//!
//! What is only here: lease deadlines after renewal. A heartbeat renews in
//! memory (no store trip); the sweeper expires from here and the expiry
//! itself is a durable, fenced write. A control-plane start gives every
//! held lease a full time-to-live from the start (`extend_active_leases`),
//! so the deadlines lost in a crash are never needed. Epochs, owners and
//! states are always durable first: fencing checks the database.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::{StoreError, q};

/// A heartbeat's answer: the renewed leases `(job, epoch, stored log
/// offset)` and the revoked ones `(job, epoch)`.
pub type Renewal = (Vec<(String, u64, u64)>, Vec<(String, u64)>);

/// One lease held now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    pub agent: String,
    pub epoch: u64,
    pub deadline_ms: i64,
    pub log_acked: u64,
}

/// The table; behind the store's `held` lock (always taken after the
/// connection's lock when both are held).
#[derive(Debug, Default)]
pub struct Held {
    leases: HashMap<String, HeldLease>,
    per_agent: HashMap<String, u32>,
}

impl Held {
    pub(super) fn load(c: &Connection) -> Result<Held, StoreError> {
        let mut stmt = c
            .prepare(
                "SELECT id, agent_id, epoch, lease_deadline_ms, log_acked FROM jobs
                 WHERE state IN ('leased','running')",
            )
            .map_err(q("load held leases"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    HeldLease {
                        agent: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        epoch: r.get::<_, i64>(2)? as u64,
                        deadline_ms: r.get(3)?,
                        log_acked: r.get::<_, i64>(4)? as u64,
                    },
                ))
            })
            .map_err(q("load held leases"))?;
        let mut held = Held::default();
        for row in rows {
            let (id, lease) = row.map_err(q("read held lease"))?;
            held.insert(id, lease);
        }
        Ok(held)
    }

    fn insert(&mut self, id: String, lease: HeldLease) {
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

    /// Re-reads job `id`'s lease from the database (after a write to it).
    pub(super) fn sync(&mut self, c: &Connection, id: &str) -> Result<(), StoreError> {
        let row = c
            .query_row(
                "SELECT agent_id, epoch, lease_deadline_ms, log_acked FROM jobs
                 WHERE id = ?1 AND state IN ('leased','running')",
                params![id],
                |r| {
                    Ok(HeldLease {
                        agent: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                        epoch: r.get::<_, i64>(1)? as u64,
                        deadline_ms: r.get(2)?,
                        log_acked: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()
            .map_err(q("read held lease"))?;
        match row {
            None => self.remove(id),
            Some(mut lease) => {
                // The same lease keeps the deadline its renewals gave it.
                if let Some(old) = self.leases.get(id)
                    && old.epoch == lease.epoch
                    && old.agent == lease.agent
                {
                    lease.deadline_ms = lease.deadline_ms.max(old.deadline_ms);
                }
                self.insert(id.to_string(), lease);
            }
        }
        Ok(())
    }

    /// Leases `agent` holds.
    pub fn count(&self, agent: &str) -> u32 {
        self.per_agent.get(agent).copied().unwrap_or(0)
    }

    /// Jobs `agent` holds: (job, epoch).
    pub fn held_by(&self, agent: &str) -> Vec<(String, u64)> {
        if self.count(agent) == 0 {
            return Vec::new();
        }
        self.leases
            .iter()
            .filter(|(_, l)| l.agent == agent)
            .map(|(id, l)| (id.clone(), l.epoch))
            .collect()
    }

    /// Renews the listed leases if `agent` holds them: (renewed with their
    /// stored log offsets, revoked).
    pub fn renew(&mut self, agent: &str, leases: Vec<(String, u64)>, deadline_ms: i64) -> Renewal {
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

    /// Leases past their deadline: (job, epoch, agent).
    pub fn expired(&self, now_ms: i64) -> Vec<(String, u64, String)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.deadline_ms < now_ms)
            .map(|(id, l)| (id.clone(), l.epoch, l.agent.clone()))
            .collect()
    }

    /// Every lease gets at least `deadline_ms`.
    pub fn extend_all(&mut self, deadline_ms: i64) {
        for l in self.leases.values_mut() {
            l.deadline_ms = l.deadline_ms.max(deadline_ms);
        }
    }

    pub fn set_acked(&mut self, id: &str, acked: u64) {
        if let Some(l) = self.leases.get_mut(id) {
            l.log_acked = acked;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(agent: &str, epoch: u64, deadline_ms: i64) -> HeldLease {
        HeldLease {
            agent: agent.into(),
            epoch,
            deadline_ms,
            log_acked: 0,
        }
    }

    #[test]
    fn counts_follow_owners_and_renewals_are_fenced() {
        let mut h = Held::default();
        h.insert("j1".into(), lease("a", 1, 100));
        h.insert("j2".into(), lease("a", 1, 100));
        h.insert("j3".into(), lease("b", 2, 100));
        assert_eq!((h.count("a"), h.count("b"), h.count("c")), (2, 1, 0));
        // Re-leased to b: a's count drops.
        h.insert("j1".into(), lease("b", 2, 100));
        assert_eq!((h.count("a"), h.count("b")), (1, 2));
        let (renewed, revoked) = h.renew(
            "b",
            vec![
                ("j1".into(), 2),
                ("j1".into(), 1),
                ("j2".into(), 1),
                ("x".into(), 1),
            ],
            500,
        );
        assert_eq!(renewed, [("j1".to_string(), 2, 0)]);
        assert_eq!(
            revoked,
            [
                ("j1".to_string(), 1),
                ("j2".to_string(), 1),
                ("x".to_string(), 1)
            ]
        );
        let mut expired = h.expired(200);
        expired.sort();
        assert_eq!(
            expired,
            [
                ("j2".to_string(), 1, "a".to_string()),
                ("j3".to_string(), 2, "b".to_string())
            ]
        );
        h.remove("j2");
        h.remove("j2");
        assert_eq!(h.count("a"), 0);
    }
}
