//! Deployment: systemd notifications over a real `NOTIFY_SOCKET`, the
//! operator's metrics endpoint (parsed by the Prometheus reference parser),
//! start errors an operator must understand, and the EC2 Auto Scaling
//! termination hook completed by the agent itself (IMDSv2 and Auto Scaling
//! stand-ins on loopback).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_tests::ec2::{self, AutoScaling, Imds, http_get, parse_prometheus};
use outpost_tests::{Cluster, bin, spec, state};

/// Receives notifications until `until` holds for one (bounded).
fn recv_until(
    sock: &UnixDatagram,
    seen: &mut Vec<String>,
    limit: Duration,
    until: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no matching notification within {limit:?}; seen: {seen:#?}"
        );
        sock.set_read_timeout(Some(left)).expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            if until(&msg) {
                return msg;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_after_the_session_watchdog_and_drain_signals() {
    let cluster = Cluster::start().await;
    let config = cluster.write_agent_config("notify-agent", 1, "drain_grace = \"60s\"", "");
    let dir = config.parent().expect("dir").to_path_buf();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind NOTIFY_SOCKET");
    let log = dir.join("agent.log");
    // As systemd does: WATCHDOG_PID names the service's main process (the
    // shell execs the agent, so the pid is the agent's).
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
        .arg(bin("outpost-agent"))
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn agent");
    let mut seen = Vec::new();

    // READY=1 only once the control plane has the session.
    let sock2 = sock.try_clone().expect("clone");
    let ready = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let m = recv_until(&sock2, &mut seen, Duration::from_secs(30), |m| {
            m.lines().any(|l| l == "READY=1")
        });
        (m, seen)
    })
    .await
    .expect("join");
    seen.extend(ready.1);
    let agents = cluster
        .client()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .expect("agents")
        .into_inner()
        .agents;
    assert!(
        agents
            .iter()
            .any(|a| a.agent_id == "notify-agent" && a.connected),
        "READY=1 came before the session was up: {agents:?}"
    );
    assert!(ready.0.contains("STATUS=connected"), "{:?}", ready.0);
    assert!(
        seen.iter().filter(|m| m.contains("READY=1")).count() == 1,
        "{seen:?}"
    );

    // The live loop pings the watchdog (WATCHDOG_USEC=1s: every 0.5 s).
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        recv_until(&sock, &mut seen, Duration::from_secs(5), |m| {
            m.trim_end() == "WATCHDOG=1"
        });
        pings += 1;
    }
    assert!(started.elapsed() < Duration::from_secs(5), "{seen:?}");

    // A running job, then SIGTERM: STOPPING=1, EXTEND_TIMEOUT_USEC while the
    // job finishes, the job succeeds, the process exits 0.
    let id = cluster
        .submit(&["sh", "-c", "sleep 2; echo finished"])
        .await;
    cluster
        .wait_state(&id, Duration::from_secs(30), |j| {
            state(j) == pb::JobState::Running
        })
        .await;
    let term = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    term.expect("SIGTERM");
    let stopping = recv_until(&sock, &mut seen, Duration::from_secs(10), |m| {
        m.contains("STOPPING=1")
    });
    assert!(
        stopping.contains("STATUS=draining: 1 job running"),
        "{stopping:?}"
    );
    let extend = recv_until(&sock, &mut seen, Duration::from_secs(10), |m| {
        m.starts_with("EXTEND_TIMEOUT_USEC=")
    });
    let usec: u64 = extend["EXTEND_TIMEOUT_USEC=".len()..]
        .trim()
        .parse()
        .expect("usec");
    assert!(usec >= 10_000_000, "{extend}");
    let job = cluster.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    assert_eq!(cluster.logs(&id).await, b"finished\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "{status:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_during_a_running_job_parse_as_prometheus_text() {
    let cluster = Cluster::start().await;
    let mut cfg = cluster.agent_config(1);
    cfg.metrics_listen = Some("127.0.0.1:0".into());
    let state_dir = cfg.state_dir.clone();
    let agent = cluster.start_agent_with(cfg).await;
    let addr: std::net::SocketAddr = std::fs::read_to_string(state_dir.join("metrics.addr"))
        .expect("metrics.addr")
        .trim()
        .parse()
        .expect("addr");
    assert!(addr.ip().is_loopback());

    let id = cluster
        .submit(&["sh", "-c", "echo hello from the job; sleep 3"])
        .await;
    cluster
        .wait_state(&id, Duration::from_secs(30), |j| {
            state(j) == pb::JobState::Running
        })
        .await;
    // Scrape while it runs until its first line has been sent (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let during = loop {
        let (status, text) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        let m = parse_prometheus(&text);
        if m.get("outpost_agent_log_bytes_sent_total")
            .copied()
            .unwrap_or(0.0)
            >= 19.0
        {
            break m;
        }
        assert!(Instant::now() < deadline, "log bytes never counted: {m:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(during["outpost_agent_running_jobs"], 1.0, "{during:#?}");
    assert_eq!(during["outpost_agent_connected"], 1.0);
    assert_eq!(during["outpost_agent_draining"], 0.0);
    assert_eq!(
        during["outpost_agent_jobs_total{outcome=\"succeeded\"}"],
        0.0
    );
    for family in [
        "outpost_agent_lease_renewals_total",
        "outpost_agent_leases_revoked_total",
        "outpost_agent_spool_bytes",
        "outpost_agent_session_reconnects_total",
        "outpost_agent_docker_errors_total",
        "outpost_agent_credential_refreshes_total",
    ] {
        assert!(during.contains_key(family), "{family} missing: {during:#?}");
    }
    let (status, health) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).expect("health json");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["running_jobs"], 1);

    let job = cluster.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    // The outcome is counted once the job ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = parse_prometheus(&http_get(addr, "/metrics").await.1);
        if m["outpost_agent_jobs_total{outcome=\"succeeded\"}"] == 1.0
            && m["outpost_agent_running_jobs"] == 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "outcome not counted: {m:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The control plane's metrics: one agent, a pickup observed, a queue
    // for a label set no agent has.
    let mut unmatched = spec(&["true"]);
    unmatched.selector = [("pool".to_string(), "nowhere".to_string())].into();
    cluster.submit_spec(unmatched).await;
    let server_addr = cluster.server.as_ref().expect("server").metrics_addr;
    let (status, text) = http_get(server_addr, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let m = parse_prometheus(&text);
    assert_eq!(m["outpost_agents_connected"], 1.0, "{m:#?}");
    assert_eq!(
        m["outpost_queue_depth{selector=\"pool=nowhere\"}"], 1.0,
        "{m:#?}"
    );
    assert_eq!(m["outpost_pickup_latency_seconds_count"], 1.0, "{m:#?}");
    assert!(m["outpost_store_call_seconds_count"] > 0.0, "{m:#?}");
    agent.stop().await;
}

/// Runs the agent binary with `config` and `env`, expecting it to exit on
/// its own (bounded); returns the exit code and stderr.
async fn run_to_exit(config: &std::path::Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(bin("outpost-agent"));
    cmd.arg("--config").arg(config).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("the agent exits by itself")
        .expect("run agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_metrics_address_in_use_is_a_clear_error() {
    let cluster = Cluster::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config =
        cluster.write_agent_config("busy-port", 1, &format!("metrics_listen = \"{addr}\""), "");
    let (code, stderr) = run_to_exit(&config, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("metrics_listen {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_node_without_a_docker_socket_fails_fast_with_a_clear_message() {
    let cluster = Cluster::start().await;
    let config = cluster.write_agent_config("no-docker", 1, "", "");
    let started = Instant::now();
    let (code, stderr) = run_to_exit(
        &config,
        &[("DOCKER_HOST", "unix:///nonexistent/outpost/docker.sock")],
    )
    .await;
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains("no Docker engine socket at /nonexistent/outpost/docker.sock")
            && stderr.contains("containerd-only"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not fast: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asg_termination_drains_heartbeats_and_completes_the_hook_once() {
    let cluster = Cluster::start().await;
    let imds = Imds::start().await;
    // The first completion is refused: the agent must retry it.
    let asg = AutoScaling::start(1).await;
    let mut cfg = cluster.agent_config(2);
    cfg.drain_grace = Duration::from_secs(60);
    cfg.asg = Some(outpost_agent::lifecycle::AsgConfig {
        group_name: "outpost-pool".into(),
        hook_name: "outpost-pool-drain".into(),
        region: None,
        imds_endpoint: imds.url(),
        autoscaling_endpoint: Some(asg.url()),
        poll_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(400),
    });
    cfg.metrics_listen = Some("127.0.0.1:0".into());
    let state_dir = cfg.state_dir.clone();
    let agent = cluster.start_agent_with(cfg).await;

    let running = cluster.submit(&["sh", "-c", "sleep 3; echo done"]).await;
    cluster
        .wait_state(&running, Duration::from_secs(30), |j| {
            state(j) == pb::JobState::Running
        })
        .await;
    imds.set_target_state("Terminated");
    // Draining (seen on the agent's own endpoint): a job submitted now is
    // not leased to this agent.
    let addr: std::net::SocketAddr = std::fs::read_to_string(state_dir.join("metrics.addr"))
        .expect("metrics.addr")
        .trim()
        .parse()
        .expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http_get(addr, "/metrics").await;
        if text.contains("\noutpost_agent_draining 1\n") {
            break;
        }
        assert!(Instant::now() < deadline, "agent not draining: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let later = cluster.submit(&["true"]).await;

    let job = cluster.wait_final(&running, Duration::from_secs(30)).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    assert_eq!(cluster.logs(&running).await, b"done\n");
    tokio::time::timeout(Duration::from_secs(60), agent.task)
        .await
        .expect("agent exits after completing the hook")
        .expect("join")
        .expect("agent ran");
    assert_eq!(
        state(&cluster.job(&later).await),
        pb::JobState::Queued,
        "a draining agent took a new job"
    );

    let beats = asg.calls_of("RecordLifecycleActionHeartbeat");
    assert!(!beats.is_empty(), "no heartbeat: {:?}", asg.calls.lock());
    let completes = asg.calls_of("CompleteLifecycleAction");
    let ok: Vec<_> = completes.iter().filter(|c| c.ok).collect();
    assert_eq!(ok.len(), 1, "completed exactly once: {completes:#?}");
    assert!(
        completes.len() >= 2,
        "the refused completion was retried: {completes:#?}"
    );
    let done = ok[0];
    for (k, v) in [
        ("AutoScalingGroupName", "outpost-pool"),
        ("LifecycleHookName", "outpost-pool-drain"),
        ("InstanceId", ec2::INSTANCE_ID),
        ("LifecycleActionResult", "CONTINUE"),
    ] {
        assert_eq!(done.params.get(k).map(String::as_str), Some(v), "{done:?}");
    }
    // Signed with the instance role's credentials from IMDS.
    assert!(
        done.authorization
            .starts_with(&format!("AWS4-HMAC-SHA256 Credential={}/", ec2::ACCESS_KEY))
            && done
                .authorization
                .contains("/eu-west-1/autoscaling/aws4_request"),
        "{}",
        done.authorization
    );
    // Completed only after the job had finished; heartbeats came before.
    let finished = std::time::UNIX_EPOCH + Duration::from_millis(job.finished_at_ms as u64);
    assert!(done.at >= finished, "completed before the job ended");
    assert!(beats.iter().all(|b| b.at <= done.at));
    assert_eq!(*imds.unauthorized.lock(), 0, "IMDSv1-style request seen");
}

#[tokio::test]
async fn unreachable_instance_metadata_is_reported_once_and_the_agent_runs_on() {
    let cluster = Cluster::start().await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let config = cluster.write_agent_config(
        "no-imds",
        1,
        "",
        &format!(
            "[asg]\ngroup_name = \"g\"\nhook_name = \"h\"\nregion = \"eu-west-1\"\nimds_endpoint = \"http://{closed}\"\npoll_interval = \"100ms\"\n"
        ),
    );
    let mut agent = cluster.spawn_agent("no-imds", &config).await;
    let id = cluster.submit(&["echo", "still working"]).await;
    let job = cluster.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(30)).await, Some(0));
    let log = agent.log_text();
    assert_eq!(
        log.matches("instance metadata unreachable").count(),
        1,
        "{log}"
    );
}

#[tokio::test]
async fn the_drain_command_stops_a_running_agent_like_a_prestop_hook() {
    let cluster = Cluster::start().await;
    let config = cluster.write_agent_config("prestop", 1, "", "");
    let mut agent = cluster.spawn_agent("prestop", &config).await;
    let id = cluster.submit(&["sh", "-c", "sleep 1; echo drained"]).await;
    cluster
        .wait_state(&id, Duration::from_secs(30), |j| {
            state(j) == pb::JobState::Running
        })
        .await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin("outpost-agent"))
            .arg("--config")
            .arg(&config)
            .arg("drain")
            .output(),
    )
    .await
    .expect("drain returns once the agent exited")
    .expect("run drain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent had exited when the command returned, after the job ended.
    assert_eq!(agent.wait_exit(Duration::from_secs(1)).await, Some(0));
    let job = cluster.wait_final(&id, Duration::from_secs(5)).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    assert_eq!(cluster.logs(&id).await, b"drained\n");
    // No agent: a clear error.
    let out = tokio::process::Command::new(bin("outpost-agent"))
        .arg("--config")
        .arg(&config)
        .arg("drain")
        .output()
        .await
        .expect("run drain");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
