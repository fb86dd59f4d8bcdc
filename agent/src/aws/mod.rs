//! Short-lived AWS credentials for jobs, refreshed for as long as they run,
//! and S3 workspaces and artifacts.
//!
//! For a job that names an AWS role, the agent:
//!
//! 1. checks the role against its `[aws] allowed_roles` and the session
//!    length against `max_session_duration` — before anything runs (a
//!    compromised control plane cannot make it assume another role);
//! 2. calls STS `AssumeRoleWithWebIdentity` with the job's web-identity token
//!    (minted per job by the control plane, whose claims carry the job id as
//!    `SourceIdentity` and session tags; or the IRSA token file on EKS) and the
//!    session name `outpost-<job_id>`; this overlaps with the container's
//!    creation, and is repeated `refresh_margin` before every expiry;
//! 3. serves the credentials to the job over the container-credentials
//!    endpoint protocol on `127.0.0.1:<credentials_port>` inside the job's own
//!    network namespace ([`endpoint`], [`crate::netns`]), gated by a random per-job
//!    token that reaches the job through a FIFO, never its environment
//!    ([`entry`]); it advertises an expiry `refresh_margin / 2` early so that
//!    SDKs come back for fresh credentials in time;
//! 4. closes the endpoint the moment the job's process ends, uploads its
//!    artifacts with the job's credentials, and stops refreshing.
//!
//! **Who touches S3:** the job's assumed role, for both the workspace
//! download and the artifact uploads; the agent host's own identity is never
//! used for a job.

pub mod config;
pub mod creds;
pub mod endpoint;
pub mod entry;
pub mod glob;
mod job;
pub mod s3;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use aws_sdk_sts::config::{BehaviorVersion, Region};
use aws_smithy_http_client::tls;
use bollard::models::ContainerCreateBody;
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

pub use config::AwsConfig;
use creds::{AssumeSpec, CredState, TokenSource};
use endpoint::EndpointState;
pub use job::{JobAws, artifact_key};
use job::{JobCredentials, random_token};
pub use s3::Uploaded;

use crate::executor::DockerExecutor;
use crate::executor::hooks::{HookContext, HookError, JobHooks};
use crate::job::{JobSpec, LeaseKey, Outcome, Secret};

/// How long a job waits for its first credentials before it fails.
const CREDENTIALS_WAIT: Duration = Duration::from_secs(60);

