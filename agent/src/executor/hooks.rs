//! Extension points around one job's container, for features that need to act
//! at precise moments of its life (the AWS credentials channel, S3 workspaces
//! and artifacts: `crate::aws`). The executor calls them in this order:
//!
//! 1. [`JobHooks::configure`]: the container's configuration is built and its
//!    image is present; the container does not exist yet.
//! 2. [`JobHooks::before_start`]: the workspace and the container exist; the
//!    container has not started.
//! 3. [`JobHooks::after_start`]: the container runs; the job does not count as
//!    started (nor does its timeout run) before this returns.
//! 4. [`JobHooks::after_exit`]: the job's process has ended, however it ended
//!    (if it started); the workspace still exists.
//!
//! A job re-adopted after a restart of the agent gets [`JobHooks::adopted`]
//! (its container runs, or has already ended) instead of 1–3, then 4.
//!
//! An error from 1–3 fails the job with the error as its reason; the container
//! and workspace are removed as always. An error from 4 fails a job that had
//! exited successfully.

use std::path::Path;

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use futures::future::BoxFuture;

use crate::job::Outcome;

/// Error of a hook; its message (and sources) become the job's failure reason.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// What a hook may look at.
pub struct HookContext<'a> {
    pub docker: &'a Docker,
    /// Container name.
    pub container: &'a str,
    /// Host path of the job's workspace.
    pub workspace: &'a Path,
    pub image: &'a str,
}

/// Per-job hooks; see the module documentation for when each runs.
pub trait JobHooks: Send + Sync {
    fn configure<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
        body: &'a mut ContainerCreateBody,
    ) -> BoxFuture<'a, Result<(), HookError>>;

    fn before_start<'a>(&'a self, ctx: &'a HookContext<'a>)
    -> BoxFuture<'a, Result<(), HookError>>;

    fn after_start<'a>(&'a self, ctx: &'a HookContext<'a>) -> BoxFuture<'a, Result<(), HookError>>;

    /// The job was re-adopted: set up again what the agent serves it. An
    /// error is logged; the job is followed to its end all the same.
    fn adopted<'a>(&'a self, _ctx: &'a HookContext<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        Box::pin(async { Ok(()) })
    }

    fn after_exit<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), HookError>>;
}

/// The outcome of a job whose hook failed at `stage`.
pub(crate) fn hook_failed(stage: &str, error: &HookError) -> Outcome {
    Outcome::Failed {
        reason: format!("{stage} failed: {}", super::error_chain(error.as_ref())),
    }
}

/// The outcome after [`JobHooks::after_exit`]: its failure fails a job that
/// had succeeded; any other outcome stays (and the failure is logged).
pub(crate) fn after_exit_outcome(outcome: Outcome, result: Result<(), HookError>) -> Outcome {
    match result {
        Ok(()) => outcome,
        Err(e) => {
            tracing::warn!(error = %super::error_chain(e.as_ref()), "finishing the job failed");
            match outcome {
                Outcome::Exited { code: 0, .. } => hook_failed("finishing the job", &e),
                other => other,
            }
        }
    }
}
