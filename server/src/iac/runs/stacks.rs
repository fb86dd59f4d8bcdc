//! Declaring stacks and fetching their sources: `apply_stacks` (validated,
//! secrets sealed), `sync` (a new commit queues a tracked run), manual
//! triggers and the source poller.

use tracing::{info, warn};

use super::Engine;
use crate::iac::IacError;
use crate::iac::model::{Run, RunKind, Stack, StackSpec};
use crate::model::now_ms;

impl Engine {
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
            if !spec.approval_policy.is_empty() {
                crate::iac::approval::ApprovalPolicy::compile(
                    &format!("{}.approval.rego", spec.name),
                    &spec.approval_policy,
                )
                .map_err(|e| {
                    IacError::BadRequest(format!("stack {}: approval_policy: {e}", spec.name))
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
            crate::iac::source::fetch(&mirror, &spec.repo, &spec.branch, &spec.project_root).await;
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

    pub(super) async fn queue(&self, stack: &Stack, who: &str, why: &str) -> Result<Run, IacError> {
        let (Some(commit), Some(digest)) = (&stack.commit, &stack.source_digest) else {
            return Err(IacError::Conflict(format!(
                "stack {} has no fetched source",
                stack.spec.name
            )));
        };
        let run = crate::iac::launch::new_run(
            &stack.spec.name,
            RunKind::Tracked,
            commit,
            digest,
            who,
            why,
        );
        self.insert_run(run).await
    }

    /// Polls the sources whose interval is due.
    pub(super) async fn poll_due(&self) -> Result<(), IacError> {
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

    /// Seals a declared stack's secrets and webhook secrets (keeping the
    /// old ciphertext of unchanged values, so the stack stays unchanged).
    pub(super) fn seal(
        &self,
        mut spec: StackSpec,
        old: Option<&StackSpec>,
    ) -> Result<StackSpec, IacError> {
        let fail = |e: crate::iac::secrets::SecretsError| IacError::BadRequest(e.to_string());
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
}
