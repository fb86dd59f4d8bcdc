//! What the session does to held leases: cancel, revoke, resume, renew,
//! acknowledgements, the self-fence, and the outbox of what is still owed
//! to the control plane.

use super::*;

impl Runtime {
    pub(super) fn cancel_as(&self, key: &LeaseKey, reason: &str) {
        if let Some(e) = self.jobs.lock().get_mut(key) {
            e.cancel_reason = Some(reason.to_string());
            e.cancel.cancel();
        }
    }

    /// Stops a job and reports it as cancelled.
    pub fn cancel(&self, key: &LeaseKey, reason: &str) {
        if let Some(e) = self.jobs.lock().get_mut(key) {
            if e.cancel_reason.is_none() {
                e.cancel_reason = Some(reason.to_string());
            }
            e.cancel.cancel();
        }
    }

    /// Stops every job (drain deadline reached).
    pub fn cancel_all(&self, reason: &str) {
        for e in self.jobs.lock().values_mut() {
            if e.cancel_reason.is_none() {
                e.cancel_reason = Some(reason.to_string());
            }
            e.cancel.cancel();
        }
    }

    /// The lease is no longer ours: stop the job and forget it without reporting.
    pub fn revoke(&self, key: &LeaseKey, why: &str) {
        let mut jobs = self.jobs.lock();
        let Some(e) = jobs.get_mut(key) else { return };
        warn!(job = %key.job_id, epoch = key.epoch, reason = why, "lease revoked; stopping the job");
        if !e.revoked {
            self.metrics.lease_revoked();
        }
        e.revoked = true;
        e.cancel.cancel();
        e.space.notify_waiters();
        if e.outcome.is_some()
            && let Some(e) = jobs.remove(key)
        {
            drop(jobs);
            remove_spool(&e);
            self.gone.notify_waiters();
        }
    }

    /// A new session starts: resend everything not acknowledged.
    pub fn resume(&self, key: &LeaseKey, acked: u64, ttl: Duration) {
        let held = match self.jobs.lock().get_mut(key) {
            Some(e) => {
                ack_to(e, acked);
                e.sent = e.acked;
                e.running_sent = false;
                e.final_sent = false;
                e.deadline = Instant::now() + self.limits.fence_after(ttl);
                e.outcome.is_none() && !e.revoked
            }
            None => false,
        };
        if held {
            self.extend_container_lease(key, ttl);
        }
        self.wake.notify_one();
    }

    pub fn renewed(&self, key: &LeaseKey, ttl: Duration) {
        let held = match self.jobs.lock().get_mut(key) {
            Some(e) => {
                self.metrics.lease_renewed();
                e.deadline = Instant::now() + self.limits.fence_after(ttl);
                e.outcome.is_none() && !e.revoked
            }
            None => false,
        };
        if held {
            self.extend_container_lease(key, ttl);
        }
    }

    /// Moves the deadline `outpost-init` enforces in the job's container
    /// (outside the jobs lock: it writes a small file).
    pub(super) fn extend_container_lease(&self, key: &LeaseKey, ttl: Duration) {
        self.executor
            .set_lease(key, self.limits.container_lease(ttl, SystemTime::now()));
    }

    pub fn log_acked(&self, key: &LeaseKey, offset: u64) {
        if let Some(e) = self.jobs.lock().get_mut(key) {
            ack_to(e, offset);
            e.space.notify_waiters();
        }
    }

    /// The control plane recorded the final status: forget the job.
    pub fn status_acked(&self, key: &LeaseKey) {
        let mut jobs = self.jobs.lock();
        if jobs.get(key).is_some_and(|e| e.outcome.is_some())
            && let Some(e) = jobs.remove(key)
        {
            drop(jobs);
            remove_spool(&e);
            self.executor.forget_lease(key);
            self.gone.notify_waiters();
            self.wake.notify_one();
        }
    }

    /// Stops jobs whose lease could not be renewed before the local deadline
    /// (self-fencing). Returns the keys fenced now.
    pub fn fence_expired(&self) -> Vec<LeaseKey> {
        let now = Instant::now();
        let mut fenced = Vec::new();
        for (k, e) in self.jobs.lock().iter_mut() {
            if e.outcome.is_none() && !e.cancel.is_cancelled() && now >= e.deadline {
                e.cancel_reason = Some(
                    "stopped by the agent: its lease could not be renewed before it expired"
                        .to_string(),
                );
                e.cancel.cancel();
                self.metrics.lease_fenced();
                fenced.push(k.clone());
            }
        }
        fenced
    }

    /// fsyncs every job's spool (called about once a second).
    pub fn sync_spools(&self) {
        let spools: Vec<_> = self.jobs.lock().values().map(|e| e.spool.clone()).collect();
        for s in spools {
            if let Some(s) = s.lock().as_mut()
                && let Err(e) = s.sync()
            {
                warn!(error = %e, "could not sync the log spool");
            }
        }
    }

    /// What to send now: running notices, log chunks from the sent offset, and
    /// final statuses once the whole log has been sent.
    pub fn outbox(&self, budget: usize) -> Outbox {
        let mut messages = Vec::new();
        let mut used = 0usize;
        let mut more = false;
        for (k, e) in self.jobs.lock().iter_mut() {
            if e.revoked {
                continue;
            }
            if e.running && !e.running_sent && e.outcome.is_none() {
                messages.push(pb::agent_message::Msg::Status(wire::running_status(k)));
                e.running_sent = true;
            }
            while e.sent < e.end() {
                if used >= budget {
                    more = true;
                    break;
                }
                let from = (e.sent - e.acked) as usize;
                let to = (from + MAX_CHUNK).min(e.buf.len());
                let data = e.buf[from..to].to_vec();
                let n = data.len();
                messages.push(pb::agent_message::Msg::Log(pb::LogChunk {
                    job_id: k.job_id.clone(),
                    epoch: k.epoch,
                    seq: 0,
                    offset: e.sent,
                    data,
                }));
                e.sent += n as u64;
                used += n;
                self.metrics.log_bytes_sent(n as u64);
            }
            if let Some(o) = &e.outcome
                && e.sent == e.end()
                && !e.final_sent
            {
                for r in &e.reports {
                    messages.push(pb::agent_message::Msg::Artifact(r.clone()));
                }
                messages.push(pb::agent_message::Msg::Status(wire::final_status(
                    k,
                    o,
                    e.end(),
                )));
                e.final_sent = true;
            }
        }
        Outbox { messages, more }
    }
}

pub(super) fn remove_spool(e: &Entry) {
    if let Some(s) = e.spool.lock().take() {
        s.remove();
    }
}

fn ack_to(e: &mut Entry, offset: u64) {
    if offset > e.acked {
        let n = ((offset - e.acked) as usize).min(e.buf.len());
        e.buf.advance(n);
        e.acked += n as u64;
        if e.sent < e.acked {
            e.sent = e.acked;
        }
        if let Some(s) = e.spool.lock().as_mut() {
            s.ack(e.acked);
        }
    }
}
