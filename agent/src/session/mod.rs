//! The agent's one outbound connection: mTLS gRPC to the control plane, one
//! bidirectional session stream, reconnects with jittered exponential backoff.
//! With several control plane addresses (replicas), each reconnect goes to
//! the next one (`addresses`); the hello re-presents the leases this agent
//! holds wherever it lands, so any replica resumes them.
//!
//! **Invariant:** every connection to the control plane is initiated here;
//! the agent's only listening socket is the operator's opt-in metrics
//! endpoint (`crate::observe::http`, `metrics_listen`).

mod addresses;
mod route;

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_proto::agent::v1 as pb;
use outpost_proto::agent::v1::agent_message::Msg as Out;
use outpost_proto::agent::v1::agent_service_client::AgentServiceClient;
use outpost_proto::agent::v1::server_message::Msg as In;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use tracing::{debug, error, info, warn};

use crate::config::AgentConfig;
use crate::identity::{Identity, Renewal};
use crate::runtime::Runtime;
use crate::wire;

use addresses::Addresses;
pub use route::IacRoute;

/// What a session works with.
pub struct Link {
    pub cfg: Arc<AgentConfig>,
    pub rt: Arc<Runtime>,
    /// Set when the agent enrols (`bootstrap_token_file`).
    pub ident: Option<Arc<Identity>>,
    /// The IaC calls' channel: follows the session's address and renewals.
    pub iac: Arc<IacRoute>,
}

/// Errors of one session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("failed to read {what} {path}")]
    ReadTls {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid control plane endpoint {url}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("failed to connect to the control plane")]
    Connect(#[source] tonic::transport::Error),
    #[error("the control plane refused the session: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the control plane closed the session before welcoming the agent")]
    NoWelcome,
    #[error(
        "this agent could not read a message from the control plane (it reads at most {limit} bytes); any lease in it is re-offered and the control plane ends its job after a few tries: {message}"
    )]
    Unreadable { limit: usize, message: String },
    #[error("the session stream broke: {0}")]
    Stream(#[source] tonic::Status),
    #[error("the session's send queue closed")]
    Closed,
}

/// Builds the mTLS channel endpoint to the control plane at `server`.
pub fn endpoint(cfg: &AgentConfig) -> Result<Endpoint, SessionError> {
    endpoint_at(cfg, &cfg.server)
}

/// Builds the mTLS channel endpoint to the control plane at `url` (one of
/// [`AgentConfig::addresses`]).
pub fn endpoint_at(cfg: &AgentConfig, url: &str) -> Result<Endpoint, SessionError> {
    let read = |what, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| SessionError::ReadTls {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("CA certificate", &cfg.tls.ca)?))
        .identity(TlsIdentity::from_pem(
            read("agent certificate", &cfg.tls.cert)?,
            read("agent key", &cfg.tls.key)?,
        ))
        .domain_name(cfg.server_name_for(url));
    let ep = Endpoint::from_shared(url.to_string())
        .and_then(|e| e.tls_config(tls))
        .map_err(|source| SessionError::Endpoint {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(ep)
}

/// Keeps a session open until `stop` is cancelled: connects to the control
/// plane's addresses in turn, with jittered exponential backoff.
pub async fn maintain(link: Link, drain: CancellationToken, stop: CancellationToken) {
    let Link { cfg, rt, ident, .. } = &link;
    let mut addrs = Addresses::new(cfg.addresses(), cfg.max_backoff);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let url = addrs.current().to_string();
        match connect(cfg, ident.as_deref(), &url).await {
            Ok(channel) => {
                addrs.established(Instant::now());
                link.iac.follow(&url);
                let ended = session(&link, &url, channel, &drain, &stop).await;
                rt.metrics.session_down();
                match ended {
                    Ok(()) => debug!(server = %url, "session ended"),
                    Err(e) => warn!(server = %url, error = %e, "session ended"),
                }
            }
            Err(SessionError::Connect(e)) => {
                warn!(server = %url, error = %e, source = ?std::error::Error::source(&e), "cannot reach the control plane")
            }
            // Running jobs carry on until their leases end them.
            Err(e) => error!(server = %url, error = %e, "cannot connect to the control plane"),
        }
        if stop.is_cancelled() {
            return;
        }
        let wait = addrs.failed(Instant::now());
        let jittered = rand::rng().random_range(wait / 2..=wait);
        debug!(delay_ms = jittered.as_millis() as u64, next = %addrs.current(), "reconnecting");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
    }
}

/// Dials `url` with the agent's current certificate.
async fn connect(
    cfg: &AgentConfig,
    ident: Option<&Identity>,
    url: &str,
) -> Result<Channel, SessionError> {
    // Read for every connection: an enrolled agent's certificate is
    // replaced by each renewal (and by a new enrolment once expired).
    if let Some(id) = ident {
        id.ensure().await?;
    }
    endpoint_at(cfg, url)?
        .connect()
        .await
        .map_err(SessionError::Connect)
}

