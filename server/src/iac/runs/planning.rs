//! The plan phase of tracked runs: a stack's next run starts when its lock
//! is free, the plan job's outcome and the agent's plan report become the
//! run's state; the blobs a lease may read.

use tracing::info;

use super::Engine;
use crate::iac::IacError;
use crate::iac::model::{PlanResult, Run, RunKind, RunState};
use crate::model::JobState;

impl Engine {
    pub(super) async fn start_next(&self, name: &str) -> Result<(), IacError> {
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

    pub(super) async fn advance_planning(&self, run: &Run) -> Result<(), IacError> {
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
                    let auto = stack.as_ref().is_some_and(|s| s.spec.autodeploy);
                    let approval = stack.map(|s| s.spec.approval_policy).unwrap_or_default();
                    if auto && !p.warned() {
                        (RunState::Confirmed, "autodeploy".to_string())
                    } else if !approval.is_empty() {
                        crate::iac::approval::on_plan(&run.stack, &approval, run)
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
}
