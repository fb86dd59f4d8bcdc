//! The `outpost` command line: control plane, PKI, admin commands and `dev`.
//!
//! One module per command family: `control` (server, pki, oidc), `jobs`
//! (submit, logs, jobs, job, cancel, artifacts), `agents` (agents, drain);
//! `follow` keeps following a job across control-plane restarts; `output`
//! is how everything is printed (a closed stdout ends a command quietly).

mod agents;
mod args;
mod control;
mod follow;
mod identity;
mod jobs;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use outpost_agent::units::parse_duration;

pub use args::{NetworkArg, OidcArgs, SecretArg, SubmitArgs};
pub use control::{wait_for_signal, write_addr};
pub use follow::{stream_logs, wait_final};
pub use jobs::{JobsArgs, StateArg, exit_code_of};
pub use output::state_name;

use crate::client::{ClientConfig, StateDir};

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
    /// Admin certificate to use: `pki/admin-NAME.pem` in the state
    /// directory (`outpost pki issue admin NAME`).
    #[arg(long, global = true, env = "OUTPOST_ADMIN", default_value = "admin")]
    pub admin: String,
    /// Name the control plane's certificate must carry; default: the
    /// server's host if the state directory's server certificate names it,
    /// else that certificate's first DNS name.
    #[arg(long, global = true, env = "OUTPOST_SERVER_NAME")]
    pub server_name: Option<String>,
    /// How long following commands keep retrying a control plane that went
    /// away (e.g. 10m).
    #[arg(long, global = true, env = "OUTPOST_RECONNECT_FOR", value_parser = parse_duration,
          default_value = "5m")]
    pub reconnect_for: Duration,
    /// Log output: `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, global = true, value_enum, env = "OUTPOST_LOG_FORMAT",
          default_value_t = outpost_agent::observe::logging::LogFormat::Text)]
    pub log_format: outpost_agent::observe::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane.
    Server(control::ServerArgs),
    /// Show the control plane's store size and retention.
    Status,
    /// Manage the local certificate authority.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Submit a job; prints its id (on stderr with --follow).
    Submit(SubmitArgs),
    /// Print a job's log.
    Logs {
        job: String,
        /// Keep streaming until the job ends (through control-plane restarts).
        #[arg(long, short)]
        follow: bool,
    },
    /// List jobs, newest first; the total and the next page go to stderr.
    Jobs(jobs::JobsArgs),
    /// Show one job.
    Job {
        job: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Cancel a job (one SIGINT, then SIGKILL after the agent's grace
    /// period); prints its state after the request.
    Cancel {
        job: String,
        /// Wait until the job has ended and print its final state.
        #[arg(long)]
        wait: bool,
    },
    /// List agents (with their enrolment, or that they were revoked).
    Agents {
        #[command(subcommand)]
        command: Option<identity::AgentsCommand>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Agent enrolment with one-time bootstrap tokens.
    Enroll {
        #[command(subcommand)]
        command: identity::EnrollCommand,
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
    #[command(flatten)]
    Iac(crate::iac::cli::IacCommand),
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
        /// Replace an existing certificate and key of that name (renewing
        /// an admin certificate by hand).
        #[arg(long)]
        replace: bool,
    },
    /// List the certificates of the PKI directory and their expiry.
    Show,
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

/// Entry point of the `outpost` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(match cli.command {
            Command::Server(_) => "info",
            _ => "warn",
        })
    });
    // `outpost dev` runs an agent in this process: keep the SDK's identities out of the logs.
    let filter = outpost_agent::aws::quiet_sdk_logs(filter);
    outpost_agent::observe::logging::init(cli.log_format, filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The store is one connection: more threads waiting for it than
        // this only cost memory (each blocked call held a thread of its
        // own, hundreds in a reconnect storm).
        .max_blocking_threads(32)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            output::note!("failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        // The reader of our stdout went away (`| head`): nothing to say.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            output::note!("{}", output::error_chain(&e));
            ExitCode::FAILURE
        }
    };
    // Background watchers may still wait on the network: do not wait for them.
    runtime.shutdown_background();
    code
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let state = StateDir::new(cli.state_dir.clone().unwrap_or_else(StateDir::default_root));
    match cli.command {
        Command::Server(args) => control::server(&state, &args).await,
        Command::Pki {
            command: PkiCommand::Show,
        } => identity::pki_show(&state),
        Command::Pki { command } => control::pki(&state, command),
        Command::Oidc {
            command: OidcCommand::Publish { out, oidc },
        } => control::oidc_publish(&state, &out, &oidc),
        Command::Dev(args) => crate::dev::run(&state, args).await,
        command => {
            let mut client = ClientConfig::from_state(&state, cli.server.clone())?
                .with_admin(&state, &cli.admin)?;
            client.server_name = cli.server_name.clone();
            client.reconnect_for = cli.reconnect_for;
            admin_command(&client, command).await
        }
    }
}

async fn admin_command(client: &ClientConfig, command: Command) -> Result<ExitCode> {
    match command {
        Command::Submit(args) => jobs::submit(client, args).await,
        Command::Logs { job, follow } => {
            stream_logs(client, &job, follow).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs(mut args) => match args.command.take() {
            Some(cmd) => crate::retention::jobs_command(&mut client.connect().await?, cmd).await,
            None => jobs::list(client, args).await,
        },
        Command::Status => crate::retention::status_command(&mut client.connect().await?).await,
        Command::Job { job, output } => jobs::show(client, &job, output).await,
        Command::Cancel { job, wait } => jobs::cancel(client, &job, wait).await,
        Command::Artifacts { job, output } => jobs::artifacts(client, &job, output).await,
        Command::Agents {
            command: Some(command),
            ..
        } => identity::agents(client, command).await,
        Command::Agents { output, .. } => agents::list(client, output).await,
        Command::Enroll { command } => identity::enroll(client, command).await,
        Command::Drain { agent } => agents::drain(client, &agent).await,
        Command::Iac(command) => crate::iac::cli::run(command, client).await,
        Command::Server { .. } | Command::Pki { .. } | Command::Dev(_) | Command::Oidc { .. } => {
            anyhow::bail!("not an admin command")
        }
    }
}

/// A refusal of the control plane as an error: its message only (the code
/// names are for programs).
fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::DEFAULT_RECONNECT_FOR;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut argv = vec!["outpost"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn global_flags_choose_the_admin_and_the_server_name() {
        let cli = parse(&["jobs"]).unwrap();
        assert_eq!(cli.admin, "admin");
        assert_eq!(cli.server_name, None);
        assert_eq!(cli.reconnect_for, DEFAULT_RECONNECT_FOR);
        let cli = parse(&[
            "jobs",
            "--admin",
            "alice",
            "--server-name",
            "outpost.internal",
            "--reconnect-for",
            "30s",
        ])
        .unwrap();
        assert_eq!(cli.admin, "alice");
        assert_eq!(cli.server_name.as_deref(), Some("outpost.internal"));
        assert_eq!(cli.reconnect_for, Duration::from_secs(30));
    }
}
