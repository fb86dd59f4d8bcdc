//! End-to-end: a job submitted to the control plane runs in a sandboxed
//! container on an agent that dialled out over mTLS, and its logs stream back.

use std::time::Duration;

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_tests::{Cluster, containers_of, state};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_ordered_logs_propagate() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let ok = c
        .submit(&[
            "sh",
            "-c",
            "for i in 1 2 3; do echo out-$i; echo err-$i >&2; done",
        ])
        .await;
    let bad = c.submit(&["sh", "-c", "echo before; exit 7"]).await;
    let j = c.wait_final(&ok, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(j.exit_code, Some(0));
    let log = String::from_utf8(c.logs(&ok).await).unwrap();
    let outs: Vec<&str> = log.lines().filter(|l| l.starts_with("out-")).collect();
    assert_eq!(
        outs,
        ["out-1", "out-2", "out-3"],
        "stdout in order: {log:?}"
    );
    let errs: Vec<&str> = log.lines().filter(|l| l.starts_with("err-")).collect();
    assert_eq!(
        errs,
        ["err-1", "err-2", "err-3"],
        "stderr in order: {log:?}"
    );
    let j = c.wait_final(&bad, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Failed);
    assert_eq!(j.exit_code, Some(7));
    assert_eq!(c.logs(&bad).await, b"before\n");
    for id in [&ok, &bad] {
        assert!(
            containers_of(id).await.is_empty(),
            "container of {id} removed"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_lines_arrive_each_once() {
    let c = Cluster::start().await;
    let agent = c.start_agent(1).await;
    let id = c
        .submit(&["sh", "-c", "seq 1 100000 | sed 's/^/line /'"])
        .await;
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    let log = String::from_utf8(c.logs(&id).await).unwrap();
    let expected: String = (1..=100_000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(log.len(), expected.len(), "log length");
    assert!(log == expected, "every line once and in order");
    assert_eq!(j.log_length as usize, expected.len());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_a_running_job_until_it_ends() {
    let c = Cluster::start().await;
    let agent = c.start_agent(1).await;
    let id = c
        .submit(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.2; done",
        ])
        .await;
    let mut s = c
        .client()
        .await
        .follow_logs(admin::FollowLogsRequest {
            job_id: id.clone(),
            offset: 0,
            follow: true,
            epoch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut eof = false;
    while let Some(d) = tokio::time::timeout(LIMIT, s.message())
        .await
        .unwrap()
        .unwrap()
    {
        got.extend_from_slice(&d.data);
        if d.eof {
            eof = true;
            break;
        }
    }
    assert!(eof, "the stream ends with eof once the job is final");
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "tick-1\ntick-2\ntick-3\ntick-4\ntick-5\n"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_container_and_leaves_nothing() {
    let c = Cluster::start().await;
    // A SIGKILL grace long enough for the job to outlive the SIGINT.
    let mut cfg = c.agent_config(1);
    cfg.sandbox.stop_grace = Duration::from_secs(20);
    let agent = c.start_agent_with(cfg).await;
    // The job survives the SIGINT by two seconds: a second SIGINT would
    // print a second "got-sigint".
    let id = c
        .submit(&[
            "sh",
            "-c",
            "trap 'echo got-sigint; touch /tmp/int' INT; echo started; \
             while [ ! -e /tmp/int ]; do sleep 0.1; done; sleep 2; echo bye; exit 130",
        ])
        .await;
    c.wait_state(&id, LIMIT, |j| {
        state(j) == pb::JobState::Running && j.log_length > 0
    })
    .await;
    assert_eq!(containers_of(&id).await.len(), 1, "one container runs");
    c.client()
        .await
        .cancel_job(admin::CancelJobRequest { job_id: id.clone() })
        .await
        .unwrap();
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    let log = String::from_utf8(c.logs(&id).await).unwrap();
    assert_eq!(
        log.matches("got-sigint").count(),
        1,
        "exactly one SIGINT: {log:?}"
    );
    assert!(
        log.ends_with("bye\n"),
        "the job's own shutdown ran: {log:?}"
    );
    assert!(
        containers_of(&id).await.is_empty(),
        "no container left behind"
    );

    // Cancelling a queued job never runs it.
    agent.stop().await;
    let queued = c.submit(&["sh", "-c", "echo must-not-run"]).await;
    let j = c
        .client()
        .await
        .cancel_job(admin::CancelJobRequest {
            job_id: queued.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&j), pb::JobState::Cancelled);
    let agent = c.start_agent(1).await;
    // A job submitted after it runs: the dispatcher (FIFO) went past the
    // cancelled one.
    let after = c.submit(&["true"]).await;
    let j = c.wait_final(&after, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    let j = c.job(&queued).await;
    assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    assert_eq!(j.epoch, 0, "never leased: {j:?}");
    assert!(c.logs(&queued).await.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_and_logs_survive_a_server_restart() {
    let mut c = Cluster::start().await;
    // A finished job's log must survive the restart.
    let agent = c.start_agent(1).await;
    let done = c.submit(&["sh", "-c", "seq 1 5000"]).await;
    c.wait_final(&done, LIMIT).await;
    let before = c.logs(&done).await;
    agent.stop().await;
    // A queued job (no agent connected) must survive the restart.
    let queued = c.submit(&["sh", "-c", "echo ran-after-restart"]).await;
    c.restart_server().await;
    let j = c.job(&queued).await;
    assert_eq!(state(&j), pb::JobState::Queued);
    assert_eq!(c.logs(&done).await, before, "log intact after restart");
    let agent = c.start_agent(1).await;
    let j = c.wait_final(&queued, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded);
    assert_eq!(c.logs(&queued).await, b"ran-after-restart\n");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_match_agent_labels_fifo() {
    let c = Cluster::start().await;
    let mut spec = outpost_tests::spec(&["sh", "-c", "echo gpu"]);
    spec.selector.insert("pool".into(), "gpu".into());
    let unmatched = c.submit_spec(spec).await;
    let first = c.submit(&["sh", "-c", "echo first"]).await;
    let second = c.submit(&["sh", "-c", "echo second"]).await;
    let agent = c.start_agent(1).await;
    let a = c.wait_final(&first, LIMIT).await;
    let b = c.wait_final(&second, LIMIT).await;
    assert!(a.started_at_ms <= b.started_at_ms, "FIFO within a match");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        state(&c.job(&unmatched).await),
        pb::JobState::Queued,
        "a job whose selector no agent satisfies stays queued"
    );
    let agents = c
        .client()
        .await
        .list_agents(admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].connected);
    assert_eq!(agents[0].agent_id, "local");
    agent.stop().await;
}
