//! The binaries as a user runs them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use outpost_proto::agent::v1 as pb;
use outpost_tests::{Cluster, RUNNER_IMAGE, bin, numbered_job, spec, state};
use parking_lot::Mutex;

#[test]
fn a_malformed_agent_config_exits_64_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 4] = [
        ("not toml at all [", "invalid config file"),
        (
            "server = \"https://x:1\"\nbogus_key = 1\n[tls]\nca=\"/a\"\ncert=\"/b\"\nkey=\"/c\"\n",
            "bogus_key",
        ),
        (
            "server = \"http://x:1\"\n[tls]\nca=\"/a\"\ncert=\"/b\"\nkey=\"/c\"\n",
            "https",
        ),
        (
            "server = \"https://x:1\"\n[tls]\nca=\"/nonexistent/ca.pem\"\ncert=\"/b\"\nkey=\"/c\"\n",
            "/nonexistent/ca.pem",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("agent{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin("outpost-agent"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i}: {stderr}");
        assert!(
            stderr.contains(needle),
            "case {i}: {needle:?} not in {stderr:?}"
        );
    }
    let out = Command::new(bin("outpost-agent"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_and_follow_exit_with_the_jobs_code() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let state = c.state.root.clone();
    let run = move |args: Vec<&'static str>| {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(bin("outpost"))
                .arg("--state-dir")
                .arg(&state)
                .args(args)
                .output()
                .unwrap()
        })
    };
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        run(vec![
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--wait",
            "--",
            "sh",
            "-c",
            "exit 3",
        ]),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(id.len(), 36, "prints the job id: {id:?}");

    let out = tokio::time::timeout(
        Duration::from_secs(120),
        run(vec![
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--follow",
            "--",
            "sh",
            "-c",
            "echo hello; echo world",
        ]),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // stdout is exactly the job's output; the id goes to stderr.
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, "hello\nworld\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("submitted job "), "{stderr}");

    let out = run(vec!["jobs", "--output", "json"]).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    let out = run(vec!["agents", "--output", "json"]).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["agent_id"], "local");
    assert_eq!(v[0]["connected"], true);

    let out = run(vec!["job", "no-such-job"]).await.unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    agent.stop().await;
}

/// An `outpost` process whose output is collected as it comes.
struct Proc {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    what: String,
}

