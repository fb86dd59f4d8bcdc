//! The agent's table of jobs: each accepted lease, its unacknowledged log
//! bytes, and what still has to be told to the control plane.
//!
//! **Invariant:** log bytes leave this table only when the control plane
//! acknowledged them (`LogAck`); a job leaves it only when its final status
//! was acknowledged (`StatusAck`) or its lease was revoked. So a disconnect
//! loses nothing: the next session resends from the acknowledged offset.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use outpost_proto::agent::v1 as pb;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::executor::DockerExecutor;
use crate::job::{Lease, LeaseKey, Outcome};
use crate::wire;

/// Largest log chunk sent in one message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// One job the agent holds a lease for.
struct Entry {
    /// Unacknowledged bytes; `buf[0]` is at offset `acked`.
    buf: BytesMut,
    acked: u64,
    /// Next offset to send on the current session.
    sent: u64,
    running: bool,
    running_sent: bool,
    outcome: Option<Outcome>,
    final_sent: bool,
    cancel: CancellationToken,
    cancel_reason: Option<String>,
    /// Stop without reporting (the lease is no longer ours).
    revoked: bool,
    /// Local lease deadline: past it, the agent stops the job itself.
    deadline: Instant,
    space: Arc<Notify>,
}

impl Entry {
    fn end(&self) -> u64 {
        self.acked + self.buf.len() as u64
    }
}

/// Shared state of a running agent.
pub struct Runtime {
    pub executor: Arc<DockerExecutor>,
    pub capacity: u32,
    pub log_buffer: usize,
    jobs: Mutex<HashMap<LeaseKey, Entry>>,
    /// Something new to send.
    pub wake: Notify,
    /// A job left the table.
    pub gone: Notify,
    draining: AtomicBool,
    pub tracker: TaskTracker,
}

/// Messages the session should send now.
pub struct Outbox {
    pub messages: Vec<pb::agent_message::Msg>,
    /// More remains after these.
    pub more: bool,
}

