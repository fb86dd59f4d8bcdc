//! Real jobs on a real agent process and a real Docker engine: output
//! throughput through `outpost submit --follow` beside `docker run`, the
//! agent's peak memory while a job prints, and a trivial job end to end
//! beside the engine's own create/start/wait/remove and `docker run --rm`.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost::client::StateDir;
use outpost_proto::admin::v1 as admin;

use super::procs::{AgentProc, ServerProc, outpost_cli, reset_peak, status_field, timed};
use crate::RUNNER_IMAGE;

#[derive(Debug, Clone, Default)]
pub struct JobFigures {
    pub log_mb: u64,
    pub docker_log: Duration,
    pub outpost_log: Duration,
    /// Peak resident size of the agent while a job printed `peak_mb`.
    pub peak_mb: u64,
    pub agent_peak_kb: u64,
    pub engine_api: Duration,
    pub docker_run: Duration,
    pub outpost_trivial: Duration,
}

#[derive(Debug, Clone)]
pub struct JobPlan {
    pub log_mb: u64,
    pub peak_mb: u64,
    pub rounds: usize,
}

/// A command printing `mb` MiB of 64-byte lines.
fn printer(mb: u64) -> String {
    format!(
        "yes 012345678901234567890123456789012345678901234567890123456789abc | head -c {}",
        mb << 20
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub async fn run(plan: &JobPlan, root: &std::path::Path) -> anyhow::Result<JobFigures> {
    let state = StateDir::new(root.join("jobs"));
    let server = ServerProc::start(&state, "127.0.0.1:0")?;
    let agent = AgentProc::start(&server, "bench-agent", 1)?;
    wait_agent(&server, "bench-agent").await?;
    let docker = bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;

    // Warm-up: image layers and page cache, both paths.
    for _ in 0..2 {
        timed(Command::new("docker").args([
            "run",
            "--rm",
            "--network",
            "none",
            RUNNER_IMAGE,
            "true",
        ]))?;
        timed(&mut outpost_cli(
            &server,
            &["submit", "--image", RUNNER_IMAGE, "--wait", "--", "true"],
        ))?;
    }

    let mut fig = JobFigures {
        log_mb: plan.log_mb,
        peak_mb: plan.peak_mb,
        ..Default::default()
    };
    let script = printer(plan.log_mb);
    let (mut d, mut o) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        d.push(timed(Command::new("docker").args([
            "run",
            "--rm",
            "--network",
            "none",
            RUNNER_IMAGE,
            "sh",
            "-c",
            &script,
        ]))?);
        o.push(timed(&mut outpost_cli(
            &server,
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
        ))?);
    }
    fig.docker_log = median(d);
    fig.outpost_log = median(o);

    // Peak memory of the agent while one job prints `peak_mb`.
    reset_peak(agent.pid());
    timed(&mut outpost_cli(
        &server,
        &[
            "submit",
            "--image",
            RUNNER_IMAGE,
            "--wait",
            "--",
            "sh",
            "-c",
            &printer(plan.peak_mb),
        ],
    ))?;
    fig.agent_peak_kb = status_field(agent.pid(), "VmHWM").unwrap_or(0);

    let (mut e, mut r, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.rounds.max(3) {
        e.push(engine_round(&docker).await?);
        r.push(timed(Command::new("docker").args([
            "run",
            "--rm",
            "--network",
            "none",
            RUNNER_IMAGE,
            "true",
        ]))?);
        t.push(timed(&mut outpost_cli(
            &server,
            &["submit", "--image", RUNNER_IMAGE, "--wait", "--", "true"],
        ))?);
    }
    fig.engine_api = median(e);
    fig.docker_run = median(r);
    fig.outpost_trivial = median(t);
    agent.stop()?;
    server.stop()?;
    Ok(fig)
}

/// The engine's own floor: create, start, wait, remove over its API socket.
async fn engine_round(docker: &bollard::Docker) -> anyhow::Result<Duration> {
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{
        CreateContainerOptions, RemoveContainerOptions, StartContainerOptions, WaitContainerOptions,
    };
    use futures::StreamExt;
    let t = Instant::now();
    let body = ContainerCreateBody {
        image: Some(RUNNER_IMAGE.into()),
        cmd: Some(vec!["true".into()]),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let c = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await?;
    docker
        .start_container(&c.id, None::<StartContainerOptions>)
        .await?;
    let mut wait = docker.wait_container(&c.id, None::<WaitContainerOptions>);
    while let Some(w) = wait.next().await {
        w?;
    }
    docker
        .remove_container(&c.id, None::<RemoveContainerOptions>)
        .await?;
    Ok(t.elapsed())
}

async fn wait_agent(server: &ServerProc, name: &str) -> anyhow::Result<()> {
    let cfg = server.client_config()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = cfg.connect().await
            && let Ok(r) = c.list_agents(admin::ListAgentsRequest {}).await
            && r.into_inner()
                .agents
                .iter()
                .any(|a| a.agent_id == name && a.connected)
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "agent {name} not connected in 60s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
