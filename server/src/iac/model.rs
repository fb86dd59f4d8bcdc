//! Domain types of the IaC layer: stacks and runs. `iac::wire` converts them
//! to and from `outpost.iac.v1`; `iac::store` persists them as JSON.

use std::collections::BTreeMap;

/// What a stack is declared as (`stacks.toml` or the API).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StackSpec {
    pub name: String,
    /// Git URL the control plane fetches with the `git` program.
    pub repo: String,
    pub branch: String,
    /// Directory inside the repository that holds the Terraform configuration.
    pub project_root: String,
    pub image: String,
    /// `terraform` or `tofu`.
    pub tool: String,
    /// Non-secret Terraform variables.
    pub variables: BTreeMap<String, String>,
    /// Agent labels a run needs.
    pub labels: BTreeMap<String, String>,
    pub autodeploy: bool,
    /// Rego source of the stack's plan policy (`package outpost.plan`).
    pub plan_policy: String,
    pub approvals_required: u32,
    /// Rego source of the stack's approval policy (`package
    /// outpost.approval`, `iac::approval`); when set, it decides instead of
    /// `approvals_required`.
    pub approval_policy: String,
    /// Zero: no polling.
    pub poll_interval_ms: u64,
    /// Secret files of the run's jobs, sealed (`iac::secrets`).
    pub secrets: BTreeMap<String, Sealed>,
    /// Secret values as declared, on their way in; sealed into `secrets`
    /// and cleared before the stack is stored.
    #[serde(skip)]
    pub secret_values: Vec<crate::model::JobSecret>,
    /// AWS role of the run's jobs.
    pub aws: Option<crate::model::AwsRole>,
    /// Scheduled drift checks.
    pub drift: Option<crate::iac::drift::DriftSpec>,
    /// Webhook targets of the stack's events.
    pub notify: Vec<crate::notify::Target>,
}

/// A secret value encrypted at rest (`iac::secrets::Sealer`): a keyed
/// digest to compare values, and the ciphertext. `Debug` shows neither.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Sealed {
    pub mac: String,
    pub sealed: String,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealed(<redacted>)")
    }
}

/// Longest stack name.
const MAX_NAME: usize = 63;
/// Largest plan policy (Rego source) a stack may carry; it travels in
/// every lease of the stack's runs.
pub const MAX_PLAN_POLICY_BYTES: usize = 256 << 10;
/// Largest total of a stack's variable names and values.
pub const MAX_VARIABLES_BYTES: usize = 256 << 10;
/// Longest repository URL, branch, project root, image or tool.
pub const MAX_FIELD_BYTES: usize = 4096;

