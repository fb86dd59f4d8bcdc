//! From a run to its job: the job spec of a plan or an apply (the stack's
//! image and labels, its secret files opened for the job, its AWS role) and the task
//! pushed with the lease; and proposed runs, which plan any ref side by side
//! with tracked runs without taking the stack lock.

use tracing::info;

use super::IacError;
use super::model::{Run, RunKind, RunState, Stack, StackSpec, Transition};
use super::runs::Engine;
use super::store::Task;
use crate::model::{JobSecret, JobSpec, now_ms};

/// Label an agent advertises when it takes drift checks
/// (`outpost_agent::iac::DRIFT_LABEL`).
pub use outpost_agent::iac::DRIFT_LABEL;

impl Engine {
    /// The job of a run's plan phase (or of a drift check).
    pub(crate) fn plan_job(&self, stack: &Stack, drift_check: bool) -> Result<JobSpec, IacError> {
        let spec = &stack.spec;
        let mut secrets = Vec::new();
        for (name, sealed) in &spec.secrets {
            let value = self
                .sealer
                .open(name, sealed)
                .map_err(|e| IacError::Conflict(format!("stack {}: {e}", spec.name)))?;
            secrets.push(JobSecret {
                name: name.clone(),
                value,
            });
        }
        let mut selector = spec.labels.clone();
        if drift_check {
            selector.insert(DRIFT_LABEL.0.to_string(), DRIFT_LABEL.1.to_string());
        }
        Ok(JobSpec {
            image: spec.image.clone(),
            command: vec![
                "outpost-iac".into(),
                if drift_check { "drift" } else { "plan" }.into(),
            ],
            selector,
            timeout_ms: super::runs::PLAN_TIMEOUT.as_millis() as u64,
            // A check no agent takes fails after a while, saying why (its
            // stack's drift status becomes unknown), instead of waiting for ever.
            queue_timeout_ms: match (&spec.drift, drift_check) {
                (Some(d), true) if d.queue_timeout_ms > 0 => d.queue_timeout_ms,
                (_, true) => super::drift::QUEUE_TIMEOUT_MS,
                (_, false) => 0,
            },
            aws: spec.aws.clone(),
            secrets,
            ..Default::default()
        })
    }

    /// The task pushed with the lease of a run's plan job.
    pub(crate) fn plan_task(spec: &StackSpec, run: &Run, phase: &str) -> Task {
        Task {
            run_id: run.id.clone(),
            stack: spec.name.clone(),
            phase: phase.to_string(),
            source_digest: run.source_digest.clone(),
            tool: spec.tool.clone(),
            plan_policy: spec.plan_policy.clone(),
            variables: spec.variables.clone(),
            drift: run.drift,
            ..Default::default()
        }
    }

    /// Queues a proposed run: `git_ref` (branch, tag or commit) of the
    /// stack's repository, planned without the stack lock, never applied.
    pub async fn propose(&self, name: &str, git_ref: &str, who: &str) -> Result<Run, IacError> {
        super::source::check_ref(git_ref).map_err(IacError::BadRequest)?;
        let stack = self.stack(name).await?;
        let fetched = {
            let _one = self.fetching.lock().await;
            super::source::fetch_ref(
                &self.git_dir.join(&stack.spec.name),
                &stack.spec.repo,
                git_ref,
                git_ref,
                "refs/outpost/proposed",
                &stack.spec.project_root,
            )
            .await?
        };
        let digest = self.blobs.put(fetched.tarball).await?;
        let mut run = new_run(
            &stack.spec.name,
            RunKind::Proposed,
            &fetched.commit,
            &digest,
            who,
            &format!("proposed: {git_ref}"),
        );
        run.git_ref = git_ref.to_string();
        let run = self.insert_run(run).await?;
        self.kick();
        Ok(run)
    }

    /// Inserts a queued run.
    pub(crate) async fn insert_run(&self, run: Run) -> Result<Run, IacError> {
        let run = self.store.insert_run(run).await?;
        info!(run = %run.id, stack = %run.stack, kind = run.kind.as_str(), commit = %run.commit, "run queued");
        Ok(run)
    }

    /// Starts a queued proposed run at once (no stack lock).
    pub(crate) async fn start_proposed(&self, run: &Run) -> Result<(), IacError> {
        let Some(stack) = self.store.get_stack(run.stack.clone()).await? else {
            return Ok(());
        };
        self.start_plan_job(&stack, run, false).await
    }

    /// Records the plan job of a run that takes no lock and queues it.
    pub(crate) async fn start_plan_job(
        &self,
        stack: &Stack,
        run: &Run,
        drift_check: bool,
    ) -> Result<(), IacError> {
        let job = match self.plan_job(stack, drift_check) {
            Ok(j) => j,
            Err(e) => {
                let note = e.to_string();
                self.store
                    .update_run(run.id.clone(), move |r| {
                        r.go(RunState::Cancelled, note).map_err(IacError::Conflict)
                    })
                    .await?;
                return Ok(());
            }
        };
        let job_id = uuid::Uuid::now_v7().to_string();
        let spec = stack.spec.clone();
        let phase = if drift_check { "drift" } else { "plan" };
        let started = self
            .store
            .start_unlocked(run.id.clone(), job_id.clone(), drift_check, move |r| {
                Engine::plan_task(&spec, r, phase)
            })
            .await?;
        let Some(run) = started else {
            return Ok(());
        };
        self.hub.store.insert_job(job_id.clone(), job).await?;
        info!(run = %run.id, job = %job_id, phase, "plan queued");
        self.hub.kick();
        self.hub.changed();
        Ok(())
    }
}

/// A queued run of `stack` at `commit` (`digest`), triggered by `who`.
pub(crate) fn new_run(
    stack: &str,
    kind: RunKind,
    commit: &str,
    digest: &str,
    who: &str,
    why: &str,
) -> Run {
    let now = now_ms();
    Run {
        id: format!("run-{}", uuid::Uuid::now_v7().simple()),
        stack: stack.to_string(),
        state: RunState::Queued,
        commit: commit.to_string(),
        source_digest: digest.to_string(),
        plan_job: None,
        apply_job: None,
        message: String::new(),
        triggered_by: who.to_string(),
        transitions: vec![Transition {
            state: RunState::Queued,
            at_ms: now,
            note: why.to_string(),
        }],
        plan: None,
        approvals: Vec::new(),
        created_ms: now,
        kind,
        git_ref: String::new(),
        drift: false,
        apply: None,
    }
}
