//! The apply phase on the control plane, and the agent calls around it.
//!
//! - A `CONFIRMED` run gets an apply job in the transaction that moves it to
//!   `APPLYING` ([`IacStore::start_apply`]): a plan is consumed once. The
//!   job's lease carries the approved digest, the sealed bundle's blob and
//!   the state the plan was made against; the agent verifies all three.
//! - An apply job is leased once: a second lease (its first was lost: the
//!   agent died or its lease expired) carries the `lost` phase, which every
//!   agent refuses, and the engine ends the run `FAILED` with the last state
//!   serial; its stack lock is released with it.
//! - Agents upload sealed plan bundles, read and write the stack's managed
//!   state (`super::state`) and report the apply, each call fenced by the
//!   caller's current lease.

use tracing::{info, warn};

use super::IacError;
use super::model::{ApplyResult, Run, RunState};
use super::runs::Engine;
use super::state::{StateVersion, Writer};
use super::store::{IacStore, Task, transact};
use crate::model::JobState;

/// Longest an apply job may take.
const APPLY_TIMEOUT_MS: u64 = 3600 * 1000;
/// Largest sealed bundle or state version an agent may upload.
pub const MAX_SEALED_BYTES: usize = 64 << 20;

impl IacStore {
    /// Moves a `CONFIRMED` run to `APPLYING` with `job_id` and records the
    /// job's task, in one transaction; `None` if the run is no longer
    /// `CONFIRMED` (its plan was consumed or it was cancelled).
    pub async fn start_apply(
        &self,
        run_id: String,
        job_id: String,
        task: Task,
    ) -> Result<Option<Run>, IacError> {
        Ok(transact!(&self.db, |tx| {
            let Some(mut run) = tx.lock_run(&run_id).await? else {
                return Ok(None);
            };
            if run.state != RunState::Confirmed || run.apply_job.is_some() {
                return Ok(None);
            }
            if run.go(RunState::Applying, "").is_err() {
                return Ok(None);
            }
            run.apply_job = Some(job_id.clone());
            run.apply = Some(ApplyResult::default());
            tx.insert_job(&job_id, &task).await?;
            tx.write_run(&run).await?;
            Ok(Some(run))
        })?)
    }
}

impl Engine {
    /// Starts the apply of a `CONFIRMED` run.
    pub(super) async fn start_apply(&self, run: &Run) -> Result<(), IacError> {
        let plan = run.plan.clone().unwrap_or_default();
        let stack = self.store.get_stack(run.stack.clone()).await?;
        let refuse = |why: &str| {
            let why = why.to_string();
            move |r: &mut Run| {
                if r.state != RunState::Confirmed {
                    return Ok(());
                }
                r.go(RunState::Failed, why).map_err(IacError::Conflict)
            }
        };
        let Some(stack) = stack else {
            let run = self
                .store
                .update_run(run.id.clone(), refuse("the stack no longer exists"))
                .await?;
            self.notify_run(&run).await;
            return Ok(());
        };
        if plan.bundle_digest.is_empty() || plan.plan_digest.is_empty() {
            let run = self
                .store
                .update_run(run.id.clone(), refuse("the plan has no sealed bundle"))
                .await?;
            self.notify_run(&run).await;
            return Ok(());
        }
        // The same job as the plan's (image, labels, secrets, AWS role), for
        // the apply phase.
        let job = match self.plan_job(&stack, false) {
            Ok(mut job) => {
                job.command = vec!["outpost-iac".into(), "apply".into()];
                job.timeout_ms = APPLY_TIMEOUT_MS;
                job
            }
            Err(e) => {
                let run = self
                    .store
                    .update_run(run.id.clone(), refuse(&e.to_string()))
                    .await?;
                self.notify_run(&run).await;
                return Ok(());
            }
        };
        let job_id = uuid::Uuid::now_v7().to_string();
        let task = Task {
            run_id: run.id.clone(),
            stack: stack.spec.name.clone(),
            phase: "apply".into(),
            source_digest: run.source_digest.clone(),
            tool: stack.spec.tool.clone(),
            plan_policy: String::new(),
            variables: stack.spec.variables.clone(),
            plan_digest: plan.plan_digest.clone(),
            bundle_digest: plan.bundle_digest.clone(),
            state_serial: plan.state_serial,
            state_lineage: plan.state_lineage.clone(),
            drift: false,
        };
        let Some(run) = self
            .store
            .start_apply(run.id.clone(), job_id.clone(), task)
            .await?
        else {
            return Ok(());
        };
        self.hub.store.insert_job(job_id.clone(), job).await?;
        info!(run = %run.id, job = %job_id, digest = %plan.plan_digest, "apply queued");
        self.hub.kick();
        self.hub.changed();
        Ok(())
    }

