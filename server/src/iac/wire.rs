//! The IaC layer's one converter between `outpost.iac.v1` (and the
//! `IacTask` of `outpost.agent.v1`) and its domain types.

use outpost_proto::agent::v1 as pb;
use outpost_proto::iac::v1 as iac;

use std::collections::BTreeMap;

use super::drift::{DriftSpec, DriftState};
use super::model::{Approval, PlanResult, PolicyVerdict, ResourceChange, Run, Stack, StackSpec};
use super::store::Task;
use crate::model::{AwsRole, JobSecret};
use crate::notify::Target;

pub fn task_to_pb(t: &Task) -> pb::IacTask {
    pb::IacTask {
        run_id: t.run_id.clone(),
        stack: t.stack.clone(),
        phase: t.phase.clone(),
        source_digest: t.source_digest.clone(),
        tool: t.tool.clone(),
        plan_policy: t.plan_policy.clone(),
        variables: t.variables.clone().into_iter().collect(),
        plan_digest: t.plan_digest.clone(),
        bundle_digest: t.bundle_digest.clone(),
        state_serial: t.state_serial,
        state_lineage: t.state_lineage.clone(),
        drift: t.drift,
    }
}

pub fn spec_from_pb(s: iac::StackSpec) -> StackSpec {
    StackSpec {
        name: s.name,
        repo: s.repo,
        branch: s.branch,
        project_root: s.project_root,
        image: s.image,
        tool: s.tool,
        variables: s.variables.into_iter().collect(),
        labels: s.labels.into_iter().collect(),
        autodeploy: s.autodeploy,
        plan_policy: s.plan_policy,
        approvals_required: s.approvals_required,
        approval_policy: s.approval_policy,
        poll_interval_ms: s.poll_interval_ms,
        secrets: BTreeMap::new(),
        secret_values: s
            .secrets
            .into_iter()
            .map(|f| JobSecret {
                name: f.name,
                value: f.value,
            })
            .collect(),
        aws: s.aws.map(|a| AwsRole {
            role_arn: a.role_arn,
            session_policy: a.session_policy,
            duration_s: a.duration_s,
        }),
        drift: s.drift.map(|d| DriftSpec {
            schedule: d.schedule,
            timezone: d.timezone,
            min_interval_ms: d.min_interval_ms,
            jitter_ms: d.jitter_ms,
            ignore: d.ignore,
            reconcile: d.reconcile,
            queue_timeout_ms: d.queue_timeout_ms,
        }),
        notify: s.notify.into_iter().map(target_from_pb).collect(),
    }
}

pub fn target_from_pb(t: iac::NotifyTarget) -> Target {
    Target {
        url: t.url,
        format: t.format,
        events: t.events,
        timeout_ms: t.timeout_ms,
        secret: None,
        secret_value: t.secret,
    }
}

/// A target as sent: the secret's value only on its way in (`stacks.toml`),
/// never read back.
pub fn target_to_pb(t: &Target) -> iac::NotifyTarget {
    iac::NotifyTarget {
        url: t.url.clone(),
        secret: t.secret_value.clone(),
        format: t.format.clone(),
        events: t.events.clone(),
        timeout_ms: t.timeout_ms,
    }
}

pub fn spec_to_pb(s: &StackSpec) -> iac::StackSpec {
    iac::StackSpec {
        name: s.name.clone(),
        repo: s.repo.clone(),
        branch: s.branch.clone(),
        project_root: s.project_root.clone(),
        image: s.image.clone(),
        tool: s.tool.clone(),
        variables: s.variables.clone().into_iter().collect(),
        labels: s.labels.clone().into_iter().collect(),
        autodeploy: s.autodeploy,
        plan_policy: s.plan_policy.clone(),
        approvals_required: s.approvals_required,
        approval_policy: s.approval_policy.clone(),
        poll_interval_ms: s.poll_interval_ms,
        // Values only on their way in; read back, names only.
        secrets: if s.secret_values.is_empty() {
            s.secrets
                .keys()
                .map(|name| iac::SecretFile {
                    name: name.clone(),
                    value: Vec::new(),
                })
                .collect()
        } else {
            s.secret_values
                .iter()
                .map(|v| iac::SecretFile {
                    name: v.name.clone(),
                    value: v.value.clone(),
                })
                .collect()
        },
        aws: s.aws.as_ref().map(|a| iac::StackAwsRole {
            role_arn: a.role_arn.clone(),
            session_policy: a.session_policy.clone(),
            duration_s: a.duration_s,
        }),
        drift: s.drift.as_ref().map(|d| iac::DriftSpec {
            schedule: d.schedule.clone(),
            timezone: d.timezone.clone(),
            min_interval_ms: d.min_interval_ms,
            jitter_ms: d.jitter_ms,
            ignore: d.ignore.clone(),
            reconcile: d.reconcile,
            queue_timeout_ms: d.queue_timeout_ms,
        }),
        notify: s.notify.iter().map(target_to_pb).collect(),
    }
}

/// A stack with its drift status (`None`: never checked).
pub fn stack_with_drift(s: &Stack, d: Option<&DriftState>) -> iac::Stack {
    let mut pb = stack_to_pb(s);
    let d = d.cloned().unwrap_or_else(|| DriftState {
        reason: "never checked".into(),
        ..Default::default()
    });
    pb.drift = Some(iac::DriftStatus {
        status: d.status.as_str().to_string(),
        since_ms: d.since_ms,
        fingerprint: d.fingerprint.clone(),
        resources: d.resources.iter().map(change_to_pb).collect(),
        reason: if d.status == crate::iac::drift::Status::Unknown && d.reason.is_empty() {
            "never checked".into()
        } else {
            d.reason.clone()
        },
        checked_at_ms: d.checked_ms,
        next_at_ms: if s.spec.drift.is_some() { d.next_ms } else { 0 },
        last_run: d.last_run.clone(),
    });
    pb
}

