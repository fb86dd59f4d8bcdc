//! End-to-end: the job sandbox, through the control plane, on a real Docker
//! engine. What a job can see and do from inside (capabilities, seccomp,
//! read-only root, no Docker socket, limits), egress networks (no metadata,
//! no host, no other job), secrets (files on tmpfs, never environment,
//! masked in logs), the output cap, timeouts, a missing runtime, and that
//! nothing is left behind, even after an agent crash.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_tests::sandbox_helpers::{
    JobLeftoversGuard, NetFixture, inspect_job, networks_of, probe, rules_of, secrets_path, verdict,
};
use outpost_tests::{Cluster, bin, containers_of, spec, state};

/// Bound of every wait (a failure bound, not a performance claim).
const LIMIT: Duration = Duration::from_secs(120);

fn script(text: &str) -> pb::JobSpec {
    spec(&["sh", "-c", text])
}

fn egress(mut s: pb::JobSpec) -> pb::JobSpec {
    s.network = pb::NetworkMode::Egress as i32;
    s
}

async fn log_text(c: &Cluster, id: &str) -> String {
    String::from_utf8_lossy(&c.logs(id).await).into_owned()
}

/// Waits (bounded) until the job's stored log contains `marker`.
async fn wait_log(c: &Cluster, id: &str, marker: &str) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let log = log_text(c, id).await;
        if log.contains(marker) {
            return log;
        }
        let j = c.job(id).await;
        assert!(
            !outpost_tests::is_final(&j),
            "job {id} ended before printing {marker:?}: {j:?}\n{log}"
        );
        assert!(
            Instant::now() < deadline,
            "no {marker:?} from {id}: {j:?}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cancel(c: &Cluster, id: &str) {
    c.client()
        .await
        .cancel_job(admin::CancelJobRequest { job_id: id.into() })
        .await
        .expect("cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_escape_its_sandbox_and_gets_the_limits_it_asked_for() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let mut s = script(
        r#"
        grep -E '^(CapEff|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status
        if touch /x 2>/dev/null; then echo root=writable; else echo root=readonly; fi
        if [ -e /var/run/docker.sock ] || [ -e /run/docker.sock ]; then echo socket=present; else echo socket=absent; fi
        echo interfaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')
        echo memory=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null)
        echo cpu=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max)
        echo pids=$(cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null)
        echo uid=$(id -u)
        "#,
    );
    s.resources = Some(pb::Resources {
        memory_bytes: 64 << 20,
        nano_cpus: 500_000_000,
        pids: 32,
        ..Default::default()
    });
    let ok = c.submit_spec(s).await;
    // Asking for more than the agent's ceiling (1 GiB) is refused.
    let mut big = script("echo should-not-run");
    big.resources = Some(pb::Resources {
        memory_bytes: 2 << 30,
        ..Default::default()
    });
    let big = c.submit_spec(big).await;

    let j = c.wait_final(&ok, LIMIT).await;
    let log = log_text(&c, &ok).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    for expected in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "root=readonly",
        "socket=absent",
        "interfaces=lo\n",
        "memory=67108864",
        "cpu=50000",
        "pids=32",
        "uid=1000",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    let j = c.wait_final(&big, LIMIT).await;
    assert!(
        matches!(state(&j), pb::JobState::Rejected | pb::JobState::Failed),
        "{j:?}"
    );
    assert!(j.message.contains("above this agent's"), "{j:?}");
    assert!(!log_text(&c, &big).await.contains("should-not-run"));
    for id in [&ok, &big] {
        assert!(containers_of(id).await.is_empty());
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_the_pids_limit() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let mut bomb = script("echo start; b(){ b|b& }; b; sleep 2; echo after");
    // The shell itself survives its bomb: `echo` needs no fork, so the job
    // ends by itself (exit 0) and the container's end kills the bomb.
    bomb.resources = Some(pb::Resources {
        pids: 32,
        ..Default::default()
    });
    bomb.timeout_ms = 20_000;
    let bomb = c.submit_spec(bomb).await;

    let j = c.wait_final(&bomb, LIMIT).await;
    let log = log_text(&c, &bomb).await;
    assert!(
        log.contains("can't fork"),
        "the pids limit stopped it:\n{log}"
    );
    // stdout and stderr are separate pipes: their relative order in the
    // log is not the job's, so each line is looked for, not its position.
    assert!(log.contains("start\n"), "{log}");
    assert!(log.contains("after\n"), "the job ran to its end:\n{log}");
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    assert_eq!(j.exit_code, Some(0), "{j:?}");

    assert!(containers_of(&bomb).await.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_reported_as_oom() {
    let c = Cluster::start().await;
    let agent = c.start_agent(1).await;
    // The engine (20.10, cgroup v1) watches a container's OOM events only
    // once it has started it: a process killed in its first milliseconds,
    // on a loaded machine, can exit 137 with no OOM event
    // recorded at all. A hog that grows after the start is what jobs do.
    let mut hog = script("sleep 1; exec dd if=/dev/zero of=/dev/null bs=64M count=1");
    hog.resources = Some(pb::Resources {
        memory_bytes: 16 << 20,
        ..Default::default()
    });
    let hog = c.submit_spec(hog).await;
    let j = c.wait_final(&hog, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Failed, "{j:?}");
    assert!(j.oom_killed, "{j:?}");
    assert!(j.message.contains("out of memory"), "{j:?}");
    assert!(containers_of(&hog).await.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_out_but_never_metadata_the_host_or_another_job() {
    let fx = NetFixture::start().await;
    let c = Cluster::start().await;
    let agent = c.start_agent_with(c.egress_agent_config(3)).await;

    // Job A listens; it checks its own listener so that "blocked" below
    // means the firewall, not a missing listener.
    let a = c
        .submit_spec(egress(script(&format!(
            "(while true; do echo JOB-A | nc -l -p 8080; done) &\n\
             sleep 0.3; me=$(hostname -i); echo ip=$me\n{}echo ready; sleep 600",
            probe("self", "$me", 8080)
        ))))
        .await;
    let _guard_a = JobLeftoversGuard(a.clone());
    let log_a = wait_log(&c, &a, "ready").await;
    assert!(
        verdict(&log_a, "self").starts_with("REACHED JOB-A"),
        "{log_a}"
    );
    let ip_a = verdict(&log_a, "ip");
    let net_a = networks_of(&a).await;
    assert_eq!(net_a, vec![format!("outpost-{a}-1")]);
    assert_eq!(rules_of(&a).len(), 4, "{:?}", rules_of(&a));

    let outside = fx.outside;
    let host_addr = fx.host_side.clone();
    let b = c
        .submit_spec(egress(script(&format!(
            "gw=$(ip route | awk '/default/ {{print $3}}')\necho gw=$gw\n{}{}{}{}{}",
            probe("outside", &outside.ip().to_string(), outside.port()),
            probe("metadata", "169.254.169.254", 80),
            probe("gateway", "$gw", fx.host_port),
            probe("hostaddr", &host_addr, fx.host_port),
            probe("otherjob", &ip_a, 8080),
        ))))
        .await;
    let none = c
        .submit_spec(script(&format!(
            "{}{}",
            probe("metadata", "169.254.169.254", 80),
            probe("outside", &outside.ip().to_string(), outside.port()),
        )))
        .await;

    let j = c.wait_final(&b, LIMIT).await;
    let log_b = log_text(&c, &b).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log_b}");
    assert!(
        verdict(&log_b, "outside").starts_with("REACHED OUTSIDE"),
        "egress works:\n{log_b}"
    );
    // The gateway probe went to the job's real gateway, not to "".
    let gw: std::net::Ipv4Addr = verdict(&log_b, "gw")
        .parse()
        .unwrap_or_else(|e| panic!("no gateway address ({e}):\n{log_b}"));
    assert!(!gw.is_unspecified() && !gw.is_loopback(), "{gw}");
    for blocked in ["metadata", "gateway", "hostaddr", "otherjob"] {
        assert!(
            verdict(&log_b, blocked).starts_with("BLOCKED"),
            "{blocked} reachable from an egress job:\n{log_b}"
        );
    }
    // Job A (and so its listener) still ran while B probed it.
    let j = c.job(&a).await;
    assert_eq!(state(&j), pb::JobState::Running, "{j:?}");
    let j = c.wait_final(&none, LIMIT).await;
    let log_none = log_text(&c, &none).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log_none}");
    for blocked in ["metadata", "outside"] {
        assert!(
            verdict(&log_none, blocked).starts_with("BLOCKED"),
            "{blocked} reachable with network none:\n{log_none}"
        );
    }

    cancel(&c, &a).await;
    let j = c.wait_final(&a, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    for id in [&a, &b, &none] {
        assert!(containers_of(id).await.is_empty(), "container of {id}");
        assert!(networks_of(id).await.is_empty(), "network of {id}");
        assert!(rules_of(id).is_empty(), "rules of {id}: {:?}", rules_of(id));
    }
    agent.stop().await;
    drop(fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_private_tmpfs_files_never_environment_and_masked_in_logs() {
    let c = Cluster::start().await;
    let cfg = c.agent_config(1);
    let sandbox = cfg.sandbox.clone();
    let agent = c.start_agent_with(cfg).await;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let canary = format!("cAnArY{}x{nanos:09}Q", std::process::id());
    let (first, second) = canary.split_at(canary.len() / 2);
    let mut s = script(&format!(
        r#"
        stat -c 'file=%a %u %g' /run/secrets/token
        stat -c 'dir=%a %u' /run/secrets
        if (echo x > /run/secrets/new) 2>/dev/null; then echo secrets=writable; else echo secrets=readonly; fi
        if grep -qF -f /run/secrets/token /proc/1/environ /proc/self/environ; then echo environ=LEAK; else echo environ=clean; fi
        echo mounted=$(grep -c ' /run/secrets ' /proc/self/mountinfo)
        echo "plain: $(cat /run/secrets/token)"
        v=$(cat /run/secrets/token)
        # The shell's trace on stdout: one stream, so that no line of the
        # other stream can land inside it.
        exec 3>&2 2>&1
        set -x
        : "traced $v"
        set +x
        exec 2>&3 3>&-
        printf 'split: %s' '{first}'; sleep 1; printf '%s end\n' '{second}'
        (i=0; while [ $i -lt 20 ]; do echo noise-$i >&2; i=$((i+1)); sleep 0.05; done) &
        printf 'interleaved: %s' '{first}'; sleep 0.3; printf '%s\n' '{second}'; wait
        echo inspect-now
        i=0; while [ ! -e /workspace/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
        echo bye
        "#
    ));
    s.secrets = vec![pb::Secret {
        name: "token".into(),
        value: canary.clone().into_bytes(),
    }];
    let id = c.submit_spec(s).await;
    wait_log(&c, &id, "inspect-now").await;

    // While it runs: not in the container's configuration, and on the host
    // only as this job's 0400 file.
    let inspect = inspect_job(&id).await.expect("the job's container");
    let json = serde_json::to_string(&inspect).expect("json");
    assert!(!json.contains(&canary), "the secret is in docker inspect");
    let file = secrets_path(&sandbox, &id, 1).join("token");
    let meta = std::fs::metadata(&file).expect("the secret file on the host");
    assert_eq!(meta.mode() & 0o777, 0o400);
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert_eq!(std::fs::read(&file).expect("read"), canary.as_bytes());
    // Let the job finish.
    let workspace = sandbox
        .work_dir
        .canonicalize()
        .expect("work_dir")
        .join(format!("{id}-1"));
    std::fs::write(workspace.join("go"), b"").expect("signal the job");
    let root = file
        .parent()
        .and_then(|p| p.parent())
        .and_then(|p| p.parent());
    let fs = nix::sys::statfs::statfs(root.expect("secrets_dir")).expect("statfs");
    assert_eq!(
        fs.filesystem_type(),
        nix::sys::statfs::TMPFS_MAGIC,
        "secrets live on tmpfs"
    );

    let j = c.wait_final(&id, LIMIT).await;
    let log = log_text(&c, &id).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    assert!(!log.contains(&canary), "the secret reached the log:\n{log}");
    assert!(!format!("{j:?}").contains(&canary));
    for expected in [
        "file=400 1000 1000",
        "dir=500 1000",
        "secrets=readonly",
        "environ=clean",
        "mounted=1",
        "plain: ***\n",
        "+ : 'traced ***'",
        "*** end\n",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    // Not even a half: a stream's piece that may begin a secret waits for
    // the rest, whatever the other stream writes meanwhile.
    assert!(!log.contains(first) && !log.contains(second), "{log}");
    assert_eq!(log.matches("***").count(), 4, "{log}");
    assert!(log.contains("noise-19"), "{log}");
    assert!(containers_of(&id).await.is_empty());
    assert!(!file.exists(), "the secret file outlived the job");
    assert!(!file.parent().expect("dir").exists());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_cap_fails_the_job_and_a_timeout_times_it_out() {
    const CAP: u64 = 64 * 1024;
    let c = Cluster::start().await;
    let mut cfg = c.agent_config(2);
    cfg.sandbox.max_output_bytes = CAP;
    let agent = c.start_agent_with(cfg).await;
    let loud = c
        .submit(&[
            "sh",
            "-c",
            "yes 0123456789abcdef | head -c 1000000; echo after; sleep 30",
        ])
        .await;
    let mut slow = script("echo started; sleep 30");
    slow.timeout_ms = 1_000;
    let slow = c.submit_spec(slow).await;

    let j = c.wait_final(&loud, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Failed, "{j:?}");
    assert!(j.message.contains("max_output_bytes"), "{j:?}");
    let log = c.logs(&loud).await;
    assert_eq!(log.len() as u64, CAP, "exactly the cap is kept");
    assert!(log.starts_with(b"0123456789abcdef\n"));

    let j = c.wait_final(&slow, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::TimedOut, "{j:?}");
    assert!(j.message.contains("timeout"), "{j:?}");
    for id in [&loud, &slow] {
        assert!(containers_of(id).await.is_empty());
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_runtime_stops_the_agent_with_a_clear_error() {
    let c = Cluster::start().await;
    let config = c.write_agent_config("no-runtime", 1, "", "runtime = \"outpost-missing-runtime\"");
    let log = config.with_extension("log");
    let mut child = std::process::Command::new(bin("outpost-agent"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn outpost-agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running without its runtime");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{status:?}\n{text}");
    assert!(
        text.contains("container runtime \"outpost-missing-runtime\" is not registered"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_agent_crash_the_next_start_leaves_nothing_behind() {
    let c = Cluster::start().await;
    let config = c.write_agent_config("crashy", 1, "", "[policy]\nallow_egress = true");
    let mut agent = c.spawn_agent("crashy", &config).await;
    let mut s = egress(script("echo up; sleep 120"));
    s.secrets = vec![pb::Secret {
        name: "token".into(),
        value: b"crash-canary".to_vec(),
    }];
    let id = c.submit_spec(s).await;
    let _guard = JobLeftoversGuard(id.clone());
    let job_started = tokio::time::timeout(LIMIT, wait_log(&c, &id, "up")).await;
    assert!(job_started.is_ok(), "agent log:\n{}", agent.log_text());
    let sandbox = outpost_agent::executor::SandboxConfig {
        work_dir: config.parent().expect("agent dir").join("work"),
        ..Default::default()
    };
    let secrets = secrets_path(&sandbox, &id, 1);
    assert_eq!(containers_of(&id).await.len(), 1);
    assert_eq!(networks_of(&id).await.len(), 1);
    assert_eq!(rules_of(&id).len(), 4);
    assert!(secrets.join("token").exists());

    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
    // The crash leaves everything in place, the firewall still fencing the
    // job that still runs.
    assert_eq!(containers_of(&id).await.len(), 1);
    assert_eq!(rules_of(&id).len(), 4);
    // Nothing to re-adopt: the job is cancelled and the agent's spool lost.
    cancel(&c, &id).await;
    std::fs::remove_dir_all(agent.state_dir.join("spool")).expect("remove the spool");
    drop(agent);

    let agent = c.spawn_agent("crashy", &config).await;
    assert!(containers_of(&id).await.is_empty(), "container left");
    assert!(networks_of(&id).await.is_empty(), "network left");
    assert!(rules_of(&id).is_empty(), "rules left: {:?}", rules_of(&id));
    assert!(!secrets.exists(), "secrets left");
    drop(agent);
}

/// Every form in which a secret value could leak into text: raw, base64
/// (standard and URL-safe), hex, and a byte list (`Debug` of a `Vec<u8>`).
fn secret_forms(value: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    let list: Vec<String> = value.iter().take(6).map(u8::to_string).collect();
    vec![
        value.to_vec(),
        STANDARD.encode(value).into_bytes(),
        URL_SAFE_NO_PAD.encode(value).into_bytes(),
        hex.to_uppercase().into_bytes(),
        hex.into_bytes(),
        list.join(", ").into_bytes(),
    ]
}

fn assert_no_secret(what: &str, haystack: &[u8], forms: &[Vec<u8>]) {
    for form in forms {
        assert!(
            !haystack.windows(form.len()).any(|w| w == form.as_slice()),
            "{what} holds the secret as {:?}:\n{}",
            String::from_utf8_lossy(form),
            String::from_utf8_lossy(haystack)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_never_logs_or_returns_a_secret_value() {
    use prost::Message;
    let captured = outpost_tests::Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,outpost=trace,outpost_proto=trace",
        ))
        .with_writer(captured.clone())
        .with_ansi(false)
        .init();
    let c = Cluster::start().await;
    let config = c.write_agent_config("s", 1, "", "");
    let agent = c.spawn_agent("s", &config).await;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let canary = format!("sEcReT{}y{nanos:09}Z", std::process::id());
    let forms = secret_forms(canary.as_bytes());
    let mut s = script(
        "echo \"value: $(cat /run/secrets/token)\"; echo running; \
         i=0; while [ ! -e /workspace/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo bye",
    );
    s.selector.insert("zone".into(), "test".into());
    s.secrets = vec![pb::Secret {
        name: "token".into(),
        value: canary.clone().into_bytes(),
    }];
    let mut client = c.client().await;
    let submitted = client
        .submit_job(admin::SubmitJobRequest { spec: Some(s) })
        .await
        .expect("submit")
        .into_inner();
    let id = submitted.job_id.clone();
    let mut responses: Vec<(String, Vec<u8>)> = vec![(
        "submit".into(),
        [
            format!("{submitted:?}").into_bytes(),
            submitted.encode_to_vec(),
        ]
        .concat(),
    )];

    // Every admin answer, while the job runs and once it is final.
    async fn every_answer(c: &Cluster, id: &str, out: &mut Vec<(String, Vec<u8>)>) -> admin::Job {
        let mut client = c.client().await;
        let job = client
            .get_job(admin::GetJobRequest { job_id: id.into() })
            .await
            .expect("get")
            .into_inner();
        let jobs = client
            .list_jobs(admin::ListJobsRequest {
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        let agents = client
            .list_agents(admin::ListAgentsRequest {})
            .await
            .expect("agents")
            .into_inner();
        let artifacts = client
            .list_artifacts(admin::ListArtifactsRequest { job_id: id.into() })
            .await
            .expect("artifacts")
            .into_inner();
        let mut logs = client
            .follow_logs(admin::FollowLogsRequest {
                job_id: id.into(),
                offset: 0,
                follow: false,
                epoch: 0,
            })
            .await
            .expect("logs")
            .into_inner();
        while let Some(d) = logs.message().await.expect("log stream") {
            out.push((
                "logs".into(),
                [format!("{d:?}").into_bytes(), d.encode_to_vec()].concat(),
            ));
        }
        for (what, debug, bytes) in [
            ("get_job", format!("{job:?}"), job.encode_to_vec()),
            ("list_jobs", format!("{jobs:?}"), jobs.encode_to_vec()),
            ("list_agents", format!("{agents:?}"), agents.encode_to_vec()),
            (
                "list_artifacts",
                format!("{artifacts:?}"),
                artifacts.encode_to_vec(),
            ),
        ] {
            out.push((what.into(), [debug.into_bytes(), bytes].concat()));
        }
        for args in [
            vec![
                "job".to_string(),
                id.to_string(),
                "--output".into(),
                "json".into(),
            ],
            vec!["jobs".into(), "--output".into(), "json".into()],
            vec!["logs".into(), id.to_string()],
        ] {
            let o = std::process::Command::new(bin("outpost"))
                .arg("--state-dir")
                .arg(&c.state.root)
                .args(&args)
                .output()
                .expect("outpost CLI");
            assert!(o.status.success(), "outpost {args:?}: {o:?}");
            out.push((format!("outpost {args:?}"), [o.stdout, o.stderr].concat()));
        }
        job
    }
    wait_log(&c, &id, "running").await;
    let j = every_answer(&c, &id, &mut responses).await;
    assert_eq!(state(&j), pb::JobState::Running, "{j:?}");
    let workspace = config
        .parent()
        .expect("agent dir")
        .join("work")
        .canonicalize()
        .expect("work_dir")
        .join(format!("{id}-1"));
    std::fs::write(workspace.join("go"), b"").expect("release the job");
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    let j = every_answer(&c, &id, &mut responses).await;
    let cancel = client
        .cancel_job(admin::CancelJobRequest { job_id: id.clone() })
        .await
        .expect("cancel")
        .into_inner();
    responses.push((
        "cancel_job".into(),
        [format!("{cancel:?}").into_bytes(), cancel.encode_to_vec()].concat(),
    ));
    let drain = client
        .drain_agent(admin::DrainAgentRequest {
            agent_id: "s".into(),
        })
        .await
        .expect("drain")
        .into_inner();
    responses.push((
        "drain_agent".into(),
        [format!("{drain:?}").into_bytes(), drain.encode_to_vec()].concat(),
    ));

    // The job did print it: the agent masked it before it left.
    let log = log_text(&c, &id).await;
    assert_eq!(log, "value: ***\nrunning\nbye\n", "{j:?}");
    for (what, bytes) in &responses {
        assert_no_secret(what, bytes, &forms);
    }
    let logs = captured.text();
    // The capture did see the control plane at work (so its silence about
    // the secret means something).
    for expected in ["job submitted", "lease pushed", "job status", &id] {
        assert!(logs.contains(expected), "no {expected:?} in:\n{logs}");
    }
    assert_no_secret("the control plane's log", logs.as_bytes(), &forms);
    assert_no_secret("the agent's log", agent.log_text().as_bytes(), &forms);
}
