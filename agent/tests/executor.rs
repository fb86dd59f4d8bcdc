//! The executor against the real Docker engine with `outpost/runner:dev`.
//!
//! Every test has its own temporary `work_dir`, so tests (and other agents on
//! the same engine) never see each other's containers, and every test is
//! bounded in time.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use bytes::Bytes;
use outpost_agent::executor::{DockerExecutor, Lease, PullPolicy, SandboxConfig, spec};
use outpost_agent::job::{JobSecret, JobSpec, LeaseKey, Network, Outcome, Resources, SecretBytes};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "outpost/runner:dev";
/// Upper bound for any single test.
const TEST_LIMIT: Duration = Duration::from_secs(120);

/// Runs a test body under [`TEST_LIMIT`].
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("test took longer than its time limit");
}

async fn docker() -> Docker {
    Docker::connect_with_local_defaults()
        .expect("docker client")
        .negotiate_version()
        .await
        .expect("docker engine reachable")
}

/// The runner image is built by `images/build-runner.sh`; wait a little for it.
async fn wait_for_runner_image(docker: &Docker) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while docker.inspect_image(IMAGE).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{IMAGE} is missing: build it with images/build-runner.sh"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

struct Harness {
    exec: DockerExecutor,
    docker: Docker,
    work_dir: PathBuf,
    _dir: tempfile::TempDir,
}

async fn harness(tweak: impl FnOnce(&mut SandboxConfig)) -> Harness {
    let docker = docker().await;
    wait_for_runner_image(&docker).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = SandboxConfig {
        work_dir: dir.path().join("work"),
        stop_grace: Duration::from_secs(5),
        pull: PullPolicy::Never,
        ..Default::default()
    };
    tweak(&mut cfg);
    let exec = DockerExecutor::connect(cfg).await.expect("connect");
    let work_dir = exec.config().work_dir.clone();
    Harness {
        exec,
        docker,
        work_dir,
        _dir: dir,
    }
}

fn key(test: &str) -> LeaseKey {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    LeaseKey {
        job_id: format!(
            "t-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ),
        epoch: 1,
    }
}

fn job(script: &str) -> JobSpec {
    JobSpec {
        image: IMAGE.to_string(),
        command: vec!["sh".to_string(), "-c".to_string(), script.to_string()],
        ..Default::default()
    }
}

struct Finished {
    outcome: Outcome,
    output: Vec<u8>,
    started: bool,
    /// From the cancel (if any) to the end of `run`.
    since_cancel: Option<Duration>,
}

impl Finished {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

/// How the test drives a run.
#[derive(Default)]
struct Drive {
    /// Cancel once the output contains this marker.
    cancel_on: Option<&'static str>,
    /// Channel capacity (small values exercise backpressure).
    capacity: Option<usize>,
    /// Sleep this long every 64 chunks received (a slow consumer).
    slow: Option<Duration>,
}

async fn run(h: &Harness, key: &LeaseKey, spec: &JobSpec, drive: Drive) -> Finished {
    let (tx, mut rx) = mpsc::channel::<Bytes>(drive.capacity.unwrap_or(64));
    let (started_tx, started_rx) = oneshot::channel();
    let cancel = CancellationToken::new();
    let (cancelled_tx, cancelled_rx) = oneshot::channel::<Instant>();
    let collector = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut output = Vec::new();
            let mut cancelled_tx = Some(cancelled_tx);
            let mut chunks = 0u64;
            while let Some(chunk) = rx.recv().await {
                output.extend_from_slice(&chunk);
                chunks += 1;
                if let Some(marker) = drive.cancel_on
                    && cancelled_tx.is_some()
                    && String::from_utf8_lossy(&output).contains(marker)
                {
                    if let Some(tx) = cancelled_tx.take() {
                        let _ = tx.send(Instant::now());
                    }
                    cancel.cancel();
                }
                if let Some(pause) = drive.slow
                    && chunks.is_multiple_of(64)
                {
                    tokio::time::sleep(pause).await;
                }
            }
            output
        })
    };
    let outcome = h.exec.run(key, spec, tx, cancel, started_tx).await;
    let ended = Instant::now();
    let output = collector.await.expect("collector task");
    let since_cancel = cancelled_rx.await.ok().map(|at| ended - at);
    assert_cleaned_up(h, key).await;
    Finished {
        outcome,
        output,
        started: started_rx.await.is_ok(),
        since_cancel,
    }
}

