//! The `outpost` command line: control plane, PKI, admin commands and `dev`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use outpost_agent::units::{parse_bytes, parse_cpus, parse_duration};
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;

use crate::client::{ClientConfig, StateDir};
use crate::identity::Role;

/// Outpost: control plane, admin CLI and local development environment.
#[derive(Parser, Debug)]
#[command(name = "outpost", version)]
pub struct Cli {
    /// State directory (PKI, server address, dev data).
    #[arg(long, global = true, env = "OUTPOST_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control plane URL; default: read from the state directory.
    #[arg(long, global = true, env = "OUTPOST_SERVER")]
    pub server: Option<String>,
    /// Log output: `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, global = true, value_enum, env = "OUTPOST_LOG_FORMAT", default_value_t = outpost_agent::observe::logging::LogFormat::Text)]
    pub log_format: outpost_agent::observe::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane.
    Server {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// Lease time-to-live (renewed by heartbeats).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        lease_ttl: std::time::Duration,
        /// Serve Prometheus `/metrics` and `/healthz` (plain HTTP) on this
        /// address, e.g. 127.0.0.1:9465. Off unless set.
        #[arg(long)]
        metrics_listen: Option<String>,
        #[command(flatten)]
        oidc: OidcArgs,
    },
    /// Manage the local certificate authority.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Submit a job; prints its id.
    Submit(SubmitArgs),
    /// Print a job's log.
    Logs {
        job: String,
        /// Keep streaming until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// List jobs, newest first.
    Jobs {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one job.
    Job {
        job: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Cancel a job (one SIGINT, then SIGKILL after the agent's grace period).
    Cancel { job: String },
    /// List agents.
    Agents {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Ask an agent to drain: it takes no new job and lets running ones finish.
    Drain { agent: String },
    /// List the artifacts a job uploaded (with the lease epoch of each).
    Artifacts {
        job: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The control plane as an OIDC issuer of per-job web-identity tokens.
    Oidc {
        #[command(subcommand)]
        command: OidcCommand,
    },
    /// Run a control plane and one local agent; build the runner image if missing.
    Dev(crate::dev::DevArgs),
}

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create the CA and the server certificate.
    Init {
        /// Extra DNS names or IP addresses for the server certificate.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue a client certificate.
    Issue {
        #[arg(value_enum)]
        role: IssueRole,
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum OidcCommand {
    /// Write `.well-known/openid-configuration` and `jwks.json` into DIR, to
    /// be hosted at the issuer URL (e.g. a public S3 bucket, like an EKS IRSA
    /// issuer) and registered as an IAM OIDC identity provider.
    Publish {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        oidc: OidcArgs,
    },
}

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
pub enum IssueRole {
    Agent,
    Admin,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
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
    /// Stream the logs until the job ends; exit with the job's exit code.
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

fn parse_kv(s: &str) -> Result<(String, String), String> {
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
        }
    }
}

/// Entry point of the `outpost` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(match cli.command {
            Command::Server { .. } => "info",
            _ => "warn",
        })
    });
    // `outpost dev` runs an agent in this process: keep the SDK's identities out of the logs.
    let filter = outpost_agent::aws::quiet_sdk_logs(filter);
    outpost_agent::observe::logging::init(cli.log_format, filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let state = StateDir::new(cli.state_dir.clone().unwrap_or_else(StateDir::default_root));
    match cli.command {
        Command::Server {
            listen,
            lease_ttl,
            metrics_listen,
            oidc,
        } => {
            // A taken metrics address fails before the control plane starts.
            let metrics = match &metrics_listen {
                Some(addr) => Some(crate::metrics::bind(addr).await?),
                None => None,
            };
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("failed to listen on {listen}"))?;
            let local = listener.local_addr()?;
            write_addr(&state, local)?;
            let mut cfg = crate::server::ServerConfig::new(state.pki().dir, state.data_dir());
            cfg.oidc = oidc.config(&state.data_dir());
            cfg.metrics = metrics;
            cfg.timing.ttl = lease_ttl;
            cfg.timing.heartbeat = (lease_ttl / 6).max(std::time::Duration::from_millis(200));
            let shutdown = tokio_util::sync::CancellationToken::new();
            let sd = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                sd.cancel();
            });
            crate::server::run(listener, cfg, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki { command } => {
            let pki = state.pki();
            match command {
                PkiCommand::Init { sans } => {
                    pki.init(&sans)?;
                    println!("created CA and server certificate in {}", pki.dir.display());
                }
                PkiCommand::Issue { role, name } => {
                    let role = match role {
                        IssueRole::Agent => Role::Agent,
                        IssueRole::Admin => Role::Admin,
                    };
                    let p = pki.issue(role, &name)?;
                    println!("{}\n{}", p.cert.display(), p.key.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(args) => crate::dev::run(&state, args).await,
        Command::Oidc {
            command: OidcCommand::Publish { out, oidc },
        } => {
            let issuer = crate::oidc::Issuer::load_or_create(oidc.config(&state.data_dir()))?;
            for path in issuer.publish(&out)? {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        cmd => {
            let client = ClientConfig::from_state(&state, cli.server.clone())?;
            admin_command(&client, cmd).await
        }
    }
}

async fn admin_command(client: &ClientConfig, cmd: Command) -> Result<ExitCode> {
    let mut c = client.connect().await?;
    match cmd {
        Command::Submit(args) => {
            let spec = args.spec();
            let id = c
                .submit_job(admin::SubmitJobRequest { spec: Some(spec) })
                .await
                .map_err(status_err)?
                .into_inner()
                .job_id;
            println!("{id}");
            if args.follow {
                stream_logs(client, &id, true).await?;
            }
            if args.follow || args.wait {
                let job = wait_final(client, &id).await?;
                if job_state(&job) != pb::JobState::Succeeded && !job.message.is_empty() {
                    eprintln!("outpost: job {id} {}: {}", state_name(&job), job.message);
                }
                return Ok(exit_code_of(&job));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { job, follow } => {
            stream_logs(client, &job, follow).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs { output, limit } => {
            let jobs = c
                .list_jobs(admin::ListJobsRequest { limit })
                .await
                .map_err(status_err)?
                .into_inner()
                .jobs;
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&jobs.iter().map(job_json).collect::<Vec<_>>())?
                );
            } else {
                println!(
                    "{:<36}  {:<10}  {:>5}  {:>4}  {:<16}  IMAGE",
                    "JOB", "STATE", "EXIT", "EPOCH", "AGENT"
                );
                for j in &jobs {
                    println!(
                        "{:<36}  {:<10}  {:>5}  {:>5}  {:<16}  {}",
                        j.job_id,
                        state_name(j),
                        j.exit_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into()),
                        j.epoch,
                        if j.agent_id.is_empty() {
                            "-"
                        } else {
                            &j.agent_id
                        },
                        j.image
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Job { job, output } => {
            let j = c
                .get_job(admin::GetJobRequest { job_id: job })
                .await
                .map_err(status_err)?
                .into_inner();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
            } else {
                let v = job_json(&j);
                if let Some(obj) = v.as_object() {
                    for (k, v) in obj {
                        println!(
                            "{k:<14} {}",
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string())
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { job } => {
            let j = c
                .cancel_job(admin::CancelJobRequest { job_id: job })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{} {}", j.job_id, state_name(&j));
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents { output } => {
            let agents = c
                .list_agents(admin::ListAgentsRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .agents;
            if output == Output::Json {
                let v: Vec<_> = agents
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "agent_id": a.agent_id, "connected": a.connected, "version": a.version,
                            "labels": a.labels, "capacity": a.capacity, "running": a.running,
                            "draining": a.draining, "last_seen_ms": a.last_seen_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<20}  {:<9}  {:>8}  {:>7}  {:<8}  LABELS",
                    "AGENT", "CONNECTED", "CAPACITY", "RUNNING", "DRAINING"
                );
                for a in &agents {
                    let mut labels: Vec<_> =
                        a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    println!(
                        "{:<20}  {:<9}  {:>8}  {:>7}  {:<8}  {}",
                        a.agent_id,
                        a.connected,
                        a.capacity,
                        a.running,
                        a.draining,
                        labels.join(",")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Drain { agent } => {
            let a = c
                .drain_agent(admin::DrainAgentRequest { agent_id: agent })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{} draining (running {})", a.agent_id, a.running);
            Ok(ExitCode::SUCCESS)
        }
        Command::Artifacts { job, output } => {
            let artifacts = c
                .list_artifacts(admin::ListArtifactsRequest { job_id: job })
                .await
                .map_err(status_err)?
                .into_inner()
                .artifacts;
            if output == Output::Json {
                let v: Vec<_> = artifacts
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "job_id": a.job_id, "epoch": a.epoch, "path": a.path,
                            "url": format!("s3://{}/{}", a.bucket, a.key), "bucket": a.bucket,
                            "key": a.key, "size": a.size, "sha256": a.sha256, "etag": a.etag,
                            "uploaded_at_ms": a.uploaded_at_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:>5}  {:>12}  {:<64}  {:<24}  URL",
                    "EPOCH", "SIZE", "SHA256", "PATH"
                );
                for a in &artifacts {
                    println!(
                        "{:>5}  {:>12}  {:<64}  {:<24}  s3://{}/{}",
                        a.epoch, a.size, a.sha256, a.path, a.bucket, a.key
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Server { .. } | Command::Pki { .. } | Command::Dev(_) | Command::Oidc { .. } => {
            bail!("not an admin command")
        }
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

fn job_state(j: &admin::Job) -> pb::JobState {
    pb::JobState::try_from(j.state).unwrap_or(pb::JobState::Unspecified)
}

pub fn state_name(j: &admin::Job) -> &'static str {
    match job_state(j) {
        pb::JobState::Unspecified => "unknown",
        pb::JobState::Queued => "queued",
        pb::JobState::Leased => "leased",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::TimedOut => "timed_out",
        pb::JobState::Rejected => "rejected",
        pb::JobState::Lost => "lost",
    }
}

fn is_final(j: &admin::Job) -> bool {
    !matches!(
        job_state(j),
        pb::JobState::Queued
            | pb::JobState::Leased
            | pb::JobState::Running
            | pb::JobState::Unspecified
    )
}

fn job_json(j: &admin::Job) -> serde_json::Value {
    serde_json::json!({
        "job_id": j.job_id,
        "state": state_name(j),
        "exit_code": j.exit_code,
        "message": j.message,
        "epoch": j.epoch,
        "agent_id": j.agent_id,
        "image": j.image,
        "command": j.command,
        "selector": j.selector,
        "created_at_ms": j.created_at_ms,
        "started_at_ms": j.started_at_ms,
        "finished_at_ms": j.finished_at_ms,
        "log_length": j.log_length,
        "oom_killed": j.oom_killed,
    })
}

/// The CLI's exit code for a final job: its own exit code when it ran.
pub fn exit_code_of(j: &admin::Job) -> ExitCode {
    match job_state(j) {
        pb::JobState::Succeeded => ExitCode::SUCCESS,
        pb::JobState::Failed => match j.exit_code {
            Some(c) if (1..=255).contains(&c) => ExitCode::from(c as u8),
            _ => ExitCode::FAILURE,
        },
        pb::JobState::Cancelled => ExitCode::from(130),
        pb::JobState::TimedOut => ExitCode::from(124),
        _ => ExitCode::FAILURE,
    }
}

/// Streams a job's log to stdout; with `follow`, until the job ends.
pub async fn stream_logs(client: &ClientConfig, job: &str, follow: bool) -> Result<()> {
    let mut offset = 0u64;
    let mut epoch = 0u64;
    let mut attempts = 0u32;
    loop {
        let mut c = client.connect().await?;
        let stream = c
            .follow_logs(admin::FollowLogsRequest {
                job_id: job.to_string(),
                offset,
                follow,
                epoch,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => bail!("{}", s.message()),
            Err(s) => {
                attempts += 1;
                if attempts > 30 {
                    bail!("lost the log stream: {}", s.message());
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut out = std::io::stdout().lock();
        loop {
            match stream.message().await {
                Ok(Some(d)) => {
                    if epoch == 0 {
                        epoch = d.epoch;
                    }
                    if d.epoch != epoch {
                        // The job was re-leased: its new attempt starts over.
                        eprintln!(
                            "outpost: job {job} was re-leased (attempt {}); its output restarts",
                            d.epoch
                        );
                        epoch = d.epoch;
                        offset = 0;
                    }
                    if d.offset == offset {
                        out.write_all(&d.data)?;
                        offset += d.data.len() as u64;
                        out.flush()?;
                    }
                    if d.eof || (!follow && d.data.is_empty()) {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    if !follow {
                        return Ok(());
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        drop(out);
        attempts += 1;
        if attempts > 30 {
            bail!("lost the log stream");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Waits until the job is final, reconnecting if needed.
pub async fn wait_final(client: &ClientConfig, job: &str) -> Result<admin::Job> {
    let mut errors = 0u32;
    loop {
        match client.connect().await {
            Ok(mut c) => match c
                .get_job(admin::GetJobRequest {
                    job_id: job.to_string(),
                })
                .await
            {
                Ok(j) => {
                    let j = j.into_inner();
                    if is_final(&j) {
                        return Ok(j);
                    }
                    // Follow the log stream as a change notification: it ends
                    // when the job is final.
                    if let Ok(s) = c
                        .follow_logs(admin::FollowLogsRequest {
                            job_id: job.to_string(),
                            offset: j.log_length,
                            follow: true,
                            epoch: 0,
                        })
                        .await
                    {
                        let mut s = s.into_inner();
                        while let Ok(Some(d)) = s.message().await {
                            if d.eof {
                                break;
                            }
                        }
                    }
                    continue;
                }
                Err(s) if s.code() == tonic::Code::NotFound => bail!("{}", s.message()),
                Err(_) => errors += 1,
            },
            Err(_) => errors += 1,
        }
        if errors > 60 {
            bail!("lost contact with the control plane while waiting for job {job}");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

pub(crate) fn write_addr(state: &StateDir, addr: std::net::SocketAddr) -> Result<()> {
    std::fs::create_dir_all(&state.root)
        .with_context(|| format!("failed to create {}", state.root.display()))?;
    let url = format!("https://{addr}");
    let tmp = state.root.join("server.addr.tmp");
    std::fs::write(&tmp, &url)?;
    std::fs::rename(&tmp, state.addr_file())?;
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ])
        .unwrap();
        let spec = a.spec();
        let r = spec.resources.unwrap();
        assert_eq!(r.memory_bytes, 64 << 20);
        assert_eq!(r.nano_cpus, 500_000_000);
        assert_eq!(r.pids, 32);
        assert_eq!(spec.timeout_ms, 30_000);
        assert_eq!(spec.network, pb::NetworkMode::Egress as i32);
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
