//! State directories, the store and its limits, as an operator meets them:
//! real `outpost` and `outpost-agent` processes, a real Docker engine and
//! real mTLS.
//!
//! - a broken or empty store stops `outpost server` and `outpost dev` with
//!   its error (never a hang, never a silently empty store);
//! - one process per state directory (`flock`), the second names the first;
//! - private (0700/0600) state whatever the umask or an existing directory;
//! - Ctrl-C of `outpost dev` stops like a restart: the job is re-adopted;
//! - every accepted spec can be leased and listed; a lease no agent can take
//!   ends the job `FAILED` after a few tries;
//! - retention and `outpost jobs prune` delete final jobs and shrink the store.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost::client::{ClientConfig, StateDir};
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_tests::{Cluster, bin, containers_of, numbered_job, state};

fn outpost(state: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(bin("outpost"));
    c.arg("--state-dir")
        .arg(state)
        .env("OUTPOST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs `cmd` to its end (bounded); returns its exit code and stderr.
async fn exit_of(mut cmd: tokio::process::Command, limit: Duration) -> (Option<i32>, String) {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} still running after {limit:?}"))
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A process whose stderr goes to a file, killed when dropped.
struct Proc {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: tokio::process::Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn");
        Proc { child, log }
    }
    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(s) => s.expect("wait"),
            Err(_) => panic!(
                "still running after {limit:?}; its log:\n{}",
                self.log_text()
            ),
        }
    }
    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }
}

