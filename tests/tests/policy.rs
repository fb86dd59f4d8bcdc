//! The VPC owner's guardrails end to end: a job the agent's local policy
//! does not allow ends as REJECTED with the exact reason, before anything
//! runs (no container is ever created), and a Rego file that cannot be used
//! stops the agent at start (exit 64).

use std::time::Duration;

use outpost_proto::agent::v1 as pb;
use outpost_tests::{Cluster, RUNNER_IMAGE, bin, containers_of, spec, state};

const LIMIT: Duration = Duration::from_secs(60);
const PREFIX: &str = "refused by the agent's policy: ";

/// Waits for `id` to end and checks it was refused, never ran, and that
/// its message carries `reason`.
async fn assert_rejected(c: &Cluster, id: &str, reason: &str) -> String {
    let j = c.wait_final(id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Rejected, "{j:?}");
    assert!(j.message.starts_with(PREFIX), "{}", j.message);
    assert!(
        j.message.contains(reason),
        "{reason:?} not in {:?}",
        j.message
    );
    assert!(c.logs(id).await.is_empty(), "it never ran");
    assert!(
        containers_of(id).await.is_empty(),
        "no container was ever created for {id}"
    );
    j.message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_outside_the_policy_are_rejected_before_anything_runs() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;

    let mut image = spec(&["sh", "-c", "echo must-not-run"]);
    image.image = "alpine:3".into();
    let image = c.submit_spec(image).await;

    let mut egress = spec(&["sh", "-c", "echo must-not-run"]);
    egress.network = pb::NetworkMode::Egress as i32;
    let egress = c.submit_spec(egress).await;

    let mut memory = spec(&["sh", "-c", "echo must-not-run"]);
    memory.resources = Some(pb::Resources {
        memory_bytes: 2 << 30,
        ..Default::default()
    });
    let memory = c.submit_spec(memory).await;

    let mut env = spec(&["sh", "-c", "echo must-not-run"]);
    env.env
        .insert("LD_PRELOAD".into(), "/workspace/evil.so".into());
    let env = c.submit_spec(env).await;

    let message = assert_rejected(
        &c,
        &image,
        &format!(
            "image \"alpine:3\" (docker.io/library/alpine:3) is not in allowed_images [\"{RUNNER_IMAGE}\"]"
        ),
    )
    .await;
    assert_eq!(
        message.matches("; ").count(),
        0,
        "only the image: {message}"
    );
    assert_rejected(
        &c,
        &egress,
        "network \"egress\" is not allowed: allow_egress = false",
    )
    .await;
    assert_rejected(
        &c,
        &memory,
        "resources.memory_bytes 2147483648 bytes (2 GiB) is above this agent's maximum of 1073741824 bytes (1 GiB) ([sandbox] memory_bytes)",
    )
    .await;
    assert_rejected(
        &c,
        &env,
        "env \"LD_PRELOAD\" is denied by denied_env pattern \"LD_*\"",
    )
    .await;

    // The agent still runs what its policy allows.
    let ok = c.submit(&["sh", "-c", "echo allowed"]).await;
    let j = c.wait_final(&ok, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");

    // What the user sees: `outpost job` and `outpost submit --wait`.
    let root = c.state.root.clone();
    let url = c.url();
    let (job_out, submit_out) = tokio::task::spawn_blocking(move || {
        let outpost = |args: &[&str]| {
            std::process::Command::new(bin("outpost"))
                .arg("--state-dir")
                .arg(&root)
                .args(["--server", &url])
                .args(args)
                .output()
                .unwrap()
        };
        (
            outpost(&["job", &image]),
            outpost(&[
                "submit", "--image", "alpine:3", "--wait", "--", "sh", "-c", "true",
            ]),
        )
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&job_out.stdout);
    assert!(
        text.contains("rejected") && text.contains("refused by the agent's policy"),
        "{text}"
    );
    assert!(!submit_out.status.success(), "{submit_out:?}");
    let stderr = String::from_utf8_lossy(&submit_out.stderr);
    assert!(
        stderr.contains("rejected: refused by the agent's policy: image \"alpine:3\""),
        "{stderr}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rego_deny_refuses_the_job() {
    let c = Cluster::start().await;
    let rego = c.dir.path().join("outpost.rego");
    std::fs::write(
        &rego,
        r#"
package outpost

deny contains msg if {
    some name in input.env
    startswith(name, "TF_VAR_")
    msg := sprintf("%s: Terraform variables come from reviewed code, not from the job", [name])
}
"#,
    )
    .unwrap();
    let mut cfg = c.agent_config(1);
    cfg.policy.rego = Some(rego.clone());
    let agent = c.start_agent_with(cfg).await;

    let mut denied = spec(&["sh", "-c", "echo must-not-run"]);
    denied
        .env
        .insert("TF_VAR_db_password".into(), "hunter2".into());
    let denied = c.submit_spec(denied).await;
    let message = assert_rejected(
        &c,
        &denied,
        &format!(
            "rego {}: TF_VAR_db_password: Terraform variables come from reviewed code, not from the job",
            rego.display()
        ),
    )
    .await;
    assert!(
        !message.contains("hunter2"),
        "values never reach the policy: {message}"
    );

    let mut allowed = spec(&["sh", "-c", "echo \"$TF_LOG\""]);
    allowed.env.insert("TF_LOG".into(), "info".into());
    let allowed = c.submit_spec(allowed).await;
    let j = c.wait_final(&allowed, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(c.logs(&allowed).await, b"info\n");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_rego_file_stops_the_agent_at_start_with_exit_64() {
    let c = Cluster::start().await;
    let invalid = c.dir.path().join("invalid.rego");
    std::fs::write(
        &invalid,
        "package outpost\n\ndeny contains msg if {\n    input.image ==== \"x\"\n",
    )
    .unwrap();
    let no_deny = c.dir.path().join("no-deny.rego");
    std::fs::write(&no_deny, "package outpost\n\nallow := true\n").unwrap();
    let missing = c.dir.path().join("missing.rego");
    for (i, path) in [&invalid, &no_deny, &missing].into_iter().enumerate() {
        let config = c.write_agent_config(
            &format!("bad{i}"),
            1,
            "",
            &format!("[policy]\nrego = {:?}", path.display().to_string()),
        );
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(bin("outpost-agent"))
                .arg("--config")
                .arg(&config)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the agent exits at once")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains("[policy] rego"),
            "{stderr}"
        );
    }
    // The same file, valid, starts (checked without connecting).
    std::fs::write(
        &invalid,
        "package outpost\n\ndeny contains \"x\" if input.image == \"x\"\n",
    )
    .unwrap();
    let config = c.write_agent_config(
        "good",
        1,
        "",
        &format!("[policy]\nrego = {:?}", invalid.display().to_string()),
    );
    let out = tokio::process::Command::new(bin("outpost-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
