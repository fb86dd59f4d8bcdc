//! tokio-postgres's TLS hooks over tokio-rustls: the connector made for
//! each connection, the handshake (server name checked at connection time,
//! so a host with no name fails only if TLS is used) and the stream, with
//! the `tls-server-end-point` channel binding for SCRAM.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Errors of a TLS connection to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS is disabled (sslmode=disable)")]
    Disabled,
    #[error("cannot use TLS with {host:?}: not a host name or IP address")]
    Name { host: String },
    #[error("TLS handshake with the PostgreSQL server {host} failed; {hint}")]
    Handshake {
        host: String,
        /// What to do about it.
        hint: String,
        #[source]
        source: io::Error,
    },
}

/// What to do about a failed handshake with `host`.
fn hint(source: &io::Error, host: &str, roots: &str) -> String {
    use rustls::CertificateError as C;
    let tls = source
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => format!(
            "its certificate does not name {host}: connect by a name or address the certificate holds"
        ),
        Some(rustls::Error::InvalidCertificate(_)) => format!(
            "its certificate was checked against {roots}: set sslrootcert= in the store URL, or OUTPOST_STORE_CA, to the CA file that issued it"
        ),
        _ => format!("its certificate is checked against {roots}"),
    }
}

/// Makes one TLS connector per connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct MakeRustls {
    /// `None` when TLS is disabled.
    inner: Option<Arc<Inner>>,
}

struct Inner {
    config: Arc<rustls::ClientConfig>,
    /// What the certificates are checked against, for errors.
    roots: String,
}

impl MakeRustls {
    pub(super) fn new(config: rustls::ClientConfig, roots: String) -> MakeRustls {
        MakeRustls {
            inner: Some(Arc::new(Inner {
                config: Arc::new(config),
                roots,
            })),
        }
    }

    pub(super) fn disabled() -> MakeRustls {
        MakeRustls { inner: None }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, TlsError> {
        Ok(RustlsConnect {
            inner: self.inner.clone(),
            host: host.to_string(),
        })
    }
}

/// The TLS handshake with one host.
pub(crate) struct RustlsConnect {
    inner: Option<Arc<Inner>>,
    host: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let inner = self.inner.ok_or(TlsError::Disabled)?;
            let name = ServerName::try_from(self.host.clone()).map_err(|_| TlsError::Name {
                host: self.host.clone(),
            })?;
            let tls = tokio_rustls::TlsConnector::from(inner.config.clone())
                .connect(name, stream)
                .await
                .map_err(|source| TlsError::Handshake {
                    hint: hint(&source, &self.host, &inner.roots),
                    host: self.host,
                    source,
                })?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub(crate) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): the digest of the server's
    /// certificate, with the hash of its signature (SHA-256 for MD5 and
    /// SHA-1).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
            return ChannelBinding::none();
        };
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
            return ChannelBinding::none();
        };
        let oid = parsed.signature_algorithm.algorithm.to_id_string();
        let alg = match oid.as_str() {
            // sha384WithRSAEncryption, ecdsa-with-SHA384
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
            // sha512WithRSAEncryption, ecdsa-with-SHA512
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
            // Ed25519 and others with no hash of their own: none.
            "1.3.101.112" | "1.3.101.113" => return ChannelBinding::none(),
            _ => &ring::digest::SHA256,
        };
        ChannelBinding::tls_server_end_point(
            ring::digest::digest(alg, cert.as_ref()).as_ref().to_vec(),
        )
    }
}
