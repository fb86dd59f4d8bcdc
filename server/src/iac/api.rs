//! `outpost.iac.v1.IacAdmin` (admin certificates) and
//! `outpost.iac.v1.IacAgent` (agent certificates, every call fenced by the
//! caller's current lease of the job it names).

use std::sync::Arc;

use outpost_proto::iac::v1 as iac;
use tonic::{Request, Response, Status};

use super::runs::Engine;
use super::wire;
use crate::identity::{Identity, Role};

/// Who decided: `admin:<name>` from the certificate.
fn who(id: &Identity) -> String {
    format!("{}:{}", id.role.as_str(), id.name)
}

pub struct IacAdminApi {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl iac::iac_admin_server::IacAdmin for IacAdminApi {
    async fn apply_stacks(
        &self,
        request: Request<iac::ApplyStacksRequest>,
    ) -> Result<Response<iac::ApplyStacksResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let specs = req.stacks.into_iter().map(wire::spec_from_pb).collect();
        if req.set_notify {
            let targets = req.notify.into_iter().map(wire::target_from_pb).collect();
            self.engine
                .notifier
                .set_global(targets)
                .await
                .map_err(Status::invalid_argument)?;
        }
        let changes = self.engine.apply_stacks(specs).await?;
        Ok(Response::new(iac::ApplyStacksResponse {
            changes: changes
                .into_iter()
                .map(|(name, action)| iac::StackChange {
                    name,
                    action: action.to_string(),
                })
                .collect(),
        }))
    }

    async fn list_stacks(
        &self,
        request: Request<iac::ListStacksRequest>,
    ) -> Result<Response<iac::ListStacksResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let stacks = self.engine.store.list_stacks().await?;
        let mut out = Vec::with_capacity(stacks.len());
        for s in &stacks {
            out.push(self.stack_with_state(s).await?);
        }
        Ok(Response::new(iac::ListStacksResponse { stacks: out }))
    }

    async fn get_stack(
        &self,
        request: Request<iac::GetStackRequest>,
    ) -> Result<Response<iac::Stack>, Status> {
        Identity::require(&request, Role::Admin)?;
        let s = self.engine.stack(&request.into_inner().name).await?;
        let mut pb = self.stack_with_state(&s).await?;
        pb.outputs = self
            .engine
            .last_outputs(&s.spec.name)
            .await?
            .into_iter()
            .collect();
        Ok(Response::new(pb))
    }

    async fn delete_stack(
        &self,
        request: Request<iac::DeleteStackRequest>,
    ) -> Result<Response<iac::DeleteStackResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let name = request.into_inner().name;
        if !self.engine.store.delete_stack(name.clone()).await? {
            return Err(Status::not_found(format!("stack {name} not found")));
        }
        Ok(Response::new(iac::DeleteStackResponse {}))
    }

    async fn sync_stack(
        &self,
        request: Request<iac::SyncStackRequest>,
    ) -> Result<Response<iac::SyncStackResponse>, Status> {
        let id = Identity::require(&request, Role::Admin)?;
        let (stack, run) = self
            .engine
            .sync(&request.into_inner().name, &who(&id))
            .await?;
        Ok(Response::new(iac::SyncStackResponse {
            stack: Some(wire::stack_to_pb(&stack)),
            run_id: run.map(|r| r.id).unwrap_or_default(),
        }))
    }

    async fn trigger_run(
        &self,
        request: Request<iac::TriggerRunRequest>,
    ) -> Result<Response<iac::Run>, Status> {
        let id = Identity::require(&request, Role::Admin)?;
        let run = self
            .engine
            .trigger(&request.into_inner().stack, &who(&id))
            .await?;
        Ok(Response::new(wire::run_to_pb(&run)))
    }

    async fn list_runs(
        &self,
        request: Request<iac::ListRunsRequest>,
    ) -> Result<Response<iac::ListRunsResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit.min(1000)
        };
        let stack = (!req.stack.is_empty()).then_some(req.stack);
        let runs = self.engine.store.list_runs(stack, limit).await?;
        Ok(Response::new(iac::ListRunsResponse {
            runs: runs.iter().map(wire::run_to_pb).collect(),
        }))
    }

    async fn get_run(
        &self,
        request: Request<iac::GetRunRequest>,
    ) -> Result<Response<iac::Run>, Status> {
        Identity::require(&request, Role::Admin)?;
        let id = request.into_inner().run_id;
        let run = self
            .engine
            .store
            .get_run(id.clone())
            .await?
            .ok_or_else(|| Status::not_found(format!("run {id} not found")))?;
        Ok(Response::new(wire::run_to_pb(&run)))
    }

    async fn decide_run(
        &self,
        request: Request<iac::DecideRunRequest>,
    ) -> Result<Response<iac::Run>, Status> {
        let id = Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let run = self
            .engine
            .decide(&req.run_id, &who(&id), &req.decision, &req.comment)
            .await?;
        Ok(Response::new(wire::run_to_pb(&run)))
    }

    async fn propose_run(
        &self,
        request: Request<iac::ProposeRunRequest>,
    ) -> Result<Response<iac::Run>, Status> {
        let id = Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let run = self
            .engine
            .propose(&req.stack, &req.git_ref, &who(&id))
            .await?;
        Ok(Response::new(wire::run_to_pb(&run)))
    }

    async fn check_drift(
        &self,
        request: Request<iac::CheckDriftRequest>,
    ) -> Result<Response<iac::Run>, Status> {
        let id = Identity::require(&request, Role::Admin)?;
        let run = self
            .engine
            .check_drift(&request.into_inner().stack, &who(&id))
            .await?;
        Ok(Response::new(wire::run_to_pb(&run)))
    }

    async fn list_deliveries(
        &self,
        request: Request<iac::ListDeliveriesRequest>,
    ) -> Result<Response<iac::ListDeliveriesResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(1000)
        };
        let stack = (!req.stack.is_empty()).then_some(req.stack);
        let list = self
            .engine
            .notifier
            .list(stack, limit)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(iac::ListDeliveriesResponse {
            deliveries: list.iter().map(wire::delivery_to_pb).collect(),
        }))
    }
    async fn list_state_versions(
        &self,
        request: Request<iac::ListStateVersionsRequest>,
    ) -> Result<Response<iac::ListStateVersionsResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        self.engine.stack(&req.stack).await?;
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit.min(1000)
        };
        let versions = self.engine.store.state_versions(req.stack, limit).await?;
        Ok(Response::new(iac::ListStateVersionsResponse {
            versions: versions.iter().map(wire::state_version_to_pb).collect(),
        }))
    }

    async fn push_state_version(
        &self,
        request: Request<iac::PushStateVersionRequest>,
    ) -> Result<Response<iac::StateVersion>, Status> {
        let id = Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let v = self
            .engine
            .admin_push_state(&who(&id), &req.stack, req.serial, req.lineage, req.sealed)
            .await?;
        Ok(Response::new(wire::state_version_to_pb(&v)))
    }
}

