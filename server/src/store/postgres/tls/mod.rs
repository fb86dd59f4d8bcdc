//! TLS to PostgreSQL, with rustls (ring), for the store's pool and the
//! replicas' channel alike.
//!
//! The database URL's `sslmode` decides:
//! - `disable`: plain TCP;
//! - `prefer` (the default): TLS when the server offers it, plain when it
//!   does not;
//! - `require` (also written `verify-ca` or `verify-full`): TLS, or no
//!   connection.
//!
//! Whenever TLS is used the server's certificate is verified: its chain
//! against the CA certificates of the PEM file `sslrootcert=` of the URL
//! (else of the file `OUTPOST_STORE_CA` names, else the system's roots),
//! and its names against the host connected to. There is no TLS without
//! verification: a server whose certificate does not verify is refused,
//! whatever the mode, with an error naming the roots it was checked
//! against.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio_postgres::config::SslMode;

/// Splitting the URL's TLS parameters off.
mod params;
/// `MakeTlsConnect` with rustls.
mod stream;

#[cfg(test)]
mod tests;

pub(crate) use stream::MakeRustls;

/// The environment variable naming the CA file when the URL has no
/// `sslrootcert=`.
pub const CA_ENV: &str = "OUTPOST_STORE_CA";

/// Errors of the TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("the database URL is not valid")]
    Url(#[source] tokio_postgres::Error),
    #[error("the database URL is not valid: {0}")]
    Param(String),
    #[error("cannot read the CA file {path} (sslrootcert)")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {path} (sslrootcert) holds no usable PEM certificate")]
    NoCa { path: PathBuf },
    #[error("cannot set up TLS for PostgreSQL")]
    Rustls(#[source] rustls::Error),
}

/// How to reach the database: its settings without the TLS parameters
/// tokio-postgres does not know, and the TLS connector.
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: MakeRustls,
}

/// The target of `url`, with the CA file of `sslrootcert=`, else of
/// `OUTPOST_STORE_CA`.
pub(crate) fn target(url: &str) -> Result<Target, TlsSetupError> {
    target_with(url, std::env::var_os(CA_ENV).map(PathBuf::from))
}

/// The target of `url`, with `default_ca` when the URL names no CA file.
pub(crate) fn target_with(url: &str, default_ca: Option<PathBuf>) -> Result<Target, TlsSetupError> {
    let p = match params::split(url) {
        Ok(p) => p,
        // Malformed for tokio-postgres too: its error says more.
        Err(e) => {
            url.parse::<tokio_postgres::Config>()
                .map_err(TlsSetupError::Url)?;
            return Err(e);
        }
    };
    let mut config: tokio_postgres::Config = p.rest.parse().map_err(TlsSetupError::Url)?;
    if p.verify {
        config.ssl_mode(SslMode::Require);
    }
    let ca = p
        .root_cert
        .or(default_ca.filter(|c| !c.as_os_str().is_empty()));
    let tls = match config.get_ssl_mode() {
        SslMode::Disable => MakeRustls::disabled(),
        _ => {
            let (roots, described) = match &ca {
                Some(path) => (ca_roots(path)?, format!("the CA file {}", path.display())),
                None => (system_roots(), "the system's certificate roots".to_string()),
            };
            MakeRustls::new(client_config(roots)?, described)
        }
    };
    Ok(Target { config, tls })
}

/// The certificates of the PEM file `path`.
fn ca_roots(path: &Path) -> Result<rustls::RootCertStore, TlsSetupError> {
    let pem = std::fs::read(path).map_err(|source| TlsSetupError::ReadCa {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError::NoCa {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// The system's roots (none is an error only when a server presents a
/// certificate: it is then refused).
fn system_roots() -> rustls::RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "a system certificate root was not loaded");
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    roots
}

fn client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // PostgreSQL 17 and later check it; earlier servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}
