//! The sandbox executor: runs one leased job in a hardened Docker container
//! and reports how it ended.
//!
//! # Threat model
//!
//! The job's code is **untrusted**: it comes from whoever can submit jobs, and
//! Terraform providers and modules run arbitrary code. The control plane is
//! trusted only to ask for *stricter* settings than the agent's local
//! [`SandboxConfig`]; a request above a local limit, or for egress the agent
//! does not allow, is rejected, never honoured. What the sandbox protects is the agent host (its
//! Docker socket, its mTLS key, other jobs' workspaces, its memory and CPU)
//! and the network it sits in.
//!
//! Every job container therefore gets (see [`spec::container_config`]):
//! no privileged mode; all capabilities dropped and none added;
//! `no-new-privileges`; the engine's default seccomp profile (never
//! `unconfined`); a read-only root filesystem; a non-root numeric user; memory
//! (without swap), CPU and pids limits; network `none` (or, for a job asking
//! for egress on an agent allowing it, a bridge network of its own fenced by
//! iptables rules: [`network`]); a private IPC and cgroup namespace; a
//! size-limited `noexec` tmpfs at `/tmp`; and only the job's own host paths:
//! its freshly created workspace directory at `/workspace`, and, if it has
//! secrets, its secrets directory on a host tmpfs, read-only, at
//! `/run/secrets` ([`secrets`]). No Docker socket and no other host path is
//! ever mounted. Secret values never enter the container's environment and
//! are masked (`***`) in its output ([`mask`]), which is capped at
//! `max_output_bytes`.
//! An alternative runtime (e.g. gVisor `runsc`) can be configured for a
//! stronger kernel boundary; without one the boundary is the host kernel
//! (namespaces, cgroups, seccomp), which is the residual risk.
//!
//! Containers (and egress networks) carry labels (`outpost.job`,
//! `outpost.epoch`, `outpost.managed`, `outpost.workdir`) and are never
//! auto-removed, so that an agent restarted
//! after a crash can find them: [`DockerExecutor::adopt`] follows one again
//! (its output replayed from the container's `local`-driver log, which keeps
//! raw bytes, from the offset already delivered) and
//! [`DockerExecutor::cleanup_orphans_except`] removes the others (with their
//! networks, firewall rules, workspaces and secrets directories).
//! [`DockerExecutor::run`] always removes its container, network, rules,
//! workspace and secrets before it returns (and, if its future is dropped,
//! in a background task).
//! Hooks ([`hooks`]) may add tmpfs mounts and environment to a container;
//! [`spec::check_sandbox`] re-checks the sandbox after them.
//!
//! PID 1 of every job container is `outpost-init` (the `init/` crate,
//! embedded in the agent and mounted read-only; [`fence`]): it forwards
//! signals to the job's whole process group, so that one `SIGINT` reaches
//! the job as a terminal's Ctrl-C would (Terraform then releases its state
//! lock), and it stops the job by itself at its lease deadline (from a
//! lease file the agent rewrites on each renewal, [`DockerExecutor::set_lease`])
//! and at its timeout, so that a job never outlives its lease even if the
//! agent process is dead.

mod disk;
mod fence;
pub mod hooks;
pub mod mask;
pub mod network;
mod run;
pub mod secrets;
pub mod spec;
mod workspace;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use outpost_init::protocol::Lease;
pub use run::{DockerExecutor, LEASE_EXPIRED_REASON};
pub use spec::SpecError;

/// Whether the agent may pull a job's image that is not present locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Only images already present on the engine run (`"never"`).
    Never,
    /// Pull the image if the engine does not have it (`"if-missing"`).
    #[default]
    IfMissing,
}