impl IacAdminApi {
    /// A stack with its current state version.
    async fn stack_with_state(
        &self,
        s: &super::model::Stack,
    ) -> Result<iac::Stack, super::IacError> {
        let drift = self.engine.store.drift_states().await?;
        let mut pb = wire::stack_with_drift(s, drift.get(&s.spec.name));
        if let Some(v) = self.engine.store.current_state(s.spec.name.clone()).await? {
            pb.state_serial = v.serial;
            pb.state_lineage = v.lineage;
        }
        Ok(pb)
    }
}

pub struct IacAgentApi {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl iac::iac_agent_server::IacAgent for IacAgentApi {
    async fn fetch_blob(
        &self,
        request: Request<iac::FetchBlobRequest>,
    ) -> Result<Response<iac::Blob>, Status> {
        let id = Identity::require(&request, Role::Agent)?;
        let req = request.into_inner();
        let data = self
            .engine
            .blob_for(&id.name, &req.job_id, req.epoch, &req.digest)
            .await?;
        Ok(Response::new(iac::Blob {
            digest: req.digest,
            data,
        }))
    }

    async fn report_plan(
        &self,
        request: Request<iac::PlanReport>,
    ) -> Result<Response<iac::PlanReportAck>, Status> {
        let id = Identity::require(&request, Role::Agent)?;
        let req = request.into_inner();
        let (job, epoch) = (req.job_id.clone(), req.epoch);
        let plan = wire::plan_from_pb(req).map_err(Status::invalid_argument)?;
        self.engine.report_plan(&id.name, &job, epoch, plan).await?;
        Ok(Response::new(iac::PlanReportAck {}))
    }

    async fn upload_bundle(
        &self,
        request: Request<iac::BundleUpload>,
    ) -> Result<Response<iac::BundleAck>, Status> {
        let id = Identity::require(&request, Role::Agent)?;
        let req = request.into_inner();
        let digest = self
            .engine
            .upload_bundle(&id.name, &req.job_id, req.epoch, req.sealed)
            .await?;
        Ok(Response::new(iac::BundleAck { digest }))
    }

    async fn get_state(
        &self,
        request: Request<iac::StateRequest>,
    ) -> Result<Response<iac::StateVersionData>, Status> {
        let id = Identity::require(&request, Role::Agent)?;
        let req = request.into_inner();
        let found = self
            .engine
            .state_for(&id.name, &req.job_id, req.epoch)
            .await?;
        Ok(Response::new(match found {
            None => iac::StateVersionData::default(),
            Some((v, sealed)) => iac::StateVersionData {
                version: Some(wire::state_version_to_pb(&v)),
                sealed,
            },
        }))
    }

    async fn push_state(
        &self,
        request: Request<iac::StatePush>,
    ) -> Result<Response<iac::StateVersion>, Status> {
        let id = Identity::require(&request, Role::Agent)?;
        let req = request.into_inner();
        let v = self
            .engine
            .push_state(
                &id.name,
                &req.job_id,
                req.epoch,
                req.serial,
                req.lineage,
                req.sealed,
            )
            .await?;
        Ok(Response::new(wire::state_version_to_pb(&v)))
    }

    async fn report_apply(
        &self,
        request: Request<iac::ApplyReport>,
    ) -> Result<Response<iac::ApplyReportAck>, Status> {
        let id = Identity::require(&request, Role::Agent)?;
        let req = request.into_inner();
        self.engine
            .report_apply(
                &id.name,
                &req.job_id,
                req.epoch,
                req.stale,
                req.message,
                req.outputs.into_iter().collect(),
            )
            .await?;
        Ok(Response::new(iac::ApplyReportAck {}))
    }
}
