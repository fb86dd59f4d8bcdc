//! Drift detection, signed notifications, proposed runs and stack secrets
//! end to end: a real git repository, real Terraform (1.0.3, null provider)
//! in the real sandbox, a real webhook receiver on loopback, real mTLS.
//!
//! The stacks here keep their state in the control plane (managed state).
//! Drift is what an operator running Terraform by hand leaves behind: a
//! state version written outside any run with `outpost state push` (sealed
//! on the client), derived from the current one (same lineage, the next
//! serial) with a resource's triggers changed, an instance removed or one
//! the code does not declare added. The null provider reads nothing back,
//! so the refresh-only plan reports no drift of its own here; the normal
//! plan of the same checkout reports what reverting it takes, and that is
//! the drift the checks must find.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_proto::iac::v1 as iac;
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use outpost_tests::iac::{
    NULL_PROVIDER, admin, apply, commit, get_run, git, is_final, repo, stack, wait_run,
};
use outpost_tests::webhook::{Receiver, verify};
use outpost_tests::{Agent, Cluster, bin};
use tonic::transport::Channel;

/// Three resources whose triggers are all "1"; the state is managed.
fn main_tf() -> String {
    [
        NULL_PROVIDER,
        r#"
resource "null_resource" "a" {
  triggers = { v = "1" }
}

resource "null_resource" "b" {
  triggers = { v = "1" }
}

resource "null_resource" "noise" {
  triggers = { v = "1" }
}
"#,
    ]
    .concat()
}

/// The state [`main_tf`] leaves when applied: every trigger "1".
const APPLIED: &[(&str, &str)] = &[("a", "1"), ("b", "1"), ("noise", "1")];

