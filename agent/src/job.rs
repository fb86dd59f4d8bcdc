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
}
