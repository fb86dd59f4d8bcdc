//! The fault-injection suite: nothing lost, nothing run twice.
//!
//! Every scenario runs a job printing numbered lines and asserts that the
//! server's copy of the log has every byte exactly once, that the job has
//! exactly one final status, and that no container is left behind.

use std::time::{Duration, Instant};

use outpost::hub::LeaseTiming;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_tests::faults::{EventRecorder, Partition};
use outpost_tests::{AgentProc, Cluster, containers_of, numbered_job, state};

/// The job's workspace on the host, for agent `dir` (as written by
/// `write_agent_config`).
fn workspace(cfg: &std::path::Path, id: &str, epoch: u64) -> std::path::PathBuf {
    let work = cfg
        .parent()
        .expect("agent dir")
        .join("work")
        .canonicalize()
        .expect("work_dir");
    let key = outpost_agent::job::LeaseKey {
        job_id: id.to_string(),
        epoch,
    };
    outpost_agent::executor::spec::workspace_dir(&key, &work).expect("workspace path")
}

/// A job printing `line 1` .. `line {before}`, then waiting (at most two
/// minutes) for `/workspace/go`, then printing up to `line {total}`; and
/// the exact log it must produce.
fn gated_job(before: u32, total: u32) -> (Vec<String>, Vec<u8>) {
    let script = format!(
        "i=0; while [ $i -lt {before} ]; do i=$((i+1)); echo \"line $i\"; done; \
         n=0; while [ ! -e /workspace/go ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done; \
         while [ $i -lt {total} ]; do i=$((i+1)); echo \"line $i\"; sleep 0.01; done"
    );
    let expected: String = (1..=total).map(|i| format!("line {i}\n")).collect();
    (
        vec!["sh".into(), "-c".into(), script],
        expected.into_bytes(),
    )
}