async fn containers_of(docker: &Docker, job_id: &str) -> Vec<String> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_string(),
            vec![format!("{}={job_id}", spec::LABEL_JOB)],
        )])),
        ..Default::default()
    };
    docker
        .list_containers(Some(options))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

async fn assert_cleaned_up(h: &Harness, key: &LeaseKey) {
    assert_eq!(
        containers_of(&h.docker, &key.job_id).await,
        Vec::<String>::new(),
        "a container of {key} is left"
    );
    let workspace = spec::workspace_dir(key, &h.work_dir).expect("workspace path");
    assert!(!workspace.exists(), "{} is left", workspace.display());
    let secrets = spec::secrets_dir(key, h.exec.config()).expect("secrets path");
    assert!(!secrets.exists(), "{} is left", secrets.display());
    let lease = spec::lease_dir(key, h.exec.config()).expect("lease path");
    assert!(!lease.exists(), "{} is left", lease.display());
    let image = spec::disks_dir(h.exec.config()).join(format!("{}-{}.img", key.job_id, key.epoch));
    assert!(!image.exists(), "{} is left", image.display());
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[tokio::test]
async fn exit_codes_propagate() {
    bounded(async {
        let h = harness(|_| {}).await;
        for code in [0, 7] {
            let done = run(
                &h,
                &key("exit"),
                &job(&format!("exit {code}")),
                Drive::default(),
            )
            .await;
            assert_eq!(
                done.outcome,
                Outcome::Exited {
                    code,
                    oom_killed: false
                }
            );
            assert!(done.started);
        }
    })
    .await;
}

#[tokio::test]
async fn output_arrives_complete_in_order_under_backpressure() {
    bounded(async {
        let h = harness(|_| {}).await;
        let drive = Drive {
            capacity: Some(2),
            slow: Some(Duration::from_millis(2)),
            ..Default::default()
        };
        let done = run(&h, &key("seq"), &job("seq 1 100000"), drive).await;
        assert_eq!(
            done.outcome,
            Outcome::Exited {
                code: 0,
                oom_killed: false
            }
        );
        let text = done.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 100_000);
        assert_eq!(lines.first(), Some(&"1"));
        assert_eq!(lines.last(), Some(&"100000"));
        let expected: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
        assert!(text == expected, "output differs from seq 1 100000");
    })
    .await;
}

/// Seconds since boot: the same clock inside and outside containers.
fn uptime() -> f64 {
    let text = std::fs::read_to_string("/proc/uptime").expect("/proc/uptime");
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("uptime")
}

