//! Stacks and runs end to end: a real git repository, the real `git`
//! program on the control plane, real Terraform (1.0.3 with the null
//! provider, in the runner image) in the real sandbox, real mTLS.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use outpost::client::ClientConfig;
use outpost::identity::Role;
use outpost_proto::iac::v1 as iac;
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use outpost_tests::iac::{admin, apply, commit, is_final, repo, stack, sync, url, wait_run};
use outpost_tests::{Cluster, RUNNER_IMAGE, bin};
use tonic::transport::Channel;

const MAIN_TF: &str = r#"
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "~> 2.1"
    }
  }
}

variable "greeting" {
  type    = string
  default = "hello"
}

resource "null_resource" "first" {
  triggers = {
    greeting = var.greeting
  }
}

output "greeting" {
  value = null_resource.first.triggers.greeting
}
"#;

async fn iac_client(cfg: &ClientConfig) -> IacAdminClient<Channel> {
    IacAdminClient::new(cfg.channel().await.expect("admin channel"))
}

/// A client with the admin certificate of `name` (issued on first use).
async fn admin_as(c: &Cluster, name: &str) -> IacAdminClient<Channel> {
    let pki = c.state.pki();
    if !pki.issued(Role::Admin, name).cert.exists() {
        pki.issue(Role::Admin, name).expect("issue admin cert");
    }
    let paths = pki.issued(Role::Admin, name);
    let cfg = ClientConfig {
        cert: paths.cert,
        key: paths.key,
        ..c.client_config()
    };
    iac_client(&cfg).await
}

fn settled(r: &iac::Run) -> bool {
    !matches!(r.state.as_str(), "QUEUED" | "PLANNING")
}

