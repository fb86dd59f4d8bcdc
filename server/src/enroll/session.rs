//! One agent session's identity: the labels its enrolment allows, its
//! certificate's renewal over the session, and the end of the session when
//! the agent is revoked or its certificate expires without renewal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outpost_proto::agent::v1 as pb;
use outpost_proto::agent::v1::server_message::Msg as Out;
use tokio::sync::watch;
use tonic::{Request, Status};
use tracing::{info, warn};

use super::Registry;

/// When the certificate a request was made with expires.
pub fn peer_cert_expiry<T>(request: &Request<T>) -> Option<SystemTime> {
    let certs = request.peer_certs()?;
    let first = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.as_ref()).ok()?;
    let secs = cert.validity().not_after.timestamp();
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))
}

pub struct SessionIdentity {
    registry: Arc<Registry>,
    name: String,
    /// When the session's certificate (the last one issued over it) expires.
    expiry: Option<tokio::time::Instant>,
    revocations: watch::Receiver<u64>,
    watching: bool,
}

impl SessionIdentity {
    pub fn new(registry: Arc<Registry>, name: String, expiry: Option<SystemTime>) -> Self {
        let revocations = registry.revocations();
        let mut s = SessionIdentity {
            registry,
            name,
            expiry: None,
            revocations,
            watching: true,
        };
        if let Some(t) = expiry {
            s.expires_at(t);
        }
        s
    }

    fn expires_at(&mut self, t: SystemTime) {
        let left = t
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        self.expiry = Some(tokio::time::Instant::now() + left);
    }

    /// The labels the agent is matched on, and the claimed ones ignored
    /// (its record read again first on a shared store: it may have enrolled
    /// through another replica moments ago).
    pub async fn bind_labels(
        &self,
        claimed: BTreeMap<String, String>,
    ) -> Result<(BTreeMap<String, String>, Vec<String>), Status> {
        self.registry
            .refresh(&self.name)
            .await
            .map_err(|e| Status::unavailable(format!("agent identities: {e}")))?;
        self.check()?;
        let (kept, ignored) = self.registry.bound_labels(&self.name, claimed);
        if !ignored.is_empty() {
            warn!(ignored = %ignored.join(","), "the agent claims labels its enrolment does not allow; ignored");
        }
        Ok((kept, ignored))
    }

    /// Refuses everything from a revoked agent.
    pub fn check(&self) -> Result<(), Status> {
        if self.registry.is_revoked(&self.name) {
            return Err(super::gate::revoked(&self.name));
        }
        Ok(())
    }

    /// Resolves when the session must end: the agent was revoked, or its
    /// certificate expired without a renewal. Cancel-safe.
    pub async fn ended(&mut self) -> Status {
        let expiry = self.expiry;
        let expired = async move {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        loop {
            tokio::select! {
                _ = &mut expired => {
                    info!("the agent's certificate expired without a renewal; ending its session");
                    return Status::unauthenticated(
                        "the agent's certificate expired; renew it before it expires, or enrol again",
                    );
                }
                changed = self.revocations.changed(), if self.watching => {
                    if changed.is_err() {
                        self.watching = false;
                        continue;
                    }
                    if let Err(status) = self.check() {
                        info!("agent revoked; ending its session");
                        return status;
                    }
                }
            }
        }
    }

    /// Signs the agent's next certificate, or says why not.
    pub async fn renew(&mut self, csr_pem: &str) -> Out {
        let started = std::time::Instant::now();
        match self.registry.renew(&self.name, csr_pem).await {
            Ok(issued) => {
                self.expires_at(SystemTime::now() + issued.ttl);
                info!(
                    ttl_ms = issued.ttl.as_millis() as u64,
                    took_us = started.elapsed().as_micros() as u64,
                    "certificate renewed"
                );
                Out::CertificateRenewed(pb::CertificateRenewed {
                    certificate_pem: issued.certificate_pem,
                    ttl_ms: issued.ttl.as_millis() as u64,
                })
            }
            Err(e) => {
                warn!(error = %e, "certificate renewal refused");
                Out::RenewalRefused(pb::RenewalRefused {
                    reason: e.to_string(),
                })
            }
        }
    }
}
