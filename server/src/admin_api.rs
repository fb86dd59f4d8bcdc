//! `outpost.admin.v1.AdminService`: operators submit, watch and cancel jobs.
//! Only admin certificates may call it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span};

use crate::hub::Hub;
use crate::identity::{Identity, Role};
use crate::store::{CancelOutcome, StoreError};
use crate::wire;

pub struct AdminApi {
    pub hub: Arc<Hub>,
    pub shutdown: CancellationToken,
    /// The server's retention, applied by `PruneJobs` without arguments.
    pub retention: crate::retention::Retention,
}

fn internal(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(id) => Status::not_found(format!("job {id} not found")),
        e => Status::internal(e.to_string()),
    }
}

impl AdminApi {
    /// The admin view of a job; a queued one says how many connected agents
    /// could take it.
    fn job_to_pb(&self, job: &crate::model::Job) -> admin::Job {
        let mut pb = wire::job_to_pb(job);
        if job.state == crate::model::JobState::Queued {
            pb.matching_agents = Some(self.hub.matching_agents(&job.spec.selector));
        }
        pb
    }
}

/// Jobs per `ListJobs` page when the caller asks for no number, and at most.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

type LogStream = Pin<Box<dyn Stream<Item = Result<admin::LogData, Status>> + Send>>;

const LOG_BATCH: usize = 256 * 1024;

#[tonic::async_trait]
impl admin::admin_service_server::AdminService for AdminApi {
    async fn submit_job(
        &self,
        request: Request<admin::SubmitJobRequest>,
    ) -> Result<Response<admin::SubmitJobResponse>, Status> {
        let who = Identity::require(&request, Role::Admin)?;
        let spec =
            wire::spec_from_pb(request.into_inner().spec).map_err(Status::invalid_argument)?;
        let id = uuid::Uuid::now_v7().to_string();
        let job = self
            .hub
            .store
            .insert_job(id, spec)
            .await
            .map_err(internal)?;
        info!(job = %job.id, by = %who.name, image = %job.spec.image, "job submitted");
        self.hub.kick();
        self.hub.changed();
        Ok(Response::new(admin::SubmitJobResponse { job_id: job.id }))
    }

