//! `stacks.toml`: stacks declared in a file (which can live in git itself).
//! Unknown keys and missing fields are errors; a plan policy is read from
//! the file it names (relative to the stacks file).
//!
//! ```toml
//! [[stack]]
//! name = "network"
//! repo = "https://git.internal/infra.git"
//! branch = "main"
//! project_root = "network"
//! image = "outpost/runner:dev"
//! autodeploy = false
//! approvals_required = 2
//! plan_policy = "policies/network.rego"
//! poll_interval = "1m"
//! [stack.variables]
//! region = "eu-west-1"
//! [stack.labels]
//! pool = "terraform"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::model::StackSpec;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StacksFile {
    #[serde(default)]
    stack: Vec<StackToml>,
}

/// One `[[stack]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackToml {
    /// Unique name: letters, digits, `-`, `_`.
    name: String,
    /// Git URL (anything `git fetch` takes).
    repo: String,
    /// Tracked branch. Default `main`.
    branch: Option<String>,
    /// Directory of the Terraform configuration inside the repository. Default: the root.
    project_root: Option<String>,
    /// Runner image (it must be on the agents' allow-list).
    image: String,
    /// `terraform` (default) or `tofu`.
    tool: Option<String>,
    /// Non-secret Terraform variables.
    #[serde(default)]
    variables: BTreeMap<String, String>,
    /// Agent labels a run needs.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Apply by itself when no policy warns.
    #[serde(default)]
    autodeploy: bool,
    /// Rego file of the plan policy (`package outpost.plan`, `deny`/`warn` sets).
    plan_policy: Option<PathBuf>,
    /// Distinct admin identities that must approve (not the trigger). Default 1.
    approvals_required: Option<u32>,
    /// How often the branch is polled, e.g. `"30s"`. Default: never (use `outpost stack sync`).
    poll_interval: Option<String>,
}

/// Reads `path`; the error names the file and what is wrong.
pub fn load(path: &Path) -> Result<Vec<StackSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a stacks file whose relative paths start at `base`.
pub fn parse(text: &str, base: &Path) -> Result<Vec<StackSpec>, String> {
    let file: StacksFile = toml::from_str(text).map_err(|e| e.to_string())?;
    file.stack
        .into_iter()
        .map(|s| {
            let plan_policy = match &s.plan_policy {
                None => String::new(),
                Some(p) => {
                    let p = base.join(p);
                    std::fs::read_to_string(&p).map_err(|e| {
                        format!(
                            "stack {}: cannot read plan_policy {}: {e}",
                            s.name,
                            p.display()
                        )
                    })?
                }
            };
            let poll_interval_ms = match &s.poll_interval {
                None => 0,
                Some(d) => outpost_agent::units::parse_duration(d)
                    .map_err(|e| format!("stack {}: poll_interval: {e}", s.name))?
                    .as_millis() as u64,
            };
            StackSpec {
                name: s.name,
                repo: s.repo,
                branch: s.branch.unwrap_or_default(),
                project_root: s.project_root.unwrap_or_default(),
                image: s.image,
                tool: s.tool.unwrap_or_default(),
                variables: s.variables,
                labels: s.labels,
                autodeploy: s.autodeploy,
                plan_policy,
                approvals_required: s.approvals_required.unwrap_or(1),
                poll_interval_ms,
            }
            .normalized()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stacks_and_refuses_unknown_keys_and_missing_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.rego"), "package outpost.plan\n").unwrap();
        let ok = parse(
            r#"
[[stack]]
name = "net"
repo = "file:///r"
image = "img"
plan_policy = "p.rego"
poll_interval = "30s"
[stack.variables]
region = "x"
"#,
            dir.path(),
        )
        .unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].plan_policy, "package outpost.plan\n");
        assert_eq!(ok[0].poll_interval_ms, 30_000);
        assert_eq!(ok[0].branch, "main");
        let e = parse(
            "[[stack]]\nname = \"a\"\nrepo = \"r\"\nimage = \"i\"\nautodeploi = true\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(e.contains("autodeploi"), "{e}");
        let e = parse("[[stack]]\nname = \"a\"\nimage = \"i\"\n", dir.path()).unwrap_err();
        assert!(e.contains("repo"), "{e}");
        let e = parse("[[stacks]]\nname = \"a\"\n", dir.path()).unwrap_err();
        assert!(e.contains("stacks"), "{e}");
        let e = parse(
            "[[stack]]\nname = \"a\"\nrepo = \"r\"\nimage = \"i\"\nplan_policy = \"missing.rego\"\n",
            dir.path(),
        )
        .unwrap_err();
        assert!(e.contains("missing.rego"), "{e}");
    }
}
