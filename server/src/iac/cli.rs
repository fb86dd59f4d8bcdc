//! `outpost stack …`, `outpost run …`, `outpost runs`: the IaC commands.
//! Thin: parse, call `outpost.iac.v1.IacAdmin`, print (a table, or
//! `--output json`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use outpost_proto::admin::v1 as admin;
use outpost_proto::iac::v1 as iac;
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::client::ClientConfig;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// The IaC commands (flattened into `outpost`'s top level).
#[derive(Subcommand, Debug)]
pub enum IacCommand {
    /// Stacks: declare from a file, list, show, delete, sync.
    Stack {
        #[command(subcommand)]
        command: StackCommand,
    },
    /// One run: trigger, show, approve, reject, discard, cancel, logs.
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// A stack's managed state: list versions, push one written outside a run.
    State {
        #[command(subcommand)]
        command: super::state::cli::StateCommand,
    },
    /// List runs (of one stack), newest first.
    Runs {
        stack: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Stacks with their drift status, the age of the last check and the next one.
    Drift {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Webhook deliveries (of one stack) with every attempt, newest first.
    Notifications {
        #[arg(long)]
        stack: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum StackCommand {
    /// Create or update the stacks declared in a file (idempotent).
    Apply {
        #[arg(long, short = 'f')]
        file: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    List {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    Show {
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    Delete {
        name: String,
    },
    /// Fetch the stack's branch now; a new commit queues a tracked run.
    Sync {
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Run a drift check of the stack now.
    Check {
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum RunCommand {
    /// Queue a tracked run of the stack's current commit.
    Trigger {
        stack: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Plan any ref (branch, tag, commit) of the stack's repository: a
    /// proposed run, side by side with tracked runs, never applied.
    Plan {
        stack: String,
        #[arg(long = "ref")]
        git_ref: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// States with times, commit, plan summary, policy verdicts, approvals.
    Show {
        run: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    Approve(Decision),
    Reject(Decision),
    Discard(Decision),
    Cancel(Decision),
    /// The run's log (plan, then apply).
    Logs {
        run: String,
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct Decision {
    run: String,
    #[arg(long, default_value = "")]
    comment: String,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

async fn client(cfg: &ClientConfig) -> Result<IacAdminClient<Channel>> {
    Ok(IacAdminClient::new(cfg.channel().await?).max_decoding_message_size(64 << 20))
}

fn status(e: tonic::Status) -> anyhow::Error {
    if e.code() == tonic::Code::Unimplemented {
        // A control plane older than stacks.
        return anyhow::anyhow!(
            "this control plane does not serve stacks: upgrade it to this version"
        );
    }
    anyhow::anyhow!("{}", e.message())
}

/// Runs one IaC command.
pub async fn run(cmd: IacCommand, cfg: &ClientConfig) -> Result<std::process::ExitCode> {
    let mut c = client(cfg).await?;
    match cmd {
        IacCommand::Stack { command } => match command {
            StackCommand::Apply { file, output } => {
                let declared = super::config::load(&file).map_err(anyhow::Error::msg)?;
                let stacks = declared
                    .stacks
                    .iter()
                    .map(super::wire::spec_to_pb)
                    .collect();
                let set_notify = declared.notify.is_some();
                let notify = declared
                    .notify
                    .unwrap_or_default()
                    .iter()
                    .map(super::wire::target_to_pb)
                    .collect();
                let r = c
                    .apply_stacks(iac::ApplyStacksRequest {
                        stacks,
                        notify,
                        set_notify,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if output == Output::Json {
                    let v: Vec<Value> = r
                        .changes
                        .iter()
                        .map(|c| json!({"name": c.name, "action": c.action}))
                        .collect();
                    println!("{}", Value::Array(v));
                } else {
                    for ch in r.changes {
                        println!("{:<24} {}", ch.name, ch.action);
                    }
                }
            }
            StackCommand::List { output } => {
                let r = c
                    .list_stacks(iac::ListStacksRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                if output == Output::Json {
                    let v: Vec<Value> = r.stacks.iter().map(stack_json).collect();
                    println!("{}", Value::Array(v));
                } else {
                    println!(
                        "{:<24} {:<12} {:<12} {:<9} FETCH",
                        "NAME", "BRANCH", "COMMIT", "DRIFT"
                    );
                    for s in &r.stacks {
                        let spec = s.spec.clone().unwrap_or_default();
                        println!(
                            "{:<24} {:<12} {:<12} {:<9} {}",
                            spec.name,
                            spec.branch,
                            short(&s.commit),
                            s.drift.as_ref().map(|d| d.status.as_str()).unwrap_or(""),
                            if s.fetch_error.is_empty() {
                                "ok"
                            } else {
                                &s.fetch_error
                            }
                        );
                    }
                }
            }
            StackCommand::Show { name, output } => {
                let s = c
                    .get_stack(iac::GetStackRequest { name })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_stack(&s, output);
            }
            StackCommand::Delete { name } => {
                c.delete_stack(iac::DeleteStackRequest { name: name.clone() })
                    .await
                    .map_err(status)?;
                println!("deleted {name}");
            }
            StackCommand::Sync { name, output } => {
                let r = c
                    .sync_stack(iac::SyncStackRequest { name })
                    .await
                    .map_err(status)?
                    .into_inner();
                if output == Output::Json {
                    let s = r.stack.as_ref().map(stack_json).unwrap_or(Value::Null);
                    println!("{}", json!({"stack": s, "run_id": r.run_id}));
                } else {
                    let s = r.stack.unwrap_or_default();
                    println!("commit {}", s.commit);
                    if r.run_id.is_empty() {
                        println!("no new commit; nothing queued");
                    } else {
                        println!("queued {}", r.run_id);
                    }
                }
            }
            StackCommand::Check { name, output } => {
                let r = c
                    .check_drift(iac::CheckDriftRequest { stack: name })
                    .await
                    .map_err(status)?
                    .into_inner();
                if output == Output::Json {
                    println!("{}", run_json(&r));
                } else {
                    println!("{} {}", r.run_id, r.state);
                }
            }
        },
        IacCommand::Run { command } => match command {
            RunCommand::Trigger { stack, output } => {
                let r = c
                    .trigger_run(iac::TriggerRunRequest { stack })
                    .await
                    .map_err(status)?
                    .into_inner();
                if output == Output::Json {
                    println!("{}", run_json(&r));
                } else {
                    println!("{}", r.run_id);
                }
            }
            RunCommand::Plan {
                stack,
                git_ref,
                output,
            } => {
                let r = c
                    .propose_run(iac::ProposeRunRequest { stack, git_ref })
                    .await
                    .map_err(status)?
                    .into_inner();
                if output == Output::Json {
                    println!("{}", run_json(&r));
                } else {
                    println!("{}", r.run_id);
                }
            }
            RunCommand::Show { run, output } => {
                let r = c
                    .get_run(iac::GetRunRequest { run_id: run })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_run(&r, output);
            }
            RunCommand::Approve(d) => decide(&mut c, d, "approve").await?,
            RunCommand::Reject(d) => decide(&mut c, d, "reject").await?,
            RunCommand::Discard(d) => decide(&mut c, d, "discard").await?,
            RunCommand::Cancel(d) => decide(&mut c, d, "cancel").await?,
            RunCommand::Logs { run, follow } => {
                let r = c
                    .get_run(iac::GetRunRequest { run_id: run })
                    .await
                    .map_err(status)?
                    .into_inner();
                let mut admin = cfg.connect().await?;
                for job in [&r.plan_job, &r.apply_job] {
                    if !job.is_empty() {
                        print_log(&mut admin, job, follow).await?;
                    }
                }
            }
        },
        IacCommand::State { command } => super::state::cli::run(&mut c, command).await?,
        IacCommand::Runs {
            stack,
            output,
            limit,
        } => {
            let r = c
                .list_runs(iac::ListRunsRequest {
                    stack: stack.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == Output::Json {
                let v: Vec<Value> = r.runs.iter().map(run_json).collect();
                println!("{}", Value::Array(v));
            } else {
                println!(
                    "{:<36} {:<16} {:<12} {:<10} MESSAGE",
                    "RUN", "STACK", "STATE", "COMMIT"
                );
                for r in &r.runs {
                    println!(
                        "{:<36} {:<16} {:<12} {:<10} {}",
                        r.run_id,
                        r.stack,
                        r.state,
                        short(&r.commit),
                        r.message
                    );
                }
            }
        }
        IacCommand::Drift { output } => {
            let r = c
                .list_stacks(iac::ListStacksRequest {})
                .await
                .map_err(status)?
                .into_inner();
            super::drift::cli::print(&r.stacks, output == Output::Json);
        }
        IacCommand::Notifications {
            stack,
            output,
            limit,
        } => {
            let r = c
                .list_deliveries(iac::ListDeliveriesRequest {
                    stack: stack.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(status)?
                .into_inner();
            crate::notify::cli::print(&r.deliveries, output == Output::Json);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn decide(c: &mut IacAdminClient<Channel>, d: Decision, decision: &str) -> Result<()> {
    let r = c
        .decide_run(iac::DecideRunRequest {
            run_id: d.run,
            decision: decision.to_string(),
            comment: d.comment,
        })
        .await
        .map_err(status)?
        .into_inner();
    if d.output == Output::Json {
        println!("{}", run_json(&r));
    } else {
        println!("{} {}", r.run_id, r.state);
    }
    Ok(())
}

async fn print_log(
    admin: &mut outpost_proto::admin::v1::admin_service_client::AdminServiceClient<Channel>,
    job: &str,
    follow: bool,
) -> Result<()> {
    let mut stream = admin
        .follow_logs(admin::FollowLogsRequest {
            job_id: job.to_string(),
            offset: 0,
            follow,
            epoch: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = std::io::stdout();
    while let Some(d) = stream.message().await.map_err(status)? {
        out.write_all(&d.data).context("writing the log")?;
        out.flush().ok();
        if d.eof {
            break;
        }
    }
    Ok(())
}

fn short(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

fn stack_json(s: &iac::Stack) -> Value {
    let spec = s.spec.clone().unwrap_or_default();
    json!({
        "name": spec.name,
        "repo": spec.repo,
        "branch": spec.branch,
        "project_root": spec.project_root,
        "image": spec.image,
        "tool": spec.tool,
        "variables": spec.variables,
        "labels": spec.labels,
        "autodeploy": spec.autodeploy,
        "has_plan_policy": !spec.plan_policy.is_empty(),
        "approvals_required": spec.approvals_required,
        "has_approval_policy": !spec.approval_policy.is_empty(),
        "poll_interval_ms": spec.poll_interval_ms,
        "commit": s.commit,
        "source_digest": s.source_digest,
        "fetch_error": s.fetch_error,
        "fetched_at_ms": s.fetched_at_ms,
        "state_serial": s.state_serial,
        "state_lineage": s.state_lineage,
        "outputs": s.outputs,
        "secrets": spec.secrets.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
        "aws_role": spec.aws.as_ref().map(|a| a.role_arn.clone()),
        "drift": s.drift.as_ref().map(super::drift::cli::status_json),
        "drift_schedule": spec.drift.as_ref().map(|d| json!({"schedule": d.schedule, "timezone": d.timezone, "ignore": d.ignore, "reconcile": d.reconcile})),
        "notify": spec.notify.iter().map(|t| json!({"url": t.url, "format": t.format, "events": t.events})).collect::<Vec<_>>(),
    })
}

fn run_json(r: &iac::Run) -> Value {
    json!({
        "run_id": r.run_id,
        "stack": r.stack,
        "state": r.state,
        "commit": r.commit,
        "source_digest": r.source_digest,
        "plan_job": r.plan_job,
        "apply_job": r.apply_job,
        "message": r.message,
        "triggered_by": r.triggered_by,
        "transitions": r.transitions.iter().map(|t| json!({"state": t.state, "at_ms": t.at_ms, "note": t.note})).collect::<Vec<_>>(),
        "has_changes": r.has_changes,
        "changes": r.changes.iter().map(|c| json!({"address": c.address, "actions": c.actions})).collect::<Vec<_>>(),
        "verdicts": r.verdicts.iter().map(|v| json!({"source": v.source, "deny": v.deny, "warn": v.warn})).collect::<Vec<_>>(),
        "approvals": r.approvals.iter().map(|a| json!({"identity": a.identity, "decision": a.decision, "comment": a.comment, "plan_digest": a.plan_digest, "at_ms": a.at_ms})).collect::<Vec<_>>(),
        "plan_digest": r.plan_digest,
        "created_at_ms": r.created_at_ms,
        "outputs": r.outputs,
        "state_serial": r.state_serial,
        "state_lineage": r.state_lineage,
        "kind": r.kind,
        "git_ref": r.git_ref,
        "drift": r.drift,
        "drifted": r.drifted.iter().map(|c| json!({"address": c.address, "actions": c.actions})).collect::<Vec<_>>(),
    })
}

fn print_stack(s: &iac::Stack, output: Output) {
    if output == Output::Json {
        println!("{}", stack_json(s));
        return;
    }
    let v = stack_json(s);
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            println!("{k:<20} {v}");
        }
    }
}

/// Prints a run (also used by `outpost dev --demo`).
pub(crate) fn print_run(r: &iac::Run, output: Output) {
    if output == Output::Json {
        println!("{}", run_json(r));
        return;
    }
    println!("run        {}", r.run_id);
    println!("stack      {}", r.stack);
    println!("state      {}", r.state);
    println!("commit     {}", r.commit);
    println!("trigger    {}", r.triggered_by);
    if !r.message.is_empty() {
        println!("message    {}", r.message);
    }
    for t in &r.transitions {
        println!("  {:<24} {:<12} {}", rfc3339(t.at_ms), t.state, t.note);
    }
    if !r.plan_digest.is_empty() {
        let count = |a: &str| {
            r.changes
                .iter()
                .filter(|c| c.actions.iter().any(|x| x == a))
                .count()
        };
        println!(
            "plan       {} to add, {} to change, {} to destroy (digest {})",
            count("create"),
            count("update"),
            count("delete"),
            short(&r.plan_digest)
        );
        for c in &r.changes {
            println!("  {:<16} {}", c.actions.join("+"), c.address);
        }
    }
    for v in &r.verdicts {
        for d in &v.deny {
            println!("policy     {} deny: {d}", v.source);
        }
        for w in &v.warn {
            println!("policy     {} warn: {w}", v.source);
        }
    }
    for a in &r.approvals {
        println!(
            "decision   {} {} {} {}",
            rfc3339(a.at_ms),
            a.identity,
            a.decision,
            a.comment
        );
    }
    for (k, v) in &r.outputs {
        println!("output     {k} = {v}");
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds).
pub(crate) fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_500), "1970-01-01T00:00:01.5Z");
    }
}