    async fn get_job(
        &self,
        request: Request<admin::GetJobRequest>,
    ) -> Result<Response<admin::Job>, Status> {
        Identity::require(&request, Role::Admin)?;
        let id = request.into_inner().job_id;
        let job = self
            .hub
            .store
            .get_job(id.clone())
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
        Ok(Response::new(self.job_to_pb(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<admin::ListJobsRequest>,
    ) -> Result<Response<admin::ListJobsResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let filter = wire::job_filter_from_pb(&req).map_err(Status::invalid_argument)?;
        let page = self
            .hub
            .store
            .list_jobs(filter, limit)
            .await
            .map_err(internal)?;
        // Summarised and cut to a byte budget: a page never exceeds the
        // message limit; one cut short continues after its last job.
        let all: Vec<_> = page.jobs.iter().map(|j| self.job_to_pb(j)).collect();
        let offered = all.len();
        let jobs = crate::limits::fit_page(all);
        let next = if jobs.len() < offered {
            page.seqs.get(jobs.len().max(1) - 1).copied()
        } else {
            page.next
        };
        Ok(Response::new(admin::ListJobsResponse {
            jobs,
            total: page.total,
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<admin::CancelJobRequest>,
    ) -> Result<Response<admin::Job>, Status> {
        let who = Identity::require(&request, Role::Admin)?;
        let id = request.into_inner().job_id;
        let outcome = self
            .hub
            .store
            .request_cancel(id.clone())
            .await
            .map_err(internal)?;
        let job = match outcome {
            CancelOutcome::Dequeued(j) | CancelOutcome::AlreadyFinal(j) => j,
            CancelOutcome::Requested(j) => {
                if let Some(agent) = &j.agent_id {
                    let sent = self.hub.send_anywhere(
                        agent,
                        pb::server_message::Msg::Cancel(pb::Cancel {
                            job_id: j.id.clone(),
                            epoch: j.epoch,
                            reason: format!("cancelled by {}", who.name),
                        }),
                    );
                    info!(job = %j.id, agent = %agent, delivered = sent, "cancel requested");
                }
                j
            }
        };
        self.hub.changed();
        Ok(Response::new(self.job_to_pb(&job)))
    }

    type FollowLogsStream = LogStream;

    async fn follow_logs(
        &self,
        request: Request<admin::FollowLogsRequest>,
    ) -> Result<Response<Self::FollowLogsStream>, Status> {
        Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        // Fail fast on an unknown job.
        self.hub
            .store
            .get_job(req.job_id.clone())
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("job {} not found", req.job_id)))?;
        let (tx, rx) = mpsc::channel(16);
        let hub = self.hub.clone();
        let shutdown = self.shutdown.clone();
        let span = info_span!("follow_logs", job = %req.job_id);
        tokio::spawn(
            async move {
                let _ = follow(hub, req, tx, shutdown).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_agents(
        &self,
        request: Request<admin::ListAgentsRequest>,
    ) -> Result<Response<admin::ListAgentsResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let agents = self.hub.store.list_agents().await.map_err(internal)?;
        let mut out = Vec::with_capacity(agents.len());
        for a in &agents {
            let running = self
                .hub
                .store
                .active_count(a.id.clone())
                .await
                .map_err(internal)?;
            out.push(wire::agent_to_pb(a, self.hub.is_connected(&a.id), running));
        }
        Ok(Response::new(admin::ListAgentsResponse { agents: out }))
    }

    async fn list_artifacts(
        &self,
        request: Request<admin::ListArtifactsRequest>,
    ) -> Result<Response<admin::ListArtifactsResponse>, Status> {
        Identity::require(&request, Role::Admin)?;
        let id = request.into_inner().job_id;
        self.hub
            .store
            .get_job(id.clone())
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
        let artifacts = self.hub.store.list_artifacts(id).await.map_err(internal)?;
        Ok(Response::new(admin::ListArtifactsResponse {
            artifacts: artifacts.iter().map(wire::artifact_to_pb).collect(),
        }))
    }

    async fn prune_jobs(
        &self,
        request: Request<admin::PruneJobsRequest>,
    ) -> Result<Response<admin::PruneJobsResponse>, Status> {
        let who = Identity::require(&request, Role::Admin)?;
        let req = request.into_inner();
        let rule = if req.older_than_ms.is_none() && req.keep.is_none() {
            self.retention.rule()
        } else {
            crate::store::PruneRule {
                older_than_ms: req.older_than_ms,
                keep: req.keep,
            }
        };
        let pruned = crate::retention::prune(&self.hub, rule)
            .await
            .map_err(internal)?;
        let size = self.hub.store.size().await.map_err(internal)?;
        info!(by = %who.name, jobs = pruned.jobs, log_bytes = pruned.log_bytes, store_bytes = size.bytes, "jobs pruned");
        Ok(Response::new(admin::PruneJobsResponse {
            jobs_deleted: pruned.jobs,
            log_bytes_deleted: pruned.log_bytes,
            store: Some(wire::store_status_to_pb(&size)),
        }))
    }

    async fn get_status(
        &self,
        request: Request<admin::GetStatusRequest>,
    ) -> Result<Response<admin::ServerStatus>, Status> {
        Identity::require(&request, Role::Admin)?;
        let size = self.hub.store.size().await.map_err(internal)?;
        Ok(Response::new(admin::ServerStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            store: Some(wire::store_status_to_pb(&size)),
            retain_for_ms: self
                .retention
                .max_age
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            retain_jobs: self.retention.max_jobs.unwrap_or(0),
            connected_agents: self.hub.connected_count() as u32,
        }))
    }

    async fn drain_agent(
        &self,
        request: Request<admin::DrainAgentRequest>,
    ) -> Result<Response<admin::Agent>, Status> {
        let who = Identity::require(&request, Role::Admin)?;
        let id = request.into_inner().agent_id;
        let agents = self.hub.store.list_agents().await.map_err(internal)?;
        let mut agent = agents
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| Status::not_found(format!("agent {id} not found")))?;
        self.hub.set_draining(&id);
        let sent = self.hub.send_anywhere(
            &id,
            pb::server_message::Msg::Drain(pb::Drain {
                reason: format!("drain requested by {}", who.name),
            }),
        );
        info!(agent = %id, delivered = sent, "drain requested");
        agent.draining = true;
        self.hub
            .store
            .upsert_agent(agent.clone())
            .await
            .map_err(internal)?;
        let running = self
            .hub
            .store
            .active_count(id.clone())
            .await
            .map_err(internal)?;
        Ok(Response::new(wire::agent_to_pb(&agent, sent, running)))
    }
}

async fn follow(
    hub: Arc<Hub>,
    req: admin::FollowLogsRequest,
    tx: mpsc::Sender<Result<admin::LogData, Status>>,
    shutdown: CancellationToken,
) -> Result<(), ()> {
    let mut offset = req.offset;
    let mut epoch = req.epoch;
    let mut changes = hub.subscribe();
    loop {
        // Read the job before the log, so a final state seen here implies the
        // log read below is complete.
        changes.borrow_and_update();
        let job = match hub.store.get_job(req.job_id.clone()).await {
            Ok(Some(j)) => j,
            Ok(None) => {
                let _ = tx.send(Err(Status::not_found("job vanished"))).await;
                return Err(());
            }
            Err(e) => {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                return Err(());
            }
        };
        if req.epoch == 0 && job.epoch != epoch {
            if epoch != 0 {
                // Re-leased: follow the new attempt from its start.
                offset = 0;
            }
            epoch = job.epoch;
        }
        loop {
            let data = match hub
                .store
                .read_log(req.job_id.clone(), epoch, offset, LOG_BATCH)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return Err(());
                }
            };
            if data.is_empty() {
                break;
            }
            let len = data.len() as u64;
            tx.send(Ok(admin::LogData {
                offset,
                data,
                eof: false,
                epoch,
            }))
            .await
            .map_err(|_| ())?;
            offset += len;
        }
        let current = epoch == job.epoch;
        let done = !current || (job.log_complete() && offset >= job.log_acked);
        if done || !req.follow {
            let _ = tx
                .send(Ok(admin::LogData {
                    offset,
                    data: Vec::new(),
                    eof: done,
                    epoch,
                }))
                .await;
            return Ok(());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tx.closed() => return Ok(()),
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
