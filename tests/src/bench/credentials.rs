//! The pickup cost of the AWS credentials channel: submit → job running
//! (as the control plane timed it) of a job with an AWS role beside the same
//! job without one, against a local STS (moto from `scripts/setup.sh`).

use std::time::Duration;

use crate::Cluster;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Median pickup (ms) of a job without and with an AWS role, alternated,
/// after one warm-up round, as the control plane timed it (the agent reports
/// Running only once the job's process is released).
pub async fn credentials_channel(rounds: usize) -> (f64, f64) {
    let moto = crate::moto::Moto::start().await;
    let c = Cluster::start().await;
    let mut cfg = c.agent_config(2);
    cfg.aws = moto.agent_aws_config();
    let agent = c.start_agent_with(cfg).await;
    let mut plain = Vec::new();
    let mut with = Vec::new();
    for round in 0..=rounds {
        for aws in [false, true] {
            let mut spec = crate::spec(&["sh", "-c", "echo started"]);
            if aws {
                spec.aws = Some(outpost_proto::agent::v1::AwsRole {
                    role_arn: crate::moto::role("outpost-bench"),
                    ..Default::default()
                });
            }
            let id = c.submit_spec(spec).await;
            let j = c.wait_final(&id, Duration::from_secs(120)).await;
            assert_eq!(
                crate::state(&j),
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
