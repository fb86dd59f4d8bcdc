//! The control plane speaks mTLS only and authorises by certificate role.

use std::time::Duration;

use outpost::client::ClientConfig;
use outpost::identity::Role;
use outpost::pki::PkiDir;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_proto::agent::v1::agent_service_client::AgentServiceClient;
use outpost_tests::{Captured, Cluster, error_chain, tls_messages};
use rustls::CertificateError;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

type AnyError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Connects with `cfg` and lists jobs; the error, whichever step failed.
async fn try_list_jobs(cfg: &ClientConfig) -> Result<(), AnyError> {
    let mut c = cfg.connect().await?;
    c.list_jobs(admin::ListJobsRequest {
        limit: 1,
        ..Default::default()
    })
    .await?;
    Ok(())
}

async fn list_jobs_with(cfg: &ClientConfig) -> Result<(), String> {
    try_list_jobs(cfg)
        .await
        .map_err(|e| match e.downcast::<tonic::Status>() {
            Ok(s) => format!("{:?}: {}", s.code(), s.message()),
            Err(e) => format!("connect: {}", error_chain(&*e)),
        })
}

/// Asserts that `e` is the TLS layer saying one of `expected`, not any
/// other failure.
fn assert_tls(e: &(dyn std::error::Error + 'static), expected: &[rustls::Error]) {
    let said = tls_messages(e);
    assert!(
        expected.iter().any(|x| said.contains(&x.to_string())),
        "expected TLS to say one of {expected:?}; it said {said:?}: {}",
        error_chain(e)
    );
}

/// Captures the control plane's debug log (the TLS layer logs refused
/// handshakes there).
fn capture_logs() -> Captured {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,tonic=debug"))
        .with_writer(captured.clone())
        .with_ansi(false)
        .init();
    captured
}

/// The server's "tls accept error" log lines.
fn refused_handshakes(logs: &Captured) -> Vec<String> {
    logs.text()
        .lines()
        .filter(|l| l.contains("tls accept error"))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) for the server to log a refused handshake (its accept
/// task may log after the client already saw the connection fail).
async fn wait_refused_handshakes(logs: &Captured) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let refused = refused_handshakes(logs);
        if !refused.is_empty() || std::time::Instant::now() > deadline {
            return refused;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_certificate_is_accepted() {
    let c = Cluster::start().await;
    list_jobs_with(&c.client_config())
        .await
        .expect("admin may list jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let logs = capture_logs();
    let c = Cluster::start().await;
    let other = tempfile::tempdir().unwrap();
    let pki = PkiDir::new(other.path().join("pki"));
    pki.init(&[]).unwrap();
    let foreign = pki.issue(Role::Admin, "admin").unwrap();
    // Another CA with the same name as ours: the signature does not verify
    // (a CA of another name: the issuer is unknown).
    let refusals = [
        rustls::Error::InvalidCertificate(CertificateError::BadSignature),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
    ];
    let mut cfg = c.client_config();
    cfg.cert = foreign.cert;
    cfg.key = foreign.key;
    assert!(refused_handshakes(&logs).is_empty());
    // The server's handshake refuses a foreign CA's admin certificate (the
    // client only sees the connection close: TLS 1.3 ends the client's
    // handshake before the server checks its certificate).
    let e = try_list_jobs(&cfg).await.expect_err("must be refused");
    let refused = wait_refused_handshakes(&logs).await;
    assert!(
        !refused.is_empty()
            && refused
                .iter()
                .all(|l| refusals.iter().any(|r| l.contains(&r.to_string()))),
        "{refused:?}\n{}",
        error_chain(&*e)
    );
    // And a client that trusts the foreign CA cannot verify our server.
    let mut cfg = c.client_config();
    cfg.ca = pki.ca_cert();
    let e = try_list_jobs(&cfg).await.expect_err("must be refused");
    assert_tls(&*e, &refusals);
    // The same client with our CA gets through: only the CA differed.
    list_jobs_with(&c.client_config())
        .await
        .expect("our own CA's admin");
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

/// Starts a control plane whose server certificate comes from another CA
/// but which trusts the Outpost CA for client certificates: only the
/// client's own check of the server can refuse it. Returns its address.
async fn impostor_control_plane(
    c: &Cluster,
    dir: &std::path::Path,
) -> (
    String,
    PkiDir,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), outpost::server::ServerError>>,
) {
    let foreign = PkiDir::new(dir.join("foreign"));
    foreign.init(&[]).expect("impostor set-up");
    let mixed = PkiDir::new(dir.join("mixed"));
    std::fs::create_dir_all(dir.join("mixed")).expect("impostor set-up");
    std::fs::copy(c.state.pki().ca_cert(), mixed.ca_cert()).expect("impostor set-up");
    std::fs::copy(foreign.server().cert, mixed.server().cert).expect("impostor set-up");
    std::fs::copy(foreign.server().key, mixed.server().key).expect("impostor set-up");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("impostor set-up");
    let url = format!(
        "https://{}",
        listener.local_addr().expect("impostor set-up")
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let cfg = outpost::server::ServerConfig::new(dir.join("mixed"), dir.join("data"));
    let task = tokio::spawn(outpost::server::run(listener, cfg, stop.clone()));
    (url, foreign, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_control_plane_whose_certificate_is_not_from_the_outpost_ca() {
    let c = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (impostor, foreign, stop, task) = impostor_control_plane(&c, dir.path()).await;
    // The impostor would accept our admin (and agent) certificates.
    let mut admin = c.client_config();
    admin.server = impostor.clone();
    admin.ca = foreign.ca_cert();
    list_jobs_with(&admin)
        .await
        .expect("the impostor accepts Outpost client certificates");

    // The agent, pointed at it, refuses it in the handshake.
    let cfg = c.write_agent_config("a", 1, "", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace(&c.url(), &impostor)).unwrap();
    let mut agent = outpost_tests::spawn_agent_process("a", &cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let line = loop {
        let log = agent.log_text();
        let refusals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("cannot reach the control plane"))
            .collect();
        if refusals.len() >= 2 {
            break refusals[0].to_string();
        }
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the agent exited: {log}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not try the impostor:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        line.contains("InvalidCertificate(BadSignature)")
            || line.contains("InvalidCertificate(UnknownIssuer)"),
        "refused for the server's certificate: {line}"
    );
    // It never got as far as a session: the impostor has never seen it.
    let agents = admin
        .connect()
        .await
        .unwrap()
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(agents.is_empty(), "{agents:?}");

    // The same agent, pointed at the real control plane, connects.
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
    std::fs::write(&cfg, text).unwrap();
    let _agent = c.spawn_agent("a", &cfg).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_the_name_in_its_certificate_whatever_its_hello_says() {
    use pb::server_message::Msg as In;
    let c = Cluster::start().await;
    // Agent "b" holds a lease.
    let mut b = c
        .raw_agent(
            "b",
            pb::Hello {
                agent_id: "b".into(),
                capacity: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(b.welcome.agent_id, "b");
    let id = c.submit(&["true"]).await;
    let lease = b
        .recv_until(Duration::from_secs(30), |m| match m {
            In::Lease(l) if l.job_id == id => Some(l.clone()),
            _ => None,
        })
        .await;

    // Agent "a" says it is "b" and holds b's lease.
    let mut a = c
        .raw_agent(
            "a",
            pb::Hello {
                agent_id: "b".into(),
                capacity: 1,
                running: vec![pb::LeaseRef {
                    job_id: id.clone(),
                    epoch: lease.epoch,
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The control plane calls it "a", and does not give it b's lease.
    assert_eq!(a.welcome.agent_id, "a");
    assert!(a.welcome.resumed.is_empty(), "{:?}", a.welcome);
    assert_eq!(
        a.welcome.revoked,
        [pb::LeaseRef {
            job_id: id.clone(),
            epoch: lease.epoch
        }]
    );
    // Whatever it sends for the job is refused.
    a.send(pb::agent_message::Msg::Log(pb::LogChunk {
        job_id: id.clone(),
        epoch: lease.epoch,
        seq: 1,
        offset: 0,
        data: b"forged\n".to_vec(),
    }))
    .await;
    let refused = a
        .recv_until(Duration::from_secs(30), |m| match m {
            In::Refused(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!((refused.job_id.as_str(), refused.epoch), (id.as_str(), 1));
    let mut agents: Vec<(String, bool)> = c
        .client()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|x| (x.agent_id, x.connected))
        .collect();
    agents.sort();
    assert_eq!(agents, [("a".to_string(), true), ("b".to_string(), true)]);
    // b still holds its lease and finishes the job.
    b.send(pb::agent_message::Msg::Status(pb::JobStatus {
        job_id: id.clone(),
        epoch: lease.epoch,
        state: pb::JobState::Succeeded as i32,
        exit_code: Some(0),
        ..Default::default()
    }))
    .await;
    b.recv_until(Duration::from_secs(30), |m| match m {
        In::StatusAck(s) if s.job_id == id => Some(()),
        _ => None,
    })
    .await;
    let j = c.job(&id).await;
    assert_eq!(j.agent_id, "b");
    assert_eq!(j.state, pb::JobState::Succeeded as i32);
    assert_eq!(c.logs(&id).await, b"");
}
