//! The run engine: syncs sources, queues runs, starts a stack's next run
//! when its lock is free, turns job outcomes and plan reports into run
//! states, and records decisions (approve, reject, discard, cancel).
//!
//! Here: the engine, its loop and one step of every open run ([`Engine::tick`]).
//! By concern: `stacks` (declaring, fetching, polling, queueing),
//! `planning` (the plan phase), `decide` (human decisions), `notify`
//! (run events for webhooks). The apply phase is `super::apply`, proposed
//! runs and plan jobs `super::launch`, drift runs `super::drift`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use outpost_proto::agent::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::IacError;
use super::blobs::Blobs;
use super::model::{RunKind, RunState};
use super::secrets::Sealer;
use super::store::IacStore;
use crate::hub::{Hub, LeaseTasks};
use crate::notify::Notifier;

mod decide;
mod notify;
mod planning;
mod stacks;

/// Longest a run's plan job may take.
pub(crate) const PLAN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where the key that seals stack and webhook secrets is kept.
pub fn secrets_key_file(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("iac").join("secrets.key")
}

/// The IaC engine; shared by the API and the background tasks.
pub struct Engine {
    pub store: IacStore,
    pub hub: Arc<Hub>,
    pub blobs: Blobs,
    pub(crate) git_dir: PathBuf,
    /// One git fetch at a time (mirrors are per stack; this keeps it simple).
    pub(crate) fetching: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
    /// Seals stack secrets and webhook secrets at rest.
    pub(crate) sealer: Arc<Sealer>,
    /// Webhook notifications of run and drift events.
    pub notifier: Arc<Notifier>,
}

impl Engine {
    /// Opens the IaC tables and registers the lease tasks with the hub.
    /// Blobs go to `blobs` when given, else where the store puts them
    /// ([`Blobs::for_store`]); secrets are sealed with `sealer` (the key
    /// in [`secrets_key_file`]).
    pub async fn start(
        hub: Arc<Hub>,
        data_dir: &std::path::Path,
        blobs: Option<Blobs>,
        sealer: Arc<Sealer>,
    ) -> Result<Arc<Engine>, IacError> {
        let store = IacStore::open(hub.store.clone()).await?;
        store.open_state().await?;
        let notifier =
            Notifier::open(hub.store.clone(), sealer.clone(), hub.metrics.iac.clone()).await?;
        let engine = Arc::new(Engine {
            store,
            hub: hub.clone(),
            blobs: blobs.unwrap_or_else(|| {
                Blobs::for_store(&hub.store, data_dir.join("iac").join("blobs"))
            }),
            git_dir: data_dir.join("iac").join("git"),
            fetching: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            sealer,
            notifier,
        });
        hub.set_lease_tasks(engine.clone());
        Ok(engine)
    }

    /// Spawns the engine loop, the source poller and drift scheduler, and
    /// the notifier; all stop on `shutdown`. The engine loop, the poller
    /// and the scheduler do their work only while `leader` says this
    /// replica leads (always, on the embedded store).
    pub fn spawn(
        self: &Arc<Self>,
        leader: crate::replicas::Leadership,
        shutdown: CancellationToken,
    ) {
        self.notifier.spawn(shutdown.clone());
        let me = self.clone();
        let sd = shutdown.clone();
        let mut lead = leader.clone();
        tokio::spawn(
            async move {
                let mut changes = me.hub.subscribe();
                loop {
                    tokio::select! {
                        _ = sd.cancelled() => break,
                        _ = changes.changed() => {}
                        _ = me.wake.notified() => {}
                        _ = lead.changed() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    if !lead.is_leader() {
                        continue;
                    }
                    if let Err(e) = me.tick().await {
                        warn!(error = %e, "run engine step failed");
                    }
                }
            }
            .instrument(info_span!("run_engine")),
        );
        let me = self.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    if !leader.is_leader() {
                        continue;
                    }
                    if let Err(e) = me.poll_due().await {
                        warn!(error = %e, "source polling failed");
                    }
                    if let Err(e) = me.drift_due().await {
                        warn!(error = %e, "drift scheduling failed");
                    }
                }
            }
            .instrument(info_span!("source_poller")),
        );
    }

    pub(crate) fn kick(&self) {
        self.wake.notify_one();
        self.hub.changed();
    }

    /// One step of every open run.
    pub async fn tick(&self) -> Result<(), IacError> {
        let open = self.store.open_runs().await?;
        let mut stacks_with_queued = std::collections::BTreeSet::new();
        for run in &open {
            match (run.state, run.kind) {
                (RunState::Queued, RunKind::Tracked) => {
                    stacks_with_queued.insert(run.stack.clone());
                }
                (RunState::Queued, RunKind::Proposed) => self.start_proposed(run).await?,
                (RunState::Queued, RunKind::Drift) => self.start_drift(run).await?,
                (RunState::Planning, RunKind::Drift) => self.finish_drift(run).await?,
                (RunState::Planning, _) => self.advance_planning(run).await?,
                (RunState::Confirmed, _) => self.start_apply(run).await?,
                (RunState::Applying, _) => self.advance_applying(run).await?,
                _ => {}
            }
        }
        for stack in stacks_with_queued {
            self.start_next(&stack).await?;
        }
        Ok(())
    }
}

impl LeaseTasks for Engine {
    fn tasks(
        &self,
        job_ids: Vec<String>,
    ) -> BoxFuture<'_, std::collections::HashMap<String, pb::IacTask>> {
        async move {
            match self.lease_tasks(job_ids.clone()).await {
                Ok(tasks) => tasks
                    .into_iter()
                    .map(|(id, t)| (id, super::wire::task_to_pb(&t)))
                    .collect(),
                Err(e) => {
                    warn!(jobs = ?job_ids, error = %e, "reading the run tasks failed");
                    Default::default()
                }
            }
        }
        .boxed()
    }
}
