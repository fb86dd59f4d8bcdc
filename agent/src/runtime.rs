//! The agent's table of jobs: each accepted lease, its unacknowledged log
//! bytes, and what still has to be told to the control plane.
//!
//! **Invariant:** output is written to the job's disk spool (`spool.rs`)
//! before it can be sent; log bytes leave memory and the spool only when the
//! control plane acknowledged them (`LogAck`); a job leaves the table (and
//! its spool is deleted) only when its final status was acknowledged
//! (`StatusAck`) or its lease was revoked. So neither a disconnect nor an agent
//! restart loses a byte: the next session resends from the acknowledged offset.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use outpost_proto::agent::v1 as pb;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::executor::{DockerExecutor, Lease as FenceLease};
use crate::job::{Lease, LeaseKey, Outcome};
use crate::observe::JobOutcome;
use crate::spool::{JobSpool, Recovered, Spool};
use crate::wire;

/// Largest log chunk sent in one message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Tunables of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeLimits {
    pub capacity: u32,
    /// Unacknowledged bytes held per job before its output is slowed down.
    pub log_buffer: usize,
    /// How long a job's output may wait for spool space before the job fails.
    pub spool_full_timeout: Duration,
    /// The executor's SIGINT-to-SIGKILL grace: self-fencing starts early
    /// enough for the job to be dead before the lease expires on the server.
    pub stop_grace: Duration,
}

impl RuntimeLimits {
    /// Time after a renewal at which the agent starts stopping a job it could
    /// not renew: the lease TTL minus the stop grace minus a safety margin,
    /// but never less than half the TTL.
    pub fn fence_after(&self, ttl: Duration) -> Duration {
        ttl.saturating_sub(self.stop_grace + Self::margin(ttl))
            .max(ttl / 2)
    }

    /// Safety margin between the job's death and the lease's expiry on the
    /// control plane (covers the renewal's trip and clock reading).
    fn margin(ttl: Duration) -> Duration {
        (ttl / 10).min(Duration::from_secs(2))
    }

    /// The lease `outpost-init` enforces in the container, for a renewal
    /// received now: one `SIGINT` a moment after the agent's own fence
    /// ([`fence_after`](Self::fence_after)), so that a live agent stops and
    /// reports the job itself; `SIGKILL` at `ttl − margin` at the latest,
    /// strictly before the control plane can lease the job again, even when
    /// the grace does not fit in the TTL.
    pub fn container_lease(&self, ttl: Duration, now: SystemTime) -> FenceLease {
        let kill_after = ttl.saturating_sub(Self::margin(ttl));
        let lag = (self.stop_grace / 4).min(INIT_LAG);
        let stop_after = (self.fence_after(ttl) + lag).min(kill_after);
        FenceLease::Until {
            stop_at: now + stop_after,
            kill_at: now + kill_after,
        }
    }
}

/// How long after the agent's own fence `outpost-init` sends its `SIGINT`.
const INIT_LAG: Duration = Duration::from_millis(500);

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
    spool: Arc<Mutex<Option<JobSpool>>>,
    /// Artifact reports, sent (again on every session) just before the final status.
    reports: Vec<pb::ArtifactUploaded>,
}

impl Entry {
    fn end(&self) -> u64 {
        self.acked + self.buf.len() as u64
    }
}

/// The agent's local policy: `Err(reason)` refuses a lease before anything
/// runs; the job then ends as rejected with that reason.
pub type LeaseCheck = Arc<dyn Fn(&Lease) -> Result<(), String> + Send + Sync>;

/// Shared state of a running agent.
pub struct Runtime {
    pub executor: Arc<DockerExecutor>,
    check: Option<LeaseCheck>,
    pub limits: RuntimeLimits,
    spool: Spool,
    jobs: Mutex<HashMap<LeaseKey, Entry>>,
    /// Something new to send.
    pub wake: Notify,
    /// A job left the table.
    pub gone: Notify,
    draining: AtomicBool,
    pub tracker: TaskTracker,
    /// AWS credentials and S3 for jobs (`crate::aws`); set once at start.
    pub aws: std::sync::OnceLock<Arc<crate::aws::AwsAgent>>,
    /// Stack runs' plan phases (`crate::iac`); set once at start.
    pub iac: std::sync::OnceLock<Arc<crate::iac::IacAgent>>,
    /// Counters for the operator (`crate::observe`).
    pub metrics: Arc<crate::observe::Metrics>,
}

