//! `outpost agents` and `outpost drain`.

use std::process::ExitCode;

use anyhow::Result;
use outpost_proto::admin::v1 as admin;

use super::output::outln;
use super::{Output, status_err};
use crate::client::ClientConfig;

pub async fn list(client: &ClientConfig, output: Output) -> Result<ExitCode> {
    let agents = client
        .connect()
        .await?
        .list_agents(admin::ListAgentsRequest {})
        .await
        .map_err(status_err)?
        .into_inner()
        .agents;
    let identities = super::identity::identities(client).await?;
    let identity = |name: &str| identities.iter().find(|i| i.agent_name == name);
    if output == Output::Json {
        let v: Vec<_> = agents
            .iter()
            .map(|a| {
                serde_json::json!({
                    "agent_id": a.agent_id, "connected": a.connected, "version": a.version,
                    "labels": a.labels, "capacity": a.capacity, "running": a.running,
                    "draining": a.draining, "last_seen_ms": a.last_seen_ms,
                    "revoked": identity(&a.agent_id).is_some_and(|i| i.revoked_ms > 0),
                    "identity": super::identity::identity_text(identity(&a.agent_id)),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<20}  {:<9}  {:>8}  {:>7}  {:<8}  {:<44}  LABELS",
        "AGENT",
        "CONNECTED",
        "CAPACITY",
        "RUNNING",
        "DRAINING",
        "IDENTITY"
    );
    for a in &agents {
        let mut labels: Vec<_> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        outln!(
            "{:<20}  {:<9}  {:>8}  {:>7}  {:<8}  {:<44}  {}",
            a.agent_id,
            a.connected,
            a.capacity,
            a.running,
            a.draining,
            super::identity::identity_text(identity(&a.agent_id)),
            labels.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn drain(client: &ClientConfig, agent: &str) -> Result<ExitCode> {
    let a = client
        .connect()
        .await?
        .drain_agent(admin::DrainAgentRequest {
            agent_id: agent.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    outln!("{} draining (running {})", a.agent_id, a.running);
    Ok(ExitCode::SUCCESS)
}
