//! Agent identity: enrolment with a one-time bootstrap token and a CSR,
//! short-lived certificates renewed over the live session, revocation, and
//! labels bound to the enrolment. Real mTLS, real Docker.

use std::time::{Duration, Instant};

use outpost::hub::LeaseTiming;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_proto::identity::v1 as idpb;
use outpost_tests::{Captured, Cluster, is_final, numbered_job, spec, state};

fn capture_logs() -> Captured {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(captured.clone())
        .with_ansi(false)
        .init();
    captured
}

fn selecting(command: &[&str], labels: &[(&str, &str)]) -> pb::JobSpec {
    let mut s = spec(command);
    s.selector = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_runs_a_job_and_its_token_cannot_be_used_again() {
    let c = Cluster::start().await;
    let token = c.bootstrap_token("tf", &[("env", "dev")], 1).await;
    let cfg = c.enrolling_agent_config("enrolled-1", &token, &[("env", "dev")], 1);
    let token_file = cfg.bootstrap_token_file.clone().unwrap();
    let key = cfg.tls.key.clone();
    let agent = c.start_agent_with(cfg).await;
    // The key was made on the agent's host, private; the spent token is gone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!token_file.exists(), "the used token file is removed");

    let id = c
        .submit_spec(selecting(&["echo", "enrolled"], &[("env", "dev")]))
        .await;
    let j = c.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(j.agent_id, "enrolled-1");
    assert_eq!(c.logs(&id).await, b"enrolled\n");

    // The token cannot be used a second time, for any name.
    let e = c.enroll(&token, "enrolled-2").await.err().expect("refused");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("already used"), "{e:?}");
    let e = c
        .enroll("opb_not-a-token", "enrolled-2")
        .await
        .err()
        .expect("refused");
    assert!(e.message().contains("unknown bootstrap token"), "{e:?}");

    // `outpost agents` shows the enrolment.
    let ids = c
        .identity_admin()
        .await
        .list_identities(idpb::ListIdentitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .identities;
    let me = ids.iter().find(|i| i.agent_name == "enrolled-1").unwrap();
    assert_eq!(me.pool, "tf");
    assert_eq!(me.revoked_ms, 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_can_only_enrol() {
    let c = Cluster::start().await;
    let ch = c.anonymous_channel().await;
    let e = admin::admin_service_client::AdminServiceClient::new(ch.clone())
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = idpb::identity_admin_client::IdentityAdminClient::new(ch.clone())
        .create_enrollment(idpb::CreateEnrollmentRequest {
            pool: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello::default())),
    })
    .await
    .unwrap();
    let e = pb::agent_service_client::AgentServiceClient::new(ch.clone())
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("no session without a certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = outpost_proto::iac::v1::iac_agent_client::IacAgentClient::new(ch)
        .fetch_blob(outpost_proto::iac::v1::FetchBlobRequest::default())
        .await
        .expect_err("no IaC call without a certificate");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_claiming_a_label_outside_its_enrolment_gets_no_job_selecting_it() {
    let c = Cluster::start().await;
    let token = c.bootstrap_token("tf", &[("env", "dev")], 1).await;
    let id = c.enroll(&token, "claimer").await.expect("enrolled");
    let hello = pb::Hello {
        agent_id: "claimer".into(),
        labels: [("env", "dev"), ("gpu", "yes")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        capacity: 4,
        ..Default::default()
    };
    let mut raw = c
        .raw_agent_as(&id.cert, &id.key, hello)
        .await
        .expect("session");
    assert_eq!(raw.welcome.ignored_labels, vec!["gpu=yes".to_string()]);
    assert_eq!(
        raw.welcome.labels.get("env").map(String::as_str),
        Some("dev")
    );
    assert!(!raw.welcome.labels.contains_key("gpu"));

    let mut gpu = selecting(&["echo", "gpu"], &[("gpu", "yes")]);
    gpu.queue_timeout_ms = 3000;
    let gpu_job = c.submit_spec(gpu).await;
    let dev_job = c
        .submit_spec(selecting(&["echo", "dev"], &[("env", "dev")]))
        .await;
    // The job it may take comes; the other never does.
    let leased = raw
        .recv_until(Duration::from_secs(30), |m| match m {
            pb::server_message::Msg::Lease(l) => Some(l.job_id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(leased, dev_job);
    let j = c.wait_final(&gpu_job, Duration::from_secs(30)).await;
    assert_eq!(state(&j), pb::JobState::TimedOut, "{j:?}");
    assert!(j.message.contains("gpu=yes"), "{}", j.message);
    let listed = c
        .client()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let me = listed.iter().find(|a| a.agent_id == "claimer").unwrap();
    assert!(!me.labels.contains_key("gpu"), "{me:?}");
}

/// Renewal count seen by the operator: distinct certificate expiries.
async fn cert_expiry(c: &Cluster, name: &str) -> Option<u64> {
    c.identity_admin()
        .await
        .list_identities(idpb::ListIdentitiesRequest {})
        .await
        .ok()?
        .into_inner()
        .identities
        .into_iter()
        .find(|i| i.agent_name == name)
        .map(|i| i.cert_not_after_ms)
}

fn micros_after(text: &str, marker: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            let at = l.find("took_us=")? + "took_us=".len();
            l[at..]
                .split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_certificates_renew_live_while_a_long_job_streams() {
    let logs = capture_logs();
    let mut c = Cluster::start().await;
    c.identity.agent_cert_ttl = Duration::from_secs(10);
    c.restart_server().await;
    let token = c.bootstrap_token("tf", &[("env", "dev")], 1).await;
    let cfg = c.enrolling_agent_config("renewer", &token, &[("env", "dev")], 1);
    let agent = c.start_agent_with(cfg).await;

    // 60 s of output, a line every 100 ms.
    let (cmd, expected) = numbered_job(600, "0.1");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let id = c.submit_spec(selecting(&cmd, &[("env", "dev")])).await;
    c.wait_state(&id, Duration::from_secs(30), |j| {
        state(j) == pb::JobState::Running
    })
    .await;
    let started = Instant::now();
    let mut expiries = std::collections::BTreeSet::new();
    let mut restarted = false;
    let mut seen_disconnected = 0u32;
    let deadline = started + Duration::from_secs(150);
    loop {
        if let Some(e) = cert_expiry(&c, "renewer").await {
            expiries.insert(e);
        }
        // Halfway, the control plane restarts: the agent comes back with
        // its renewed certificate (the first one expired long ago).
        if !restarted && started.elapsed() > Duration::from_secs(30) {
            c.restart_server().await;
            restarted = true;
        }
        let j = c.job(&id).await;
        if is_final(&j) {
            break;
        }
        if !c
            .client()
            .await
            .list_agents(admin::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents
            .iter()
            .any(|a| a.agent_id == "renewer" && a.connected)
        {
            seen_disconnected += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the job did not end in time: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let j = c.wait_final(&id, Duration::from_secs(10)).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(j.epoch, 1, "the job ran under one lease: {j:?}");
    // Not one byte lost or duplicated.
    assert_eq!(c.logs(&id).await, expected);
    // Enrolment plus at least five renewals over the live session.
    assert!(expiries.len() >= 6, "renewals seen: {}", expiries.len() - 1);
    let text = logs.text();
    let sessions = text.matches("connected to the control plane").count();
    // The first session and the one after the restart: no reconnect storm.
    assert!(sessions <= 3, "{sessions} sessions");
    assert!(
        seen_disconnected <= 20,
        "the agent was seen disconnected {seen_disconnected} times"
    );
    let mut server_side: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("certificate renewed") && !l.contains("next connection"))
        .filter_map(|l| micros_after(l, "certificate renewed").first().copied())
        .collect();
    server_side.sort_unstable();
    let round_trip: Vec<u64> = {
        let mut v = micros_after(&text, "used from the next connection");
        v.sort_unstable();
        v
    };
    eprintln!(
        "renewals: {}; server-side cost (us, sorted): {server_side:?}; agent round trip (us, sorted): {round_trip:?}",
        expiries.len() - 1
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_off_and_its_job_runs_again_elsewhere() {
    let mut c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(8),
        heartbeat: Duration::from_secs(1),
        sweep: Duration::from_millis(200),
    })
    .await;
    c.identity.agent_cert_ttl = Duration::from_secs(3600);
    let token = c.bootstrap_token("tf", &[("env", "dev")], 3).await;
    let first = c
        .start_agent_with(c.enrolling_agent_config("first", &token, &[("env", "dev")], 1))
        .await;
    let (cmd, _) = numbered_job(40, "0.25");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let id = c.submit_spec(selecting(&cmd, &[("env", "dev")])).await;
    let j = c
        .wait_state(&id, Duration::from_secs(30), |j| {
            state(j) == pb::JobState::Running
        })
        .await;
    assert_eq!((j.agent_id.as_str(), j.epoch), ("first", 1));
    let second = c
        .start_agent_with(c.enrolling_agent_config("second", &token, &[("env", "dev")], 1))
        .await;

    // A scripted session of a third enrolled agent shows when the cut bites.
    let third = c.enroll(&token, "third").await.expect("enrolled");
    let mut raw = c
        .raw_agent_as(
            &third.cert,
            &third.key,
            pb::Hello {
                agent_id: "third".into(),
                capacity: 0,
                ..Default::default()
            },
        )
        .await
        .expect("session");
    let mut admin = c.identity_admin().await;
    admin
        .revoke_agent(idpb::RevokeAgentRequest {
            agent_name: "third".into(),
        })
        .await
        .expect("revoke third");
    let revoked_at = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the revoked session ends");
    let bite = revoked_at.elapsed();
    let status = ended.expect("the session ends with a status");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    assert!(bite < Duration::from_secs(1), "revocation took {bite:?}");
    eprintln!("revocation bit after {bite:?}");

    // Revoke the agent running the job.
    let r = admin
        .revoke_agent(idpb::RevokeAgentRequest {
            agent_name: "first".into(),
        })
        .await
        .expect("revoke first")
        .into_inner();
    assert!(r.was_connected);
    c.wait_agent_connected("first", false, Duration::from_secs(5))
        .await;
    // Its next connection is refused (with its certificate, whatever it says).
    let first_cfg_dir = c.dir.path().join("agents/first/identity");
    let e = c
        .raw_agent_as(
            &first_cfg_dir.join("agent.pem"),
            &first_cfg_dir.join("agent.key"),
            pb::Hello {
                agent_id: "first".into(),
                ..Default::default()
            },
        )
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // The job runs again on the other agent, under a higher epoch.
    let j = c
        .wait_state(&id, Duration::from_secs(60), |j| {
            j.epoch >= 2 && j.agent_id == "second"
        })
        .await;
    assert!(j.epoch >= 2);
    let j = c.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert!(
        c.logs_of_epoch(&id, j.epoch)
            .await
            .ends_with(b"line 40 of 40\n")
    );
    // Revocation survives a restart.
    c.restart_server().await;
    let ids = c
        .identity_admin()
        .await
        .list_identities(idpb::ListIdentitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .identities;
    assert!(
        ids.iter()
            .find(|i| i.agent_name == "first")
            .is_some_and(|i| i.revoked_ms > 0)
    );
    let e = c
        .raw_agent_as(
            &first_cfg_dir.join("agent.pem"),
            &first_cfg_dir.join("agent.key"),
            pb::Hello::default(),
        )
        .await
        .err()
        .expect("still refused after a restart");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    second.stop().await;
    first.stop().await;
}