/// Errors of the AWS layer. None carries a credential or a token.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("invalid [aws] setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("aws role {role_arn} is not in this agent's [aws] allowed_roles")]
    RoleNotAllowed { role_arn: String },
    #[error(
        "the job asks for an aws session of {requested_s}s, above this agent's max_session_duration of {max_s}s"
    )]
    DurationTooLong { requested_s: u64, max_s: u64 },
    #[error("the job uses s3 ({what}) but names no aws role: s3 is accessed with the job's role")]
    NeedsRole { what: &'static str },
    #[error("the job names artifacts but this agent has no [aws] artifact_bucket")]
    NoArtifactBucket,
    #[error(
        "no web-identity token for the job: the control plane sent none and no token file is configured"
    )]
    NoWebIdentityToken,
    #[error("reading the web-identity token file {} failed", path.display())]
    ReadTokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("assuming aws role {role_arn} with a web identity failed: {message}")]
    AssumeRole { role_arn: String, message: String },
    #[error("sts returned no credentials for aws role {role_arn}")]
    NoCredentials { role_arn: String },
    #[error("the job's aws credentials are unavailable: {reason}")]
    CredentialsUnavailable { reason: String },
    #[error("the job's aws credentials were not ready within {waited_s}s")]
    CredentialsTimeout { waited_s: u64 },
    #[error("inspecting {what} {name} failed")]
    Inspect {
        what: &'static str,
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("binding the credentials endpoint in the network namespace of container {name} failed")]
    BindEndpoint {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("preparing the ready pipe {} failed", path.display())]
    ReadyPipe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("releasing the job in container {name} failed: {reason}")]
    Release { name: String, reason: String },
    #[error("invalid workspace source {url:?}: {reason}")]
    WorkspaceUrl { url: String, reason: &'static str },
    #[error("downloading the workspace {url} failed: {message}")]
    Download { url: String, message: String },
    #[error("unpacking the workspace {url} failed")]
    Unpack {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid artifact path {path:?}: {reason}")]
    ArtifactPath { path: String, reason: &'static str },
    #[error("opening artifact {path} failed")]
    OpenArtifact {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("uploading artifact {path} to {url} failed: {message}")]
    Upload {
        path: String,
        url: String,
        message: String,
    },
    #[error("{operation} was interrupted")]
    Blocking {
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// `error: cause: cause`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    crate::executor::error_chain(error)
}

/// Caps the AWS SDK's own log targets at `info`, whatever `filter` asks for:
/// at `debug` and `trace` they print resolved identities (including the
/// access key id of a job's credentials) and signed requests. Every process
/// that runs the agent builds its log filter through this.
pub fn quiet_sdk_logs(mut filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    for target in [
        "aws_smithy_runtime",
        "aws_smithy_runtime_api",
        "aws_smithy_http_client",
        "aws_sigv4",
        "aws_runtime",
        "aws_credential_types",
        "aws_sdk_s3",
        "aws_sdk_sts",
    ] {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// The HTTP client of every AWS call: hyper 1 with rustls on ring (the TLS
/// stack the agent already uses), plain HTTP allowed for local endpoints.
pub fn http_client() -> aws_sdk_sts::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The agent's AWS side: configuration and the STS client.
pub struct AwsAgent {
    cfg: AwsConfig,
    http: aws_sdk_sts::config::SharedHttpClient,
    sts: aws_sdk_sts::Client,
    metrics: Arc<crate::observe::Metrics>,
}

impl std::fmt::Debug for AwsAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsAgent").field("cfg", &self.cfg).finish()
    }
}

impl AwsAgent {
    pub fn new(cfg: AwsConfig) -> AwsAgent {
        let http = http_client();
        let timeouts = aws_sdk_sts::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(30))
            .build();
        let mut sts = aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .http_client(http.clone())
            .timeout_config(timeouts);
        if let Some(url) = &cfg.sts_endpoint {
            sts = sts.endpoint_url(url);
        }
        AwsAgent {
            sts: aws_sdk_sts::Client::from_conf(sts.build()),
            http,
            cfg,
            metrics: Arc::new(crate::observe::Metrics::default()),
        }
    }

    /// Counts credential refreshes in `metrics` (the agent's own).
    pub fn with_metrics(mut self, metrics: Arc<crate::observe::Metrics>) -> AwsAgent {
        self.metrics = metrics;
        self
    }

    pub fn config(&self) -> &AwsConfig {
        &self.cfg
    }

    /// Checks a job's AWS requests against this agent's configuration and,
    /// if it uses AWS, starts assuming its role. `None`: the job uses no AWS.
    /// An error refuses the job before anything runs.
    pub fn prepare_job(
        self: &Arc<Self>,
        key: &LeaseKey,
        spec: &JobSpec,
        uid: u32,
        gid: u32,
    ) -> Result<Option<JobAws>, AwsError> {
        let Some(role) = &spec.aws else {
            if spec.workspace_source.is_some() {
                return Err(AwsError::NeedsRole {
                    what: "a workspace",
                });
            }
            if !spec.artifacts.is_empty() {
                return Err(AwsError::NeedsRole { what: "artifacts" });
            }
            return Ok(None);
        };
        if !self.cfg.role_allowed(&role.role_arn) {
            return Err(AwsError::RoleNotAllowed {
                role_arn: role.role_arn.clone(),
            });
        }
        let duration = role.duration.unwrap_or(self.cfg.default_session_duration);
        if duration > self.cfg.max_session_duration {
            return Err(AwsError::DurationTooLong {
                requested_s: duration.as_secs(),
                max_s: self.cfg.max_session_duration.as_secs(),
            });
        }
        if !spec.artifacts.is_empty() && self.cfg.artifact_bucket.is_none() {
            return Err(AwsError::NoArtifactBucket);
        }
        for path in &spec.artifacts {
            s3::artifact_path(path)?;
        }
        let workspace_source = spec
            .workspace_source
            .as_deref()
            .map(s3::S3Url::parse)
            .transpose()?;
        let token = if let Some(path) = &self.cfg.web_identity_token_file {
            TokenSource::File(path.clone())
        } else if let Some(token) = &role.web_identity_token {
            TokenSource::Inline(token.clone())
        } else if let Some(path) = std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE") {
            TokenSource::File(PathBuf::from(path))
        } else {
            return Err(AwsError::NoWebIdentityToken);
        };
        let margin = creds::effective_margin(self.cfg.refresh_margin, duration);
        let assume = AssumeSpec {
            role_arn: role.role_arn.clone(),
            session_name: creds::session_name(&key.job_id),
            session_policy: role.session_policy.clone(),
            duration,
            token,
        };
        let stop = CancellationToken::new();
        let (tx, rx) = watch::channel(CredState::Pending);
        tokio::spawn(creds::refresh_loop(
            self.sts.clone(),
            assume,
            margin,
            tx,
            stop.clone(),
            self.metrics.clone(),
        ));
        Ok(Some(JobAws {
            agent: self.clone(),
            key: key.clone(),
            uid,
            gid,
            endpoint_token: random_token(),
            creds: rx,
            early: margin / 2,
            endpoint_stop: stop.child_token(),
            endpoint: Mutex::new(None),
            workspace_source,
            artifacts: spec.artifacts.clone(),
            uploaded: Mutex::new(Vec::new()),
            _stop: stop.drop_guard(),
        }))
    }

    /// An S3 client acting as the job (its refreshed credentials).
    fn s3_for(&self, creds: watch::Receiver<CredState>, early: Duration) -> aws_sdk_s3::Client {
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(self.cfg.region.clone()))
            .http_client(self.http.clone())
            .credentials_provider(JobCredentials { creds, early })
            .force_path_style(self.cfg.s3_force_path_style);
        if let Some(url) = &self.cfg.s3_endpoint {
            b = b.endpoint_url(url);
        }
        aws_sdk_s3::Client::from_conf(b.build())
    }
}

