//! The live half of the control plane: which agents are connected, pushing
//! leases to them (no polling), expiring leases, and waking log followers.
//!
//! Dispatch is in memory: connected agents are grouped by their label set,
//! and each group keeps a FIFO of agents that may have a free slot. A pass
//! reads the queue once (FIFO) and, per job, looks at the groups whose
//! labels satisfy its selector and takes the first agent that really has a
//! free slot (counted from the store's in-memory lease table): O(jobs to
//! place), never a store trip per agent. The lease itself is written
//! durably before it is sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outpost_proto::agent::v1 as pb;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::model::Job;
use crate::store::{Expired, Store, StoreError};
use crate::wire;
use agents::{Agents, Conn};

/// One message to an agent's session stream. Boxed: a `ServerMessage` is
/// ~700 bytes inline (a lease's spec), and the channel's slots are
/// allocated 32 at a time per session whatever is sent, so inline messages
/// cost every connected agent ~23 KB that heartbeat acks keep resident.
pub type Outbound = Result<Box<pb::ServerMessage>, Status>;

/// Messages to one agent's session stream.
pub type AgentTx = mpsc::Sender<Outbound>;

/// Tasks pushed with the leases of a run's jobs (`crate::iac`): the hub
/// asks, so that it needs to know nothing about runs.
pub trait LeaseTasks: Send + Sync {
    /// The IaC tasks of those of `job_ids` that are phases of a run (asked
    /// once per dispatch pass, for every job it leased).
    fn tasks(
        &self,
        job_ids: Vec<String>,
    ) -> futures::future::BoxFuture<'_, HashMap<String, pb::IacTask>>;
}

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub heartbeat: Duration,
    pub sweep: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            sweep: Duration::from_millis(500),
        }
    }
}

/// Shared state of the control plane.
pub struct Hub {
    pub store: Store,
    pub timing: LeaseTiming,
    agents: Mutex<Agents>,
    /// The last dispatch pass left jobs it could not place.
    waiting: AtomicBool,
    next_session: AtomicU64,
    dispatch: Notify,
    changes: watch::Sender<u64>,
    /// Mints the per-lease web-identity tokens of AWS jobs.
    issuer: std::sync::OnceLock<Arc<crate::oidc::Issuer>>,
    /// IaC tasks of run jobs.
    lease_tasks: std::sync::OnceLock<Arc<dyn LeaseTasks>>,
    /// Pickup latency (`crate::metrics`).
    pub metrics: crate::metrics::HubMetrics,
    /// The channel to the other replicas, when there are any (`relay`).
    bus: std::sync::OnceLock<Arc<crate::replicas::Bus>>,
    /// A kick from this replica is pending (not one relayed from another).
    local_kick: AtomicBool,
}

impl Hub {
    pub fn new(store: Store, timing: LeaseTiming) -> Arc<Hub> {
        let (changes, _) = watch::channel(0);
        Arc::new(Hub {
            store,
            timing,
            agents: Mutex::new(Agents::default()),
            waiting: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
            dispatch: Notify::new(),
            changes,
            issuer: std::sync::OnceLock::new(),
            lease_tasks: std::sync::OnceLock::new(),
            metrics: crate::metrics::HubMetrics::default(),
            bus: std::sync::OnceLock::new(),
            local_kick: AtomicBool::new(false),
        })
    }

    /// Connected agents, and how many of them are draining.
    pub fn agent_counts(&self) -> (usize, usize) {
        let agents = self.agents.lock();
        let draining = agents.conns.values().filter(|c| c.draining).count();
        (agents.conns.len(), draining)
    }

    /// Sets the token issuer (once, at start).
    pub fn set_issuer(&self, issuer: Arc<crate::oidc::Issuer>) {
        let _ = self.issuer.set(issuer);
    }

    /// Sets where IaC tasks come from (once, at start).
    pub fn set_lease_tasks(&self, tasks: Arc<dyn LeaseTasks>) {
        let _ = self.lease_tasks.set(tasks);
    }

