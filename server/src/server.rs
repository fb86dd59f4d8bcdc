//! `outpost server`: the control plane process. mTLS only; both services share
//! one port and authorise by the role in the client certificate.

use std::path::{Path, PathBuf};

use outpost_proto::admin::v1::admin_service_server::AdminServiceServer;
use outpost_proto::agent::v1::agent_service_server::AgentServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tracing::info;

use crate::admin_api::AdminApi;
use crate::agent_api::AgentApi;
use crate::hub::{Hub, LeaseTiming};
use crate::pki::PkiDir;
use crate::store::{Store, StoreError};

/// Errors that stop the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("failed to read {what} from {path}")]
    ReadTls {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to configure TLS")]
    Tls(#[source] tonic::transport::Error),
    #[error("failed to open the store")]
    Store(#[from] StoreError),
    #[error("failed to create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("the oidc token issuer is not usable")]
    Oidc(#[from] crate::oidc::OidcError),
}

/// Everything the control plane needs to start.
#[derive(Debug)]
pub struct ServerConfig {
    /// Directory with `ca.pem`, `server.pem` and `server.key`.
    pub pki_dir: PathBuf,
    /// Directory holding the embedded store.
    pub data_dir: PathBuf,
    pub timing: LeaseTiming,
    /// Issuer of the per-job web-identity tokens (key in `data_dir`).
    pub oidc: crate::oidc::OidcConfig,
    /// Where to serve `/metrics` and `/healthz` (bound by the caller), if anywhere.
    pub metrics: Option<TcpListener>,
}

impl ServerConfig {
    pub fn new(pki_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            pki_dir: pki_dir.into(),
            oidc: crate::oidc::OidcConfig::new(&data_dir),
            data_dir,
            timing: LeaseTiming::default(),
            metrics: None,
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::ReadTls {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Serves the control plane on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let pki = PkiDir::new(&config.pki_dir);
    let server = pki.server();
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            read("the server certificate", &server.cert)?,
            read("the server key", &server.key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(
            "the CA certificate",
            &pki.ca_cert(),
        )?))
        .client_auth_optional(false);
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Store::open(&config.data_dir.join("outpost.db"))?;
    let hub = Hub::new(store, config.timing);
    let issuer = crate::oidc::Issuer::load_or_create(config.oidc.clone())?;
    info!(issuer = %config.oidc.issuer, kid = %issuer.kid(), "oidc token issuer ready");
    hub.set_issuer(std::sync::Arc::new(issuer));
    let tasks = shutdown.child_token();
    hub.spawn_tasks(tasks.clone());
    if let Some(listener) = config.metrics {
        info!(addr = ?listener.local_addr().ok(), "serving /metrics and /healthz");
        tokio::spawn(crate::metrics::serve(listener, hub.clone(), tasks.clone()));
    }
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, "control plane listening");
    let result = Server::builder()
        .tls_config(tls)
        .map_err(ServerError::Tls)?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(AgentServiceServer::new(AgentApi {
            hub: hub.clone(),
            shutdown: tasks.clone(),
        }))
        .add_service(AdminServiceServer::new(AdminApi {
            hub: hub.clone(),
            shutdown: tasks.clone(),
        }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.cancelled().await;
            tasks.cancel();
        })
        .await
        .map_err(ServerError::Serve);
    info!("control plane stopped");
    result
}
