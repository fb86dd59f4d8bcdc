//! Several control-plane replicas over one real PostgreSQL server: every
//! job leased once whichever replica it was submitted through, dispatch
//! and cancels across replicas, failover of an agent when its replica is
//! killed, a database restart under a running job, and an agent enrolled
//! through one replica and revoked through another. Needs PostgreSQL
//! (`scripts/setup.sh` installs it; without it these tests say `SKIPPED`,
//! or fail under `OUTPOST_REQUIRE_PG=1`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use outpost_proto::identity::v1 as idpb;
use outpost_tests::replicas::Replicas;
use outpost_tests::{numbered_job, pg, require_pg, spec, state};

/// Waits (bounded) until replica `i` reports the job running.
async fn wait_running(r: &Replicas, i: usize, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let j = r
            .client(i)
            .await
            .get_job(admin::GetJobRequest { job_id: id.into() })
            .await
            .expect("get job")
            .into_inner();
        if state(&j) == pb::JobState::Running {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} not running in 60s: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_lease_each_of_200_jobs_once_wherever_they_were_submitted() {
    let db = require_pg!(pg::database().await);
    let r = Replicas::start(2, db.url(), "20s").await;
    // The only agent is on replica 1: a job submitted through replica 0
    // reaches it.
    let b = r.spawn_agent(1, "b", &r.agent_config("b", 8, &[1])).await;
    let first = r.submit(0, spec(&["true"])).await;
    let j = r.wait_final(0, &first, Duration::from_secs(60)).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    assert_eq!((j.agent_id.as_str(), j.epoch), ("b", 1));

    // An agent on each replica; 200 jobs through both at once.
    let a = r.spawn_agent(0, "a", &r.agent_config("a", 8, &[0])).await;
    let submit = |i: usize| {
        let r = &r;
        async move {
            let mut ids = Vec::new();
            for _ in 0..100 {
                ids.push(r.submit(i, spec(&["true"])).await);
            }
            ids
        }
    };
    let (x, y) = tokio::join!(submit(0), submit(1));
    let mut per_agent: HashMap<String, u32> = HashMap::new();
    for (n, id) in x.iter().chain(&y).enumerate() {
        let j = r.wait_final(n % 2, id, Duration::from_secs(300)).await;
        assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
        assert_eq!(j.epoch, 1, "leased more than once: {j:?}");
        *per_agent.entry(j.agent_id.clone()).or_default() += 1;
    }
    assert_eq!(per_agent.values().sum::<u32>(), 200);
    assert!(
        per_agent.len() == 2,
        "both replicas' agents ran jobs: {per_agent:?}"
    );
    // The database agrees: no job leased twice.
    let c = db.connect().await.expect("connect");
    let twice: i64 = c
        .query_one("SELECT count(*) FROM jobs WHERE epoch <> 1", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(twice, 0);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_one_replica_reaches_an_agent_on_another() {
    let db = require_pg!(pg::database().await);
    let r = Replicas::start(2, db.url(), "30s").await;
    let _b = r.spawn_agent(1, "b", &r.agent_config("b", 1, &[1])).await;
    let id = r.submit(0, spec(&["sleep", "120"])).await;
    wait_running(&r, 0, &id).await;
    let asked = Instant::now();
    r.client(0)
        .await
        .cancel_job(admin::CancelJobRequest { job_id: id.clone() })
        .await
        .expect("cancel");
    let j = r.wait_final(0, &id, Duration::from_secs(60)).await;
    assert_eq!(state(&j), pb::JobState::Cancelled, "{j:?}");
    // Delivered through the other replica's session, not left to the
    // lease's expiry (30 s).
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "cancel took {:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_when_its_replica_is_killed_and_the_log_stays_exact() {
    let db = require_pg!(pg::database().await);
    let mut r = Replicas::start(2, db.url(), "10s").await;
    let a = r
        .spawn_agent(0, "a", &r.agent_config("a", 2, &[0, 1]))
        .await;
    let (command, expected) = numbered_job(50, "0.1");
    let mut s = spec(&[]);
    s.command = command;
    // Submitted through replica 1; dispatched by replica 0, which holds
    // the agent's session.
    let id = r.submit(1, s).await;
    wait_running(&r, 1, &id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    r.kill(0);
    r.wait_agent_connected(1, "a", Duration::from_secs(30))
        .await;
    eprintln!(
        "failover: agent connected to the other replica {:?} after the kill",
        killed.elapsed()
    );
    let j = r.wait_final(1, &id, Duration::from_secs(120)).await;
    assert_eq!(
        state(&j),
        pb::JobState::Succeeded,
        "{j:?}\n{}",
        r.log_text(1)
    );
    assert_eq!(j.epoch, 1, "the job ran once, under its first lease: {j:?}");
    let log = r.logs(1, &id, 1).await;
    assert_eq!(
        String::from_utf8_lossy(&log),
        String::from_utf8_lossy(&expected),
        "agent log:\n{}",
        a.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_ride_through_a_database_restart_under_a_running_job() {
    let mut db = require_pg!(pg::dedicated().await);
    let r = Replicas::start(2, &db.url(), "20s").await;
    let a = r
        .spawn_agent(0, "a", &r.agent_config("a", 1, &[0, 1]))
        .await;
    let (command, expected) = numbered_job(60, "0.1");
    let mut s = spec(&[]);
    s.command = command;
    let id = r.submit(1, s).await;
    wait_running(&r, 0, &id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    db.stop().await.expect("stop the database");
    tokio::time::sleep(Duration::from_secs(3)).await;
    db.start().await.expect("start the database");
    let j = r.wait_final(1, &id, Duration::from_secs(120)).await;
    assert_eq!(
        state(&j),
        pb::JobState::Succeeded,
        "{j:?}\nreplica 0:\n{}\nagent:\n{}",
        r.log_text(0),
        a.log_text()
    );
    assert_eq!(j.epoch, 1, "no second lease: {j:?}");
    let log = r.logs(0, &id, 1).await;
    assert_eq!(
        String::from_utf8_lossy(&log),
        String::from_utf8_lossy(&expected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_stops_the_server_before_it_listens_without_leaking_the_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = outpost::client::StateDir::new(dir.path().join("state"));
    std::fs::create_dir_all(&st.root).expect("state dir");
    outpost::dev::ensure_pki(&st).expect("pki");
    // A loopback port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let err = refused_start(
        &st,
        &format!("postgres://bob:s3cret-pw@127.0.0.1:{port}/outpost"),
    )
    .await;
    assert!(
        err.contains(&format!(
            "failed to connect to PostgreSQL at postgres://bob:***@127.0.0.1:{port}/outpost"
        )),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "{err}");
}

/// Runs `outpost server` over the store at `store` with state `st`,
/// expecting it to give up (within 60 s) before it listens; its stderr.
async fn refused_start(st: &outpost::client::StateDir, store: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(outpost_tests::bin("outpost"))
            .arg("--state-dir")
            .arg(&st.root)
            .args(["server", "--listen", "127.0.0.1:0"])
            .env("OUTPOST_STORE", store)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the server gives up within 60 s")
    .expect("run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(!st.addr_file().exists(), "it never listened: {err}");
    err
}

/// A replica started with keys of its own (a fresh data directory, the
/// keys not copied from the first) refuses to start, names both files to
/// copy and never listens; with the keys copied it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_first_replicas_keys_refuses_to_start() {
    let db = require_pg!(pg::database().await);
    let mut r = Replicas::start(1, db.url(), "20s").await;
    let st = outpost::client::StateDir::new(r.dir.path().join("stranger"));
    std::fs::create_dir_all(&st.root).expect("state dir");
    outpost_tests::replicas::copy_dir(&r.base.pki().dir, &st.pki().dir);
    let err = refused_start(&st, db.url()).await;
    for file in outpost_tests::replicas::REPLICA_KEYS {
        let path = st.data_dir().join(file);
        assert!(
            err.contains(&format!("copy {} from a running replica", path.display())),
            "{file}: {err}"
        );
    }
    // The fixture's second replica gets the first one's keys: it starts.
    r.add_replica().await;
    assert!(
        r.client(1)
            .await
            .list_agents(admin::ListAgentsRequest {})
            .await
            .is_ok()
    );
}

/// Stacks on replicas: a stack declared through replica 0 plans on an
/// agent whose session is on replica 1, is approved through replica 1 by
/// another identity, and applies; the run, its state version and the
/// apply's log read the same through both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_declared_through_one_replica_plans_and_applies_through_the_other() {
    use outpost_proto::iac::v1 as iac;
    use outpost_tests::iac::{NULL_PROVIDER, apply, is_final, repo, stack, sync, wait_run};

    let db = require_pg!(pg::database().await);
    let r = Replicas::start(2, db.url(), "20s").await;
    let pool_key = outpost::dev::pool_key_paths(&r.base).0;
    let cfg = r.agent_config_with(
        "tf",
        2,
        &[1],
        &format!(
            "[iac]\npool_key_file = {:?}\n",
            pool_key.display().to_string()
        ),
    );
    let _agent = r.spawn_agent(1, "tf", &cfg).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = repo(
        dir.path(),
        &format!("{NULL_PROVIDER}\nresource \"null_resource\" \"one\" {{}}\n"),
    );
    let mut on0 = r.iac(0, "admin").await;
    let mut on1 = r.iac(1, "alice").await;
    apply(&mut on0, vec![stack("shared", &repo)]).await;
    let run_id = sync(&mut on0, "shared").await;
    let limit = Duration::from_secs(180);
    let run = wait_run(&mut on1, &run_id, limit, |r| {
        !matches!(r.state.as_str(), "QUEUED" | "PLANNING")
    })
    .await;
    assert_eq!(run.state, "UNCONFIRMED", "{run:#?}");
    let changed: Vec<_> = run.changes.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(changed, ["null_resource.one"], "{run:#?}");
    on1.decide_run(iac::DecideRunRequest {
        run_id: run_id.clone(),
        decision: "approve".into(),
        comment: String::new(),
    })
    .await
    .expect("approve through replica 1");
    let run = wait_run(&mut on0, &run_id, limit, is_final).await;
    assert_eq!(run.state, "FINISHED", "{run:#?}");
    for (i, c) in [&mut on0, &mut on1].into_iter().enumerate() {
        let seen = outpost_tests::iac::get_run(c, &run_id).await;
        assert_eq!(seen.state, "FINISHED", "through replica {i}");
        let v = c
            .list_state_versions(iac::ListStateVersionsRequest {
                stack: "shared".into(),
                limit: 10,
            })
            .await
            .expect("state versions")
            .into_inner()
            .versions;
        assert_eq!(v.len(), 1, "through replica {i}: {v:#?}");
        assert_eq!(v[0].written_by, format!("job:{}", run.apply_job));
    }
    for (job, phase) in [(&run.plan_job, "plan"), (&run.apply_job, "apply")] {
        let j = r
            .client(0)
            .await
            .get_job(admin::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .expect("get job")
            .into_inner();
        assert_eq!((j.agent_id.as_str(), j.epoch), ("tf", 1), "{phase}: {j:?}");
    }
    let log = String::from_utf8_lossy(&r.logs(0, &run.apply_job, 1).await).into_owned();
    assert!(log.contains("Apply complete! Resources: 1 added"), "{log}");
}

/// Enrolment on replicas: a token created through replica 0 enrols an
/// agent whose session is on replica 1; revoked through replica 0, its
/// session on replica 1 ends and both refuse its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrolled_through_one_replica_is_revoked_through_another() {
    let db = require_pg!(pg::database().await);
    let r = Replicas::start(2, db.url(), "30s").await;
    let token = r
        .identity_admin(0)
        .await
        .create_enrollment(idpb::CreateEnrollmentRequest {
            pool: "tf".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            ttl_ms: 600_000,
            uses: 1,
            agent_name: String::new(),
        })
        .await
        .expect("create enrolment")
        .into_inner()
        .token;
    let e = r
        .enroll(1, &token, "e1")
        .await
        .expect("enrolled through replica 1");
    // The one-time token is used up on every replica.
    let again = r.enroll(0, &token, "e2").await.err().expect("refused");
    assert_eq!(again.code(), tonic::Code::Unauthenticated, "{again:?}");
    assert!(again.message().contains("already used"), "{again:?}");
    // Its session on replica 0 at once: bound to its enrolment's labels.
    let mut raw = r
        .raw_agent_as(
            0,
            &e.cert,
            &e.key,
            pb::Hello {
                agent_id: "e1".into(),
                capacity: 0,
                labels: [
                    ("env".to_string(), "prod".to_string()),
                    ("gpu".to_string(), "yes".to_string()),
                ]
                .into(),
                ..Default::default()
            },
        )
        .await
        .expect("session on replica 0");
    assert_eq!(
        raw.welcome.labels,
        [("env".to_string(), "prod".to_string())].into()
    );
    assert_eq!(raw.welcome.ignored_labels, ["gpu=yes"]);
    // Revoked through replica 1: its session on replica 0 ends, well within
    // the registry's periodic reload (5 s) plus a margin.
    let revoked = r
        .identity_admin(1)
        .await
        .revoke_agent(idpb::RevokeAgentRequest {
            agent_name: "e1".into(),
        })
        .await
        .expect("revoke through replica 1")
        .into_inner();
    let asked = Instant::now();
    assert!(revoked.revoked_ms > 0);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the session on replica 0 ends within 10s")
    .expect("with a status");
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    eprintln!(
        "revocation reached the other replica after {:?}",
        asked.elapsed()
    );
    // Every replica refuses its certificate from then on.
    for i in 0..2 {
        let e = r
            .raw_agent_as(
                i,
                &e.cert,
                &e.key,
                pb::Hello {
                    agent_id: "e1".into(),
                    ..Default::default()
                },
            )
            .await
            .err()
            .expect("refused");
        assert_eq!(
            e.code(),
            tonic::Code::PermissionDenied,
            "replica {i}: {e:?}"
        );
    }
}
