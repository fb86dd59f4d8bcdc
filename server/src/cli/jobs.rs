//! `outpost submit`, `jobs`, `job`, `cancel` and `artifacts`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::ValueEnum;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;

use super::follow::{Link, stream_logs_on, wait_final, wait_final_on, watch_queue};
use super::output::{
    between, bytes_text, human, is_final, job_state, note, now_ms, outln, rfc3339, shell_words,
    state_name, state_str,
};
use super::{Output, SubmitArgs, status_err};
use crate::client::ClientConfig;

/// The CLI's exit code for a final job: its own exit code when it ran.
pub fn exit_code_of(j: &admin::Job) -> ExitCode {
    match job_state(j) {
        pb::JobState::Succeeded => ExitCode::SUCCESS,
        pb::JobState::Failed => match j.exit_code {
            Some(c) if (1..=255).contains(&c) => ExitCode::from(c as u8),
            _ => ExitCode::FAILURE,
        },
        pb::JobState::Cancelled => ExitCode::from(130),
        pb::JobState::TimedOut => ExitCode::from(124),
        _ => ExitCode::FAILURE,
    }
}

pub async fn submit(client: &ClientConfig, args: SubmitArgs) -> Result<ExitCode> {
    // One connection for the submission, the log and the final state.
    let mut link = Link::new(client);
    let id = link
        .get()
        .await?
        .submit_job(admin::SubmitJobRequest {
            spec: Some(args.spec()),
        })
        .await
        .map_err(status_err)?
        .into_inner()
        .job_id;
    if args.follow {
        // stdout is the job's output, and only that.
        note!("submitted job {id}");
    } else {
        outln!("{id}");
    }
    if !(args.follow || args.wait) {
        return Ok(ExitCode::SUCCESS);
    }
    let watcher = tokio::spawn(watch_queue(client.clone(), id.clone()));
    let ended = async {
        if args.follow {
            stream_logs_on(&mut link, &id, true).await?;
        }
        wait_final_on(&mut link, &id).await
    }
    .await;
    watcher.abort();
    let job = ended?;
    if job_state(&job) != pb::JobState::Succeeded && !job.message.is_empty() {
        note!("job {id} {}: {}", state_name(&job), job.message);
    }
    Ok(exit_code_of(&job))
}

/// A job state as a filter of `outpost jobs`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateArg {
    Queued,
    Leased,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    #[value(name = "timed_out", alias = "timed-out")]
    TimedOut,
    Rejected,
    Lost,
}