    /// The spec pushed with a lease: for an AWS job, with a web-identity
    /// token minted for this lease (never stored, never logged).
    fn lease_spec(&self, job: &Job, agent: &str) -> pb::JobSpec {
        let mut spec = wire::spec_to_pb(&job.spec);
        if let (Some(aws), Some(issuer)) = (spec.aws.as_mut(), self.issuer.get()) {
            let claims = crate::oidc::JobClaims {
                job_id: job.id.clone(),
                epoch: job.epoch,
                agent: agent.to_string(),
                labels: job.spec.selector.clone(),
            };
            let ttl = issuer
                .config()
                .ttl_for(Duration::from_millis(job.spec.timeout_ms));
            match issuer.mint(&claims, std::time::SystemTime::now(), ttl) {
                Ok(token) => aws.web_identity_token = token,
                Err(e) => {
                    warn!(job = %job.id, error = %e, "minting the job's web-identity token failed")
                }
            }
        }
        spec
    }

    /// Registers a connected agent, replacing an older session of the same
    /// agent. Returns the session number.
    pub fn connect(
        &self,
        id: &str,
        tx: AgentTx,
        labels: BTreeMap<String, String>,
        capacity: u32,
        draining: bool,
    ) -> u64 {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut agents = self.agents.lock();
        let old = agents.conns.insert(
            id.to_string(),
            Conn {
                session,
                tx,
                labels,
                capacity,
                draining,
                last_seen: std::time::Instant::now(),
            },
        );
        if let Some(old) = old
            && let Some(g) = agents.groups.get_mut(&old.labels)
        {
            g.queued.remove(id);
        }
        agents.ready(id);
        session
    }

    pub fn disconnect(&self, id: &str, session: u64) {
        let mut agents = self.agents.lock();
        if agents.conns.get(id).is_some_and(|c| c.session == session)
            && let Some(old) = agents.conns.remove(id)
            && let Some(g) = agents.groups.get_mut(&old.labels)
        {
            g.queued.remove(id);
            if g.queued.is_empty() {
                agents.groups.remove(&old.labels);
            }
        }
    }

    pub fn set_draining(&self, id: &str) {
        if let Some(c) = self.agents.lock().conns.get_mut(id) {
            c.draining = true;
        }
    }

    /// Records that the agent just said something.
    pub fn touch(&self, id: &str) {
        if let Some(c) = self.agents.lock().conns.get_mut(id) {
            c.last_seen = std::time::Instant::now();
        }
    }

    /// Agent `id` may have a free slot (it said so, or one of its leases
    /// ended): it becomes a candidate again, and if jobs are waiting the
    /// dispatcher looks at them.
    pub fn slot_free(&self, id: &str) {
        let added = self.agents.lock().ready(id);
        if added && self.waiting.load(Ordering::Relaxed) {
            self.kick();
        }
    }

    pub fn connected_count(&self) -> usize {
        self.agents.lock().conns.len()
    }

    /// Connected agents that could be given a job with `selector` now or
    /// once they have a free slot: not draining, heard from recently, every
    /// label of the selector among theirs.
    pub fn matching_agents(&self, selector: &BTreeMap<String, String>) -> u32 {
        let fresh = self.timing.heartbeat * 3;
        self.agents
            .lock()
            .conns
            .values()
            .filter(|c| {
                !c.draining
                    && c.capacity > 0
                    && c.last_seen.elapsed() < fresh
                    && selector.iter().all(|(k, v)| c.labels.get(k) == Some(v))
            })
            .count() as u32
    }

    /// Why a queued job has not been leased, for its final message.
    fn queue_timeout_reason(&self, job: &Job) -> String {
        let waited = show_ms(job.spec.queue_timeout_ms);
        let matching = self.matching_agents(&job.spec.selector);
        let why = if matching > 0 {
            format!("{matching} connected agent(s) match its labels, none had a free slot")
        } else if job.spec.selector.is_empty() {
            "no agent that takes jobs is connected".to_string()
        } else {
            format!(
                "no connected agent has the labels {}",
                labels_text(&job.spec.selector)
            )
        };
        format!("not leased within its queue timeout of {waited}: {why}")
    }

    /// Ends the queued jobs past their queue timeout.
    async fn expire_queued(self: &Arc<Self>) {
        let hub = self.clone();
        match self
            .store
            .expire_queued(move |job| hub.queue_timeout_reason(job))
            .await
        {
            Ok(gone) if !gone.is_empty() => {
                for j in &gone {
                    info!(job = %j.id, reason = %j.message, "queue timeout; job ended");
                }
                self.changed();
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "queue timeout sweep failed"),
        }
    }

