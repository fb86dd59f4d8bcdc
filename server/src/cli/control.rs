//! `outpost server`, `outpost pki` and `outpost oidc`: the commands that run
//! or set up the control plane itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::info;

use super::output::outln;
use super::{IssueRole, OidcArgs, PkiCommand};
use crate::client::StateDir;
use crate::identity::Role;

/// `outpost server`'s options.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// Lease time-to-live (renewed by heartbeats).
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    pub lease_ttl: Duration,
    /// Lifetime of an enrolled agent's certificate (renewed at half of it).
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    pub agent_cert_ttl: Duration,
    /// Serve Prometheus `/metrics` and `/healthz` (plain HTTP) on this
    /// address, e.g. 127.0.0.1:9465. Off unless set.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Where the control plane keeps everything: `embedded` (SQLite in
    /// the data directory) or `postgres://user@host/db` (shared by
    /// several replicas).
    /// Also read from OUTPOST_STORE.
    #[arg(long, env = "OUTPOST_STORE", default_value = "embedded", value_parser = crate::server::StoreLocation::parse, hide_env_values = true)]
    pub store: crate::server::StoreLocation,
    /// Where IaC blobs (sources, plans, state versions) are kept:
    /// `s3://BUCKET/PREFIX`, reached with the standard AWS environment
    /// (AWS_REGION, AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...). Default:
    /// with the store (the data directory, or PostgreSQL).
    /// Also read from OUTPOST_BLOB_STORE.
    #[arg(long, env = "OUTPOST_BLOB_STORE", value_parser = crate::iac::blobs::S3Location::parse)]
    pub blob_store: Option<crate::iac::blobs::S3Location>,
    #[command(flatten)]
    pub oidc: OidcArgs,
    #[command(flatten)]
    pub retention: crate::retention::RetentionArgs,
}

pub async fn server(state: &StateDir, args: &ServerArgs) -> Result<ExitCode> {
    let ServerArgs {
        listen,
        lease_ttl,
        agent_cert_ttl,
        metrics_listen,
        store,
        blob_store,
        oidc,
        retention,
    } = args;
    let (lease_ttl, agent_cert_ttl) = (*lease_ttl, *agent_cert_ttl);
    // Private (0700) and ours alone; the store opens before the port does,
    // so a broken store ends here with its error.
    let _lock = outpost_agent::statedir::lock(&state.root)?;
    // A taken metrics address fails before the control plane starts.
    let metrics = match metrics_listen.as_deref() {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let mut cfg = crate::server::ServerConfig::new(state.pki().dir, state.data_dir());
    cfg.oidc = oidc.config(&state.data_dir());
    cfg.store = store.clone();
    if let Some(location) = blob_store {
        let conn = crate::iac::blobs::S3Connection::from_env().map_err(anyhow::Error::msg)?;
        info!(blob_store = %location, region = %conn.region, "iac blobs in s3");
        cfg.blobs = Some(crate::iac::blobs::Blobs::s3(location.clone(), conn));
    }
    cfg.metrics = metrics;
    cfg.timing.ttl = lease_ttl;
    cfg.timing.heartbeat = (lease_ttl / 6).max(Duration::from_millis(200));
    cfg.retention = retention.retention();
    if agent_cert_ttl < Duration::from_secs(2) {
        anyhow::bail!("--agent-cert-ttl must be at least 2s");
    }
    cfg.identity.agent_cert_ttl = agent_cert_ttl;
    let prepared = crate::server::prepare(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    let local = listener.local_addr()?;
    write_addr(state, local)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    prepared.serve(listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

pub fn pki(state: &StateDir, command: PkiCommand) -> Result<ExitCode> {
    let pki = state.pki();
    match command {
        PkiCommand::Init { sans } => {
            pki.init(&sans)?;
            outln!("created CA and server certificate in {}", pki.dir.display());
        }
        PkiCommand::Issue {
            role,
            name,
            replace,
        } => {
            let role = match role {
                IssueRole::Agent => Role::Agent,
                IssueRole::Admin => Role::Admin,
            };
            let p = if replace {
                pki.reissue(role, &name)?
            } else {
                pki.issue(role, &name)?
            };
            outln!("{}\n{}", p.cert.display(), p.key.display());
        }
        PkiCommand::Show => {}
    }
    Ok(ExitCode::SUCCESS)
}

pub fn oidc_publish(state: &StateDir, out: &Path, oidc: &OidcArgs) -> Result<ExitCode> {
    let issuer = crate::oidc::Issuer::load_or_create(oidc.config(&state.data_dir()))?;
    for path in issuer.publish(out)? {
        outln!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The address clients on this host dial for a listener bound to `addr`:
/// the wildcard address is not one, loopback is.
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Writes `server.addr` (atomically): the URL clients of this state
/// directory dial.
pub fn write_addr(state: &StateDir, addr: SocketAddr) -> Result<()> {
    std::fs::create_dir_all(&state.root)
        .with_context(|| format!("failed to create {}", state.root.display()))?;
    let url = format!("https://{}", connectable(addr));
    let tmp = state.root.join("server.addr.tmp");
    std::fs::write(&tmp, &url).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, state.addr_file())
        .with_context(|| format!("failed to write {}", state.addr_file().display()))?;
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

    #[test]
    fn server_addr_never_holds_the_wildcard_address() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("s"));
        for (bound, url) in [
            ("0.0.0.0:7443", "https://127.0.0.1:7443"),
            ("[::]:7443", "https://[::1]:7443"),
            ("10.1.2.3:7443", "https://10.1.2.3:7443"),
        ] {
            write_addr(&state, bound.parse().unwrap()).unwrap();
            assert_eq!(std::fs::read_to_string(state.addr_file()).unwrap(), url);
        }
    }
}