pub fn stack_to_pb(s: &Stack) -> iac::Stack {
    iac::Stack {
        spec: Some(spec_to_pb(&s.spec)),
        commit: s.commit.clone().unwrap_or_default(),
        source_digest: s.source_digest.clone().unwrap_or_default(),
        fetch_error: s.fetch_error.clone().unwrap_or_default(),
        fetched_at_ms: s.fetched_ms,
        created_at_ms: s.created_ms,
        updated_at_ms: s.updated_ms,
        drift: None,
        ..Default::default()
    }
}

fn change_to_pb(c: &ResourceChange) -> iac::ResourceChange {
    iac::ResourceChange {
        address: c.address.clone(),
        actions: c.actions.clone(),
    }
}

fn verdict_to_pb(v: &PolicyVerdict) -> iac::PolicyVerdict {
    iac::PolicyVerdict {
        source: v.source.clone(),
        deny: v.deny.clone(),
        warn: v.warn.clone(),
    }
}

fn approval_to_pb(a: &Approval) -> iac::Approval {
    iac::Approval {
        identity: a.identity.clone(),
        decision: a.decision.clone(),
        comment: a.comment.clone(),
        plan_digest: a.plan_digest.clone(),
        at_ms: a.at_ms,
    }
}

pub fn run_to_pb(r: &Run) -> iac::Run {
    let plan = r.plan.clone().unwrap_or_default();
    iac::Run {
        run_id: r.id.clone(),
        stack: r.stack.clone(),
        state: r.state.as_str().to_string(),
        commit: r.commit.clone(),
        source_digest: r.source_digest.clone(),
        plan_job: r.plan_job.clone().unwrap_or_default(),
        apply_job: r.apply_job.clone().unwrap_or_default(),
        message: r.message.clone(),
        triggered_by: r.triggered_by.clone(),
        transitions: r
            .transitions
            .iter()
            .map(|t| iac::Transition {
                state: t.state.as_str().to_string(),
                at_ms: t.at_ms,
                note: t.note.clone(),
            })
            .collect(),
        has_changes: plan.has_changes,
        changes: plan.changes.iter().map(change_to_pb).collect(),
        verdicts: plan.verdicts.iter().map(verdict_to_pb).collect(),
        approvals: r.approvals.iter().map(approval_to_pb).collect(),
        plan_digest: plan.plan_digest.clone(),
        created_at_ms: r.created_ms,
        outputs: r
            .apply
            .as_ref()
            .map(|a| a.outputs.clone().into_iter().collect())
            .unwrap_or_default(),
        state_serial: plan.state_serial,
        state_lineage: plan.state_lineage.clone(),
        bundle_digest: plan.bundle_digest.clone(),
        kind: r.kind.as_str().to_string(),
        git_ref: r.git_ref.clone(),
        drift: r.drift,
        drifted: plan.drifted.iter().map(change_to_pb).collect(),
    }
}

/// A plan report from an agent: sizes are bounded so that a report cannot
/// fill the store.
pub fn plan_from_pb(p: iac::PlanReport) -> Result<PlanResult, String> {
    const MAX_ITEMS: usize = 10_000;
    if p.changes.len() > MAX_ITEMS || p.drifted.len() > MAX_ITEMS || p.verdicts.len() > 16 {
        return Err("the plan report is too large".into());
    }
    Ok(PlanResult {
        has_changes: p.has_changes,
        changes: p
            .changes
            .into_iter()
            .map(|c| ResourceChange {
                address: c.address,
                actions: c.actions,
            })
            .collect(),
        verdicts: p
            .verdicts
            .into_iter()
            .map(|v| PolicyVerdict {
                source: v.source,
                deny: v.deny,
                warn: v.warn,
            })
            .collect(),
        plan_digest: p.plan_digest,
        bundle_digest: p.bundle_digest,
        state_serial: p.state_serial,
        state_lineage: p.state_lineage,
        drifted: p
            .drifted
            .into_iter()
            .map(|c| ResourceChange {
                address: c.address,
                actions: c.actions,
            })
            .collect(),
    })
}

pub fn state_version_to_pb(v: &super::state::StateVersion) -> iac::StateVersion {
    iac::StateVersion {
        stack: v.stack.clone(),
        serial: v.serial,
        lineage: v.lineage.clone(),
        digest: v.digest.clone(),
        written_by: v.written_by.clone(),
        at_ms: v.at_ms,
    }
}

/// A delivery as listed (never the target's secret).
pub fn delivery_to_pb(d: &crate::notify::store::Delivery) -> iac::Delivery {
    iac::Delivery {
        delivery_id: d.id.clone(),
        stack: d.event.stack.clone(),
        run_id: d.event.run.clone(),
        event: d.event.event.clone(),
        url: d.target.url.clone(),
        state: d.state.clone(),
        attempts: d.attempts,
        history: d
            .history
            .iter()
            .map(|a| iac::DeliveryAttempt {
                at_ms: a.at_ms,
                status: a.status.into(),
                error: a.error.clone(),
                duration_ms: a.duration_ms,
            })
            .collect(),
        created_at_ms: d.created_ms,
    }
}