impl StateArg {
    fn pb(self) -> pb::JobState {
        match self {
            StateArg::Queued => pb::JobState::Queued,
            StateArg::Leased => pb::JobState::Leased,
            StateArg::Running => pb::JobState::Running,
            StateArg::Succeeded => pb::JobState::Succeeded,
            StateArg::Failed => pb::JobState::Failed,
            StateArg::Cancelled => pb::JobState::Cancelled,
            StateArg::TimedOut => pb::JobState::TimedOut,
            StateArg::Rejected => pb::JobState::Rejected,
            StateArg::Lost => pb::JobState::Lost,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// Jobs per page (1 to 1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Only jobs in these states (repeatable, or comma-separated).
    #[arg(long = "state", value_enum, value_delimiter = ',')]
    states: Vec<StateArg>,
    /// Only jobs that require this agent label, as key=value (repeatable).
    #[arg(long = "label", value_parser = super::args::parse_kv)]
    labels: Vec<(String, String)>,
    /// The next page, as printed after the previous one.
    #[arg(long)]
    page_token: Option<String>,
    #[command(subcommand)]
    pub command: Option<crate::retention::JobsCommand>,
}

pub async fn list(client: &ClientConfig, args: JobsArgs) -> Result<ExitCode> {
    let page = client
        .connect()
        .await?
        .list_jobs(admin::ListJobsRequest {
            limit: args.limit,
            states: args.states.iter().map(|s| s.pb() as i32).collect(),
            labels: args.labels.iter().cloned().collect::<HashMap<_, _>>(),
            page_token: args.page_token.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let now = now_ms();
    if args.output == Output::Json {
        let v: Vec<_> = page.jobs.iter().map(job_json).collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!(
            "{:<36}  {:<10}  {:>4}  {:>5}  {:>6}  {:>8}  {:<16}  IMAGE",
            "JOB",
            "STATE",
            "EXIT",
            "EPOCH",
            "AGE",
            "DURATION",
            "AGENT"
        );
        for j in &page.jobs {
            let age = between(j.created_at_ms, now).map(human);
            let ran = run_time(j, now).map(human);
            outln!(
                "{:<36}  {:<10}  {:>4}  {:>5}  {:>6}  {:>8}  {:<16}  {}",
                j.job_id,
                state_name(j),
                j.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                j.epoch,
                age.as_deref().unwrap_or("-"),
                ran.as_deref().unwrap_or("-"),
                if j.agent_id.is_empty() {
                    "-"
                } else {
                    &j.agent_id
                },
                j.image
            );
        }
    }
    let shown = page.jobs.len();
    if page.next_page_token.is_empty() {
        note!("{shown} of {} jobs", page.total);
    } else {
        note!(
            "{shown} of {} jobs; next page: --page-token {}",
            page.total,
            page.next_page_token
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How long the job's process ran (so far, if it runs).
fn run_time(j: &admin::Job, now: i64) -> Option<Duration> {
    let end = if j.finished_at_ms > 0 {
        j.finished_at_ms
    } else {
        now
    };
    between(j.started_at_ms, end)
}

pub async fn show(client: &ClientConfig, job: &str, output: Output) -> Result<ExitCode> {
    let j = client
        .connect()
        .await?
        .get_job(admin::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&job_json(&j))?);
    } else {
        for (k, v) in job_lines(&j, now_ms()) {
            outln!("{k:<15} {v}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outpost job` as a table: times in RFC 3339 with durations, what the job
/// asked for, names of its environment variables and secrets (never values).
fn job_lines(j: &admin::Job, now: i64) -> Vec<(&'static str, String)> {
    let mut lines = vec![("job", j.job_id.clone())];
    let mut state = state_name(j).to_string();
    if j.cancel_requested && !is_final(j) {
        state.push_str(" (cancel requested)");
    }
    lines.push(("state", state));
    if let Some(c) = j.exit_code {
        lines.push(("exit code", c.to_string()));
    }
    if j.oom_killed {
        lines.push(("oom killed", "yes".into()));
    }
    if !j.message.is_empty() {
        lines.push(("message", j.message.clone()));
    }
    lines.push(("image", j.image.clone()));
    lines.push(("command", shell_words(&j.command)));
    let mut labels: Vec<_> = j.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    lines.push(("labels", or_none(labels.join(","))));
    if let Some(n) = j.matching_agents {
        lines.push(("matching agents", n.to_string()));
    }
    lines.push(("agent", or_none(j.agent_id.clone())));
    lines.push(("attempt", j.epoch.to_string()));
    let at = |ms: i64, since: Option<Duration>| match (rfc3339(ms), since) {
        (Some(t), Some(d)) => format!("{t} ({} ago)", human(d)),
        (Some(t), None) => t,
        (None, _) => "-".into(),
    };
    lines.push((
        "created",
        at(j.created_at_ms, between(j.created_at_ms, now)),
    ));
    lines.push(("started", at(j.started_at_ms, None)));
    lines.push(("finished", at(j.finished_at_ms, None)));
    let queued_until = if j.started_at_ms > 0 {
        j.started_at_ms
    } else if j.finished_at_ms > 0 {
        j.finished_at_ms
    } else {
        now
    };
    if let Some(d) = between(j.created_at_ms, queued_until) {
        lines.push(("queued for", human(d)));
    }
    if let Some(d) = run_time(j, now) {
        lines.push(("ran for", human(d)));
    }
    let r = j.resources.unwrap_or_default();
    let or_default = |v: u64, show: &dyn Fn(u64) -> String| {
        if v == 0 {
            "the agent's default".to_string()
        } else {
            show(v)
        }
    };
    lines.push(("memory", or_default(r.memory_bytes, &bytes_text)));
    lines.push((
        "cpus",
        or_default(r.nano_cpus, &|n: u64| format!("{}", n as f64 / 1e9)),
    ));
    lines.push(("pids", or_default(r.pids, &|n: u64| n.to_string())));
    lines.push(("workspace", or_default(r.workspace_bytes, &bytes_text)));
    let ms = |v: u64, none: &str| {
        if v == 0 {
            none.to_string()
        } else {
            human(Duration::from_millis(v))
        }
    };
    lines.push(("timeout", ms(j.timeout_ms, "none")));
    lines.push(("queue timeout", ms(j.queue_timeout_ms, "none")));
    lines.push(("network", network_name(j.network).into()));
    lines.push(("env", or_none(j.env_names.join(", "))));
    lines.push(("secrets", or_none(j.secret_names.join(", "))));
    lines.push(("aws role", or_none(j.aws_role.clone())));
    lines.push(("log", bytes_text(j.log_length)));
    lines
}

fn or_none(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

fn network_name(n: i32) -> &'static str {
    match pb::NetworkMode::try_from(n) {
        Ok(pb::NetworkMode::Egress) => "egress",
        _ => "none",
    }
}

fn job_json(j: &admin::Job) -> serde_json::Value {
    let r = j.resources.unwrap_or_default();
    serde_json::json!({
        "job_id": j.job_id,
        "state": state_name(j),
        "exit_code": j.exit_code,
        "message": j.message,
        "epoch": j.epoch,
        "agent_id": j.agent_id,
        "image": j.image,
        "command": j.command,
        "selector": j.selector,
        "created_at_ms": j.created_at_ms,
        "started_at_ms": j.started_at_ms,
        "finished_at_ms": j.finished_at_ms,
        "created_at": rfc3339(j.created_at_ms),
        "started_at": rfc3339(j.started_at_ms),
        "finished_at": rfc3339(j.finished_at_ms),
        "run_ms": between(j.started_at_ms, j.finished_at_ms).map(|d| d.as_millis() as u64),
        "log_length": j.log_length,
        "oom_killed": j.oom_killed,
        "resources": {
            "memory_bytes": r.memory_bytes,
            "nano_cpus": r.nano_cpus,
            "pids": r.pids,
            "workspace_bytes": r.workspace_bytes,
        },
        "timeout_ms": j.timeout_ms,
        "queue_timeout_ms": j.queue_timeout_ms,
        "network": network_name(j.network),
        "env_names": j.env_names,
        "secret_names": j.secret_names,
        "aws_role": j.aws_role,
        "cancel_requested": j.cancel_requested,
        "matching_agents": j.matching_agents,
    })
}

pub async fn cancel(client: &ClientConfig, job: &str, wait: bool) -> Result<ExitCode> {
    let mut c = client.connect().await?;
    let before = c
        .get_job(admin::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    if is_final(&before) {
        outln!("{} {}", before.job_id, state_name(&before));
        note!(
            "job {} had already ended ({}); nothing to cancel",
            before.job_id,
            state_name(&before)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let after = c
        .cancel_job(admin::CancelJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let state = job_state(&after);
    if is_final(&after) {
        outln!("{} {}", after.job_id, state_name(&after));
        if state != pb::JobState::Cancelled {
            note!(
                "job {} ended ({}) before the cancel reached it",
                after.job_id,
                state_name(&after)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{} {} (cancel requested: one SIGINT, then SIGKILL after the agent's grace period)",
        after.job_id,
        state_str(state)
    );
    if wait {
        let j = wait_final(client, job).await?;
        outln!("{} {}", j.job_id, state_name(&j));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn artifacts(client: &ClientConfig, job: &str, output: Output) -> Result<ExitCode> {
    let artifacts = client
        .connect()
        .await?
        .list_artifacts(admin::ListArtifactsRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(status_err)?
        .into_inner()
        .artifacts;
    if output == Output::Json {
        let v: Vec<_> = artifacts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "job_id": a.job_id, "epoch": a.epoch, "path": a.path,
                    "url": format!("s3://{}/{}", a.bucket, a.key), "bucket": a.bucket,
                    "key": a.key, "size": a.size, "sha256": a.sha256, "etag": a.etag,
                    "uploaded_at_ms": a.uploaded_at_ms,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:>5}  {:>12}  {:<64}  {:<24}  URL",
        "EPOCH",
        "SIZE",
        "SHA256",
        "PATH"
    );
    for a in &artifacts {
        outln!(
            "{:>5}  {:>12}  {:<64}  {:<24}  s3://{}/{}",
            a.epoch,
            a.size,
            a.sha256,
            a.path,
            a.bucket,
            a.key
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn jobs(args: &[&str]) -> Result<JobsArgs, String> {
        let mut argv = vec!["outpost", "jobs"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Jobs(a) => Ok(a),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn jobs_takes_filters_and_refuses_a_zero_limit() {
        let e = jobs(&["--limit", "0"]).unwrap_err();
        assert!(e.contains("--limit"), "{e}");
        assert!(jobs(&["--limit", "1001"]).is_err());
        let a = jobs(&[
            "--state",
            "running,timed_out",
            "--state",
            "queued",
            "--label",
            "pool=gpu",
        ])
        .unwrap();
        assert_eq!(
            a.states,
            [StateArg::Running, StateArg::TimedOut, StateArg::Queued]
        );
        assert_eq!(a.labels, [("pool".to_string(), "gpu".to_string())]);
        assert_eq!(a.limit, 50);
    }

    #[test]
    fn a_job_shows_what_it_asked_for_and_never_env_values() {
        let j = admin::Job {
            job_id: "j1".into(),
            state: pb::JobState::Failed as i32,
            exit_code: Some(3),
            image: "img".into(),
            command: vec!["sh".into(), "-c".into(), "exit 3".into()],
            created_at_ms: 1_764_380_000_000,
            started_at_ms: 1_764_380_001_500,
            finished_at_ms: 1_764_380_004_000,
            resources: Some(pb::Resources {
                memory_bytes: 64 << 20,
                nano_cpus: 500_000_000,
                pids: 0,
                workspace_bytes: 0,
            }),
            timeout_ms: 1_800_000,
            network: pb::NetworkMode::Egress as i32,
            env_names: vec!["TF_VAR_region".into()],
            aws_role: "arn:aws:iam::1:role/tf".into(),
            ..Default::default()
        };
        let lines: HashMap<_, _> = job_lines(&j, 1_764_380_010_000).into_iter().collect();
        assert_eq!(lines["created"], "2025-11-29T01:33:20Z (10s ago)");
        assert_eq!(lines["started"], "2025-11-29T01:33:21.5Z");
        assert_eq!(lines["queued for"], "1s");
        assert_eq!(lines["ran for"], "2s");
        assert_eq!(lines["memory"], "64 MiB");
        assert_eq!(lines["cpus"], "0.5");
        assert_eq!(lines["pids"], "the agent's default");
        assert_eq!(lines["timeout"], "30m00s");
        assert_eq!(lines["network"], "egress");
        assert_eq!(lines["env"], "TF_VAR_region");
        assert_eq!(lines["aws role"], "arn:aws:iam::1:role/tf");
        assert_eq!(lines["command"], "sh -c 'exit 3'");
    }
}
