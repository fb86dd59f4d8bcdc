//! Stacks end to end: a git repository of Terraform code on loopback
//! (`file://`), the stack that points at it, an admin client of the IaC
//! API and a bounded wait on a run. Shared by the workflow and drift tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_proto::iac::v1 as iac;
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use tonic::transport::Channel;

use crate::{Cluster, RUNNER_IMAGE};

/// The `terraform` block every test configuration starts with: the null
/// provider the runner image carries.
pub const NULL_PROVIDER: &str = r#"
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "~> 2.1"
    }
  }
}
"#;

/// Runs `git ARGS` in `repo` without the user's or the system's config;
/// panics with git's error.
pub fn git(repo: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", repo)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Commits everything in `repo`.
pub fn commit(repo: &Path, msg: &str) {
    git(repo, &["add", "-A"]);
    git(
        repo,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            msg,
        ],
    );
}

/// A git repository `DIR/repo` with `infra/main.tf` on branch `main`.
pub fn repo(dir: &Path, main_tf: &str) -> PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(repo.join("infra")).expect("create the repository");
    std::fs::write(repo.join("infra/main.tf"), main_tf).expect("write main.tf");
    git(&repo, &["init", "-q", "-b", "main", "."]);
    commit(&repo, "first");
    repo
}

/// The repository's URL for a stack.
pub fn url(repo: &Path) -> String {
    format!("file://{}", repo.display())
}

/// A stack of `repo`'s `infra` on `main`, run in the runner image.
pub fn stack(name: &str, repo: &Path) -> iac::StackSpec {
    iac::StackSpec {
        name: name.into(),
        repo: url(repo),
        branch: "main".into(),
        project_root: "infra".into(),
        image: RUNNER_IMAGE.into(),
        ..Default::default()
    }
}

/// An IaC admin client with the cluster's admin certificate.
pub async fn admin(c: &Cluster) -> IacAdminClient<Channel> {
    IacAdminClient::new(
        c.client_config()
            .channel()
            .await
            .expect("the admin channel"),
    )
}

/// Declares `specs`; returns each stack's name and what happened to it.
pub async fn apply(
    a: &mut IacAdminClient<Channel>,
    specs: Vec<iac::StackSpec>,
) -> Vec<(String, String)> {
    a.apply_stacks(iac::ApplyStacksRequest {
        stacks: specs,
        ..Default::default()
    })
    .await
    .expect("apply stacks")
    .into_inner()
    .changes
    .into_iter()
    .map(|c| (c.name, c.action))
    .collect()
}

/// Syncs `name`; a new commit must queue a run, whose id this returns.
pub async fn sync(a: &mut IacAdminClient<Channel>, name: &str) -> String {
    let r = a
        .sync_stack(iac::SyncStackRequest { name: name.into() })
        .await
        .expect("sync")
        .into_inner();
    assert!(!r.run_id.is_empty(), "a new commit queues a run: {r:?}");
    r.run_id
}

/// The run `id` as the control plane has it now.
pub async fn get_run(a: &mut IacAdminClient<Channel>, id: &str) -> iac::Run {
    a.get_run(iac::GetRunRequest { run_id: id.into() })
        .await
        .expect("get run")
        .into_inner()
}

/// Polls run `id` until `pred` holds; panics with the run as last seen
/// after `limit`.
pub async fn wait_run(
    a: &mut IacAdminClient<Channel>,
    id: &str,
    limit: Duration,
    pred: impl Fn(&iac::Run) -> bool,
) -> iac::Run {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let r = get_run(a, id).await;
        if pred(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {id} did not get there in {limit:?}: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A run that will not change state again.
pub fn is_final(r: &iac::Run) -> bool {
    matches!(
        r.state.as_str(),
        "FINISHED" | "FAILED" | "CANCELLED" | "DISCARDED" | "STALE"
    )
}
