//! The admin client used by the CLI: finds the control plane and the admin
//! certificate through the state directory (or explicit flags).

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_proto::admin::v1::admin_service_client::AdminServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::Role;
use crate::pki::PkiDir;

/// Errors reaching the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no control plane address: {path} is missing (is `outpost dev` or `outpost server` running with this --state-dir?), or pass --server"
    )]
    NoAddress { path: PathBuf },
    #[error("failed to read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid control plane address {url}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("failed to connect to the control plane at {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Layout of an Outpost state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn pki(&self) -> PkiDir {
        PkiDir::new(self.root.join("pki"))
    }
    pub fn addr_file(&self) -> PathBuf {
        self.root.join("server.addr")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn agent_dir(&self) -> PathBuf {
        self.root.join("agent")
    }
    /// The default state directory: `$XDG_STATE_HOME/outpost` or `~/.local/state/outpost`.
    pub fn default_root() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
            return PathBuf::from(x).join("outpost");
        }
        if let Some(h) = std::env::var_os("HOME") {
            return PathBuf::from(h).join(".local/state/outpost");
        }
        PathBuf::from(".outpost")
    }
}

/// How to reach the control plane as an admin.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub server: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_name: String,
}

impl ClientConfig {
    /// Reads the address from `server.addr` (unless `server` is given) and
    /// uses the state directory's `admin-admin` certificate.
    pub fn from_state(state: &StateDir, server: Option<String>) -> Result<Self, ClientError> {
        let server = match server {
            Some(s) => s,
            None => std::fs::read_to_string(state.addr_file())
                .map_err(|_| ClientError::NoAddress {
                    path: state.addr_file(),
                })?
                .trim()
                .to_string(),
        };
        let pki = state.pki();
        let admin = pki.issued(Role::Admin, "admin");
        Ok(ClientConfig {
            server,
            ca: pki.ca_cert(),
            cert: admin.cert,
            key: admin.key,
            server_name: "localhost".into(),
        })
    }

    pub async fn connect(&self) -> Result<AdminServiceClient<Channel>, ClientError> {
        Ok(AdminServiceClient::new(self.channel().await?).max_decoding_message_size(64 << 20))
    }

    /// An mTLS channel to the control plane with the admin certificate (for
    /// any admin service).
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let read = |what, p: &Path| {
            std::fs::read(p).map_err(|source| ClientError::Read {
                what,
                path: p.to_path_buf(),
                source,
            })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", &self.ca)?))
            .identity(Identity::from_pem(
                read("admin certificate", &self.cert)?,
                read("admin key", &self.key)?,
            ))
            .domain_name(self.server_name.clone());
        let ep = Endpoint::from_shared(self.server.clone())
            .and_then(|e| e.tls_config(tls))
            .map_err(|source| ClientError::Endpoint {
                url: self.server.clone(),
                source,
            })?
            .connect_timeout(Duration::from_secs(5));
        let ch = ep.connect().await.map_err(|source| ClientError::Connect {
            url: self.server.clone(),
            source,
        })?;
        Ok(ch)
    }
}
