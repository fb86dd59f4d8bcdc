//! Approval policies in Rego (`package outpost.approval`): a stack may
//! decide who must approve, and when, with a policy instead of a count of
//! approvers. The policy sees what the control plane knows of the run and
//! never a value: the run (its trigger, whether it reverts drift), the
//! changed addresses with their actions, the plan policies' verdicts, and
//! the approvals bound to the plan's digest. Its rules:
//!
//! - `approve` (boolean): the run is `CONFIRMED`;
//! - `reject` (set of messages): the run is `REJECTED` with them.
//!
//! It is evaluated when a tracked run's plan is ready (so a policy can
//! confirm, say, a drift revert without a human) and at each approval. An
//! error leaves the run `UNCONFIRMED` (fail closed) and is reported.

use outpost_agent::iac::policy::Rego;
use serde_json::{Value, json};

use super::IacError;
use super::model::{Run, RunState};

/// The package every approval policy declares.
pub const PACKAGE: &str = "data.outpost.approval";

/// What the policy decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub approve: bool,
    pub reject: Vec<String>,
}

/// A compiled approval policy.
pub struct ApprovalPolicy {
    rego: Rego,
}

impl ApprovalPolicy {
    /// Compiles `text`; the error says what is wrong (syntax, package, a
    /// rule of the wrong type).
    pub fn compile(name: &str, text: &str) -> Result<ApprovalPolicy, String> {
        let mut p = ApprovalPolicy {
            rego: Rego::compile(name, text, PACKAGE, "an approval policy")?,
        };
        p.evaluate(&json!({"run": {}, "plan": {"changes": [], "verdicts": []}, "approvals": []}))
            .map_err(|e| format!("evaluating it on an empty run failed: {e}"))?;
        Ok(p)
    }

    /// The policy's decision on `input`, or why it could not be evaluated.
    pub fn evaluate(&mut self, input: &Value) -> Result<Decision, String> {
        let package = self.rego.evaluate(input)?;
        let approve = match package.get("approve") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(format!("`approve` must be a boolean, not {other}")),
        };
        let reject = match package.get("reject") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                .collect(),
            Some(other) => {
                return Err(format!("`reject` must be a set of messages, not {other}"));
            }
        };
        Ok(Decision { approve, reject })
    }
}

/// Where a tracked run goes once its plan is ready, by the stack's approval
/// policy `text`: confirmed, discarded, or waiting for approvals (also
/// when the policy fails, with why).
pub fn on_plan(stack: &str, text: &str, run: &Run) -> (RunState, String) {
    let decided = ApprovalPolicy::compile(&format!("{stack}.approval.rego"), text)
        .and_then(|mut p| p.evaluate(&input(run)));
    match decided {
        Ok(d) if !d.reject.is_empty() => (
            RunState::Discarded,
            format!("rejected by the approval policy: {}", d.reject.join("; ")),
        ),
        Ok(d) if d.approve => (
            RunState::Confirmed,
            "approved by the approval policy".to_string(),
        ),
        Ok(_) => (RunState::Unconfirmed, String::new()),
        Err(e) => (
            RunState::Unconfirmed,
            format!("the approval policy could not decide: {e}"),
        ),
    }
}

/// After an approval was added to `run`: the policy confirms it, discards
/// it, or leaves it waiting. An error refuses the approval (nothing is
/// recorded; the approver sees why).
pub fn on_approval(p: &mut ApprovalPolicy, run: &mut Run) -> Result<(), IacError> {
    let d = p
        .evaluate(&input(run))
        .map_err(|e| IacError::Conflict(format!("the approval policy could not decide: {e}")))?;
    let approvers: Vec<&str> = run
        .approvals
        .iter()
        .filter(|a| {
            a.decision == "approve"
                && Some(a.plan_digest.as_str()) == run.plan.as_ref().map(|p| p.plan_digest.as_str())
        })
        .map(|a| a.identity.as_str())
        .collect();
    let by = approvers.join(", ");
    if !d.reject.is_empty() {
        let note = format!("rejected by the approval policy: {}", d.reject.join("; "));
        return run
            .go(RunState::Discarded, note)
            .map_err(IacError::Conflict);
    }
    if d.approve {
        let note = format!("approved by the approval policy (approvals: {by})");
        return run
            .go(RunState::Confirmed, note)
            .map_err(IacError::Conflict);
    }
    Ok(())
}

