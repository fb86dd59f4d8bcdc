//! The agent's own identity when it enrols (`bootstrap_token_file`): it
//! generates its private key here (it never leaves the host), exchanges a
//! CSR and the one-time bootstrap token for a short-lived certificate, and
//! renews that certificate over its live session at half its lifetime
//! (`crate::session`). A renewed certificate is used from the next
//! connection on: the live session and its jobs carry on.
//!
//! Only an expired certificate makes the agent enrol again, and it says so:
//! it needs a new bootstrap token in `bootstrap_token_file`. Until then it
//! keeps retrying, and its running jobs stop only when their leases say so.

mod files;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outpost_proto::identity::v1 as pb;
use outpost_proto::identity::v1::enrollment_client::EnrollmentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use crate::config::AgentConfig;

/// Why the agent has no usable certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "the agent's certificate {cert} expired at {expired}, and {reason}: the agent must enrol again; write a new bootstrap token (`outpost enroll create`) to {token_file}"
    )]
    Expired {
        cert: PathBuf,
        expired: String,
        token_file: PathBuf,
        reason: String,
    },
    #[error(
        "the agent has no certificate yet and {reason}: write a bootstrap token (`outpost enroll create`) to {token_file}"
    )]
    NoToken { token_file: PathBuf, reason: String },
    #[error("the control plane refused the enrolment: {0}")]
    Refused(String),
    #[error("cannot reach the control plane to enrol: {0}")]
    Connect(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Key(String),
}

/// An enrolling agent's certificate, key and bootstrap token.
pub struct Identity {
    cfg: Arc<AgentConfig>,
    token_file: PathBuf,
}

impl Identity {
    /// `None` unless the agent enrols (`bootstrap_token_file` is set).
    pub fn new(cfg: &Arc<AgentConfig>) -> Option<Arc<Identity>> {
        let token_file = cfg.bootstrap_token_file.clone()?;
        Some(Arc::new(Identity {
            cfg: cfg.clone(),
            token_file,
        }))
    }

    fn name(&self) -> String {
        self.cfg.agent_id.clone().unwrap_or_default()
    }

    /// Time left on the certificate on disk (`None`: none, or unreadable).
    pub fn remaining(&self) -> Option<Result<Duration, SystemTime>> {
        let not_after = files::cert_not_after(&self.cfg.tls.cert)?;
        Some(
            not_after
                .duration_since(SystemTime::now())
                .map_err(|_| not_after),
        )
    }