#[tokio::test]
async fn a_slow_reader_slows_the_container_down() {
    bounded(async {
        let h = harness(|_| {}).await;
        let (tx, mut rx) = mpsc::channel::<Bytes>(1);
        let collector = tokio::spawn(async move {
            let mut output = Vec::new();
            let mut first_at = None;
            while let Some(chunk) = rx.recv().await {
                first_at.get_or_insert_with(uptime);
                output.extend_from_slice(&chunk);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (output, first_at.expect("some output"))
        });
        let (started_tx, _started_rx) = oneshot::channel();
        let k = key("slow");
        // About 4.5 MB, then the container's own clock when it got it all out.
        let script = "seq 1 600000; cut -d' ' -f1 /proc/uptime";
        let outcome = h
            .exec
            .run(&k, &job(script), tx, CancellationToken::new(), started_tx)
            .await;
        let (output, first_at) = collector.await.expect("collector task");
        assert_eq!(
            outcome,
            Outcome::Exited {
                code: 0,
                oom_killed: false
            }
        );
        let text = String::from_utf8_lossy(&output);
        let mut lines = text.lines().rev();
        let finished_at: f64 = lines
            .next()
            .and_then(|l| l.parse().ok())
            .expect("uptime line");
        assert_eq!(lines.next(), Some("600000"));
        // Unthrottled, seq is done in well under 0.2 s; a reader taking 10 ms
        // per chunk holds it back until most of the output is read.
        let held_back = finished_at - first_at;
        assert!(
            held_back > 0.5,
            "the container was not slowed down: {held_back:.3}s"
        );
        assert_cleaned_up(&h, &k).await;
    })
    .await;
}

#[tokio::test]
async fn output_of_an_immediate_exit_is_not_lost_and_stays_raw() {
    bounded(async {
        let h = harness(|_| {}).await;
        for _ in 0..3 {
            for (script, expected) in [
                (
                    r"printf 'out\377\000\001no newline'",
                    &b"out\xff\x00\x01no newline"[..],
                ),
                (
                    r"printf 'err\377 no newline' >&2",
                    &b"err\xff no newline"[..],
                ),
            ] {
                let done = run(&h, &key("quick"), &job(script), Drive::default()).await;
                assert_eq!(
                    done.outcome,
                    Outcome::Exited {
                        code: 0,
                        oom_killed: false
                    }
                );
                assert_eq!(done.output, expected.to_vec(), "{script}");
            }
        }
        // stdout and stderr are combined in arrival order.
        let done = run(
            &h,
            &key("interleave"),
            &job("echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three"),
            Drive::default(),
        )
        .await;
        assert_eq!(done.text(), "one\ntwo\nthree\n");
    })
    .await;
}

#[tokio::test]
async fn cancel_sends_exactly_one_sigint() {
    bounded(async {
        let h = harness(|c| c.stop_grace = Duration::from_secs(20)).await;
        // The job survives the SIGINT by two seconds: a second SIGINT would
        // print a second "got-int".
        let script = "trap 'echo got-int; touch /tmp/int' INT; echo ready; \
                      i=0; while [ ! -e /tmp/int ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                      sleep 2; echo done; exit 3";
        let drive = Drive {
            cancel_on: Some("ready"),
            ..Default::default()
        };
        let done = run(&h, &key("sigint"), &job(script), drive).await;
        let text = done.text();
        assert!(matches!(done.outcome, Outcome::Cancelled { .. }), "{:?}", done.outcome);
        assert_eq!(count(&text, "got-int"), 1, "{text}");
        assert!(text.contains("done"), "the job ran its own shutdown: {text}");
        let since = done.since_cancel.unwrap();
        assert!(since < Duration::from_secs(15), "stopped by SIGINT, not SIGKILL: {since:?}");
    })
    .await;
}

#[tokio::test]
async fn cancel_of_a_job_trapping_sigint_ends_it_promptly() {
    bounded(async {
        let h = harness(|c| c.stop_grace = Duration::from_secs(20)).await;
        let script = "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.1; done";
        let drive = Drive {
            cancel_on: Some("ready"),
            ..Default::default()
        };
        let done = run(&h, &key("trap"), &job(script), drive).await;
        assert!(
            matches!(done.outcome, Outcome::Cancelled { .. }),
            "{:?}",
            done.outcome
        );
        assert_eq!(count(&done.text(), "got-int"), 1, "{}", done.text());
        assert!(done.since_cancel.unwrap() < Duration::from_secs(10));
    })
    .await;
}

#[tokio::test]
async fn a_job_cancelled_before_it_starts_never_runs() {
    bounded(async {
        let h = harness(|_| {}).await;
        let k = key("precancel");
        let (tx, mut rx) = mpsc::channel(8);
        let (started_tx, started_rx) = oneshot::channel();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let outcome = h
            .exec
            .run(&k, &job("echo ran"), tx, cancel, started_tx)
            .await;
        assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
        assert!(started_rx.await.is_err(), "started must not fire");
        assert!(rx.recv().await.is_none(), "no output");
        assert_cleaned_up(&h, &k).await;
    })
    .await;
}

#[tokio::test]
async fn a_job_ignoring_sigint_is_killed_after_the_grace() {
    bounded(async {
        let h = harness(|c| c.stop_grace = Duration::from_secs(1)).await;
        let script = "trap '' INT; echo ready; while :; do sleep 0.1; done";
        let drive = Drive {
            cancel_on: Some("ready"),
            ..Default::default()
        };
        let done = run(&h, &key("ignore"), &job(script), drive).await;
        assert!(
            matches!(done.outcome, Outcome::Cancelled { .. }),
            "{:?}",
            done.outcome
        );
        let since = done.since_cancel.unwrap();
        assert!(
            since >= Duration::from_secs(1) && since < Duration::from_secs(15),
            "{since:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn timeout_interrupts_the_job() {
    bounded(async {
        let h = harness(|c| c.stop_grace = Duration::from_secs(1)).await;
        let mut spec = job("trap 'echo got-int; exit 3' INT; while :; do sleep 0.1; done");
        spec.timeout = Some(Duration::from_secs(1));
        let started = Instant::now();
        let done = run(&h, &key("timeout"), &spec, Drive::default()).await;
        assert_eq!(done.outcome, Outcome::TimedOut);
        assert_eq!(count(&done.text(), "got-int"), 1, "{}", done.text());
        assert!(started.elapsed() < Duration::from_secs(20));

        // Ignoring the SIGINT does not help either.
        let mut spec = job("trap '' INT; while :; do sleep 0.1; done");
        spec.timeout = Some(Duration::from_secs(1));
        let done = run(&h, &key("timeout-kill"), &spec, Drive::default()).await;
        assert_eq!(done.outcome, Outcome::TimedOut);
    })
    .await;
}

#[tokio::test]
async fn the_sandbox_holds_inside_the_job() {
    bounded(async {
        let h = harness(|_| {}).await;
        let script = r#"
            grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
            if touch /x 2>/dev/null; then echo rootfs=writable; else echo rootfs=readonly; fi
            echo hi > /workspace/x && echo workspace=writable
            echo hi > /tmp/x && echo tmp=writable
            printf '#!/bin/sh\necho ran\n' > /tmp/s && chmod +x /tmp/s
            if /tmp/s 2>/dev/null; then echo tmp=exec; else echo tmp=noexec; fi
            echo uid=$(id -u) gid=$(id -g) pwd=$(pwd)
            if [ -e /var/run/docker.sock ] || [ -e /run/docker.sock ]; then echo socket=present; else echo socket=absent; fi
            echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')
            echo memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null)
            echo swap=$(cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null)
            echo pids=$(cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null)
            echo mounts=$(grep -c -E ' /workspace ' /proc/self/mountinfo)
            echo pid1=$(tr '\0' ' ' < /proc/1/cmdline | cut -d' ' -f1)
        "#;
        let mut spec = job(script);
        spec.resources = Resources {
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(500_000_000),
            pids: Some(64),
            workspace_bytes: None,
        };
        let done = run(&h, &key("sandbox"), &spec, Drive::default()).await;
        let text = done.text();
        assert_eq!(
            done.outcome,
            Outcome::Exited {
                code: 0,
                oom_killed: false
            },
            "{text}"
        );
        for expected in [
            "CapPrm:\t0000000000000000",
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
            "rootfs=readonly",
            "workspace=writable",
            "tmp=writable",
            "tmp=noexec",
            "uid=1000 gid=1000 pwd=/workspace",
            "socket=absent",
            "memory=67108864",
            "pids=64",
            "mounts=1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(text.lines().any(|l| l == "interfaces=lo"), "{text}");
        // With no swap, memory+swap equals memory (cgroup v1 only).
        if let Some(swap) = text.lines().find_map(|l| l.strip_prefix("swap=")) {
            assert!(swap.is_empty() || swap == "67108864", "swap={swap}");
        }
        assert!(text.contains("pid1=/run/outpost-init"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn out_of_memory_is_reported() {
    bounded(async {
        let h = harness(|_| {}).await;
        let mut spec = job("exec dd if=/dev/zero of=/dev/null bs=64M count=1");
        spec.resources.memory_bytes = Some(16 << 20);
        let done = run(&h, &key("oom"), &spec, Drive::default()).await;
        assert_eq!(
            done.outcome,
            Outcome::Exited {
                code: 137,
                oom_killed: true
            },
            "{}",
            done.text()
        );
    })
    .await;
}

#[tokio::test]
async fn a_missing_image_fails_with_a_reason_naming_it() {
    bounded(async {
        let h = harness(|c| c.pull = PullPolicy::Never).await;
        let mut spec = job("true");
        spec.image = "outpost/does-not-exist:1".to_string();
        let done = run(&h, &key("noimage"), &spec, Drive::default()).await;
        assert_eq!(
            done.outcome,
            Outcome::Failed {
                reason: "image \"outpost/does-not-exist:1\" is not present on this agent and \
                         pulling is disabled"
                    .to_string()
            }
        );
        assert!(!done.started);

        // With pulling allowed, an unreachable registry is a failure too.
        let h = harness(|c| c.pull = PullPolicy::IfMissing).await;
        spec.image = "127.0.0.1:9/outpost/does-not-exist:1".to_string();
        let done = run(&h, &key("nopull"), &spec, Drive::default()).await;
        let Outcome::Failed { reason } = &done.outcome else {
            panic!("{:?}", done.outcome);
        };
        assert!(
            reason.starts_with("pulling image \"127.0.0.1:9/outpost/does-not-exist:1\" failed"),
            "{reason}"
        );
    })
    .await;
}

#[tokio::test]
async fn rejected_and_unstartable_jobs_are_reported() {
    bounded(async {
        let h = harness(|_| {}).await;
        let mut egress = job("true");
        egress.network = Network::Egress;
        let done = run(&h, &key("egress"), &egress, Drive::default()).await;
        assert_eq!(
            done.outcome,
            Outcome::Failed {
                reason: "the job was rejected by this agent: egress is not allowed by this \
                         agent's policy"
                    .to_string()
            }
        );

        let mut greedy = job("true");
        greedy.resources.memory_bytes = Some(64 << 30);
        let done = run(&h, &key("greedy"), &greedy, Drive::default()).await;
        let Outcome::Failed { reason } = &done.outcome else {
            panic!("{:?}", done.outcome);
        };
        assert!(reason.contains("above this agent's limit"), "{reason}");

        // A command that does not exist: either the engine or its init says so.
        let mut missing = job("true");
        missing.command = vec!["/no/such/binary".to_string()];
        let done = run(&h, &key("nocmd"), &missing, Drive::default()).await;
        match &done.outcome {
            Outcome::Exited { code: 127, .. } => {
                assert!(done.text().contains("/no/such/binary"), "{}", done.text())
            }
            Outcome::Failed { reason } => assert!(reason.contains("/no/such/binary"), "{reason}"),
            other => panic!("{other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_closed_output_receiver_does_not_stall_the_job() {
    bounded(async {
        let h = harness(|_| {}).await;
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let (started_tx, _started_rx) = oneshot::channel();
        let k = key("norecv");
        let outcome = h
            .exec
            .run(
                &k,
                &job("seq 1 200000; exit 4"),
                tx,
                CancellationToken::new(),
                started_tx,
            )
            .await;
        assert_eq!(
            outcome,
            Outcome::Exited {
                code: 4,
                oom_killed: false
            }
        );
        assert_cleaned_up(&h, &k).await;
    })
    .await;
}

#[tokio::test]
async fn a_dropped_run_still_removes_its_container() {
    bounded(async {
        let h = harness(|_| {}).await;
        let k = key("dropped");
        let (tx, _rx) = mpsc::channel(1024);
        let (started_tx, started_rx) = oneshot::channel();
        let spec = job("sleep 300");
        {
            let run = h
                .exec
                .run(&k, &spec, tx, CancellationToken::new(), started_tx);
            tokio::pin!(run);
            tokio::select! {
                _ = &mut run => panic!("the job ended early"),
                r = started_rx => r.unwrap(),
            }
            assert_eq!(containers_of(&h.docker, &k.job_id).await.len(), 1);
        } // the run future is dropped here
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containers_of(&h.docker, &k.job_id).await.is_empty()
            || spec::workspace_dir(&k, &h.work_dir).unwrap().exists()
        {
            assert!(
                Instant::now() < deadline,
                "cleanup after drop did not happen"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

/// Creates a running container as a crashed agent with `cfg` would have left it.
async fn leave_container(docker: &Docker, cfg: &SandboxConfig, k: &LeaseKey) -> String {
    leave_job(docker, cfg, k, &job("sleep 300")).await
}

/// Creates and starts `spec` as a crashed agent with `cfg` would have left it.
async fn leave_job(docker: &Docker, cfg: &SandboxConfig, k: &LeaseKey, spec: &JobSpec) -> String {
    let workspace = spec::workspace_dir(k, &cfg.work_dir).expect("workspace path");
    std::fs::create_dir_all(&workspace).expect("create workspace");
    let lease = spec::lease_dir(k, cfg).expect("lease path");
    std::fs::create_dir_all(&lease).expect("create lease dir");
    std::fs::write(lease.join("lease"), Lease::Unbounded.encode()).expect("write lease");
    let mut body = spec::container_config(k, spec, cfg, &workspace).expect("container config");
    spec::supervise(&mut body, None, cfg, spec.timeout).expect("supervise");
    let options = bollard::query_parameters::CreateContainerOptions {
        name: Some(spec::container_name(k).expect("container name")),
        ..Default::default()
    };
    let id = docker
        .create_container(Some(options), body)
        .await
        .expect("create container")
        .id;
    docker
        .start_container(&id, None)
        .await
        .expect("start container");
    id
}

#[tokio::test]
async fn cleanup_orphans_removes_this_agents_leftovers_only() {
    bounded(async {
        let h = harness(|_| {}).await;
        let orphan = key("orphan");
        leave_container(&h.docker, h.exec.config(), &orphan).await;
        let orphan_ws = spec::workspace_dir(&orphan, &h.work_dir).unwrap();
        let stray_ws = h.work_dir.join("crashed-job-42");
        std::fs::create_dir_all(stray_ws.join("sub")).unwrap();
        let unrelated = h.work_dir.join("not-a-workspace");
        std::fs::create_dir_all(&unrelated).unwrap();

        // Another agent on the same engine, with its own work_dir.
        let other_dir = tempfile::tempdir().unwrap();
        let other = DockerExecutor::connect(SandboxConfig {
            work_dir: other_dir.path().to_path_buf(),
            ..Default::default()
        })
        .await
        .expect("connect the other agent");
        let other_cfg = other.config().clone();
        let other = key("other-agent");
        let other_id = leave_container(&h.docker, &other_cfg, &other).await;

        assert_eq!(h.exec.cleanup_orphans().await.unwrap(), 1);
        assert!(containers_of(&h.docker, &orphan.job_id).await.is_empty());
        assert!(!orphan_ws.exists());
        assert!(!stray_ws.exists());
        assert!(
            unrelated.exists(),
            "only workspace-shaped entries are removed"
        );
        assert_eq!(
            containers_of(&h.docker, &other.job_id).await,
            vec![other_id.clone()]
        );
        assert_eq!(h.exec.cleanup_orphans().await.unwrap(), 0);

        let force = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        h.docker
            .remove_container(&other_id, Some(force))
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn connect_rejects_an_unknown_runtime() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SandboxConfig {
            work_dir: dir.path().to_path_buf(),
            runtime: Some("no-such-runtime".to_string()),
            ..Default::default()
        };
        let e = DockerExecutor::connect(cfg).await.unwrap_err().to_string();
        assert!(
            e.starts_with("container runtime \"no-such-runtime\" is not registered in the docker engine (registered: "),
            "{e}"
        );
        assert!(e.contains("runc"), "{e}");
    })
    .await;
}

/// Adopts `k` as a restarted agent would; output collected, cancel on marker.
async fn adopt(
    h: &Harness,
    k: &LeaseKey,
    spec: &JobSpec,
    skip: u64,
    cancel_on: Option<&'static str>,
) -> (Outcome, Vec<u8>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let cancel = CancellationToken::new();
    let collector = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut output = Vec::new();
            while let Some(chunk) = rx.recv().await {
                output.extend_from_slice(&chunk);
                if cancel_on.is_some_and(|m| String::from_utf8_lossy(&output).contains(m)) {
                    cancel.cancel();
                }
            }
            output
        })
    };
    let outcome = h.exec.adopt(k, spec, skip, tx, cancel).await;
    let output = collector.await.expect("collector task");
    assert_cleaned_up(h, k).await;
    (outcome, output)
}

#[tokio::test]
async fn adopt_follows_a_running_job_from_the_delivered_offset() {
    bounded(async {
        let h = harness(|_| {}).await;
        let k = key("adopt");
        // Raw bytes replay exactly (the `local` log driver keeps them).
        let spec = job(r"printf 'first\377\n'; sleep 1; printf 'second\377'; exit 5");
        leave_job(&h.docker, h.exec.config(), &k, &spec).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(h.exec.container_exists(&k).await);
        let (outcome, output) = adopt(&h, &k, &spec, b"first\xff\n".len() as u64, None).await;
        assert_eq!(
            outcome,
            Outcome::Exited {
                code: 5,
                oom_killed: false
            }
        );
        assert_eq!(output, b"second\xff");
        assert!(!h.exec.container_exists(&k).await);
    })
    .await;
}

#[tokio::test]
async fn adopt_collects_a_job_that_ended_while_the_agent_was_down() {
    bounded(async {
        let h = harness(|_| {}).await;
        let k = key("adopt-ended");
        let spec = job("echo done; exit 9");
        let id = leave_job(&h.docker, h.exec.config(), &k, &spec).await;
        let mut wait = h.docker.wait_container(&id, None);
        let _ = futures::StreamExt::next(&mut wait).await;
        assert!(h.exec.container_exists(&k).await);
        let (outcome, output) = adopt(&h, &k, &spec, 0, None).await;
        assert_eq!(
            outcome,
            Outcome::Exited {
                code: 9,
                oom_killed: false
            }
        );
        assert_eq!(output, b"done\n");

        // Nothing to adopt.
        let gone = key("adopt-gone");
        assert!(!h.exec.container_exists(&gone).await);
        let (outcome, _) = adopt(&h, &gone, &spec, 0, None).await;
        assert_eq!(
            outcome,
            Outcome::Failed {
                reason: "the job's container no longer exists".to_string()
            }
        );
    })
    .await;
}

#[tokio::test]
async fn adopt_cancels_with_one_sigint_and_keeps_the_original_timeout() {
    bounded(async {
        let h = harness(|c| c.stop_grace = Duration::from_secs(10)).await;
        let script = "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.1; done";
        let k = key("adopt-cancel");
        leave_job(&h.docker, h.exec.config(), &k, &job(script)).await;
        let (outcome, output) = adopt(&h, &k, &job(script), 0, Some("ready")).await;
        let output = String::from_utf8_lossy(&output);
        assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
        assert_eq!(count(&output, "got-int"), 1, "{output}");

        // The timeout counts from the container's start, not the adoption.
        let mut spec = job(script);
        spec.timeout = Some(Duration::from_secs(3));
        let k = key("adopt-timeout");
        leave_job(&h.docker, h.exec.config(), &k, &spec).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let adopted_at = Instant::now();
        let (outcome, output) = adopt(&h, &k, &spec, 0, None).await;
        let output = String::from_utf8_lossy(&output);
        assert_eq!(outcome, Outcome::TimedOut);
        assert_eq!(count(&output, "got-int"), 1, "{output}");
        let took = adopted_at.elapsed();
        assert!(took < Duration::from_millis(2500), "{took:?}");
    })
    .await;
}

#[tokio::test]
async fn cleanup_orphans_except_keeps_the_adopted_jobs() {
    bounded(async {
        let h = harness(|_| {}).await;
        let keep = key("keep");
        let drop = key("drop");
        leave_container(&h.docker, h.exec.config(), &keep).await;
        leave_container(&h.docker, h.exec.config(), &drop).await;
        assert_eq!(
            h.exec
                .cleanup_orphans_except(std::slice::from_ref(&keep))
                .await
                .unwrap(),
            1
        );
        assert!(h.exec.container_exists(&keep).await);
        assert!(spec::workspace_dir(&keep, &h.work_dir).unwrap().exists());
        assert!(!h.exec.container_exists(&drop).await);
        assert!(!spec::workspace_dir(&drop, &h.work_dir).unwrap().exists());
        assert_eq!(h.exec.cleanup_orphans().await.unwrap(), 1);
        assert!(!h.exec.container_exists(&keep).await);
    })
    .await;
}

fn with_secret(mut spec: JobSpec, name: &str, value: &str) -> JobSpec {
    spec.secrets.push(JobSecret {
        name: name.to_string(),
        value: SecretBytes::new(value),
    });
    spec
}

#[tokio::test]
async fn secrets_are_the_jobs_own_files_and_masked_across_chunks() {
    bounded(async {
        let h = harness(|_| {}).await;
        let script = r#"
            stat -c 'file=%a %u %g' /run/secrets/pw
            cat /run/secrets/pw; echo
            printf 'hun'; sleep 0.5; printf 'ter2'; sleep 0.5; echo ' split'
            printf 'x hun'; sleep 0.2; echo noise >&2; sleep 0.2; echo 'ter2 y'
            if env | grep -q hunter2; then echo env=leak; else echo env=clean; fi
            if (echo x > /run/secrets/pw) 2>/dev/null; then echo ro=no; else echo ro=yes; fi
        "#;
        let spec = with_secret(job(script), "pw", "hunter2");
        let k = key("secrets");
        let done = run(&h, &k, &spec, Drive::default()).await;
        let text = done.text();
        assert_eq!(
            done.outcome,
            Outcome::Exited {
                code: 0,
                oom_killed: false
            },
            "{text}"
        );
        // Not even a piece: stdout and stderr are masked apart.
        assert!(!text.contains("hun") && !text.contains("ter2"), "{text}");
        assert_eq!(
            text.replacen("noise\n", "", 1),
            "file=400 1000 1000\n***\n*** split\nx *** y\nenv=clean\nro=yes\n",
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn output_past_the_limit_is_cut_exactly_and_fails_the_job() {
    bounded(async {
        let h = harness(|c| c.max_output_bytes = 100_000).await;
        let spec = job("yes 0123456789 | head -c 1000000; echo after; sleep 30");
        let started = Instant::now();
        let done = run(&h, &key("cap"), &spec, Drive::default()).await;
        assert_eq!(done.output.len(), 100_000);
        match &done.outcome {
            Outcome::Failed { reason } => {
                assert!(reason.contains("limit of 100000 bytes"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(20));

        // Exactly at the limit is fine.
        let spec = job("head -c 100000 /dev/zero");
        let done = run(&h, &key("at-cap"), &spec, Drive::default()).await;
        assert_eq!(done.output.len(), 100_000);
        assert_eq!(
            done.outcome,
            Outcome::Exited {
                code: 0,
                oom_killed: false
            }
        );
    })
    .await;
}

#[tokio::test]
async fn adopt_masks_the_replay_before_skipping() {
    bounded(async {
        let h = harness(|_| {}).await;
        let k = key("adopt-mask");
        // The container prints the value itself (it has no secrets mount);
        // the adopted spec carries the secret to mask.
        let plain = job(
            "printf 'one hunter2 two\\n'; sleep 1; printf 'three hun'; sleep 0.3; printf 'ter2 four'",
        );
        leave_job(&h.docker, h.exec.config(), &k, &plain).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let secret = with_secret(plain, "pw", "hunter2");
        // Delivered before the restart: the masked first line.
        let skip = b"one *** two\n".len() as u64;
        let (outcome, output) = adopt(&h, &k, &secret, skip, None).await;
        assert_eq!(
            outcome,
            Outcome::Exited {
                code: 0,
                oom_killed: false
            }
        );
        assert_eq!(String::from_utf8_lossy(&output), "three *** four");
    })
    .await;
}

#[tokio::test]
async fn the_workspace_is_a_bounded_nosuid_filesystem_and_filling_it_fails_the_job() {
    bounded(async {
        let h = harness(|c| c.workspace_bytes = 32 << 20).await;
        let script = "grep ' /workspace ' /proc/self/mountinfo; \
                      stat -f -c 'bytes=%b*%S' /workspace; \
                      ls -A /workspace | wc -l | sed 's/^ */entries=/'; \
                      dd if=/dev/zero of=/workspace/fill bs=1M count=64 2>&1; echo dd=$?; exit 1";
        let done = run(&h, &key("disk"), &job(script), Drive::default()).await;
        let text = done.text();
        assert_eq!(
            done.outcome,
            Outcome::Failed {
                reason: "workspace full (32 MiB): the job wrote as much as its workspace holds \
                         (exit code 1)"
                    .to_string()
            },
            "{text}"
        );
        let mountinfo = text.lines().next().unwrap_or_default();
        assert!(
            mountinfo.contains("nosuid") && mountinfo.contains("nodev"),
            "the workspace is mounted nosuid,nodev: {text}"
        );
        assert!(text.contains("entries=0"), "an empty workspace: {text}");
        let total = |text: &str| -> u64 {
            let product = text
                .lines()
                .find_map(|l| l.strip_prefix("bytes="))
                .expect("bytes line");
            let (blocks, size) = product.split_once('*').expect("blocks*size");
            blocks.trim().parse::<u64>().unwrap() * size.trim().parse::<u64>().unwrap()
        };
        let bytes = total(&text);
        assert!((24 << 20..=32 << 20).contains(&bytes), "{bytes}: {text}");
        assert!(text.contains("No space left on device"), "{text}");

        // A job may ask for less, never more.
        let mut small = job("stat -f -c 'bytes=%b*%S' /workspace");
        small.resources.workspace_bytes = Some(20 << 20);
        let done = run(&h, &key("disk-small"), &small, Drive::default()).await;
        let bytes = total(&done.text());
        assert!((12 << 20..=20 << 20).contains(&bytes), "{bytes}");
        let mut big = job("true");
        big.resources.workspace_bytes = Some(64 << 20);
        let done = run(&h, &key("disk-big"), &big, Drive::default()).await;
        assert!(
            matches!(&done.outcome, Outcome::Failed { reason } if reason.contains("workspace_bytes")),
            "{:?}",
            done.outcome
        );
    })
    .await;
}

#[tokio::test]
async fn outpost_init_is_pid_1_and_cannot_be_killed_or_traced_by_the_job() {
    bounded(async {
        let h = harness(|_| {}).await;
        let script = "echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline | cut -d' ' -f1); \
                      kill -KILL 1; kill -STOP 1; sleep 0.2; \
                      grep State /proc/1/status; \
                      if cat /proc/1/environ >/dev/null 2>&1; then echo environ=readable; else echo environ=denied; fi; \
                      exit 4";
        let done = run(&h, &key("init"), &job(script), Drive::default()).await;
        let text = done.text();
        assert_eq!(
            done.outcome,
            Outcome::Exited {
                code: 4,
                oom_killed: false
            },
            "the job's own exit code comes through: {text}"
        );
        assert!(text.contains("pid1=/run/outpost-init"), "{text}");
        assert!(text.contains("State:\tS (sleeping)"), "not stopped: {text}");
        assert!(text.contains("environ=denied"), "non-dumpable: {text}");
    })
    .await;
}