/// What a finished `outpost` process left.
#[derive(Debug)]
struct Done {
    code: Option<i32>,
    out: String,
    err: String,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let to = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            to.lock().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Proc {
    fn spawn(state: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(bin("outpost"))
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost");
        let out = collect(child.stdout.take().expect("stdout"));
        let err = collect(child.stderr.take().expect("stderr"));
        Proc {
            child,
            out,
            err,
            what: args.join(" "),
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock()).into_owned()
    }

    /// Waits (bounded) for the process to exit.
    async fn finish(mut self, limit: Duration) -> Done {
        let deadline = tokio::time::Instant::now() + limit;
        let code = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st.code();
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "`outpost {}` did not exit within {limit:?}; stdout {:?}, stderr {:?}",
                    self.what,
                    self.stdout(),
                    String::from_utf8_lossy(&self.err.lock())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The readers end with the pipes; give them a bounded moment.
        for _ in 0..100 {
            if Arc::strong_count(&self.out) == 1 && Arc::strong_count(&self.err) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Done {
            code,
            out: self.stdout(),
            err: String::from_utf8_lossy(&self.err.lock()).into_owned(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `outpost --state-dir STATE ARGS` to its end (bounded).
async fn outpost(state: &Path, args: &[&str]) -> Done {
    Proc::spawn(state, args)
        .finish(Duration::from_secs(120))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_commands_quietly() {
    let c = Cluster::start().await;
    let agent = c.start_agent(1).await;
    // 300 KB of output: more than a pipe holds.
    let id = c
        .submit(&["sh", "-c", "i=0; while [ $i -lt 5000 ]; do echo \"line $i of a long log ......................................\"; i=$((i+1)); done"])
        .await;
    let j = c.wait_final(&id, Duration::from_secs(120)).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    let state_dir = c.state.root.clone();

    // A reader that is gone before the first byte.
    for args in [
        vec!["jobs"],
        vec!["logs", id.as_str()],
        vec!["job", id.as_str()],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(bin("outpost"))
            .arg("--state-dir")
            .arg(&state_dir)
            .args(&args)
            .stdout(writer)
            .output()
            .expect("run outpost");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} said: {stderr}");
    }

    // A reader that goes away in the middle: `outpost logs ID | head -c 10`.
    let script = format!(
        "set -o pipefail; {} --state-dir {} logs {id} | head -c 10",
        bin("outpost").display(),
        state_dir.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .output()
            .expect("bash")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.stdout, b"line 0 of ");
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_and_wait_ride_through_a_control_plane_restart() {
    let mut c = Cluster::start().await;
    let agent = c.start_agent(3).await;
    let (command, expected) = numbered_job(40, "0.2");
    let script = command[2].clone();
    let state_dir = c.state.root.clone();
    let mut logged = spec(&[]);
    logged.command = command.clone();
    let id = c.submit_spec(logged).await;

    let logs = Proc::spawn(&state_dir, &["logs", "--follow", &id]);
    let follow = Proc::spawn(
        &state_dir,
        &[
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--follow",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let wait = Proc::spawn(
        &state_dir,
        &[
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--wait",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    // Restart the control plane while all three are in the middle of it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while logs.stdout().is_empty() || follow.stdout().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no output before the restart: logs {:?}, follow {:?}",
            logs.stdout(),
            follow.stdout()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = c.stop_server().await;
    // Down for longer than one retry.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.start_server_at(addr).await;

    let limit = Duration::from_secs(120);
    let expected = String::from_utf8(expected).unwrap();
    for (name, p, out) in [
        ("logs --follow", logs, Some(&expected)),
        ("submit --follow", follow, Some(&expected)),
        ("submit --wait", wait, None),
    ] {
        let d = p.finish(limit).await;
        assert_eq!(d.code, Some(0), "{name}: {d:?}");
        if let Some(expected) = out {
            assert_eq!(
                &d.out, expected,
                "{name}: every byte once; stderr: {}",
                d.err
            );
        } else {
            assert_eq!(d.out.trim().len(), 36, "{name} prints the id: {d:?}");
        }
        assert!(
            d.err.contains("lost the control plane") && d.err.contains("reconnected"),
            "{name} says what happened: {}",
            d.err
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_at_submit_or_end_rejected() {
    let c = Cluster::start().await;
    let agent = c.start_agent(1).await;
    let st = c.state.root.clone();
    // What no container can start with is refused at submit: no job exists.
    for (flag, value, needle) in [
        ("--memory", "1m", "below the minimum of 6 MiB"),
        ("--pids", "1", "pids 1 is below the minimum of 8"),
        ("--cpus", "0.001", "below the minimum of 0.01"),
    ] {
        let d = outpost(
            &st,
            &[
                "submit",
                "--image",
                RUNNER_IMAGE,
                flag,
                value,
                "--wait",
                "--",
                "true",
            ],
        )
        .await;
        assert_ne!(d.code, Some(0), "{flag} {value}: {d:?}");
        assert!(d.out.is_empty(), "{flag} {value} made a job: {d:?}");
        assert!(d.err.contains(needle), "{flag} {value}: {}", d.err);
    }
    let d = outpost(&st, &["jobs", "--output", "json"]).await;
    assert_eq!(d.out.trim(), "[]", "{d:?}");

    // The role allow-list is the agent's: the job ends REJECTED like any
    // other refusal of its local policy.
    let d = outpost(
        &st,
        &[
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--aws-role",
            "arn:aws:iam::123456789012:role/admin",
            "--wait",
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(d.code, Some(1), "{d:?}");
    let id = d.out.trim().to_string();
    let j = c.job(&id).await;
    assert_eq!(state(&j), pb::JobState::Rejected, "{j:?}");
    assert!(
        j.message.contains("refused by the agent's policy") && j.message.contains("allowed_roles"),
        "{}",
        j.message
    );
    assert!(d.err.contains("rejected"), "{}", d.err);
    agent.stop().await;

    // `outpost dev` checks its agent's configuration like `outpost-agent`.
    let dev_state = c.dir.path().join("dev");
    let d = Proc::spawn(&dev_state, &["dev", "--capacity", "0"])
        .finish(Duration::from_secs(60))
        .await;
    assert_eq!(d.code, Some(64), "{d:?}");
    assert!(
        d.err.contains("capacity 0 must be between 1 and 256"),
        "{}",
        d.err
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_filters_by_state_and_label_and_pages_with_a_total() {
    let c = Cluster::start().await;
    let st = c.state.root.clone();
    let mut ids = Vec::new();
    for team in ["a", "b", "a", "b", "a"] {
        let mut s = spec(&["true"]);
        s.selector = [("team".to_string(), team.to_string())].into();
        ids.push(c.submit_spec(s).await);
    }
    // No agent: all queued; cancel the newest.
    let d = outpost(&st, &["cancel", &ids[4]]).await;
    assert_eq!(d.out.trim(), format!("{} cancelled", ids[4]), "{d:?}");

    let d = outpost(&st, &["jobs", "--limit", "2"]).await;
    assert_eq!(d.code, Some(0), "{d:?}");
    let lines: Vec<&str> = d.out.lines().collect();
    assert_eq!(lines.len(), 3, "{}", d.out);
    for col in ["JOB", "STATE", "AGE", "DURATION"] {
        assert!(lines[0].contains(col), "{col} missing: {}", lines[0]);
    }
    assert!(
        lines[1].starts_with(&ids[4]) && lines[2].starts_with(&ids[3]),
        "{}",
        d.out
    );
    assert!(d.err.contains("2 of 5 jobs"), "{}", d.err);
    let token = d
        .err
        .split("--page-token ")
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("no next page in {:?}", d.err))
        .to_string();
    let d = outpost(&st, &["jobs", "--limit", "2", "--page-token", &token]).await;
    let lines: Vec<&str> = d.out.lines().skip(1).collect();
    assert!(
        lines[0].starts_with(&ids[2]) && lines[1].starts_with(&ids[1]),
        "{}",
        d.out
    );

    let d = outpost(&st, &["jobs", "--state", "cancelled", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&d.out).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["job_id"], ids[4].as_str());
    assert!(d.err.contains("1 of 1 jobs"), "{}", d.err);

    let d = outpost(
        &st,
        &["jobs", "--label", "team=a", "--state", "queued,running"],
    )
    .await;
    let shown: Vec<&str> = d.out.lines().skip(1).map(|l| &l[..36]).collect();
    assert_eq!(shown, [ids[2].as_str(), ids[0].as_str()], "{}", d.out);
    assert!(d.err.contains("2 of 2 jobs"), "{}", d.err);

    let d = outpost(&st, &["jobs", "--limit", "0"]).await;
    assert_eq!(d.code, Some(2), "{d:?}");
    assert!(d.err.contains("--limit"), "{}", d.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_shows_times_and_requests_and_cancel_says_what_happened() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let st = c.state.root.clone();
    let d = outpost(
        &st,
        &[
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--env",
            "TF_VAR_token=canary-value",
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "--pids",
            "32",
            "--timeout",
            "30s",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo hi",
        ],
    )
    .await;
    assert_eq!(d.code, Some(0), "{d:?}");
    let id = d.out.trim().to_string();
    let d = outpost(&st, &["job", &id]).await;
    assert_eq!(d.code, Some(0), "{d:?}");
    let field = |name: &str| {
        d.out
            .lines()
            .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with("  ")))
            .map(|rest| rest.trim().to_string())
            .unwrap_or_else(|| panic!("no {name:?} in:\n{}", d.out))
    };
    for name in ["created", "started", "finished"] {
        let t = field(name);
        // RFC 3339, UTC: 2026-11-29T01:33:20.5Z
        let b = t.as_bytes();
        assert!(
            b.len() >= 20
                && b[4] == b'-'
                && b[10] == b'T'
                && t.split(' ').next().unwrap().ends_with('Z'),
            "{name}: {t}"
        );
    }
    assert!(field("ran for").ends_with('s'), "{}", d.out);
    assert_eq!(field("memory"), "64 MiB");
    assert_eq!(field("cpus"), "0.5");
    assert_eq!(field("pids"), "32");
    assert_eq!(field("timeout"), "30s");
    assert_eq!(field("network"), "none");
    assert_eq!(field("env"), "TF_VAR_token");
    assert_eq!(field("aws role"), "-");
    let json = outpost(&st, &["job", &id, "--output", "json"]).await.out;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["env_names"][0], "TF_VAR_token");
    assert_eq!(v["resources"]["memory_bytes"], 64 << 20);
    assert!(v["started_at"].as_str().is_some(), "{v}");
    for text in [&d.out, &json] {
        assert!(
            !text.contains("canary-value"),
            "an env value is shown: {text}"
        );
    }

    // Cancel: a running job, then the same job again, then a queued one.
    let running = c.submit(&["sh", "-c", "sleep 60"]).await;
    c.wait_state(&running, Duration::from_secs(60), |j| {
        state(j) == pb::JobState::Running
    })
    .await;
    let d = outpost(&st, &["cancel", &running, "--wait"]).await;
    assert_eq!(d.code, Some(0), "{d:?}");
    let lines: Vec<&str> = d.out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("{running} running (cancel requested")),
        "{}",
        d.out
    );
    assert_eq!(
        lines.get(1).copied(),
        Some(format!("{running} cancelled").as_str())
    );
    let d = outpost(&st, &["cancel", &running]).await;
    assert_eq!(d.out.trim(), format!("{running} cancelled"));
    assert!(d.err.contains("had already ended (cancelled)"), "{}", d.err);
    let mut queued = spec(&["true"]);
    queued.selector = [("pool".to_string(), "nowhere".to_string())].into();
    let queued = c.submit_spec(queued).await;
    let d = outpost(&st, &["cancel", &queued]).await;
    assert_eq!(d.out.trim(), format!("{queued} cancelled"), "{d:?}");
    assert!(d.err.is_empty(), "{}", d.err);
    agent.stop().await;
}

/// A real `outpost server` process, stopped when dropped.
struct ServerProc(Child);

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_admin_certificates_and_server_names() {
    let dir = tempfile::tempdir().unwrap();
    let st: PathBuf = dir.path().join("state");
    for args in [
        vec!["pki", "init", "--san", "outpost.test"],
        vec!["pki", "issue", "admin", "admin"],
        vec!["pki", "issue", "admin", "alice"],
    ] {
        let d = outpost(&st, &args).await;
        assert_eq!(d.code, Some(0), "{args:?}: {d:?}");
    }
    // Listening on every interface: server.addr still holds an address to dial.
    let server = ServerProc(
        Command::new(bin("outpost"))
            .arg("--state-dir")
            .arg(&st)
            .args(["server", "--listen", "0.0.0.0:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outpost server"),
    );
    let addr_file = st.join("server.addr");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let url = loop {
        if let Ok(url) = std::fs::read_to_string(&addr_file) {
            break url;
        }
        assert!(tokio::time::Instant::now() < deadline, "no server.addr");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let port = url
        .strip_prefix("https://127.0.0.1:")
        .unwrap_or_else(|| panic!("server.addr holds {url:?}"))
        .to_string();
    // The server answers once it serves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d = outpost(&st, &["jobs"]).await;
        if d.code == Some(0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Another admin certificate; a missing one says how to make it.
    let d = outpost(&st, &["--admin", "alice", "jobs"]).await;
    assert_eq!(d.code, Some(0), "{d:?}");
    let d = outpost(&st, &["--admin", "bob", "jobs"]).await;
    assert_eq!(d.code, Some(1), "{d:?}");
    assert!(d.err.contains("outpost pki issue admin bob"), "{}", d.err);

    // The TLS name: from the flag, or from the server certificate.
    let other_host = format!("https://127.0.0.2:{port}");
    for (args, ok) in [
        (vec!["--server-name", "outpost.test", "jobs"], true),
        (vec!["--server", other_host.as_str(), "jobs"], true),
        (vec!["--server-name", "wrong.example", "jobs"], false),
    ] {
        let d = outpost(&st, &args).await;
        assert_eq!(d.code == Some(0), ok, "{args:?}: {d:?}");
        if !ok {
            assert!(d.err.contains("wrong.example"), "{}", d.err);
        }
    }

    // Nothing listens: one clear sentence, no phrase twice in a row.
    drop(server);
    let d = outpost(&st, &["--server", "https://127.0.0.1:1", "jobs"]).await;
    assert_eq!(d.code, Some(1), "{d:?}");
    let text = d.err.trim().trim_start_matches("outpost: ");
    let parts: Vec<&str> = text.split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "repeated phrase in {text:?}");
    }
    assert!(
        text.contains("127.0.0.1:1") && text.contains("refused"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_agent_can_take_is_reported_and_ends_at_its_queue_timeout() {
    let c = Cluster::start().await;
    let agent = c.start_agent(1).await;
    let st = c.state.root.clone();
    let d = Proc::spawn(
        &st,
        &[
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--label",
            "pool=gpu",
            "--queue-timeout",
            "8s",
            "--wait",
            "--",
            "true",
        ],
    )
    .finish(Duration::from_secs(60))
    .await;
    assert_eq!(d.code, Some(124), "{d:?}");
    assert!(
        d.err.contains("is still queued")
            && d.err.contains("no connected agent has the labels pool=gpu"),
        "{}",
        d.err
    );
    let id = d.out.trim().to_string();
    let j = c.job(&id).await;
    assert_eq!(state(&j), pb::JobState::TimedOut, "{j:?}");
    assert!(
        j.message
            .contains("not leased within its queue timeout of 8s")
            && j.message.contains("pool=gpu"),
        "{}",
        j.message
    );
    assert!(j.finished_at_ms > 0 && j.epoch == 0, "{j:?}");
    agent.stop().await;
}
