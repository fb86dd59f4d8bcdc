//! Infrastructure-as-code runs on the agent. A lease whose `iac` task is set
//! is a phase of a stack's run; the agent drives it itself (the job's own
//! command is ignored):
//!
//! 1. the source tarball named by the task is fetched from the control
//!    plane over the agent's mTLS identity (`outpost.iac.v1.IacAgent`, served
//!    only for the caller's current lease), checked against its SHA-256 and
//!    unpacked into the job's workspace (`src/`);
//! 2. the sandboxed container runs `init`, `plan -out -detailed-exitcode`
//!    and `show -json` (the JSON stays in the workspace, never in the log);
//! 3. the agent evaluates the stack's plan policy (from the lease) and its
//!    owner's local plan policy (`[iac] plan_policy`) on that JSON
//!    ([`policy`]); a `deny` fails the job with the messages, a `warn` keeps
//!    the run from deploying by itself;
//! 4. the plan bundle ([`bundle`]: configuration, lock file, plan file) is
//!    sealed to the pool key ([`seal`]) and uploaded; only the ciphertext,
//!    the verdicts, the changed addresses with their actions and the plan
//!    digest ([`plan`]) leave the agent, before the job's final status.
//!
//! Unless the configuration declares a backend of its own, the stack's
//! state is managed: the agent serves Terraform's `http` backend inside the
//! job's network namespace and stores each new state as a version on the
//! control plane ([`backend`], [`state`]). The apply phase ([`apply`])
//! verifies the bundle and the state before anything runs. The hooks of one
//! phase are in [`job`], what it reports in [`report`].
//!
//! A `drift` task is a drift check ([`drift`]): a refresh-only plan and a
//! normal plan of one checkout; the agent reports the drifted addresses
//! and the pending changes with their actions, never values. An agent may
//! refuse drift checks (`[iac] refuse_drift`) or cap how many run at once
//! (`[iac] max_drift_checks`); it advertises [`DRIFT_LABEL`] when it takes
//! them. A stack's AWS role is served to its runs' jobs as to any job's.
//!
//! Files the job leaves in its workspace are opened without following
//! symlinks, so a job cannot make the agent read a host file.

pub mod apply;
pub mod backend;
pub mod bundle;
mod chain;
pub mod drift;
mod job;
pub mod plan;
pub mod policy;
mod report;
pub mod seal;
pub mod state;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use outpost_proto::iac::v1::iac_agent_client::IacAgentClient;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::warn;

use crate::executor::DockerExecutor;
use crate::job::{JobSpec, LeaseKey, Outcome};
use policy::PlanPolicy;

/// Largest source tarball and largest file read back from a workspace.
const MAX_BLOB_BYTES: usize = 64 << 20;
const MAX_PLAN_JSON_BYTES: u64 = 256 << 20;

/// Label an agent advertises when it takes drift checks; drift jobs
/// select it.
pub const DRIFT_LABEL: (&str, &str) = ("outpost-drift", "yes");

/// The `[iac]` table of the agent's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IacConfig {
    /// Rego file (`package outpost.plan`, `deny`/`warn` sets) every plan on
    /// this agent must also pass, whatever the stack's own policy says.
    pub plan_policy: Option<PathBuf>,
    /// The pool key: an age x25519 identity file shared by the agents of a
    /// pool. Plan bundles and state are encrypted to its public key; without
    /// it this agent refuses stack runs.
    pub pool_key_file: Option<PathBuf>,
    /// Take no drift checks (the agent does not advertise [`DRIFT_LABEL`]).
    pub refuse_drift: bool,
    /// Most drift checks run at once; more wait for a slot. Zero: no cap
    /// but the agent's capacity.
    pub max_drift_checks: u32,
}

impl IacConfig {
    /// The labels to advertise: the configured ones, plus [`DRIFT_LABEL`]
    /// unless drift checks are refused.
    pub fn advertised_labels(&self, labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut out = labels.clone();
        if !self.refuse_drift {
            out.insert(DRIFT_LABEL.0.to_string(), DRIFT_LABEL.1.to_string());
        }
        out
    }
}