/// A Terraform state in state format `format` (4 for Terraform 1.0), of
/// `null_resource`s `(name, trigger v)`.
fn state(format: u64, serial: u64, lineage: &str, resources: &[(&str, &str)]) -> String {
    let res = |(i, (name, v)): (usize, &(&str, &str))| {
        serde_json::json!({
            "mode": "managed", "type": "null_resource", "name": name,
            "provider": "provider[\"registry.terraform.io/hashicorp/null\"]",
            "instances": [{"schema_version": 0,
                "attributes": {"id": format!("{}", 1001 + i), "triggers": {"v": v}},
                "sensitive_attributes": [], "private": "bnVsbA=="}],
        })
    };
    serde_json::json!({
        "version": format, "terraform_version": "1.0.3", "serial": serial,
        "lineage": lineage, "outputs": {},
        "resources": resources.iter().enumerate().map(res).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Writes a state version of `stack` outside any run, as an operator would
/// after running Terraform by hand: the current version's lineage and the
/// next serial (a new lineage for a stack without state), these resources,
/// pushed with `outpost state push --recipient pool.pub`.
fn push_state(c: &Cluster, dir: &Path, stack: &str, resources: &[(&str, &str)]) {
    push_state_in(c, dir, stack, 4, resources);
}

/// [`push_state`] of a state in state format `format`.
fn push_state_in(c: &Cluster, dir: &Path, stack: &str, format: u64, resources: &[(&str, &str)]) {
    push_raw(c, dir, stack, |serial, lineage| {
        state(format, serial, lineage, resources)
    });
}

/// Pushes the state `make(serial, lineage)` makes for the next serial of
/// the current lineage (a new lineage for a stack without state).
fn push_raw(c: &Cluster, dir: &Path, stack: &str, make: impl FnOnce(u64, &str) -> String) {
    let versions: serde_json::Value =
        serde_json::from_str(&cli(c, &["state", "versions", stack, "--output", "json"])).unwrap();
    let (serial, lineage) = match versions.as_array().unwrap().first() {
        Some(v) => (
            v["serial"].as_u64().unwrap() + 1,
            v["lineage"].as_str().unwrap().to_string(),
        ),
        None => (1, "5b0c7a54-0000-4000-8000-000000000001".to_string()),
    };
    let file = dir.join(format!("{stack}-{serial}.tfstate"));
    std::fs::write(&file, make(serial, &lineage)).unwrap();
    let pool_pub = outpost::dev::pool_key_paths(&c.state).1;
    cli(
        c,
        &[
            "state",
            "push",
            stack,
            file.to_str().unwrap(),
            "--recipient",
            pool_pub.to_str().unwrap(),
        ],
    );
    let versions: serde_json::Value =
        serde_json::from_str(&cli(c, &["state", "versions", stack, "--output", "json"])).unwrap();
    assert_eq!(versions[0]["serial"], serial, "{versions}");
    assert_eq!(versions[0]["lineage"], lineage.as_str(), "{versions}");
    assert_eq!(versions[0]["written_by"], "admin:admin", "{versions}");
}

/// Syncs `name` (its first fetch queues a tracked run) and waits for the
/// run to end: the state pushed by hand agrees with the code, so it finds
/// nothing to do.
async fn sync_in_sync(a: &mut IacAdminClient<Channel>, name: &str) -> iac::Run {
    let id = a
        .sync_stack(iac::SyncStackRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let r = wait_run(a, &id, PLAN_WAIT, is_final).await;
    assert_eq!(
        (r.state.as_str(), r.message.as_str()),
        ("FINISHED", "no changes"),
        "{r:#?}"
    );
    r
}

/// `(address, actions)` pairs.
fn changes(pairs: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    pairs
        .iter()
        .map(|(a, acts)| (a.to_string(), acts.iter().map(|s| s.to_string()).collect()))
        .collect()
}

fn pairs(rs: &[iac::ResourceChange]) -> Vec<(String, Vec<String>)> {
    rs.iter()
        .map(|r| (r.address.clone(), r.actions.clone()))
        .collect()
}

const REPLACE: &[&str] = &["delete", "create"];

fn secret(name: &str, value: &[u8]) -> iac::SecretFile {
    iac::SecretFile {
        name: name.into(),
        value: value.to_vec(),
    }
}

/// A control plane, one agent of capacity 2, a webhook receiver and a
/// scratch directory.
async fn cluster() -> (Cluster, Agent, Receiver, tempfile::TempDir) {
    let c = Cluster::start().await;
    let agent = c.start_agent(2).await;
    let hooks = Receiver::start().await;
    (c, agent, hooks, tempfile::tempdir().unwrap())
}

async fn drift_runs(a: &mut IacAdminClient<Channel>, stack: &str) -> Vec<iac::Run> {
    a.list_runs(iac::ListRunsRequest {
        stack: stack.into(),
        limit: 200,
    })
    .await
    .unwrap()
    .into_inner()
    .runs
    .into_iter()
    .filter(|r| r.kind == "drift")
    .collect()
}

/// Waits for a drift check of `stack` queued after `after_ms` to end;
/// returns the stack's drift status then.
async fn next_check(
    a: &mut IacAdminClient<Channel>,
    stack: &str,
    after_ms: i64,
) -> (iac::Run, iac::DriftStatus) {
    let deadline = tokio::time::Instant::now() + CHECK_WAIT;
    loop {
        let done = drift_runs(a, stack)
            .await
            .into_iter()
            .filter(|r| r.created_at_ms > after_ms && is_final(r))
            .min_by_key(|r| r.created_at_ms);
        if let Some(r) = done {
            let s = a
                .get_stack(iac::GetStackRequest { name: stack.into() })
                .await
                .unwrap()
                .into_inner();
            return (r, s.drift.unwrap());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no drift check of {stack} after {after_ms} ended in {CHECK_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const PLAN_WAIT: Duration = Duration::from_secs(180);
const CHECK_WAIT: Duration = Duration::from_secs(180);

fn cli(c: &Cluster, args: &[&str]) -> String {
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
}

const SECRET: &[u8] = b"webhook-shared-secret-4f1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_told_once_per_distinct_drift_with_signed_retried_webhooks() {
    let (c, agent, hooks, dir) = cluster().await;
    // The global target fails twice, then answers: the event is sent again
    // after each failure, and one success is recorded.
    hooks.script("/flaky", &[500, 500]);
    let repo = repo(dir.path(), &main_tf());
    let mut a = admin(&c).await;
    let declare = |checked: bool| {
        let mut s = stack("net", &repo);
        s.drift = checked.then(|| iac::DriftSpec {
            schedule: "*/2 * * * * *".into(),
            timezone: "Europe/Paris".into(),
            ignore: vec!["null_resource.noi*".into()],
            ..Default::default()
        });
        s.notify = vec![iac::NotifyTarget {
            url: hooks.url("/hook"),
            secret: SECRET.to_vec(),
            ..Default::default()
        }];
        s
    };
    a.apply_stacks(iac::ApplyStacksRequest {
        stacks: vec![declare(false)],
        notify: vec![iac::NotifyTarget {
            url: hooks.url("/flaky"),
            secret: b"global-secret".to_vec(),
            events: vec!["drift.detected".into()],
            ..Default::default()
        }],
        set_notify: true,
    })
    .await
    .unwrap();
    // The stack was applied by hand before it came here: its state agrees
    // with the code, a tracked run finds nothing to do, and so do the
    // scheduled checks once the stack has a schedule.
    push_state(&c, dir.path(), "net", APPLIED);
    sync_in_sync(&mut a, "net").await;
    hooks
        .wait(Duration::from_secs(30), "run.finished", |s| {
            s.iter()
                .any(|r| r.header("x-outpost-event") == "run.finished")
        })
        .await;
    apply(&mut a, vec![declare(true)]).await;
    let (check, d) = next_check(&mut a, "net", 0).await;
    assert_eq!(d.status, "in_sync", "{d:#?}");
    assert!(d.next_at_ms > 0, "{d:#?}");
    assert_eq!(
        (check.drifted.len(), check.changes.len()),
        (0, 0),
        "{check:#?}"
    );

    // A state version written outside any run, `null_resource.a` changed
    // by hand: drifted, reverting it replaces `a`; one signed
    // `drift.detected`.
    let before = now_ms();
    push_state(
        &c,
        dir.path(),
        "net",
        &[("a", "2"), ("b", "1"), ("noise", "1")],
    );
    let changed = now_ms();
    let (check, d) = next_check(&mut a, "net", changed).await;
    assert_eq!(d.status, "drifted", "{d:#?}");
    assert_eq!(
        pairs(&d.resources),
        changes(&[("null_resource.a", REPLACE)])
    );
    assert_eq!(d.fingerprint.len(), 64);
    assert!(d.since_ms >= before, "{d:#?}");
    assert_eq!(pairs(&check.drifted), changes(&[]), "{check:#?}");
    assert_eq!(
        pairs(&check.changes),
        changes(&[("null_resource.a", REPLACE)]),
        "{check:#?}"
    );
    hooks
        .wait(Duration::from_secs(30), "drift.detected", |s| {
            s.iter()
                .any(|r| r.path == "/hook" && r.header("x-outpost-event") == "drift.detected")
        })
        .await;
    let detected = hooks.of("/hook", "drift.detected");
    assert_eq!(detected.len(), 1, "{detected:#?}");
    let h = &detected[0];
    assert!(
        verify(SECRET, &h.body, h.header("x-outpost-signature-256")),
        "the signature verifies with the shared secret: {h:#?}"
    );
    assert!(!verify(
        b"another secret",
        &h.body,
        h.header("x-outpost-signature-256")
    ));
    let body = h.json();
    assert_eq!(body["event"], "drift.detected");
    assert_eq!(body["stack"], "net");
    // The check that first saw it (it may have started just before `changed`).
    let first_seen = get_run(&mut a, body["run"].as_str().unwrap()).await;
    assert_eq!(first_seen.kind, "drift");
    assert_eq!(
        pairs(&first_seen.changes),
        changes(&[("null_resource.a", REPLACE)])
    );
    assert_eq!(body["fingerprint"], d.fingerprint.as_str());
    assert_eq!(body["states"]["from"], "in_sync");
    assert_eq!(body["states"]["to"], "drifted");
    assert_eq!(body["counts"]["drifted"], 1);
    // null_resource.a is to be replaced: one add, one destroy.
    assert_eq!(
        (
            &body["counts"]["add"],
            &body["counts"]["change"],
            &body["counts"]["destroy"]
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!(0),
            &serde_json::json!(1)
        ),
        "{body}"
    );
    assert_eq!(
        body["resources"],
        serde_json::json!([{"address": "null_resource.a", "actions": ["delete", "create"]}])
    );
    assert_eq!(body["delivery"], h.header("x-outpost-delivery"));
    assert_eq!(
        body["timestamp"].to_string(),
        h.header("x-outpost-timestamp"),
        "the signed body holds the timestamp"
    );
    let ts: i64 = h.header("x-outpost-timestamp").parse().unwrap();
    assert!((ts - now_ms() / 1000).abs() < 600);

    // Another hand-written version: the same drift, and an ignored one
    // (`noise`). The next scheduled checks send nothing.
    push_state(
        &c,
        dir.path(),
        "net",
        &[("a", "2"), ("b", "1"), ("noise", "7")],
    );
    let noisy = now_ms();
    let (again, d2) = next_check(&mut a, "net", noisy).await;
    assert_eq!(again.triggered_by, "schedule");
    assert_eq!(
        pairs(&again.changes),
        changes(&[
            ("null_resource.a", REPLACE),
            ("null_resource.noise", REPLACE)
        ]),
        "the plan sees the ignored resource: {again:#?}"
    );
    let (_, d3) = next_check(&mut a, "net", again.created_at_ms).await;
    assert_eq!(
        (d2.fingerprint.as_str(), d3.fingerprint.as_str()),
        (d.fingerprint.as_str(), d.fingerprint.as_str())
    );
    assert_eq!(
        pairs(&d3.resources),
        changes(&[("null_resource.a", REPLACE)])
    );
    assert_eq!(d3.since_ms, d.since_ms);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hooks.of("/hook", "drift.detected").len(), 1);
    assert!(hooks.of("/hook", "drift.changed").is_empty());

    // A different drift: `b` removed from the state, `old` (which the code
    // no longer declares) added. `drift.changed`, once.
    push_state(
        &c,
        dir.path(),
        "net",
        &[("a", "2"), ("noise", "7"), ("old", "1")],
    );
    let other = now_ms();
    let (_, d4) = next_check(&mut a, "net", other).await;
    assert_eq!(
        pairs(&d4.resources),
        changes(&[
            ("null_resource.a", REPLACE),
            ("null_resource.b", &["create"]),
            ("null_resource.old", &["delete"]),
        ])
    );
    assert_ne!(d4.fingerprint, d.fingerprint);
    hooks
        .wait(Duration::from_secs(30), "drift.changed", |s| {
            s.iter()
                .any(|r| r.path == "/hook" && r.header("x-outpost-event") == "drift.changed")
        })
        .await;
    let changed_body = hooks.of("/hook", "drift.changed")[0].json();
    assert_eq!(changed_body["fingerprint"], d4.fingerprint.as_str());
    assert_eq!(changed_body["counts"]["drifted"], 3);

    // Repaired by hand (the noise left as it is): `drift.resolved`, in sync.
    push_state(
        &c,
        dir.path(),
        "net",
        &[("a", "1"), ("b", "1"), ("noise", "7")],
    );
    let repaired = now_ms();
    let (_, d5) = next_check(&mut a, "net", repaired).await;
    assert_eq!(d5.status, "in_sync", "{d5:#?}");
    assert!(d5.resources.is_empty(), "{d5:#?}");
    hooks
        .wait(Duration::from_secs(30), "drift.resolved", |s| {
            s.iter()
                .any(|r| r.path == "/hook" && r.header("x-outpost-event") == "drift.resolved")
        })
        .await;
    assert_eq!(hooks.of("/hook", "drift.detected").len(), 1);
    assert_eq!(hooks.of("/hook", "drift.changed").len(), 1);
    assert_eq!(hooks.of("/hook", "drift.resolved").len(), 1);

    // A state this Terraform cannot read (a format of a later one): every
    // check fails, the status is unknown with the reason, and one
    // `drift.check_failed` is sent however many checks fail in a row.
    push_state_in(&c, dir.path(), "net", 5, APPLIED);
    let broken = now_ms();
    let mut after = broken;
    for _ in 0..3 {
        let (failed, d6) = next_check(&mut a, "net", after).await;
        assert_eq!(failed.state, "FAILED", "{failed:#?}");
        assert_eq!(d6.status, "unknown", "{d6:#?}");
        assert!(d6.reason.starts_with("drift check "), "{d6:#?}");
        assert_eq!(d6.last_run, failed.run_id);
        after = failed.created_at_ms;
    }
    hooks
        .wait(Duration::from_secs(30), "drift.check_failed", |s| {
            s.iter()
                .any(|r| r.path == "/hook" && r.header("x-outpost-event") == "drift.check_failed")
        })
        .await;
    let failed = hooks.of("/hook", "drift.check_failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0].json()["states"]["from"], "in_sync");
    assert_eq!(failed[0].json()["states"]["to"], "unknown");
    // Readable again: in sync, and nothing to tell (receivers last heard
    // of no drift).
    push_state(&c, dir.path(), "net", APPLIED);
    let fixed = now_ms();
    let (_, d7) = next_check(&mut a, "net", fixed).await;
    assert_eq!((d7.status.as_str(), d7.reason.as_str()), ("in_sync", ""));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hooks.of("/hook", "drift.check_failed").len(), 1);
    assert_eq!(hooks.of("/hook", "drift.resolved").len(), 1);

    // The flaky global target: three attempts of one delivery, the last
    // one a success, every attempt recorded.
    hooks
        .wait(Duration::from_secs(60), "the third attempt", |s| {
            s.iter().filter(|r| r.path == "/flaky").count() >= 3
        })
        .await;
    let flaky = hooks.of("/flaky", "drift.detected");
    assert_eq!(
        flaky.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    let ids: std::collections::BTreeSet<_> = flaky
        .iter()
        .map(|r| r.header("x-outpost-delivery").to_string())
        .collect();
    assert_eq!(ids.len(), 1, "one delivery, retried: {ids:?}");
    assert!(verify(
        b"global-secret",
        &flaky[2].body,
        flaky[2].header("x-outpost-signature-256")
    ));
    let list: serde_json::Value = serde_json::from_str(&cli(
        &c,
        &["notifications", "--stack", "net", "--output", "json"],
    ))
    .unwrap();
    let flaky_row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["url"].as_str().unwrap().ends_with("/flaky"))
        .unwrap();
    assert_eq!(flaky_row["state"], "delivered");
    assert_eq!(flaky_row["attempts"], 3);
    let statuses: Vec<_> = flaky_row["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 500, 200]);
    let successes = list
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["history"].as_array().unwrap().iter().map(move |h| (d, h)))
        .filter(|(d, h)| d["url"].as_str().unwrap().ends_with("/flaky") && h["error"] == "")
        .count();
    assert_eq!(successes, 1);
    assert!(cli(&c, &["notifications"]).contains("drift.resolved"));

    // The operator's views: `outpost drift`, `stack show`, metrics.
    let v: serde_json::Value =
        serde_json::from_str(&cli(&c, &["drift", "--output", "json"])).unwrap();
    assert_eq!(v[0]["stack"], "net");
    assert_eq!(v[0]["status"], "in_sync");
    assert!(v[0]["last_check_age_ms"].as_i64().unwrap() >= 0);
    let v: serde_json::Value =
        serde_json::from_str(&cli(&c, &["stack", "show", "net", "--output", "json"])).unwrap();
    assert_eq!(v["drift"]["status"], "in_sync");
    let metrics = http_get(c.server.as_ref().unwrap().metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("outpost_drifts_detected_total{stack=\"net\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outpost_notification_attempts_failed_total 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("outpost_drift_runs_total 0"), "{metrics}");
    let failed_checks: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_drift_checks_failed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(failed_checks >= 3, "{metrics}");
    // The webhook secrets and the world's values are nowhere in the data
    // directory in clear.
    assert_not_in_data_dir(&c, &[SECRET, b"global-secret"]);
    agent.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_not_in_data_dir(c: &Cluster, canaries: &[&[u8]]) {
    let mut seen = 0;
    let mut dirs = vec![c.state.data_dir()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.is_file() {
                seen += 1;
                let bytes = std::fs::read(&p).unwrap();
                for canary in canaries {
                    assert!(
                        !bytes.windows(canary.len()).any(|w| w == *canary),
                        "{} holds a secret in clear",
                        p.display()
                    );
                }
            }
        }
    }
    assert!(seen >= 3, "the data directory was searched ({seen} files)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_goes_through_policy_and_approval_and_drift_waits_for_the_stack_lock() {
    let (c, agent, hooks, dir) = cluster().await;
    let repo = repo(dir.path(), &main_tf());
    let mut a = admin(&c).await;
    // `auto` auto-approves reverting drift: the policy warns on anything
    // but a drift run, autodeploy confirms when nothing warned. `human`
    // always warns.
    let auto_policy = r#"package outpost.plan
warn contains "changes outside drift need a human" if { not input.run.drift }
"#;
    let human_policy = "package outpost.plan\nwarn contains \"a human decides\" if { true }\n";
    let declare = |name: &str, policy: &str| {
        let mut s = stack(name, &repo);
        s.autodeploy = true;
        s.plan_policy = policy.into();
        s.drift = Some(iac::DriftSpec {
            // Checks run when asked (`stack check`), not on a schedule here.
            schedule: "manual".into(),
            reconcile: true,
            ..Default::default()
        });
        s.notify = vec![iac::NotifyTarget {
            url: hooks.url("/hook"),
            secret: SECRET.to_vec(),
            ..Default::default()
        }];
        s
    };
    apply(
        &mut a,
        vec![declare("auto", auto_policy), declare("human", human_policy)],
    )
    .await;
    // Both applied by hand before they came here: nothing to do.
    for name in ["auto", "human"] {
        push_state(&c, dir.path(), name, APPLIED);
        sync_in_sync(&mut a, name).await;
    }
    // `null_resource.a` changed by hand in both; a check of each.
    for name in ["auto", "human"] {
        push_state(
            &c,
            dir.path(),
            name,
            &[("a", "2"), ("b", "1"), ("noise", "1")],
        );
    }
    let out = cli(&c, &["stack", "check", "auto", "--output", "json"]);
    let auto_check: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(auto_check["kind"], "drift");
    let human_check = a
        .check_drift(iac::CheckDriftRequest {
            stack: "human".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let r = wait_run(
        &mut a,
        auto_check["run_id"].as_str().unwrap(),
        CHECK_WAIT,
        is_final,
    )
    .await;
    assert_eq!(r.state, "FINISHED", "{r:#?}");
    assert_eq!(
        pairs(&r.changes),
        changes(&[("null_resource.a", REPLACE)]),
        "{r:#?}"
    );
    let r = wait_run(&mut a, &human_check.run_id, CHECK_WAIT, is_final).await;
    assert_eq!(r.state, "FINISHED", "{r:#?}");
    assert_eq!(
        pairs(&r.changes),
        changes(&[("null_resource.a", REPLACE)]),
        "{r:#?}"
    );

    // Each drift queued a tracked run with `run.drift = true`: `auto`'s
    // policy let autodeploy confirm it without a human; `human`'s waits.
    let reconcile = |runs: Vec<iac::Run>| {
        runs.into_iter()
            .find(|r| r.kind == "tracked" && r.drift)
            .expect("a reconciling run")
    };
    let mut auto_run = None;
    let mut human_run = None;
    let deadline = tokio::time::Instant::now() + PLAN_WAIT;
    while auto_run.is_none() || human_run.is_none() {
        for (name, slot) in [("auto", &mut auto_run), ("human", &mut human_run)] {
            let runs = a
                .list_runs(iac::ListRunsRequest {
                    stack: name.into(),
                    limit: 50,
                })
                .await
                .unwrap()
                .into_inner()
                .runs;
            if runs.iter().any(|r| r.kind == "tracked" && r.drift) {
                *slot = Some(reconcile(runs));
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconciling runs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let auto_run = auto_run.unwrap();
    let human_run = human_run.unwrap();
    assert_eq!(auto_run.triggered_by, "drift");
    // Reverting drift needs no human: confirmed by itself, then applied.
    let r = wait_run(&mut a, &auto_run.run_id, PLAN_WAIT * 2, |r| {
        !matches!(
            r.state.as_str(),
            "QUEUED" | "PLANNING" | "CONFIRMED" | "APPLYING"
        )
    })
    .await;
    assert_eq!(
        r.state, "FINISHED",
        "reverting drift needs no human: {r:#?}"
    );
    assert!(r.approvals.is_empty(), "{r:#?}");
    assert!(
        r.transitions
            .iter()
            .any(|t| t.state == "CONFIRMED" && t.note == "autodeploy"),
        "{r:#?}"
    );
    assert!(r.verdicts.iter().all(|v| v.warn.is_empty()), "{r:#?}");
    let r = wait_run(&mut a, &human_run.run_id, PLAN_WAIT, |r| {
        !matches!(r.state.as_str(), "QUEUED" | "PLANNING")
    })
    .await;
    assert_eq!(r.state, "UNCONFIRMED", "{r:#?}");
    assert_eq!(r.changes[0].address, "null_resource.a");
    hooks
        .wait(
            Duration::from_secs(30),
            "run.needs_approval of human",
            |s| {
                s.iter().any(|x| {
                    x.header("x-outpost-event") == "run.needs_approval"
                        && x.json()["run"] == human_run.run_id.as_str()
                })
            },
        )
        .await;

    // Reverted: `auto`'s next check finds it in sync again.
    let out = cli(&c, &["stack", "check", "auto", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = wait_run(&mut a, v["run_id"].as_str().unwrap(), CHECK_WAIT, is_final).await;
    assert_eq!(
        (r.state.as_str(), r.changes.len()),
        ("FINISHED", 0),
        "{r:#?}"
    );
    let s = a
        .get_stack(iac::GetStackRequest {
            name: "auto".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.drift.unwrap().status, "in_sync");

    // The human's run holds the stack lock: a drift check waits (and says
    // so) and gets no job until the lock is released.
    let waiting = a
        .check_drift(iac::CheckDriftRequest {
            stack: "human".into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let w = get_run(&mut a, &waiting.run_id).await;
    assert_eq!(w.state, "QUEUED", "{w:#?}");
    assert!(w.plan_job.is_empty(), "{w:#?}");
    assert!(w.message.contains("holds the stack lock"), "{w:#?}");
    assert!(w.message.contains(&human_run.run_id), "{w:#?}");
    // Meanwhile someone repairs `a` by hand, and the run reverting the
    // drift is approved: its plan was made against a state that has moved,
    // so it ends STALE with nothing applied, and says so (`run.failed`).
    push_state(&c, dir.path(), "human", APPLIED);
    let r = a
        .decide_run(iac::DecideRunRequest {
            run_id: human_run.run_id.clone(),
            decision: "approve".into(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.triggered_by, "drift");
    let r = wait_run(&mut a, &human_run.run_id, PLAN_WAIT, is_final).await;
    assert_eq!(r.state, "STALE", "{r:#?}");
    assert!(r.message.contains("state moved"), "{r:#?}");
    hooks
        .wait(Duration::from_secs(30), "run.failed of human", |s| {
            s.iter().any(|x| {
                x.header("x-outpost-event") == "run.failed"
                    && x.json()["run"] == human_run.run_id.as_str()
            })
        })
        .await;
    let failed = hooks
        .seen()
        .into_iter()
        .find(|x| x.header("x-outpost-event") == "run.failed")
        .unwrap();
    let body = failed.json();
    assert_eq!(body["states"]["to"], "STALE", "{body}");
    assert!(
        body["summary"].as_str().unwrap().contains("stale"),
        "{body}"
    );
    // The lock released, the waiting check runs: in sync, `drift.resolved`.
    let w = wait_run(&mut a, &waiting.run_id, CHECK_WAIT, is_final).await;
    assert_eq!(w.state, "FINISHED", "{w:#?}");
    assert!(w.changes.is_empty(), "{w:#?}");
    // Started only after the tracked run let go of the lock.
    let planning = w
        .transitions
        .iter()
        .find(|t| t.state == "PLANNING")
        .unwrap();
    let stale = r.transitions.iter().find(|t| t.state == "STALE").unwrap();
    assert!(planning.at_ms >= stale.at_ms, "{w:#?} {r:#?}");
    hooks
        .wait(Duration::from_secs(30), "drift.resolved of human", |s| {
            s.iter().any(|x| {
                x.header("x-outpost-event") == "drift.resolved" && x.json()["stack"] == "human"
            })
        })
        .await;
    // One drift, one reconciling run, one `drift.detected`.
    let runs = a
        .list_runs(iac::ListRunsRequest {
            stack: "human".into(),
            limit: 50,
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.iter().filter(|r| r.drift).count(), 1, "{runs:#?}");
    for event in ["drift.detected", "drift.resolved", "run.needs_approval"] {
        assert_eq!(
            hooks
                .seen()
                .iter()
                .filter(|x| x.header("x-outpost-event") == event && x.json()["stack"] == "human")
                .count(),
            1,
            "{event}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_can_refuse_drift_checks_or_run_one_at_a_time() {
    use outpost_proto::agent::v1::JobState;
    let c = Cluster::start().await;
    let mut cfg = c.agent_config(2);
    cfg.iac.refuse_drift = true;
    let agent = c.start_agent_with(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path(), &main_tf());
    let mut a = admin(&c).await;
    let declare = |name: &str| {
        let mut s = stack(name, &repo);
        s.drift = Some(iac::DriftSpec {
            schedule: "manual".into(),
            ..Default::default()
        });
        s
    };
    let mut lonely = declare("lonely");
    if let Some(d) = lonely.drift.as_mut() {
        d.queue_timeout_ms = 2_000;
    }
    apply(&mut a, vec![declare("one"), declare("two"), lonely]).await;
    // The agent that refuses drift checks still runs tracked runs.
    for name in ["one", "two", "lonely"] {
        push_state(&c, dir.path(), name, APPLIED);
        sync_in_sync(&mut a, name).await;
    }
    let check = |a: &mut IacAdminClient<Channel>, name: &'static str| {
        let mut a = a.clone();
        async move {
            a.check_drift(iac::CheckDriftRequest { stack: name.into() })
                .await
                .unwrap()
                .into_inner()
                .run_id
        }
    };
    // A check no agent takes within its stack's queue timeout fails, and the
    // stack's drift status says why.
    let lonely = check(&mut a, "lonely").await;
    let r = wait_run(&mut a, &lonely, CHECK_WAIT, is_final).await;
    assert_eq!(r.state, "FAILED", "{r:#?}");
    let drift = a
        .get_stack(iac::GetStackRequest {
            name: "lonely".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .drift
        .unwrap();
    assert_eq!(drift.status, "unknown", "{drift:#?}");
    assert!(
        drift.reason.contains("no connected agent has the labels"),
        "{drift:#?}"
    );
    // Without a queue timeout of its own, a check waits for an agent (an
    // hour by default).
    let first = check(&mut a, "one").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = get_run(&mut a, &first).await;
    assert_eq!(r.state, "PLANNING", "{r:#?}");
    let job = c.job(&r.plan_job).await;
    assert_eq!(outpost_tests::state(&job), JobState::Queued, "{job:#?}");
    assert_eq!(job.matching_agents, Some(0), "{job:#?}");

    // An agent that takes one drift check at a time joins: it runs it.
    let pool_key = outpost::dev::pool_key_paths(&c.state).0;
    let capped_cfg = c.write_agent_config(
        "capped",
        2,
        &format!(
            "[iac]\npool_key_file = \"{}\"\nmax_drift_checks = 1\n",
            pool_key.display()
        ),
        "",
    );
    let _capped = c.spawn_agent("capped", &capped_cfg).await;
    let r = wait_run(&mut a, &first, CHECK_WAIT, is_final).await;
    assert_eq!(r.state, "FINISHED", "{r:#?}");
    assert_eq!(c.job(&r.plan_job).await.agent_id, "capped");

    // Two checks at once: both leased to it (it has two slots), the second
    // waits for the first to end before it starts.
    let runs = [check(&mut a, "one").await, check(&mut a, "two").await];
    let mut waited = false;
    let deadline = tokio::time::Instant::now() + CHECK_WAIT;
    let jobs = loop {
        let mut jobs = Vec::new();
        for id in &runs {
            let r = get_run(&mut a, id).await;
            if !r.plan_job.is_empty() {
                jobs.push((is_final(&r), c.job(&r.plan_job).await));
            }
        }
        let held = |s: JobState| {
            jobs.iter()
                .any(|(_, j)| outpost_tests::state(j) == s && j.agent_id == "capped")
        };
        waited |= held(JobState::Running) && held(JobState::Leased);
        if jobs.len() == 2 && jobs.iter().all(|(done, _)| *done) {
            break jobs.into_iter().map(|(_, j)| j).collect::<Vec<_>>();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the checks did not end: {jobs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        waited,
        "one check was held, not started, while the other ran: {jobs:#?}"
    );
    let mut by_start = jobs.clone();
    by_start.sort_by_key(|j| j.started_at_ms);
    assert!(
        by_start[1].started_at_ms >= by_start[0].finished_at_ms,
        "one at a time: {jobs:#?}"
    );
    for j in &jobs {
        assert_eq!(j.agent_id, "capped", "{j:#?}");
        assert_eq!(outpost_tests::state(j), JobState::Succeeded, "{j:#?}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposed_runs_plan_beside_the_lock_and_stack_secrets_reach_only_the_job() {
    let (c, agent, hooks, dir) = cluster().await;
    let tf = [
        NULL_PROVIDER,
        r#"
resource "null_resource" "first" {
  triggers = { token = sensitive(file("/run/secrets/token")) }
}
"#,
    ]
    .concat();
    let repo = repo(dir.path(), &tf);
    let canary = b"stack-secret-canary-9c2";
    let mut a = admin(&c).await;
    // Bad input is refused when the stack is applied, naming the problem.
    for (f, needle) in [
        (
            (|s: &mut iac::StackSpec| {
                s.drift = Some(iac::DriftSpec {
                    schedule: "61 * * * *".into(),
                    ..Default::default()
                })
            }) as fn(&mut iac::StackSpec),
            "schedule",
        ),
        (
            |s| {
                s.drift = Some(iac::DriftSpec {
                    schedule: "* * * * *".into(),
                    timezone: "Mars/Olympus".into(),
                    ..Default::default()
                })
            },
            "Mars/Olympus",
        ),
        (
            |s| {
                s.notify = vec![iac::NotifyTarget {
                    url: "gopher://x/".into(),
                    ..Default::default()
                }]
            },
            "http",
        ),
        (
            |s| s.secrets = vec![secret("../escape", b"x")],
            "secret name",
        ),
    ] {
        let mut s = stack("bad", &repo);
        f(&mut s);
        let e = a
            .apply_stacks(iac::ApplyStacksRequest {
                stacks: vec![s],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    let stacks = a
        .list_stacks(iac::ListStacksRequest {})
        .await
        .unwrap()
        .into_inner()
        .stacks;
    assert!(stacks.is_empty(), "nothing was declared: {stacks:?}");

    // The stack's secret reaches its run's job as a file; the policy sees
    // the (sensitive) value, the control plane never does. Webhook targets
    // that refuse the connection or never answer do not affect the run.
    let mut s = stack("web", &repo);
    s.secrets = vec![secret("token", canary)];
    // The policy recognises the value without holding it.
    s.plan_policy = r#"package outpost.plan
warn contains "the token arrived" if {
    some rc in input.plan.resource_changes
    startswith(rc.change.after.triggers.token, "stack-secret-")
}
"#
    .into();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    s.notify = vec![
        iac::NotifyTarget {
            url: format!("http://{closed}/refused"),
            ..Default::default()
        },
        iac::NotifyTarget {
            url: hooks.url("/hang"),
            timeout_ms: 1000,
            ..Default::default()
        },
        iac::NotifyTarget {
            url: hooks.url("/slack"),
            format: "slack".into(),
            ..Default::default()
        },
    ];
    apply(&mut a, vec![s.clone()]).await;
    // Declared again with the same secret: unchanged.
    let again = a
        .apply_stacks(iac::ApplyStacksRequest {
            stacks: vec![s],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.changes[0].action, "unchanged");
    let tracked = a
        .sync_stack(iac::SyncStackRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let t = wait_run(&mut a, &tracked, PLAN_WAIT, |r| {
        !matches!(r.state.as_str(), "QUEUED" | "PLANNING")
    })
    .await;
    assert_eq!(t.state, "UNCONFIRMED", "{t:#?}");
    assert_eq!(t.verdicts[0].warn, ["the token arrived"], "{t:#?}");
    let log = String::from_utf8_lossy(&c.logs(&t.plan_job).await).into_owned();
    assert!(!log.contains("stack-secret-canary"), "{log}");
    hooks
        .wait(Duration::from_secs(30), "a slack text", |s| {
            s.iter().any(|r| r.path == "/slack")
        })
        .await;
    let slack = hooks.of("/slack", "run.needs_approval");
    assert_eq!(
        slack[0]
            .json()
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["text"]
    );
    assert!(
        slack[0].json()["text"]
            .as_str()
            .unwrap()
            .contains("needs approval")
    );

    // A proposed run of another branch plans while the tracked run holds
    // the lock, and is never applied.
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(
        repo.join("infra/extra.tf"),
        "resource \"null_resource\" \"extra\" {}\n",
    )
    .unwrap();
    commit(&repo, "feature");
    git(&repo, &["checkout", "-q", "main"]);
    let out = cli(
        &c,
        &["run", "plan", "web", "--ref", "feature", "--output", "json"],
    );
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["kind"], "proposed");
    assert_eq!(p["git_ref"], "feature");
    let p = wait_run(&mut a, p["run_id"].as_str().unwrap(), PLAN_WAIT, is_final).await;
    assert_eq!(p.state, "FINISHED", "{p:#?}");
    assert!(p.message.contains("plan only"), "{p:#?}");
    let addrs: Vec<_> = p.changes.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(addrs, ["null_resource.extra", "null_resource.first"]);
    assert_ne!(p.commit, t.commit);
    assert_eq!(get_run(&mut a, &tracked).await.state, "UNCONFIRMED");
    // A ref that does not exist, or that git would take for an option:
    // a clear error, nothing queued.
    let before = a
        .list_runs(iac::ListRunsRequest {
            stack: "web".into(),
            limit: 50,
        })
        .await
        .unwrap()
        .into_inner()
        .runs
        .len();
    for bad in ["no-such-branch", "--upload-pack=x"] {
        let e = a
            .propose_run(iac::ProposeRunRequest {
                stack: "web".into(),
                git_ref: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().contains(bad), "{}", e.message());
    }
    let after = a
        .list_runs(iac::ListRunsRequest {
            stack: "web".into(),
            limit: 50,
        })
        .await
        .unwrap()
        .into_inner()
        .runs
        .len();
    assert_eq!(before, after);

    // The unreachable targets were tried and recorded; the run did not care.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = a
            .list_deliveries(iac::ListDeliveriesRequest {
                stack: "web".into(),
                limit: 50,
            })
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        let tried = |suffix: &str| {
            list.iter()
                .find(|d| d.url.ends_with(suffix))
                .filter(|d| d.attempts >= 2)
                .cloned()
        };
        if let (Some(refused), Some(hung)) = (tried("/refused"), tried("/hang")) {
            assert_eq!(refused.state, "pending", "{refused:#?}");
            assert!(
                refused
                    .history
                    .iter()
                    .all(|h| h.status == 0 && !h.error.is_empty())
            );
            assert!(hung.history[0].error.contains("no answer"), "{hung:#?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{list:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get_run(&mut a, &tracked).await.state, "UNCONFIRMED");
    // The secret is nowhere in the data directory once the jobs are done.
    let _ = a
        .decide_run(iac::DecideRunRequest {
            run_id: tracked.clone(),
            decision: "discard".into(),
            comment: String::new(),
        })
        .await
        .unwrap();
    assert_not_in_data_dir(&c, &[canary]);
    agent.stop().await;
}

/// Not a test: measures, for the demo's configuration (`outpost dev
/// --demo`: one null resource from a variable, an output, managed state
/// applied), how many drift checks one agent of capacity 2 completes per
/// hour, and the time from a scheduled instant to the webhook it causes.
/// Run with
/// `cargo nextest run --workspace -E 'binary(drift) & test(measure)' --run-ignored only --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn measure_drift_checks_per_hour_and_schedule_to_webhook() {
    let (c, agent, hooks, dir) = cluster().await;
    eprintln!("MEASURE machine: {}", machine());
    let demo_tf = [
        NULL_PROVIDER,
        r#"
variable "greeting" {
  type    = string
  default = "hello"
}

resource "null_resource" "hello" {
  triggers = {
    greeting = var.greeting
  }
}

output "greeting" {
  value = null_resource.hello.triggers.greeting
}
"#,
    ]
    .concat();
    let repo = repo(dir.path(), &demo_tf);
    let mut a = admin(&c).await;
    // The state the demo's apply leaves, with `greeting` as given.
    let demo_state = |greeting: &'static str| {
        move |serial: u64, lineage: &str| {
            serde_json::json!({
                "version": 4, "terraform_version": "1.0.3", "serial": serial,
                "lineage": lineage,
                "outputs": {"greeting": {"value": greeting, "type": "string"}},
                "resources": [{
                    "mode": "managed", "type": "null_resource", "name": "hello",
                    "provider": "provider[\"registry.terraform.io/hashicorp/null\"]",
                    "instances": [{"schema_version": 0,
                        "attributes": {"id": "4242", "triggers": {"greeting": greeting}},
                        "sensitive_attributes": [], "private": "bnVsbA=="}],
                }],
            })
            .to_string()
        }
    };
    let declare = |name: &str, schedule: &str| {
        let mut s = stack(name, &repo);
        s.drift = Some(iac::DriftSpec {
            schedule: schedule.into(),
            ..Default::default()
        });
        s.notify = vec![iac::NotifyTarget {
            url: hooks.url("/hook"),
            events: vec!["drift.detected".into(), "drift.resolved".into()],
            ..Default::default()
        }];
        s
    };
    // 1. An otherwise idle agent, one stack checked every 10 s. Its state
    // is changed by hand, then repaired, in turns: each next check sends
    // `drift.detected` or `drift.resolved`. Scheduled instant -> received.
    let every_ms = 10_000;
    apply(&mut a, vec![declare("solo", "*/10 * * * * *")]).await;
    push_raw(&c, dir.path(), "solo", demo_state("hello"));
    sync_in_sync(&mut a, "solo").await;
    let samples = 9;
    let mut latencies = Vec::new();
    for i in 0..samples {
        let (greeting, event) = if i % 2 == 0 {
            ("changed by hand", "drift.detected")
        } else {
            ("hello", "drift.resolved")
        };
        let pushed = now_ms();
        push_raw(&c, dir.path(), "solo", demo_state(greeting));
        let seen = hooks.seen().len();
        hooks
            .wait(Duration::from_secs(60), event, |s| {
                s.len() > seen
                    && s[seen..]
                        .iter()
                        .any(|r| r.header("x-outpost-event") == event)
            })
            .await;
        let h = hooks.seen()[seen..]
            .iter()
            .find(|r| r.header("x-outpost-event") == event)
            .unwrap()
            .clone();
        let r = get_run(&mut a, h.json()["run"].as_str().unwrap()).await;
        assert!(r.created_at_ms >= pushed, "{r:#?}");
        let scheduled = r.created_at_ms / every_ms * every_ms;
        let ended = r.transitions.last().unwrap().at_ms;
        eprintln!(
            "MEASURE sample {i} {event}: scheduled -> received {} ms (queued +{}, planning +{}, check ended +{})",
            h.at_ms - scheduled,
            r.created_at_ms - scheduled,
            r.transitions
                .iter()
                .find(|t| t.state == "PLANNING")
                .map_or(-1, |t| t.at_ms - scheduled),
            ended - scheduled,
        );
        latencies.push(h.at_ms - scheduled);
    }
    latencies.sort();
    eprintln!(
        "MEASURE scheduled instant -> notification received: median {} ms, min {} ms, max {} ms over {samples}",
        latencies[latencies.len() / 2],
        latencies[0],
        latencies[latencies.len() - 1]
    );
    apply(&mut a, vec![declare("solo", "0 0 1 1 *")]).await;

    // 2. Stacks whose check is always due (every second): the agent is
    // never idle; checks that end within the window are counted.
    let n = 6;
    let names: Vec<String> = (0..n).map(|i| format!("demo-{i}")).collect();
    apply(
        &mut a,
        names.iter().map(|n| declare(n, "0 0 1 1 *")).collect(),
    )
    .await;
    for name in &names {
        push_raw(&c, dir.path(), name, demo_state("hello"));
        sync_in_sync(&mut a, name).await;
    }
    apply(
        &mut a,
        names.iter().map(|n| declare(n, "* * * * * *")).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let load_before = loadavg();
    let from = now_ms();
    tokio::time::sleep(Duration::from_secs(180)).await;
    let to = now_ms();
    let load_after = loadavg();
    let runs = a
        .list_runs(iac::ListRunsRequest {
            stack: String::new(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    let ended: Vec<&iac::Run> = runs
        .iter()
        .filter(|r| r.kind == "drift" && r.stack.starts_with("demo-"))
        .filter(|r| {
            r.transitions
                .last()
                .is_some_and(|t| is_final(r) && t.at_ms >= from && t.at_ms < to)
        })
        .collect();
    let finished = ended.iter().filter(|r| r.state == "FINISHED").count();
    assert_eq!(finished, ended.len(), "every check succeeds: {ended:#?}");
    let mut durations: Vec<i64> = ended
        .iter()
        .filter_map(|r| {
            let start = r.transitions.iter().find(|t| t.state == "PLANNING")?;
            Some(r.transitions.last()?.at_ms - start.at_ms)
        })
        .collect();
    durations.sort();
    let per_hour = finished as f64 * 3_600_000.0 / (to - from) as f64;
    eprintln!(
        "MEASURE drift checks: {finished} in {:.0} s on one agent of capacity 2 = {per_hour:.0} checks/hour; one check (planning to end) median {} ms; load average {load_before} before, {load_after} after",
        (to - from) as f64 / 1000.0,
        durations.get(durations.len() / 2).copied().unwrap_or(0),
    );
    agent.stop().await;
}

/// `nproc` and the CPU model.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    format!(
        "{} CPUs, {model}; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    )
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