impl StackSpec {
    /// Fills defaults and checks what the control plane relies on; the
    /// error names the field.
    pub fn normalized(mut self) -> Result<StackSpec, String> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > MAX_NAME
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || n.starts_with('-')
        {
            return Err(format!(
                "stack name {n:?} must be 1-{MAX_NAME} letters, digits, '-' or '_' (not starting with '-')"
            ));
        }
        if self.repo.trim().is_empty() {
            return Err(format!("stack {n}: `repo` is required"));
        }
        if self.repo.starts_with('-') {
            return Err(format!("stack {n}: `repo` may not start with '-'"));
        }
        if self.branch.is_empty() {
            self.branch = "main".into();
        }
        if self.branch.starts_with('-')
            || self.branch.contains("..")
            || self.branch.chars().any(|c| c.is_whitespace() || c == ':')
        {
            return Err(format!(
                "stack {n}: `branch` {:?} is not a branch name",
                self.branch
            ));
        }
        let root = self.project_root.trim_matches('/').to_string();
        if root.split('/').any(|p| p == "..") || root.starts_with('-') {
            return Err(format!(
                "stack {n}: `project_root` {:?} must stay inside the repository",
                self.project_root
            ));
        }
        self.project_root = if root.is_empty() { ".".into() } else { root };
        if self.image.trim().is_empty() {
            return Err(format!("stack {n}: `image` is required"));
        }
        if self.tool.is_empty() {
            self.tool = "terraform".into();
        }
        if !matches!(self.tool.as_str(), "terraform" | "tofu") {
            return Err(format!(
                "stack {n}: `tool` must be \"terraform\" or \"tofu\", not {:?}",
                self.tool
            ));
        }
        for k in self.variables.keys() {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "stack {n}: variable name {k:?} must be letters, digits or '_'"
                ));
            }
        }
        let vars: usize = self.variables.iter().map(|(k, v)| k.len() + v.len()).sum();
        if vars > MAX_VARIABLES_BYTES {
            return Err(format!(
                "stack {n}: variables take {vars} bytes, more than the limit of {MAX_VARIABLES_BYTES}"
            ));
        }
        if self.plan_policy.len() > MAX_PLAN_POLICY_BYTES {
            return Err(format!(
                "stack {n}: plan_policy is {} bytes, more than the limit of {MAX_PLAN_POLICY_BYTES}",
                self.plan_policy.len()
            ));
        }
        for (field, v) in [
            ("repo", &self.repo),
            ("branch", &self.branch),
            ("project_root", &self.project_root),
            ("image", &self.image),
            ("tool", &self.tool),
        ] {
            if v.len() > MAX_FIELD_BYTES {
                return Err(format!(
                    "stack {n}: `{field}` is longer than {MAX_FIELD_BYTES} bytes"
                ));
            }
        }
        if self.approval_policy.len() > MAX_PLAN_POLICY_BYTES {
            return Err(format!(
                "stack {n}: approval_policy is {} bytes, more than the limit of {MAX_PLAN_POLICY_BYTES}",
                self.approval_policy.len()
            ));
        }
        if !self.approval_policy.is_empty() && self.approvals_required > 1 {
            return Err(format!(
                "stack {n}: approvals_required and approval_policy are two rules for one decision: keep one"
            ));
        }
        if self.approvals_required == 0 {
            self.approvals_required = 1;
        }
        crate::iac::secrets::check_names(&self.secret_values)
            .map_err(|e| format!("stack {n}: {e}"))?;
        if let Some(aws) = &self.aws {
            let arn = aws.role_arn.trim();
            if !arn.starts_with("arn:") || arn.len() > 2048 {
                return Err(format!(
                    "stack {n}: aws role {:?} is not a role ARN",
                    aws.role_arn
                ));
            }
            if aws.session_policy.len() > 2048 {
                return Err(format!(
                    "stack {n}: the aws session policy is longer than 2048 bytes"
                ));
            }
        }
        if let Some(d) = &self.drift {
            d.check().map_err(|e| format!("stack {n}: drift: {e}"))?;
        }
        for t in &self.notify {
            t.check().map_err(|e| format!("stack {n}: notify: {e}"))?;
        }
        Ok(self)
    }
}

/// A stack with what the control plane learnt about its source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stack {
    pub spec: StackSpec,
    /// Commit of the tracked branch at the last successful fetch.
    pub commit: Option<String>,
    pub source_digest: Option<String>,
    /// The last fetch's error, if it failed.
    pub fetch_error: Option<String>,
    pub fetched_ms: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Lifecycle of a run (see DESIGN.md, "The IaC workflow layer").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    Queued,
    Planning,
    Unconfirmed,
    Confirmed,
    Applying,
    Finished,
    Failed,
    Discarded,
    Cancelled,
    Stale,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "QUEUED",
            RunState::Planning => "PLANNING",
            RunState::Unconfirmed => "UNCONFIRMED",
            RunState::Confirmed => "CONFIRMED",
            RunState::Applying => "APPLYING",
            RunState::Finished => "FINISHED",
            RunState::Failed => "FAILED",
            RunState::Discarded => "DISCARDED",
            RunState::Cancelled => "CANCELLED",
            RunState::Stale => "STALE",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        [
            RunState::Queued,
            RunState::Planning,
            RunState::Unconfirmed,
            RunState::Confirmed,
            RunState::Applying,
            RunState::Finished,
            RunState::Failed,
            RunState::Discarded,
            RunState::Cancelled,
            RunState::Stale,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Finished
                | RunState::Failed
                | RunState::Discarded
                | RunState::Cancelled
                | RunState::Stale
        )
    }

    /// States that hold the stack lock.
    pub fn holds_lock(self) -> bool {
        matches!(
            self,
            RunState::Planning | RunState::Unconfirmed | RunState::Confirmed | RunState::Applying
        )
    }

    /// Whether the state machine allows `self → to`.
    pub fn can_go(self, to: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, to),
            (Queued, Planning | Cancelled)
                | (
                    Planning,
                    Finished | Unconfirmed | Confirmed | Discarded | Failed | Cancelled
                )
                | (Unconfirmed, Confirmed | Discarded | Cancelled | Stale)
                | (Confirmed, Applying | Cancelled | Stale)
                | (Applying, Finished | Failed | Stale)
        )
    }
}

