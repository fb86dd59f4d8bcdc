//! The run engine: syncs sources, queues runs, starts a stack's next run
//! when its lock is free, turns job outcomes and plan reports into run
//! states, and records decisions (approve, reject, discard, cancel).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use outpost_proto::agent::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::IacError;
use super::blobs::Blobs;
use super::model::{Approval, PlanResult, Run, RunKind, RunState, Stack, StackSpec};
use super::secrets::Sealer;
use super::store::IacStore;
use crate::hub::{Hub, LeaseTasks};
use crate::model::{JobState, now_ms};
use crate::notify::{Event, Notifier};
use crate::store::CancelOutcome;

/// Longest a run's plan job may take.
pub(crate) const PLAN_TIMEOUT: Duration = Duration::from_secs(3600);

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
    pub async fn start(hub: Arc<Hub>, data_dir: &std::path::Path) -> Result<Arc<Engine>, IacError> {
        let store = IacStore::open(hub.store.clone()).await?;
        store.open_state().await?;
        let key = data_dir.join("iac").join("secrets.key");
        let sealer = tokio::task::spawn_blocking(move || Sealer::load_or_create(&key))
            .await
            .map_err(|_| IacError::Join)?
            .map_err(|e| IacError::BadRequest(e.to_string()))?;
        let sealer = Arc::new(sealer);
        let notifier =
            Notifier::open(hub.store.clone(), sealer.clone(), hub.metrics.iac.clone()).await?;
        let engine = Arc::new(Engine {
            store,
            hub: hub.clone(),
            blobs: Blobs::new(data_dir.join("iac").join("blobs")),
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
    /// the notifier; all stop on `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        self.notifier.spawn(shutdown.clone());
        let me = self.clone();
        let sd = shutdown.clone();
        tokio::spawn(
            async move {
                let mut changes = me.hub.subscribe();
                loop {
                    tokio::select! {
                        _ = sd.cancelled() => break,
                        _ = changes.changed() => {}
                        _ = me.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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

    /// Declares stacks (validated, Rego compiled); returns (name, action).
    pub async fn apply_stacks(
        &self,
        specs: Vec<StackSpec>,
    ) -> Result<Vec<(String, &'static str)>, IacError> {
        let mut checked = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for spec in specs {
            let spec = spec.normalized().map_err(IacError::BadRequest)?;
            let old = self.store.get_stack(spec.name.clone()).await?;
            let spec = self.seal(spec, old.as_ref().map(|o| &o.spec))?;
            if !names.insert(spec.name.clone()) {
                return Err(IacError::BadRequest(format!(
                    "stack {} is declared twice",
                    spec.name
                )));
            }
            if !spec.plan_policy.is_empty() {
                outpost_agent::iac::policy::PlanPolicy::compile(
                    &format!("{}.rego", spec.name),
                    &spec.plan_policy,
                )
                .map_err(|e| {
                    IacError::BadRequest(format!("stack {}: plan_policy: {e}", spec.name))
                })?;
            }
            checked.push(spec);
        }
        let mut out = Vec::new();
        for spec in checked {
            let now = now_ms();
            let name = spec.name.clone();
            let action = self
                .store
                .put_stack(Stack {
                    spec,
                    commit: None,
                    source_digest: None,
                    fetch_error: None,
                    fetched_ms: 0,
                    created_ms: now,
                    updated_ms: now,
                })
                .await?;
            info!(stack = %name, action, "stack declared");
            out.push((name, action));
        }
        self.kick();
        Ok(out)
    }

    pub async fn stack(&self, name: &str) -> Result<Stack, IacError> {
        self.store
            .get_stack(name.to_string())
            .await?
            .ok_or_else(|| IacError::NotFound(format!("stack {name}")))
    }

    /// Fetches the stack's branch; a new commit queues a tracked run
    /// triggered by `who`. A fetch error is kept on the stack (and returned).
    pub async fn sync(&self, name: &str, who: &str) -> Result<(Stack, Option<Run>), IacError> {
        let _one = self.fetching.lock().await;
        let mut stack = self.stack(name).await?;
        let spec = &stack.spec;
        let mirror = self.git_dir.join(&spec.name);
        let fetched =
            super::source::fetch(&mirror, &spec.repo, &spec.branch, &spec.project_root).await;
        stack.fetched_ms = now_ms();
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => {
                warn!(stack = %name, error = %e, "source fetch failed");
                stack.fetch_error = Some(e.to_string());
                self.store.save_stack(stack).await?;
                self.hub.changed();
                return Err(e);
            }
        };
        let digest = self.blobs.put(fetched.tarball).await?;
        stack.fetch_error = None;
        let new = stack.commit.as_deref() != Some(fetched.commit.as_str())
            || stack.source_digest.as_deref() != Some(digest.as_str());
        stack.commit = Some(fetched.commit.clone());
        stack.source_digest = Some(digest.clone());
        self.store.save_stack(stack.clone()).await?;
        let run = if new {
            info!(stack = %name, commit = %fetched.commit, digest = %digest, "new commit");
            Some(self.queue(&stack, who, "new commit").await?)
        } else {
            None
        };
        self.kick();
        Ok((stack, run))
    }

    /// Queues a tracked run of the stack's current commit (fetching first if
    /// the stack has never been fetched).
    pub async fn trigger(&self, name: &str, who: &str) -> Result<Run, IacError> {
        let stack = self.stack(name).await?;
        if stack.commit.is_none() {
            let (stack, run) = self.sync(name, who).await?;
            if let Some(run) = run {
                return Ok(run);
            }
            return self.queue(&stack, who, "triggered").await;
        }
        let run = self.queue(&stack, who, "triggered").await?;
        self.kick();
        Ok(run)
    }

    async fn queue(&self, stack: &Stack, who: &str, why: &str) -> Result<Run, IacError> {
        let (Some(commit), Some(digest)) = (&stack.commit, &stack.source_digest) else {
            return Err(IacError::Conflict(format!(
                "stack {} has no fetched source",
                stack.spec.name
            )));
        };
        let run =
            super::launch::new_run(&stack.spec.name, RunKind::Tracked, commit, digest, who, why);
        self.insert_run(run).await
    }

    /// Polls the sources whose interval is due.
    async fn poll_due(&self) -> Result<(), IacError> {
        let now = now_ms();
        for s in self.store.list_stacks().await? {
            let every = s.spec.poll_interval_ms as i64;
            if every > 0 && now - s.fetched_ms >= every {
                // A failed fetch is recorded on the stack.
                let _ = self.sync(&s.spec.name, "poll").await;
            }
        }
        Ok(())
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

    async fn start_next(&self, name: &str) -> Result<(), IacError> {
        let Some(stack) = self.store.get_stack(name.to_string()).await? else {
            return Ok(());
        };
        let job = self.plan_job(&stack, false)?;
        let job_id = uuid::Uuid::now_v7().to_string();
        let spec = stack.spec.clone();
        let started = self
            .store
            .start_next(name.to_string(), job_id.clone(), move |run| {
                Engine::plan_task(&spec, run, "plan")
            })
            .await?;
        let Some((run, _task)) = started else {
            return Ok(());
        };
        self.hub.store.insert_job(job_id.clone(), job).await?;
        info!(run = %run.id, job = %job_id, "plan queued");
        self.hub.kick();
        self.hub.changed();
        Ok(())
    }

    async fn advance_planning(&self, run: &Run) -> Result<(), IacError> {
        let Some(job_id) = &run.plan_job else {
            return Ok(());
        };
        let job = self.hub.store.get_job(job_id.clone()).await?;
        let (to, note) = match job {
            None => (RunState::Failed, "the plan job is missing".to_string()),
            Some(j) if !j.state.is_final() => return Ok(()),
            Some(j) if j.state == JobState::Succeeded => match &run.plan {
                None => (
                    RunState::Failed,
                    "the agent finished the plan without reporting it".to_string(),
                ),
                Some(p) if !p.has_changes => (RunState::Finished, "no changes".to_string()),
                Some(p) if run.kind == RunKind::Proposed => (
                    RunState::Finished,
                    format!("proposed: plan only, {} change(s)", p.changes.len()),
                ),
                Some(p) => {
                    let stack = self.store.get_stack(run.stack.clone()).await?;
                    let auto = stack.is_some_and(|s| s.spec.autodeploy);
                    if auto && !p.warned() {
                        (RunState::Confirmed, "autodeploy".to_string())
                    } else if auto {
                        (
                            RunState::Unconfirmed,
                            "a policy warned: autodeploy waits for approval".to_string(),
                        )
                    } else {
                        (RunState::Unconfirmed, String::new())
                    }
                }
            },
            Some(j) if j.state == JobState::Cancelled => (RunState::Cancelled, j.message),
            Some(j) => (
                RunState::Failed,
                format!("plan {}: {}", j.state.as_str(), j.message),
            ),
        };
        let job_id = job_id.clone();
        let run = self
            .store
            .update_run(run.id.clone(), move |r| {
                if r.state != RunState::Planning || r.plan_job.as_deref() != Some(job_id.as_str()) {
                    return Ok(());
                }
                r.go(to, note).map_err(IacError::Conflict)
            })
            .await?;
        info!(run = %run.id, state = run.state.as_str(), message = %run.message, "run planned");
        self.notify_run(&run).await;
        self.kick();
        Ok(())
    }

    /// Records the plan report of `agent`'s current lease of `job_id`.
    pub async fn report_plan(
        &self,
        agent: &str,
        job_id: &str,
        epoch: u64,
        result: PlanResult,
    ) -> Result<(), IacError> {
        self.hub
            .store
            .current_lease(job_id.to_string(), epoch, agent.to_string())
            .await?;
        let task = self
            .store
            .task_of(job_id.to_string())
            .await?
            .ok_or_else(|| IacError::Refused(format!("job {job_id} is not a run's job")))?;
        if task.phase != "plan" && task.phase != "drift" {
            return Err(IacError::Refused(format!("job {job_id} is not a plan")));
        }
        let job_id = job_id.to_string();
        self.store
            .update_run(task.run_id, move |r| {
                if r.state != RunState::Planning || r.plan_job.as_deref() != Some(job_id.as_str()) {
                    return Err(IacError::Refused(format!(
                        "run {} is {}, not planning with job {job_id}",
                        r.id,
                        r.state.as_str()
                    )));
                }
                r.plan = Some(result);
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Tells the stack's and the global targets about a tracked run that
    /// needs approval, finished or failed (never blocks, never fails).
    pub(crate) async fn notify_run(&self, run: &Run) {
        if run.kind != RunKind::Tracked {
            return;
        }
        let event = match run.state {
            RunState::Unconfirmed => "run.needs_approval",
            RunState::Finished => "run.finished",
            RunState::Failed => "run.failed",
            _ => return,
        };
        let targets = match self.store.get_stack(run.stack.clone()).await {
            Ok(Some(s)) => s.spec.notify,
            _ => Vec::new(),
        };
        let mut ev = Event::new(event, &run.stack, &run.id);
        ev.from = run
            .transitions
            .iter()
            .rev()
            .nth(1)
            .map(|t| t.state.as_str().to_string())
            .unwrap_or_default();
        ev.to = run.state.as_str().to_string();
        let changes = run
            .plan
            .as_ref()
            .map(|p| p.changes.clone())
            .unwrap_or_default();
        ev.counts = Event::plan_counts(&changes);
        ev.resources = changes;
        ev.summary = match run.state {
            RunState::Unconfirmed => format!("stack {}: run {} needs approval", run.stack, run.id),
            RunState::Finished => format!("stack {}: run {} finished", run.stack, run.id),
            _ => format!("stack {}: run {} failed", run.stack, run.id),
        };
        if run.drift {
            ev.summary.push_str(" (reverting drift)");
        }
        self.notifier.emit(targets, ev);
    }

    /// Seals a declared stack's secrets and webhook secrets (keeping the
    /// old ciphertext of unchanged values, so the stack stays unchanged).
    fn seal(&self, mut spec: StackSpec, old: Option<&StackSpec>) -> Result<StackSpec, IacError> {
        let fail = |e: super::secrets::SecretsError| IacError::BadRequest(e.to_string());
        let mut sealed = std::collections::BTreeMap::new();
        for s in std::mem::take(&mut spec.secret_values) {
            let prev = old.and_then(|o| o.secrets.get(&s.name));
            sealed.insert(
                s.name.clone(),
                self.sealer.reseal(&s.name, &s.value, prev).map_err(fail)?,
            );
        }
        spec.secrets = sealed;
        let mut targets = Vec::new();
        for t in std::mem::take(&mut spec.notify) {
            let prev = old.and_then(|o| o.notify.iter().find(|p| p.url == t.url));
            targets.push(t.seal(&self.sealer, prev).map_err(fail)?);
        }
        spec.notify = targets;
        Ok(spec)
    }

    /// The blob named by `agent`'s current lease of `job_id`.
    pub async fn blob_for(
        &self,
        agent: &str,
        job_id: &str,
        epoch: u64,
        digest: &str,
    ) -> Result<Vec<u8>, IacError> {
        self.hub
            .store
            .current_lease(job_id.to_string(), epoch, agent.to_string())
            .await?;
        let task = self
            .store
            .task_of(job_id.to_string())
            .await?
            .ok_or_else(|| IacError::Refused(format!("job {job_id} is not a run's job")))?;
        if task.source_digest != digest && task.bundle_digest != digest {
            return Err(IacError::Refused(format!(
                "the lease of job {job_id} does not name blob {digest}"
            )));
        }
        self.blobs.get(digest).await
    }

    /// Approve, reject, discard or cancel a run as `who`.
    pub async fn decide(
        &self,
        run_id: &str,
        who: &str,
        decision: &str,
        comment: &str,
    ) -> Result<Run, IacError> {
        let run = self
            .store
            .get_run(run_id.to_string())
            .await?
            .ok_or_else(|| IacError::NotFound(format!("run {run_id}")))?;
        let required = match self.store.get_stack(run.stack.clone()).await? {
            Some(s) => s.spec.approvals_required.max(1) as usize,
            None => 1,
        };
        let (who, decision, comment) = (who.to_string(), decision.to_string(), comment.to_string());
        let record = {
            let (who, decision, comment) = (who.clone(), decision.clone(), comment.clone());
            move |r: &Run| Approval {
                identity: who,
                decision,
                comment,
                plan_digest: r
                    .plan
                    .as_ref()
                    .map(|p| p.plan_digest.clone())
                    .unwrap_or_default(),
                at_ms: now_ms(),
            }
        };
        let run = match decision.as_str() {
            "approve" => {
                self.store
                    .update_run(run.id.clone(), move |r| {
                        if r.state != RunState::Unconfirmed {
                            return Err(IacError::Conflict(format!(
                                "run {} is {}: only an UNCONFIRMED run can be approved",
                                r.id,
                                r.state.as_str()
                            )));
                        }
                        let a = record(r);
                        if r.approvals.iter().any(|x| {
                            x.identity == a.identity
                                && x.decision == "approve"
                                && x.plan_digest == a.plan_digest
                        }) {
                            return Err(IacError::Conflict(format!(
                                "{} already approved run {}",
                                a.identity, r.id
                            )));
                        }
                        r.approvals.push(a);
                        let approvers = r.approvers();
                        if approvers.len() >= required {
                            let by = approvers.into_iter().collect::<Vec<_>>().join(", ");
                            r.go(RunState::Confirmed, format!("approved by {by}"))
                                .map_err(IacError::Conflict)?;
                        }
                        Ok(())
                    })
                    .await?
            }
            "reject" | "discard" => {
                self.store
                    .update_run(run.id.clone(), move |r| {
                        if r.state != RunState::Unconfirmed {
                            return Err(IacError::Conflict(format!(
                                "run {} is {}: only an UNCONFIRMED run can be {}ed",
                                r.id,
                                r.state.as_str(),
                                decision.trim_end_matches('e')
                            )));
                        }
                        let a = record(r);
                        let note =
                            format!("{}ed by {}", decision.trim_end_matches('e'), a.identity);
                        r.approvals.push(a);
                        r.go(RunState::Discarded, note).map_err(IacError::Conflict)
                    })
                    .await?
            }
            "cancel" => {
                let run = self
                    .store
                    .update_run(run.id.clone(), move |r| {
                        if !matches!(
                            r.state,
                            RunState::Queued
                                | RunState::Planning
                                | RunState::Unconfirmed
                                | RunState::Confirmed
                        ) {
                            return Err(IacError::Conflict(format!(
                                "run {} is {}: it cannot be cancelled",
                                r.id,
                                r.state.as_str()
                            )));
                        }
                        let a = record(r);
                        let note = format!("cancelled by {}", a.identity);
                        r.approvals.push(a);
                        r.go(RunState::Cancelled, note).map_err(IacError::Conflict)
                    })
                    .await?;
                if let Some(job) = &run.plan_job {
                    self.cancel_job(job, &who).await?;
                }
                run
            }
            other => {
                return Err(IacError::BadRequest(format!(
                    "unknown decision {other:?} (approve, reject, discard, cancel)"
                )));
            }
        };
        info!(run = %run.id, who = %who, state = run.state.as_str(), "run decision");
        self.kick();
        Ok(run)
    }

    async fn cancel_job(&self, job: &str, who: &str) -> Result<(), IacError> {
        if let CancelOutcome::Requested(j) = self.hub.store.request_cancel(job.to_string()).await?
            && let Some(agent) = &j.agent_id
        {
            self.hub.send(
                agent,
                pb::server_message::Msg::Cancel(pb::Cancel {
                    job_id: j.id.clone(),
                    epoch: j.epoch,
                    reason: format!("run cancelled by {who}"),
                }),
            );
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