/// Waits until the control plane of `state` answers an admin call (and,
/// with `agent`, lists it connected); returns its client configuration.
async fn wait_control_plane(state: &StateDir, agent: Option<&str>, p: &Proc) -> ClientConfig {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(cfg) = ClientConfig::from_state(state, None)
            && let Ok(mut c) = cfg.connect().await
            && let Ok(r) = c.list_agents(admin::ListAgentsRequest {}).await
            && agent.is_none_or(|a| {
                r.get_ref()
                    .agents
                    .iter()
                    .any(|x| x.agent_id == a && x.connected)
            })
        {
            return cfg;
        }
        assert!(
            Instant::now() < deadline,
            "control plane not up in 90s; its log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(cfg: &ClientConfig, id: &str) -> admin::Job {
    cfg.connect()
        .await
        .expect("connect")
        .get_job(admin::GetJobRequest { job_id: id.into() })
        .await
        .expect("get job")
        .into_inner()
}

async fn wait_job(
    cfg: &ClientConfig,
    id: &str,
    limit: Duration,
    pred: impl Fn(&admin::Job) -> bool,
) -> admin::Job {
    let deadline = Instant::now() + limit;
    loop {
        let j = get(cfg, id).await;
        if pred(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job not in the expected state after {limit:?}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_or_empty_store_stops_server_and_dev_with_its_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = StateDir::new(dir.path().join("state"));
    outpost::dev::ensure_pki(&state).expect("pki");
    std::fs::create_dir_all(state.data_dir()).expect("data dir");
    let db = state.data_dir().join("outpost.db");
    {
        let s = outpost::store::Store::open(&db).expect("store");
        for i in 0..60 {
            let spec = outpost::model::JobSpec {
                image: "img".into(),
                command: vec![format!("{i}-{}", "y".repeat(2000))],
                ..Default::default()
            };
            s.insert_job(format!("j{i}"), spec).await.expect("insert");
        }
    }
    // Damage the b-tree pages past the header, as a torn disk would.
    let mut bytes = std::fs::read(&db).expect("read store");
    assert!(bytes.len() > 16 * 4096, "store of {} bytes", bytes.len());
    for b in &mut bytes[4 * 4096..12 * 4096] {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).expect("corrupt store");
    for cmd in [
        vec!["server", "--listen", "127.0.0.1:0"],
        vec!["dev", "--listen", "127.0.0.1:0"],
    ] {
        let mut c = outpost(&state.root);
        c.args(&cmd);
        let (code, err) = exit_of(c, Duration::from_secs(60)).await;
        assert!(
            code.is_some_and(|c| c != 0),
            "{cmd:?} exited {code:?}: {err}"
        );
        assert!(
            err.contains(&db.display().to_string())
                && (err.contains("integrity") || err.contains("malformed")),
            "{cmd:?} names the store and its damage: {err}"
        );
    }

    // A 0-byte store is a lost store, never a new empty one.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::write(&db, b"").expect("empty store");
    for cmd in [
        vec!["server", "--listen", "127.0.0.1:0"],
        vec!["dev", "--listen", "127.0.0.1:0"],
    ] {
        let mut c = outpost(&state.root);
        c.args(&cmd);
        let (code, err) = exit_of(c, Duration::from_secs(60)).await;
        assert!(
            code.is_some_and(|c| c != 0),
            "{cmd:?} exited {code:?}: {err}"
        );
        assert!(err.contains("is an empty file"), "{cmd:?}: {err}");
        assert_eq!(
            std::fs::metadata(&db).expect("store").len(),
            0,
            "left as it was"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_state_directory_refuses_and_names_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = StateDir::new(dir.path().join("state"));
    outpost::dev::ensure_pki(&state).expect("pki");
    let mut c = outpost(&state.root);
    c.args(["server", "--listen", "127.0.0.1:0"]);
    let first = Proc::spawn(c, dir.path().join("first.log"));
    let client = wait_control_plane(&state, None, &first).await;
    let addr = std::fs::read_to_string(state.addr_file()).expect("server.addr");
    let expected = format!(
        "state directory {} in use by PID {}",
        state.root.display(),
        first.pid()
    );
    for cmd in [
        vec!["server", "--listen", "127.0.0.1:0"],
        vec!["dev", "--listen", "127.0.0.1:0"],
    ] {
        let mut c = outpost(&state.root);
        c.args(&cmd);
        let (code, err) = exit_of(c, Duration::from_secs(60)).await;
        assert!(code.is_some_and(|c| c != 0), "{cmd:?}: {code:?} {err}");
        assert!(err.contains(&expected), "{cmd:?}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(state.addr_file()).expect("server.addr"),
        addr,
        "the refused instances left server.addr alone"
    );
    client
        .connect()
        .await
        .expect("the first still answers")
        .list_jobs(admin::ListJobsRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("list");
    drop(first);

    // Two agents on one state_dir.
    let c = Cluster::start().await;
    let cfg = c.write_agent_config("twin", 1, "", "");
    let agent = c.spawn_agent("twin", &cfg).await;
    let mut second = tokio::process::Command::new(bin("outpost-agent"));
    second.arg("--config").arg(&cfg).kill_on_drop(true);
    let (code, err) = exit_of(second, Duration::from_secs(60)).await;
    assert!(code.is_some_and(|c| c != 0), "{code:?} {err}");
    assert!(
        err.contains(&format!("in use by PID {}", agent.pid())),
        "{err}"
    );
    c.wait_agent_connected("twin", true, Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_private_whatever_the_umask_and_shared_directories_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The README's example: a directory made beforehand, 0755.
    let root = dir.path().join("srv");
    std::fs::create_dir(&root).expect("srv");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = StateDir::new(&root);
    let under_umask_000 = |args: &[&str]| {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg("umask 000; exec \"$@\"")
            .arg("sh")
            .arg(bin("outpost"))
            .arg("--state-dir")
            .arg(&root)
            .args(args)
            .kill_on_drop(true);
        c
    };
    for args in [
        &["pki", "init"][..],
        &["pki", "issue", "admin", "admin"][..],
    ] {
        let (code, err) = exit_of(under_umask_000(args), Duration::from_secs(60)).await;
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
    let server = Proc::spawn(
        under_umask_000(&["server", "--listen", "127.0.0.1:0"]),
        dir.path().join("server.log"),
    );
    let client = wait_control_plane(&state, None, &server).await;
    let mut spec = outpost_tests::spec(&["true"]);
    spec.env
        .insert("TF_VAR_password".into(), "env-canary".into());
    spec.selector.insert("pool".into(), "nowhere".into());
    client
        .connect()
        .await
        .expect("connect")
        .submit_job(admin::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("submit");
    assert_eq!(
        mode(&root),
        0o700,
        "the existing 0755 directory is tightened"
    );
    for d in ["pki", "data"] {
        assert_eq!(mode(&root.join(d)), 0o700, "{d}");
    }
    let data = root.join("data");
    for f in [
        data.join("outpost.db"),
        data.join("outpost.db-wal"),
        data.join("outpost.db-shm"),
        root.join("lock"),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    drop(server);

    // Writable by others: refused, left as it is.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut c = outpost(&root);
    c.args(["server", "--listen", "127.0.0.1:0"]);
    let (code, err) = exit_of(c, Duration::from_secs(60)).await;
    assert!(code.is_some_and(|c| c != 0), "{code:?} {err}");
    assert!(err.contains("writable by every user"), "{err}");
    assert_eq!(mode(&root), 0o777);

    // The agent: an existing 0755 state_dir under umask 000.
    let c = Cluster::start().await;
    let cfg = c.write_agent_config("private", 1, "", "");
    let agent_state = cfg.parent().expect("dir").join("state");
    std::fs::create_dir_all(&agent_state).expect("agent state");
    std::fs::set_permissions(&agent_state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut a = tokio::process::Command::new("sh");
    a.arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(bin("outpost-agent"))
        .arg("--config")
        .arg(&cfg)
        .env("OUTPOST_LOG", "info")
        .kill_on_drop(true);
    let agent = Proc::spawn(a, dir.path().join("agent.log"));
    c.wait_agent_connected("private", true, Duration::from_secs(60))
        .await;
    let (cmd, _) = numbered_job(200, "0.1");
    let mut spec = outpost_tests::spec(&[]);
    spec.command = cmd;
    spec.selector.insert("zone".into(), "test".into());
    let id = c.submit_spec(spec).await;
    c.wait_state(&id, Duration::from_secs(60), |j| j.log_length > 0)
        .await;
    let mut seen = 0;
    let mut stack = vec![agent_state.clone()];
    while let Some(d) = stack.pop() {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
                seen += 1;
            }
        }
    }
    assert!(
        seen >= 3,
        "lock, lease and a log segment at least; saw {seen}"
    );
    c.client()
        .await
        .cancel_job(admin::CancelJobRequest { job_id: id.clone() })
        .await
        .expect("cancel");
    c.wait_final(&id, Duration::from_secs(60)).await;
    drop(agent);

    let cfg = c.write_agent_config("shared", 1, "", "");
    let shared = cfg.parent().expect("dir").join("state");
    std::fs::create_dir_all(&shared).expect("state");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o770)).expect("chmod");
    let mut a = tokio::process::Command::new(bin("outpost-agent"));
    a.arg("--config").arg(&cfg).kill_on_drop(true);
    let (code, err) = exit_of(a, Duration::from_secs(60)).await;
    assert!(code.is_some_and(|c| c != 0), "{code:?} {err}");
    assert!(err.contains("writable by its group"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_of_dev_stops_like_a_restart_and_the_next_dev_finishes_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = StateDir::new(dir.path().join("state"));
    let dev = |n: u32| {
        let mut c = outpost(&state.root);
        c.args(["dev", "--listen", "127.0.0.1:0"]);
        Proc::spawn(c, dir.path().join(format!("dev{n}.log")))
    };
    let mut first = dev(1);
    let client = wait_control_plane(&state, Some("local"), &first).await;
    let (cmd, expected) = numbered_job(60, "0.2");
    let mut spec = outpost_tests::spec(&[]);
    spec.command = cmd;
    let id = client
        .connect()
        .await
        .expect("connect")
        .submit_job(admin::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    wait_job(&client, &id, Duration::from_secs(60), |j| j.log_length > 30).await;

    first.signal("INT");
    let status = first.wait_exit(Duration::from_secs(60)).await;
    let log = first.log_text();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("left running"), "says what it left: {log}");
    assert!(
        !log.contains("shut down before the job finished"),
        "the job was not cancelled: {log}"
    );
    assert_eq!(
        containers_of(&id).await.len(),
        1,
        "the job's container goes on"
    );

    let mut second = dev(2);
    let client = wait_control_plane(&state, Some("local"), &second).await;
    let j = wait_job(
        &client,
        &id,
        Duration::from_secs(90),
        outpost_tests::is_final,
    )
    .await;
    assert_eq!(outpost_tests::state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(j.epoch, 1, "re-adopted under its lease, not run again");
    let mut s = client
        .connect()
        .await
        .expect("connect")
        .follow_logs(admin::FollowLogsRequest {
            job_id: id.clone(),
            offset: 0,
            follow: false,
            epoch: 0,
        })
        .await
        .expect("logs")
        .into_inner();
    let mut logs = Vec::new();
    while let Some(d) = s.message().await.expect("log stream") {
        logs.extend_from_slice(&d.data);
    }
    assert_eq!(
        String::from_utf8_lossy(&logs),
        String::from_utf8_lossy(&expected),
        "every line exactly once across the stop"
    );
    second.signal("INT");
    assert!(second.wait_exit(Duration::from_secs(60)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_specs_are_refused_and_every_accepted_one_runs_and_lists() {
    let c = Cluster::start().await;
    let agent = c.start_agent(1).await;
    let mut admin = c.client().await;

    let mut spec = outpost_tests::spec(&["true"]);
    spec.env.insert("BIG".into(), "x".repeat(3 << 20));
    let e = admin
        .submit_job(admin::SubmitJobRequest { spec: Some(spec) })
        .await
        .expect_err("a 3 MiB environment is refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("environment"), "{}", e.message());

    // Large on every axis the agent can run, and still accepted.
    let mut spec = outpost_tests::spec(&["sh", "-c", "echo ok $#", "sh"]);
    spec.command.extend((0..100).map(|i| format!("{i:01000}")));
    spec.env = (0..200)
        .map(|i| (format!("V{i}"), "v".repeat(1000)))
        .collect();
    spec.secrets = (0..32)
        .map(|i| pb::Secret {
            name: format!("s{i}"),
            value: vec![b's'; 16 * 1024],
        })
        .collect();
    let id = c.submit_spec(spec).await;
    let j = c.wait_final(&id, Duration::from_secs(120)).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(c.logs(&id).await, b"ok 100\n");

    // Lists stay under the message limit, however large the jobs.
    let mut ids = Vec::new();
    for _ in 0..20 {
        let mut spec = outpost_tests::spec(&["echo"]);
        spec.command.extend((0..250).map(|i| format!("{i:01000}")));
        spec.selector.insert("pool".into(), "nowhere".into());
        ids.push(c.submit_spec(spec).await);
    }
    let mut strict = c
        .client()
        .await
        .max_decoding_message_size(outpost_proto::MAX_MESSAGE_BYTES);
    let jobs = strict
        .list_jobs(admin::ListJobsRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("a list within the message limit")
        .into_inner()
        .jobs;
    assert!(!jobs.is_empty());
    for j in &jobs {
        let len: usize = j.command.iter().map(String::len).sum();
        assert!(len <= 1024 + 3, "summarised command of {len} bytes");
    }
    let full = c.job(&ids[0]).await;
    assert_eq!(full.command.len(), 251, "GetJob has the whole command");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_no_agent_can_take_ends_the_job_failed_after_a_few_tries() {
    let mut c = Cluster::start().await;
    // A job stored by a version without size limits: larger than a lease.
    let addr = c.stop_server().await;
    {
        let store =
            outpost::store::Store::open(&c.state.data_dir().join("outpost.db")).expect("store");
        let spec = outpost::model::JobSpec {
            image: outpost_tests::RUNNER_IMAGE.into(),
            command: vec!["true".into()],
            env: [("BIG".to_string(), "x".repeat(4 << 20))].into(),
            ..Default::default()
        };
        store
            .insert_job("00000000-0000-7000-8000-000000000001".into(), spec)
            .await
            .expect("insert");
    }
    c.start_server_at(addr).await;
    let agent = c.start_agent(1).await;
    let big = "00000000-0000-7000-8000-000000000001";
    let j = c.wait_final(big, Duration::from_secs(60)).await;
    assert_eq!(state(&j), pb::JobState::Failed, "{j:?}");
    assert!(j.message.contains("bytes"), "{}", j.message);
    // The agent is not stuck on it.
    let id = c.submit(&["echo", "after"]).await;
    let j = c.wait_final(&id, Duration::from_secs(60)).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    agent.stop().await;

    // An agent whose session breaks on every lease (as one that cannot
    // decode it): the job ends FAILED after a bounded number of leases.
    let id = c.submit(&["echo", "never"]).await;
    let ep = outpost_agent::session::endpoint(&c.agent_config(1)).expect("endpoint");
    let mut leases = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "still looping after {leases} leases"
        );
        let channel = ep.connect().await.expect("connect");
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                agent_id: "local".into(),
                version: "test".into(),
                labels: [("env".to_string(), "dev".to_string())].into(),
                capacity: 1,
                ..Default::default()
            })),
        })
        .await
        .expect("hello");
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        let first = inbound.message().await.expect("welcome");
        assert!(matches!(
            first.and_then(|m| m.msg),
            Some(pb::server_message::Msg::Welcome(_))
        ));
        let j = c.job(&id).await;
        if outpost_tests::is_final(&j) {
            assert_eq!(state(&j), pb::JobState::Failed, "{j:?}");
            assert!(j.message.contains("no agent could take"), "{}", j.message);
            break;
        }
        let got = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(pb::server_message::Msg::Lease(l)) = m.msg {
                    return l.job_id;
                }
            }
            String::new()
        })
        .await
        .expect("a lease within 20s");
        assert_eq!(got, id);
        leases += 1;
        drop(inbound);
        drop(tx);
    }
    assert_eq!(
        leases,
        outpost::store::MAX_UNDELIVERED,
        "bounded number of tries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_and_retention_delete_final_jobs_and_shrink_the_store() {
    let mut c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(c.submit(&["sh", "-c", "yes x | head -c 3145728"]).await);
    }
    for id in &ids {
        let j = c.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    }
    let running = c.submit(&["sleep", "60"]).await;
    c.wait_state(&running, Duration::from_secs(60), |j| {
        state(j) == pb::JobState::Running
    })
    .await;
    let status = |c: &Cluster| {
        let cfg = c.client_config();
        async move {
            cfg.connect()
                .await
                .expect("connect")
                .get_status(admin::GetStatusRequest {})
                .await
                .expect("status")
                .into_inner()
                .store
                .expect("store status")
        }
    };
    let before = status(&c).await;
    assert!(before.bytes > 9 << 20, "{before:?}");
    assert_eq!(before.jobs, 4);

    let mut prune = outpost(&c.state.root);
    prune.args(["--server", &c.url(), "jobs", "prune", "--keep", "1"]);
    let out = prune.output().await.expect("outpost jobs prune");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("deleted 2 jobs"), "{stdout}");
    let after = status(&c).await;
    assert_eq!(after.jobs, 2, "the newest final job and the running one");
    assert!(after.incremental_vacuum);
    assert_eq!(after.free_bytes, 0, "space given back: {after:?}");
    assert!(after.bytes < 5 << 20, "{after:?}");

    let mut st = outpost(&c.state.root);
    st.args(["--server", &c.url(), "status"]);
    let out = st.output().await.expect("outpost status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("store "),
        "{stdout}"
    );

    // The server's own retention: final jobs of any age, checked each second.
    c.retention = outpost::retention::Retention {
        max_age: Some(Duration::ZERO),
        max_jobs: None,
        interval: Duration::from_secs(1),
    };
    c.restart_server().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = status(&c).await.jobs;
        if left == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} jobs left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let j = c.job(&running).await;
    assert_eq!(
        state(&j),
        pb::JobState::Running,
        "a running job is never pruned"
    );
    c.client()
        .await
        .cancel_job(admin::CancelJobRequest {
            job_id: running.clone(),
        })
        .await
        .expect("cancel");
    c.wait_final(&running, Duration::from_secs(60)).await;
    agent.stop().await;
}