    pub fn is_connected(&self, id: &str) -> bool {
        self.agents.lock().conns.contains_key(id)
    }

    /// Sends a message to an agent if it is connected.
    pub fn send(&self, id: &str, msg: pb::server_message::Msg) -> bool {
        let tx = self.agents.lock().conns.get(id).map(|c| c.tx.clone());
        match tx {
            Some(tx) => tx
                .try_send(Ok(Box::new(pb::ServerMessage { msg: Some(msg) })))
                .is_ok(),
            None => false,
        }
    }

    /// Asks the dispatcher to look at the queue (and, if that pass leaves
    /// jobs it cannot place, the other replicas too).
    pub fn kick(&self) {
        self.local_kick.store(true, Ordering::Release);
        self.dispatch.notify_one();
    }

    /// Tells log followers and waiters, here and on the other replicas,
    /// that something changed.
    pub fn changed(&self) {
        self.changed_here();
        self.publish(crate::replicas::Signal::Changed);
    }

    /// Tells this replica's log followers and waiters only.
    fn changed_here(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Spawns the dispatcher and the lease sweeper; both stop on `shutdown`.
    pub fn spawn_tasks(self: &Arc<Self>, shutdown: CancellationToken) {
        let hub = self.clone();
        let sd = shutdown.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = sd.cancelled() => break,
                        _ = hub.dispatch.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                    let local = hub.local_kick.swap(false, Ordering::AcqRel);
                    if let Err(e) = hub.dispatch_once().await {
                        warn!(error = %e, "dispatch failed");
                    }
                    // Jobs no agent here can take may suit another
                    // replica's; only a pass this replica asked for says so
                    // (a relayed kick never bounces back and forth).
                    if local && hub.waiting.load(Ordering::Relaxed) {
                        hub.publish(crate::replicas::Signal::Kick);
                    }
                }
                debug!("dispatcher stopped");
            }
            .instrument(info_span!("dispatcher")),
        );
        let hub = self.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(hub.timing.sweep) => {}
                    }
                    hub.expire_leases().await;
                    hub.expire_queued().await;
                }
                debug!("lease sweeper stopped");
            }
            .instrument(info_span!("lease_sweeper")),
        );
    }

    /// Ends the leases past their deadline (re-queued, or cancelled if a
    /// cancel was pending); each holder's slot is free from then on.
    async fn expire_leases(&self) {
        match self.store.expire_leases().await {
            Ok(expired) if !expired.is_empty() => {
                for e in &expired {
                    let agent = match e {
                        Expired::Requeued { job, agent } => {
                            info!(job = %job.id, epoch = job.epoch, agent = %agent, "lease expired; job re-queued");
                            agent
                        }
                        Expired::Cancelled { job, agent } => {
                            info!(job = %job.id, agent = %agent, "lease expired on a cancelled job");
                            agent
                        }
                    };
                    // The slot it held is free: an agent still here is
                    // offered work now, not at its next heartbeat.
                    self.slot_free(agent);
                }
                self.changed();
                self.kick();
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "lease sweep failed"),
        }
    }

    /// Matches queued jobs (FIFO) to connected agents with free slots whose
    /// labels satisfy the job's selector, and pushes the leases. The
    /// matching is in memory; the whole pass's leases are then written in
    /// one transaction (one commit) and their IaC tasks read in one call,
    /// so a pass costs the same few store calls for one job or a hundred.
    async fn dispatch_once(&self) -> Result<(), StoreError> {
        let queued = self.store.queued_jobs(1000).await?;
        let mut unplaced = false;
        let mut quiet = Vec::new();
        let fresh = self.timing.heartbeat * 3;
        // (job, agent) matched in this pass, and the slots they take (the
        // store counts them only once they are written).
        let mut placed: Vec<(String, String)> = Vec::new();
        let mut taken: HashMap<String, u32> = HashMap::new();
        for job in queued {
            // Jobs accepted before the size limits existed may not fit in a
            // lease: they end now instead of breaking agents' sessions.
            let size = prost::Message::encoded_len(&wire::spec_to_pb(&job.spec));
            if size > outpost_proto::MAX_SPEC_BYTES {
                let reason = format!(
                    "the job spec is {size} bytes encoded, above the {} bytes a lease may carry",
                    outpost_proto::MAX_SPEC_BYTES
                );
                warn!(job = %job.id, size, "job too large to lease; failing it");
                self.store.fail_queued(job.id.clone(), reason).await?;
                self.changed();
                continue;
            }
            let pick = self.agents.lock().pick(
                &job.spec.selector,
                fresh,
                |a| self.store.held_count(a) + taken.get(a).copied().unwrap_or(0),
                &mut quiet,
            );
            let Some(agent) = pick else {
                unplaced = true;
                continue;
            };
            *taken.entry(agent.clone()).or_insert(0) += 1;
            placed.push((job.id, agent));
        }
        let result = self.lease_placed(placed, &mut unplaced).await;
        let mut agents = self.agents.lock();
        for id in quiet {
            agents.ready(&id);
        }
        self.waiting.store(unplaced, Ordering::Relaxed);
        result
    }

    /// Writes the leases of one pass, then pushes each to its agent.
    async fn lease_placed(
        &self,
        placed: Vec<(String, String)>,
        unplaced: &mut bool,
    ) -> Result<(), StoreError> {
        if placed.is_empty() {
            return Ok(());
        }
        let ttl_ms = self.timing.ttl.as_millis() as u64;
        let leased = match self.store.lease_jobs(placed.clone(), ttl_ms).await {
            Ok(l) => l,
            Err(e) => {
                let mut agents = self.agents.lock();
                for (_, agent) in &placed {
                    agents.ready(agent);
                }
                *unplaced = true;
                return Err(e);
            }
        };
        let ids: Vec<String> = leased.iter().flatten().map(|j| j.id.clone()).collect();
        let mut tasks = match self.lease_tasks.get() {
            Some(t) if !ids.is_empty() => t.tasks(ids).await,
            _ => HashMap::new(),
        };
        for ((_, agent), leased) in placed.into_iter().zip(leased) {
            let Some(leased) = leased else {
                // Taken or cancelled meanwhile: the slot is still free.
                self.agents.lock().ready(&agent);
                continue;
            };
            let lease = pb::Lease {
                iac: tasks.remove(&leased.id),
                lease_id: format!("{}-{}", leased.id, leased.epoch),
                job_id: leased.id.clone(),
                epoch: leased.epoch,
                ttl_ms,
                spec: Some(self.lease_spec(&leased, &agent)),
                log_offset: leased.log_acked,
            };
            if self.send(&agent, pb::server_message::Msg::Lease(lease)) {
                info!(job = %leased.id, epoch = leased.epoch, agent = %agent, "lease pushed");
                if leased.epoch == 1 {
                    let waited = crate::model::now_ms().saturating_sub(leased.created_ms);
                    self.metrics
                        .pickup
                        .observe(Duration::from_millis(waited.max(0) as u64));
                }
            } else {
                warn!(job = %leased.id, agent = %agent, "agent went away; re-queueing");
                self.store
                    .requeue(leased.id.clone(), leased.epoch, agent.clone())
                    .await?;
                *unplaced = true;
            }
        }
        self.changed();
        Ok(())
    }
}

