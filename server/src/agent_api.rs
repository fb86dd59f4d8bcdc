//! `outpost.agent.v1.AgentService`: one session per connected agent.
//!
//! The agent's identity is the name in its verified client certificate; what
//! it says in `Hello.agent_id` is informational only.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use futures::stream::FuturesOrdered;
use outpost_proto::agent::v1 as pb;
use outpost_proto::agent::v1::agent_message::Msg as In;
use outpost_proto::agent::v1::server_message::Msg as Out;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::{AgentTx, Hub};
use crate::identity::{Identity, Role};
use crate::model::{AgentInfo, now_ms};
use crate::store::StoreError;
use crate::wire;

pub struct AgentApi {
    pub hub: Arc<Hub>,
    pub shutdown: CancellationToken,
    /// Enrolled identities: bound labels, renewals, revocations.
    pub identities: Arc<crate::enroll::Registry>,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type SessionStream = OutStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let id = Identity::require(&request, Role::Agent)?;
        let cert_expiry = crate::enroll::session::peer_cert_expiry(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let hub = self.hub.clone();
        let shutdown = self.shutdown.clone();
        let identity = crate::enroll::session::SessionIdentity::new(
            self.identities.clone(),
            id.name.clone(),
            cert_expiry,
        );
        let span = info_span!("agent_session", agent = %id.name);
        tokio::spawn(
            async move {
                if let Err(e) =
                    run_session(hub, id.name, inbound, tx.clone(), shutdown, identity).await
                {
                    warn!(error = %e, "agent session ended with an error");
                    let _ = tx.send(Err(e)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|m| m.map(|boxed| *boxed)),
        )))
    }
}

/// Queues `msg` for the agent. Boxed before the first await, so a waiting
/// send holds a pointer, not the message (a lease is ~700 bytes inline),
/// in the session's long-lived task.
fn out(tx: &AgentTx, msg: Out) -> impl std::future::Future<Output = Result<(), Status>> + '_ {
    let msg = Box::new(pb::ServerMessage { msg: Some(msg) });
    async move {
        tx.send(Ok(msg))
            .await
            .map_err(|_| Status::cancelled("session closed"))
    }
}

fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

/// Log chunks and status reports of one session waiting for their batch's
/// commit (`store::batch`) at most; the session reads no further message
/// until the oldest is answered, so its memory is bounded.
const MAX_PENDING: usize = 64;

/// The reply to a message, once its batch committed.
type Pending = Pin<Box<dyn std::future::Future<Output = Result<Option<Out>, Status>> + Send>>;

/// What a session's hello told, once it was welcomed.
struct Hello {
    labels: std::collections::BTreeMap<String, String>,
    capacity: u32,
    draining: bool,
    version: String,
    resumed: usize,
}

/// Reads the hello, reconciles the leases the agent claims and sends the
/// welcome; `None` if the agent left first.
async fn welcome(
    hub: &Hub,
    agent: &str,
    inbound: &mut Streaming<pb::AgentMessage>,
    tx: &AgentTx,
    identity: &crate::enroll::session::SessionIdentity,
) -> Result<Option<Hello>, Status> {
    let first = tokio::time::timeout(Duration::from_secs(15), inbound.next())
        .await
        .map_err(|_| Status::deadline_exceeded("no hello within 15s"))?;
    let hello = match first {
        Some(Ok(pb::AgentMessage {
            msg: Some(In::Hello(h)),
        })) => h,
        Some(Ok(_)) => {
            return Err(Status::failed_precondition(
                "the first message must be hello",
            ));
        }
        Some(Err(e)) => return Err(e),
        None => return Ok(None),
    };
    let (labels, ignored_labels) = identity
        .bind_labels(hello.labels.into_iter().collect())
        .await?;
    hub.store
        .upsert_agent(AgentInfo {
            id: agent.to_string(),
            version: hello.version.clone(),
            labels: labels.clone(),
            capacity: hello.capacity,
            draining: hello.draining,
            last_seen_ms: now_ms(),
        })
        .await
        .map_err(internal)?;

    // Reconcile what the agent says it runs with the leases we hold.
    let ttl_ms = hub.timing.ttl.as_millis() as u64;
    let claimed: Vec<(String, u64)> = hello
        .running
        .iter()
        .map(|l| (l.job_id.clone(), l.epoch))
        .collect();
    let (renewed, revoked) = hub
        .store
        .renew(agent.to_string(), claimed, ttl_ms)
        .await
        .map_err(internal)?;
    let kept: HashSet<String> = renewed.iter().map(|j| j.id.clone()).collect();
    for (id, epoch) in hub.store.held_by(agent) {
        if !kept.contains(&id) {
            // A lease it never confirmed (its session broke, e.g. it could
            // not decode it) counts towards the job's undelivered limit.
            let after = hub
                .store
                .lease_not_taken(
                    id.clone(),
                    epoch,
                    agent.to_string(),
                    "the agent's session ended before it confirmed the lease".into(),
                )
                .await
                .map_err(internal)?;
            let state = after.as_ref().map(|j| j.state.as_str()).unwrap_or("gone");
            info!(job = %id, epoch, now = state, "agent no longer holds this lease");
        }
    }
    let welcome = pb::Welcome {
        agent_id: agent.to_string(),
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: vec!["log-ack".into(), "status-ack".into()],
        resumed: renewed
            .iter()
            .map(|j| wire::lease_resume(j, ttl_ms))
            .collect(),
        revoked: wire::lease_refs(revoked),
        heartbeat_interval_ms: hub.timing.heartbeat.as_millis() as u64,
        labels: labels.clone().into_iter().collect(),
        ignored_labels,
    };
    out(tx, Out::Welcome(welcome)).await?;
    for j in &renewed {
        if j.cancel_requested {
            out(
                tx,
                Out::Cancel(pb::Cancel {
                    job_id: j.id.clone(),
                    epoch: j.epoch,
                    reason: "cancelled by an operator".into(),
                }),
            )
            .await?;
        }
    }
    Ok(Some(Hello {
        labels,
        capacity: hello.capacity,
        draining: hello.draining,
        version: hello.version,
        resumed: renewed.len(),
    }))
}

