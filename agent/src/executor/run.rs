//! Drives one job container through the Docker engine: image, workspace,
//! create, attach, start, supervise (cancel, timeout), collect, remove.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum, ImageConfig, SystemInfo};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, KillContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use outpost_init::protocol::{EXIT_LEASE_EXPIRED, EXIT_TIMED_OUT, Lease};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::hooks::{self, HookContext, JobHooks};
use super::mask::Masker;
use super::spec::{self, LABEL_EPOCH, LABEL_JOB, LABEL_WORK_DIR};
use super::{
    ExecError, PullPolicy, SandboxConfig, disk, error_chain, fence, network, secrets, workspace,
};
use crate::job::{JobSpec, LeaseKey, Network, Outcome};

/// Reason reported when `cancel` stops a job (the token carries no reason;
/// the caller knows it and may replace this one).
const CANCEL_REASON: &str = "the job was cancelled";
/// How long to wait for a container to go after `SIGKILL`.
const KILL_WAIT: Duration = Duration::from_secs(30);
/// How long to wait for the rest of the output of a container whose end could
/// not be observed (it is killed first).
const ORPHAN_OUTPUT_WAIT: Duration = Duration::from_secs(5);
/// Attempts at re-following a container whose wait request failed.
const WAIT_ATTEMPTS: u32 = 3;
/// Attempts at removing a container while the engine reports a conflict.
const REMOVE_ATTEMPTS: u32 = 5;
/// Reason reported when `outpost-init` stopped a job whose lease ran out.
pub const LEASE_EXPIRED_REASON: &str = "stopped in its container: the lease expired before the \
     agent renewed it (the agent was gone or could not reach the control plane)";
/// How much earlier than the agent's own timer `outpost-init` may see a
/// job's timeout (it starts counting a moment before the agent does).
const TIMEOUT_SLACK: Duration = Duration::from_secs(2);

/// Runs jobs as sandboxed containers on the local Docker engine.
#[derive(Debug, Clone)]
pub struct DockerExecutor {
    docker: Docker,
    /// The configuration, with `work_dir` made canonical.
    cfg: SandboxConfig,
    uid: u32,
    gid: u32,
    /// This agent's share of the host's secrets and firewall rules.
    scope: String,
    /// The latest lease of each job, written to its lease file when its
    /// container is prepared and on every renewal.
    leases: Arc<Mutex<HashMap<LeaseKey, Lease>>>,
    /// Held while spare workspace images are being formatted.
    refilling: Arc<tokio::sync::Mutex<()>>,
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Why the executor stopped a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    TimedOut,
    /// The output went past `max_output_bytes` (the limit).
    OutputLimit(u64),
}

impl Stop {
    fn outcome(self) -> Outcome {
        match self {
            Stop::Cancelled => Outcome::Cancelled {
                reason: CANCEL_REASON.to_string(),
            },
            Stop::TimedOut => Outcome::TimedOut,
            Stop::OutputLimit(limit) => Outcome::Failed {
                reason: format!(
                    "stopped: the job's output exceeded this agent's limit of {limit} bytes \
                     (max_output_bytes); nothing past the limit was kept"
                ),
            },
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Stop::Cancelled => "cancelled",
            Stop::TimedOut => "timed out",
            Stop::OutputLimit(_) => "output limit exceeded",
        }
    }
}

