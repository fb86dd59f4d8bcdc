//! A scripted agent session over real mTLS (`RawAgent`), with an issued
//! or an enrolled certificate, for protocol faults.

use std::path::Path;
use std::time::Duration;

use outpost_proto::agent::v1 as pb;

use crate::*;

/// Opens a scripted agent session to the control plane at `url` (its CA
/// in `ca`) with the certificate in `cert` and `key`, sends `hello` and
/// waits for the welcome. A connection that cannot be made is
/// `Unavailable` with its cause; what the server refuses is its status.
pub async fn raw_session(
    url: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    hello: pb::Hello,
) -> Result<RawAgent, tonic::Status> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(ca).expect("ca"),
        ))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(cert).expect("cert"),
            std::fs::read(key).expect("key"),
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(error_chain(&e)))?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(hello)),
    })
    .await
    .expect("queue hello");
    let mut inbound = pb::agent_service_client::AgentServiceClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
        .await
        .expect("a welcome within 30s")?;
    match first.and_then(|m| m.msg) {
        Some(pb::server_message::Msg::Welcome(welcome)) => Ok(RawAgent {
            tx,
            inbound,
            welcome,
        }),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Whose certificate a scripted agent session presents.
pub enum RawIdentity<'a> {
    /// The agent certificate of this name, issued by the cluster's CA if
    /// missing.
    Issued(&'a str),
    /// A certificate and key already on disk (e.g. enrolled).
    Files { cert: &'a Path, key: &'a Path },
}

/// A scripted agent session over real mTLS: the test decides every message.
pub struct RawAgent {
    pub tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    pub inbound: tonic::Streaming<pb::ServerMessage>,
    pub welcome: pb::Welcome,
}

impl RawAgent {
    pub async fn send(&self, msg: pb::agent_message::Msg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .expect("the session is open");
    }

    /// Receives until `pick` returns something (bounded); panics with every
    /// message seen meanwhile.
    pub async fn recv_until<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(&pb::server_message::Msg) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let m = tokio::time::timeout_at(deadline, self.inbound.message())
                .await
                .unwrap_or_else(|_| panic!("nothing expected arrived in {limit:?}; saw {seen:#?}"));
            match m {
                Ok(Some(pb::ServerMessage { msg: Some(m) })) => {
                    if let Some(t) = pick(&m) {
                        return t;
                    }
                    seen.push(m);
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("the session ended; saw {seen:#?}"),
                Err(s) => panic!("the session failed: {s:?}; saw {seen:#?}"),
            }
        }
    }
}