/// What a run is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// The stack's branch: plan, approval, apply; one at a time (the stack lock).
    #[default]
    Tracked,
    /// Any ref, plan only, side by side with tracked runs.
    Proposed,
    /// A drift check: plan only, never while a tracked run holds the lock.
    Drift,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Tracked => "tracked",
            RunKind::Proposed => "proposed",
            RunKind::Drift => "drift",
        }
    }
}

/// One entry of a run's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Transition {
    pub state: RunState,
    pub at_ms: i64,
    pub note: String,
}

/// A resource the plan changes (address and actions; never values).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourceChange {
    pub address: String,
    pub actions: Vec<String>,
}

/// A policy's verdict on the plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyVerdict {
    /// `stack` or `agent`.
    pub source: String,
    pub deny: Vec<String>,
    pub warn: Vec<String>,
}

/// A decision on a run, kept as its audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Approval {
    pub identity: String,
    /// approve, reject, discard, cancel
    pub decision: String,
    pub comment: String,
    pub plan_digest: String,
    pub at_ms: i64,
}

/// The plan phase's result, as the agent reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanResult {
    pub has_changes: bool,
    pub changes: Vec<ResourceChange>,
    pub verdicts: Vec<PolicyVerdict>,
    pub plan_digest: String,
    /// Blob of the plan bundle sealed to the pool key (ciphertext only).
    #[serde(default)]
    pub bundle_digest: String,
    /// The state the plan was made against (`state_lineage` empty: none).
    #[serde(default)]
    pub state_serial: u64,
    #[serde(default)]
    pub state_lineage: String,
    /// A drift check: what the refresh-only plan found.
    #[serde(default)]
    pub drifted: Vec<ResourceChange>,
}

impl PlanResult {
    pub fn warned(&self) -> bool {
        self.verdicts.iter().any(|v| !v.warn.is_empty())
    }
}

/// A run of a stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Run {
    pub id: String,
    pub stack: String,
    pub state: RunState,
    pub commit: String,
    pub source_digest: String,
    pub plan_job: Option<String>,
    pub apply_job: Option<String>,
    pub message: String,
    pub triggered_by: String,
    pub transitions: Vec<Transition>,
    pub plan: Option<PlanResult>,
    pub approvals: Vec<Approval>,
    pub created_ms: i64,
    #[serde(default)]
    pub kind: RunKind,
    /// A proposed run's ref.
    #[serde(default)]
    pub git_ref: String,
    /// A tracked run queued to revert drift (policy input `run.drift`).
    #[serde(default)]
    pub drift: bool,
    /// The apply phase, once it started (`iac::apply`).
    #[serde(default)]
    pub apply: Option<ApplyResult>,
}

/// What the control plane knows of a run's apply phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ApplyResult {
    /// Leases handed out for the apply job; an apply is never leased twice.
    pub leases: u32,
    /// The agent found the state moved since the plan (nothing applied).
    pub stale: bool,
    pub message: String,
    /// Outputs (JSON values; sensitive ones redacted by the agent).
    pub outputs: BTreeMap<String, String>,
}

