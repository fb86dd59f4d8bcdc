//! `outpost enroll create`, `outpost agents revoke` and `outpost pki show`:
//! agent enrolment, revocation, and the expiry of the local certificates.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use outpost_proto::identity::v1 as pb;
use outpost_proto::identity::v1::identity_admin_client::IdentityAdminClient;

use super::output::outln;
use super::status_err;
use crate::client::{ClientConfig, StateDir};
use crate::enroll::show_time;

#[derive(clap::Subcommand, Debug)]
pub enum EnrollCommand {
    /// Create a one-time bootstrap token for agents of a pool; prints the
    /// token (shown only now: the control plane keeps its hash).
    Create {
        /// The pool its agents join (carried in their certificates).
        #[arg(long)]
        pool: String,
        /// Labels its agents may claim: `k=v,k=v` (repeatable).
        #[arg(long, value_delimiter = ',', value_parser = super::args::parse_kv)]
        labels: Vec<(String, String)>,
        /// How long the token can be used.
        #[arg(long, default_value = "1h", value_parser = outpost_agent::units::parse_duration)]
        ttl: Duration,
        /// How many agents may enrol with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The only agent name it enrols (default: any name not taken by
        /// another pool).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentsCommand {
    /// Revoke an agent: its session ends at once, its certificate is
    /// refused from then on, its jobs are leased again once their leases
    /// expire.
    Revoke { agent: String },
}

async fn client(c: &ClientConfig) -> Result<IdentityAdminClient<tonic::transport::Channel>> {
    Ok(IdentityAdminClient::new(c.channel().await?))
}

pub async fn enroll(c: &ClientConfig, command: EnrollCommand) -> Result<ExitCode> {
    let EnrollCommand::Create {
        pool,
        labels,
        ttl,
        uses,
        name,
    } = command;
    let r = client(c)
        .await?
        .create_enrollment(pb::CreateEnrollmentRequest {
            pool,
            labels: labels.into_iter().collect(),
            ttl_ms: ttl.as_millis() as u64,
            uses,
            agent_name: name.unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    super::output::note!(
        "enrolment {} (usable until {}); the token is shown only now:",
        r.enrollment_id,
        show_time(r.expires_ms as i64)
    );
    outln!("{}", r.token);
    Ok(ExitCode::SUCCESS)
}

pub async fn agents(c: &ClientConfig, command: AgentsCommand) -> Result<ExitCode> {
    let AgentsCommand::Revoke { agent } = command;
    let r = client(c)
        .await?
        .revoke_agent(pb::RevokeAgentRequest { agent_name: agent })
        .await
        .map_err(status_err)?
        .into_inner();
    outln!(
        "{} revoked at {}{}",
        r.agent_name,
        show_time(r.revoked_ms as i64),
        if r.was_connected {
            " (its session was ended)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// What `outpost agents` adds per agent: its enrolment state.
pub async fn identities(c: &ClientConfig) -> Result<Vec<pb::AgentIdentity>> {
    Ok(client(c)
        .await?
        .list_identities(pb::ListIdentitiesRequest {})
        .await
        .map_err(status_err)?
        .into_inner()
        .identities)
}

/// The identity column of `outpost agents`.
pub fn identity_text(id: Option<&pb::AgentIdentity>) -> String {
    match id {
        Some(i) if i.revoked_ms > 0 => format!("revoked {}", show_time(i.revoked_ms as i64)),
        Some(i) if !i.enrollment_id.is_empty() => format!(
            "pool {} cert until {}",
            i.pool,
            show_time(i.cert_not_after_ms as i64)
        ),
        _ => "issued by hand".into(),
    }
}

/// `outpost pki show`: every certificate in the PKI directory and its expiry.
pub fn pki_show(state: &StateDir) -> Result<ExitCode> {
    let dir = state.pki().dir;
    let mut rows = crate::enroll::expiry::certificates(&dir)?;
    rows.sort_by(|a, b| a.file.cmp(&b.file));
    outln!("{:<28}  {:<25}  STATE", "CERTIFICATE", "EXPIRES");
    for r in rows {
        outln!(
            "{:<28}  {:<25}  {}",
            r.file,
            show_time(r.not_after_ms),
            crate::enroll::expiry::state(r.not_after_ms)
        );
    }
    Ok(ExitCode::SUCCESS)
}