/// Runs one job through `exec`, with its AWS hooks when it uses AWS. Returns
/// how it ended and the artifacts it uploaded. A job whose AWS requests this
/// agent refuses fails before anything runs.
pub async fn run_job(
    aws: Option<&Arc<AwsAgent>>,
    exec: &DockerExecutor,
    key: &LeaseKey,
    spec: &JobSpec,
    output: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
    started: oneshot::Sender<()>,
) -> (Outcome, Vec<Uploaded>) {
    let uses_aws =
        spec.aws.is_some() || spec.workspace_source.is_some() || !spec.artifacts.is_empty();
    if !uses_aws {
        return (
            exec.run(key, spec, output, cancel, started).await,
            Vec::new(),
        );
    }
    // Refused before anything ran, like any other local refusal.
    let refuse = |e: AwsError| {
        warn!(error = %error_chain(&e), "refusing the job's aws request");
        Outcome::Rejected {
            reason: format!("refused by the agent: {}", error_chain(&e)),
        }
    };
    let Some(aws) = aws else {
        return (
            refuse(AwsError::InvalidConfig {
                field: "aws",
                reason: "this agent has no aws support".into(),
            }),
            Vec::new(),
        );
    };
    let (uid, gid) = match exec.config().uid_gid() {
        Ok(ids) => ids,
        Err(e) => {
            return (
                Outcome::Failed {
                    reason: crate::executor::error_chain(&e),
                },
                Vec::new(),
            );
        }
    };
    let job = match aws.prepare_job(key, spec, uid, gid) {
        Ok(Some(job)) => job,
        Ok(None) => {
            return (
                exec.run(key, spec, output, cancel, started).await,
                Vec::new(),
            );
        }
        Err(e) => return (refuse(e), Vec::new()),
    };
    let outcome = exec
        .run_with_hooks(key, spec, output, cancel, started, Some(&job))
        .await;
    let uploaded = job.take_uploaded();
    (outcome, uploaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::AwsRole;

    fn agent(cfg: AwsConfig) -> Arc<AwsAgent> {
        Arc::new(AwsAgent::new(cfg))
    }

    fn key() -> LeaseKey {
        LeaseKey {
            job_id: "job-1".into(),
            epoch: 4,
        }
    }

    fn aws_spec(role: &str) -> JobSpec {
        JobSpec {
            image: "img".into(),
            aws: Some(AwsRole {
                role_arn: role.into(),
                web_identity_token: Some(Secret::new("token")),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn allowing(pattern: &str) -> AwsConfig {
        AwsConfig {
            allowed_roles: vec![pattern.into()],
            sts_endpoint: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn refuses_roles_outside_the_allow_list_before_anything_runs() {
        let a = agent(allowing("arn:aws:iam::123456789012:role/outpost-*"));
        let e = a
            .prepare_job(
                &key(),
                &aws_spec("arn:aws:iam::123456789012:role/admin"),
                1000,
                1000,
            )
            .err()
            .unwrap();
        assert!(matches!(e, AwsError::RoleNotAllowed { .. }), "{e}");
        assert!(e.to_string().contains("role/admin"));
        let ok = a
            .prepare_job(
                &key(),
                &aws_spec("arn:aws:iam::123456789012:role/outpost-tf"),
                1000,
                1000,
            )
            .unwrap();
        assert!(ok.is_some());
        // No allow-list: nothing is allowed.
        let e = agent(AwsConfig::default())
            .prepare_job(&key(), &aws_spec("arn:aws:iam::1:role/x"), 1000, 1000)
            .err()
            .unwrap();
        assert!(matches!(e, AwsError::RoleNotAllowed { .. }));
    }

    #[tokio::test]
    async fn checks_duration_s3_requirements_and_tokens() {
        let a = agent(allowing("*"));
        let mut spec = aws_spec("arn:aws:iam::1:role/x");
        spec.aws.as_mut().unwrap().duration = Some(Duration::from_secs(7200));
        assert!(matches!(
            a.prepare_job(&key(), &spec, 1000, 1000).err().unwrap(),
            AwsError::DurationTooLong { .. }
        ));
        let spec = JobSpec {
            artifacts: vec!["out.bin".into()],
            ..Default::default()
        };
        assert!(matches!(
            a.prepare_job(&key(), &spec, 1000, 1000).err().unwrap(),
            AwsError::NeedsRole { .. }
        ));
        let mut spec = aws_spec("arn:aws:iam::1:role/x");
        spec.artifacts = vec!["out.bin".into()];
        assert!(matches!(
            a.prepare_job(&key(), &spec, 1000, 1000).err().unwrap(),
            AwsError::NoArtifactBucket
        ));
        let mut spec = aws_spec("arn:aws:iam::1:role/x");
        spec.workspace_source = Some("https://example/w.tgz".into());
        assert!(matches!(
            a.prepare_job(&key(), &spec, 1000, 1000).err().unwrap(),
            AwsError::WorkspaceUrl { .. }
        ));
        assert!(
            a.prepare_job(&key(), &JobSpec::default(), 1000, 1000)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn artifact_keys_carry_job_and_epoch() {
        assert_eq!(
            artifact_key("outpost/", &key(), "./out/plan.bin"),
            "outpost/job-1/4/out/plan.bin"
        );
    }

    #[test]
    fn endpoint_tokens_are_random_and_long() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a, b);
    }
}