/// Messages the session should send now.
pub struct Outbox {
    pub messages: Vec<pb::agent_message::Msg>,
    /// More remains after these.
    pub more: bool,
}

/// How a job ended, as persisted in its spool (`outcome.json`).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum OutcomeRecord {
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

/// How a job's process is driven.
enum Drive {
    /// Create and start a new container.
    Run,
    /// Re-attach to the container a previous agent process started; skip the
    /// first `skip` bytes of its output (already spooled).
    Adopt { skip: u64 },
}

impl Runtime {
    pub fn new(executor: Arc<DockerExecutor>, spool: Spool, limits: RuntimeLimits) -> Arc<Runtime> {
        Self::with_check(executor, spool, limits, None)
    }

    /// A runtime that refuses leases `check` refuses.
    pub fn with_check(
        executor: Arc<DockerExecutor>,
        spool: Spool,
        limits: RuntimeLimits,
        check: Option<LeaseCheck>,
    ) -> Arc<Runtime> {
        Arc::new(Runtime {
            executor,
            check,
            limits,
            spool,
            jobs: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            gone: Notify::new(),
            draining: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            aws: std::sync::OnceLock::new(),
            iac: std::sync::OnceLock::new(),
            metrics: Arc::new(crate::observe::Metrics::default()),
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
        self.limits.capacity.saturating_sub(self.len() as u32)
    }

    /// Accepts a pushed lease and starts its job, or says why not.
    pub fn accept(self: &Arc<Self>, raw: pb::Lease) -> Result<(), String> {
        if self.is_draining() {
            return Err("agent is draining".into());
        }
        // The spooled copy (for re-adoption) carries no credential: the
        // web-identity token and secret values never touch the agent's disk.
        let mut for_disk = raw.clone();
        if let Some(spec) = for_disk.spec.as_mut() {
            if let Some(aws) = spec.aws.as_mut() {
                aws.web_identity_token.clear();
            }
            for secret in spec.secrets.iter_mut() {
                secret.value.clear();
            }
        }
        let encoded = for_disk.encode_to_vec();
        let lease = wire::lease_from_pb(raw)?;
        let key = lease.key.clone();
        {
            let jobs = self.jobs.lock();
            if jobs.contains_key(&key) {
                return Ok(());
            }
            if jobs.len() as u32 >= self.limits.capacity {
                return Err(format!("agent is at capacity ({})", self.limits.capacity));
            }
        }
        let spool = self
            .spool
            .create(&key, &encoded, lease.log_offset)
            .map_err(|e| format!("cannot create the job's log spool: {e}"))?;
        let refusal = self.check.as_ref().and_then(|check| check(&lease).err());
        if let Some(reason) = refusal {
            warn!(job = %key.job_id, epoch = key.epoch, reason = %reason, "job refused by local policy");
            let outcome = Outcome::Rejected {
                reason: format!("refused by the agent's policy: {reason}"),
            };
            let mut spool = spool;
            let rec = serde_json::to_vec(&OutcomeRecord::from(&outcome)).unwrap_or_default();
            if let Err(e) = spool.set_outcome(&rec) {
                warn!(error = %e, "could not persist the job's outcome");
            }
            self.metrics.job_finished(JobOutcome::Rejected);
            self.insert(
                &lease,
                lease.log_offset,
                BytesMut::new(),
                spool,
                Some(outcome),
            );
            self.wake.notify_one();
            return Ok(());
        }
        self.insert(&lease, lease.log_offset, BytesMut::new(), spool, None);
        // Granted just now: the container's own fence starts from here.
        self.executor.set_lease(
            &key,
            self.limits.container_lease(lease.ttl, SystemTime::now()),
        );
        self.spawn(lease, Drive::Run);
        Ok(())
    }

    fn insert(
        &self,
        lease: &Lease,
        acked: u64,
        buf: BytesMut,
        spool: JobSpool,
        outcome: Option<Outcome>,
    ) -> (CancellationToken, Arc<Notify>) {
        let cancel = CancellationToken::new();
        let space = Arc::new(Notify::new());
        self.jobs.lock().insert(
            lease.key.clone(),
            Entry {
                deadline: Instant::now() + self.limits.fence_after(lease.ttl),
                acked,
                sent: acked,
                buf,
                running: false,
                running_sent: false,
                outcome,
                final_sent: false,
                cancel: cancel.clone(),
                cancel_reason: None,
                revoked: false,
                space: space.clone(),
                spool: Arc::new(Mutex::new(Some(spool))),
                reports: Vec::new(),
            },
        );
        (cancel, space)
    }

    fn spawn(self: &Arc<Self>, lease: Lease, drive: Drive) {
        let rt = self.clone();
        let span = info_span!("job", job = %lease.key.job_id, epoch = lease.key.epoch);
        self.tracker.spawn(
            async move {
                let outcome = rt.run_job(&lease, drive).await;
                info!(outcome = ?outcome, "job ended");
                rt.finish(&lease.key, outcome);
            }
            .instrument(span),
        );
    }

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

    async fn run_job(self: &Arc<Self>, lease: &Lease, drive: Drive) -> Outcome {
        let Some((cancel, space, spool)) = self
            .jobs
            .lock()
            .get(&lease.key)
            .map(|e| (e.cancel.clone(), e.space.clone(), e.spool.clone()))
        else {
            return Outcome::Failed {
                reason: "job vanished before it started".into(),
            };
        };
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(64);
        let (started_tx, mut started_rx) = oneshot::channel();
        let exec = self.executor.clone();
        let key = lease.key.clone();
        let spec = lease.spec.clone();
        let job_cancel = cancel.clone();
        let aws = self.aws.get().cloned();
        let iac = self.iac.get().cloned();
        let task = lease.iac.clone();
        let run = tokio::spawn(
            async move {
                match drive {
                    Drive::Run if task.is_some() => {
                        let task = task.unwrap_or_default();
                        let outcome = crate::iac::run_job(
                            iac.as_ref(),
                            aws.as_ref(),
                            &exec,
                            &key,
                            &spec,
                            &task,
                            out_tx,
                            job_cancel,
                            started_tx,
                        )
                        .await;
                        (outcome, Vec::new())
                    }
                    Drive::Run => {
                        crate::aws::run_job(
                            aws.as_ref(),
                            &exec,
                            &key,
                            &spec,
                            out_tx,
                            job_cancel,
                            started_tx,
                        )
                        .await
                    }
                    Drive::Adopt { skip } => {
                        let _ = started_tx.send(());
                        let outcome = match &task {
                            Some(task) => {
                                crate::iac::adopt_job(
                                    iac.as_ref(),
                                    &exec,
                                    &key,
                                    &spec,
                                    task,
                                    skip,
                                    out_tx,
                                    job_cancel,
                                )
                                .await
                            }
                            None => exec.adopt(&key, &spec, skip, out_tx, job_cancel).await,
                        };
                        (outcome, Vec::new())
                    }
                }
            }
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
                    if let Err(reason) = self.push_output(key, data, &space, &spool).await {
                        warn!(reason = %reason, "stopping the job");
                        self.cancel_as(key, &reason);
                        // Keep draining the stream so the container can stop.
                        while out_rx.recv().await.is_some() {}
                        break;
                    }
                }
            }
        }
        let outcome = match run.await {
            Ok((outcome, uploaded)) => {
                if let Some(e) = self.jobs.lock().get_mut(key) {
                    e.reports = uploaded
                        .iter()
                        .map(|a| wire::artifact_to_pb(key, a))
                        .collect();
                }
                outcome
            }
            Err(e) => Outcome::Failed {
                reason: format!("executor task failed: {e}"),
            },
        };
        if let Some(s) = spool.lock().as_mut() {
            let rec = serde_json::to_vec(&OutcomeRecord::from(&outcome)).unwrap_or_default();
            if let Err(e) = s.set_outcome(&rec) {
                warn!(error = %e, "could not persist the job's outcome");
            }
        }
        outcome
    }