    /// Turns the apply job's outcome into the run's state; ends a run whose
    /// apply lease was lost (never re-queued).
    pub(super) async fn advance_applying(&self, run: &Run) -> Result<(), IacError> {
        let Some(job_id) = run.apply_job.clone() else {
            return Ok(());
        };
        let job = self.hub.store.get_job(job_id.clone()).await?;
        let leases = run.apply.as_ref().map(|a| a.leases).unwrap_or(0);
        let lost =
            |j: &crate::model::Job| leases > 1 || (j.state == JobState::Queued && j.epoch > 0);
        let (to, note) = match job {
            None => (RunState::Failed, "the apply job is missing".to_string()),
            Some(j) if lost(&j) => {
                // Never leased again: a queued job is cancelled at once.
                if !j.state.is_final()
                    && let Err(e) = self.hub.store.request_cancel(job_id.clone()).await
                {
                    warn!(job = %job_id, error = %e, "cancelling the lost apply failed");
                }
                let state = self.store.current_state(run.stack.clone()).await?;
                (
                    RunState::Failed,
                    format!(
                        "the apply's lease was lost ({}); an apply is never retried; last state serial {}; the stack lock is released",
                        j.message,
                        state.map_or("none".to_string(), |s| s.serial.to_string())
                    ),
                )
            }
            Some(j) if !j.state.is_final() => return Ok(()),
            Some(j) if j.state == JobState::Succeeded => {
                let state = self.store.current_state(run.stack.clone()).await?;
                (
                    RunState::Finished,
                    format!(
                        "applied; state serial {}",
                        state.map_or("none".to_string(), |s| s.serial.to_string())
                    ),
                )
            }
            Some(j) => {
                let stale = run.apply.as_ref().filter(|a| a.stale);
                match stale {
                    Some(a) => (RunState::Stale, a.message.clone()),
                    None => {
                        let state = self.store.current_state(run.stack.clone()).await?;
                        (
                            RunState::Failed,
                            format!(
                                "apply {}: {}; last state serial {}",
                                j.state.as_str(),
                                j.message,
                                state.map_or("none".to_string(), |s| s.serial.to_string())
                            ),
                        )
                    }
                }
            }
        };
        let moved = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let moved_in = moved.clone();
        let run = self
            .store
            .update_run(run.id.clone(), move |r| {
                if r.state != RunState::Applying || r.apply_job.as_deref() != Some(job_id.as_str())
                {
                    return Ok(());
                }
                r.go(to, note).map_err(IacError::Conflict)?;
                moved_in.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            })
            .await?;
        info!(run = %run.id, state = run.state.as_str(), message = %run.message, "run applied");
        if moved.load(std::sync::atomic::Ordering::Relaxed) {
            self.notify_run(&run).await;
        }
        self.hub.changed();
        Ok(())
    }

    /// The tasks for the leases of `job_ids` (those that are runs' jobs);
    /// an apply's second lease is `lost`.
    pub(super) async fn lease_tasks(
        &self,
        job_ids: Vec<String>,
    ) -> Result<std::collections::HashMap<String, Task>, IacError> {
        let mut tasks = self.store.tasks_of(job_ids).await?;
        let mut failed = Vec::new();
        for (job_id, task) in tasks.iter_mut() {
            if let Err(e) = self.lease_task(job_id, task).await {
                warn!(job = %job_id, error = %e, "reading the run task failed");
                failed.push(job_id.clone());
            }
        }
        for job_id in failed {
            tasks.remove(&job_id);
        }
        Ok(tasks)
    }

    /// Marks an apply's second lease `lost`.
    async fn lease_task(&self, job_id: &str, task: &mut Task) -> Result<(), IacError> {
        if task.phase == "apply" {
            let job = job_id.to_string();
            let run = self
                .store
                .update_run(task.run_id.clone(), move |r| {
                    if r.apply_job.as_deref() != Some(job.as_str()) {
                        return Ok(());
                    }
                    let a = r.apply.get_or_insert_with(Default::default);
                    a.leases += 1;
                    Ok(())
                })
                .await?;
            if run.apply.as_ref().is_none_or(|a| a.leases != 1) || run.state != RunState::Applying {
                warn!(run = %run.id, job = %job_id, "an apply is leased again: refused");
                task.phase = "lost".into();
                task.bundle_digest.clear();
                task.plan_digest.clear();
            }
        }
        Ok(())
    }

    /// The task of `agent`'s current lease of `job_id`.
    async fn leased_task(&self, agent: &str, job_id: &str, epoch: u64) -> Result<Task, IacError> {
        self.hub
            .store
            .current_lease(job_id.to_string(), epoch, agent.to_string())
            .await?;
        self.store
            .task_of(job_id.to_string())
            .await?
            .ok_or_else(|| IacError::Refused(format!("job {job_id} is not a run's job")))
    }

