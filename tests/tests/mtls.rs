//! The control plane speaks mTLS only and authorises by certificate role.

use std::time::Duration;

use outpost::client::ClientConfig;
use outpost::identity::Role;
use outpost::pki::PkiDir;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_proto::agent::v1::agent_service_client::AgentServiceClient;
use outpost_tests::Cluster;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

async fn list_jobs_with(cfg: &ClientConfig) -> Result<(), String> {
    let mut c = cfg.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    c.list_jobs(admin::ListJobsRequest {
        limit: 1,
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_certificate_is_accepted() {
    let c = Cluster::start().await;
    list_jobs_with(&c.client_config())
        .await
        .expect("admin may list jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let c = Cluster::start().await;
    let ca = std::fs::read(c.state.pki().ca_cert()).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let ep = Endpoint::from_shared(c.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let result = match ep.connect().await {
        Err(e) => Err(format!("{e:?}")),
        Ok(ch) => admin::admin_service_client::AdminServiceClient::new(ch)
            .list_jobs(admin::ListJobsRequest {
                limit: 1,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}")),
    };
    assert!(
        result.is_err(),
        "a client without a certificate must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let c = Cluster::start().await;
    let other = tempfile::tempdir().unwrap();
    let pki = PkiDir::new(other.path().join("pki"));
    pki.init(&[]).unwrap();
    let foreign = pki.issue(Role::Admin, "admin").unwrap();
    let mut cfg = c.client_config();
    cfg.cert = foreign.cert;
    cfg.key = foreign.key;
    let r = list_jobs_with(&cfg).await;
    assert!(
        r.is_err(),
        "a foreign CA's admin certificate must be refused"
    );
    // And a client that trusts the foreign CA cannot verify our server.
    let mut cfg = c.client_config();
    cfg.ca = pki.ca_cert();
    assert!(list_jobs_with(&cfg).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_cannot_call_the_admin_api() {
    let c = Cluster::start().await;
    let agent = c.state.pki().issued(Role::Agent, "local");
    let mut cfg = c.client_config();
    cfg.cert = agent.cert;
    cfg.key = agent.key;
    let err = list_jobs_with(&cfg)
        .await
        .expect_err("agent cert on admin API");
    assert!(err.starts_with("PermissionDenied"), "{err}");
    assert!(err.contains("agent certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_certificate_cannot_act_as_an_agent() {
    let c = Cluster::start().await;
    let cfg = c.client_config();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&cfg.ca).unwrap()))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&cfg.cert).unwrap(),
            std::fs::read(&cfg.key).unwrap(),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(c.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: "impostor".into(),
            capacity: 1,
            ..Default::default()
        })),
    };
    let r = AgentServiceClient::new(ch)
        .session(tokio_stream::iter(vec![hello]))
        .await;
    let s = r.expect_err("admin cert opening an agent session");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
}
