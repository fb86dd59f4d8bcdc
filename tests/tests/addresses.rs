//! End-to-end: an agent configured with several control plane addresses
//! connects to whichever answers, and moves to the next, with its running
//! job, when the one it is connected to goes away (here: one control plane
//! over the embedded store, restarted on another address).

use std::time::{Duration, Instant};

use outpost_proto::agent::v1 as pb;
use outpost_tests::{Cluster, state};

const LIMIT: Duration = Duration::from_secs(60);

/// A loopback address where nothing listens: a port bound, then released.
fn dead_address() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_skips_a_dead_first_address_and_runs_a_job_on_the_next() {
    let c = Cluster::start().await;
    let mut cfg = c.agent_config(1);
    cfg.server = format!("https://{}", dead_address());
    cfg.servers = vec![c.url()];
    let started = Instant::now();
    let agent = c.start_agent_with(cfg).await;
    let id = c.submit(&["true"]).await;
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert!(
        started.elapsed() < LIMIT,
        "the job took {:?}",
        started.elapsed()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_moves_with_its_agent_to_the_next_replica() {
    let mut c = Cluster::start().await;
    let first = c.url();
    let second = dead_address();
    let mut cfg = c.agent_config(1);
    cfg.servers = vec![format!("https://{second}")];
    let agent = c.start_agent_with(cfg).await;
    let id = c
        .submit(&["sh", "-c", "echo before; sleep 4; echo after"])
        .await;
    c.wait_state(&id, LIMIT, |j| state(j) == pb::JobState::Running)
        .await;
    // The replica the agent is connected to goes away; another one of the
    // same deployment (same store) answers on the second address.
    c.stop_server().await;
    c.start_server_at(second).await;
    assert_ne!(c.url(), first);
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(j.epoch, 1, "the lease was resumed, not run again: {j:?}");
    let log = String::from_utf8(c.logs(&id).await).expect("utf-8 log");
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["before", "after"],
        "{log:?}"
    );
    agent.stop().await;
}