/// Errors of the IaC layer of the agent.
#[derive(Debug, thiserror::Error)]
pub enum IacError {
    #[error("the local plan policy {path} is not usable: {message}")]
    LocalPolicy { path: PathBuf, message: String },
    #[error("the stack's plan policy does not compile: {0}")]
    StackPolicy(String),
    #[error("the task is not valid: {0}")]
    Task(String),
    #[error("fetching blob {digest} failed: {message}")]
    Fetch { digest: String, message: String },
    #[error("the source {digest} does not match its digest")]
    Digest { digest: String },
    #[error("unpacking the source failed")]
    Unpack(#[source] std::io::Error),
    #[error("reading {what} from the workspace failed")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid: {message}")]
    Invalid { what: &'static str, message: String },
    #[error("evaluating the {origin} plan policy failed: {message}")]
    Evaluate {
        origin: &'static str,
        message: String,
    },
    #[error("plan policy denied: {0}")]
    Denied(String),
    #[error("reporting the plan failed: {0}")]
    Report(String),
    #[error("{0} was interrupted")]
    Join(&'static str),
    #[error("the pool key {path} is not usable: {message}")]
    PoolKey { path: PathBuf, message: String },
    #[error("this agent has no [iac] pool_key_file: it cannot seal or open plans and state")]
    NoPoolKey,
    #[error("sealing to the pool key failed: {0}")]
    Seal(String),
    #[error("the plan bundle is refused: {0}")]
    Bundle(String),
    #[error("the managed state: {0}")]
    State(String),
    #[error("stale plan: {0}")]
    Stale(String),
}

/// One phase of a run, as the lease carries it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IacTask {
    pub run_id: String,
    pub stack: String,
    pub phase: String,
    pub source_digest: String,
    pub tool: String,
    pub plan_policy: String,
    pub variables: BTreeMap<String, String>,
    /// Apply: the approved digest, the sealed bundle's blob, the state the
    /// plan was made against.
    pub plan_digest: String,
    pub bundle_digest: String,
    pub state_serial: u64,
    pub state_lineage: String,
    /// A tracked run queued to revert drift (policy input `run.drift`).
    pub drift: bool,
}

/// The agent's IaC side: its local plan policy and its client of the
/// control plane's `IacAgent` service.
pub struct IacAgent {
    local_policy: Option<(PathBuf, String)>,
    pool: Option<seal::PoolKey>,
    client: IacAgentClient<Channel>,
    refuse_drift: bool,
    /// `max_drift_checks` slots, if capped.
    drift_slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl IacAgent {
    /// Compiles the local plan policy; `channel` is the agent's mTLS channel.
    pub fn new(cfg: &IacConfig, channel: Channel) -> Result<IacAgent, IacError> {
        let local_policy = match &cfg.plan_policy {
            None => None,
            Some(path) => {
                let fail = |message: String| IacError::LocalPolicy {
                    path: path.clone(),
                    message,
                };
                let text = std::fs::read_to_string(path)
                    .map_err(|e| fail(format!("cannot read it: {e}")))?;
                PlanPolicy::compile(&path.display().to_string(), &text).map_err(fail)?;
                Some((path.clone(), text))
            }
        };
        let pool = match &cfg.pool_key_file {
            None => None,
            Some(path) => Some(
                seal::PoolKey::load(path).map_err(|message| IacError::PoolKey {
                    path: path.clone(),
                    message,
                })?,
            ),
        };
        Ok(IacAgent {
            local_policy,
            pool,
            client: IacAgentClient::new(channel)
                .max_decoding_message_size(MAX_BLOB_BYTES + (1 << 20)),
            refuse_drift: cfg.refuse_drift,
            drift_slots: (cfg.max_drift_checks > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(cfg.max_drift_checks as usize))),
        })
    }
}

impl IacAgent {
    fn pool(&self) -> Result<&seal::PoolKey, IacError> {
        self.pool.as_ref().ok_or(IacError::NoPoolKey)
    }
}

/// The plan phase's script. `show -json` goes to a file, never to the log.
const PLAN_SCRIPT: &str = r#"set -u
cd /workspace/src
tf="$OUTPOST_TOOL"
"$tf" init -input=false -no-color || exit 1
"$tf" plan -input=false -no-color -out=/workspace/tfplan -detailed-exitcode
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then exit 1; fi
echo "$rc" > /workspace/plan.exitcode
"$tf" show -json /workspace/tfplan > /workspace/plan.json || exit 1
"#;

/// The spec the container runs for a task: the job's sandbox settings, the
/// agent's own command, variables as `TF_VAR_*`.
fn task_spec(spec: &JobSpec, task: &IacTask) -> Result<JobSpec, IacError> {
    if !matches!(task.tool.as_str(), "terraform" | "tofu") {
        return Err(IacError::Task(format!("tool {:?}", task.tool)));
    }
    let script = match task.phase.as_str() {
        "plan" => PLAN_SCRIPT,
        "apply" => apply::APPLY_SCRIPT,
        "lost" => {
            return Err(IacError::Task(
                "an earlier lease of this apply was lost; an apply is never retried".into(),
            ));
        }
        "drift" => drift::SCRIPT,
        other => {
            return Err(IacError::Task(format!(
                "phase {other:?} is not supported by this agent"
            )));
        }
    };
    let mut s = spec.clone();
    s.command = vec![
        "sh".into(),
        "-c".into(),
        format!("{}{script}", backend::WAIT_FOR_ENDPOINT),
    ];
    s.env.insert("OUTPOST_TOOL".into(), task.tool.clone());
    for (k, v) in &task.variables {
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(IacError::Task(format!("variable name {k:?}")));
        }
        s.env.insert(format!("TF_VAR_{k}"), v.clone());
    }
    Ok(s)
}

/// Runs one IaC phase through `exec` (with the AWS credentials channel of
/// `aws` when the stack has a role).
#[allow(clippy::too_many_arguments)]
pub async fn run_job(
    agent: Option<&Arc<IacAgent>>,
    aws: Option<&Arc<crate::aws::AwsAgent>>,
    exec: &DockerExecutor,
    key: &LeaseKey,
    spec: &JobSpec,
    task: &IacTask,
    output: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
    started: oneshot::Sender<()>,
) -> Outcome {
    let fail = |e: IacError| {
        warn!(error = %crate::executor::error_chain(&e), "refusing the run's task");
        Outcome::Failed {
            reason: crate::executor::error_chain(&e),
        }
    };
    let Some(agent) = agent else {
        return fail(IacError::Task("this agent has no iac support".into()));
    };
    let run_spec = match task_spec(spec, task) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let _drift_slot = if task.phase == "drift" {
        if agent.refuse_drift {
            return Outcome::Rejected {
                reason: "refused by the agent: it takes no drift checks".into(),
            };
        }
        match &agent.drift_slots {
            Some(slots) => tokio::select! {
                p = slots.clone().acquire_owned() => p.ok(),
                _ = cancel.cancelled() => {
                    return Outcome::Failed { reason: "cancelled while waiting for a drift check slot".into() };
                }
            },
            None => None,
        }
    } else {
        None
    };
    let stack_policy = if task.plan_policy.is_empty() {
        None
    } else {
        match PlanPolicy::compile(&format!("{}.rego", task.stack), &task.plan_policy) {
            Ok(p) => Some(p),
            Err(e) => return fail(IacError::StackPolicy(e)),
        }
    };
    let (uid, gid) = match exec.config().uid_gid() {
        Ok(ids) => ids,
        Err(e) => {
            return Outcome::Failed {
                reason: crate::executor::error_chain(&e),
            };
        }
    };
    let hooks = job::JobIac::new(agent, key, spec, task, (uid, gid), stack_policy);
    if run_spec.aws.is_none() {
        return exec
            .run_with_hooks(key, &run_spec, output, cancel, started, Some(&hooks))
            .await;
    }
    let Some(aws) = aws else {
        return Outcome::Rejected {
            reason: "refused by the agent: this agent has no aws support".into(),
        };
    };
    let job_aws = match aws.prepare_job(key, &run_spec, uid, gid) {
        Ok(Some(j)) => j,
        Ok(None) => {
            return exec
                .run_with_hooks(key, &run_spec, output, cancel, started, Some(&hooks))
                .await;
        }
        Err(e) => {
            return Outcome::Rejected {
                reason: format!("refused by the agent: {}", crate::executor::error_chain(&e)),
            };
        }
    };
    // The credentials channel first: its entry releases the script, which
    // then waits for the state endpoint.
    let both = chain::Chain {
        first: &job_aws,
        second: &hooks,
    };
    exec.run_with_hooks(key, &run_spec, output, cancel, started, Some(&both))
        .await
}

/// Follows a phase re-adopted after a restart of the agent to its end: the
/// state endpoint is bound again in the running container's namespace, and
/// the phase reports as it would have (an apply's state, a plan's summary).
/// A stack's AWS credentials channel is not set up again.
#[allow(clippy::too_many_arguments)]
pub async fn adopt_job(
    agent: Option<&Arc<IacAgent>>,
    exec: &DockerExecutor,
    key: &LeaseKey,
    spec: &JobSpec,
    task: &IacTask,
    skip: u64,
    output: mpsc::Sender<Bytes>,
    cancel: CancellationToken,
) -> Outcome {
    let (Some(agent), Ok(ids)) = (agent, exec.config().uid_gid()) else {
        return exec.adopt(key, spec, skip, output, cancel).await;
    };
    let stack_policy = (!task.plan_policy.is_empty())
        .then(|| PlanPolicy::compile(&format!("{}.rego", task.stack), &task.plan_policy).ok())
        .flatten();
    let hooks = job::JobIac::new(agent, key, spec, task, ids, stack_policy);
    exec.adopt_with_hooks(key, spec, skip, output, cancel, Some(&hooks))
        .await
}

/// Unpacks a source tarball into `dest` (entries may not leave it), owned
/// by the job's user.
fn unpack(data: &[u8], dest: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(data));
    archive.set_preserve_permissions(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        // `unpack_in` refuses paths that escape `dest`.
        entry.unpack_in(dest)?;
    }
    chown_tree(dest, uid, gid)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Reads a regular file the job wrote, without following a symlink, at
/// most `max` bytes.
fn read_nofollow(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    if meta.len() > max {
        return Err(std::io::Error::other(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_files_are_read_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("host-secret"), "canary").unwrap();
        std::os::unix::fs::symlink(dir.path().join("host-secret"), dir.path().join("plan.json"))
            .unwrap();
        assert!(read_nofollow(&dir.path().join("plan.json"), 100).is_err());
        std::fs::write(dir.path().join("big"), vec![b'x'; 200]).unwrap();
        assert!(read_nofollow(&dir.path().join("big"), 100).is_err());
        assert_eq!(
            read_nofollow(&dir.path().join("host-secret"), 100).unwrap(),
            b"canary"
        );
    }

    #[test]
    fn the_task_spec_runs_the_agents_script_with_variables() {
        let spec = JobSpec {
            image: "img".into(),
            command: vec!["rm".into(), "-rf".into(), "/".into()],
            ..Default::default()
        };
        let task = IacTask {
            phase: "plan".into(),
            tool: "terraform".into(),
            variables: [("greeting".to_string(), "hi".to_string())].into(),
            ..Default::default()
        };
        let s = task_spec(&spec, &task).unwrap();
        assert_eq!(s.command[0], "sh");
        assert_eq!(s.env.get("TF_VAR_greeting").map(String::as_str), Some("hi"));
        let bad = IacTask {
            tool: "/bin/evil".into(),
            ..task.clone()
        };
        assert!(task_spec(&spec, &bad).is_err());
        let bad = IacTask {
            variables: [("a=b".to_string(), String::new())].into(),
            ..task
        };
        assert!(task_spec(&spec, &bad).is_err());
    }
}