/// `k=v,k=v`
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `90s`, `5m`, `1h30m`, `1500ms`
fn show_ms(ms: u64) -> String {
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, 0) => format!("{h}h{m}m"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

/// The connected agents and the dispatch index.
mod agents;
/// Signals to and from the other replicas.
mod relay;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::JobSpec;

    const HEARTBEAT: Duration = Duration::from_secs(1);

    fn hub() -> (tempfile::TempDir, Arc<Hub>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("outpost.db")).expect("store");
        let hub = Hub::new(
            store,
            LeaseTiming {
                ttl: Duration::from_secs(30),
                heartbeat: HEARTBEAT,
                sweep: Duration::from_secs(1),
            },
        );
        (dir, hub)
    }

    /// Connects agent `id` with capacity 4; returns its message stream.
    fn connect(hub: &Hub, id: &str) -> mpsc::Receiver<Outbound> {
        let (tx, rx) = mpsc::channel(16);
        hub.connect(id, tx, BTreeMap::new(), 4, false);
        rx
    }

    /// Pretends the agent last spoke `ago` before now.
    fn silent_for(hub: &Hub, id: &str, ago: Duration) {
        let mut agents = hub.agents.lock();
        let conn = agents.conns.get_mut(id).expect("connected");
        conn.last_seen = std::time::Instant::now()
            .checked_sub(ago)
            .expect("clock far enough from boot");
    }

    async fn submit(hub: &Hub, id: &str) {
        let spec = JobSpec {
            image: "img".into(),
            ..Default::default()
        };
        hub.store
            .insert_job(id.to_string(), spec)
            .await
            .expect("insert");
    }

    fn leases(rx: &mut mpsc::Receiver<Outbound>) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Ok(m) = m
                && let pb::ServerMessage {
                    msg: Some(pb::server_message::Msg::Lease(l)),
                } = *m
            {
                out.push((l.job_id, l.epoch));
            }
        }
        out
    }

    #[tokio::test]
    async fn an_agent_silent_for_three_heartbeats_gets_no_new_lease() {
        let (_dir, hub) = hub();
        let mut rx = connect(&hub, "quiet");
        submit(&hub, "job-1").await;
        // Silent for just under three heartbeats: still a candidate.
        silent_for(&hub, "quiet", HEARTBEAT * 3 - Duration::from_millis(500));
        hub.dispatch_once().await.expect("dispatch");
        assert_eq!(leases(&mut rx), [("job-1".to_string(), 1)]);

        // Silent for three heartbeats: the job stays queued, never leased.
        submit(&hub, "job-2").await;
        silent_for(&hub, "quiet", HEARTBEAT * 3);
        hub.dispatch_once().await.expect("dispatch");
        assert!(leases(&mut rx).is_empty());
        let j = hub
            .store
            .get_job("job-2".into())
            .await
            .expect("get")
            .expect("job");
        assert_eq!(j.state, crate::model::JobState::Queued);
        assert_eq!(j.epoch, 0, "never leased");

        // Another agent that talks gets it instead.
        let mut other = connect(&hub, "talkative");
        hub.dispatch_once().await.expect("dispatch");
        assert_eq!(leases(&mut other), [("job-2".to_string(), 1)]);
        assert!(leases(&mut rx).is_empty());

        // Once the quiet agent speaks again, it is a candidate again.
        submit(&hub, "job-3").await;
        hub.touch("quiet");
        silent_for(&hub, "talkative", HEARTBEAT * 10);
        hub.dispatch_once().await.expect("dispatch");
        assert_eq!(leases(&mut rx), [("job-3".to_string(), 1)]);
        assert!(leases(&mut other).is_empty());
    }

    #[tokio::test]
    async fn a_draining_agent_gets_no_new_lease() {
        let (_dir, hub) = hub();
        let mut rx = connect(&hub, "a");
        hub.set_draining("a");
        submit(&hub, "job-1").await;
        hub.dispatch_once().await.expect("dispatch");
        assert!(leases(&mut rx).is_empty());
        let j = hub
            .store
            .get_job("job-1".into())
            .await
            .expect("get")
            .expect("job");
        assert_eq!(j.epoch, 0, "never leased");
    }

    #[tokio::test]
    async fn dispatch_matches_label_sets_and_counts_free_slots_in_memory() {
        let (_dir, hub) = hub();
        let gpu: BTreeMap<String, String> = [("gpu".to_string(), "yes".to_string())].into();
        let (tx, mut rx_gpu) = mpsc::channel(16);
        hub.connect("gpu", tx, gpu.clone(), 1, false);
        let (tx, mut rx_cpu) = mpsc::channel(16);
        hub.connect(
            "cpu",
            tx,
            [("zone".to_string(), "x".to_string())].into(),
            2,
            false,
        );
        for id in ["g1", "g2"] {
            let spec = JobSpec {
                image: "img".into(),
                selector: gpu.clone(),
                ..Default::default()
            };
            hub.store.insert_job(id.into(), spec).await.expect("insert");
        }
        submit(&hub, "any").await;
        hub.dispatch_once().await.expect("dispatch");
        // One slot on the gpu agent: g2 waits; the other agent takes the job
        // without a selector.
        assert_eq!(leases(&mut rx_gpu), [("g1".to_string(), 1)]);
        assert_eq!(leases(&mut rx_cpu), [("any".to_string(), 1)]);
        assert!(hub.waiting.load(Ordering::Relaxed));
        hub.dispatch_once().await.expect("dispatch");
        assert!(leases(&mut rx_gpu).is_empty(), "no free slot");
        // g1 ends: the slot is free again and g2 goes there, FIFO.
        let done = crate::model::StatusReport {
            state: crate::model::JobState::Succeeded,
            exit_code: Some(0),
            message: String::new(),
            log_total: 0,
            oom_killed: false,
        };
        hub.store
            .report("g1".into(), 1, "gpu".into(), done)
            .await
            .expect("report");
        hub.slot_free("gpu");
        hub.dispatch_once().await.expect("dispatch");
        assert_eq!(leases(&mut rx_gpu), [("g2".to_string(), 1)]);
        assert!(leases(&mut rx_cpu).is_empty());
        assert!(!hub.waiting.load(Ordering::Relaxed));
        // A disconnected agent is never picked, even if it was a candidate.
        hub.disconnect("cpu", 2);
        submit(&hub, "after").await;
        hub.dispatch_once().await.expect("dispatch");
        assert!(leases(&mut rx_cpu).is_empty());
    }

    #[tokio::test]
    async fn an_expired_lease_frees_its_agents_slot_without_a_heartbeat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("outpost.db")).expect("store");
        let hub = Hub::new(
            store,
            LeaseTiming {
                ttl: Duration::from_millis(50),
                heartbeat: Duration::from_secs(60),
                sweep: Duration::from_secs(1),
            },
        );
        let (tx, mut rx) = mpsc::channel(16);
        hub.connect("a", tx, BTreeMap::new(), 1, false);
        submit(&hub, "job-1").await;
        submit(&hub, "job-2").await;
        hub.dispatch_once().await.expect("dispatch");
        assert_eq!(leases(&mut rx), [("job-1".to_string(), 1)]);
        hub.dispatch_once().await.expect("dispatch");
        assert!(leases(&mut rx).is_empty(), "its one slot is taken");

        // The agent never renews: once the lease expired, the same agent is
        // a candidate again at once (no heartbeat in between), and job-1,
        // re-queued ahead of job-2, goes out with the next epoch.
        tokio::time::sleep(Duration::from_millis(100)).await;
        hub.expire_leases().await;
        hub.dispatch_once().await.expect("dispatch");
        assert_eq!(leases(&mut rx), [("job-1".to_string(), 2)]);
    }

    #[tokio::test]
    async fn one_pass_leases_every_job_it_can_place_and_fills_each_agent() {
        let (_dir, hub) = hub();
        let mut a = connect(&hub, "a");
        let mut b = connect(&hub, "b");
        for i in 0..10 {
            submit(&hub, &format!("job-{i:02}")).await;
        }
        hub.dispatch_once().await.expect("dispatch");
        let (la, lb) = (leases(&mut a), leases(&mut b));
        // Four slots each: eight jobs leased in one pass, oldest first.
        assert_eq!((la.len(), lb.len()), (4, 4), "{la:?} {lb:?}");
        let mut all: Vec<String> = la.into_iter().chain(lb).map(|(id, _)| id).collect();
        all.sort();
        let first: Vec<String> = (0..8).map(|i| format!("job-{i:02}")).collect();
        assert_eq!(all, first);
        assert_eq!(hub.store.held_count("a"), 4);
        assert_eq!(hub.store.held_count("b"), 4);
        assert!(hub.waiting.load(Ordering::Relaxed), "two jobs wait");
    }

    #[test]
    fn queue_timeouts_read_like_the_flag() {
        assert_eq!(show_ms(8_000), "8s");
        assert_eq!(show_ms(300_000), "5m");
        assert_eq!(show_ms(5_400_000), "1h30m");
        assert_eq!(show_ms(1_500), "1500ms");
        assert_eq!(show_ms(3_661_000), "1h1m1s");
    }
}
