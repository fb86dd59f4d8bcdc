//! The control plane's domain types. `wire.rs` converts them to and from the
//! generated protobuf types; the store persists them.

use std::collections::BTreeMap;

/// Lifecycle of a job on the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Leased,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Rejected,
    Lost,
}

impl JobState {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobState::Queued | JobState::Leased | JobState::Running
        )
    }
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Leased | JobState::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Leased => "leased",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Rejected => "rejected",
            JobState::Lost => "lost",
        }
    }
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "leased" => JobState::Leased,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            "timed_out" => JobState::TimedOut,
            "rejected" => JobState::Rejected,
            "lost" => JobState::Lost,
            _ => return None,
        })
    }
}

/// Network a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    #[default]
    None,
    Egress,
}

/// What a user submitted. Persisted as JSON in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JobSpec {
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Labels an agent must carry to be given this job.
    pub selector: BTreeMap<String, String>,
    pub memory_bytes: u64,
    pub nano_cpus: u64,
    pub pids: u64,
    pub timeout_ms: u64,
    pub network: Network,
    /// AWS role for the job's credentials (the token is minted per lease, never stored).
    pub aws: Option<AwsRole>,
    /// `s3://bucket/key.tar.gz` unpacked into the workspace before the job starts.
    pub workspace_source: String,
    /// Workspace-relative files uploaded after the job ends.
    pub artifacts: Vec<String>,
    /// Files the job finds at `/run/secrets/<name>`. Values go to the agent
    /// with each lease and nowhere else: never returned by the admin API,
    /// never logged, and cleared from the store once the job is final (the
    /// names stay).
    pub secrets: Vec<JobSecret>,
    /// Longest the job may wait in the queue before it ends `timed_out`;
    /// zero: no limit.
    pub queue_timeout_ms: u64,
}

impl JobSpec {
    /// Whether any secret still holds a value.
    pub fn holds_secret_values(&self) -> bool {
        self.secrets.iter().any(|s| !s.value.is_empty())
    }

    /// The spec with every secret value cleared (names kept).
    pub fn without_secret_values(mut self) -> JobSpec {
        for s in &mut self.secrets {
            s.value = Vec::new();
        }
        self
    }
}

/// A secret of a job. `Debug` never shows the value; the store holds it
/// base64-encoded until the job is final.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JobSecret {
    pub name: String,
    #[serde(with = "base64_bytes")]
    pub value: Vec<u8>,
}

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobSecret({:?}, <redacted>)", self.name)
    }
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(value))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// The AWS role a job asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AwsRole {
    pub role_arn: String,
    pub session_policy: String,
    /// Zero: the agent's default.
    pub duration_s: u64,
}

/// An object an agent uploaded for a job, recorded for the lease (epoch)
/// that was current when it was reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub job_id: String,
    pub epoch: u64,
    pub path: String,
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub etag: String,
    pub uploaded_ms: i64,
}

/// A job as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// Epoch of the current (or last) lease; 0 before the first lease.
    pub epoch: u64,
    pub agent_id: Option<String>,
    pub exit_code: Option<i64>,
    pub message: String,
    pub oom_killed: bool,
    pub created_ms: i64,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// Milliseconds since the epoch at which the current lease expires.
    pub lease_deadline_ms: i64,
    pub cancel_requested: bool,
    /// Bytes of log the store holds (always contiguous from 0).
    pub log_acked: u64,
    /// Total log length the agent reported with the final status.
    pub log_total: Option<u64>,
}

impl Job {
    /// True once the job is final and the store holds its whole log.
    pub fn log_complete(&self) -> bool {
        self.state.is_final() && self.log_total.is_none_or(|t| self.log_acked >= t)
    }
}

/// A final or progress report from an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub state: JobState,
    pub exit_code: Option<i64>,
    pub message: String,
    pub log_total: u64,
    pub oom_killed: bool,
}

/// An agent the control plane has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub draining: bool,
    pub last_seen_ms: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_are_redacted() {
        let spec = JobSpec {
            image: "img".into(),
            secrets: vec![JobSecret {
                name: "db".into(),
                value: b"hunter2\xff".to_vec(),
            }],
            ..Default::default()
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
        let back: JobSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        assert!(!format!("{spec:?}").contains("hunter2"));
        assert!(spec.holds_secret_values());
        let cleared = spec.without_secret_values();
        assert!(!cleared.holds_secret_values());
        assert_eq!(cleared.secrets[0].name, "db");
        // Specs stored before secrets existed still load.
        let old: JobSpec = serde_json::from_str(r#"{"image":"img"}"#).unwrap();
        assert!(old.secrets.is_empty());
    }
}
