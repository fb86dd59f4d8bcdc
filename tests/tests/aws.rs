//! End-to-end: short-lived AWS credentials for jobs through the
//! container-credentials endpoint, refreshed while they run, and S3
//! workspaces and artifacts — against a real Docker engine and moto (local
//! STS and S3), with the real Terraform binary for the S3 backend.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::Credentials;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_tests::moto::{self, Moto, NetnsProxy};
use outpost_tests::{Agent, Captured, Cluster, containers_of, state};

const LIMIT: Duration = Duration::from_secs(120);
const PORT: u16 = 9911;

async fn setup(tune: impl FnOnce(&mut outpost_agent::aws::AwsConfig)) -> (Moto, Cluster, Agent) {
    let moto = Moto::start().await;
    moto.create_bucket("artifacts").await;
    let c = Cluster::start().await;
    let mut cfg = c.agent_config(2);
    cfg.aws = moto.agent_aws_config();
    tune(&mut cfg.aws);
    let agent = c.start_agent_with(cfg).await;
    (moto, c, agent)
}

fn aws_spec(role_name: &str, script: &str) -> pb::JobSpec {
    let mut spec = outpost_tests::spec(&["sh", "-c", script]);
    spec.aws = Some(pb::AwsRole {
        role_arn: moto::role(role_name),
        ..Default::default()
    });
    spec
}

async fn log_text(c: &Cluster, id: &str) -> String {
    String::from_utf8_lossy(&c.logs(id).await).into_owned()
}