    /// Spools then buffers output, waiting while the unacknowledged buffer or
    /// the spool is full (backpressure on the container's stream; nothing is
    /// dropped). Fails only when the spool stayed full for too long.
    async fn push_output(
        &self,
        key: &LeaseKey,
        data: Bytes,
        space: &Notify,
        spool: &Mutex<Option<JobSpool>>,
    ) -> Result<(), String> {
        let mut full_since: Option<Instant> = None;
        loop {
            let waiter = space.notified();
            let ready = {
                let jobs = self.jobs.lock();
                let Some(e) = jobs.get(key) else {
                    return Ok(());
                };
                if e.revoked {
                    return Ok(());
                }
                e.buf.len() < self.limits.log_buffer
            };
            if ready {
                let r = match spool.lock().as_mut() {
                    Some(s) => s.append(&data),
                    None => return Ok(()),
                };
                match r {
                    Ok(()) => break,
                    Err(e) if e.is_full() => {
                        if full_since.is_none() {
                            warn!(error = %e, "log spool full; slowing the job's output down");
                        }
                        let since = *full_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.limits.spool_full_timeout {
                            return Err(format!(
                                "failed: {e}; the job's output waited {}s for space",
                                self.limits.spool_full_timeout.as_secs()
                            ));
                        }
                    }
                    Err(e) => return Err(format!("failed: cannot write the log spool: {e}")),
                }
            }
            tokio::select! {
                _ = waiter => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if let Some(e) = self.jobs.lock().get_mut(key) {
            e.buf.extend_from_slice(&data);
        }
        self.wake.notify_one();
        Ok(())
    }

    fn finish(&self, key: &LeaseKey, mut outcome: Outcome) {
        let mut jobs = self.jobs.lock();
        let Some(e) = jobs.get_mut(key) else { return };
        if e.revoked {
            if let Some(e) = jobs.remove(key) {
                drop(jobs);
                remove_spool(&e);
            }
            self.gone.notify_waiters();
            return;
        }
        if let (Outcome::Cancelled { .. }, Some(reason)) = (&outcome, &e.cancel_reason) {
            outcome = Outcome::Cancelled {
                reason: reason.clone(),
            };
        }
        if let (Outcome::Cancelled { .. }, Some(reason)) = (&outcome, &e.cancel_reason)
            && reason.starts_with("failed: ")
        {
            outcome = Outcome::Failed {
                reason: reason.trim_start_matches("failed: ").to_string(),
            };
        }
        let counted = match &outcome {
            Outcome::Exited {
                code: 0,
                oom_killed: false,
            } => JobOutcome::Succeeded,
            Outcome::Exited { .. } => JobOutcome::Failed,
            Outcome::Cancelled { .. } => JobOutcome::Cancelled,
            Outcome::TimedOut => JobOutcome::TimedOut,
            Outcome::Rejected { .. } => JobOutcome::Rejected,
            Outcome::Failed { .. } => {
                self.metrics.docker_error();
                JobOutcome::Error
            }
        };
        self.metrics.job_finished(counted);
        e.outcome = Some(outcome);
        drop(jobs);
        self.wake.notify_one();
    }

    /// Bytes in the log spool.
    pub fn spool_bytes(&self) -> u64 {
        self.spool.used()
    }

    fn cancel_as(&self, key: &LeaseKey, reason: &str) {
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
    fn extend_container_lease(&self, key: &LeaseKey, ttl: Duration) {
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

fn remove_spool(e: &Entry) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_starts_before_the_server_can_expire_the_lease() {
        let limits = RuntimeLimits {
            capacity: 1,
            log_buffer: 1 << 20,
            spool_full_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(10),
        };
        let ttl = Duration::from_secs(30);
        let f = limits.fence_after(ttl);
        assert!(f + limits.stop_grace < ttl, "{f:?}");
        assert_eq!(f, Duration::from_secs(18));
        // A grace longer than the TTL still leaves half the TTL.
        assert_eq!(
            limits.fence_after(Duration::from_secs(4)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn the_container_kills_strictly_before_the_lease_expires() {
        let limits = RuntimeLimits {
            capacity: 1,
            log_buffer: 1 << 20,
            spool_full_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(10),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |d: Duration| now + d;
        // TTL 30 s: the agent fences at 18 s, the init interrupts at 18.5 s
        // and kills at 28 s (the margin is 2 s).
        assert_eq!(
            limits.container_lease(Duration::from_secs(30), now),
            FenceLease::Until {
                stop_at: at(Duration::from_millis(18_500)),
                kill_at: at(Duration::from_secs(28)),
            }
        );
        // A grace longer than the TTL: the kill still comes before expiry.
        let FenceLease::Until { stop_at, kill_at } =
            limits.container_lease(Duration::from_secs(4), now)
        else {
            panic!("bounded lease expected");
        };
        assert_eq!(kill_at, at(Duration::from_millis(3_600)));
        assert!(stop_at <= kill_at && kill_at < at(Duration::from_secs(4)));
    }
}