impl Runtime {
    pub fn new(executor: Arc<DockerExecutor>, capacity: u32, log_buffer: usize) -> Arc<Runtime> {
        Arc::new(Runtime {
            executor,
            capacity,
            log_buffer,
            jobs: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            gone: Notify::new(),
            draining: AtomicBool::new(false),
            tracker: TaskTracker::new(),
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops taking leases. Returns true the first time.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.jobs.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.lock().is_empty()
    }

    /// Leases the agent holds (for hello and heartbeats).
    pub fn leases(&self) -> Vec<LeaseKey> {
        self.jobs
            .lock()
            .iter()
            .filter(|(_, e)| !e.revoked)
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn free_slots(&self) -> u32 {
        if self.is_draining() {
            return 0;
        }
        self.capacity.saturating_sub(self.len() as u32)
    }

    /// Accepts a lease and starts its job, or says why not.
    pub fn accept(self: &Arc<Self>, lease: Lease) -> Result<(), String> {
        if self.is_draining() {
            return Err("agent is draining".into());
        }
        let key = lease.key.clone();
        let cancel = CancellationToken::new();
        let space = Arc::new(Notify::new());
        {
            let mut jobs = self.jobs.lock();
            if jobs.contains_key(&key) {
                return Ok(());
            }
            if jobs.len() as u32 >= self.capacity {
                return Err(format!("agent is at capacity ({})", self.capacity));
            }
            jobs.insert(
                key.clone(),
                Entry {
                    deadline: Instant::now() + lease.ttl,
                    acked: lease.log_offset,
                    sent: lease.log_offset,
                    buf: BytesMut::new(),
                    running: false,
                    running_sent: false,
                    outcome: None,
                    final_sent: false,
                    cancel: cancel.clone(),
                    cancel_reason: None,
                    revoked: false,
                    space: space.clone(),
                },
            );
        }
        let rt = self.clone();
        let span = info_span!("job", job = %key.job_id, epoch = key.epoch);
        self.tracker.spawn(
            async move {
                info!(image = %lease.spec.image, "job starting");
                let outcome = rt.run_job(&lease, cancel, space).await;
                info!(outcome = ?outcome, "job ended");
                rt.finish(&lease.key, outcome);
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn run_job(
        self: &Arc<Self>,
        lease: &Lease,
        cancel: CancellationToken,
        space: Arc<Notify>,
    ) -> Outcome {
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(64);
        let (started_tx, mut started_rx) = oneshot::channel();
        let exec = self.executor.clone();
        let key = lease.key.clone();
        let spec = lease.spec.clone();
        let run = tokio::spawn(
            async move { exec.run(&key, &spec, out_tx, cancel, started_tx).await }
                .in_current_span(),
        );
        let key = &lease.key;
        let mut started_open = true;
        loop {
            tokio::select! {
                r = &mut started_rx, if started_open => {
                    started_open = false;
                    if r.is_ok() {
                        if let Some(e) = self.jobs.lock().get_mut(key) { e.running = true; }
                        self.wake.notify_one();
                    }
                }
                data = out_rx.recv() => {
                    let Some(data) = data else { break };
                    self.push_output(key, data, &space).await;
                }
            }
        }
        match run.await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed {
                reason: format!("executor task failed: {e}"),
            },
        }
    }

    /// Appends output, waiting while the unacknowledged buffer is full
    /// (backpressure on the container's stream; nothing is dropped).
    async fn push_output(&self, key: &LeaseKey, data: Bytes, space: &Notify) {
        loop {
            let waiter = space.notified();
            {
                let mut jobs = self.jobs.lock();
                let Some(e) = jobs.get_mut(key) else { return };
                if e.buf.len() < self.log_buffer || e.revoked {
                    if !e.revoked {
                        e.buf.extend_from_slice(&data);
                    }
                    break;
                }
            }
            waiter.await;
        }
        self.wake.notify_one();
    }

    fn finish(&self, key: &LeaseKey, mut outcome: Outcome) {
        let mut jobs = self.jobs.lock();
        let Some(e) = jobs.get_mut(key) else { return };
        if e.revoked {
            jobs.remove(key);
            drop(jobs);
            self.gone.notify_waiters();
            return;
        }
        if let (Outcome::Cancelled { .. }, Some(reason)) = (&outcome, &e.cancel_reason) {
            outcome = Outcome::Cancelled {
                reason: reason.clone(),
            };
        }
        e.outcome = Some(outcome);
        drop(jobs);
        self.wake.notify_one();
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
        e.revoked = true;
        e.cancel.cancel();
        e.space.notify_waiters();
        if e.outcome.is_some() {
            jobs.remove(key);
            drop(jobs);
            self.gone.notify_waiters();
        }
    }

    /// A new session starts: resend everything not acknowledged.
    pub fn resume(&self, key: &LeaseKey, acked: u64, ttl: Duration) {
        if let Some(e) = self.jobs.lock().get_mut(key) {
            ack_to(e, acked);
            e.sent = e.acked;
            e.running_sent = false;
            e.final_sent = false;
            e.deadline = Instant::now() + ttl;
        }
        self.wake.notify_one();
    }

    pub fn renewed(&self, key: &LeaseKey, ttl: Duration) {
        if let Some(e) = self.jobs.lock().get_mut(key) {
            e.deadline = Instant::now() + ttl;
        }
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
        if jobs.get(key).is_some_and(|e| e.outcome.is_some()) {
            jobs.remove(key);
            drop(jobs);
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
                fenced.push(k.clone());
            }
        }
        fenced
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
            if e.running && !e.running_sent {
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
            }
            if let Some(o) = &e.outcome
                && e.sent == e.end()
                && !e.final_sent
            {
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

fn ack_to(e: &mut Entry, offset: u64) {
    if offset > e.acked {
        let n = ((offset - e.acked) as usize).min(e.buf.len());
        e.buf.advance(n);
        e.acked += n as u64;
        if e.sent < e.acked {
            e.sent = e.acked;
        }
    }
}