impl DockerExecutor {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket),
    /// negotiates the API version down to the engine's, pings it, checks the
    /// configured runtime is registered and prepares `work_dir`.
    pub async fn connect(cfg: SandboxConfig) -> Result<Self, ExecError> {
        let (uid, gid) = cfg.validate()?;
        let docker = Docker::connect_with_local_defaults()
            .map_err(|source| ExecError::Connect { source })?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|source| ExecError::NegotiateVersion { source })?;
        docker
            .ping()
            .await
            .map_err(|source| ExecError::Ping { source })?;
        let info = docker
            .info()
            .await
            .map_err(|source| ExecError::EngineInfo {
                what: "info",
                source,
            })?;
        if let Some(runtime) = &cfg.runtime {
            check_runtime(runtime, &info)?;
        }
        let work_dir = workspace::prepare_work_dir(&cfg.work_dir).await?;
        let scope = spec::agent_scope(&work_dir);
        let secrets_dir = secrets::prepare(&cfg.secrets_dir, &scope).await?;
        let cfg = SandboxConfig {
            work_dir,
            secrets_dir,
            ..cfg
        };
        fence::prepare(&spec::init_binary(&cfg), &spec::leases_dir(&cfg)).await?;
        workspace::refill_disks(&spec::disks_dir(&cfg), cfg.workspace_bytes, uid, gid).await?;
        tracing::info!(
            api_version = %docker.client_version(),
            engine_version = info.server_version.as_deref().unwrap_or("unknown"),
            storage_driver = info.driver.as_deref().unwrap_or("unknown"),
            cgroup_version = ?info.cgroup_version,
            runtime = cfg.runtime.as_deref().unwrap_or("default"),
            work_dir = %cfg.work_dir.display(),
            secrets_dir = %cfg.secrets_dir.display(),
            allow_egress = cfg.allow_egress,
            "docker engine ready"
        );
        Ok(DockerExecutor {
            docker,
            cfg,
            uid,
            gid,
            scope,
            leases: Arc::default(),
            refilling: Arc::default(),
        })
    }

    /// The configuration in force (`work_dir` canonical).
    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// Sets the lease of `key` as of now: its lease file gets it at once if
    /// the job's container exists, else when the container is prepared.
    /// `outpost-init` stops the job at the lease's deadlines by itself. Only
    /// a lease the control plane granted or renewed may be set (never one
    /// guessed after a restart). A job run without a lease gets
    /// [`Lease::Unbounded`] (only its timeout bounds it).
    pub fn set_lease(&self, key: &LeaseKey, lease: Lease) {
        self.leases.lock().insert(key.clone(), lease);
        let Ok(dir) = spec::lease_dir(key, &self.cfg) else {
            return;
        };
        if let Err(e) = fence::renew(&dir, &lease) {
            tracing::warn!(job_id = %key.job_id, epoch = key.epoch, error = %e, "writing the job's lease file failed");
        }
    }

    /// At a clean exit, once no job runs: removes this agent's secrets
    /// directory and unmounts the secrets tmpfs if the agent mounted it and
    /// no other agent uses it.
    pub async fn shutdown(&self) {
        let scope_dir = spec::secrets_scope_dir(&self.cfg);
        match secrets::release(&self.cfg.secrets_dir, &scope_dir).await {
            Ok(true) => {
                tracing::info!(path = %self.cfg.secrets_dir.display(), "unmounted the secrets tmpfs")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "releasing the secrets tmpfs failed")
            }
        }
    }

    /// Forgets the lease of a job the agent no longer holds.
    pub fn forget_lease(&self, key: &LeaseKey) {
        self.leases.lock().remove(key);
    }

    /// A job that failed with its workspace full fails for that reason.
    fn workspace_full(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        workspace: &Path,
        outcome: Outcome,
    ) -> Outcome {
        let bytes = spec::validate(key, spec, &self.cfg)
            .map(|l| l.workspace_bytes)
            .unwrap_or(self.cfg.workspace_bytes);
        match outcome {
            Outcome::Exited { code, .. } if code != 0 && disk::is_full(workspace, bytes) => {
                Outcome::Failed {
                    reason: format!(
                        "workspace full ({} MiB): the job wrote as much as its workspace holds \
                         (exit code {code})",
                        bytes >> 20
                    ),
                }
            }
            outcome => outcome,
        }
    }

    /// Whether the lease in the job's lease file is past its stop time.
    fn lease_over(&self, key: &LeaseKey) -> bool {
        let lease = spec::lease_dir(key, &self.cfg)
            .ok()
            .and_then(|dir| fence::read(&dir));
        matches!(lease, Some(Lease::Until { stop_at, .. }) if stop_at <= SystemTime::now())
    }

    /// Runs one job to its end.
    ///
    /// Output (stdout and stderr, combined in arrival order, raw bytes) goes
    /// to `output`; a full channel slows the container's stream
    /// (backpressure), never drops bytes, so the caller must keep receiving
    /// while this runs. If the receiver is dropped the rest is discarded.
    ///
    /// `cancel` stops the job with exactly one `SIGINT` (to the job's process
    /// group when the engine has an init), then `SIGKILL` after `stop_grace`
    /// if it still runs; `spec.timeout`, counted from the start of the
    /// process, does the same. `started` fires once the process runs.
    ///
    /// Never panics; every error becomes [`Outcome::Failed`] with a reason
    /// meant for the job's owner. The container and the workspace are always
    /// removed before this returns (or in a background task if this future
    /// is dropped). A key must not be run twice at once.
    pub async fn run(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        output: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
        started: oneshot::Sender<()>,
    ) -> Outcome {
        self.run_with_hooks(key, spec, output, cancel, started, None)
            .await
    }

    /// [`run`](Self::run), calling `hooks` at the points described in
    /// [`hooks`](super::hooks) (used by `crate::aws`).
    pub async fn run_with_hooks(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        output: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
        started: oneshot::Sender<()>,
        hooks: Option<&dyn JobHooks>,
    ) -> Outcome {
        let span = tracing::info_span!("job", job_id = %key.job_id, epoch = key.epoch);
        async move {
            let (name, workspace) = match (
                spec::container_name(key),
                spec::workspace_dir(key, &self.cfg.work_dir),
            ) {
                (Ok(name), Ok(workspace)) => (name, workspace),
                (Err(e), _) | (_, Err(e)) => return failed(ExecError::from(e)),
            };
            let mut cleanup = match self.leftovers(key, spec, &name, &workspace) {
                Ok(leftovers) => Cleanup {
                    docker: self.docker.clone(),
                    leftovers,
                    done: false,
                },
                Err(e) => return failed(e),
            };
            let outcome = self
                .execute(key, spec, &name, &workspace, output, cancel, started, hooks)
                .await;
            cleanup.run().await;
            self.forget_lease(key);
            match &outcome {
                Outcome::Failed { reason } => tracing::warn!(%reason, "job failed"),
                outcome => tracing::info!(?outcome, "job finished"),
            }
            outcome
        }
        .instrument(span)
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        name: &str,
        workspace: &Path,
        output: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
        started: oneshot::Sender<()>,
        hooks: Option<&dyn JobHooks>,
    ) -> Outcome {
        let mut body = match spec::container_config(key, spec, &self.cfg, workspace) {
            Ok(body) => body,
            Err(e) => return failed(e.into()),
        };
        // Only the pull can take long; the steps after it are not cut short,
        // so that nothing is created behind the cleanup's back.
        let image = tokio::select! {
            biased;
            () = cancel.cancelled() => return Stop::Cancelled.outcome(),
            image = self.ensure_image(&spec.image) => image,
        };
        let image = match image {
            Ok(image) => image,
            Err(e) => return failed(e),
        };
        let ctx = HookContext {
            docker: &self.docker,
            container: name,
            workspace,
            image: &spec.image,
        };
        if let Some(h) = hooks
            && let Err(e) = h.configure(&ctx, &mut body).await
        {
            return hooks::hook_failed("configuring the container", &e);
        }
        // outpost-init runs whatever the container would have run.
        if let Err(e) = spec::supervise(&mut body, image.as_ref(), &self.cfg, spec.timeout) {
            return failed(e.into());
        }
        // Whatever a hook changed, the sandbox must still hold.
        if let Err(e) = spec::check_sandbox(&body, key, &self.cfg, workspace) {
            return failed(e.into());
        }
        if let Err(e) = self.prepare(key, spec, name, workspace, body).await {
            return failed(e);
        }
        if let Some(h) = hooks {
            let r = tokio::select! {
                biased;
                () = cancel.cancelled() => return Stop::Cancelled.outcome(),
                r = h.before_start(&ctx) => r,
            };
            if let Err(e) = r {
                return hooks::hook_failed("preparing the job", &e);
            }
        }

        // Attach before start: the engine registers the attachment before it
        // answers, so not a byte of a process that prints and exits at once
        // is lost, and a slow reader slows the container (backpressure).
        let attach_options = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = match self
            .docker
            .attach_container(name, Some(attach_options))
            .await
        {
            Ok(attached) => attached,
            Err(source) => {
                return failed(ExecError::Attach {
                    name: name.to_string(),
                    source,
                });
            }
        };
        let over_limit = CancellationToken::new();
        let filter = self.output_filter(masker(spec, Vec::new()), 0, &over_limit, true);
        let pump = spawn_output(attached.output, output, filter);
        if cancel.is_cancelled() {
            return Stop::Cancelled.outcome();
        }
        if let Err(source) = self.docker.start_container(name, None).await {
            return failed(ExecError::StartContainer {
                name: name.to_string(),
                source,
            });
        }
        if let Some(h) = hooks {
            let r = tokio::select! {
                biased;
                () = cancel.cancelled() => return Stop::Cancelled.outcome(),
                r = h.after_start(&ctx) => r,
            };
            if let Err(e) = r {
                return hooks::hook_failed("starting the job", &e);
            }
        }
        tracing::info!(container = name, "job process started");
        // The caller may have stopped listening; that changes nothing here.
        let _ = started.send(());

        let outcome = self
            .follow(key, name, pump, spec.timeout, &cancel, &over_limit, false)
            .await;
        let outcome = self.workspace_full(key, spec, workspace, outcome);
        match hooks {
            Some(h) => {
                let r = h.after_exit(&ctx, &outcome).await;
                hooks::after_exit_outcome(outcome, r)
            }
            None => outcome,
        }
    }

    /// Supervises a running container to its end, then collects the rest of
    /// its output. With `from_log` the output comes from the container's log
    /// and, once the container is gone, the log is read once more for its end.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        key: &LeaseKey,
        name: &str,
        mut pump: AbortOnDropHandle<Forwarded>,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        over_limit: &CancellationToken,
        from_log: bool,
    ) -> Outcome {
        let began = Instant::now();
        let (outcome, exited) = self.supervise(name, timeout, cancel, over_limit).await;
        if !exited {
            // Its end was not observed: make sure it is gone so that the
            // output stream ends.
            let _ = self.signal(name, "SIGKILL").await;
            if tokio::time::timeout(ORPHAN_OUTPUT_WAIT, &mut pump)
                .await
                .is_err()
            {
                tracing::warn!(container = name, "output did not end; dropping the rest");
            }
        } else {
            match (&mut pump).await {
                Ok(done) if from_log => self.read_log_tail(name, done).await,
                Ok(done) => tracing::debug!(bytes = done.position, "output complete"),
                Err(e) => tracing::warn!(error = %e, "output task failed"),
            }
        }
        // A job that ended by itself right after going past the limit still
        // failed: its output is incomplete.
        match outcome {
            Outcome::Exited { .. } if over_limit.is_cancelled() => {
                Stop::OutputLimit(self.cfg.max_output_bytes).outcome()
            }
            // outpost-init's own stops, when they are real (a job may exit
            // with these codes by itself).
            Outcome::Exited { code, .. }
                if code == i64::from(EXIT_LEASE_EXPIRED) && self.lease_over(key) =>
            {
                Outcome::Failed {
                    reason: LEASE_EXPIRED_REASON.to_string(),
                }
            }
            Outcome::Exited { code, .. }
                if code == i64::from(EXIT_TIMED_OUT)
                    && timeout.is_some_and(|t| began.elapsed() + TIMEOUT_SLACK >= t) =>
            {
                Outcome::TimedOut
            }
            outcome => outcome,
        }
    }

    /// Whether the container of `key` exists (in any state) and was created
    /// by an agent with this `work_dir`, i.e. whether [`adopt`](Self::adopt)
    /// can follow it.
    pub async fn container_exists(&self, key: &LeaseKey) -> bool {
        let Ok(name) = spec::container_name(key) else {
            return false;
        };
        match self.docker.inspect_container(&name, None).await {
            Ok(inspect) => {
                let labels = inspect.config.and_then(|c| c.labels).unwrap_or_default();
                let epoch = key.epoch.to_string();
                let work_dir = self.cfg.work_dir.to_string_lossy();
                labels.get(LABEL_JOB) == Some(&key.job_id)
                    && labels.get(LABEL_EPOCH) == Some(&epoch)
                    && labels.get(LABEL_WORK_DIR).map(String::as_str) == Some(&*work_dir)
            }
            Err(e) if status(&e) == Some(404) => false,
            Err(source) => {
                let e = ExecError::InspectContainer { name, source };
                tracing::warn!(error = %error_chain(&e), "cannot tell whether a job container exists");
                false
            }
        }
    }

    /// Follows the container of a job that an earlier run of this agent
    /// started (after a restart), to its end, like [`run`](Self::run) does.
    ///
    /// Output is replayed from the container's log from the start, the first
    /// `skip` bytes (already delivered before the restart) left out. The
    /// timeout counts from the container's original start. Cancel, grace,
    /// cleanup and the never-panics rule are those of `run`.
    pub async fn adopt(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        skip: u64,
        output: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    ) -> Outcome {
        self.adopt_with_hooks(key, spec, skip, output, cancel, None)
            .await
    }

    /// [`adopt`](Self::adopt), with [`JobHooks::adopted`] once the container
    /// is found and [`JobHooks::after_exit`] at its end.
    pub async fn adopt_with_hooks(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        skip: u64,
        output: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
        hooks: Option<&dyn JobHooks>,
    ) -> Outcome {
        let span =
            tracing::info_span!("job", job_id = %key.job_id, epoch = key.epoch, adopted = true);
        async move {
            let (name, workspace) = match (
                spec::container_name(key),
                spec::workspace_dir(key, &self.cfg.work_dir),
            ) {
                (Ok(name), Ok(workspace)) => (name, workspace),
                (Err(e), _) | (_, Err(e)) => return failed(ExecError::from(e)),
            };
            let mut cleanup = match self.leftovers(key, spec, &name, &workspace) {
                Ok(leftovers) => Cleanup {
                    docker: self.docker.clone(),
                    leftovers,
                    done: false,
                },
                Err(e) => return failed(e),
            };
            let ctx = HookContext {
                docker: &self.docker,
                container: &name,
                workspace: &workspace,
                image: &spec.image,
            };
            if let Some(h) = hooks
                && let Err(e) = h.adopted(&ctx).await
            {
                tracing::warn!(error = %super::error_chain(e.as_ref()), "setting up the adopted job again failed");
            }
            let mut outcome = self
                .follow_adopted(key, &name, spec, skip, output, &cancel)
                .await;
            if let Some(h) = hooks {
                let r = h.after_exit(&ctx, &outcome).await;
                outcome = hooks::after_exit_outcome(outcome, r);
            }
            cleanup.run().await;
            self.forget_lease(key);
            match &outcome {
                Outcome::Failed { reason } => tracing::warn!(%reason, "adopted job failed"),
                outcome => tracing::info!(?outcome, "adopted job finished"),
            }
            outcome
        }
        .instrument(span)
        .await
    }

    async fn follow_adopted(
        &self,
        key: &LeaseKey,
        name: &str,
        spec: &JobSpec,
        skip: u64,
        output: mpsc::Sender<Bytes>,
        cancel: &CancellationToken,
    ) -> Outcome {
        let state = match self.docker.inspect_container(name, None).await {
            Ok(inspect) => inspect.state.unwrap_or_default(),
            Err(e) if status(&e) == Some(404) => {
                return Outcome::Failed {
                    reason: "the job's container no longer exists".to_string(),
                };
            }
            Err(source) => {
                return failed(ExecError::InspectContainer {
                    name: name.to_string(),
                    source,
                });
            }
        };
        if state.status == Some(ContainerStateStatusEnum::CREATED) {
            // The agent stopped between create and start.
            return Outcome::Failed {
                reason: "the agent stopped before the job's process started".to_string(),
            };
        }
        let timeout = spec.timeout.map(|timeout| {
            let ran = state
                .started_at
                .as_deref()
                .and_then(parse_engine_time)
                .and_then(|started| SystemTime::now().duration_since(started).ok());
            match ran {
                Some(ran) => timeout.saturating_sub(ran),
                None => {
                    tracing::warn!("unknown start time; the timeout counts from the adoption");
                    timeout
                }
            }
        });
        if spec.network == Network::Egress
            && state.status == Some(ContainerStateStatusEnum::RUNNING)
            && let Err(e) = self.refence(key, name).await
        {
            // Never let a job run on without its fence.
            return failed(e);
        }
        tracing::info!(container = name, skip, "following an adopted job");
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        // The values may no longer be in the spooled lease; the job's own
        // secrets directory still holds them.
        let on_host = match spec::secrets_dir(key, &self.cfg) {
            Ok(dir) => secrets::read_values(&dir).await,
            Err(_) => Vec::new(),
        };
        let over_limit = CancellationToken::new();
        let filter = self.output_filter(masker(spec, on_host), skip, &over_limit, false);
        let logs: OutputStream = Box::pin(self.docker.logs(name, Some(options)));
        let pump = spawn_output(logs, output, filter);
        let outcome = self
            .follow(key, name, pump, timeout, cancel, &over_limit, true)
            .await;
        match spec::workspace_dir(key, &self.cfg.work_dir) {
            Ok(workspace) => self.workspace_full(key, spec, &workspace, outcome),
            Err(_) => outcome,
        }
    }

    /// Re-installs the firewall rules of an adopted egress job (idempotent),
    /// in case the host lost them while the agent was down.
    async fn refence(&self, key: &LeaseKey, name: &str) -> Result<(), ExecError> {
        let inspect = self
            .docker
            .inspect_network(name, None)
            .await
            .map_err(|source| ExecError::ListNetworks {
                filter: format!("name={name}"),
                source,
            })?;
        let id = inspect.id.unwrap_or_default();
        let bridge = network::bridge_name(&id).ok_or_else(|| ExecError::Firewall {
            command: format!("docker network inspect {name}"),
            message: format!("unexpected network id {id:?}"),
        })?;
        network::install_rules(&self.scope, &job_tag(key), &bridge).await
    }

    /// What a job leaves on the host until [`remove_job`] removes it.
    fn leftovers(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        name: &str,
        workspace: &Path,
    ) -> Result<Leftovers, ExecError> {
        Ok(Leftovers {
            name: name.to_string(),
            workspace: workspace.to_path_buf(),
            secrets: spec::secrets_dir(key, &self.cfg)?,
            lease: spec::lease_dir(key, &self.cfg)?,
            disks: spec::disks_dir(&self.cfg),
            egress: spec.network == Network::Egress,
            scope: self.scope.clone(),
            tag: job_tag(key),
        })
    }

    fn output_filter(
        &self,
        masker: Masker,
        skip: u64,
        over_limit: &CancellationToken,
        flush: bool,
    ) -> OutputFilter {
        OutputFilter {
            stderr_masker: masker.restart(),
            masker,
            skip,
            position: 0,
            limit: self.cfg.max_output_bytes,
            over_limit: over_limit.clone(),
            flush,
        }
    }

    /// Docker 20.10 may end a followed log before the container's last,
    /// unterminated line is written to it; once the container has exited the
    /// log is complete, so read it again and forward what follow missed.
    async fn read_log_tail(&self, name: &str, done: Forwarded) {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let log: OutputStream = Box::pin(self.docker.logs(name, Some(options)));
        // Masked again from the start: the bytes already passed (delivered
        // or skipped) are a prefix of the masked whole, so skipping them
        // continues at the same offset. The carry is flushed at this end.
        let filter = OutputFilter {
            masker: done.filter.masker.restart(),
            stderr_masker: done.filter.stderr_masker.restart(),
            skip: done.position + done.unskipped,
            position: 0,
            flush: true,
            ..done.filter
        };
        let tail = forward_output(log, done.output, filter).await;
        if tail.unskipped > 0 {
            tracing::warn!(
                missing = tail.unskipped,
                "the container's log holds fewer bytes than were already delivered"
            );
        }
        tracing::debug!(bytes = tail.position, "output complete");
    }

    /// Workspace, secrets, network and container, ready to start.
    async fn prepare(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        name: &str,
        workspace: &Path,
        body: ContainerCreateBody,
    ) -> Result<(), ExecError> {
        // A container left by an earlier, crashed attempt at the same lease.
        if remove_container(&self.docker, name).await? {
            tracing::warn!(container = name, "removed a stale container of this lease");
        }
        let egress = spec.network == Network::Egress;
        if egress && network::remove_named(&self.docker, name).await? {
            tracing::warn!(network = name, "removed a stale network of this lease");
        }
        // A workspace left by a crashed earlier attempt: unmounted first.
        workspace::remove(workspace, &spec::disks_dir(&self.cfg)).await?;
        workspace::create(workspace, self.uid, self.gid).await?;
        let bytes = spec::validate(key, spec, &self.cfg)?.workspace_bytes;
        let disks = spec::disks_dir(&self.cfg);
        let (size, uid, gid) = (self.cfg.workspace_bytes, self.uid, self.gid);
        if workspace::attach_disk(&disks, workspace, bytes, size, uid, gid).await? {
            // A spare was used: format its successor in the background.
            let refilling = self.refilling.clone();
            tokio::spawn(
                async move {
                    let Ok(_one_at_a_time) = refilling.try_lock() else {
                        return;
                    };
                    if let Err(e) = workspace::refill_disks(&disks, size, uid, gid).await {
                        tracing::warn!(error = %error_chain(&e), "formatting spare workspace filesystems failed");
                    }
                }
                .in_current_span(),
            );
        }
        let lease_dir = spec::lease_dir(key, &self.cfg)?;
        let lease = self
            .leases
            .lock()
            .get(key)
            .copied()
            .unwrap_or(Lease::Unbounded);
        fence::write(&lease_dir, &lease).map_err(|source| ExecError::Fence {
            path: lease_dir.clone(),
            source,
        })?;
        if !spec.secrets.is_empty() {
            let dir = spec::secrets_dir(key, &self.cfg)?;
            secrets::write(&dir, &spec.secrets, self.uid, self.gid).await?;
        }
        if egress {
            let labels = spec::labels(key, &self.cfg);
            let net =
                network::create(&self.docker, name, labels, &self.scope, &job_tag(key)).await?;
            tracing::info!(network = name, bridge = %net.bridge, "egress network ready and fenced");
        }
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|source| ExecError::CreateContainer {
                name: name.to_string(),
                source,
            })?;
        for warning in created.warnings.iter().filter(|w| !w.is_empty()) {
            tracing::warn!(container = name, %warning, "docker engine warning");
        }
        Ok(())
    }

    /// Makes sure the image is present (pulling it if allowed); returns its
    /// configuration (entrypoint and command).
    async fn ensure_image(&self, image: &str) -> Result<Option<ImageConfig>, ExecError> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => return Ok(inspect.config),
            Err(e) if status(&e) == Some(404) => {}
            Err(source) => {
                return Err(ExecError::InspectImage {
                    image: image.to_string(),
                    source,
                });
            }
        }
        if self.cfg.pull == PullPolicy::Never {
            return Err(ExecError::ImageNotPresent {
                image: image.to_string(),
            });
        }
        tracing::info!(image, "pulling image");
        let (from_image, tag) = split_reference(image);
        let options = CreateImageOptions {
            from_image: Some(from_image.to_string()),
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            item.map_err(|source| ExecError::PullImage {
                image: image.to_string(),
                source,
            })?;
        }
        let inspect =
            self.docker
                .inspect_image(image)
                .await
                .map_err(|source| ExecError::InspectImage {
                    image: image.to_string(),
                    source,
                })?;
        Ok(inspect.config)
    }

    /// Waits for the job to end, stopping it on cancel or timeout. Returns
    /// the outcome and whether the container's exit was observed.
    async fn supervise(
        &self,
        name: &str,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        over_limit: &CancellationToken,
    ) -> (Outcome, bool) {
        let mut exit = Box::pin(self.wait_exit(name));
        let deadline = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);

        let stop = tokio::select! {
            biased;
            exit = &mut exit => return self.exited(name, exit).await,
            () = cancel.cancelled() => Stop::Cancelled,
            () = &mut deadline => Stop::TimedOut,
            () = over_limit.cancelled() => Stop::OutputLimit(self.cfg.max_output_bytes),
        };

        // Exactly one SIGINT, whatever happens next.
        tracing::info!(reason = stop.as_str(), "stopping job: sending SIGINT");
        match self.signal(name, "SIGINT").await {
            Ok(()) => {}
            Err(e) if is_not_running(&e) => {
                // It ended on its own just before: that is its outcome.
                return self.exited(name, exit.await).await;
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "sending SIGINT failed"),
        }
        if let Ok(result) = tokio::time::timeout(self.cfg.stop_grace, &mut exit).await {
            log_stopped(&result);
            return (stop.outcome(), result.is_ok());
        }
        tracing::info!(
            grace = ?self.cfg.stop_grace,
            "job still running after the grace period: sending SIGKILL"
        );
        if let Err(e) = self.signal(name, "SIGKILL").await
            && !is_not_running(&e)
        {
            tracing::warn!(error = %error_chain(&e), "sending SIGKILL failed");
        }
        match tokio::time::timeout(KILL_WAIT, &mut exit).await {
            Ok(result) => {
                log_stopped(&result);
                (stop.outcome(), result.is_ok())
            }
            Err(_) => {
                tracing::warn!("container still running after SIGKILL");
                (stop.outcome(), false)
            }
        }
    }

    /// The outcome of a container that exited by itself.
    async fn exited(&self, name: &str, exit: Result<i64, ExecError>) -> (Outcome, bool) {
        let code = match exit {
            Ok(code) => code,
            Err(e) => return (failed(e), false),
        };
        match self.docker.inspect_container(name, None).await {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                let code = state.exit_code.unwrap_or(code);
                let mut oom_killed = state.oom_killed.unwrap_or(false);
                // Docker 20.10 sets `OOMKilled` only if the kernel's OOM
                // event reached it before the exit; under load it can come
                // after. The engine still records the event.
                if !oom_killed && code == 137 {
                    oom_killed = self.oom_event_seen(name, state.started_at.as_deref()).await;
                }
                (Outcome::Exited { code, oom_killed }, true)
            }
            Err(source) => {
                let e = ExecError::InspectContainer {
                    name: name.to_string(),
                    source,
                };
                tracing::warn!(error = %error_chain(&e), "out-of-memory state unknown");
                (
                    Outcome::Exited {
                        code,
                        oom_killed: false,
                    },
                    true,
                )
            }
        }
    }

    /// Whether the engine recorded an `oom` event for the container since it
    /// started (waiting up to three seconds for a late one: on a loaded
    /// machine the cgroup's notification can trail the exit by more than one).
    async fn oom_event_seen(&self, name: &str, started_at: Option<&str>) -> bool {
        let until = SystemTime::now() + Duration::from_secs(3);
        let until = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let options = bollard::query_parameters::EventsOptions {
            // The engine takes Unix seconds here (RFC 3339 is a client-side
            // convenience of the docker CLI); a second early covers rounding.
            since: started_at
                .and_then(unix_seconds)
                .map(|t| (t - 1).to_string()),
            until: Some(format!("{}.{:09}", until.as_secs(), until.subsec_nanos())),
            filters: Some(
                [
                    ("type".to_string(), vec!["container".to_string()]),
                    ("container".to_string(), vec![name.to_string()]),
                    ("event".to_string(), vec!["oom".to_string()]),
                ]
                .into(),
            ),
        };
        let mut events = Box::pin(self.docker.events(Some(options)));
        let first = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        matches!(first, Ok(Some(Ok(_))))
    }

    /// The exit code once the container has stopped. A wait request that
    /// fails for another reason than the exit is retried a few times.
    async fn wait_exit(&self, name: &str) -> Result<i64, ExecError> {
        let mut attempt = 1;
        loop {
            let mut wait = Box::pin(self.docker.wait_container(
                name,
                None::<bollard::query_parameters::WaitContainerOptions>,
            ));
            let error = match wait.next().await {
                Some(Ok(response)) => return Ok(response.status_code),
                // bollard reports a non-zero exit as an error.
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    return Ok(code);
                }
                Some(Err(e)) => e,
                None => bollard::errors::Error::DockerStreamError {
                    error: "the engine ended the wait without a status".to_string(),
                },
            };
            if attempt >= WAIT_ATTEMPTS || status(&error) == Some(404) {
                return Err(ExecError::Wait {
                    name: name.to_string(),
                    source: error,
                });
            }
            tracing::warn!(error = %error, attempt, "waiting for the container failed; retrying");
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn signal(&self, name: &str, signal: &str) -> Result<(), ExecError> {
        let options = KillContainerOptions {
            signal: signal.to_string(),
        };
        self.docker
            .kill_container(name, Some(options))
            .await
            .map_err(|source| ExecError::Signal {
                name: name.to_string(),
                signal: signal.to_string(),
                source,
            })
    }

    /// Removes every container labelled `outpost.job` that this agent's
    /// `work_dir` created (left by a crashed agent; running ones are killed)
    /// and every leftover workspace directory in `work_dir`. Returns how many
    /// containers were removed. Call it only while this agent runs no job.
    ///
    /// Containers of other agents sharing the engine (other `work_dir`) are
    /// left alone. Everything removable is removed even if one removal fails;
    /// the first failure is then returned.
    pub async fn cleanup_orphans(&self) -> Result<usize, ExecError> {
        self.cleanup_orphans_except(&[]).await
    }

    /// [`cleanup_orphans`](Self::cleanup_orphans), but the containers and
    /// workspaces of `keep` (jobs being re-adopted) stay.
    pub async fn cleanup_orphans_except(&self, keep: &[LeaseKey]) -> Result<usize, ExecError> {
        let work_dir_label = format!("{LABEL_WORK_DIR}={}", self.cfg.work_dir.to_string_lossy());
        let options = ListContainersOptions {
            all: true,
            filters: Some(
                [(
                    "label".to_string(),
                    vec![LABEL_JOB.to_string(), work_dir_label.clone()],
                )]
                .into(),
            ),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|source| ExecError::ListContainers {
                label: format!("{LABEL_JOB} and {work_dir_label}"),
                source,
            })?;
        let mut removed = 0;
        let mut first_error = None;
        for container in containers {
            let Some(id) = container.id else { continue };
            let labels = container.labels.unwrap_or_default();
            let job_id = labels.get(LABEL_JOB).cloned().unwrap_or_default();
            let epoch = labels.get(LABEL_EPOCH).cloned().unwrap_or_default();
            if keep
                .iter()
                .any(|k| k.job_id == job_id && k.epoch.to_string() == epoch)
            {
                continue;
            }
            match remove_container(&self.docker, &id).await {
                Ok(true) => {
                    tracing::info!(container = %id, job_id = %job_id, "removed orphaned job container");
                    removed += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(container = %id, error = %error_chain(&e), "removing orphaned job container failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        // Networks after their containers (an attached network cannot go),
        // then the firewall rules of every network that is gone.
        let mut fenced: Vec<String> = keep.iter().map(job_tag).collect();
        let mut networks_known = false;
        match network::list_labelled(&self.docker, vec![LABEL_JOB.to_string(), work_dir_label])
            .await
        {
            Ok(networks) => {
                networks_known = true;
                for (id, name, labels) in networks {
                    let job_id = labels.get(LABEL_JOB).cloned().unwrap_or_default();
                    let epoch = labels.get(LABEL_EPOCH).cloned().unwrap_or_default();
                    let tag = format!("{job_id}-{epoch}");
                    if fenced.contains(&tag) {
                        continue;
                    }
                    match network::remove_id(&self.docker, &id).await {
                        Ok(_) => tracing::info!(network = %name, "removed orphaned job network"),
                        Err(e) => {
                            tracing::warn!(network = %name, error = %error_chain(&e), "removing orphaned job network failed; keeping its firewall rules");
                            fenced.push(tag);
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "listing orphaned job networks failed; keeping all firewall rules");
                first_error.get_or_insert(e);
            }
        }
        if networks_known {
            match network::remove_rules_except(&self.scope, &fenced).await {
                Ok(0) => {}
                Ok(rules) => tracing::info!(rules, "removed leftover firewall rules"),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let kept: Vec<PathBuf> = keep
            .iter()
            .filter_map(|k| spec::workspace_dir(k, &self.cfg.work_dir).ok())
            .collect();
        match workspace::remove_leftovers(&self.cfg.work_dir, kept, &spec::disks_dir(&self.cfg))
            .await
        {
            Ok(0) => {}
            Ok(dirs) => tracing::info!(dirs, "removed leftover workspaces"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        let kept: Vec<PathBuf> = keep
            .iter()
            .filter_map(|k| spec::lease_dir(k, &self.cfg).ok())
            .collect();
        match fence::remove_leftovers(&spec::leases_dir(&self.cfg), kept).await {
            Ok(0) => {}
            Ok(dirs) => tracing::info!(dirs, "removed leftover lease directories"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        let kept: Vec<PathBuf> = keep
            .iter()
            .filter_map(|k| spec::secrets_dir(k, &self.cfg).ok())
            .collect();
        match secrets::remove_leftovers(&spec::secrets_scope_dir(&self.cfg), kept).await {
            Ok(0) => {}
            Ok(dirs) => tracing::info!(dirs, "removed leftover secrets"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }
}

fn check_runtime(runtime: &str, info: &SystemInfo) -> Result<(), ExecError> {
    let registered = info.runtimes.as_ref();
    if registered.is_some_and(|r| r.contains_key(runtime)) {
        return Ok(());
    }
    let mut names: Vec<&str> = registered
        .into_iter()
        .flat_map(|r| r.keys().map(String::as_str))
        .collect();
    names.sort_unstable();
    Err(ExecError::RuntimeMissing {
        runtime: runtime.to_string(),
        registered: if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        },
    })
}

/// How a job's output is transformed on its way out: secrets masked, bytes
/// an earlier agent process already delivered skipped, and the total capped.
/// Offsets (`skip`, `position`, `limit`) count masked bytes, the bytes the
/// control plane receives.
///
/// stdout and stderr are masked apart, each with its own carry, so a secret
/// written in two pieces to one stream is masked even if the other stream
/// wrote in between (a piece that may begin a secret waits for the rest,
/// as the engine's log does with a partial line).
struct OutputFilter {
    /// For stdout (and anything that is not stderr).
    masker: Masker,
    stderr_masker: Masker,
    /// Masked bytes still to drop (already delivered).
    skip: u64,
    /// Masked bytes passed so far, skipped ones included.
    position: u64,
    /// Most bytes ever delivered (`max_output_bytes`).
    limit: u64,
    /// Fired when the output goes past `limit`.
    over_limit: CancellationToken,
    /// Whether the end of the stream is the end of the output (the
    /// masker's carry is then flushed).
    flush: bool,
}

impl OutputFilter {
    /// Skips and caps masked bytes; returns what may be sent.
    fn pass(&mut self, mut bytes: Bytes) -> Bytes {
        self.position += bytes.len() as u64;
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            bytes = bytes.slice(n..);
            self.skip -= n as u64;
        }
        let from = self.position - bytes.len() as u64;
        let room = usize::try_from(self.limit.saturating_sub(from)).unwrap_or(usize::MAX);
        if bytes.len() > room {
            if !self.over_limit.is_cancelled() {
                tracing::warn!(limit = self.limit, "the job's output went past its limit");
                self.over_limit.cancel();
            }
            bytes.truncate(room);
        }
        bytes
    }
}

/// The masker of a job: its secret values and `more` (values found on the
/// host).
fn masker(spec: &JobSpec, more: Vec<Vec<u8>>) -> Masker {
    Masker::new(
        spec.secrets
            .iter()
            .map(|s| s.value.expose())
            .chain(more.iter().map(Vec::as_slice)),
    )
}

/// `<job_id>-<epoch>`: how a lease's firewall rules are named.
fn job_tag(key: &LeaseKey) -> String {
    format!("{}-{}", key.job_id, key.epoch)
}

/// The end of a forwarded stream.
struct Forwarded {
    /// Masked bytes passed, including skipped ones.
    position: u64,
    /// Bytes still to skip when the stream ended (it was shorter than `skip`).
    unskipped: u64,
    output: mpsc::Sender<Bytes>,
    filter: OutputFilter,
}

fn spawn_output(
    stream: OutputStream,
    output: mpsc::Sender<Bytes>,
    filter: OutputFilter,
) -> AbortOnDropHandle<Forwarded> {
    AbortOnDropHandle::new(tokio::spawn(
        forward_output(stream, output, filter).instrument(tracing::info_span!("output")),
    ))
}

/// Forwards the container's output through `filter` until its end.
async fn forward_output(
    mut stream: OutputStream,
    output: mpsc::Sender<Bytes>,
    mut filter: OutputFilter,
) -> Forwarded {
    let mut receiver_gone = false;
    let send = async |bytes: Bytes, receiver_gone: &mut bool| {
        if bytes.is_empty() || *receiver_gone {
            return;
        }
        if output.send(bytes).await.is_err() {
            tracing::warn!("output receiver dropped; discarding the rest of the output");
            *receiver_gone = true;
        }
    };
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                let masked = match chunk {
                    LogOutput::StdErr { message } => filter.stderr_masker.push(message),
                    other => filter.masker.push(other.into_bytes()),
                };
                let bytes = filter.pass(masked);
                send(bytes, &mut receiver_gone).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the container's output failed");
                break;
            }
        }
    }
    if filter.flush {
        for rest in [filter.masker.finish(), filter.stderr_masker.finish()] {
            let bytes = filter.pass(rest);
            send(bytes, &mut receiver_gone).await;
        }
    }
    Forwarded {
        position: filter.position,
        unskipped: filter.skip,
        output,
        filter,
    }
}

/// Parses the engine's RFC 3339 UTC times (`2024-05-01T12:00:00.123456789Z`).
fn parse_engine_time(text: &str) -> Option<SystemTime> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut hms = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days since 1970-01-01 in the proleptic Gregorian calendar.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    let nanos = if fraction.is_empty() {
        0
    } else {
        let digits: String = fraction.chars().take(9).collect();
        let value: u32 = digits.parse().ok()?;
        value * 10u32.pow(9 - u32::try_from(digits.len()).ok()?)
    };
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Force-removes a container and its anonymous volumes. `Ok(false)` if
/// there was none.
async fn remove_container(docker: &Docker, name: &str) -> Result<bool, ExecError> {
    let mut attempt = 1;
    loop {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match docker.remove_container(name, Some(options)).await {
            Ok(()) => return Ok(true),
            Err(e) if status(&e) == Some(404) => return Ok(false),
            // "removal already in progress"
            Err(e) if status(&e) == Some(409) && attempt < REMOVE_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(source) => {
                return Err(ExecError::RemoveContainer {
                    name: name.to_string(),
                    source,
                });
            }
        }
    }
}

/// What a job leaves on the host while it runs.
#[derive(Debug, Default)]
struct Leftovers {
    /// Container (and, with egress, network) name.
    name: String,
    workspace: PathBuf,
    secrets: PathBuf,
    /// Its lease directory (`outpost-init`'s deadline).
    lease: PathBuf,
    /// Where its workspace image is.
    disks: PathBuf,
    egress: bool,
    scope: String,
    /// `<job_id>-<epoch>`, naming its firewall rules.
    tag: String,
}

/// Removes a job's container, network, firewall rules, workspace and
/// secrets when `run` ends, or, if its future is dropped before, from a
/// background task.
struct Cleanup {
    docker: Docker,
    leftovers: Leftovers,
    done: bool,
}

impl Cleanup {
    async fn run(&mut self) {
        remove_job(&self.docker, &self.leftovers).await;
        self.done = true;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (docker, leftovers) = (self.docker.clone(), std::mem::take(&mut self.leftovers));
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let span = tracing::info_span!("job_cleanup", container = %leftovers.name);
                handle.spawn(async move { remove_job(&docker, &leftovers).await }.instrument(span));
            }
            Err(_) => tracing::warn!(
                container = %leftovers.name,
                "run was dropped outside a runtime; cleanup_orphans will remove the container"
            ),
        }
    }
}

async fn remove_job(docker: &Docker, job: &Leftovers) {
    let name = job.name.as_str();
    let container_gone = match remove_container(docker, name).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(container = name, error = %error_chain(&e), "removing the job container failed");
            false
        }
    };
    // The rules go only once the network (and so the container) is gone:
    // a job must never run unfenced.
    if job.egress && container_gone {
        match network::remove_named(docker, name).await {
            Ok(_) => {
                if let Err(e) = network::remove_rules(&job.scope, &job.tag).await {
                    tracing::warn!(error = %error_chain(&e), "removing the job's firewall rules failed");
                }
            }
            Err(e) => {
                tracing::warn!(network = name, error = %error_chain(&e), "removing the job network failed; its firewall rules stay")
            }
        }
    }
    if let Err(e) = workspace::remove(&job.workspace, &job.disks).await {
        tracing::warn!(error = %error_chain(&e), "removing the job workspace failed");
    }
    if let Err(e) = secrets::remove(&job.secrets).await {
        tracing::warn!(error = %error_chain(&e), "removing the job's secrets failed");
    }
    // A container that could not be removed keeps the last lease it read.
    if container_gone && let Err(e) = fence::remove(&job.lease).await {
        tracing::warn!(error = %error_chain(&e), "removing the job's lease directory failed");
    }
}

/// The outcome of a job that could not run: `Rejected` when this agent's
/// sandbox refuses what it asks for (like any other local refusal),
/// `Failed` otherwise.
fn failed(error: ExecError) -> Outcome {
    match error {
        ExecError::Rejected { .. } => Outcome::Rejected {
            reason: error_chain(&error),
        },
        error => Outcome::Failed {
            reason: error_chain(&error),
        },
    }
}

fn log_stopped(result: &Result<i64, ExecError>) {
    match result {
        Ok(code) => tracing::info!(code, "job stopped"),
        Err(e) => tracing::warn!(error = %error_chain(e), "following the stopping job failed"),
    }
}

pub(super) fn status(error: &bollard::errors::Error) -> Option<u16> {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine answers 409 to a signal for a container that is not running.
fn is_not_running(error: &ExecError) -> bool {
    matches!(error, ExecError::Signal { source, .. } if status(source) == Some(409))
}

/// Splits `repo[:tag]` or `repo@digest` for the pull API (which would pull
/// every tag if given none): the tag defaults to `latest`.
fn split_reference(image: &str) -> (&str, &str) {
    if let Some((repo, digest)) = image.split_once('@') {
        return (repo, digest);
    }
    let name_start = image.rfind('/').map_or(0, |i| i + 1);
    match image.rfind(':') {
        Some(colon) if colon > name_start => (&image[..colon], &image[colon + 1..]),
        _ => (image, "latest"),
    }
}

/// Unix seconds of an RFC 3339 time as the engine reports it.
fn unix_seconds(rfc3339: &str) -> Option<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_times_become_unix_seconds_for_the_events_query() {
        assert_eq!(
            unix_seconds("2026-11-29T03:59:46.130057512Z"),
            Some(1_795_924_786)
        );
        assert_eq!(unix_seconds("0001-01-01T00:00:00Z"), Some(-62_135_596_800));
        assert_eq!(unix_seconds("not a time"), None);
    }

    #[test]
    fn a_sandbox_refusal_ends_rejected_and_other_errors_failed() {
        let refused = failed(ExecError::Rejected {
            source: spec::SpecError::BelowMinimum {
                resource: "pids",
                requested: 1,
                minimum: spec::MIN_PIDS,
            },
        });
        assert!(
            matches!(&refused, Outcome::Rejected { reason } if reason.contains("below the minimum of 8")),
            "{refused:?}"
        );
        let other = failed(ExecError::ImageNotPresent {
            image: "img".into(),
        });
        assert!(matches!(other, Outcome::Failed { .. }), "{other:?}");
    }

    #[test]
    fn references_split_into_repo_and_tag() {
        assert_eq!(split_reference("alpine"), ("alpine", "latest"));
        assert_eq!(
            split_reference("outpost/runner:dev"),
            ("outpost/runner", "dev")
        );
        assert_eq!(
            split_reference("registry.local:5000/team/tf"),
            ("registry.local:5000/team/tf", "latest")
        );
        assert_eq!(
            split_reference("registry.local:5000/team/tf:1.9"),
            ("registry.local:5000/team/tf", "1.9")
        );
        assert_eq!(
            split_reference("alpine@sha256:abcd"),
            ("alpine", "sha256:abcd")
        );
    }

    #[test]
    fn engine_times_parse() {
        let at =
            |s| parse_engine_time(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(
            at("2026-11-21T23:35:10.123456789Z"),
            Some(Duration::new(1_795_304_110, 123_456_789))
        );
        assert_eq!(
            at("2000-02-29T12:00:00.5Z"),
            Some(Duration::new(951_825_600, 500_000_000))
        );
        assert_eq!(at("0001-01-01T00:00:00Z"), None, "the engine's zero time");
        assert_eq!(at("2026-11-21 23:35:10Z"), None);
        assert_eq!(at("2026-13-01T00:00:00Z"), None);
        assert_eq!(at("garbage"), None);
    }

    #[test]
    fn runtime_check_lists_registered_runtimes() {
        let info = SystemInfo {
            runtimes: Some(
                [
                    ("runc".to_string(), Default::default()),
                    ("io.containerd.runc.v2".to_string(), Default::default()),
                ]
                .into(),
            ),
            ..Default::default()
        };
        assert!(check_runtime("runc", &info).is_ok());
        let e = check_runtime("runsc", &info).unwrap_err().to_string();
        assert_eq!(
            e,
            "container runtime \"runsc\" is not registered in the docker engine \
             (registered: io.containerd.runc.v2, runc)"
        );
    }
}
