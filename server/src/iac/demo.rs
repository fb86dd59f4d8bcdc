//! The stack part of `outpost dev --demo`: a git repository of its own (in
//! the state directory), a stack with a plan policy, a tracked run planned
//! in the sandbox, an approval by a second admin, the apply of exactly that
//! plan (state kept by the control plane, sealed to the pool key), then a
//! second commit whose plan shows just the difference, approved and
//! applied in turn.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_proto::iac::v1 as iac;
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use tonic::transport::Channel;

use crate::client::{ClientConfig, StateDir};
use crate::identity::Role;

const MAIN_TF: &str = r#"terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "~> 2.1"
    }
  }
}

variable "greeting" {
  type    = string
  default = "GREETING"
}

resource "null_resource" "hello" {
  triggers = {
    greeting = var.greeting
  }
}

output "greeting" {
  value = null_resource.hello.triggers.greeting
}
"#;

const POLICY: &str = r#"package outpost.plan

deny contains msg if {
  some rc in input.plan.resource_changes
  "delete" in rc.change.actions
  startswith(rc.address, "null_resource.keep")
  msg := sprintf("%s must never be destroyed", [rc.address])
}

warn contains msg if {
  some rc in input.plan.resource_changes
  rc.change.actions == ["delete", "create"]
  msg := sprintf("%s is replaced", [rc.address])
}
"#;

fn git(repo: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .context("failed to run git")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn commit(repo: &Path, greeting: &str, msg: &str) -> Result<()> {
    std::fs::write(repo.join("main.tf"), MAIN_TF.replace("GREETING", greeting))?;
    git(repo, &["add", "-A"])?;
    git(
        repo,
        &[
            "-c",
            "user.name=outpost demo",
            "-c",
            "user.email=demo@outpost.invalid",
            "commit",
            "-qm",
            msg,
        ],
    )
}

async fn wait_planned(c: &mut IacAdminClient<Channel>, id: &str) -> Result<iac::Run> {
    wait_past(c, id, &["QUEUED", "PLANNING"]).await
}

/// Polls the run until its state is none of `states` (5 minutes at most).
async fn wait_past(c: &mut IacAdminClient<Channel>, id: &str, states: &[&str]) -> Result<iac::Run> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = c
            .get_run(iac::GetRunRequest { run_id: id.into() })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        if !states.contains(&r.state.as_str()) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("run {id} is still {} after 5 minutes", r.state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the demo against the control plane `client` talks to.
pub async fn run(state: &StateDir, client: &ClientConfig) -> Result<()> {
    let repo = state.root.join("demo-stack");
    if repo.exists() {
        std::fs::remove_dir_all(&repo)
            .with_context(|| format!("failed to remove {}", repo.display()))?;
    }
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "-b", "main", "."])?;
    commit(&repo, "hello", "first")?;
    let mut c = IacAdminClient::new(client.channel().await?);
    let spec = iac::StackSpec {
        name: "demo".into(),
        repo: format!("file://{}", repo.display()),
        branch: "main".into(),
        image: crate::dev::RUNNER_IMAGE.into(),
        plan_policy: POLICY.into(),
        approvals_required: 1,
        ..Default::default()
    };
    c.apply_stacks(iac::ApplyStacksRequest {
        stacks: vec![spec],
        ..Default::default()
    })
    .await
    .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("\n==> stack demo declared (git source {})", repo.display());

    let mut previous = String::new();
    for (round, greeting) in [(1, "hello"), (2, "bonjour")] {
        if round == 2 {
            commit(&repo, greeting, "second")?;
            println!("\n==> second commit: greeting = {greeting:?}");
        }
        let started = Instant::now();
        let sync = c
            .sync_stack(iac::SyncStackRequest {
                name: "demo".into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        if sync.run_id.is_empty() || sync.run_id == previous {
            bail!("the new commit queued no run");
        }
        previous = sync.run_id.clone();
        let commit_id = sync.stack.map(|s| s.commit).unwrap_or_default();
        println!(
            "==> commit {} queued run {}",
            commit_id.get(..10).unwrap_or(&commit_id),
            sync.run_id
        );
        let r = wait_planned(&mut c, &sync.run_id).await?;
        println!(
            "==> planned in {:.1}s on the agent; the control plane holds only this summary:",
            started.elapsed().as_secs_f64()
        );
        super::cli::print_run(&r, super::cli::Output::Table);
        if r.state != "UNCONFIRMED" {
            bail!("run {} ended {}: {}", r.run_id, r.state, r.message);
        }
        // The run was triggered by `admin`; a second admin approves.
        let pki = state.pki();
        if !pki.issued(Role::Admin, "reviewer").cert.exists() {
            pki.issue(Role::Admin, "reviewer")?;
        }
        let reviewer = pki.issued(Role::Admin, "reviewer");
        let mut rc = IacAdminClient::new(
            ClientConfig {
                cert: reviewer.cert,
                key: reviewer.key,
                ..client.clone()
            }
            .channel()
            .await?,
        );
        let r = rc
            .decide_run(iac::DecideRunRequest {
                run_id: r.run_id.clone(),
                decision: "approve".into(),
                comment: "looks right".into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        println!(
            "==> approved by admin:reviewer: run {} is {}",
            r.run_id, r.state
        );
        let started = Instant::now();
        let r = wait_past(&mut c, &r.run_id, &["CONFIRMED", "APPLYING"]).await?;
        println!(
            "==> the agent verified the sealed plan against the approved digest and applied it in {:.1}s:",
            started.elapsed().as_secs_f64()
        );
        super::cli::print_run(&r, super::cli::Output::Table);
        if r.state != "FINISHED" {
            bail!("run {} ended {}: {}", r.run_id, r.state, r.message);
        }
        let stack = c
            .get_stack(iac::GetStackRequest {
                name: "demo".into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        println!(
            "==> state kept by the control plane (ciphertext only): serial {}, lineage {}",
            stack.state_serial, stack.state_lineage
        );
    }
    println!(
        "\n==> demo done: outpost runs demo; outpost run show RUN; outpost stack show demo; outpost state versions demo"
    );
    Ok(())
}