    /// Makes sure a valid certificate is on disk: enrols with the bootstrap
    /// token if there is none or it expired.
    pub async fn ensure(&self) -> Result<(), IdentityError> {
        let expired = match self.remaining() {
            Some(Ok(left)) if !left.is_zero() && self.cfg.tls.key.is_file() => return Ok(()),
            Some(Err(at)) => Some(at),
            _ => None,
        };
        let token = match std::fs::read_to_string(&self.token_file) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            Ok(_) => return Err(self.missing(expired, "the bootstrap token file is empty")),
            Err(e) => {
                return Err(self.missing(expired, &format!("there is no bootstrap token ({e})")));
            }
        };
        if let Some(at) = expired {
            warn!(cert = %self.cfg.tls.cert.display(), expired = %files::show(at), "the agent's certificate expired; enrolling again with the bootstrap token");
        }
        match self.enroll(&token).await {
            Ok(()) => Ok(()),
            Err(IdentityError::Refused(reason)) if expired.is_some() => {
                Err(self.missing(expired, &format!("the enrolment was refused ({reason})")))
            }
            Err(e) => Err(e),
        }
    }

    fn missing(&self, expired: Option<SystemTime>, reason: &str) -> IdentityError {
        match expired {
            Some(at) => IdentityError::Expired {
                cert: self.cfg.tls.cert.clone(),
                expired: files::show(at),
                token_file: self.token_file.clone(),
                reason: reason.to_string(),
            },
            None => IdentityError::NoToken {
                token_file: self.token_file.clone(),
                reason: reason.to_string(),
            },
        }
    }

    async fn enroll(&self, token: &str) -> Result<(), IdentityError> {
        let name = self.name();
        // A fresh key for every enrolment, written before it is used.
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
        let csr = files::csr(&key, &name)?;
        let ca = std::fs::read(&self.cfg.tls.ca).map_err(|source| IdentityError::Io {
            what: "failed to read the CA certificate",
            path: self.cfg.tls.ca.clone(),
            source,
        })?;
        let channel = self.dial(&ca).await?;
        let resp = EnrollmentClient::new(channel)
            .enroll(pb::EnrollRequest {
                token: token.to_string(),
                agent_name: name.clone(),
                csr_pem: csr,
            })
            .await
            .map_err(|s| IdentityError::Refused(s.message().to_string()))?
            .into_inner();
        files::write_private(&self.cfg.tls.key, key.serialize_pem().as_bytes())?;
        files::write_public(&self.cfg.tls.cert, resp.certificate_pem.as_bytes())?;
        info!(agent = %name, pool = %resp.pool, ttl_ms = resp.ttl_ms, "enrolled with the control plane");
        let mut labels: Vec<_> = resp
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let claimed_outside: Vec<_> = self
            .cfg
            .labels
            .iter()
            .filter(|(k, v)| resp.labels.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !claimed_outside.is_empty() {
            warn!(ignored = %claimed_outside.join(","), allowed = %labels.join(","), "configured labels outside the enrolment are ignored by the control plane");
        }
        // The token is spent: do not leave it around (it may sit on a
        // read-only mount; then it simply stays, unusable).
        if let Err(e) = std::fs::remove_file(&self.token_file) {
            debug!(error = %e, "the used bootstrap token file stays");
        }
        Ok(())
    }

    /// Connects to the first control plane address that answers, in the
    /// configured order (server authentication only: no certificate yet).
    async fn dial(&self, ca: &[u8]) -> Result<Channel, IdentityError> {
        let mut failures = Vec::new();
        for url in self.cfg.addresses() {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(self.cfg.server_name_for(&url));
            let connected = match Endpoint::from_shared(url.clone()).and_then(|e| e.tls_config(tls))
            {
                Ok(ep) => ep
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(30))
                    .connect()
                    .await
                    .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e))),
                Err(e) => Err(e.to_string()),
            };
            match connected {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    debug!(server = %url, error = %e, "cannot reach the control plane to enrol");
                    failures.push(format!("{url}: {e}"));
                }
            }
        }
        Err(IdentityError::Connect(failures.join("; ")))
    }

    /// A CSR for the next certificate, with the agent's key.
    pub fn renewal_csr(&self) -> Result<String, IdentityError> {
        let pem =
            std::fs::read_to_string(&self.cfg.tls.key).map_err(|source| IdentityError::Io {
                what: "failed to read the agent key",
                path: self.cfg.tls.key.clone(),
                source,
            })?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| IdentityError::Key(e.to_string()))?;
        files::csr(&key, &self.name())
    }

    /// Keeps a renewed certificate for the next connections (the session's
    /// and, through `crate::session::IacRoute`, the IaC calls').
    pub fn renewed(&self, certificate_pem: &str) -> Result<(), IdentityError> {
        files::write_public(&self.cfg.tls.cert, certificate_pem.as_bytes())
    }
}

/// When the next renewal is due over the live session.
#[derive(Debug, Default)]
pub struct Renewal {
    next: Option<tokio::time::Instant>,
    sent_at: Option<std::time::Instant>,
}

impl Renewal {
    /// Scheduled from the certificate on disk: at half of what is left.
    pub fn start(identity: Option<&Identity>) -> Renewal {
        let mut r = Renewal::default();
        if let Some(id) = identity {
            let left = match id.remaining() {
                Some(Ok(left)) => left,
                _ => Duration::ZERO,
            };
            r.next = Some(tokio::time::Instant::now() + (left / 2).max(Duration::from_millis(200)));
        }
        r
    }

    /// Resolves when a renewal is due (never if none is scheduled).
    pub async fn due(&self) {
        match self.next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// A request is on its way: if no answer comes, ask again later.
    pub fn sent(&mut self, identity: &Identity) {
        self.sent_at = Some(std::time::Instant::now());
        self.retry_later(identity);
    }

    /// The control plane signed the next certificate, valid for `ttl`.
    pub fn done(&mut self, ttl: Duration) -> Option<Duration> {
        self.next = Some(tokio::time::Instant::now() + (ttl / 2).max(Duration::from_millis(200)));
        self.sent_at.take().map(|t| t.elapsed())
    }

    /// Asks again after a quarter of what is left (at least a second).
    pub fn retry_later(&mut self, identity: &Identity) {
        let left = match identity.remaining() {
            Some(Ok(left)) => left,
            _ => Duration::ZERO,
        };
        self.next = Some(tokio::time::Instant::now() + (left / 4).max(Duration::from_secs(1)));
    }
}

#[cfg(test)]
mod tests;
