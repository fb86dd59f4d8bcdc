//! The VPC owner's guardrails: the agent's local policy, checked for every
//! lease before anything runs (no workspace, no pull, no container).
//!
//! The control plane is trusted only to ask; the agent decides. A lease that
//! breaks the `[policy]` table of the agent's configuration (or the
//! `[sandbox]` ceilings) is refused and ends as `REJECTED` with every
//! violation in its message, e.g. `refused by the agent's policy: image
//! "alpine" (docker.io/library/alpine:latest) is not in allowed_images
//! ["outpost/"]; network "egress" is not allowed: allow_egress = false`.
//!
//! What is checked, in this order (all violations are reported, not only the
//! first):
//!
//! - the image against `allowed_images` ([`image_ref`] says how references
//!   are normalised and compared);
//! - egress against `allow_egress`;
//! - every environment variable *name* against `denied_env`;
//! - memory, CPU and pids requests against the `[sandbox]` ceilings and the
//!   minimums a container needs to start, and the timeout against
//!   `max_timeout`;
//! - the AWS role against `[aws] allowed_roles`;
//! - the optional Rego policy: `data.outpost.deny`, a set of messages; any
//!   message refuses the job, and an evaluation error refuses it too (fail
//!   closed).
//!
//! The AWS role is checked here against `[aws] allowed_roles`, the one
//! allow-list `crate::aws` enforces again (with `max_session_duration`)
//! before it assumes the role; the Rego policy sees the role too.
//!
//! A policy that cannot be loaded (bad entry, missing or invalid Rego file,
//! a Rego file without `data.outpost.deny`) is a configuration error: the
//! agent does not start (exit code 64).

pub mod image_ref;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tracing::warn;

use crate::config::AgentConfig;
use crate::job::{JobSpec, Lease, LeaseKey, Network};
use crate::runtime::LeaseCheck;
use image_ref::{ImageRef, ImageRule};

/// The rule the Rego policy must define (a set of strings).
pub const REGO_QUERY: &str = "data.outpost.deny";
/// Longest a Rego evaluation may run before the job is refused.
const REGO_TIME_LIMIT: Duration = Duration::from_secs(1);

/// The `[policy]` table of the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Images jobs may run. Each entry is one of: a prefix ending in `/`
    /// (`"registry.internal/team/"`, `"outpost/"` = the Docker Hub namespace
    /// `outpost`, `"registry.internal/"` = the whole registry); a repository
    /// (`"registry.internal/team/runner"`, any tag or digest); a tagged
    /// repository (`"outpost/runner:dev"`, that tag and no digest); or a
    /// pinned digest (`"repo@sha256:…"`, exactly that content). References
    /// are normalised like Docker's before comparing (`alpine` is
    /// `docker.io/library/alpine:latest`). Default: empty — no image is
    /// allowed until the VPC owner lists some.
    pub allowed_images: Vec<String>,
    /// Whether a job may ask for egress (`--network egress`). Default `false`.
    pub allow_egress: bool,
    /// Environment variable names a job may not set; `*` matches any run of
    /// characters, and names compare ignoring ASCII case (`*_PROXY` also
    /// denies `http_proxy`). Setting this replaces the default list:
    /// `["LD_*", "AWS_*", "DOCKER_*", "*_PROXY", "TINI_*", "OUTPOST_*",
    /// "BASH_ENV", "ENV"]`.
    pub denied_env: Vec<String>,
    /// Longest timeout a job may ask for (e.g. `"6h"`); when set, a job
    /// without a timeout is refused too. Default: unset (no maximum).
    #[serde(deserialize_with = "optional_duration")]
    pub max_timeout: Option<Duration>,
    /// Rego policy file evaluated in-process for every job (Rego v1 syntax).
    /// Its input is the job spec as JSON, with environment variable names
    /// only (never values or secrets); `data.outpost.deny` must be a set of
    /// strings, and any message refuses the job. A missing or invalid file is
    /// a startup error. Default: unset.
    pub rego: Option<PathBuf>,
}

/// The default `denied_env`, and why each entry is there:
///
/// - `LD_*`: the dynamic loader (`LD_PRELOAD`, `LD_LIBRARY_PATH`,
///   `LD_AUDIT`) would run the job's code inside the image's own entrypoint
///   and the agent's helpers in the container;
/// - `AWS_*`: AWS credentials, profiles, endpoints and region come from the
///   agent (`crate::aws`), so that `[aws] allowed_roles` stays the only way
///   to AWS;
/// - `DOCKER_*`: `DOCKER_HOST` and friends point tools at a Docker engine;
/// - `*_PROXY`: the network path out (`HTTP_PROXY`, `NO_PROXY`, …) is the
///   VPC owner's;
/// - `TINI_*`: configure an init's signal handling (jobs run under
///   `outpost-init`, but an image may bring tini of its own);
/// - `OUTPOST_*`: reserved for the agent;
/// - `BASH_ENV`, `ENV`: shell start-up files run before any script.
pub const DEFAULT_DENIED_ENV: &[&str] = &[
    "LD_*",
    "AWS_*",
    "DOCKER_*",
    "*_PROXY",
    "TINI_*",
    "OUTPOST_*",
    "BASH_ENV",
    "ENV",
];

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            allowed_images: Vec::new(),
            allow_egress: false,
            denied_env: DEFAULT_DENIED_ENV.iter().map(|s| s.to_string()).collect(),
            max_timeout: None,
            rego: None,
        }
    }
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    crate::units::serde_duration::deserialize(d).map(Some)
}

