//! Domain types for a leased job. Wire types are converted into these in
//! `wire.rs`; nothing else in the agent sees generated protobuf types.

use std::collections::BTreeMap;
use std::time::Duration;

/// Identifies one lease of a job: the job id and its fencing epoch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub job_id: String,
    pub epoch: u64,
}

impl std::fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.job_id, self.epoch)
    }
}

/// Network a job's container is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// No network at all (the default).
    #[default]
    None,
    /// Egress on a network of the job's own; only if local policy allows it.
    Egress,
}

/// Resource requests; `None` means the agent's default. A job can only lower them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub memory_bytes: Option<u64>,
    pub nano_cpus: Option<u64>,
    pub pids: Option<u64>,
    /// Size of the job's workspace filesystem (only below the agent's).
    pub workspace_bytes: Option<u64>,
}

/// What the control plane asked the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobSpec {
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub timeout: Option<Duration>,
    pub network: Network,
    /// AWS role the job's credentials come from (see `crate::aws`).
    pub aws: Option<AwsRole>,
    /// `s3://bucket/key.tar.gz` unpacked into the workspace before the job starts.
    pub workspace_source: Option<String>,
    /// Workspace-relative files uploaded to S3 after the job ends.
    pub artifacts: Vec<String>,
    /// Files the job finds at `/run/secrets/<name>` (tmpfs, read-only, mode
    /// 0400); their values are masked in the job's output.
    pub secrets: Vec<JobSecret>,
}

/// One secret of a job. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct JobSecret {
    pub name: String,
    pub value: SecretBytes,
}

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobSecret({:?}, <redacted>)", self.name)
    }
}

/// Secret bytes: never printed by `Debug`; read them with [`SecretBytes::expose`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(value: impl Into<Vec<u8>>) -> SecretBytes {
        SecretBytes(value.into())
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBytes(<redacted>)")
    }
}

/// The AWS role a job asks for. The role is checked against the agent's
/// allow-list before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AwsRole {
    pub role_arn: String,
    /// IAM session policy (JSON) that narrows the role for this job.
    pub session_policy: Option<String>,
    /// Requested session duration; `None`: the agent's default.
    pub duration: Option<Duration>,
    /// Per-job web-identity token minted by the control plane.
    pub web_identity_token: Option<Secret>,
}

/// A secret string: never printed by `Debug`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A lease the agent accepted.
#[derive(Debug, Clone)]
pub struct Lease {
    pub key: LeaseKey,
    pub lease_id: String,
    pub ttl: Duration,
    pub spec: JobSpec,
    /// Log bytes the server already holds (non-zero on a re-lease).
    pub log_offset: u64,
}

/// How a job's process ended, as far as the executor can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited by itself.
    Exited { code: i64, oom_killed: bool },
    /// Stopped because the control plane (or the user through it) cancelled it.
    Cancelled { reason: String },
    /// Stopped because it ran past its timeout.
    TimedOut,
    /// Never ran or could not be followed; the message says why.
    Failed { reason: String },
    /// Refused by the agent's local policy before anything ran.
    Rejected { reason: String },
}