const PLAN_WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacks_apply_idempotently_and_bad_input_is_refused_with_nothing_queued() {
    let c = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path(), MAIN_TF);
    let mut a = admin(&c).await;

    // Declared from a file with the CLI, twice: created, then unchanged.
    std::fs::write(
        dir.path().join("stacks.toml"),
        format!(
            "[[stack]]\nname = \"net\"\nrepo = \"{}\"\nproject_root = \"infra\"\nimage = \"{RUNNER_IMAGE}\"\n[stack.variables]\ngreeting = \"hi\"\n",
            url(&repo)
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        Command::new(bin("outpost"))
            .arg("--state-dir")
            .arg(&c.state.root)
            .args(args)
            .output()
            .unwrap()
    };
    let f = dir.path().join("stacks.toml");
    let f = f.to_str().unwrap();
    let out = cli(&["stack", "apply", "-f", f, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([{"name": "net", "action": "created"}]));
    let out = cli(&["stack", "apply", "-f", f, "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{"name": "net", "action": "unchanged"}])
    );

    // Unknown keys in the file: a clear error naming the key.
    std::fs::write(
        dir.path().join("bad.toml"),
        "[[stack]]\nname = \"x\"\nrepo = \"r\"\nimage = \"i\"\nauto_deploy = true\n",
    )
    .unwrap();
    let out = cli(&[
        "stack",
        "apply",
        "-f",
        dir.path().join("bad.toml").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auto_deploy"));

    // A plan policy that does not compile is refused when the stack is applied.
    let mut bad = stack("bad-policy", &repo);
    bad.plan_policy = "package outpost.plan\ndeny contains msg if {".into();
    let e = a
        .apply_stacks(iac::ApplyStacksRequest {
            stacks: vec![bad],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("plan_policy"), "{}", e.message());

    // An unreachable repository and a missing branch: the stack shows the
    // error and nothing is queued.
    let mut gone = stack("gone", &repo);
    gone.repo = "file:///nonexistent/outpost-repo".into();
    let mut nobranch = stack("nobranch", &repo);
    nobranch.branch = "no-such-branch".into();
    assert_eq!(
        apply(&mut a, vec![gone, nobranch]).await,
        [
            ("gone".to_string(), "created".to_string()),
            ("nobranch".to_string(), "created".to_string())
        ]
    );
    for (name, needle) in [
        ("gone", "/nonexistent/outpost-repo"),
        ("nobranch", "no-such-branch"),
    ] {
        let e = a
            .sync_stack(iac::SyncStackRequest { name: name.into() })
            .await
            .unwrap_err();
        assert!(e.message().contains(needle), "{name}: {}", e.message());
        let s = a
            .get_stack(iac::GetStackRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert!(s.fetch_error.contains(needle), "{s:?}");
        assert!(s.commit.is_empty());
    }
    let runs = a
        .list_runs(iac::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(runs.is_empty(), "nothing queued: {runs:?}");

    // `stack show --output json` and the list.
    let out = cli(&["stack", "show", "gone", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["fetch_error"].as_str().unwrap().contains("nonexistent"));
    let out = cli(&["stack", "list", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    let out = cli(&["stack", "delete", "gone"]);
    assert!(out.status.success());
    let out = cli(&["stack", "show", "gone"]);
    assert!(!out.status.success());

    // Polling: a stack with an interval queues a tracked run for its first
    // commit and for each new one, without `stack sync`.
    let mut polled = stack("polled", &repo);
    polled.poll_interval_ms = 300;
    apply(&mut a, vec![polled]).await;
    let runs_of = |n: usize| move |runs: &Vec<iac::Run>| runs.len() >= n;
    async fn wait_runs(
        a: &mut IacAdminClient<Channel>,
        pred: impl Fn(&Vec<iac::Run>) -> bool,
    ) -> Vec<iac::Run> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let runs = a
                .list_runs(iac::ListRunsRequest {
                    stack: "polled".into(),
                    limit: 10,
                })
                .await
                .unwrap()
                .into_inner()
                .runs;
            if pred(&runs) {
                return runs;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "polling queued no run in 30s: {runs:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let first = wait_runs(&mut a, runs_of(1)).await;
    assert_eq!(first[0].triggered_by, "poll");
    std::fs::write(repo.join("infra/extra.tf"), "# a new commit\n").unwrap();
    commit(&repo, "polled");
    let both = wait_runs(&mut a, runs_of(2)).await;
    assert_ne!(both[0].commit, both[1].commit, "{both:?}");
    assert_eq!(both.len(), 2, "one run per new commit: {both:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_run_plans_in_the_sandbox_and_needs_two_distinct_approvals() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path(), MAIN_TF);
    let mut a = admin(&c).await;
    let mut spec = stack("web", &repo);
    spec.approvals_required = 2;
    spec.variables = [("greeting".to_string(), "bonjour".to_string())].into();
    spec.plan_policy = r#"package outpost.plan
warn contains msg if {
    some rc in input.plan.resource_changes
    rc.change.actions == ["create"]
    msg := sprintf("creates %s", [rc.address])
}
"#
    .into();
    apply(&mut a, vec![spec]).await;
    let started = std::time::Instant::now();
    let run_id = sync(&mut a, "web").await;
    // A second sync without a new commit queues nothing.
    let again = a
        .sync_stack(iac::SyncStackRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(again.run_id.is_empty());

    let run = wait_run(&mut a, &run_id, PLAN_WAIT, settled).await;
    let planned_in = started.elapsed();
    assert_eq!(run.state, "UNCONFIRMED", "{run:#?}");
    assert!(run.has_changes);
    assert_eq!(run.changes.len(), 1, "{run:#?}");
    assert_eq!(run.changes[0].address, "null_resource.first");
    assert_eq!(run.changes[0].actions, ["create"]);
    assert_eq!(run.verdicts.len(), 1);
    assert_eq!(run.verdicts[0].warn, ["creates null_resource.first"]);
    assert_eq!(run.plan_digest.len(), 64);
    assert_eq!(
        run.transitions
            .iter()
            .map(|t| t.state.as_str())
            .collect::<Vec<_>>(),
        ["QUEUED", "PLANNING", "UNCONFIRMED"]
    );
    eprintln!("commit to UNCONFIRMED: {planned_in:?}");
    // The log shows the plan (and never the JSON of `show`).
    let log = String::from_utf8_lossy(&c.logs(&run.plan_job).await).into_owned();
    assert!(log.contains("Plan: 1 to add"), "{log}");
    assert!(!log.contains("\"resource_changes\""), "{log}");
    // The same through the CLI: `run logs`, `runs STACK --output json`.
    let cli = |args: &[&str]| {
        let out = Command::new(bin("outpost"))
            .arg("--state-dir")
            .arg(&c.state.root)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(cli(&["run", "logs", &run_id]).contains("Plan: 1 to add"));
    let runs: serde_json::Value =
        serde_json::from_str(&cli(&["runs", "web", "--output", "json"])).unwrap();
    assert_eq!(runs[0]["run_id"], run_id.as_str());
    assert_eq!(runs[0]["state"], "UNCONFIRMED");
    assert_eq!(runs[0]["changes"][0]["address"], "null_resource.first");

    // The trigger's own approval does not count; one other is not enough.
    let r = a
        .decide_run(iac::DecideRunRequest {
            run_id: run_id.clone(),
            decision: "approve".into(),
            comment: "mine".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "UNCONFIRMED");
    let mut alice = admin_as(&c, "alice").await;
    let r = alice
        .decide_run(iac::DecideRunRequest {
            run_id: run_id.clone(),
            decision: "approve".into(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "UNCONFIRMED");
    // Twice by the same identity: refused.
    let e = alice
        .decide_run(iac::DecideRunRequest {
            run_id: run_id.clone(),
            decision: "approve".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // An agent certificate cannot approve.
    let agent_paths = c.state.pki().issued(Role::Agent, "local");
    let mut as_agent = iac_client(&ClientConfig {
        cert: agent_paths.cert,
        key: agent_paths.key,
        ..c.client_config()
    })
    .await;
    let e = as_agent
        .decide_run(iac::DecideRunRequest {
            run_id: run_id.clone(),
            decision: "approve".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // The stack lock: a second commit queues a run that waits while the
    // first holds the lock (UNCONFIRMED), and plans once the first applied.
    std::fs::write(
        repo.join("infra/main.tf"),
        format!("{MAIN_TF}\nresource \"null_resource\" \"second\" {{}}\n"),
    )
    .unwrap();
    commit(&repo, "second");
    let second = sync(&mut a, "web").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = a
        .get_run(iac::GetRunRequest {
            run_id: second.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "QUEUED", "the stack lock holds it: {r:#?}");

    let mut bob = admin_as(&c, "bob").await;
    let r = bob
        .decide_run(iac::DecideRunRequest {
            run_id: run_id.clone(),
            decision: "approve".into(),
            comment: "lgtm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "CONFIRMED", "{r:#?}");
    assert!(r.message.contains("admin:alice") && r.message.contains("admin:bob"));
    assert_eq!(r.approvals.len(), 3);
    assert!(r.approvals.iter().all(|x| x.plan_digest == run.plan_digest));
    // Approving a run that is not UNCONFIRMED is refused.
    let mut carol = admin_as(&c, "carol").await;
    let e = carol
        .decide_run(iac::DecideRunRequest {
            run_id: run_id.clone(),
            decision: "approve".into(),
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    // The apply of exactly that plan; the state is kept by the control plane.
    let applied = wait_run(&mut a, &run_id, PLAN_WAIT, is_final).await;
    assert_eq!(applied.state, "FINISHED", "{applied:#?}");
    let states: Vec<_> = applied
        .transitions
        .iter()
        .map(|t| t.state.as_str())
        .collect();
    assert_eq!(
        states,
        [
            "QUEUED",
            "PLANNING",
            "UNCONFIRMED",
            "CONFIRMED",
            "APPLYING",
            "FINISHED"
        ]
    );
    let log = String::from_utf8_lossy(&c.logs(&applied.apply_job).await).into_owned();
    assert!(log.contains("Apply complete! Resources: 1 added"), "{log}");
    // Terraform kept its state through the agent's http backend, never on
    // the agent's disk.
    assert!(
        log.contains("Successfully configured the backend \"http\""),
        "{log}"
    );
    assert_eq!(
        applied.outputs.get("greeting").map(String::as_str),
        Some("\"bonjour\"")
    );
    let st = a
        .get_stack(iac::GetStackRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    // The first version Terraform writes through a remote backend.
    assert!(
        st.state_serial == 0 && !st.state_lineage.is_empty(),
        "{st:#?}"
    );
    assert_eq!(st.outputs, applied.outputs);
    let versions: serde_json::Value =
        serde_json::from_str(&cli(&["state", "versions", "web", "--output", "json"])).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 1, "{versions}");
    assert_eq!(versions[0]["serial"], st.state_serial);
    assert_eq!(
        versions[0]["written_by"],
        format!("job:{}", applied.apply_job).as_str()
    );
    // `run show` prints times in RFC 3339.
    let shown = cli(&["run", "show", &run_id]);
    let year = shown
        .lines()
        .find(|l| l.trim_start().starts_with("20") && l.contains("FINISHED"))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(year.contains('T') && year.contains('Z'), "{shown}");

    // A write from the finished apply's lease is refused (its epoch is no
    // longer a current lease).
    let agent_paths = c.state.pki().issued(Role::Agent, "local");
    let mut iac_agent = outpost_proto::iac::v1::iac_agent_client::IacAgentClient::new(
        ClientConfig {
            cert: agent_paths.cert,
            key: agent_paths.key,
            ..c.client_config()
        }
        .channel()
        .await
        .unwrap(),
    );
    let e = iac_agent
        .push_state(iac::StatePush {
            job_id: applied.apply_job.clone(),
            epoch: 1,
            serial: st.state_serial + 1,
            lineage: st.state_lineage.clone(),
            sealed: b"age-encryption.org/v1\n".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // The second commit plans against that state: only the difference.
    let r = wait_run(&mut a, &second, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    let changed: Vec<_> = r
        .changes
        .iter()
        .map(|c| (c.address.as_str(), c.actions.clone()))
        .collect();
    assert_eq!(
        changed,
        [("null_resource.second", vec!["create".to_string()])],
        "{r:#?}"
    );
    assert_eq!(
        (r.state_serial, r.state_lineage.as_str()),
        (st.state_serial, st.state_lineage.as_str())
    );

    // The state moves outside any run (an operator pushes a version): the
    // approved plan is stale and nothing is applied.
    let pushed = dir.path().join("pushed.tfstate");
    std::fs::write(
        &pushed,
        serde_json::json!({
            "version": 4,
            "terraform_version": "1.0.3",
            "serial": st.state_serial + 1,
            "lineage": st.state_lineage,
            "outputs": {},
            "resources": [],
        })
        .to_string(),
    )
    .unwrap();
    let pool_pub = outpost::dev::pool_key_paths(&c.state).1;
    cli(&[
        "state",
        "push",
        "web",
        pushed.to_str().unwrap(),
        "--recipient",
        pool_pub.to_str().unwrap(),
    ]);
    for who in [&mut alice, &mut bob] {
        who.decide_run(iac::DecideRunRequest {
            run_id: second.clone(),
            decision: "approve".into(),
            comment: String::new(),
        })
        .await
        .unwrap();
    }
    let r = wait_run(&mut a, &second, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "STALE", "{r:#?}");
    assert!(r.message.contains("state moved"), "{r:#?}");
    let versions: serde_json::Value =
        serde_json::from_str(&cli(&["state", "versions", "web", "--output", "json"])).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 2, "{versions}");
    assert_eq!(versions[0]["written_by"], "admin:admin", "{versions}");
    let log = String::from_utf8_lossy(&c.logs(&r.apply_job).await).into_owned();
    assert!(!log.contains("Apply complete"), "{log}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_policies_deny_in_the_agent_and_no_changes_finish() {
    let c = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The agent owner's local policy denies what the stack's policy allows.
    let local = dir.path().join("local.rego");
    std::fs::write(
        &local,
        r#"package outpost.plan
deny contains msg if {
    some rc in input.plan.resource_changes
    rc.address == "null_resource.forbidden"
    msg := "null_resource.forbidden is not allowed here"
}
"#,
    )
    .unwrap();
    let mut cfg = c.agent_config(2);
    cfg.iac.plan_policy = Some(local);
    let agent = c.start_agent_with(cfg).await;
    let mut a = admin(&c).await;

    let deny_repo = dir.path().join("d");
    let deny_repo = repo(&deny_repo, MAIN_TF);
    let mut denied = stack("denied", &deny_repo);
    denied.plan_policy = r#"package outpost.plan
deny contains msg if {
    input.plan.variables.greeting.value == "hello"
    msg := "greeting must not be hello"
}
"#
    .into();
    let local_repo = dir.path().join("l");
    let local_repo = repo(
        &local_repo,
        &format!("{MAIN_TF}\nresource \"null_resource\" \"forbidden\" {{}}\n"),
    );
    let mut local_denied = stack("local-denied", &local_repo);
    local_denied.variables = [("greeting".to_string(), "fine".to_string())].into();
    local_denied.plan_policy = denied.plan_policy.clone();
    let empty_repo = dir.path().join("e");
    let empty_repo = repo(&empty_repo, "terraform {}\n");
    let empty = stack("empty", &empty_repo);
    // Autodeploy confirms by itself only when no policy warns. The plan of
    // `auto` holds a sensitive value that exists only once planned.
    let auto_repo = dir.path().join("a");
    let auto_repo = repo(
        &auto_repo,
        &format!(
            "{MAIN_TF}\nresource \"null_resource\" \"s\" {{\n  triggers = {{ token = sensitive(upper(\"plan-only-canary-7d1\")) }}\n}}\noutput \"token\" {{\n  value = null_resource.s.triggers.token\n  sensitive = true\n}}\n"
        ),
    );
    let mut auto = stack("auto", &auto_repo);
    auto.autodeploy = true;
    let mut auto_warn = stack("auto-warn", &auto_repo);
    auto_warn.autodeploy = true;
    auto_warn.plan_policy =
        "package outpost.plan\nwarn contains \"needs a human\" if { count(input.plan.resource_changes) > 0 }\n"
            .into();
    apply(&mut a, vec![denied, local_denied, empty, auto, auto_warn]).await;
    let d = sync(&mut a, "denied").await;
    let l = sync(&mut a, "local-denied").await;
    let e = sync(&mut a, "empty").await;
    let au = sync(&mut a, "auto").await;
    let aw = sync(&mut a, "auto-warn").await;

    let r = wait_run(&mut a, &d, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "FAILED", "{r:#?}");
    assert!(r.message.contains("greeting must not be hello"), "{r:#?}");
    assert_eq!(r.verdicts[0].source, "stack");
    let r = wait_run(&mut a, &l, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "FAILED", "{r:#?}");
    assert!(
        r.message
            .contains("null_resource.forbidden is not allowed here"),
        "{r:#?}"
    );
    let stack_verdict = r.verdicts.iter().find(|v| v.source == "stack").unwrap();
    assert!(stack_verdict.deny.is_empty(), "{r:#?}");
    let r = wait_run(&mut a, &e, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "FINISHED", "{r:#?}");
    assert!(!r.has_changes);
    assert_eq!(r.message, "no changes");
    let r = wait_run(&mut a, &au, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "FINISHED", "autodeploy applies by itself: {r:#?}");
    let confirmed = r
        .transitions
        .iter()
        .find(|t| t.state == "CONFIRMED")
        .unwrap();
    assert_eq!(confirmed.note, "autodeploy");
    assert!(r.approvals.is_empty());
    assert_eq!(
        r.outputs.get("token").map(String::as_str),
        Some("(sensitive)")
    );
    let r = wait_run(&mut a, &aw, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    assert!(r.message.contains("a policy warned"), "{r:#?}");
    assert_eq!(r.verdicts[0].warn, ["needs a human"]);
    // The plan's sensitive value never reached the control plane: not in
    // its store (runs, logs), not in its blobs (the sealed plan bundle and
    // the sealed state of the applied `auto` run hold it).
    let canary = b"PLAN-ONLY-CANARY-7D1";
    let mut seen = 0;
    let mut stack_dirs = vec![c.state.data_dir()];
    while let Some(d) = stack_dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack_dirs.push(p);
            } else if p.is_file() {
                seen += 1;
                let bytes = std::fs::read(&p).unwrap();
                assert!(
                    !bytes.windows(canary.len()).any(|w| w == canary),
                    "{} holds the plan's sensitive value",
                    p.display()
                );
            }
        }
    }
    assert!(seen >= 3, "the data directory was searched ({seen} files)");
    agent.stop().await;
}

/// The path of a blob in the control plane's data directory.
fn blob_path(c: &Cluster, digest: &str) -> PathBuf {
    c.state.data_dir().join("iac").join("blobs").join(digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_bundles_and_plans_made_against_no_state_are_never_applied() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path(), MAIN_TF);
    let mut a = admin(&c).await;
    apply(&mut a, vec![stack("t", &repo)]).await;
    let mut alice = admin_as(&c, "alice").await;
    let approve = |id: String| iac::DecideRunRequest {
        run_id: id,
        decision: "approve".into(),
        comment: String::new(),
    };

    // One byte of the sealed bundle changed: refused, nothing applied.
    let first = sync(&mut a, "t").await;
    let r = wait_run(&mut a, &first, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    let sealed = std::fs::read(blob_path(&c, &r.bundle_digest)).unwrap();
    assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
    let mut bad = sealed.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(blob_path(&c, &r.bundle_digest), &bad).unwrap();
    alice.decide_run(approve(first.clone())).await.unwrap();
    let r = wait_run(&mut a, &first, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "FAILED", "{r:#?}");
    assert!(r.message.contains("corrupt"), "{r:#?}");
    let st = a
        .get_stack(iac::GetStackRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(st.state_lineage.is_empty(), "nothing applied: {st:#?}");

    // Planned against no state; a state appears before the apply: stale
    // (Terraform's own check misses this case), nothing applied.
    std::fs::write(repo.join("infra/extra.tf"), "# second\n").unwrap();
    commit(&repo, "second");
    let second = sync(&mut a, "t").await;
    let r = wait_run(&mut a, &second, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    assert!(r.state_lineage.is_empty());
    let pushed = dir.path().join("s.tfstate");
    std::fs::write(
        &pushed,
        r#"{"version":4,"terraform_version":"1.0.3","serial":3,"lineage":"0b6e5c2a-7c2e-4bb4-9b8e-3d9a8c1c2f10","outputs":{},"resources":[]}"#,
    )
    .unwrap();
    let out = Command::new(bin("outpost"))
        .arg("--state-dir")
        .arg(&c.state.root)
        .args(["state", "push", "t"])
        .arg(&pushed)
        .arg("--recipient")
        .arg(outpost::dev::pool_key_paths(&c.state).1)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    alice.decide_run(approve(second.clone())).await.unwrap();
    let r = wait_run(&mut a, &second, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "STALE", "{r:#?}");
    assert!(r.message.contains("planned against no state"), "{r:#?}");
    let v = a
        .list_state_versions(iac::ListStateVersionsRequest {
            stack: "t".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(v.len(), 1, "only the pushed version: {v:#?}");
    // A plan is consumed once: the run's apply job is the only one.
    assert!(!r.apply_job.is_empty());
    agent.stop().await;
}

/// A cluster with lease `ttl` and the configuration of an agent process
/// `name` with the pool key.
async fn cluster_with_agent_process(name: &str, ttl: Duration) -> (Cluster, PathBuf) {
    let c = Cluster::start_with(outpost::hub::LeaseTiming {
        ttl,
        heartbeat: Duration::from_secs(1),
        sweep: Duration::from_millis(200),
    })
    .await;
    let pool_key = outpost::dev::pool_key_paths(&c.state).0;
    let cfg = c.write_agent_config(
        name,
        2,
        &format!("[iac]\npool_key_file = \"{}\"\n", pool_key.display()),
        "",
    );
    (c, cfg)
}

/// Waits (bounded) until the apply's log shows Terraform inside the slow
/// resource's provisioner.
async fn wait_inside_slow_resource(c: &Cluster, apply_job: &str) {
    let deadline = tokio::time::Instant::now() + PLAN_WAIT;
    loop {
        let log = String::from_utf8_lossy(&c.logs(apply_job).await).into_owned();
        if log.contains("Provisioning with 'local-exec'") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the apply never reached the slow resource: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_whose_agent_is_killed_fails_is_never_retried_and_releases_the_lock() {
    let (c, cfg) = cluster_with_agent_process("doomed", Duration::from_secs(6)).await;
    let mut doomed = c.spawn_agent("doomed", &cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path(), MAIN_TF);
    let mut a = admin(&c).await;
    let mut spec = stack("k", &repo);
    spec.autodeploy = true;
    apply(&mut a, vec![spec.clone()]).await;
    // A first apply leaves a state version.
    let first = sync(&mut a, "k").await;
    let r = wait_run(&mut a, &first, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "FINISHED", "{r:#?}");
    let kept = a
        .get_stack(iac::GetStackRequest { name: "k".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!kept.state_lineage.is_empty(), "{kept:#?}");
    // The next commit adds a slow resource; its apply is killed inside it.
    std::fs::write(
        repo.join("infra/main.tf"),
        format!(
            "{MAIN_TF}\nresource \"null_resource\" \"slow\" {{\n  provisioner \"local-exec\" {{\n    command = \"sleep 45\"\n  }}\n}}\n"
        ),
    )
    .unwrap();
    commit(&repo, "slow");
    let run_id = sync(&mut a, "k").await;
    let r = wait_run(&mut a, &run_id, PLAN_WAIT, |r| r.state == "APPLYING").await;
    // Kill -9 once Terraform is inside the slow resource.
    wait_inside_slow_resource(&c, &r.apply_job).await;
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(10)).await;
    let r = wait_run(&mut a, &run_id, Duration::from_secs(60), is_final).await;
    assert_eq!(r.state, "FAILED", "{r:#?}");
    assert!(r.message.contains("never retried"), "{r:#?}");
    assert!(
        r.message
            .contains(&format!("last state serial {}", kept.state_serial)),
        "{r:#?}"
    );
    assert!(r.message.contains("lock is released"), "{r:#?}");
    for id in outpost_tests::containers_of(&r.apply_job).await {
        let _ = Command::new("docker").args(["rm", "-f", &id]).output();
    }
    // Not retried: a new agent is never handed the apply.
    let agent = c.start_agent(2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = c.job(&r.apply_job).await;
    assert_eq!(job.epoch, 1, "{job:#?}");
    // The lock is released: the next run plans against the state the
    // killed apply left: the first apply's version (Terraform stores its
    // state when an apply ends, and this one never ended).
    spec.autodeploy = false;
    apply(&mut a, vec![spec]).await;
    let next = a
        .trigger_run(iac::TriggerRunRequest { stack: "k".into() })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let r = wait_run(&mut a, &next, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    assert_eq!(
        (r.state_serial, r.state_lineage.as_str()),
        (kept.state_serial, kept.state_lineage.as_str()),
        "{r:#?}"
    );
    let changed: Vec<_> = r.changes.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(changed, ["null_resource.slow"], "{r:#?}");
    let _ = a
        .decide_run(iac::DecideRunRequest {
            run_id: next,
            decision: "cancel".into(),
            comment: String::new(),
        })
        .await;
    agent.stop().await;
}

/// The agent is killed during an apply and comes back within the lease: it
/// re-adopts the container, binds the state endpoint again in the job's
/// namespace, and the apply ends `FINISHED` with its state stored, once, by
/// the same lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_whose_agent_restarts_within_the_lease_finishes_with_its_state() {
    let (c, cfg) = cluster_with_agent_process("phoenix", Duration::from_secs(30)).await;
    let mut agent = c.spawn_agent("phoenix", &cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(
        dir.path(),
        &format!(
            "{MAIN_TF}\nresource \"null_resource\" \"slow\" {{\n  provisioner \"local-exec\" {{\n    command = \"sleep 12\"\n  }}\n}}\n"
        ),
    );
    let mut a = admin(&c).await;
    let mut spec = stack("p", &repo);
    spec.autodeploy = true;
    apply(&mut a, vec![spec]).await;
    let run_id = sync(&mut a, "p").await;
    let r = wait_run(&mut a, &run_id, PLAN_WAIT, |r| r.state == "APPLYING").await;
    wait_inside_slow_resource(&c, &r.apply_job).await;
    agent.signal("KILL");
    agent.wait_exit(Duration::from_secs(10)).await;
    let agent = c.spawn_agent("phoenix", &cfg).await;
    let r = wait_run(&mut a, &run_id, PLAN_WAIT, is_final).await;
    let log = String::from_utf8_lossy(&c.logs(&r.apply_job).await).into_owned();
    assert_eq!(r.state, "FINISHED", "{r:#?}\n{log}");
    assert!(log.contains("Apply complete! Resources: 2 added"), "{log}");
    let job = c.job(&r.apply_job).await;
    assert_eq!(job.epoch, 1, "{job:#?}");
    let v = a
        .list_state_versions(iac::ListStateVersionsRequest {
            stack: "p".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].written_by, format!("job:{}", r.apply_job), "{v:#?}");
    drop(agent);
}

/// An approval policy decides instead of a count: an approval by someone it
/// does not name leaves the run waiting, one by the identity it names
/// confirms it, and a plan it rejects is discarded without an apply. A
/// policy that does not compile, or one beside `approvals_required`, is
/// refused when the stack is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_policy_decides_who_approves_and_rejects_what_it_forbids() {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path(), MAIN_TF);
    let mut a = admin(&c).await;
    let mut spec = stack("gated", &repo);
    spec.approval_policy = "package outpost.approval\napprove if {\n".into();
    let e = a
        .apply_stacks(iac::ApplyStacksRequest {
            stacks: vec![spec.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("approval_policy"), "{e:?}");
    spec.approval_policy = r#"package outpost.approval
approve if {
    some a in input.approvals
    a.identity == "admin:sec"
}
reject contains msg if {
    some c in input.plan.changes
    "delete" in c.actions
    msg := sprintf("%s would be deleted", [c.address])
}
"#
    .into();
    spec.approvals_required = 2;
    let e = a
        .apply_stacks(iac::ApplyStacksRequest {
            stacks: vec![spec.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("keep one"), "{e:?}");
    spec.approvals_required = 0;
    apply(&mut a, vec![spec]).await;

    let run_id = sync(&mut a, "gated").await;
    let r = wait_run(&mut a, &run_id, PLAN_WAIT, settled).await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    let decide = |who: &'static str| {
        let run_id = run_id.clone();
        let c = &c;
        async move {
            admin_as(c, who)
                .await
                .decide_run(iac::DecideRunRequest {
                    run_id,
                    decision: "approve".into(),
                    comment: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let r = decide("alice").await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    let r = decide("sec").await;
    assert_eq!(r.state, "CONFIRMED", "{r:#?}");
    assert!(r.message.contains("approval policy"), "{r:#?}");
    let r = wait_run(&mut a, &run_id, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "FINISHED", "{r:#?}");

    // A commit that deletes the resource: the policy rejects the plan.
    std::fs::write(
        repo.join("infra/main.tf"),
        "terraform {\n  required_providers {\n    null = {\n      source  = \"hashicorp/null\"\n      version = \"~> 2.1\"\n    }\n  }\n}\n",
    )
    .unwrap();
    commit(&repo, "delete");
    let next = sync(&mut a, "gated").await;
    let r = wait_run(&mut a, &next, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "DISCARDED", "{r:#?}");
    assert!(
        r.message.contains("null_resource.first would be deleted"),
        "{r:#?}"
    );
    assert!(r.apply_job.is_empty(), "{r:#?}");
    agent.stop().await;
}