impl Run {
    /// Moves to `to` if the state machine allows it, recording when and why.
    pub fn go(&mut self, to: RunState, note: impl Into<String>) -> Result<(), String> {
        if !self.state.can_go(to) {
            return Err(format!(
                "run {} is {}; it cannot become {}",
                self.id,
                self.state.as_str(),
                to.as_str()
            ));
        }
        let note = note.into();
        if to.is_final() || !note.is_empty() {
            self.message = note.clone();
        }
        self.state = to;
        self.transitions.push(Transition {
            state: to,
            at_ms: crate::model::now_ms(),
            note,
        });
        Ok(())
    }

    /// Distinct identities whose approval counts (the trigger's never does).
    pub fn approvers(&self) -> std::collections::BTreeSet<&str> {
        let digest = self.plan.as_ref().map(|p| p.plan_digest.as_str());
        self.approvals
            .iter()
            .filter(|a| a.decision == "approve" && Some(a.plan_digest.as_str()) == digest)
            .filter(|a| a.identity != self.triggered_by)
            .map(|a| a.identity.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Run {
        Run {
            id: "r".into(),
            stack: "s".into(),
            state: RunState::Queued,
            commit: String::new(),
            source_digest: String::new(),
            plan_job: None,
            apply_job: None,
            message: String::new(),
            triggered_by: "admin:alice".into(),
            transitions: Vec::new(),
            plan: None,
            approvals: Vec::new(),
            created_ms: 0,
            apply: None,
            kind: RunKind::Tracked,
            git_ref: String::new(),
            drift: false,
        }
    }

    #[test]
    fn the_state_machine_refuses_skipping_states() {
        let mut r = run();
        assert!(r.go(RunState::Applying, "").is_err());
        r.go(RunState::Planning, "").unwrap();
        r.go(RunState::Unconfirmed, "").unwrap();
        assert!(r.go(RunState::Planning, "").is_err());
        r.go(RunState::Discarded, "by bob").unwrap();
        assert_eq!(r.message, "by bob");
        assert!(r.go(RunState::Confirmed, "").is_err());
        assert_eq!(r.transitions.len(), 3);
    }

    #[test]
    fn approvers_are_distinct_bound_to_the_digest_and_exclude_the_trigger() {
        let mut r = run();
        r.plan = Some(PlanResult {
            plan_digest: "d1".into(),
            ..Default::default()
        });
        let a = |who: &str, digest: &str| Approval {
            identity: who.into(),
            decision: "approve".into(),
            comment: String::new(),
            plan_digest: digest.into(),
            at_ms: 0,
        };
        r.approvals = vec![
            a("admin:alice", "d1"),
            a("admin:bob", "d1"),
            a("admin:bob", "d1"),
            a("admin:carol", "d0"),
        ];
        assert_eq!(r.approvers().into_iter().collect::<Vec<_>>(), ["admin:bob"]);
    }

    #[test]
    fn specs_are_checked_and_defaulted() {
        let ok = StackSpec {
            name: "net-prod".into(),
            repo: "file:///r".into(),
            image: "img".into(),
            project_root: "/infra/".into(),
            ..Default::default()
        }
        .normalized()
        .unwrap();
        assert_eq!(
            (
                ok.branch.as_str(),
                ok.tool.as_str(),
                ok.project_root.as_str(),
                ok.approvals_required
            ),
            ("main", "terraform", "infra", 1)
        );
        let bad = |f: fn(&mut StackSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.normalized().unwrap_err()
        };
        assert!(bad(|s| s.name = "a b".into()).contains("stack name"));
        assert!(bad(|s| s.branch = "--upload-pack=x".into()).contains("branch"));
        assert!(bad(|s| s.project_root = "../etc".into()).contains("project_root"));
        assert!(bad(|s| s.tool = "pulumi".into()).contains("tool"));
        assert!(bad(|s| s.repo = "-oProxyCommand=x".into()).contains("repo"));
    }
}
