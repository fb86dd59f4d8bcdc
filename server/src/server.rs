//! `outpost server`: the control plane process. mTLS only; every service
//! shares one port and authorises by the role in the client certificate.
//! The TLS layer verifies a client certificate when one is presented; a
//! client without one can call only agent enrolment
//! (`crate::enroll::api::EnrollmentApi`): every other service is wrapped in
//! `crate::enroll::gate::Gate`, which requires a certificate and refuses a
//! revoked agent's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_proto::admin::v1::admin_service_server::AdminServiceServer;
use outpost_proto::agent::v1::agent_service_server::AgentServiceServer;
use outpost_proto::iac::v1::iac_admin_server::IacAdminServer;
use outpost_proto::iac::v1::iac_agent_server::IacAgentServer;
use outpost_proto::identity::v1::enrollment_server::EnrollmentServer;
use outpost_proto::identity::v1::identity_admin_server::IdentityAdminServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
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
    #[error("the data directory is not usable")]
    DataDir(#[source] outpost_agent::statedir::StateDirError),
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("the iac layer failed to start")]
    Iac(#[from] crate::iac::IacError),
    #[error("the replicas' channel cannot start: {0}")]
    Replicas(String),
    #[error("the oidc token issuer is not usable")]
    Oidc(#[from] crate::oidc::OidcError),
    #[error("this replica's keys cannot be used")]
    Keys(#[from] crate::replicas::keys::KeysError),
    #[error("the secrets key is not usable")]
    Secrets(#[from] crate::iac::secrets::SecretsError),
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
    /// How long final jobs and their logs are kept.
    pub retention: crate::retention::Retention,
    /// Where to serve `/metrics` and `/healthz` (bound by the caller), if anywhere.
    pub metrics: Option<TcpListener>,
    /// Lifetime of enrolled agents' certificates.
    pub identity: crate::enroll::IdentityConfig,
    /// Where jobs, leases and logs are kept.
    pub store: StoreLocation,
    /// Where IaC blobs are kept (`--blob-store`); `None`: where the store
    /// puts them (the data directory, or PostgreSQL).
    pub blobs: Option<crate::iac::blobs::Blobs>,
}

/// Where the control plane keeps its jobs, leases and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// `outpost.db` in the data directory (SQLite): one replica.
    #[default]
    Embedded,
    /// A PostgreSQL database (`postgres://...`) shared by any number of
    /// replicas.
    Postgres(String),
}

impl StoreLocation {
    /// Parses `--store`: `embedded` (or empty), or a `postgres://` or
    /// `postgresql://` URL.
    pub fn parse(text: &str) -> Result<StoreLocation, String> {
        let t = text.trim();
        if t.is_empty() || t == "embedded" {
            return Ok(StoreLocation::Embedded);
        }
        if t.starts_with("postgres://") || t.starts_with("postgresql://") {
            return Ok(StoreLocation::Postgres(t.to_string()));
        }
        Err(format!(
            "--store must be `embedded` or a postgres:// URL, not {:?}",
            crate::store::redact_url(t)
        ))
    }
}

impl ServerConfig {
    pub fn new(pki_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            pki_dir: pki_dir.into(),
            oidc: crate::oidc::OidcConfig::new(&data_dir),
            data_dir,
            timing: LeaseTiming::default(),
            retention: crate::retention::Retention::default(),
            metrics: None,
            identity: crate::enroll::IdentityConfig::default(),
            store: StoreLocation::Embedded,
            blobs: None,
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

/// A control plane with its store open and its TLS identity read, not yet
/// serving: opening first lets `outpost server` and `outpost dev` fail
/// (non-zero, with the store's error) before anything else starts.
pub struct Prepared {
    tls: ServerTlsConfig,
    hub: Arc<Hub>,
    retention: crate::retention::Retention,
    data_dir: PathBuf,
    metrics: Option<TcpListener>,
    pki: PkiDir,
    identity: crate::enroll::IdentityConfig,
    /// The database of the replicas, when the store is shared.
    replicas: Option<String>,
    blobs: Option<crate::iac::blobs::Blobs>,
    /// Seals stack and webhook secrets (`data/iac/secrets.key`).
    sealer: Arc<crate::iac::secrets::Sealer>,
}

/// Reads the TLS identity, opens the store (a private `0700` data
/// directory, `0600` files; or a PostgreSQL database) and the token issuer.
pub async fn prepare(config: ServerConfig) -> Result<Prepared, ServerError> {
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
        // Optional only for enrolment: `Gate` requires a certificate on
        // every other service.
        .client_auth_optional(true);
    outpost_agent::statedir::private_dir(&config.data_dir).map_err(ServerError::DataDir)?;
    let (store, replicas) = match &config.store {
        StoreLocation::Embedded => (Store::open(&config.data_dir.join("outpost.db"))?, None),
        StoreLocation::Postgres(url) => (Store::postgres(url).await?, Some(url.clone())),
    };
    let hub = Hub::new(store, config.timing);
    let issuer = crate::oidc::Issuer::load_or_create(config.oidc.clone())?;
    info!(issuer = %config.oidc.issuer, kid = %issuer.kid(), "oidc token issuer ready");
    // Read once here: the engine seals with it, and replicas compare it.
    let secrets_file = crate::iac::runs::secrets_key_file(&config.data_dir);
    let sealer = crate::iac::secrets::Sealer::load_or_create(&secrets_file)?;
    if replicas.is_some() {
        // Every replica must sign and seal with the same keys as the first.
        crate::replicas::keys::check_keys(
            &hub.store,
            &[
                crate::replicas::keys::ReplicaKey::oidc(&issuer),
                crate::replicas::keys::ReplicaKey::secrets(&sealer, secrets_file),
            ],
        )
        .await?;
    }
    hub.set_issuer(Arc::new(issuer));
    Ok(Prepared {
        tls,
        hub,
        retention: config.retention,
        data_dir: config.data_dir.clone(),
        metrics: config.metrics,
        pki,
        identity: config.identity,
        replicas,
        blobs: config.blobs,
        sealer: Arc::new(sealer),
    })
}

/// Serves the control plane on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    prepare(config).await?.serve(listener, shutdown).await
}

impl Prepared {
    /// The store (for a caller that reports on it after serving).
    pub fn store(&self) -> Store {
        self.hub.store.clone()
    }

    /// Serves on `listener` until `shutdown` is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let Prepared {
            tls,
            hub,
            retention,
            data_dir,
            metrics,
            pki,
            identity,
            replicas,
            blobs,
            sealer,
        } = self;
        let registry = crate::enroll::Registry::load(hub.store.clone(), &pki, identity).await?;
        let gate = crate::enroll::gate::Gate {
            registry: registry.clone(),
        };
        // Agents could not renew while the control plane was down: every
        // held lease gets one full TTL from now to be claimed again.
        match hub.store.extend_active_leases(hub.timing.ttl).await {
            Ok(0) => {}
            Ok(n) => info!(leases = n, "held leases get one lease TTL to be renewed"),
            Err(e) => return Err(ServerError::Store(e)),
        }
        let tasks = shutdown.child_token();
        let leader = match &replicas {
            None => crate::replicas::Leadership::always(),
            Some(url) => {
                let id = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
                let (bus, incoming) = crate::replicas::Bus::start(url, id.clone(), tasks.clone())
                    .map_err(|e| ServerError::Replicas(e.to_string()))?;
                registry.join_replicas(bus.clone(), tasks.clone());
                hub.join_replicas(bus, incoming, tasks.clone());
                info!(replica = %id, "replica of a shared PostgreSQL store");
                crate::replicas::Leadership::elect(url, tasks.clone())
                    .map_err(|e| ServerError::Replicas(e.to_string()))?
            }
        };
        let iac = crate::iac::runs::Engine::start(hub.clone(), &data_dir, blobs, sealer).await?;
        hub.spawn_tasks(tasks.clone());
        iac.spawn(leader, tasks.clone());
        crate::retention::spawn(hub.clone(), retention, tasks.clone());
        if let Some(listener) = metrics {
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
            .add_service(InterceptedService::new(
                AgentServiceServer::new(AgentApi {
                    hub: hub.clone(),
                    shutdown: tasks.clone(),
                    identities: registry.clone(),
                })
                .max_decoding_message_size(outpost_proto::MAX_MESSAGE_BYTES),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                AdminServiceServer::new(AdminApi {
                    hub: hub.clone(),
                    shutdown: tasks.clone(),
                    retention,
                })
                .max_decoding_message_size(outpost_proto::MAX_MESSAGE_BYTES),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                IacAdminServer::new(crate::iac::api::IacAdminApi {
                    engine: iac.clone(),
                })
                .max_decoding_message_size(16 << 20),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                IacAgentServer::new(crate::iac::api::IacAgentApi { engine: iac })
                    .max_encoding_message_size(
                        crate::iac::source::MAX_SOURCE_BYTES
                            .max(crate::iac::apply::MAX_SEALED_BYTES)
                            + (1 << 20),
                    )
                    .max_decoding_message_size(crate::iac::apply::MAX_SEALED_BYTES + (1 << 20)),
                gate.clone(),
            ))
            .add_service(InterceptedService::new(
                IdentityAdminServer::new(crate::enroll::api::IdentityAdminApi {
                    registry: registry.clone(),
                    hub: hub.clone(),
                }),
                gate.clone(),
            ))
            .add_service(EnrollmentServer::new(crate::enroll::api::EnrollmentApi {
                registry,
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
}

/// This machine's name, for naming a replica in logs.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into())
}

#[cfg(test)]
mod tests {
    use super::StoreLocation;

    #[test]
    fn store_locations_parse_and_a_bad_one_is_named_without_its_password() {
        assert_eq!(StoreLocation::parse(""), Ok(StoreLocation::Embedded));
        assert_eq!(
            StoreLocation::parse("embedded"),
            Ok(StoreLocation::Embedded)
        );
        assert_eq!(
            StoreLocation::parse("postgresql://o@db/outpost"),
            Ok(StoreLocation::Postgres("postgresql://o@db/outpost".into()))
        );
        let e = StoreLocation::parse("mysql://bob:pw@db/x").unwrap_err();
        assert!(e.contains("postgres://") && !e.contains("pw"), "{e}");
    }
}