    /// Stores a sealed plan bundle from a plan lease; returns its digest.
    pub async fn upload_bundle(
        &self,
        agent: &str,
        job_id: &str,
        epoch: u64,
        sealed: Vec<u8>,
    ) -> Result<String, IacError> {
        let task = self.leased_task(agent, job_id, epoch).await?;
        if task.phase != "plan" {
            return Err(IacError::Refused(format!("job {job_id} is not a plan")));
        }
        if sealed.is_empty() || sealed.len() > MAX_SEALED_BYTES {
            return Err(IacError::BadRequest(format!(
                "a sealed bundle is 1 to {MAX_SEALED_BYTES} bytes"
            )));
        }
        if !sealed.starts_with(b"age-encryption.org/v1\n") {
            return Err(IacError::BadRequest(
                "the bundle is not sealed (age): the control plane keeps ciphertext only".into(),
            ));
        }
        self.blobs.put(sealed).await
    }

    /// The stack's current state (ciphertext) for `agent`'s current lease.
    pub async fn state_for(
        &self,
        agent: &str,
        job_id: &str,
        epoch: u64,
    ) -> Result<Option<(StateVersion, Vec<u8>)>, IacError> {
        let task = self.leased_task(agent, job_id, epoch).await?;
        let Some(v) = self.store.current_state(task.stack).await? else {
            return Ok(None);
        };
        let data = self.blobs.get(&v.digest).await?;
        Ok(Some((v, data)))
    }

    /// A new state version from `agent`'s current apply lease.
    pub async fn push_state(
        &self,
        agent: &str,
        job_id: &str,
        epoch: u64,
        serial: u64,
        lineage: String,
        sealed: Vec<u8>,
    ) -> Result<StateVersion, IacError> {
        let task = self.leased_task(agent, job_id, epoch).await?;
        if task.phase != "apply" {
            return Err(IacError::Refused(format!(
                "job {job_id} is not an apply: it may not write state"
            )));
        }
        let digest = self.put_sealed(sealed).await?;
        let v = self
            .store
            .record_state(
                task.stack,
                serial,
                lineage,
                digest,
                Writer::Apply {
                    run_id: task.run_id,
                    job_id: job_id.to_string(),
                },
            )
            .await?;
        info!(stack = %v.stack, serial = v.serial, job = %job_id, "state version stored");
        Ok(v)
    }

    /// A state version written outside any run by an admin.
    pub async fn admin_push_state(
        &self,
        who: &str,
        stack: &str,
        serial: u64,
        lineage: String,
        sealed: Vec<u8>,
    ) -> Result<StateVersion, IacError> {
        self.stack(stack).await?;
        let digest = self.put_sealed(sealed).await?;
        let v = self
            .store
            .record_state(
                stack.to_string(),
                serial,
                lineage,
                digest,
                Writer::Admin(who.to_string()),
            )
            .await?;
        info!(stack = %v.stack, serial = v.serial, who = %who, "state version pushed by an admin");
        Ok(v)
    }

    async fn put_sealed(&self, sealed: Vec<u8>) -> Result<String, IacError> {
        if sealed.is_empty() || sealed.len() > MAX_SEALED_BYTES {
            return Err(IacError::BadRequest(format!(
                "a sealed state is 1 to {MAX_SEALED_BYTES} bytes"
            )));
        }
        if !sealed.starts_with(b"age-encryption.org/v1\n") {
            return Err(IacError::BadRequest(
                "the state is not sealed to the pool key (age): the control plane keeps ciphertext only"
                    .into(),
            ));
        }
        self.blobs.put(sealed).await
    }

    /// Records the apply report of `agent`'s current lease of `job_id`.
    pub async fn report_apply(
        &self,
        agent: &str,
        job_id: &str,
        epoch: u64,
        stale: bool,
        message: String,
        outputs: std::collections::BTreeMap<String, String>,
    ) -> Result<(), IacError> {
        let task = self.leased_task(agent, job_id, epoch).await?;
        if task.phase != "apply" {
            return Err(IacError::Refused(format!("job {job_id} is not an apply")));
        }
        if outputs.len() > 1000
            || message.len() > 4096
            || outputs.iter().any(|(k, v)| k.len() + v.len() > 8192)
        {
            return Err(IacError::BadRequest("the apply report is too large".into()));
        }
        let job_id = job_id.to_string();
        self.store
            .update_run(task.run_id, move |r| {
                if r.state != RunState::Applying || r.apply_job.as_deref() != Some(job_id.as_str())
                {
                    return Err(IacError::Refused(format!(
                        "run {} is {}, not applying with job {job_id}",
                        r.id,
                        r.state.as_str()
                    )));
                }
                let a = r.apply.get_or_insert_with(Default::default);
                a.stale = stale;
                a.message = message;
                a.outputs = outputs;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Outputs of the stack's last finished apply.
    pub async fn last_outputs(
        &self,
        stack: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, IacError> {
        let runs = self.store.list_runs(Some(stack.to_string()), 100).await?;
        Ok(runs
            .into_iter()
            .find(|r| r.state == RunState::Finished && r.apply.is_some())
            .and_then(|r| r.apply)
            .map(|a| a.outputs)
            .unwrap_or_default())
    }
}