/// A policy that cannot be used; the agent does not start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid [policy] setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("the Rego policy {} (`[policy] rego`) is not usable: {message}", path.display())]
    Rego { path: PathBuf, message: String },
}

/// The agent's ceilings a job may only lower (from `[sandbox]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ceilings {
    memory_bytes: u64,
    nano_cpus: u64,
    pids: u64,
}

/// The compiled policy of one agent.
pub struct Policy {
    images: Vec<ImageRule>,
    /// `allowed_images` as configured, for messages.
    images_text: String,
    allow_egress: bool,
    /// `(pattern as configured, pattern in upper case)`.
    denied_env: Vec<(String, String)>,
    max_timeout: Option<Duration>,
    ceilings: Ceilings,
    /// `[aws]`, for its `allowed_roles`.
    aws: crate::aws::AwsConfig,
    rego: Option<Rego>,
    /// `agent` in the Rego input.
    agent: serde_json::Value,
}

struct Rego {
    path: PathBuf,
    engine: Mutex<regorus::Engine>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("images", &self.images)
            .field("allow_egress", &self.allow_egress)
            .field("denied_env", &self.denied_env)
            .field("max_timeout", &self.max_timeout)
            .field("ceilings", &self.ceilings)
            .field("rego", &self.rego.as_ref().map(|r| &r.path))
            .finish()
    }
}

