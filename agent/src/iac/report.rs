//! What a plan or a drift check reports to the control plane, read from
//! the files the job's script left in the workspace: addresses, actions,
//! policy verdicts and digests; never a value.

use outpost_proto::iac::v1 as iacpb;
use std::path::Path;
use tracing::info;

use super::job::JobIac;
use super::policy::PlanPolicy;
use super::{IacError, MAX_PLAN_JSON_BYTES, bundle, drift, plan, read_nofollow};
use crate::executor::hooks::HookContext;

impl JobIac {
    /// Evaluates the plan policies on the plan, seals and uploads the plan
    /// bundle when there are changes, and reports the plan.
    pub(super) async fn report_plan(&self, ctx: &HookContext<'_>) -> Result<(), IacError> {
        let ws = ctx.workspace.to_path_buf();
        let files = tokio::task::spawn_blocking(move || -> Result<_, IacError> {
            let code =
                read_nofollow(&ws.join("plan.exitcode"), 16).map_err(|source| IacError::Read {
                    what: "the plan's exit code",
                    source,
                })?;
            let json =
                read_nofollow(&ws.join("plan.json"), MAX_PLAN_JSON_BYTES).map_err(|source| {
                    IacError::Read {
                        what: "the plan's JSON",
                        source,
                    }
                })?;
            Ok((code, json))
        })
        .await
        .map_err(|_| IacError::Join("reading the plan"))??;
        let (code, json) = files;
        let has_changes = match String::from_utf8_lossy(&code).trim() {
            "0" => false,
            "2" => true,
            other => {
                return Err(IacError::Invalid {
                    what: "the plan's exit code",
                    message: format!("{other:?}"),
                });
            }
        };
        let show: serde_json::Value =
            serde_json::from_slice(&json).map_err(|e| IacError::Invalid {
                what: "the plan's JSON",
                message: e.to_string(),
            })?;
        let changes = plan::summary(&show);
        let input = serde_json::json!({
            "plan": show,
            "run": {
                "id": self.task.run_id,
                "stack": self.task.stack,
                "phase": self.task.phase,
                "drift": self.task.drift,
            },
        });
        let mut verdicts = Vec::new();
        if let Some(p) = self.stack_policy.lock().as_mut() {
            let v = p.evaluate(&input).map_err(|message| IacError::Evaluate {
                origin: "stack",
                message,
            })?;
            verdicts.push(("stack", v));
        }
        if let Some((path, text)) = &self.agent.local_policy {
            let mut p =
                PlanPolicy::compile(&path.display().to_string(), text).map_err(|message| {
                    IacError::Evaluate {
                        origin: "agent",
                        message,
                    }
                })?;
            let v = p.evaluate(&input).map_err(|message| IacError::Evaluate {
                origin: "agent",
                message,
            })?;
            verdicts.push(("agent", v));
        }
        let state = self.state_before.lock().clone();
        let (digest, bundle_digest) = if has_changes {
            let ws = ctx.workspace.to_path_buf();
            let plain = tokio::task::spawn_blocking(move || bundle::pack(&ws))
                .await
                .map_err(|_| IacError::Join("packing the plan bundle"))?
                .map_err(|source| IacError::Read {
                    what: "the plan bundle",
                    source,
                })?;
            let digest = plan::digest(&plan::DigestInput {
                bundle: &plain,
                source_digest: &self.task.source_digest,
                image: &self.image_id.lock().clone(),
                variables: &self.task.variables,
                state: &state,
            });
            let sealed = self.agent.pool()?.seal(&plain).map_err(IacError::Seal)?;
            drop(plain);
            let ack = self
                .agent
                .client
                .clone()
                .upload_bundle(iacpb::BundleUpload {
                    job_id: self.key.job_id.clone(),
                    epoch: self.key.epoch,
                    sealed,
                })
                .await
                .map_err(|s| IacError::Report(s.message().to_string()))?
                .into_inner();
            (digest, ack.digest)
        } else {
            (String::new(), String::new())
        };
        let denied: Vec<String> = verdicts
            .iter()
            .flat_map(|(src, v)| v.deny.iter().map(move |m| format!("{src}: {m}")))
            .collect();
        let report = iacpb::PlanReport {
            job_id: self.key.job_id.clone(),
            epoch: self.key.epoch,
            has_changes,
            changes: changes
                .iter()
                .map(|c| iacpb::ResourceChange {
                    address: c.address.clone(),
                    actions: c.actions.clone(),
                })
                .collect(),
            verdicts: verdicts
                .iter()
                .map(|(src, v)| iacpb::PolicyVerdict {
                    source: src.to_string(),
                    deny: v.deny.clone(),
                    warn: v.warn.clone(),
                })
                .collect(),
            plan_digest: digest.clone(),
            bundle_digest,
            state_serial: state.serial,
            state_lineage: state.lineage.clone(),
            drifted: Vec::new(),
        };
        self.agent
            .client
            .clone()
            .report_plan(report)
            .await
            .map_err(|s| IacError::Report(s.message().to_string()))?;
        info!(has_changes, changes = changes.len(), digest = %digest, denied = denied.len(), "plan reported");
        if !denied.is_empty() {
            return Err(IacError::Denied(denied.join("; ")));
        }
        Ok(())
    }

    /// Reads the drift check's three JSON files and reports addresses and
    /// actions only.
    pub(super) async fn report_drift(&self, ctx: &HookContext<'_>) -> Result<(), IacError> {
        let ws = ctx.workspace.to_path_buf();
        let read = |ws: &Path, name: &'static str| -> Result<serde_json::Value, IacError> {
            let bytes = read_nofollow(&ws.join(name), MAX_PLAN_JSON_BYTES)
                .map_err(|source| IacError::Read { what: name, source })?;
            serde_json::from_slice(&bytes).map_err(|e| IacError::Invalid {
                what: name,
                message: e.to_string(),
            })
        };
        let (state, refresh, show) = tokio::task::spawn_blocking(move || {
            Ok::<_, IacError>((
                read(&ws, "state.json")?,
                read(&ws, "refresh.json")?,
                read(&ws, "plan.json")?,
            ))
        })
        .await
        .map_err(|_| IacError::Join("reading the drift check"))??;
        let drifted = drift::drifted(&state, &refresh);
        let changes = plan::summary(&show);
        let pb = |c: &plan::Change| iacpb::ResourceChange {
            address: c.address.clone(),
            actions: c.actions.clone(),
        };
        let report = iacpb::PlanReport {
            job_id: self.key.job_id.clone(),
            epoch: self.key.epoch,
            has_changes: !changes.is_empty() || !drifted.is_empty(),
            changes: changes.iter().map(pb).collect(),
            verdicts: Vec::new(),
            plan_digest: String::new(),
            drifted: drifted.iter().map(pb).collect(),
            ..Default::default()
        };
        self.agent
            .client
            .clone()
            .report_plan(report)
            .await
            .map_err(|s| IacError::Report(s.message().to_string()))?;
        info!(
            drifted = drifted.len(),
            changes = changes.len(),
            "drift check reported"
        );
        Ok(())
    }
}
