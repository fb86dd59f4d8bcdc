//! Benchmarks against a bare `docker run` of the same image on the same
//! machine, measured in the same run:
//!
//! - pickup: submit → the job's process running (the engine's `StartedAt`),
//!   beside `docker run` invoked → `StartedAt`;
//! - round trip: `outpost submit --wait -- true` beside `docker run --rm IMAGE true`;
//! - footprint: the idle agent's resident memory;
//! - the credentials channel: pickup (submit → job running, as the control
//!   plane timed it) of a job with an AWS role beside the same job without
//!   one, against a local STS (moto from `scripts/setup.sh`); the channel
//!   should cost well under a second.
//!
//! Run: `cargo run -p outpost-tests --bin outpost-bench [-- ROUNDS]`.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use outpost_tests::{Cluster, RUNNER_IMAGE, bin, containers_of};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn started_at(container: &str) -> SystemTime {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.StartedAt}}", container])
        .output()
        .expect("docker inspect");
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let t = time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
        .expect("StartedAt");
    SystemTime::UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos() as u64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(15);
    let c = Cluster::start().await;
    let cfg = c.write_agent_config("bench", 1, "", "");
    let agent = c.spawn_agent("bench", &cfg).await;

    // Warm-up (image layers and page cache).
    for _ in 0..2 {
        let _ = Command::new("docker")
            .args(["run", "--rm", "--network", "none", RUNNER_IMAGE, "true"])
            .output();
    }

    let mut bare_pickup = Vec::new();
    let mut job_pickup = Vec::new();
    let mut bare_rt = Vec::new();
    let mut job_rt = Vec::new();
    for i in 0..rounds {
        // Bare docker: invoked -> process started.
        let name = format!("outpost-bench-{}-{i}", std::process::id());
        let t0 = SystemTime::now();
        let st = Command::new("docker")
            .args([
                "run",
                "-d",
                "--network",
                "none",
                "--name",
                &name,
                RUNNER_IMAGE,
                "sleep",
                "1",
            ])
            .output()
            .expect("docker run");
        assert!(st.status.success());
        let started = started_at(&name);
        bare_pickup.push(ms(started.duration_since(t0).unwrap_or_default()));
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();

        // Outpost: submit -> process started.
        let mut spec = outpost_tests::spec(&["sleep", "1"]);
        spec.selector.insert("zone".into(), "test".into());
        let t0 = SystemTime::now();
        let id = c.submit_spec(spec).await;
        let container = loop {
            if let Some(cid) = containers_of(&id).await.into_iter().next() {
                let out = Command::new("docker")
                    .args(["inspect", "-f", "{{.State.Running}}", &cid])
                    .output()
                    .expect("inspect");
                if String::from_utf8_lossy(&out.stdout).trim() == "true" {
                    break cid;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let started = started_at(&container);
        job_pickup.push(ms(started.duration_since(t0).unwrap_or_default()));
        c.wait_final(&id, Duration::from_secs(60)).await;

        // Round trips of a trivial job.
        let t = Instant::now();
        let st = Command::new("docker")
            .args(["run", "--rm", "--network", "none", RUNNER_IMAGE, "true"])
            .status()
            .expect("docker run");
        assert!(st.success());
        bare_rt.push(ms(t.elapsed()));
        let t = Instant::now();
        let st = Command::new(bin("outpost"))
            .arg("--state-dir")
            .arg(&c.state.root)
            .args([
                "submit",
                "--image",
                RUNNER_IMAGE,
                "--label",
                "zone=test",
                "--wait",
                "--",
                "true",
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("outpost submit");
        assert!(st.success());
        job_rt.push(ms(t.elapsed()));
    }

    // Idle footprint.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ? kB")
        .to_string();

    let (bp, jp, br, jr) = (
        median(&mut bare_pickup),
        median(&mut job_pickup),
        median(&mut bare_rt),
        median(&mut job_rt),
    );
    println!("rounds: {rounds} (medians)");
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "measure", "docker", "outpost", "ratio"
    );
    println!(
        "{:<44} {:>8.1}ms {:>8.1}ms {:>7.2}x",
        "invoke/submit -> process running",
        bp,
        jp,
        jp / bp
    );
    println!(
        "{:<44} {:>8.1}ms {:>8.1}ms {:>7.2}x",
        "trivial job end to end (run --rm / --wait)",
        br,
        jr,
        jr / br
    );
    println!(
        "idle agent resident memory: {}",
        rss.trim_start_matches("VmRSS:").trim()
    );
    drop(agent);
    drop(c);

    let (plain, with) = credentials_channel(rounds.min(6)).await;
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "", "no role", "aws role", "cost"
    );
    println!(
        "{:<44} {:>8.1}ms {:>8.1}ms {:>6.0}ms   (target: under 1000ms)",
        "submit -> job running, credentials channel",
        plain,
        with,
        with - plain
    );
}

/// Median pickup (ms) of a job without and with an AWS role, alternated,
/// after one warm-up round, as the control plane timed it (the agent reports
/// Running only once the job's process is released).
async fn credentials_channel(rounds: usize) -> (f64, f64) {
    let moto = outpost_tests::moto::Moto::start().await;
    let c = Cluster::start().await;
    let mut cfg = c.agent_config(2);
    cfg.aws = moto.agent_aws_config();
    let agent = c.start_agent_with(cfg).await;
    let mut plain = Vec::new();
    let mut with = Vec::new();
    for round in 0..=rounds {
        for aws in [false, true] {
            let mut spec = outpost_tests::spec(&["sh", "-c", "echo started"]);
            if aws {
                spec.aws = Some(outpost_proto::agent::v1::AwsRole {
                    role_arn: outpost_tests::moto::role("outpost-bench"),
                    ..Default::default()
                });
            }
            let id = c.submit_spec(spec).await;
            let j = c.wait_final(&id, Duration::from_secs(120)).await;
            assert_eq!(
                outpost_tests::state(&j),
                outpost_proto::agent::v1::JobState::Succeeded,
                "{j:?}"
            );
            if round > 0 {
                let took = (j.started_at_ms - j.created_at_ms) as f64;
                if aws {
                    with.push(took)
                } else {
                    plain.push(took)
                }
            }
        }
    }
    agent.stop().await;
    (median(&mut plain), median(&mut with))
}
