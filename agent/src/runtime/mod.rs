//! The agent's table of jobs: each accepted lease, its unacknowledged log
//! bytes, and what still has to be told to the control plane.
//!
//! **Invariant:** output is written to the job's disk spool (`spool.rs`)
//! before it can be sent; log bytes leave memory and the spool only when the
//! control plane acknowledged them (`LogAck`); a job leaves the table (and
//! its spool is deleted) only when its final status was acknowledged
//! (`StatusAck`) or its lease was revoked. So neither a disconnect nor an agent
//! restart loses a byte: the next session resends from the acknowledged offset.
//!
//! `mod.rs` the table and accepting a lease; `limits.rs` the fence and the
//! container's deadlines; `run.rs` driving a job and its output to its
//! final status; `restore.rs` the jobs found after a restart; `control.rs`
//! what the session does to held leases (cancel, revoke, renew, acks, the
//! outbox).

mod control;
mod limits;
mod restore;
mod run;

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

use crate::executor::DockerExecutor;
use crate::job::{Lease, LeaseKey, Outcome};
use crate::observe::JobOutcome;
use crate::spool::{JobSpool, Recovered, Spool};
use crate::wire;

use control::remove_spool;
pub use limits::{MAX_CHUNK, RuntimeLimits};
use restore::OutcomeRecord;

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

/// How a job's process is driven.
pub(super) enum Drive {
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
        let mut steps = crate::observe::Steps::new("lease accept");
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
        steps.done("spool created");
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
        steps.done("job spawned");
        Ok(())
    }

    pub(super) fn insert(
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

    pub(super) fn spawn(self: &Arc<Self>, lease: Lease, drive: Drive) {
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
}
