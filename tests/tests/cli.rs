//! The binaries as a user runs them.

use std::process::Command;
use std::time::Duration;

use outpost_tests::{Cluster, RUNNER_IMAGE, bin};

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
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.ends_with("hello\nworld\n"), "{stdout:?}");

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
