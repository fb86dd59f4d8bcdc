//! Jobs found in the spool after a restart, and the final outcome as the
//! spool keeps it.

use super::*;

/// How a job ended, as persisted in its spool (`outcome.json`).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum OutcomeRecord {
    Exited { code: i64, oom_killed: bool },
    Cancelled { reason: String },
    TimedOut,
    Failed { reason: String },
    Rejected { reason: String },
}

impl From<&Outcome> for OutcomeRecord {
    fn from(o: &Outcome) -> Self {
        match o {
            Outcome::Exited { code, oom_killed } => OutcomeRecord::Exited {
                code: *code,
                oom_killed: *oom_killed,
            },
            Outcome::Cancelled { reason } => OutcomeRecord::Cancelled {
                reason: reason.clone(),
            },
            Outcome::TimedOut => OutcomeRecord::TimedOut,
            Outcome::Failed { reason } => OutcomeRecord::Failed {
                reason: reason.clone(),
            },
            Outcome::Rejected { reason } => OutcomeRecord::Rejected {
                reason: reason.clone(),
            },
        }
    }
}

impl From<OutcomeRecord> for Outcome {
    fn from(o: OutcomeRecord) -> Self {
        match o {
            OutcomeRecord::Exited { code, oom_killed } => Outcome::Exited { code, oom_killed },
            OutcomeRecord::Cancelled { reason } => Outcome::Cancelled { reason },
            OutcomeRecord::TimedOut => Outcome::TimedOut,
            OutcomeRecord::Failed { reason } => Outcome::Failed { reason },
            OutcomeRecord::Rejected { reason } => Outcome::Rejected { reason },
        }
    }
}

impl Runtime {
    /// Restores the jobs found in the spool after a restart: finished ones are
    /// reported, running ones re-adopted from their container. Returns the
    /// keys of the containers adopted.
    pub async fn restore(self: &Arc<Self>, recovered: Vec<Recovered>) -> Vec<LeaseKey> {
        let mut adopted = Vec::new();
        for r in recovered {
            let raw = match pb::Lease::decode(r.lease.as_slice()) {
                Ok(raw) => raw,
                Err(e) => {
                    warn!(job = %r.key, error = %e, "unreadable spooled lease; discarding");
                    r.spool.remove();
                    continue;
                }
            };
            let lease = match wire::lease_from_pb(raw) {
                Ok(l) => l,
                Err(e) => {
                    warn!(job = %r.key, error = %e, "invalid spooled lease; discarding");
                    r.spool.remove();
                    continue;
                }
            };
            if r.torn_bytes > 0 {
                warn!(job = %r.key, bytes = r.torn_bytes, "dropped a torn tail from the log spool");
            }
            let end = r.spool.end();
            let buf = match r.spool.read(r.start, usize::MAX) {
                Ok(b) => BytesMut::from(&b[..]),
                Err(e) => {
                    warn!(job = %r.key, error = %e, "unreadable log spool; discarding");
                    r.spool.remove();
                    continue;
                }
            };
            let outcome: Option<Outcome> = r
                .outcome
                .as_deref()
                .and_then(|o| serde_json::from_slice::<OutcomeRecord>(o).ok())
                .map(Outcome::from);
            let finished = outcome.is_some();
            self.insert(&lease, r.start, buf, r.spool, outcome);
            if finished {
                info!(job = %r.key, "reporting a job that ended while the agent was down");
                continue;
            }
            if self.executor.container_exists(&lease.key).await {
                info!(job = %r.key, spooled = end, "re-adopting a running job");
                adopted.push(lease.key.clone());
                self.spawn(lease, Drive::Adopt { skip: end });
            } else {
                self.finish(
                    &lease.key,
                    Outcome::Failed {
                        reason: "the agent restarted and the job's container no longer exists"
                            .into(),
                    },
                );
            }
        }
        self.wake.notify_one();
        adopted
    }
}
