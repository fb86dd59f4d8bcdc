//! Drives one job container through the Docker engine: image, workspace,
//! create, attach, start, supervise (cancel, timeout), collect, remove.

mod adopt;
mod cleanup;
mod output;
mod prepare;
mod supervise;

use cleanup::remove_container;
use output::{Forwarded, OutputFilter, forward_output, masker, parse_engine_time, spawn_output};
use prepare::RefillSpares;

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
use crate::observe::Steps;

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
            let (name, workspace, mut cleanup) = match self.job_host_paths(key, spec) {
                Ok(found) => found,
                Err(e) => return failed(e),
            };
            let outcome = self
                .execute(key, spec, &name, &workspace, output, cancel, started, hooks)
                .await;
            let mut steps = Steps::new("job end");
            cleanup.run().await;
            steps.done("clean-up");
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
        let mut steps = Steps::new("job start");
        let mut body = match spec::container_config(key, spec, &self.cfg, workspace) {
            Ok(body) => body,
            Err(e) => return failed(e.into()),
        };
        let ctx = HookContext {
            docker: &self.docker,
            container: name,
            workspace,
            image: &spec.image,
        };
        // The image, the hooks' configuration and the sandbox's check overlap
        // the host's preparation (workspace, lease file, secrets, network).
        // Only the pull can take long and only it is cut short by a cancel;
        // both finish before anything else happens, so that nothing is
        // created behind the cleanup's back.
        let configured = async {
            let image = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(Stop::Cancelled.outcome()),
                image = self.ensure_image(&spec.image) => image,
            };
            let image = image.map_err(failed)?;
            if let Some(h) = hooks
                && let Err(e) = h.configure(&ctx, &mut body).await
            {
                return Err(hooks::hook_failed("configuring the container", &e));
            }
            // outpost-init runs whatever the container would have run.
            spec::supervise(&mut body, image.as_ref(), &self.cfg, spec.timeout)
                .map_err(|e| failed(e.into()))?;
            // Whatever a hook changed, the sandbox must still hold.
            spec::check_sandbox(&body, key, &self.cfg, workspace).map_err(|e| failed(e.into()))
        };
        let (configured, host) =
            tokio::join!(configured, self.prepare_host(key, spec, name, workspace));
        // A spare workspace image taken is formatted again once the
        // container started (or the job ended before), not while it starts.
        let refill = RefillSpares(matches!(host, Ok(true)).then_some(self));
        if let Err(outcome) = configured {
            return outcome;
        }
        if let Err(e) = host {
            return failed(e);
        }
        steps.done("image, configuration and host prepared");
        if let Err(e) = self.create(name, body).await {
            return failed(e);
        }
        steps.done("container created");
        if let Some(h) = hooks {
            let r = tokio::select! {
                biased;
                () = cancel.cancelled() => return Stop::Cancelled.outcome(),
                r = h.before_start(&ctx) => r,
            };
            if let Err(e) = r {
                return hooks::hook_failed("preparing the job", &e);
            }
            steps.done("before-start hooks");
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
        steps.done("attached");
        if cancel.is_cancelled() {
            return Stop::Cancelled.outcome();
        }
        if let Err(source) = self.docker.start_container(name, None).await {
            return failed(ExecError::StartContainer {
                name: name.to_string(),
                source,
            });
        }
        steps.done("started");
        drop(refill);
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

/// `<job_id>-<epoch>`: how a lease's firewall rules are named.
fn job_tag(key: &LeaseKey) -> String {
    format!("{}-{}", key.job_id, key.epoch)
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
