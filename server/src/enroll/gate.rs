//! The check in front of every service but enrolment: a client certificate
//! is required (the TLS layer verified it against the CA), and an agent
//! certificate of a revoked agent is refused, whatever the service.
//!
//! The control plane's one port accepts TLS clients without a certificate
//! only so that an agent can enrol; this interceptor wraps every other
//! service, so such a client can call nothing else. Each service still
//! checks the certificate's role itself (`crate::identity`).

use std::sync::Arc;

use tonic::{Request, Status};

use super::Registry;
use crate::identity::{Identity, Role};

/// A `tonic` interceptor; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    pub registry: Arc<Registry>,
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let first = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        if let Some(id) = Identity::from_der(first.as_ref())
            && id.role == Role::Agent
            && self.registry.is_revoked(&id.name)
        {
            return Err(revoked(&id.name));
        }
        Ok(request)
    }
}

/// The status a revoked agent gets, on a new call and on its live session.
pub fn revoked(name: &str) -> Status {
    Status::permission_denied(format!(
        "agent {name:?} was revoked by an operator; it needs a new enrolment under another name"
    ))
}
