//! One IaC phase as the executor's per-job hooks: what happens before the
//! container starts (source or plan bundle into the workspace, the managed
//! state endpoint prepared), once it has started (the endpoint bound in its
//! network namespace, the script released), and after it exits (the
//! report of the phase).

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use outpost_proto::iac::v1 as iacpb;
use parking_lot::Mutex;
use tracing::info;

use super::backend::{self, Managed};
use super::policy::PlanPolicy;
use super::{IacAgent, IacError, IacTask, apply, plan, state, unpack};
use crate::executor::hooks::{HookContext, HookError, JobHooks};
use crate::job::{LeaseKey, Outcome};

pub(super) struct JobIac {
    pub agent: Arc<IacAgent>,
    pub key: LeaseKey,
    pub task: IacTask,
    pub image: String,
    /// The image's content ID (`sha256:…`), resolved before the container
    /// starts; the plan digest covers it, not the image's name.
    pub image_id: Mutex<String>,
    pub uid: u32,
    pub gid: u32,
    pub stack_policy: Mutex<Option<PlanPolicy>>,
    /// The state the job started with.
    pub state_before: Mutex<plan::StateRef>,
    /// The state endpoint, when the stack's state is managed.
    pub managed: Mutex<Option<Arc<Managed>>>,
}

impl JobIac {
    pub fn new(
        agent: &Arc<IacAgent>,
        key: &LeaseKey,
        spec: &crate::job::JobSpec,
        task: &IacTask,
        (uid, gid): (u32, u32),
        stack_policy: Option<PlanPolicy>,
    ) -> JobIac {
        JobIac {
            agent: agent.clone(),
            key: key.clone(),
            task: task.clone(),
            image: spec.image.clone(),
            image_id: Mutex::new(String::new()),
            uid,
            gid,
            stack_policy: Mutex::new(stack_policy),
            state_before: Mutex::new(plan::StateRef::default()),
            managed: Mutex::new(None),
        }
    }

    /// A blob the lease names, checked against its SHA-256.
    pub async fn fetch_blob(&self, digest: &str) -> Result<Vec<u8>, IacError> {
        let blob = self
            .agent
            .client
            .clone()
            .fetch_blob(iacpb::FetchBlobRequest {
                job_id: self.key.job_id.clone(),
                epoch: self.key.epoch,
                digest: digest.to_string(),
            })
            .await
            .map_err(|s| IacError::Fetch {
                digest: digest.to_string(),
                message: s.message().to_string(),
            })?
            .into_inner();
        let actual = plan::hex(ring::digest::digest(&ring::digest::SHA256, &blob.data).as_ref());
        if actual != digest {
            return Err(IacError::Digest {
                digest: digest.to_string(),
            });
        }
        Ok(blob.data)
    }

    /// Sets up the managed state for this job: the ready pipe its script
    /// waits on and the endpoint's state, opened in memory.
    pub async fn manage_state(
        &self,
        ctx: &HookContext<'_>,
        current: state::Current,
    ) -> Result<(), IacError> {
        let fifo = ctx.workspace.join(backend::READY_FIFO);
        let (uid, gid) = (self.uid, self.gid);
        tokio::task::spawn_blocking(move || crate::netns::ready::make_fifo(&fifo, uid, gid))
            .await
            .map_err(|_| IacError::Join("creating the ready pipe"))?
            .map_err(IacError::Unpack)?;
        *self.state_before.lock() = current.state.clone();
        *self.managed.lock() = Some(Arc::new(Managed::new(
            self.agent.clone(),
            self.key.clone(),
            current.state,
            current.plain,
        )));
        Ok(())
    }

    /// Resolves the image's content ID.
    async fn resolve_image(&self, ctx: &HookContext<'_>) -> Result<String, IacError> {
        let image = ctx
            .docker
            .inspect_image(&self.image)
            .await
            .map_err(|e| IacError::Task(format!("inspecting image {}: {e}", self.image)))?;
        let id = image
            .id
            .filter(|id| id.starts_with("sha256:"))
            .ok_or_else(|| IacError::Task(format!("image {} has no content ID", self.image)))?;
        *self.image_id.lock() = id.clone();
        Ok(id)
    }