async fn run_session(
    hub: Arc<Hub>,
    agent: String,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: AgentTx,
    shutdown: CancellationToken,
    mut identity: crate::enroll::session::SessionIdentity,
) -> Result<(), Status> {
    // Boxed, like every rarely awaited future below: the session's task
    // stays small (it lives as long as the agent is connected).
    let Some(hello) = Box::pin(welcome(&hub, &agent, &mut inbound, &tx, &identity)).await? else {
        return Ok(());
    };
    let session = hub.connect(
        &agent,
        tx.clone(),
        hello.labels,
        hello.capacity,
        hello.draining,
    );
    info!(version = %hello.version, capacity = hello.capacity, resumed = hello.resumed, "agent connected");
    hub.kick();
    hub.changed();

    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let result = loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            ended = identity.ended() => break Err(ended),
            Some(reply) = pending.next(), if !pending.is_empty() => {
                match reply {
                    Ok(Some(msg)) => {
                        let freed = matches!(msg, Out::StatusAck(_));
                        if let Err(e) = out(&tx, msg).await {
                            break Err(e);
                        }
                        if freed {
                            // A final status is stored and its ack queued
                            // first: the agent has forgotten the job before
                            // the next lease reaches it.
                            hub.slot_free(&agent);
                            hub.kick();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
                continue;
            }
            m = inbound.next(), if pending.len() < MAX_PENDING => m,
        };
        let msg = match msg {
            None => break Ok(()),
            Some(Err(e)) => {
                debug!(error = %e, "agent stream broke");
                break Ok(());
            }
            Some(Ok(m)) => m,
        };
        hub.touch(&agent);
        if let Err(e) = identity.check() {
            break Err(e);
        }
        if let Some(In::RenewCertificate(r)) = &msg.msg {
            let renewed = Box::pin(identity.renew(&r.csr_pem)).await;
            if let Err(e) = out(&tx, renewed).await {
                break Err(e);
            }
            continue;
        }
        match Box::pin(handle(&hub, &agent, &tx, msg)).await {
            Ok(Some(p)) => pending.push_back(p),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    hub.disconnect(&agent, session);
    hub.changed();
    info!("agent disconnected");
    result
}

/// Handles one message; log chunks and status reports are queued for the
/// next batch and answered by the returned future once it committed.
async fn handle(
    hub: &Arc<Hub>,
    agent: &str,
    tx: &AgentTx,
    msg: pb::AgentMessage,
) -> Result<Option<Pending>, Status> {
    let Some(msg) = msg.msg else { return Ok(None) };
    let ttl_ms = hub.timing.ttl.as_millis() as u64;
    match msg {
        In::Hello(_) => return Err(Status::failed_precondition("hello sent twice")),
        // Answered by the session loop (`crate::enroll::session`).
        In::RenewCertificate(_) => {}
        In::Heartbeat(hb) => {
            // Renewed in memory: no store trip (see `store::held`).
            let leases = hb.leases.into_iter().map(|l| (l.job_id, l.epoch)).collect();
            let (renewed, revoked) = hub.store.renew_held(agent, leases, ttl_ms);
            out(
                tx,
                Out::HeartbeatAck(pb::HeartbeatAck {
                    renewed: renewed
                        .into_iter()
                        .map(|(job_id, epoch, acked_offset)| pb::LeaseResume {
                            lease: Some(pb::LeaseRef { job_id, epoch }),
                            acked_offset,
                            ttl_ms,
                        })
                        .collect(),
                    revoked: wire::lease_refs(revoked),
                }),
            )
            .await?;
            if hb.free_slots > 0 {
                hub.slot_free(agent);
            }
        }
        In::Log(chunk) => {
            let done = hub
                .store
                .append_log_queued(
                    chunk.job_id.clone(),
                    chunk.epoch,
                    agent.to_string(),
                    chunk.offset,
                    chunk.data.into(),
                )
                .await
                .map_err(internal)?;
            let hub = hub.clone();
            return Ok(Some(Box::pin(async move {
                let ack = |offset| {
                    Out::LogAck(pb::LogAck {
                        job_id: chunk.job_id.clone(),
                        epoch: chunk.epoch,
                        offset,
                    })
                };
                match done.await {
                    Ok(acked) => {
                        hub.changed();
                        Ok(Some(ack(acked)))
                    }
                    Err(e @ (StoreError::Stale { .. } | StoreError::NotFound(_))) => Ok(Some(
                        refusal(chunk.job_id.clone(), chunk.epoch, e.to_string()),
                    )),
                    Err(StoreError::Gap { acked, .. }) => {
                        warn!(job = %chunk.job_id, offset = chunk.offset, acked, "log chunk leaves a gap; asking to resend");
                        Ok(Some(ack(acked)))
                    }
                    Err(e) => Err(internal(e)),
                }
            })));
        }
        In::Status(st) => {
            let report = match wire::status_from_pb(&st) {
                Ok(r) => r,
                Err(e) => {
                    refuse(tx, st.job_id, st.epoch, e).await?;
                    return Ok(None);
                }
            };
            let is_final = report.state.is_final();
            let done = hub
                .store
                .report_queued(st.job_id.clone(), st.epoch, agent.to_string(), report)
                .await
                .map_err(internal)?;
            let hub = hub.clone();
            return Ok(Some(Box::pin(async move {
                match done.await {
                    Ok(job) => {
                        info!(job = %job.id, epoch = job.epoch, state = job.state.as_str(), exit_code = ?job.exit_code, "job status");
                        hub.changed();
                        if !is_final {
                            return Ok(None);
                        }
                        // The session loop frees the slot once the ack is
                        // queued.
                        Ok(Some(Out::StatusAck(pb::StatusAck {
                            job_id: job.id,
                            epoch: job.epoch,
                            state: wire::state_to_pb(job.state) as i32,
                        })))
                    }
                    Err(e @ (StoreError::Stale { .. } | StoreError::NotFound(_))) => {
                        Ok(Some(refusal(st.job_id, st.epoch, e.to_string())))
                    }
                    Err(e) => Err(internal(e)),
                }
            })));
        }
        In::Drain(d) => {
            info!(reason = %d.reason, "agent is draining");
            hub.set_draining(agent);
            // What operators see (`outpost agents`) says so too.
            hub.store
                .set_agent_draining(agent.to_string())
                .await
                .map_err(internal)?;
            hub.changed();
        }
        In::Artifact(a) => {
            match hub
                .store
                .record_artifact(agent.to_string(), wire::artifact_from_pb(&a))
                .await
            {
                Ok(rec) => {
                    info!(job = %rec.job_id, epoch = rec.epoch, path = %rec.path, bucket = %rec.bucket, key = %rec.key, size = rec.size, "artifact recorded");
                    hub.changed();
                }
                Err(e @ (StoreError::Stale { .. } | StoreError::NotFound(_))) => {
                    warn!(job = %a.job_id, epoch = a.epoch, path = %a.path, error = %e, "artifact report refused");
                    refuse(tx, a.job_id, a.epoch, e.to_string()).await?
                }
                Err(e) => return Err(internal(e)),
            }
        }
        In::LeaseRejected(r) => {
            warn!(job = %r.job_id, epoch = r.epoch, reason = %r.reason, permanent = r.permanent, "agent declined a lease");
            if r.permanent {
                hub.store
                    .lease_not_taken(r.job_id, r.epoch, agent.to_string(), r.reason)
                    .await
                    .map_err(internal)?;
            } else {
                hub.store
                    .requeue(r.job_id, r.epoch, agent.to_string())
                    .await
                    .map_err(internal)?;
            }
            hub.changed();
            hub.slot_free(agent);
            hub.kick();
        }
    }
    Ok(None)
}

async fn refuse(tx: &AgentTx, job_id: String, epoch: u64, reason: String) -> Result<(), Status> {
    out(tx, refusal(job_id, epoch, reason)).await
}

fn refusal(job_id: String, epoch: u64, reason: String) -> Out {
    debug!(job = %job_id, epoch, reason = %reason, "refused a message");
    Out::Refused(pb::Refused {
        job_id,
        epoch,
        reason,
    })
}