impl Policy {
    /// Compiles the `[policy]` table (and reads the `[sandbox]` ceilings) of
    /// `cfg`. Every unusable setting is an error naming it.
    pub fn new(cfg: &AgentConfig) -> Result<Policy, PolicyError> {
        let p = &cfg.policy;
        let invalid = |field, reason| PolicyError::InvalidConfig { field, reason };
        let images = p
            .allowed_images
            .iter()
            .map(|entry| ImageRule::parse(entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| invalid("allowed_images", reason))?;
        let denied_env = p
            .denied_env
            .iter()
            .map(|pattern| {
                check_env_pattern(pattern).map(|()| (pattern.clone(), pattern.to_ascii_uppercase()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| invalid("denied_env", reason))?;
        if p.max_timeout.is_some_and(|t| t.is_zero()) {
            return Err(invalid("max_timeout", "must be positive".into()));
        }
        let mut policy = Policy {
            images,
            images_text: quoted_list(&p.allowed_images),
            allow_egress: p.allow_egress,
            denied_env,
            max_timeout: p.max_timeout,
            ceilings: Ceilings {
                memory_bytes: cfg.sandbox.memory_bytes,
                nano_cpus: cfg.sandbox.nano_cpus,
                pids: cfg.sandbox.pids,
            },
            aws: cfg.aws.clone(),
            rego: None,
            agent: serde_json::json!({
                "id": cfg.agent_id,
                "labels": cfg.labels,
                "limits": {
                    "memory_bytes": cfg.sandbox.memory_bytes,
                    "nano_cpus": cfg.sandbox.nano_cpus,
                    "pids": cfg.sandbox.pids,
                },
                "allow_egress": p.allow_egress,
            }),
        };
        if let Some(path) = &p.rego {
            policy.rego = Some(Rego::load(path, &policy)?);
        }
        Ok(policy)
    }

    /// Whether every image is refused (`allowed_images` is empty).
    pub fn allows_no_image(&self) -> bool {
        self.images.is_empty()
    }

    /// Checks a lease; `Err` holds every violation, joined by `"; "`, each
    /// naming the field, what the job asked for and what this agent allows.
    pub fn check(&self, lease: &Lease) -> Result<(), String> {
        let spec = &lease.spec;
        let mut violations = Vec::new();
        self.check_image(&spec.image, &mut violations);
        if spec.network == Network::Egress && !self.allow_egress {
            violations.push(
                "network \"egress\" is not allowed: allow_egress = false (only \"none\")".into(),
            );
        }
        for name in spec.env.keys() {
            let upper = name.to_ascii_uppercase();
            if let Some((pattern, _)) = self
                .denied_env
                .iter()
                .find(|(_, p)| crate::aws::glob::matches(p, &upper))
            {
                violations.push(format!(
                    "env {name:?} is denied by denied_env pattern {pattern:?}"
                ));
            }
        }
        let r = &spec.resources;
        let c = &self.ceilings;
        for (field, asked, max, unit) in [
            ("memory_bytes", r.memory_bytes, c.memory_bytes, Unit::Bytes),
            ("nano_cpus", r.nano_cpus, c.nano_cpus, Unit::NanoCpus),
            ("pids", r.pids, c.pids, Unit::Count),
        ] {
            if let Some(asked) = asked
                && asked > max
            {
                violations.push(format!(
                    "resources.{field} {} is above this agent's maximum of {} ([sandbox] {field})",
                    unit.show(asked),
                    unit.show(max)
                ));
            }
        }
        use crate::executor::spec::{MIN_MEMORY_BYTES, MIN_NANO_CPUS, MIN_PIDS};
        for (field, asked, min, unit) in [
            (
                "memory_bytes",
                r.memory_bytes,
                MIN_MEMORY_BYTES,
                Unit::Bytes,
            ),
            ("nano_cpus", r.nano_cpus, MIN_NANO_CPUS, Unit::NanoCpus),
            ("pids", r.pids, MIN_PIDS, Unit::Count),
        ] {
            if let Some(asked) = asked
                && asked < min
            {
                violations.push(format!(
                    "resources.{field} {} is below the minimum of {} a job needs to start",
                    unit.show(asked),
                    unit.show(min)
                ));
            }
        }
        if let Some(aws) = &spec.aws
            && !self.aws.role_allowed(&aws.role_arn)
        {
            violations.push(if self.aws.allowed_roles.is_empty() {
                format!(
                    "aws role {:?} is not allowed: this agent allows no aws role ([aws] allowed_roles is empty)",
                    aws.role_arn
                )
            } else {
                format!(
                    "aws role {:?} is not in [aws] allowed_roles {}",
                    aws.role_arn,
                    quoted_list(&self.aws.allowed_roles)
                )
            });
        }
        if let Some(max) = self.max_timeout {
            match spec.timeout {
                Some(t) if t > max => violations.push(format!(
                    "timeout {} is above this agent's max_timeout of {}",
                    show_duration(t),
                    show_duration(max)
                )),
                Some(_) => {}
                None => violations.push(format!(
                    "timeout: the job sets none, but this agent's max_timeout is {} (submit with --timeout)",
                    show_duration(max)
                )),
            }
        }
        if let Some(rego) = &self.rego {
            violations.extend(rego.deny(&self.input(&lease.key, spec)));
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations.join("; "))
        }
    }

    fn check_image(&self, image: &str, violations: &mut Vec<String>) {
        let parsed = match ImageRef::parse(image) {
            Ok(parsed) => parsed,
            Err(e) => {
                violations.push(format!(
                    "image {image:?} is not a valid image reference ({e}); allowed_images = {}",
                    self.images_text
                ));
                return;
            }
        };
        if self.images.is_empty() {
            violations.push(format!(
                "image {image:?} is not allowed: this agent allows no image (allowed_images is empty)"
            ));
        } else if !self.images.iter().any(|rule| rule.admits(&parsed)) {
            violations.push(format!(
                "image {image:?} ({parsed}) is not in allowed_images {}",
                self.images_text
            ));
        }
    }

    /// The Rego input: the job spec with environment variable and secret
    /// *names* only; no value, token or secret ever reaches the policy.
    fn input(&self, key: &LeaseKey, spec: &JobSpec) -> serde_json::Value {
        let image_ref = ImageRef::parse(&spec.image).ok().map(|r| {
            serde_json::json!({
                "registry": r.domain,
                "repository": r.path,
                "tag": r.tag,
                "digest": r.digest,
                "normalized": r.to_string(),
            })
        });
        serde_json::json!({
            "job_id": key.job_id,
            "epoch": key.epoch,
            "image": spec.image,
            "image_ref": image_ref,
            "command": spec.command,
            "env": spec.env.keys().collect::<Vec<_>>(),
            "resources": {
                "memory_bytes": spec.resources.memory_bytes,
                "nano_cpus": spec.resources.nano_cpus,
                "pids": spec.resources.pids,
            },
            "timeout_s": spec.timeout.map(|t| t.as_secs_f64()),
            "network": match spec.network {
                Network::None => "none",
                Network::Egress => "egress",
            },
            "aws": spec.aws.as_ref().map(|a| serde_json::json!({
                "role_arn": a.role_arn,
                "duration_s": a.duration.map(|d| d.as_secs()),
                "session_policy": a.session_policy,
            })),
            "workspace_source": spec.workspace_source,
            "artifacts": spec.artifacts,
            "secrets": spec.secrets.iter().map(|s| &s.name).collect::<Vec<_>>(),
            "agent": self.agent,
        })
    }
}

impl Rego {
    /// Reads and compiles the policy, then evaluates it once against a
    /// sample job so that a missing `data.outpost.deny` or an error that
    /// shows for every job stops the agent at start, not at the first job.
    fn load(path: &Path, policy: &Policy) -> Result<Rego, PolicyError> {
        let fail = |message: String| PolicyError::Rego {
            path: path.to_path_buf(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: REGO_TIME_LIMIT,
            check_interval: NonZeroU32::new(256).unwrap_or(NonZeroU32::MIN),
        });
        let package = engine
            .add_policy(path.display().to_string(), text)
            .map_err(|e| fail(error_text(&e)))?;
        if package != "data.outpost" {
            return Err(fail(format!(
                "it declares {package}, but the agent evaluates {REGO_QUERY}: use `package outpost`"
            )));
        }
        let rego = Rego {
            path: path.to_path_buf(),
            engine: Mutex::new(engine),
        };
        let sample = policy.input(
            &LeaseKey {
                job_id: "startup-check".into(),
                epoch: 1,
            },
            &JobSpec::default(),
        );
        rego.eval(&sample).map_err(|e| {
            fail(format!(
                "evaluating {REGO_QUERY} for a sample job failed (it must define `deny`, a set of messages): {e}"
            ))
        })?;
        Ok(rego)
    }

    /// The deny messages of the policy for `input`, or why it failed.
    fn eval(&self, input: &serde_json::Value) -> Result<Vec<String>, String> {
        let input =
            regorus::Value::from_json_str(&input.to_string()).map_err(|e| error_text(&e))?;
        let value = {
            let mut engine = self.engine.lock();
            engine.set_input(input);
            engine
                .eval_rule(REGO_QUERY.to_string())
                .map_err(|e| error_text(&e))?
        };
        let items: Vec<regorus::Value> = match value {
            regorus::Value::Undefined => Vec::new(),
            regorus::Value::Set(set) => set.iter().cloned().collect(),
            regorus::Value::Array(items) => items.iter().cloned().collect(),
            other => {
                return Err(format!(
                    "{REGO_QUERY} must be a set of strings, not {}",
                    other.to_json_str().unwrap_or_default()
                ));
            }
        };
        Ok(items
            .into_iter()
            .map(|item| match item {
                regorus::Value::String(s) => s.to_string(),
                other => other.to_json_str().unwrap_or_default(),
            })
            .collect())
    }

    /// Violations for one job: each deny message, or the evaluation error
    /// (which refuses the job: fail closed).
    fn deny(&self, input: &serde_json::Value) -> Vec<String> {
        let name = self.path.display();
        match self.eval(input) {
            Ok(messages) => messages
                .into_iter()
                .map(|m| format!("rego {name}: {m}"))
                .collect(),
            Err(e) => {
                warn!(policy = %name, error = %e, "rego evaluation failed; refusing the job");
                vec![format!(
                    "rego {name}: evaluating {REGO_QUERY} failed, so the job is refused: {e}"
                )]
            }
        }
    }
}

/// The agent's [`LeaseCheck`] built from its configuration.
pub fn lease_check(cfg: &AgentConfig) -> Result<LeaseCheck, PolicyError> {
    let policy = Policy::new(cfg)?;
    if policy.allows_no_image() {
        warn!("[policy] allowed_images is empty: every job will be refused");
    }
    let policy = Arc::new(policy);
    Ok(Arc::new(move |lease: &Lease| policy.check(lease)))
}

fn error_text(e: &anyhow::Error) -> String {
    format!("{e:#}").trim_end().to_string()
}

/// `["a", "b"]`
fn quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fn check_env_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("a pattern is empty".into());
    }
    if !pattern
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'*')
    {
        return Err(format!(
            "pattern {pattern:?} may only contain letters, digits, '_' and '*'"
        ));
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    NanoCpus,
    Count,
}

impl Unit {
    fn show(self, n: u64) -> String {
        match self {
            Unit::Bytes => {
                let human = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
                    .into_iter()
                    .find(|(shift, _)| n >= 1 << shift && n.is_multiple_of(1 << shift))
                    .map(|(shift, unit)| format!(" ({} {unit})", n >> shift));
                format!("{n} bytes{}", human.unwrap_or_default())
            }
            Unit::NanoCpus => format!("{n} ({} CPU)", n as f64 / 1e9),
            Unit::Count => n.to_string(),
        }
    }
}

fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::job::{AwsRole, Resources, Secret};

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn config(policy: &str) -> AgentConfig {
        AgentConfig::parse(&format!(
            r#"
server = "https://127.0.0.1:7443"
agent_id = "a1"
[labels]
zone = "eu"
[tls]
ca = "/ca.pem"
cert = "/agent.pem"
key = "/agent.key"
[sandbox]
memory_bytes = 1073741824
nano_cpus = 1000000000
pids = 256
[policy]
{policy}
"#
        ))
        .unwrap()
    }