/// Agent-side sandbox settings: the `[sandbox]` table of the agent's TOML config.
///
/// The limits are ceilings: a job may ask for less, never for more.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Memory limit of a job's container in bytes; swap is disabled. Default 1 GiB.
    pub memory_bytes: u64,
    /// CPU limit of a job's container in billionths of a CPU. Default 1 CPU (`1000000000`).
    pub nano_cpus: u64,
    /// Most processes and threads a job may have at once. Default 256.
    pub pids: u64,
    /// Numeric `uid:gid` jobs run as (never root); also the owner of the workspace.
    /// Default `"1000:1000"`.
    pub user: String,
    /// OCI runtime for job containers, e.g. `"runsc"` for gVisor; it must be
    /// registered in the Docker engine. Unset: the engine's default runtime.
    pub runtime: Option<String>,
    /// How long a job may take to stop after its single `SIGINT` (on cancel or
    /// timeout) before it is killed. A string such as `"10s"`, `"500ms"`, `"2m"`,
    /// or an integer number of seconds. Default `"10s"`.
    #[serde(deserialize_with = "deserialize_duration")]
    pub stop_grace: Duration,
    /// Directory where per-job workspaces are created (each one is
    /// `<job_id>-<epoch>`, mode 0700, owned by `user`). Must be absolute and
    /// dedicated to the agent: leftover workspaces in it are deleted at start.
    /// Default `/var/lib/outpost-agent/work`.
    pub work_dir: PathBuf,
    /// Size of the tmpfs mounted at `/tmp` in bytes (it counts towards the
    /// memory limit). Default 256 MiB.
    pub tmp_size_bytes: u64,
    /// Whether missing images are pulled: `"if-missing"` (default) or `"never"`.
    pub pull: PullPolicy,
    /// Size in bytes of each job's workspace: a filesystem of its own
    /// (sparse ext4 image, loop-mounted `nosuid,nodev`), so the kernel stops
    /// a job at this size; a job may ask for less. Default 4 GiB (at least
    /// 16 MiB). Needs `mkfs.ext4` and `mount` on the host.
    pub workspace_bytes: u64,
    /// Directory on a tmpfs where each job's secrets are written, as
    /// `<scope>/<job_id>-<epoch>/<name>` (mode 0400, owned by `user`), and
    /// bind-mounted read-only at `/run/secrets`. If it is not on a tmpfs at
    /// start, the agent mounts one there (root only, `nosuid,nodev,noexec`).
    /// It must be visible to the Docker engine at the same path (as
    /// `work_dir`). Leftovers of this agent in it are deleted at start.
    /// Default `/run/outpost-agent/secrets`.
    pub secrets_dir: PathBuf,
    /// Most bytes of output a job may produce (after masking); past it the
    /// job is stopped (one `SIGINT`, `stop_grace`, `SIGKILL`) and fails, and
    /// nothing beyond the limit is kept. Default 1 GiB.
    pub max_output_bytes: u64,
    /// Whether jobs may have egress (`--network egress`). Not read from the
    /// `[sandbox]` table: set from the agent's local policy at start. The
    /// executor refuses egress jobs unless it is set. Default `false`.
    #[serde(skip)]
    pub allow_egress: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory_bytes: 1 << 30,
            nano_cpus: 1_000_000_000,
            pids: 256,
            user: "1000:1000".to_string(),
            runtime: None,
            stop_grace: Duration::from_secs(10),
            work_dir: PathBuf::from("/var/lib/outpost-agent/work"),
            tmp_size_bytes: 256 << 20,
            pull: PullPolicy::IfMissing,
            workspace_bytes: 4 << 30,
            secrets_dir: PathBuf::from("/run/outpost-agent/secrets"),
            max_output_bytes: 1 << 30,
            allow_egress: false,
        }
    }
}

impl SandboxConfig {
    /// Checks values that parse but make no sense; returns the job user's
    /// numeric `(uid, gid)`.
    pub fn validate(&self) -> Result<(u32, u32), ExecError> {
        let invalid =
            |field: &'static str, reason: String| ExecError::InvalidConfig { field, reason };
        if self.memory_bytes < spec::MIN_MEMORY_BYTES || self.memory_bytes > i64::MAX as u64 {
            return Err(invalid(
                "memory_bytes",
                format!(
                    "{} is out of range (at least {} bytes)",
                    self.memory_bytes,
                    spec::MIN_MEMORY_BYTES
                ),
            ));
        }
        if self.nano_cpus < spec::MIN_NANO_CPUS || self.nano_cpus > i64::MAX as u64 {
            return Err(invalid(
                "nano_cpus",
                format!(
                    "{} is out of range (at least {}, i.e. 0.01 CPU)",
                    self.nano_cpus,
                    spec::MIN_NANO_CPUS
                ),
            ));
        }
        if self.pids == 0 || self.pids > i64::MAX as u64 {
            return Err(invalid("pids", format!("{} is out of range", self.pids)));
        }
        if self.tmp_size_bytes == 0 {
            return Err(invalid("tmp_size_bytes", "must be positive".to_string()));
        }
        if let Some(runtime) = &self.runtime
            && (runtime.is_empty() || runtime.contains(|c: char| c.is_whitespace()))
        {
            return Err(invalid(
                "runtime",
                format!("{runtime:?} is not a runtime name"),
            ));
        }
        if self.workspace_bytes < disk::MIN_WORKSPACE_BYTES {
            return Err(invalid(
                "workspace_bytes",
                format!(
                    "{} is too small (at least {} bytes)",
                    self.workspace_bytes,
                    disk::MIN_WORKSPACE_BYTES
                ),
            ));
        }
        if self.max_output_bytes == 0 {
            return Err(invalid("max_output_bytes", "must be positive".to_string()));
        }
        if !self.secrets_dir.is_absolute() || self.secrets_dir.parent().is_none() {
            return Err(invalid(
                "secrets_dir",
                format!(
                    "{} must be an absolute path other than /",
                    self.secrets_dir.display()
                ),
            ));
        }
        if !self.work_dir.is_absolute() || self.work_dir.parent().is_none() {
            return Err(invalid(
                "work_dir",
                format!(
                    "{} must be an absolute path other than /",
                    self.work_dir.display()
                ),
            ));
        }
        self.uid_gid()
    }

