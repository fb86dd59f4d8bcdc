//! Human decisions on a run: approve, reject, discard, cancel.

use crate::iac::approval;
use outpost_proto::agent::v1 as pb;
use tracing::info;

use super::Engine;
use crate::iac::IacError;
use crate::iac::model::{Approval, Run, RunState};
use crate::model::now_ms;
use crate::store::CancelOutcome;

impl Engine {
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
        let (required, mut policy) = match self.store.get_stack(run.stack.clone()).await? {
            Some(s) if !s.spec.approval_policy.is_empty() => {
                let p = approval::ApprovalPolicy::compile(
                    &format!("{}.approval.rego", s.spec.name),
                    &s.spec.approval_policy,
                )
                .map_err(|e| IacError::Conflict(format!("the approval policy: {e}")))?;
                (1, Some(p))
            }
            Some(s) => (s.spec.approvals_required.max(1) as usize, None),
            None => (1, None),
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
                        if let Some(p) = policy.as_mut() {
                            return approval::on_approval(p, r);
                        }
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

    pub(super) async fn cancel_job(&self, job: &str, who: &str) -> Result<(), IacError> {
        if let CancelOutcome::Requested(j) = self.hub.store.request_cancel(job.to_string()).await?
            && let Some(agent) = &j.agent_id
        {
            self.hub.send_anywhere(
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