/// The policy's input for `run`: no values, only what the control plane
/// holds. Approvals are those bound to the plan's current digest.
pub fn input(run: &Run) -> Value {
    let plan = run.plan.clone().unwrap_or_default();
    let approvals: Vec<Value> = run
        .approvals
        .iter()
        .filter(|a| a.plan_digest == plan.plan_digest && a.decision == "approve")
        .map(|a| json!({"identity": a.identity, "comment": a.comment, "at_ms": a.at_ms}))
        .collect();
    json!({
        "run": {
            "id": run.id,
            "stack": run.stack,
            "commit": run.commit,
            "triggered_by": run.triggered_by,
            "drift": run.drift,
        },
        "plan": {
            "digest": plan.plan_digest,
            "changes": plan.changes.iter().map(|c| json!({"address": c.address, "actions": c.actions})).collect::<Vec<_>>(),
            "verdicts": plan.verdicts.iter().map(|v| json!({"source": v.source, "deny": v.deny, "warn": v.warn})).collect::<Vec<_>>(),
        },
        "approvals": approvals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iac::model::{Approval, PlanResult, ResourceChange};

    const POLICY: &str = r#"package outpost.approval

# Drift reverts go by themselves; anything else needs someone from
# security who did not trigger the run.
approve if input.run.drift
approve if {
    some a in input.approvals
    startswith(a.identity, "admin:sec-")
    a.identity != input.run.triggered_by
}
reject contains msg if {
    some c in input.plan.changes
    "delete" in c.actions
    startswith(c.address, "null_resource.keep")
    msg := sprintf("%s is never deleted", [c.address])
}
"#;

    fn run() -> Run {
        let mut r: Run = serde_json::from_value(json!({
            "id": "r1", "stack": "s", "state": "UNCONFIRMED", "commit": "c",
            "source_digest": "d", "plan_job": null, "apply_job": null, "message": "",
            "triggered_by": "admin:sec-ann", "transitions": [], "plan": null,
            "approvals": [], "created_ms": 0
        }))
        .unwrap();
        r.plan = Some(PlanResult {
            plan_digest: "p1".into(),
            changes: vec![ResourceChange {
                address: "null_resource.a".into(),
                actions: vec!["create".into()],
            }],
            ..Default::default()
        });
        r
    }

    fn approve(r: &mut Run, who: &str, digest: &str) {
        r.approvals.push(Approval {
            identity: who.into(),
            decision: "approve".into(),
            comment: String::new(),
            plan_digest: digest.into(),
            at_ms: 0,
        });
    }

    #[test]
    fn decides_from_the_run_its_changes_and_its_approvals() {
        let mut p = ApprovalPolicy::compile("a.rego", POLICY).unwrap();
        let mut r = run();
        assert_eq!(p.evaluate(&input(&r)).unwrap(), Decision::default());
        // The trigger's own approval and an approval of another plan do not
        // count; someone else from security does.
        approve(&mut r, "admin:sec-ann", "p1");
        approve(&mut r, "admin:sec-bob", "p0");
        approve(&mut r, "admin:dev", "p1");
        assert!(!p.evaluate(&input(&r)).unwrap().approve);
        approve(&mut r, "admin:sec-bob", "p1");
        assert!(p.evaluate(&input(&r)).unwrap().approve);
        let mut drift = run();
        drift.drift = true;
        assert!(p.evaluate(&input(&drift)).unwrap().approve);
        let mut keep = run();
        if let Some(plan) = keep.plan.as_mut() {
            plan.changes[0] = ResourceChange {
                address: "null_resource.keep".into(),
                actions: vec!["delete".into(), "create".into()],
            };
        }
        assert_eq!(
            p.evaluate(&input(&keep)).unwrap().reject,
            ["null_resource.keep is never deleted"]
        );
    }

    #[test]
    fn refuses_what_does_not_compile_or_has_the_wrong_shape() {
        assert!(
            ApprovalPolicy::compile("a.rego", "package outpost.approval\napprove if {").is_err()
        );
        let e = ApprovalPolicy::compile("a.rego", "package outpost.plan\n")
            .err()
            .unwrap();
        assert!(e.contains("package outpost.approval"), "{e}");
        let e = ApprovalPolicy::compile("a.rego", "package outpost.approval\napprove := \"yes\"\n")
            .err()
            .unwrap();
        assert!(e.contains("boolean"), "{e}");
    }
}