    /// The job user as numbers. Names are not accepted: the runner image may
    /// have no `/etc/passwd`, and the agent chowns the workspace to it.
    pub fn uid_gid(&self) -> Result<(u32, u32), ExecError> {
        let bad = |reason: &str| ExecError::InvalidConfig {
            field: "user",
            reason: format!("{:?} {reason}", self.user),
        };
        let (uid, gid) = self
            .user
            .split_once(':')
            .ok_or_else(|| bad("must be numeric uid:gid, e.g. \"1000:1000\""))?;
        let uid: u32 = uid
            .parse()
            .map_err(|_| bad("must be numeric uid:gid, e.g. \"1000:1000\""))?;
        let gid: u32 = gid
            .parse()
            .map_err(|_| bad("must be numeric uid:gid, e.g. \"1000:1000\""))?;
        if uid == 0 {
            return Err(bad("is root; jobs must run as a non-root user"));
        }
        Ok((uid, gid))
    }
}

/// Deserializes `"10s"`, `"500ms"`, `"2m"`, `"1h"` or an integer number of seconds.
fn deserialize_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses `<digits><unit>` with unit `ms`, `s`, `m` or `h` (a bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. \"10s\" or \"500ms\""))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!(
            "invalid duration unit in {text:?}: use ms, s, m or h"
        )),
    }
}