/// Waits (bounded) until the agent's log contains every one of `needles`
/// on one line; returns that line.
async fn wait_agent_log(agent: &outpost_tests::AgentProc, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = agent.log_text();
        if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {needles:?} in the agent's log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const LIMIT: Duration = Duration::from_secs(120);

fn timing() -> LeaseTiming {
    LeaseTiming {
        ttl: Duration::from_secs(8),
        heartbeat: Duration::from_secs(1),
        sweep: Duration::from_millis(200),
    }
}

fn job_spec(command: Vec<String>) -> pb::JobSpec {
    let mut spec = outpost_tests::spec(&[]);
    spec.command = command;
    spec.selector.insert("zone".into(), "test".into());
    spec
}

async fn assert_no_containers(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = containers_of(id).await;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "containers left behind for {id}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_log_len(c: &Cluster, id: &str, at_least: u64) {
    c.wait_state(id, LIMIT, |j| j.log_length >= at_least).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_agent_mid_job_and_the_restarted_agent_finishes_it() {
    let t0 = Instant::now();
    let c = Cluster::start_with(timing()).await;
    let cfg = c.write_agent_config("a", 1, "", "");
    let mut agent = c.spawn_agent("a", &cfg).await;
    // The job waits for the test after 50 lines: it is still running when
    // the agent comes back, however slow the machine.
    let (cmd, expected) = gated_job(50, 150);
    let id = c.submit_spec(job_spec(cmd)).await;
    let first_50: usize = (1..=50).map(|i| format!("line {i}\n").len()).sum();
    wait_log_len(&c, &id, first_50 as u64).await;
    let container = containers_of(&id).await;
    assert_eq!(container.len(), 1);
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
    // The container survives the agent.
    assert_eq!(
        containers_of(&id).await,
        container,
        "container outlives a killed agent"
    );
    let agent = c.spawn_agent("a", &cfg).await;
    wait_agent_log(&agent, &["re-adopting a running job", id.as_str()]).await;
    assert_eq!(
        containers_of(&id).await,
        container,
        "the restarted agent adopted the same container"
    );
    let j = c.job(&id).await;
    assert!(
        !outpost_tests::is_final(&j),
        "the job still runs while re-adopted: {j:?}"
    );
    std::fs::write(workspace(&cfg, &id, 1).join("go"), b"").expect("release the job");
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(
        state(&j),
        pb::JobState::Succeeded,
        "{j:?}\n{}",
        agent.log_text()
    );
    assert_eq!(
        j.epoch, 1,
        "the same lease finished the job: it did not run twice"
    );
    let log = c.logs(&id).await;
    assert!(
        log == expected,
        "every byte exactly once:\n{}",
        String::from_utf8_lossy(&log)
    );
    assert_no_containers(&id).await;
    eprintln!("scenario kill -9: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_shorter_than_the_lease_loses_nothing() {
    let t0 = Instant::now();
    // A lease long enough that the agent's self-fence (at TTL - grace -
    // margin = 26 s after the last renewal) is far from the outage.
    let mut c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(30),
        heartbeat: Duration::from_secs(1),
        sweep: Duration::from_millis(200),
    })
    .await;
    let cfg = c.write_agent_config("a", 1, "", "");
    let agent = c.spawn_agent("a", &cfg).await;
    let (cmd, expected) = gated_job(20, 200);
    let id = c.submit_spec(job_spec(cmd)).await;
    wait_log_len(&c, &id, 100).await;
    let failures_before = agent
        .log_text()
        .matches("cannot reach the control plane")
        .count();
    let addr = c.stop_server().await;
    let down = Instant::now();
    // The job goes on meanwhile: its output waits in the agent's spool.
    std::fs::write(workspace(&cfg, &id, 1).join("go"), b"").expect("release the job");
    // The outage: more than two heartbeats, and the agent has seen it (its
    // reconnects failed at least twice).
    let deadline = Instant::now() + Duration::from_secs(30);
    while down.elapsed() < Duration::from_millis(2500)
        || agent
            .log_text()
            .matches("cannot reach the control plane")
            .count()
            < failures_before + 2
    {
        assert!(
            Instant::now() < deadline,
            "the agent did not notice the outage:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start_server_at(addr).await;
    let outage = down.elapsed();
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(
        state(&j),
        pb::JobState::Succeeded,
        "{j:?}\n{}",
        agent.log_text()
    );
    assert_eq!(j.epoch, 1, "the job continued under its lease");
    let log = c.logs(&id).await;
    assert!(
        log == expected,
        "every byte exactly once:\n{}",
        String::from_utf8_lossy(&log)
    );
    // The agent resumed its lease on the new session; it never fenced.
    wait_agent_log(&agent, &["connected to the control plane", "resumed=1"]).await;
    assert!(
        !agent.log_text().contains("lease could not be renewed"),
        "{}",
        agent.log_text()
    );
    assert_no_containers(&id).await;
    eprintln!(
        "scenario control plane restart: {:?} (outage {outage:?})",
        t0.elapsed()
    );
}

/// The engine's own record that attempt 1 of `id` died before attempt 2
/// started; returns the gap between the two.
async fn assert_epoch_1_died_before_epoch_2_started(events: &EventRecorder, id: &str) -> Duration {
    let died = events
        .wait_for(&format!("outpost-{id}-1"), "die", LIMIT)
        .await;
    let started = events
        .wait_for(&format!("outpost-{id}-2"), "start", LIMIT)
        .await;
    assert!(
        died.time_nano < started.time_nano,
        "both attempts ran at once: epoch 1 died at {} ns, epoch 2 started at {} ns",
        died.time_nano,
        started.time_nano
    );
    Duration::from_nanos(u64::try_from(started.time_nano - died.time_nano).unwrap_or(0))
}

/// Waits (bounded) until the agent's log contains `text`.
async fn wait_agent_logged(agent: &AgentProc, text: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !agent.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "agent {} did not log {text:?} within {limit:?}:\n{}",
            agent.name,
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes what a killed agent `agent` that never came back left of attempt
/// 1 of `id`: its container and its workspace filesystem.
async fn remove_orphan(c: &Cluster, agent: &str, id: &str) {
    remove_container(&format!("outpost-{id}-1")).await;
    let workspace = c
        .dir
        .path()
        .join("agents")
        .join(agent)
        .join("work")
        .join(format!("{id}-1"));
    let st = std::process::Command::new("umount")
        .arg("-l")
        .arg(&workspace)
        .status()
        .expect("umount");
    assert!(
        st.success(),
        "the orphan's workspace filesystem was mounted"
    );
}

/// Removes a container the scenario left on purpose (its agent never came back).
async fn remove_container(name: &str) {
    let docker = bollard::Docker::connect_with_local_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("docker version");
    let options = bollard::query_parameters::RemoveContainerOptions {
        force: true,
        v: true,
        link: false,
    };
    docker
        .remove_container(name, Some(options))
        .await
        .expect("remove the orphaned container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_agent_fences_itself_and_its_old_epoch_is_refused() {
    let t0 = Instant::now();
    let events = EventRecorder::start().await;
    let c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(4),
        heartbeat: Duration::from_millis(500),
        sweep: Duration::from_millis(100),
    })
    .await;
    // Agent a reaches the control plane only through a proxy that can stop
    // forwarding: a real partition while the agent process stays alive.
    let proxy = Partition::start(c.server.as_ref().expect("server").addr).await;
    let cfg_a = c.write_agent_config("a", 1, "", "");
    let text = std::fs::read_to_string(&cfg_a)
        .unwrap()
        .replace(&c.url(), &proxy.url());
    std::fs::write(&cfg_a, text).unwrap();
    let mut agent_a = c.spawn_agent("a", &cfg_a).await;
    let (cmd, expected) = numbered_job(400, "0.02");
    let id = c.submit_spec(job_spec(cmd)).await;
    wait_log_len(&c, &id, 100).await;
    proxy.cut();
    let fault = Instant::now();
    let requeued = c
        .wait_state(&id, Duration::from_secs(30), |j| {
            j.epoch == 1 && state(j) == pb::JobState::Queued
        })
        .await;
    let to_requeue = fault.elapsed();
    assert_eq!(requeued.epoch, 1);
    let old_len = c.logs_of_epoch(&id, 1).await.len();
    assert!(old_len > 0);
    // The agent, alive but cut off, stopped the job itself.
    wait_agent_logged(
        &agent_a,
        "lease could not be renewed; stopping the job",
        Duration::from_secs(10),
    )
    .await;
    // Another agent takes the job with a new epoch.
    let cfg_b = c.write_agent_config("b", 1, "", "");
    let _agent_b = c.spawn_agent("b", &cfg_b).await;
    c.wait_state(&id, LIMIT, |j| j.epoch == 2).await;
    let gap = assert_epoch_1_died_before_epoch_2_started(&events, &id).await;
    // The partition heals: the old agent learns its lease is gone, and
    // whatever it still had of epoch 1 is refused.
    proxy.heal();
    wait_agent_logged(&agent_a, "lease revoked", LIMIT).await;
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(j.epoch, 2);
    assert_eq!(j.agent_id, "b");
    let log = c.logs(&id).await;
    assert!(log == expected, "epoch 2 has every byte exactly once");
    let old = c.logs_of_epoch(&id, 1).await;
    assert_eq!(
        old.len(),
        old_len,
        "nothing of epoch 1 was accepted after the re-lease"
    );
    assert!(
        expected.starts_with(&old),
        "epoch 1's log is a clean prefix"
    );
    assert_eq!(
        state(&c.job(&id).await),
        pb::JobState::Succeeded,
        "exactly one final status"
    );
    assert_no_containers(&id).await;
    assert!(
        matches!(agent_a.child.try_wait(), Ok(None)),
        "the partitioned agent stayed alive throughout"
    );
    eprintln!(
        "scenario partition: {:?}; fault to re-queue {:?}; epoch 1 died {gap:?} before epoch 2 started",
        t0.elapsed(),
        to_requeue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_that_never_returns_cannot_run_a_job_twice() {
    let t0 = Instant::now();
    let events = EventRecorder::start().await;
    let c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(6),
        heartbeat: Duration::from_millis(500),
        sweep: Duration::from_millis(100),
    })
    .await;
    let cfg_a = c.write_agent_config("a", 1, "", "");
    let mut agent_a = c.spawn_agent("a", &cfg_a).await;
    let (cmd, expected) = numbered_job(150, "0.05");
    let id = c.submit_spec(job_spec(cmd)).await;
    wait_log_len(&c, &id, 100).await;
    // A second agent with the same labels, idle.
    let cfg_b = c.write_agent_config("b", 1, "", "");
    let _agent_b = c.spawn_agent("b", &cfg_b).await;
    agent_a.signal("KILL");
    agent_a.wait_exit(Duration::from_secs(10)).await;
    // Never restarted: the job's container has to stop by itself before the
    // control plane leases the job to b.
    c.wait_state(&id, LIMIT, |j| j.epoch == 2).await;
    let gap = assert_epoch_1_died_before_epoch_2_started(&events, &id).await;
    let died = events
        .wait_for(&format!("outpost-{id}-1"), "die", LIMIT)
        .await;
    assert_eq!(
        died.attributes.get("exitCode").map(String::as_str),
        Some("251"),
        "stopped by outpost-init at its lease deadline: {died:?}"
    );
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!((j.epoch, j.agent_id.as_str()), (2, "b"));
    assert!(
        c.logs(&id).await == expected,
        "epoch 2 has every byte exactly once"
    );
    // Nobody else removes what the dead agent left.
    remove_orphan(&c, "a", &id).await;
    assert_no_containers(&id).await;
    eprintln!(
        "scenario kill -9, no restart: {:?}; epoch 1 died {gap:?} before epoch 2 started",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_orphan_still_meets_its_timeout() {
    let events = EventRecorder::start().await;
    // A lease far longer than the timeout: only the timeout can stop it.
    let c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(60),
        heartbeat: Duration::from_secs(1),
        sweep: Duration::from_millis(200),
    })
    .await;
    let cfg = c.write_agent_config("a", 1, "", "");
    let mut agent = c.spawn_agent("a", &cfg).await;
    let mut spec = job_spec(vec![
        "sh".into(),
        "-c".into(),
        "echo up; while :; do sleep 0.1; done".into(),
    ]);
    spec.timeout_ms = 3000;
    let id = c.submit_spec(spec).await;
    wait_log_len(&c, &id, 3).await;
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
    let name = format!("outpost-{id}-1");
    let started = events.wait_for(&name, "start", LIMIT).await;
    let died = events.wait_for(&name, "die", Duration::from_secs(30)).await;
    let ran = Duration::from_nanos(u64::try_from(died.time_nano - started.time_nano).unwrap_or(0));
    assert_eq!(
        died.attributes.get("exitCode").map(String::as_str),
        Some("252"),
        "stopped by outpost-init at its timeout: {died:?}"
    );
    // The timeout (3 s), then at most the stop grace (2 s); the job dies on
    // its SIGINT at once.
    assert!(
        ran >= Duration::from_secs(3) && ran < Duration::from_secs(6),
        "ran {ran:?}"
    );
    remove_orphan(&c, "a", &id).await;
    assert_no_containers(&id).await;
}

/// Mount points of this process's mount namespace.
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_unmounts_the_secrets_tmpfs() {
    let c = Cluster::start_with(timing()).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(secrets.clone());
    let mut cfg = c.agent_config(1);
    cfg.sandbox.secrets_dir = secrets.clone();
    let agent = c.start_agent_with(cfg).await;
    let target = secrets
        .canonicalize()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        mount_points().contains(&target),
        "the agent mounted a tmpfs on {target}"
    );
    let mut s = outpost_tests::spec(&["sh", "-c", "cat /run/secrets/token; echo"]);
    s.secrets = vec![pb::Secret {
        name: "token".into(),
        value: b"0penSesame".to_vec(),
    }];
    let id = c.submit_spec(s).await;
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(c.logs(&id).await, b"***\n", "the job read its secret");
    agent.stop().await;
    assert!(
        !mount_points().contains(&target),
        "the secrets tmpfs is still mounted after a clean exit"
    );
    let left: Vec<_> = std::fs::read_dir(&secrets)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in the secrets directory: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_job_finishes_and_the_agent_exits_0() {
    let t0 = Instant::now();
    let c = Cluster::start_with(timing()).await;
    let cfg = c.write_agent_config("a", 2, "drain_grace = \"60s\"", "");
    let mut agent = c.spawn_agent("a", &cfg).await;
    let (cmd, expected) = numbered_job(100, "0.02");
    let id = c.submit_spec(job_spec(cmd)).await;
    wait_log_len(&c, &id, 50).await;
    agent.signal("TERM");
    // The server learns the agent drains; a job submitted now is not given
    // to it (the agent has a free slot).
    c.wait_agent("a", LIMIT, |a| a.draining && a.connected)
        .await;
    let later = c.submit_spec(job_spec(vec!["true".into()])).await;
    let code = agent.wait_exit(LIMIT).await;
    assert_eq!(code, Some(0), "{}", agent.log_text());
    let j = c.job(&id).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert!(c.logs(&id).await == expected);
    let later = c.job(&later).await;
    assert_eq!(state(&later), pb::JobState::Queued, "{later:?}");
    // Not even offered and declined: a lease would have raised the epoch.
    assert_eq!(later.epoch, 0, "no new job offered during drain: {later:?}");
    assert_no_containers(&id).await;
    eprintln!("scenario sigterm drain: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_short_grace_sends_exactly_one_sigint() {
    let t0 = Instant::now();
    let c = Cluster::start_with(timing()).await;
    let cfg = c.write_agent_config("a", 1, "drain_grace = \"1s\"", "");
    // A SIGKILL grace long enough for the job to outlive the SIGINT.
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        text.replace("stop_grace = \"2s\"", "stop_grace = \"20s\""),
    )
    .expect("config");
    let mut agent = c.spawn_agent("a", &cfg).await;
    // The job survives the SIGINT by two seconds: a second SIGINT would
    // print a second "got-sigint".
    let script = "trap 'echo got-sigint; touch /tmp/int' INT; i=0; \
                  while [ ! -e /tmp/int ]; do i=$((i+1)); echo tick $i; sleep 0.1; done; \
                  sleep 2; echo bye; exit 130";
    let id = c
        .submit_spec(job_spec(vec!["sh".into(), "-c".into(), script.into()]))
        .await;
    wait_log_len(&c, &id, 20).await;
    agent.signal("TERM");
    let code = agent.wait_exit(LIMIT).await;
    assert_eq!(code, Some(0), "{}", agent.log_text());
    let j = c.job(&id).await;
    assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    let log = String::from_utf8(c.logs(&id).await).unwrap();
    assert_eq!(log.matches("got-sigint").count(), 1, "{log}");
    assert!(
        log.ends_with("bye\n"),
        "the job's trap ran to its end: {log}"
    );
    assert_no_containers(&id).await;
    eprintln!("scenario sigterm short grace: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_sigquit_forces_a_fast_stop_that_still_reports() {
    let c = Cluster::start_with(timing()).await;
    let cfg = c.write_agent_config("a", 1, "drain_grace = \"10m\"", "");
    let mut agent = c.spawn_agent("a", &cfg).await;
    let id = c
        .submit_spec(job_spec(vec![
            "sh".into(),
            "-c".into(),
            "echo up; sleep 600".into(),
        ]))
        .await;
    wait_log_len(&c, &id, 3).await;
    agent.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    agent.signal("QUIT");
    let code = agent.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(code, Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "forced stop took {:?}",
        t.elapsed()
    );
    let j = c.job(&id).await;
    assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    assert_no_containers(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_stops_new_work_without_losing_a_job() {
    let c = Cluster::start_with(timing()).await;
    let cfg = c.write_agent_config("a", 1, "", "");
    let _agent = c.spawn_agent("a", &cfg).await;
    c.client()
        .await
        .drain_agent(admin::DrainAgentRequest {
            agent_id: "a".into(),
        })
        .await
        .unwrap();
    c.wait_agent("a", LIMIT, |a| a.draining).await;
    let id = c.submit_spec(job_spec(vec!["true".into()])).await;
    let cfg_b = c.write_agent_config("b", 1, "", "");
    let _b = c.spawn_agent("b", &cfg_b).await;
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded);
    assert_eq!(j.agent_id, "b");
    // The first lease went to b: the draining agent was never offered it.
    assert_eq!(j.epoch, 1, "a draining agent gets no job: {j:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_spool_filesystem_slows_the_job_and_loses_nothing() {
    let t0 = Instant::now();
    let c = Cluster::start_with(timing()).await;
    let cfg = c.write_agent_config(
        "a",
        1,
        "spool_segment_bytes = 65536\nlog_buffer_bytes = 16777216",
        "",
    );
    // A 512 KiB tmpfs as the spool directory.
    let spool = cfg.parent().unwrap().join("state/spool");
    std::fs::create_dir_all(&spool).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs"])
        .arg(&spool)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs (tests run as root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(spool.clone());
    // Ballast: leave less than two segments' worth of space.
    std::fs::write(spool.join("ballast"), vec![0u8; 400 * 1024]).unwrap();
    let agent = c.spawn_agent("a", &cfg).await;
    // About 4 MiB of output: eight times the spool's size.
    let lines = 60_000u32;
    let script =
        format!("seq 1 {lines} | sed 's/$/ padding-padding-padding-padding-padding-padding/'");
    let expected: String = (1..=lines)
        .map(|i| format!("{i} padding-padding-padding-padding-padding-padding\n"))
        .collect();
    let id = c
        .submit_spec(job_spec(vec!["sh".into(), "-c".into(), script]))
        .await;
    let j = c.wait_final(&id, LIMIT).await;
    // Heartbeats went on: the lease was never lost.
    assert_eq!(j.epoch, 1, "{j:?}");
    // Backpressure, not failure: the job succeeds and loses nothing.
    assert_eq!(
        state(&j),
        pb::JobState::Succeeded,
        "{j:?}\n{}",
        agent.log_text()
    );
    let log = c.logs(&id).await;
    assert_eq!(log.len(), expected.len(), "log length");
    assert!(log == expected.as_bytes(), "every byte exactly once");
    assert_no_containers(&id).await;
    let text = agent.log_text();
    assert!(
        text.contains("log spool full"),
        "the spool filled up, so the scenario tested backpressure:\n{text}"
    );
    eprintln!("scenario tiny spool: {:?} ({:?})", t0.elapsed(), state(&j));
}

fn zone_hello(name: &str, capacity: u32) -> pb::Hello {
    pb::Hello {
        agent_id: name.into(),
        version: "scripted".into(),
        labels: [("zone".to_string(), "test".to_string())].into(),
        capacity,
        capabilities: vec!["log-ack".into(), "status-ack".into()],
        ..Default::default()
    }
}

fn log_chunk(id: &str, epoch: u64, seq: u64, offset: u64, data: &[u8]) -> pb::agent_message::Msg {
    pb::agent_message::Msg::Log(pb::LogChunk {
        job_id: id.into(),
        epoch,
        seq,
        offset,
        data: data.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_is_refused_once_the_job_is_re_leased() {
    use pb::server_message::Msg as In;
    let c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(3),
        heartbeat: Duration::from_millis(500),
        sweep: Duration::from_millis(100),
    })
    .await;
    // A scripted agent takes the job, delivers its first line, then goes
    // silent (no heartbeat) with its session open.
    let mut old = c.raw_agent("a", zone_hello("a", 1)).await.expect("session");
    let (cmd, expected) = numbered_job(20, "0.01");
    let id = c.submit_spec(job_spec(cmd)).await;
    let lease = old
        .recv_until(LIMIT, |m| match m {
            In::Lease(l) if l.job_id == id => Some(l.clone()),
            _ => None,
        })
        .await;
    assert_eq!(lease.epoch, 1);
    let first = b"line 1 of 20\n";
    old.send(log_chunk(&id, 1, 1, 0, first)).await;
    let acked = old
        .recv_until(LIMIT, |m| match m {
            In::LogAck(a) if a.job_id == id => Some(a.offset),
            _ => None,
        })
        .await;
    assert_eq!(
        acked,
        first.len() as u64,
        "accepted while the lease is current"
    );

    // The lease expires; agent b gets the job with epoch 2 and finishes it.
    let cfg_b = c.write_agent_config("b", 1, "", "");
    let _b = c.spawn_agent("b", &cfg_b).await;
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!((j.epoch, j.agent_id.as_str()), (2, "b"), "{j:?}");

    // The old agent speaks again with epoch 1: a log chunk, a heartbeat
    // and a final status, each refused.
    old.send(log_chunk(&id, 1, 2, first.len() as u64, b"stale bytes\n"))
        .await;
    let refused = old
        .recv_until(LIMIT, |m| match m {
            In::Refused(r) if r.job_id == id => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(refused.epoch, 1, "{refused:?}");
    assert!(refused.reason.contains("stale lease"), "{refused:?}");
    old.send(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
        leases: vec![pb::LeaseRef {
            job_id: id.clone(),
            epoch: 1,
        }],
        free_slots: 0,
    }))
    .await;
    let revoked = old
        .recv_until(LIMIT, |m| match m {
            In::HeartbeatAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert!(revoked.renewed.is_empty(), "{revoked:?}");
    assert_eq!(
        revoked.revoked,
        [pb::LeaseRef {
            job_id: id.clone(),
            epoch: 1
        }]
    );
    old.send(pb::agent_message::Msg::Status(pb::JobStatus {
        job_id: id.clone(),
        epoch: 1,
        state: pb::JobState::Failed as i32,
        exit_code: Some(1),
        message: "stale".into(),
        log_length: first.len() as u64,
        ..Default::default()
    }))
    .await;
    let refused = old
        .recv_until(LIMIT, |m| match m {
            In::Refused(r) if r.job_id == id => Some(r.clone()),
            In::StatusAck(a) => panic!("a stale final status was acknowledged: {a:?}"),
            _ => None,
        })
        .await;
    assert_eq!(refused.epoch, 1, "{refused:?}");

    // Nothing of it was stored.
    assert_eq!(c.logs_of_epoch(&id, 1).await, first);
    assert!(c.logs(&id).await == expected, "epoch 2's log is intact");
    let j = c.job(&id).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!((j.epoch, j.agent_id.as_str()), (2, "b"), "{j:?}");
    assert_no_containers(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_stops_the_job_and_the_agent_reports_nothing_for_it() {
    // Heartbeats every 30 s: the agent's next message about the job is a
    // log chunk, so it learns of the lost lease through `Refused`.
    let c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(120),
        heartbeat: Duration::from_secs(30),
        sweep: Duration::from_millis(200),
    })
    .await;
    let cfg = c.write_agent_config("a", 1, "", "");
    let agent = c.spawn_agent("a", &cfg).await;
    let id = c
        .submit_spec(job_spec(vec![
            "sh".into(),
            "-c".into(),
            "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done".into(),
        ]))
        .await;
    wait_log_len(&c, &id, 30).await;
    assert_eq!(containers_of(&id).await.len(), 1);
    // A second session with the agent's certificate says it holds no lease
    // (as a restarted agent whose spool was lost would): the control plane
    // re-queues the job, so the running agent no longer holds the lease.
    let _other = c.raw_agent("a", zone_hello("a", 0)).await.expect("session");
    let j = c
        .wait_state(&id, LIMIT, |j| state(j) == pb::JobState::Queued)
        .await;
    assert_eq!(j.epoch, 1);
    // The agent's next chunk is refused: it stops the job.
    let line = wait_agent_log(&agent, &["lease revoked; stopping the job", id.as_str()]).await;
    assert!(
        line.contains("stale lease"),
        "stopped because of the refusal: {line}"
    );
    assert_no_containers(&id).await;
    // It reports nothing for a lease it does not hold: the job stays queued.
    let j = c.job(&id).await;
    assert_eq!(state(&j), pb::JobState::Queued, "{j:?}");
    assert_eq!(j.epoch, 1, "{j:?}");
    let stored = c.logs_of_epoch(&id, 1).await;
    assert!(
        String::from_utf8_lossy(&stored).starts_with("tick 1\n"),
        "what was accepted before stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_status_frees_the_slot_at_once_and_is_acknowledged_before_the_next_lease() {
    use pb::server_message::Msg as In;
    // Heartbeats far apart: nothing but the final status can free the slot
    // within the bound below.
    let c = Cluster::start_with(LeaseTiming {
        ttl: Duration::from_secs(60),
        heartbeat: Duration::from_secs(20),
        sweep: Duration::from_millis(200),
    })
    .await;
    let mut agent = c.raw_agent("a", zone_hello("a", 1)).await.expect("session");
    let first = c.submit_spec(job_spec(vec!["true".into()])).await;
    let second = c.submit_spec(job_spec(vec!["true".into()])).await;
    let lease = agent
        .recv_until(LIMIT, |m| match m {
            In::Lease(l) => Some(l.clone()),
            _ => None,
        })
        .await;
    assert_eq!((lease.job_id.as_str(), lease.epoch), (first.as_str(), 1));
    let finished = Instant::now();
    agent
        .send(pb::agent_message::Msg::Status(pb::JobStatus {
            job_id: first.clone(),
            epoch: 1,
            state: pb::JobState::Succeeded as i32,
            exit_code: Some(0),
            ..Default::default()
        }))
        .await;
    // The ack comes first (the agent forgets the job), then the next lease.
    let mut order = Vec::new();
    while order.len() < 2 {
        let m = agent
            .recv_until(Duration::from_secs(10), |m| match m {
                In::StatusAck(a) if a.job_id == first => Some("ack"),
                In::Lease(l) if l.job_id == second => Some("lease"),
                _ => None,
            })
            .await;
        order.push(m);
    }
    assert_eq!(order, ["ack", "lease"]);
    let took = finished.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the next lease came {took:?} after the final status"
    );
}