    fn policy(text: &str) -> Policy {
        Policy::new(&config(text)).unwrap()
    }

    fn lease(spec: JobSpec) -> Lease {
        Lease {
            key: LeaseKey {
                job_id: "job-1".into(),
                epoch: 7,
            },
            lease_id: "l".into(),
            ttl: Duration::from_secs(30),
            spec,
            log_offset: 0,
        }
    }

    fn job(image: &str) -> JobSpec {
        JobSpec {
            image: image.into(),
            command: vec!["sh".into(), "-c".into(), "true".into()],
            ..Default::default()
        }
    }

    fn refusal(p: &Policy, spec: JobSpec) -> String {
        p.check(&lease(spec)).unwrap_err()
    }

    const OPEN: &str = r#"allowed_images = ["outpost/", "registry.internal/team/"]"#;

    #[test]
    fn defaults_allow_no_image_no_egress_and_deny_dangerous_env() {
        let c = PolicyConfig::default();
        assert!(c.allowed_images.is_empty());
        assert!(!c.allow_egress);
        assert_eq!(c.max_timeout, None);
        assert_eq!(c.rego, None);
        let p = policy("");
        assert!(p.allows_no_image());
        let e = refusal(&p, job("outpost/runner:dev"));
        assert!(e.contains("allows no image"), "{e}");
        let p = policy(OPEN);
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "AWS_ACCESS_KEY_ID",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "DOCKER_HOST",
            "HTTP_PROXY",
            "https_proxy",
            "NO_PROXY",
            "TINI_KILL_PROCESS_GROUP",
            "OUTPOST_X",
            "BASH_ENV",
            "ENV",
        ] {
            let mut s = job("outpost/runner:dev");
            s.env.insert(name.into(), "x".into());
            let e = refusal(&p, s);
            assert!(e.contains(&format!("env {name:?} is denied")), "{e}");
        }
        let mut s = job("outpost/runner:dev");
        s.env = BTreeMap::from([
            ("TF_LOG".to_string(), "info".to_string()),
            ("ENVIRONMENT".to_string(), "prod".to_string()),
            ("MY_AWS".to_string(), "x".to_string()),
        ]);
        p.check(&lease(s)).unwrap();
    }

    #[test]
    fn images_match_prefixes_and_digests_after_normalising() {
        let pinned =
            format!(r#"allowed_images = ["outpost/", "registry.internal/team/", "alpine@{D}"]"#);
        let p = policy(&pinned);
        for ok in [
            "outpost/runner:dev".to_string(),
            "docker.io/outpost/runner".to_string(),
            format!("outpost/runner:dev@{D}"),
            "registry.internal/team/tf:1.9".to_string(),
            format!("alpine@{D}"),
            format!("docker.io/library/alpine:3@{D}"),
        ] {
            p.check(&lease(job(&ok)))
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("evil.com/outpost/x", "is not in allowed_images"),
            ("outpostx/runner", "is not in allowed_images"),
            ("alpine", "is not in allowed_images"),
            ("alpine:3", "is not in allowed_images"),
            ("registry.internal/teamx/tf", "is not in allowed_images"),
            ("outpost/../x", "not a valid image reference"),
            ("outpost/Runner", "not a valid image reference"),
            ("outpost/runner :dev", "not a valid image reference"),
            ("", "not a valid image reference"),
        ] {
            let e = refusal(&p, job(bad));
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains(&format!("image {bad:?}")), "{e}");
            assert!(
                e.contains("\"outpost/\", \"registry.internal/team/\""),
                "{e}"
            );
        }
        let other = D.replace("0123", "3210");
        let e = refusal(&p, job(&format!("alpine@{other}")));
        assert!(e.contains("docker.io/library/alpine@sha256:3210"), "{e}");

        // A tag entry does not admit the same tag with a digest.
        let p = policy(r#"allowed_images = ["outpost/runner:dev"]"#);
        p.check(&lease(job("outpost/runner:dev"))).unwrap();
        refusal(&p, job(&format!("outpost/runner:dev@{D}")));
        refusal(&p, job("outpost/runner:latest"));
    }

    #[test]
    fn unusable_settings_are_config_errors_naming_the_field() {
        for (text, field) in [
            (r#"allowed_images = ["outpost/../x"]"#, "allowed_images"),
            (r#"allowed_images = ["Outpost/"]"#, "allowed_images"),
            (r#"allowed_images = [""]"#, "allowed_images"),
            (r#"denied_env = ["LD PRELOAD"]"#, "denied_env"),
            (r#"denied_env = [""]"#, "denied_env"),
            (r#"max_timeout = "0s""#, "max_timeout"),
        ] {
            let e = Policy::new(&config(text)).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{text}: {e}");
        }
        let e =
            AgentConfig::parse(&format!("{}\nallow_egres = true\n", config_text())).unwrap_err();
        assert!(e.contains("allow_egres"), "{e}");
    }

    fn config_text() -> String {
        "server = \"https://x:1\"\n[tls]\nca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"\n[policy]".into()
    }

    #[test]
    fn egress_needs_allow_egress() {
        let mut s = job("outpost/runner:dev");
        s.network = Network::Egress;
        let e = refusal(&policy(OPEN), s.clone());
        assert!(
            e.contains("network \"egress\" is not allowed: allow_egress = false"),
            "{e}"
        );
        policy(&format!("{OPEN}\nallow_egress = true"))
            .check(&lease(s))
            .unwrap();
    }

    #[test]
    fn env_patterns_are_globs_ignoring_case() {
        let p = policy(&format!(
            r#"{OPEN}
denied_env = ["SECRET_*", "*_TOKEN", "EXACT"]"#
        ));
        for (name, pattern) in [
            ("SECRET_A", "SECRET_*"),
            ("secret_b", "SECRET_*"),
            ("GITHUB_TOKEN", "*_TOKEN"),
            ("exact", "EXACT"),
        ] {
            let mut s = job("outpost/runner:dev");
            s.env.insert(name.into(), "v".into());
            let e = refusal(&p, s);
            assert_eq!(
                e,
                format!("env {name:?} is denied by denied_env pattern {pattern:?}")
            );
        }
        let mut s = job("outpost/runner:dev");
        // The configured list replaced the defaults.
        s.env.insert("LD_PRELOAD".into(), "x".into());
        s.env.insert("EXACTLY".into(), "x".into());
        s.env.insert("TOKEN".into(), "x".into());
        p.check(&lease(s)).unwrap();
    }

    #[test]
    fn resources_above_the_sandbox_ceilings_are_refused_with_the_limit() {
        let p = policy(OPEN);
        let with = |r: Resources| JobSpec {
            resources: r,
            ..job("outpost/runner:dev")
        };
        let e = refusal(
            &p,
            with(Resources {
                memory_bytes: Some(2 << 30),
                ..Default::default()
            }),
        );
        assert_eq!(
            e,
            "resources.memory_bytes 2147483648 bytes (2 GiB) is above this agent's maximum of 1073741824 bytes (1 GiB) ([sandbox] memory_bytes)"
        );
        let e = refusal(
            &p,
            with(Resources {
                nano_cpus: Some(1_500_000_000),
                ..Default::default()
            }),
        );
        assert!(e.contains("resources.nano_cpus 1500000000 (1.5 CPU) is above this agent's maximum of 1000000000 (1 CPU)"), "{e}");
        let e = refusal(
            &p,
            with(Resources {
                pids: Some(257),
                ..Default::default()
            }),
        );
        assert!(
            e.contains("resources.pids 257 is above this agent's maximum of 256"),
            "{e}"
        );
        // At or below the ceilings: allowed (lowering is always fine).
        p.check(&lease(with(Resources {
            memory_bytes: Some(1 << 30),
            nano_cpus: Some(1_000_000_000),
            pids: Some(256),
            workspace_bytes: None,
        })))
        .unwrap();
        p.check(&lease(with(Resources {
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(100_000_000),
            pids: Some(10),
            workspace_bytes: None,
        })))
        .unwrap();
    }

    #[test]
    fn resources_below_what_a_container_needs_and_unlisted_roles_are_refused() {
        let p = policy(OPEN);
        let with = |r: Resources| JobSpec {
            resources: r,
            ..job("outpost/runner:dev")
        };
        let e = refusal(
            &p,
            with(Resources {
                memory_bytes: Some(1 << 20),
                nano_cpus: Some(1_000),
                pids: Some(1),
                workspace_bytes: None,
            }),
        );
        let parts: Vec<&str> = e.split("; ").collect();
        assert_eq!(parts.len(), 3, "{e}");
        assert!(parts[0].starts_with("resources.memory_bytes 1048576 bytes (1 MiB) is below the minimum of 6291456 bytes (6 MiB)"), "{e}");
        assert!(parts[1].starts_with("resources.nano_cpus 1000"), "{e}");
        assert!(
            parts[2].starts_with("resources.pids 1 is below the minimum of 8"),
            "{e}"
        );

        let role = |arn: &str| JobSpec {
            aws: Some(AwsRole {
                role_arn: arn.into(),
                session_policy: None,
                duration: None,
                web_identity_token: None,
            }),
            ..job("outpost/runner:dev")
        };
        let e = refusal(&p, role("arn:aws:iam::1:role/admin"));
        assert!(e.contains("allows no aws role"), "{e}");
        let mut cfg = config(OPEN);
        cfg.aws.allowed_roles = vec!["arn:aws:iam::1:role/outpost-*".into()];
        let p = Policy::new(&cfg).unwrap();
        let e = refusal(&p, role("arn:aws:iam::1:role/admin"));
        assert!(
            e.contains("\"arn:aws:iam::1:role/admin\" is not in [aws] allowed_roles [\"arn:aws:iam::1:role/outpost-*\"]"),
            "{e}"
        );
        p.check(&lease(role("arn:aws:iam::1:role/outpost-tf")))
            .unwrap();
    }

    #[test]
    fn timeouts_above_max_timeout_are_refused() {
        let p = policy(&format!("{OPEN}\nmax_timeout = \"1h\""));
        let with = |t: Option<Duration>| JobSpec {
            timeout: t,
            ..job("outpost/runner:dev")
        };
        let e = refusal(&p, with(Some(Duration::from_secs(7200))));
        assert_eq!(e, "timeout 2h is above this agent's max_timeout of 1h");
        let e = refusal(&p, with(None));
        assert!(
            e.contains("the job sets none, but this agent's max_timeout is 1h"),
            "{e}"
        );
        p.check(&lease(with(Some(Duration::from_secs(3600)))))
            .unwrap();
        p.check(&lease(with(Some(Duration::from_secs(60)))))
            .unwrap();
        // Without max_timeout, any timeout (or none) is allowed.
        policy(OPEN).check(&lease(with(None))).unwrap();
    }

    #[test]
    fn every_violation_is_reported() {
        let mut s = job("alpine");
        s.network = Network::Egress;
        s.env.insert("LD_PRELOAD".into(), "/x.so".into());
        s.resources.pids = Some(100_000);
        let e = refusal(&policy(OPEN), s);
        let parts: Vec<&str> = e.split("; ").collect();
        assert_eq!(parts.len(), 4, "{e}");
        assert!(parts[0].starts_with("image \"alpine\""), "{e}");
        assert!(parts[1].starts_with("network"), "{e}");
        assert!(parts[2].starts_with("env \"LD_PRELOAD\""), "{e}");
        assert!(parts[3].starts_with("resources.pids"), "{e}");
    }

    /// Nothing in a lease widens the sandbox: every field a job can set is
    /// either checked here (image, network, env, resources, timeout), by
    /// `crate::aws` (role, session length), or has no sandbox effect
    /// (command, artifacts). One looser request per field, each refused.
    #[test]
    fn a_looser_request_is_refused_for_every_field() {
        let p = policy(&format!("{OPEN}\nmax_timeout = \"1h\""));
        let base = JobSpec {
            timeout: Some(Duration::from_secs(60)),
            ..job("outpost/runner:dev")
        };
        p.check(&lease(base.clone())).unwrap();
        let looser: Vec<(&str, JobSpec)> = vec![
            (
                "image",
                JobSpec {
                    image: "evil.com/outpost/x".into(),
                    ..base.clone()
                },
            ),
            (
                "network",
                JobSpec {
                    network: Network::Egress,
                    ..base.clone()
                },
            ),
            (
                "env",
                JobSpec {
                    env: BTreeMap::from([("LD_PRELOAD".into(), "x".into())]),
                    ..base.clone()
                },
            ),
            (
                "resources.memory_bytes",
                JobSpec {
                    resources: Resources {
                        memory_bytes: Some((1 << 30) + 1),
                        ..Default::default()
                    },
                    ..base.clone()
                },
            ),
            (
                "resources.nano_cpus",
                JobSpec {
                    resources: Resources {
                        nano_cpus: Some(1_000_000_001),
                        ..Default::default()
                    },
                    ..base.clone()
                },
            ),
            (
                "resources.pids",
                JobSpec {
                    resources: Resources {
                        pids: Some(257),
                        ..Default::default()
                    },
                    ..base.clone()
                },
            ),
            (
                "timeout",
                JobSpec {
                    timeout: Some(Duration::from_secs(3601)),
                    ..base.clone()
                },
            ),
            (
                "timeout",
                JobSpec {
                    timeout: None,
                    ..base.clone()
                },
            ),
        ];
        for (field, spec) in looser {
            let e = refusal(&p, spec);
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }

    fn rego_file(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("policy.rego");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn rego_policy(dir: &tempfile::TempDir, text: &str) -> Result<Policy, PolicyError> {
        let path = rego_file(dir, text);
        Policy::new(&config(&format!(
            "{OPEN}\nrego = {:?}",
            path.display().to_string()
        )))
    }

    const DENY: &str = r#"
package outpost

deny contains msg if {
    input.image_ref.registry != "registry.internal"
    input.network == "egress"
    msg := sprintf("egress only from registry.internal images, not %s", [input.image])
}

deny contains msg if {
    some name in input.env
    startswith(name, "TF_VAR_")
    msg := sprintf("%s: set Terraform variables in code", [name])
}

deny contains "no plain shells in prod" if {
    input.agent.labels.zone == "eu"
    input.command[0] == "bash"
}
"#;

    #[test]
    fn rego_deny_messages_refuse_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let p = rego_policy(&dir, DENY).unwrap();
        p.check(&lease(job("outpost/runner:dev"))).unwrap();
        let mut s = job("outpost/runner:dev");
        s.env.insert("TF_VAR_password".into(), "hunter2".into());
        s.command = vec!["bash".into()];
        let e = refusal(&p, s);
        let name = dir.path().join("policy.rego").display().to_string();
        assert!(
            e.contains(&format!("rego {name}: no plain shells in prod")),
            "{e}"
        );
        assert!(
            e.contains("TF_VAR_password: set Terraform variables in code"),
            "{e}"
        );
        assert!(
            !e.contains("hunter2"),
            "env values never reach the policy: {e}"
        );
    }

    #[test]
    fn rego_input_has_names_but_no_values_or_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let p = rego_policy(&dir, "package outpost\ndeny contains \"x\" if false\n").unwrap();
        let mut s = job("outpost/runner:dev");
        s.env.insert("VISIBLE".into(), "env-value-canary".into());
        s.secrets = vec![crate::job::JobSecret {
            name: "db_password".into(),
            value: crate::job::SecretBytes::new("secret-canary"),
        }];
        s.aws = Some(AwsRole {
            role_arn: "arn:aws:iam::1:role/x".into(),
            session_policy: None,
            duration: Some(Duration::from_secs(900)),
            web_identity_token: Some(Secret::new("token-canary")),
        });
        let input = p.input(&lease(s.clone()).key, &s).to_string();
        assert!(input.contains("\"VISIBLE\""), "{input}");
        assert!(input.contains("arn:aws:iam::1:role/x"), "{input}");
        assert!(!input.contains("env-value-canary"), "{input}");
        assert!(!input.contains("token-canary"), "{input}");
        assert!(input.contains("\"db_password\""), "{input}");
        assert!(!input.contains("secret-canary"), "{input}");
        assert!(input.contains("\"job_id\":\"job-1\""), "{input}");
        assert!(input.contains("\"epoch\":7"), "{input}");
    }

    #[test]
    fn rego_can_see_the_whole_spec() {
        let dir = tempfile::tempdir().unwrap();
        let p = rego_policy(
            &dir,
            r#"
package outpost
deny contains "role" if input.aws.role_arn == "arn:aws:iam::1:role/admin"
deny contains "epoch" if input.epoch > 5
deny contains "memory" if input.resources.memory_bytes > 100
deny contains "timeout" if input.timeout_s > 10
deny contains "digest" if input.image_ref.digest == null
"#,
        )
        .unwrap();
        let mut s = job("outpost/runner:dev");
        s.aws = Some(AwsRole {
            role_arn: "arn:aws:iam::1:role/admin".into(),
            ..Default::default()
        });
        s.resources.memory_bytes = Some(64 << 20);
        s.timeout = Some(Duration::from_secs(60));
        let e = refusal(&p, s);
        for m in ["role", "epoch", "memory", "timeout", "digest"] {
            assert!(e.contains(&format!(": {m}")), "{m}: {e}");
        }
    }

    #[test]
    fn a_rego_evaluation_error_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        // Two values for one complete rule: a runtime error, only for this job.
        let p = rego_policy(
            &dir,
            r#"
package outpost
mode := "a" if input.command[0] == "boom"
mode := "b" if input.command[0] == "boom"
deny contains "never" if mode == "c"
"#,
        )
        .unwrap();
        p.check(&lease(job("outpost/runner:dev"))).unwrap();
        let mut s = job("outpost/runner:dev");
        s.command = vec!["boom".into()];
        let e = refusal(&p, s);
        assert!(e.contains("failed, so the job is refused"), "{e}");

        // A deny that is not a set of strings is an error too.
        let p = rego_policy(
            &dir,
            "package outpost\ndeny := true if input.command[0] == \"boom\"\n",
        )
        .unwrap();
        let mut s = job("outpost/runner:dev");
        s.command = vec!["boom".into()];
        let e = refusal(&p, s);
        assert!(e.contains("must be a set of strings"), "{e}");
    }

    #[test]
    fn an_unusable_rego_file_is_a_startup_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().join("policy.rego").display().to_string();
        for text in [
            "package outpost\ndeny contains msg if {\n",
            "package outpost\ndeny contains msg if { input.x ==== 1; msg := \"x\" }\n",
            "package other\ndeny contains \"x\" if false\n",
        ] {
            let e = rego_policy(&dir, text).unwrap_err().to_string();
            assert!(e.contains(&name), "{e}");
            assert!(e.contains("[policy] rego"), "{e}");
        }
        let missing = dir.path().join("missing.rego");
        let e = Policy::new(&config(&format!(
            "{OPEN}\nrego = {:?}",
            missing.display().to_string()
        )))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("missing.rego") && e.contains("cannot read"),
            "{e}"
        );
    }
}