/// Errors of the executor. Inside [`DockerExecutor::run`] they become
/// [`Outcome::Failed`](crate::job::Outcome::Failed) with the error chain as
/// the reason.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("invalid sandbox setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("connecting to the docker engine failed")]
    Connect {
        #[source]
        source: bollard::errors::Error,
    },
    #[error("negotiating the docker engine api version failed")]
    NegotiateVersion {
        #[source]
        source: bollard::errors::Error,
    },
    #[error("pinging the docker engine failed")]
    Ping {
        #[source]
        source: bollard::errors::Error,
    },
    #[error("reading the docker engine's {what} failed")]
    EngineInfo {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "container runtime {runtime:?} is not registered in the docker engine (registered: {registered})"
    )]
    RuntimeMissing { runtime: String, registered: String },
    #[error("creating the work directory {} failed", path.display())]
    CreateWorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the work directory {} failed", path.display())]
    ReadWorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the job was rejected by this agent")]
    Rejected {
        #[from]
        source: SpecError,
    },
    #[error("inspecting image {image:?} failed")]
    InspectImage {
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("image {image:?} is not present on this agent and pulling is disabled")]
    ImageNotPresent { image: String },
    #[error("pulling image {image:?} failed")]
    PullImage {
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("creating workspace {} failed", path.display())]
    CreateWorkspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing workspace {} failed", path.display())]
    RemoveWorkspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating container {name} failed")]
    CreateContainer {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("attaching to the output of container {name} failed")]
    Attach {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("starting container {name} failed")]
    StartContainer {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("waiting for container {name} to exit failed")]
    Wait {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("sending {signal} to container {name} failed")]
    Signal {
        name: String,
        signal: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("inspecting container {name} failed")]
    InspectContainer {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("removing container {name} failed")]
    RemoveContainer {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("preparing the workspace filesystem {} failed: {reason}", path.display())]
    Workspace { path: PathBuf, reason: String },
    #[error("preparing the job's fence at {} failed", path.display())]
    Fence {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation} was interrupted")]
    Blocking {
        operation: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("listing containers labelled {label} failed")]
    ListContainers {
        label: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("preparing the secrets directory {} failed: {reason}", path.display())]
    SecretsDir { path: PathBuf, reason: String },
    #[error("writing the job's secrets to {} failed", path.display())]
    WriteSecrets {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the job's secrets {} failed", path.display())]
    RemoveSecrets {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the job's network {name} failed")]
    CreateNetwork {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("removing network {name} failed")]
    RemoveNetwork {
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("listing networks ({filter}) failed")]
    ListNetworks {
        filter: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("fencing the job's network failed: `{command}`: {message}")]
    Firewall { command: String, message: String },
}

/// `error: cause: cause`, the form used for user-facing failure reasons.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let c = SandboxConfig::default();
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(c.nano_cpus, 1_000_000_000);
        assert_eq!(c.pids, 256);
        assert_eq!(c.user, "1000:1000");
        assert_eq!(c.runtime, None);
        assert_eq!(c.stop_grace, Duration::from_secs(10));
        assert_eq!(c.work_dir, PathBuf::from("/var/lib/outpost-agent/work"));
        assert_eq!(c.tmp_size_bytes, 256 << 20);
        assert_eq!(c.pull, PullPolicy::IfMissing);
        assert_eq!(c.workspace_bytes, 4 << 30);
        assert_eq!(c.secrets_dir, PathBuf::from("/run/outpost-agent/secrets"));
        assert_eq!(c.max_output_bytes, 1 << 30);
        assert!(!c.allow_egress);
        assert_eq!(c.validate().unwrap(), (1000, 1000));
    }

    #[test]
    fn parses_toml_with_string_or_integer_grace() {
        let c: SandboxConfig = toml::from_str(
            r#"
            memory_bytes = 536870912
            runtime = "runsc"
            stop_grace = "1500ms"
            pull = "never"
            work_dir = "/srv/outpost"
            "#,
        )
        .unwrap();
        assert_eq!(c.memory_bytes, 512 << 20);
        assert_eq!(c.runtime.as_deref(), Some("runsc"));
        assert_eq!(c.stop_grace, Duration::from_millis(1500));
        assert_eq!(c.pull, PullPolicy::Never);
        assert_eq!(c.pids, 256, "unset fields keep their defaults");

        let c: SandboxConfig = toml::from_str("stop_grace = 30").unwrap();
        assert_eq!(c.stop_grace, Duration::from_secs(30));
        let c: SandboxConfig = toml::from_str("stop_grace = \"2m\"").unwrap();
        assert_eq!(c.stop_grace, Duration::from_secs(120));
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let e = toml::from_str::<SandboxConfig>("privileged = true").unwrap_err();
        assert!(e.to_string().contains("privileged"), "{e}");
        let e = toml::from_str::<SandboxConfig>("stop_grace = \"10 seconds\"").unwrap_err();
        assert!(e.to_string().contains("duration"), "{e}");
        let e = toml::from_str::<SandboxConfig>("pull = \"always\"").unwrap_err();
        assert!(e.to_string().contains("always"), "{e}");
        // Egress is the local policy's decision, not a sandbox key.
        let e = toml::from_str::<SandboxConfig>("allow_egress = true").unwrap_err();
        assert!(e.to_string().contains("allow_egress"), "{e}");
        let c: SandboxConfig =
            toml::from_str("secrets_dir = \"/srv/secrets\"\nmax_output_bytes = 1048576").unwrap();
        assert_eq!(c.secrets_dir, PathBuf::from("/srv/secrets"));
        assert_eq!(c.max_output_bytes, 1 << 20);
    }

    #[test]
    fn validation_names_the_field() {
        let check = |c: SandboxConfig, field: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{e}");
        };
        check(
            SandboxConfig {
                user: "0:0".into(),
                ..Default::default()
            },
            "user",
        );
        check(
            SandboxConfig {
                user: "runner".into(),
                ..Default::default()
            },
            "user",
        );
        check(
            SandboxConfig {
                pids: 0,
                ..Default::default()
            },
            "pids",
        );
        check(
            SandboxConfig {
                memory_bytes: 1024,
                ..Default::default()
            },
            "memory_bytes",
        );
        check(
            SandboxConfig {
                nano_cpus: 0,
                ..Default::default()
            },
            "nano_cpus",
        );
        check(
            SandboxConfig {
                tmp_size_bytes: 0,
                ..Default::default()
            },
            "tmp_size_bytes",
        );
        check(
            SandboxConfig {
                work_dir: "/".into(),
                ..Default::default()
            },
            "work_dir",
        );
        check(
            SandboxConfig {
                work_dir: "work".into(),
                ..Default::default()
            },
            "work_dir",
        );
        check(
            SandboxConfig {
                runtime: Some(String::new()),
                ..Default::default()
            },
            "runtime",
        );
        check(
            SandboxConfig {
                max_output_bytes: 0,
                ..Default::default()
            },
            "max_output_bytes",
        );
        check(
            SandboxConfig {
                secrets_dir: "secrets".into(),
                ..Default::default()
            },
            "secrets_dir",
        );
    }

    #[test]
    fn error_chain_joins_causes() {
        let e = ExecError::CreateWorkspace {
            path: "/w/j-1".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(
            error_chain(&e),
            "creating workspace /w/j-1 failed: disk full"
        );
    }
}