async fn artifacts(c: &Cluster, id: &str) -> Vec<admin::Artifact> {
    c.client()
        .await
        .list_artifacts(admin::ListArtifactsRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .artifacts
}

async fn get_object(moto: &Moto, bucket: &str, key: &str) -> Vec<u8> {
    moto.s3()
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get s3://{bucket}/{key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_a_role_gets_working_credentials_and_one_without_gets_none() {
    let (moto, c, agent) = setup(|_| {}).await;
    // The job reads its credentials the way an SDK does and keeps them as an
    // artifact, so that this test can use them against STS and S3.
    let script = r#"set -e
test -n "$AWS_CONTAINER_CREDENTIALS_FULL_URI"
test -r "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
wget -q -O creds.json --header "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI"
grep -q '"AccessKeyId"' creds.json && echo got-credentials
ls -ln "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE" | cut -c1-10
echo "region=$AWS_REGION"
"#;
    let mut spec = aws_spec("outpost-reader", script);
    spec.artifacts = vec!["creds.json".into()];
    let with = c.submit_spec(spec).await;
    let without = c
        .submit(&[
            "sh",
            "-c",
            "env | grep '^AWS_' || echo no-aws-env; \
             wget -q -T 2 -O - http://127.0.0.1:9911/v1/credentials >/dev/null 2>&1 \
               && echo endpoint-answered || echo no-endpoint; \
             test -e /run/outpost/aws-token && echo token-file || echo no-token-file",
        ])
        .await;

    let j = c.wait_final(&with, LIMIT).await;
    let log = log_text(&c, &with).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    assert!(log.contains("got-credentials"), "{log}");
    assert!(log.contains("-rw-------"), "token file is private: {log}");
    assert!(log.contains("region=us-east-1"), "{log}");

    // The credentials are the role's, for this job's session, and work.
    let arts = artifacts(&c, &with).await;
    assert_eq!(arts.len(), 1, "{arts:?}");
    let creds: serde_json::Value =
        serde_json::from_slice(&get_object(&moto, "artifacts", &arts[0].key).await).unwrap();
    let creds = Credentials::new(
        creds["AccessKeyId"].as_str().unwrap(),
        creds["SecretAccessKey"].as_str().unwrap(),
        creds["Token"].as_str().map(String::from),
        None,
        "job",
    );
    let who = moto
        .sts_with(creds.clone())
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    assert_eq!(
        who.arn().unwrap(),
        format!(
            "arn:aws:sts::{}:assumed-role/outpost-reader/outpost-{with}",
            moto::ACCOUNT
        )
    );
    let buckets = moto.s3_with(creds).list_buckets().send().await.unwrap();
    assert!(
        buckets
            .buckets()
            .iter()
            .any(|b| b.name() == Some("artifacts"))
    );

    let j = c.wait_final(&without, LIMIT).await;
    let log = log_text(&c, &without).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    assert!(log.contains("no-aws-env"), "{log}");
    assert!(log.contains("no-endpoint"), "{log}");
    assert!(log.contains("no-token-file"), "{log}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_refreshed_and_never_seen_expired() {
    // 6s sessions, refreshed 3s before expiry, advertised 1.5s early.
    let (_moto, c, agent) = setup(|aws| {
        aws.default_session_duration = Duration::from_secs(6);
        aws.max_session_duration = Duration::from_secs(6);
        aws.refresh_margin = Duration::from_secs(3);
    })
    .await;
    // Read every 0.5s for 15s (more than two lifetimes): print the time, a
    // hash of the key id (never the key) and the advertised expiration.
    let script = r#"set -e
tok=$(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
i=0
while [ $i -lt 30 ]; do
  body=$(wget -q -O - --header "Authorization: $tok" "$AWS_CONTAINER_CREDENTIALS_FULL_URI")
  now=$(date -u +%s)
  id=$(echo "$body" | sed -n 's/.*"AccessKeyId":"\([^"]*\)".*/\1/p' | sha256sum | cut -c1-12)
  exp=$(echo "$body" | sed -n 's/.*"Expiration":"\([^"]*\)".*/\1/p')
  echo "read $now $id $exp"
  i=$((i+1))
  sleep 0.5
done
"#;
    let id = c.submit_spec(aws_spec("outpost-long", script)).await;
    let j = c.wait_final(&id, LIMIT).await;
    let log = log_text(&c, &id).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    let reads: Vec<(u64, String, u64)> = log
        .lines()
        .filter_map(|l| l.strip_prefix("read "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let exp =
                moto::parse_rfc3339(f[2]).unwrap_or_else(|| panic!("bad expiration in {l:?}"));
            (f[0].parse().unwrap(), f[1].to_string(), exp)
        })
        .collect();
    assert_eq!(reads.len(), 30, "{log}");
    let span = reads.last().unwrap().0 - reads[0].0;
    assert!(
        span >= 12,
        "the job ran longer than two lifetimes ({span}s)"
    );
    for (now, _, exp) in &reads {
        assert!(
            exp > now,
            "an expired credential was served at {now} (exp {exp}):\n{log}"
        );
    }
    let mut keys: Vec<&String> = reads.iter().map(|r| &r.1).collect();
    keys.dedup();
    assert!(
        keys.len() >= 4,
        "credentials were refreshed (distinct keys over time: {keys:?})"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_applies_with_an_s3_backend_using_the_job_credentials() {
    let (moto, c, agent) = setup(|_| {}).await;
    moto.create_bucket("tfstate").await;
    // The S3 server is reachable only from this job's own network namespace,
    // through a proxy the test binds there on 127.0.0.1:5000 (network none).
    // Terraform 1.0.3's AWS SDK (aws-sdk-go v1.x from 2021) reads only
    // AWS_CONTAINER_AUTHORIZATION_TOKEN, so the job exports the token from
    // its file into Terraform's own environment (not the container's).
    let script = r#"set -e
cat > main.tf <<'EOF'
terraform {
  backend "s3" {
    bucket                      = "tfstate"
    key                         = "jobs/terraform.tfstate"
    region                      = "us-east-1"
    endpoint                    = "http://127.0.0.1:5000"
    sts_endpoint                = "http://127.0.0.1:5000"
    force_path_style            = true
    skip_credentials_validation = true
    skip_region_validation      = true
    skip_metadata_api_check     = true
  }
}
resource "null_resource" "outpost" {}
EOF
i=0
until wget -q -O /dev/null http://127.0.0.1:5000/ 2>/dev/null; do
  i=$((i+1)); [ $i -lt 300 ] || { echo "s3 not reachable"; exit 9; }; sleep 0.1
done
export AWS_CONTAINER_AUTHORIZATION_TOKEN="$(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")"
terraform init -input=false -no-color
terraform apply -input=false -auto-approve -no-color
"#;
    let id = c.submit_spec(aws_spec("outpost-terraform", script)).await;
    let pid = moto::job_pid(&id, LIMIT).await;
    let _proxy = NetnsProxy::start(pid, 5000, moto.addr());
    let j = c.wait_final(&id, Duration::from_secs(240)).await;
    let log = log_text(&c, &id).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    assert!(
        log.contains("Successfully configured the backend \"s3\""),
        "{log}"
    );
    assert!(log.contains("Apply complete! Resources: 1 added"), "{log}");
    let tfstate = get_object(&moto, "tfstate", "jobs/terraform.tfstate").await;
    let tfstate: serde_json::Value = serde_json::from_slice(&tfstate).unwrap();
    assert_eq!(
        tfstate["resources"][0]["type"], "null_resource",
        "{tfstate}"
    );
    agent.stop().await;
}

/// The authorization token of a running job (read as the job's user).
async fn token_of(job_id: &str) -> String {
    let docker = bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(id) = containers_of(job_id).await.first() {
            let exec = docker
                .create_exec(
                    id,
                    bollard::models::ExecConfig {
                        cmd: Some(vec!["cat".into(), "/run/outpost/aws-token".into()]),
                        attach_stdout: Some(true),
                        ..Default::default()
                    },
                )
                .await;
            if let Ok(exec) = exec
                && let Ok(bollard::exec::StartExecResults::Attached { mut output, .. }) =
                    docker.start_exec(&exec.id, None).await
            {
                use futures::StreamExt;
                let mut out = Vec::new();
                while let Some(Ok(chunk)) = output.next().await {
                    out.extend_from_slice(&chunk.into_bytes());
                }
                let token = String::from_utf8(out).unwrap();
                if token.len() == 64 {
                    return token;
                }
            }
        }
        assert!(Instant::now() < deadline, "no token for job {job_id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_refuses_other_jobs_tokens_and_stops_when_the_job_ends() {
    let (_moto, c, agent) = setup(|_| {}).await;
    let script = "echo ready; while :; do sleep 0.2; done";
    let a = c.submit_spec(aws_spec("outpost-a", script)).await;
    let b = c.submit_spec(aws_spec("outpost-b", script)).await;
    let (token_a, token_b) = (token_of(&a).await, token_of(&b).await);
    assert_ne!(token_a, token_b);
    let ns_a = moto::netns_of(moto::job_pid(&a, LIMIT).await);

    let (status, body) = moto::get_credentials_in(&ns_a, PORT, &token_a).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("AccessKeyId"));
    for wrong in [
        token_b.as_str(),
        "",
        &token_a[..63],
        &token_a.to_uppercase(),
    ] {
        let (status, body) = moto::get_credentials_in(&ns_a, PORT, wrong).unwrap();
        assert_eq!(status, 403, "token {wrong:?} must be refused: {body}");
        assert!(!body.contains("AccessKeyId"));
    }

    // End job A; its namespace stays open through our handle, but the
    // endpoint in it no longer answers, not even to its own token.
    c.client()
        .await
        .cancel_job(admin::CancelJobRequest { job_id: a.clone() })
        .await
        .unwrap();
    let j = c.wait_final(&a, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    match moto::get_credentials_in(&ns_a, PORT, &token_a) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok((status, body)) => panic!("the endpoint answered {status} after the job ended: {body}"),
    }
    // B is unaffected.
    let ns_b = moto::netns_of(moto::job_pid(&b, LIMIT).await);
    assert_eq!(
        moto::get_credentials_in(&ns_b, PORT, &token_b).unwrap().0,
        200
    );
    c.client()
        .await
        .cancel_job(admin::CancelJobRequest { job_id: b.clone() })
        .await
        .unwrap();
    c.wait_final(&b, LIMIT).await;
    agent.stop().await;
}

/// Captures the agent's and control plane's own log lines in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_appears_in_inspect_environ_or_logs() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter(outpost_agent::aws::quiet_sdk_logs(
            tracing_subscriber::EnvFilter::new(
                "debug,h2=info,hyper=info,hyper_util=info,rustls=info,tower=info",
            ),
        ))
        .with_writer(captured.clone())
        .with_ansi(false)
        .init();
    let (_moto, c, agent) = setup(|_| {}).await;
    // The job reads its credentials and prints everything it can see about
    // its environment; the test checks none of it carries a secret.
    let script = r#"tok=$(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
wget -q -O /tmp/c --header "Authorization: $tok" "$AWS_CONTAINER_CREDENTIALS_FULL_URI" && echo read-ok
env; echo ---; tr '\0' '\n' < /proc/1/environ; echo ---; tr '\0' '\n' < /proc/self/environ
echo note > note.txt
echo waiting; while [ ! -e /workspace/done ]; do sleep 0.1; done"#;
    let mut spec = aws_spec("outpost-secretive", script);
    spec.env.insert("VISIBLE".into(), "plain".into());
    // An artifact upload, so that the S3 path's logging is covered too.
    spec.artifacts = vec!["note.txt".into()];
    let id = c.submit_spec(spec).await;
    let pid = moto::job_pid(&id, LIMIT).await;
    let token = token_of(&id).await;
    let ns = moto::netns_of(pid);
    let (status, body) = moto::get_credentials_in(&ns, PORT, &token).unwrap();
    assert_eq!(status, 200);
    let creds: serde_json::Value = serde_json::from_str(&body).unwrap();
    let secrets: Vec<String> = ["AccessKeyId", "SecretAccessKey", "Token"]
        .iter()
        .map(|k| creds[k].as_str().unwrap().to_string())
        .chain([token.clone()])
        .collect();

    let docker = bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let container = containers_of(&id).await.remove(0);
    let inspect =
        serde_json::to_string(&docker.inspect_container(&container, None).await.unwrap()).unwrap();
    assert!(
        inspect.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        "sanity: {inspect}"
    );
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_owned();
    assert!(environ.contains("VISIBLE=plain"), "sanity: {environ}");
    // Let the job finish: it waits for a file in its workspace.
    let workspace = c
        .state
        .agent_dir()
        .join("work")
        .join(format!("{id}-{}", c.job(&id).await.epoch));
    std::fs::write(workspace.join("done"), b"").unwrap();
    let j = c.wait_final(&id, LIMIT).await;
    let log = log_text(&c, &id).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    assert!(
        log.contains("read-ok") && log.contains("VISIBLE=plain"),
        "{log}"
    );
    agent.stop().await;
    let agent_logs = String::from_utf8_lossy(&captured.0.lock()).into_owned();
    assert!(
        agent_logs.contains("job released"),
        "sanity: the agent's own logs were captured"
    );
    assert!(
        agent_logs.contains("artifact uploaded"),
        "sanity: the upload was logged"
    );
    let names = [
        "AccessKeyId",
        "SecretAccessKey",
        "Token",
        "the authorization token",
    ];
    for (name, secret) in names.iter().zip(&secrets) {
        for (what, text) in [
            ("docker inspect", &inspect),
            ("/proc/1/environ", &environ),
            ("the job's log", &log),
            ("the job's message", &j.message),
            ("the agent's and server's logs", &agent_logs),
        ] {
            let line = text.lines().find(|l| l.contains(secret.as_str()));
            assert!(
                line.is_none(),
                "the {name} appears in {what}: {}",
                line.unwrap_or_default()
                    .replace(secret.as_str(), "<SECRET>")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_outside_the_allow_list_is_refused_before_anything_runs() {
    let (_moto, c, agent) = setup(|_| {}).await;
    let id = c.submit_spec(aws_spec("admin", "echo must-not-run")).await;
    let j = c.wait_final(&id, LIMIT).await;
    // Like every other refusal of the agent's local policy.
    assert_eq!(state(&j), pb::JobState::Rejected, "{j:?}");
    assert!(
        j.message.contains("role/admin") && j.message.contains("allowed_roles"),
        "{}",
        j.message
    );
    assert_eq!(j.started_at_ms, j.finished_at_ms, "it never ran: {j:?}");
    assert!(c.logs(&id).await.is_empty());
    assert!(containers_of(&id).await.is_empty());
    // What `outpost job` shows.
    let out = std::process::Command::new(outpost_tests::bin("outpost"))
        .args(["--state-dir"])
        .arg(&c.state.root)
        .args(["--server", &c.url(), "job", &id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rejected") && text.contains("allowed_roles"),
        "{text}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_and_artifacts_round_trip_a_multi_megabyte_file() {
    let (moto, c, agent) = setup(|_| {}).await;
    moto.create_bucket("workspaces").await;
    let mut blob = vec![0u8; 8 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut blob).unwrap();
    let sha = moto::sha256_hex(&blob);
    let tarball = moto::tar_gz(&[
        ("data/blob.bin", &blob),
        ("run.sh", b"echo from-workspace\n"),
    ]);
    moto.s3()
        .put_object()
        .bucket("workspaces")
        .key("w/ws.tar.gz")
        .body(tarball.into())
        .send()
        .await
        .unwrap();
    let script = "set -e; sh run.sh; mkdir -p out; cp data/blob.bin out/blob.bin; \
                  sha256sum data/blob.bin | cut -d' ' -f1 > out/sum.txt";
    let mut spec = aws_spec("outpost-builder", script);
    spec.workspace_source = "s3://workspaces/w/ws.tar.gz".into();
    spec.artifacts = vec!["out/blob.bin".into(), "out/sum.txt".into()];
    let started = Instant::now();
    let id = c.submit_spec(spec).await;
    let j = c.wait_final(&id, LIMIT).await;
    let log = log_text(&c, &id).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}\n{log}");
    assert!(log.contains("from-workspace"), "{log}");
    eprintln!("8 MiB workspace in and out: {:?}", started.elapsed());

    let arts = artifacts(&c, &id).await;
    let paths: Vec<&str> = arts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["out/blob.bin", "out/sum.txt"]);
    let blob_art = &arts[0];
    assert_eq!(blob_art.epoch, j.epoch);
    assert_eq!(blob_art.size, blob.len() as u64);
    assert_eq!(blob_art.sha256, sha);
    assert_eq!(
        blob_art.key,
        format!("outpost/{id}/{}/out/blob.bin", j.epoch)
    );
    let got = get_object(&moto, "artifacts", &blob_art.key).await;
    assert_eq!(
        moto::sha256_hex(&got),
        sha,
        "the artifact round-trips intact"
    );
    assert_eq!(
        String::from_utf8(get_object(&moto, "artifacts", &arts[1].key).await)
            .unwrap()
            .trim(),
        sha,
        "the workspace arrived intact"
    );
    let head = moto
        .s3()
        .head_object()
        .bucket("artifacts")
        .key(&blob_art.key)
        .send()
        .await
        .unwrap();
    let meta = head.metadata().unwrap();
    assert_eq!(
        meta.get("outpost-epoch").map(String::as_str),
        Some(&*j.epoch.to_string())
    );
    assert_eq!(meta.get("outpost-job-id"), Some(&id));

    // A hostile archive is refused before the job runs.
    moto.s3()
        .put_object()
        .bucket("workspaces")
        .key("w/evil.tar.gz")
        .body(evil_tarball().into())
        .send()
        .await
        .unwrap();
    let mut spec = aws_spec("outpost-builder", "echo must-not-run");
    spec.workspace_source = "s3://workspaces/w/evil.tar.gz".into();
    let evil = c.submit_spec(spec).await;
    let j = c.wait_final(&evil, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Failed, "{j:?}");
    assert!(j.message.contains("leaves the workspace"), "{}", j.message);
    assert!(c.logs(&evil).await.is_empty());
    agent.stop().await;
}

/// A tarball whose entry climbs out of the workspace.
fn evil_tarball() -> Vec<u8> {
    use std::io::Write;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    let name = b"../../escape";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let raw = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

async fn next_msg(
    inbound: &mut tonic::Streaming<pb::ServerMessage>,
) -> outpost_proto::agent::v1::server_message::Msg {
    match tokio::time::timeout(LIMIT, inbound.message()).await {
        Ok(Ok(Some(pb::ServerMessage { msg: Some(m) }))) => m,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_report_with_a_stale_epoch_is_refused_by_the_control_plane() {
    use outpost_proto::agent::v1::agent_message::Msg as Out;
    use outpost_proto::agent::v1::server_message::Msg as In;
    let c = Cluster::start().await;
    // An agent session speaking the wire protocol directly.
    let cfg = c.agent_config(1);
    let ep = outpost_agent::session::endpoint(&cfg).unwrap();
    let mut client = pb::agent_service_client::AgentServiceClient::new(ep.connect().await.unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let send = |m: Out| pb::AgentMessage { msg: Some(m) };
    tx.send(send(Out::Hello(pb::Hello {
        agent_id: "local".into(),
        capacity: 1,
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(next_msg(&mut inbound).await, In::Welcome(_)));
    let id = c.submit_spec(aws_spec("outpost-x", "true")).await;
    let lease = loop {
        if let In::Lease(l) = next_msg(&mut inbound).await {
            break l;
        }
    };
    assert_eq!(lease.job_id, id);
    let token = lease
        .spec
        .as_ref()
        .unwrap()
        .aws
        .as_ref()
        .unwrap()
        .web_identity_token
        .clone();
    assert!(
        token.split('.').count() == 3,
        "the lease carries a minted token"
    );
    let report = |epoch: u64, path: &str| {
        Out::Artifact(pb::ArtifactUploaded {
            job_id: id.clone(),
            epoch,
            path: path.into(),
            bucket: "artifacts".into(),
            key: format!("outpost/{id}/{epoch}/{path}"),
            size: 1,
            sha256: "00".repeat(32),
            etag: "e".into(),
        })
    };
    // Current epoch: recorded. Stale epoch: refused.
    tx.send(send(report(lease.epoch, "ok.bin"))).await.unwrap();
    tx.send(send(report(lease.epoch - 1, "stale.bin")))
        .await
        .unwrap();
    let refused = loop {
        if let In::Refused(r) = next_msg(&mut inbound).await {
            break r;
        }
    };
    assert_eq!(refused.epoch, lease.epoch - 1);
    assert!(refused.reason.contains("stale"), "{}", refused.reason);
    let arts = artifacts(&c, &id).await;
    assert_eq!(
        arts.iter()
            .map(|a| (a.epoch, a.path.as_str()))
            .collect::<Vec<_>>(),
        [(lease.epoch, "ok.bin")]
    );
    // The token is a signed JWT for this job, verifiable with the published keys.
    let issuer =
        outpost::oidc::Issuer::load_or_create(outpost::oidc::OidcConfig::new(&c.state.data_dir()))
            .unwrap();
    let claims = outpost::oidc::verify(
        &token,
        &issuer.jwks(),
        outpost::oidc::DEFAULT_ISSUER,
        outpost::oidc::DEFAULT_AUDIENCE,
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(claims["sub"], format!("job:{id}"));
    assert_eq!(claims["outpost"]["epoch"], lease.epoch);
}

/// A socket of a `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` table.
#[derive(Debug)]
struct Socket {
    table: &'static str,
    local: String,
    remote: String,
    state: String,
    inode: u64,
}

/// The sockets in the network namespace `/proc/<pid>/net` shows.
fn sockets_in_netns_of(pid: u32) -> Vec<Socket> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            out.push(Socket {
                table,
                local: f[1].to_string(),
                remote: f[2].to_string(),
                state: f[3].to_string(),
                inode: f[9].parse().unwrap(),
            });
        }
    }
    out
}

/// Inodes of the sockets process `pid` holds open.
fn socket_inodes_of(pid: u32) -> std::collections::HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Sockets of `pid` that accept traffic: TCP in LISTEN, UDP unconnected.
fn listeners(sockets: &[Socket], held: &std::collections::HashSet<u64>) -> Vec<String> {
    sockets
        .iter()
        .filter(|s| held.contains(&s.inode))
        .filter(|s| match s.table {
            "tcp" | "tcp6" => s.state == "0A",
            _ => s.state == "07",
        })
        .map(|s| format!("{s:?}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_never_listens_on_a_port_of_its_host() {
    let moto = Moto::start().await;
    moto.create_bucket("artifacts").await;
    let c = Cluster::start().await;
    let aws = format!(
        "[aws]\nsts_endpoint = \"{url}\"\ns3_endpoint = \"{url}\"\ns3_force_path_style = true\n\
         allowed_roles = [\"arn:aws:iam::{account}:role/outpost-*\"]\ncredentials_port = {PORT}\n",
        url = moto.url(),
        account = moto::ACCOUNT,
    );
    let cfg = c.write_agent_config("quiet", 1, "", &aws);
    let agent = c.spawn_agent("quiet", &cfg).await;
    let pid = agent.pid();
    let host_listeners = || listeners(&sockets_in_netns_of(pid), &socket_inodes_of(pid));
    assert_eq!(host_listeners(), Vec::<String>::new(), "idle agent");

    // A job with AWS credentials: the one thing the agent serves, inside the
    // job's own network namespace.
    let script = r#"wget -q -O /dev/null --header "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI" && echo got-credentials
echo waiting; i=0; while [ ! -e /workspace/go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done"#;
    let id = c.submit_spec(aws_spec("outpost-quiet", script)).await;
    let deadline = Instant::now() + LIMIT;
    while !log_text(&c, &id).await.contains("waiting") {
        let j = c.job(&id).await;
        assert!(!outpost_tests::is_final(&j), "{j:?}\n{}", agent.log_text());
        assert!(Instant::now() < deadline, "{j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(log_text(&c, &id).await.contains("got-credentials"));

    let held = socket_inodes_of(pid);
    let host = sockets_in_netns_of(pid);
    // The tables are read right: the agent's own connection to the control
    // plane is there, established ("01").
    let port = c.url().rsplit(':').next().unwrap().parse::<u16>().unwrap();
    assert!(
        host.iter().any(|s| held.contains(&s.inode)
            && s.table == "tcp"
            && s.state == "01"
            && s.remote == format!("0100007F:{port:04X}")),
        "no connection of the agent in {host:?}"
    );
    assert_eq!(
        listeners(&host, &held),
        Vec::<String>::new(),
        "while a job runs"
    );
    // And the same method finds the agent's endpoint in the job's namespace.
    let container = containers_of(&id).await;
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", &container[0]])
        .output()
        .unwrap();
    let job_pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let in_job = sockets_in_netns_of(job_pid);
    let endpoint: Vec<&Socket> = in_job
        .iter()
        .filter(|s| held.contains(&s.inode) && s.table == "tcp" && s.state == "0A")
        .collect();
    assert_eq!(endpoint.len(), 1, "{in_job:?}");
    assert_eq!(
        endpoint[0].local,
        format!("0100007F:{PORT:04X}"),
        "the endpoint on 127.0.0.1:{PORT} in the job's namespace"
    );
    assert_eq!(listeners(&in_job, &held).len(), 1, "{in_job:?}");

    std::fs::write(
        cfg.parent()
            .unwrap()
            .join("work")
            .canonicalize()
            .unwrap()
            .join(format!("{id}-1"))
            .join("go"),
        b"",
    )
    .unwrap();
    let j = c.wait_final(&id, LIMIT).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!(host_listeners(), Vec::<String>::new(), "after the job");
}

/// A stack with an AWS role and managed state: the job's credentials
/// channel and its state endpoint are both set up inside its network
/// namespace, in turn (the credentials entry releases the script, which then
/// waits for the state endpoint). The apply's provisioner reads the role's
/// credentials, and its state is stored through the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_with_a_role_gets_credentials_and_managed_state() {
    use outpost_proto::iac::v1 as iac;
    use outpost_tests::iac as fixture;
    let (_moto, c, agent) = setup(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let main_tf = r#"
resource "null_resource" "reads_credentials" {
  provisioner "local-exec" {
    command = "wget -q -O - --header \"Authorization: $(cat $AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)\" \"$AWS_CONTAINER_CREDENTIALS_FULL_URI\" | grep -q AccessKeyId && echo got-credentials"
  }
}
"#;
    let repo = fixture::repo(dir.path(), &format!("{}{main_tf}", fixture::NULL_PROVIDER));
    let mut a = fixture::admin(&c).await;
    fixture::apply(
        &mut a,
        vec![iac::StackSpec {
            autodeploy: true,
            aws: Some(iac::StackAwsRole {
                role_arn: moto::role("outpost-terraform"),
                ..Default::default()
            }),
            ..fixture::stack("with-role", &repo)
        }],
    )
    .await;
    let run_id = fixture::sync(&mut a, "with-role").await;
    let run = fixture::wait_run(&mut a, &run_id, Duration::from_secs(240), fixture::is_final).await;
    let plan_log = log_text(&c, &run.plan_job).await;
    let log = log_text(&c, &run.apply_job).await;
    assert_eq!(run.state, "FINISHED", "{run:#?}\n{plan_log}\n{log}");
    assert!(log.contains("got-credentials"), "{log}");
    assert!(
        log.contains("Successfully configured the backend \"http\""),
        "{log}"
    );
    let st = a
        .get_stack(iac::GetStackRequest {
            name: "with-role".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!st.state_lineage.is_empty(), "{st:#?}");
    agent.stop().await;
}
