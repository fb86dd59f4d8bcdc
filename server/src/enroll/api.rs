//! `outpost.identity.v1.Enrollment` (served without a client certificate:
//! the bootstrap token is the credential) and `IdentityAdmin` (admin
//! certificate).

use std::sync::Arc;
use std::time::Duration;

use outpost_proto::identity::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::Registry;
use crate::hub::Hub;
use crate::identity::{Identity, Role};

pub struct EnrollmentApi {
    pub registry: Arc<Registry>,
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        match self
            .registry
            .enroll(&r.token, &r.agent_name, &r.csr_pem)
            .await
        {
            Ok(issued) => {
                info!(agent = %r.agent_name, pool = %issued.pool, ttl_ms = issued.ttl.as_millis() as u64, "agent enrolled");
                Ok(Response::new(pb::EnrollResponse {
                    certificate_pem: issued.certificate_pem,
                    ttl_ms: issued.ttl.as_millis() as u64,
                    pool: issued.pool,
                    labels: issued.labels.into_iter().collect(),
                }))
            }
            Err(e) => {
                // The token itself is never logged.
                warn!(agent = %r.agent_name, peer = ?peer, error = %e, "enrolment refused");
                Err(e.into())
            }
        }
    }
}

pub struct IdentityAdminApi {
    pub registry: Arc<Registry>,
    pub hub: Arc<Hub>,
}

#[tonic::async_trait]
impl pb::identity_admin_server::IdentityAdmin for IdentityAdminApi {
    async fn create_enrollment(
        &self,
        request: Request<pb::CreateEnrollmentRequest>,
    ) -> Result<Response<pb::CreateEnrollmentResponse>, Status> {
        let who = Identity::require(&request, Role::Admin)?;
        let r = request.into_inner();
        let ttl = if r.ttl_ms == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(r.ttl_ms)
        };
        let uses = r.uses.max(1);
        let created = self
            .registry
            .create(
                r.pool.clone(),
                r.labels.into_iter().collect(),
                ttl,
                uses,
                r.agent_name,
            )
            .await?;
        info!(admin = %who.name, enrollment = %created.id, pool = %r.pool, uses, "enrolment created");
        Ok(Response::new(pb::CreateEnrollmentResponse {
            enrollment_id: created.id,
            token: created.token,
            expires_ms: created.expires_ms.max(0) as u64,
        }))
    }

    async fn revoke_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeAgentResponse>, Status> {
        let who = Identity::require(&request, Role::Admin)?;
        let name = request.into_inner().agent_name;
        let was_connected = self.hub.is_connected(&name);
        let record = self.registry.revoke(&name).await?;
        info!(admin = %who.name, agent = %name, was_connected, "agent revoked");
        self.hub.changed();
        Ok(Response::new(pb::RevokeAgentResponse {
            agent_name: name,
            revoked_ms: record.revoked_ms.max(0) as u64,
            was_connected,
        }))
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        // What every replica changed, not only this one.
        self.registry
            .reload()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let identities = self
            .registry
            .records()
            .into_iter()
            .map(|r| pb::AgentIdentity {
                agent_name: r.name,
                pool: r.pool,
                labels: r.labels.into_iter().collect(),
                enrollment_id: r.enrollment_id,
                cert_not_after_ms: r.cert_not_after_ms.max(0) as u64,
                revoked_ms: r.revoked_ms.max(0) as u64,
            })
            .collect();
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }
}
