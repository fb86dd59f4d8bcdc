//! Arguments of `outpost submit` (and the issuer settings `server` and
//! `oidc publish` share): parsing, and the job spec they make.

use std::collections::HashMap;
use std::time::Duration;

use clap::ValueEnum;
use outpost_agent::units::{parse_bytes, parse_cpus, parse_duration};
use outpost_proto::agent::v1 as pb;

/// Issuer settings of the per-job web-identity tokens.
#[derive(clap::Args, Debug, Clone)]
pub struct OidcArgs {
    /// Issuer URL (`iss`): where the discovery document is hosted.
    #[arg(long, env = "OUTPOST_OIDC_ISSUER", default_value = crate::oidc::DEFAULT_ISSUER)]
    pub oidc_issuer: String,
    /// Audience (`aud`) of the tokens.
    #[arg(long, env = "OUTPOST_OIDC_AUDIENCE", default_value = crate::oidc::DEFAULT_AUDIENCE)]
    pub oidc_audience: String,
    /// Token lifetime for jobs without a timeout (others: timeout + 15m; at most 24h).
    #[arg(long, default_value = "6h", value_parser = parse_duration)]
    pub oidc_token_ttl: std::time::Duration,
}

impl OidcArgs {
    pub fn config(&self, data_dir: &std::path::Path) -> crate::oidc::OidcConfig {
        crate::oidc::OidcConfig {
            issuer: self.oidc_issuer.clone(),
            audience: self.oidc_audience.clone(),
            token_ttl: self.oidc_token_ttl,
            ..crate::oidc::OidcConfig::new(data_dir)
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum NetworkArg {
    None,
    Egress,
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// Container image to run.
    #[arg(long)]
    pub image: String,
    /// Agent label the job requires (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Environment variable for the job (repeatable).
    #[arg(long = "env", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Memory limit (e.g. 512m); only lowers the agent's limit.
    #[arg(long, value_parser = parse_bytes)]
    pub memory: Option<u64>,
    /// CPU limit (e.g. 0.5).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<u64>,
    /// Process limit.
    #[arg(long)]
    pub pids: Option<u64>,
    /// Stop the job after this long (e.g. 30m).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Network: none (default) or egress, if the agent allows it.
    #[arg(long, value_enum, default_value = "none")]
    pub network: NetworkArg,
    /// AWS role ARN the job gets short-lived, auto-refreshed credentials for
    /// (the agent must allow it).
    #[arg(long)]
    pub aws_role: Option<String>,
    /// File with an IAM session policy (JSON) that narrows the role for this job.
    #[arg(long, requires = "aws_role", value_parser = read_policy_file)]
    pub aws_session_policy: Option<String>,
    /// Session length of the job's credentials (e.g. 1h); default: the agent's.
    #[arg(long, requires = "aws_role", value_parser = parse_duration)]
    pub aws_duration: Option<std::time::Duration>,
    /// `s3://bucket/key.tar.gz` unpacked into the workspace before the job starts.
    #[arg(long, requires = "aws_role")]
    pub workspace: Option<String>,
    /// Workspace-relative file uploaded to S3 after the job ends (repeatable).
    #[arg(long = "artifact", requires = "aws_role")]
    pub artifacts: Vec<String>,
    /// Secret for the job, as NAME=VALUE or NAME=@FILE (repeatable). The job
    /// reads it from /run/secrets/NAME (never from its environment); its
    /// value is masked in the logs. Prefer @FILE: a value on the command
    /// line is visible to other local users and in shell history.
    #[arg(long = "secret", value_name = "NAME=VALUE|NAME=@FILE", value_parser = SecretParser)]
    pub secrets: Vec<SecretArg>,
    /// End the job (`timed_out`) if no agent has taken it after this long
    /// in the queue (e.g. 10m); default: it waits until one does.
    #[arg(long, value_parser = parse_duration)]
    pub queue_timeout: Option<Duration>,
    /// Stream the logs until the job ends; exit with the job's exit code.
    /// The job id goes to stderr, so stdout is exactly the job's output.
    #[arg(long, conflicts_with = "wait")]
    pub follow: bool,
    /// Wait for the job to end; exit with the job's exit code.
    #[arg(long)]
    pub wait: bool,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// A `--secret`: `Debug` never shows the value.
#[derive(Clone)]
pub struct SecretArg {
    pub name: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretArg({:?}, <redacted>)", self.name)
    }
}

/// `NAME=VALUE` or `NAME=@FILE` (the file's bytes, as they are). Unlike
/// clap's usual parsers, its errors never repeat the argument, which may be
/// a mistyped secret.
#[derive(Clone)]
struct SecretParser;

impl clap::builder::TypedValueParser for SecretParser {
    type Value = SecretArg;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<SecretArg, clap::Error> {
        parse_secret(value).map_err(|e| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid --secret: {e}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

fn parse_secret(arg: &std::ffi::OsStr) -> Result<SecretArg, String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = arg.as_bytes();
    let Some(eq) = bytes.iter().position(|&b| b == b'=') else {
        return Err("expected NAME=VALUE or NAME=@FILE".into());
    };
    let (name, value) = (&bytes[..eq], &bytes[eq + 1..]);
    let name =
        std::str::from_utf8(name).map_err(|_| "the secret's name is not UTF-8".to_string())?;
    if name.is_empty() {
        return Err("the secret has an empty name".into());
    }
    let value = match value.strip_prefix(b"@") {
        Some(path) => {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
            std::fs::read(path).map_err(|e| {
                format!(
                    "cannot read the value of secret {name:?} from {}: {e}",
                    path.display()
                )
            })?
        }
        None => value.to_vec(),
    };
    Ok(SecretArg {
        name: name.to_string(),
        value,
    })
}

fn read_policy_file(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

impl SubmitArgs {
    pub fn spec(&self) -> pb::JobSpec {
        pb::JobSpec {
            image: self.image.clone(),
            command: self.command.clone(),
            env: self.env.iter().cloned().collect::<HashMap<_, _>>(),
            selector: self.labels.iter().cloned().collect::<HashMap<_, _>>(),
            resources: Some(pb::Resources {
                memory_bytes: self.memory.unwrap_or(0),
                nano_cpus: self.cpus.unwrap_or(0),
                pids: self.pids.unwrap_or(0),
            }),
            timeout_ms: self.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
            network: match self.network {
                NetworkArg::None => pb::NetworkMode::None,
                NetworkArg::Egress => pb::NetworkMode::Egress,
            } as i32,
            aws: self.aws_role.as_ref().map(|role| pb::AwsRole {
                role_arn: role.clone(),
                session_policy: self.aws_session_policy.clone().unwrap_or_default(),
                duration_s: self.aws_duration.map(|d| d.as_secs()).unwrap_or(0),
                web_identity_token: String::new(),
            }),
            workspace_source: self.workspace.clone().unwrap_or_default(),
            artifacts: self.artifacts.clone(),
            secrets: self
                .secrets
                .iter()
                .map(|s| pb::Secret {
                    name: s.name.clone(),
                    value: s.value.clone(),
                })
                .collect(),
            queue_timeout_ms: self
                .queue_timeout
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn submit(args: &[&str]) -> Result<SubmitArgs, String> {
        let mut argv = vec!["outpost", "submit", "--image", "img"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--", "true"]);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Submit(a) => Ok(a),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn resource_flags_and_network_reach_the_spec() {
        let a = submit(&[
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "--pids",
            "32",
            "--timeout",
            "30s",
            "--network",
            "egress",
            "--queue-timeout",
            "5m",
        ])
        .unwrap();
        let spec = a.spec();
        let r = spec.resources.unwrap();
        assert_eq!(r.memory_bytes, 64 << 20);
        assert_eq!(r.nano_cpus, 500_000_000);
        assert_eq!(r.pids, 32);
        assert_eq!(spec.timeout_ms, 30_000);
        assert_eq!(spec.network, pb::NetworkMode::Egress as i32);
        assert_eq!(spec.queue_timeout_ms, 300_000);
        // Unset: zero, i.e. the agent's own limits.
        let r = submit(&[]).unwrap().spec().resources.unwrap();
        assert_eq!((r.memory_bytes, r.nano_cpus, r.pids), (0, 0, 0));
    }

    #[test]
    fn secrets_from_values_and_files_never_show_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key.pem");
        std::fs::write(&file, b"-----BEGIN KEY-----\nfile-canary\n").unwrap();
        let a = submit(&[
            "--secret",
            "db=value-canary=with=equals",
            "--secret",
            &format!("key=@{}", file.display()),
        ])
        .unwrap();
        let spec = a.spec();
        assert_eq!(spec.secrets.len(), 2);
        assert_eq!(spec.secrets[0].name, "db");
        assert_eq!(spec.secrets[0].value, b"value-canary=with=equals");
        assert_eq!(spec.secrets[1].value, b"-----BEGIN KEY-----\nfile-canary\n");
        let debug = format!("{a:?}");
        assert!(!debug.contains("canary"), "{debug}");
        assert!(spec.env.is_empty(), "secrets never become environment");

        let e = submit(&["--secret", "novalue-canary"]).unwrap_err();
        assert!(!e.contains("canary"), "{e}");
        let e = submit(&["--secret", "=x"]).unwrap_err();
        assert!(e.contains("empty name"), "{e}");
        let e = submit(&["--secret", "k=@/nonexistent/file"]).unwrap_err();
        assert!(e.contains("/nonexistent/file"), "{e}");
    }
}