fn msg(m: Out) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

async fn session(
    link: &Link,
    url: &str,
    channel: Channel,
    drain: &CancellationToken,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let (cfg, rt, ident) = (&link.cfg, &link.rt, link.ident.as_deref());
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(outpost_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(outpost_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    let hello = pb::Hello {
        agent_id: cfg.agent_id.clone().unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        labels: cfg.iac.advertised_labels(&cfg.labels).into_iter().collect(),
        capacity: cfg.capacity,
        capabilities: vec!["log-ack".into(), "status-ack".into()],
        running: rt.leases().iter().map(wire::key_to_pb).collect(),
        draining: rt.is_draining(),
    };
    tx.send(msg(Out::Hello(hello)))
        .await
        .map_err(|_| SessionError::Closed)?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = match tokio::time::timeout(Duration::from_secs(15), inbound.next()).await {
        Ok(Some(Ok(pb::ServerMessage {
            msg: Some(In::Welcome(w)),
        }))) => w,
        Ok(Some(Err(status))) => return Err(inbound_error(status)),
        _ => return Err(SessionError::NoWelcome),
    };
    for r in &welcome.resumed {
        if let Some(l) = &r.lease {
            rt.resume(
                &wire::key_from_pb(l),
                r.acked_offset,
                Duration::from_millis(r.ttl_ms),
            );
        }
    }
    for l in &welcome.revoked {
        rt.revoke(
            &wire::key_from_pb(l),
            "the control plane no longer honours this lease",
        );
    }
    if !welcome.ignored_labels.is_empty() {
        warn!(ignored = %welcome.ignored_labels.join(","), "the control plane ignores labels this agent's enrolment does not allow");
    }
    let mut renewal = Renewal::start(ident);
    let heartbeat = Duration::from_millis(welcome.heartbeat_interval_ms.clamp(200, 60_000));
    info!(server = %url, agent = %welcome.agent_id, resumed = welcome.resumed.len(), "connected to the control plane");
    rt.metrics.session_up();
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_sent = false;
    let mut seq: u64 = 0;
    loop {
        if drain.is_cancelled() && !drain_sent {
            rt.start_draining();
            tx.send(msg(Out::Drain(pb::DrainNotice {
                reason: "agent is shutting down".into(),
            })))
            .await
            .map_err(|_| SessionError::Closed)?;
            drain_sent = true;
        }
        // Flush what is pending before waiting.
        loop {
            let outbox = rt.outbox(256 * 1024);
            for mut m in outbox.messages {
                if let Out::Log(c) = &mut m {
                    seq += 1;
                    c.seq = seq;
                }
                tx.send(msg(m)).await.map_err(|_| SessionError::Closed)?;
            }
            if !outbox.more {
                break;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = drain.cancelled(), if !drain_sent => {}
            _ = rt.wake.notified() => {}
            _ = renewal.due() => {
                if let Some(id) = ident {
                    renew(id, &mut renewal, &tx).await?;
                }
            }
            _ = ticker.tick() => {
                let hb = pb::Heartbeat {
                    leases: rt.leases().iter().map(wire::key_to_pb).collect(),
                    free_slots: rt.free_slots(),
                };
                tx.send(msg(Out::Heartbeat(hb))).await.map_err(|_| SessionError::Closed)?;
            }
            m = inbound.next() => {
                let m = match m {
                    None => return Ok(()),
                    Some(Err(status)) => return Err(inbound_error(status)),
                    Some(Ok(m)) => m,
                };
                let about_identity =
                    matches!(m.msg, Some(In::CertificateRenewed(_) | In::RenewalRefused(_)));
                if let Some(id) = ident
                    && about_identity
                {
                    renewed(id, &link.iac, &mut renewal, m);
                    continue;
                }
                handle(rt, &tx, m).await?;
            }
        }
    }
}

/// Asks for the next certificate over the live session.
async fn renew(
    id: &Identity,
    renewal: &mut Renewal,
    tx: &mpsc::Sender<pb::AgentMessage>,
) -> Result<(), SessionError> {
    match id.renewal_csr() {
        Ok(csr_pem) => {
            renewal.sent(id);
            tx.send(msg(Out::RenewCertificate(pb::RenewCertificate { csr_pem })))
                .await
                .map_err(|_| SessionError::Closed)
        }
        Err(e) => {
            warn!(error = %e, "cannot make the certificate renewal request");
            renewal.retry_later(id);
            Ok(())
        }
    }
}

/// The control plane's answer to a renewal.
fn renewed(id: &Identity, iac: &IacRoute, renewal: &mut Renewal, m: pb::ServerMessage) {
    match m.msg {
        Some(In::CertificateRenewed(c)) => match id.renewed(&c.certificate_pem) {
            Ok(()) => {
                iac.refresh();
                let took = renewal.done(Duration::from_millis(c.ttl_ms));
                info!(
                    ttl_ms = c.ttl_ms,
                    took_us = took.map(|d| d.as_micros() as u64),
                    "certificate renewed; used from the next connection"
                );
            }
            Err(e) => {
                warn!(error = %e, "cannot keep the renewed certificate");
                renewal.retry_later(id);
            }
        },
        Some(In::RenewalRefused(r)) => {
            warn!(reason = %r.reason, "the control plane refused to renew the certificate");
            renewal.retry_later(id);
        }
        _ => {}
    }
}

/// An error on the stream from the control plane: a message this agent
/// could not decode is its own limit, not the control plane refusing it.
fn inbound_error(status: tonic::Status) -> SessionError {
    if status.code() == tonic::Code::OutOfRange {
        return SessionError::Unreadable {
            limit: outpost_proto::MAX_MESSAGE_BYTES,
            message: status.message().to_string(),
        };
    }
    SessionError::Stream(status)
}

async fn handle(
    rt: &Arc<Runtime>,
    tx: &mpsc::Sender<pb::AgentMessage>,
    m: pb::ServerMessage,
) -> Result<(), SessionError> {
    let Some(m) = m.msg else { return Ok(()) };
    match m {
        // An agent that does not enrol never asks for a certificate.
        In::Welcome(_) | In::CertificateRenewed(_) | In::RenewalRefused(_) => {}
        In::Lease(l) => {
            let job_id = l.job_id.clone();
            let epoch = l.epoch;
            // A lease this agent cannot even read is declined for good (the
            // control plane ends the job after a few); anything else
            // (capacity, draining, local disk) is a passing refusal.
            let (result, permanent) = match wire::lease_from_pb(l.clone()) {
                Err(e) => (
                    Err(format!("the lease is not valid for this agent: {e}")),
                    true,
                ),
                Ok(_) => (accept(rt, l).await, false),
            };
            if let Err(reason) = result {
                warn!(job = %job_id, epoch, reason = %reason, permanent, "declining a lease");
                tx.send(msg(Out::LeaseRejected(pb::LeaseRejected {
                    job_id,
                    epoch,
                    reason,
                    permanent,
                })))
                .await
                .map_err(|_| SessionError::Closed)?;
            }
        }
        In::LogAck(a) => rt.log_acked(
            &crate::job::LeaseKey {
                job_id: a.job_id,
                epoch: a.epoch,
            },
            a.offset,
        ),
        In::StatusAck(a) => rt.status_acked(&crate::job::LeaseKey {
            job_id: a.job_id,
            epoch: a.epoch,
        }),
        In::Cancel(c) => {
            info!(job = %c.job_id, epoch = c.epoch, reason = %c.reason, "cancel received");
            rt.cancel(
                &crate::job::LeaseKey {
                    job_id: c.job_id,
                    epoch: c.epoch,
                },
                &c.reason,
            );
        }
        In::HeartbeatAck(a) => {
            for r in &a.renewed {
                if let Some(l) = &r.lease {
                    rt.renewed(&wire::key_from_pb(l), Duration::from_millis(r.ttl_ms));
                }
            }
            for l in &a.revoked {
                rt.revoke(
                    &wire::key_from_pb(l),
                    "lease not renewed by the control plane",
                );
            }
        }
        In::Drain(d) => {
            info!(reason = %d.reason, "drain requested by the control plane");
            rt.start_draining();
            tx.send(msg(Out::Drain(pb::DrainNotice { reason: d.reason })))
                .await
                .map_err(|_| SessionError::Closed)?;
        }
        In::Refused(r) => {
            rt.revoke(
                &crate::job::LeaseKey {
                    job_id: r.job_id,
                    epoch: r.epoch,
                },
                &r.reason,
            );
        }
    }
    Ok(())
}

/// Accepts a lease on the blocking pool: the spool's lease record and the
/// container's lease file are written and synced to disk, and those writes
/// must not hold one of the few async worker threads (other jobs' output,
/// the live loop) meanwhile. Leases are still accepted in the order they
/// came.
async fn accept(rt: &Arc<Runtime>, lease: pb::Lease) -> Result<(), String> {
    let rt = rt.clone();
    tokio::task::spawn_blocking(move || rt.accept(lease))
        .await
        .unwrap_or_else(|e| Err(format!("accepting the lease failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_message_is_this_agents_limit_not_a_refusal() {
        let too_large = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 4194400 bytes, the limit is: 4194304 bytes",
        );
        let e = inbound_error(too_large).to_string();
        assert!(e.contains("this agent could not read"), "{e}");
        assert!(!e.contains("refused"), "{e}");
        let e = inbound_error(tonic::Status::unavailable("gone")).to_string();
        assert!(e.contains("stream broke") && !e.contains("refused"), "{e}");
    }
}