    /// The plan and drift phases: the source, and the state unless the
    /// configuration has a backend of its own.
    async fn before_start(&self, ctx: &HookContext<'_>) -> Result<(), IacError> {
        self.resolve_image(ctx).await?;
        if self.task.phase == "apply" {
            return apply::before_start(self, ctx).await;
        }
        self.agent.pool()?;
        let data = self.fetch_blob(&self.task.source_digest).await?;
        let dest = ctx.workspace.join("src");
        let (uid, gid) = (self.uid, self.gid);
        let size = data.len();
        let managed = tokio::task::spawn_blocking(move || {
            unpack(&data, &dest, uid, gid).map_err(IacError::Unpack)?;
            backend::prepare(&dest, uid, gid)
        })
        .await
        .map_err(|_| IacError::Join("unpacking the source"))??;
        info!(digest = %self.task.source_digest, bytes = size, managed_state = managed, "source unpacked");
        if managed {
            let current = state::fetch(&self.agent, &self.key).await?;
            self.manage_state(ctx, current).await?;
        }
        Ok(())
    }

    /// Binds the state endpoint in the job's namespace and releases the
    /// script.
    async fn after_start(&self, ctx: &HookContext<'_>) -> Result<(), IacError> {
        let Some(managed) = self.managed.lock().clone() else {
            return Ok(());
        };
        let pid = crate::netns::ready::container_pid(ctx.docker, ctx.container)
            .await
            .map_err(IacError::State)?;
        managed.serve_in_netns_of(pid).await?;
        crate::netns::ready::release(&ctx.workspace.join(backend::READY_FIFO), "ready")
            .await
            .map_err(|reason| IacError::State(format!("releasing the job failed: {reason}")))?;
        info!(
            pid,
            port = backend::STATE_PORT,
            "state endpoint ready; job released"
        );
        Ok(())
    }

    /// After a restart of the agent: the state endpoint again, inside the
    /// running container's namespace, on the stack's current state (the
    /// script has long been released).
    async fn adopted(&self, ctx: &HookContext<'_>) -> Result<(), IacError> {
        self.resolve_image(ctx).await?;
        let src = ctx.workspace.join("src");
        let managed = tokio::task::spawn_blocking(move || {
            std::fs::symlink_metadata(src.join(backend::BACKEND_FILE)).is_ok_and(|m| m.is_file())
        })
        .await
        .map_err(|_| IacError::Join("looking at the workspace"))?;
        if !managed {
            return Ok(());
        }
        let current = state::fetch(&self.agent, &self.key).await?;
        let endpoint = Arc::new(Managed::new(
            self.agent.clone(),
            self.key.clone(),
            current.state.clone(),
            current.plain,
        ));
        *self.state_before.lock() = current.state;
        *self.managed.lock() = Some(endpoint.clone());
        let pid = crate::netns::ready::container_pid(ctx.docker, ctx.container)
            .await
            .map_err(IacError::State)?;
        endpoint.serve_in_netns_of(pid).await?;
        info!(
            pid,
            port = backend::STATE_PORT,
            "state endpoint bound again for an adopted job"
        );
        Ok(())
    }

    async fn after_exit(&self, ctx: &HookContext<'_>, outcome: &Outcome) -> Result<(), IacError> {
        let managed = self.managed.lock().clone();
        if let Some(m) = &managed {
            m.end().await;
        }
        if self.task.phase == "apply" {
            return apply::after_exit(self, ctx, outcome, managed.as_deref()).await;
        }
        if !matches!(outcome, Outcome::Exited { code: 0, .. }) {
            return Ok(());
        }
        if self.task.phase == "drift" {
            return self.report_drift(ctx).await;
        }
        self.report_plan(ctx).await
    }
}

impl JobHooks for JobIac {
    fn configure<'a>(
        &'a self,
        _ctx: &'a HookContext<'a>,
        _body: &'a mut bollard::models::ContainerCreateBody,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(()) }.boxed()
    }

    fn before_start<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobIac::before_start(self, ctx).await?) }.boxed()
    }

    fn after_start<'a>(&'a self, ctx: &'a HookContext<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobIac::after_start(self, ctx).await?) }.boxed()
    }

    fn adopted<'a>(&'a self, ctx: &'a HookContext<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobIac::adopted(self, ctx).await?) }.boxed()
    }

    fn after_exit<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobIac::after_exit(self, ctx, outcome).await?) }.boxed()
    }
}
