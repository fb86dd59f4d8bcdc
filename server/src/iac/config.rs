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
//! approvals_required = 2     # or approval_policy = "policies/approve.rego"
//! plan_policy = "policies/network.rego"
//! poll_interval = "1m"
//! [stack.variables]
//! region = "eu-west-1"
//! [stack.labels]
//! pool = "terraform"
//! [stack.secrets]            # files the run's jobs find at /run/secrets/<name>
//! db_password = "secrets/db_password.txt"
//! [stack.drift]
//! schedule = "0 */6 * * *"   # cron: 5 fields, or 6 with seconds first
//! timezone = "Europe/Paris"  # default UTC
//! min_interval = "1h"
//! jitter = "5m"
//! queue_timeout = "1h"       # a check no agent takes by then fails, saying why
//! ignore = ["null_resource.scratch*"]
//! reconcile = false
//! [[stack.notify]]
//! url = "https://hooks.internal/outpost"
//! secret_file = "secrets/webhook.txt"   # or secret_env = "OUTPOST_WEBHOOK_SECRET"
//! format = "json"                       # or "slack"
//!
//! [[notify]]                 # global targets: every stack's events
//! url = "https://hooks.slack.com/services/..."
//! format = "slack"
//! ```
//!
//! Secret values are read by the CLI from the files (or the environment
//! variable) named here, never written in the stacks file itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::model::StackSpec;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StacksFile {
    #[serde(default)]
    stack: Vec<StackToml>,
    /// Global webhook targets; absent: the global targets stay as they are.
    notify: Option<Vec<NotifyToml>>,
}

/// A `[[notify]]` or `[[stack.notify]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyToml {
    url: String,
    /// File holding the shared secret of the signature.
    secret_file: Option<PathBuf>,
    /// Environment variable holding the shared secret.
    secret_env: Option<String>,
    /// `json` (default) or `slack`.
    format: Option<String>,
    /// Events to send; default all.
    #[serde(default)]
    events: Vec<String>,
    /// Longest one attempt may take, e.g. `"5s"`. Default 10s.
    timeout: Option<String>,
}

/// The `[stack.drift]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriftToml {
    schedule: String,
    timezone: Option<String>,
    min_interval: Option<String>,
    jitter: Option<String>,
    #[serde(default)]
    ignore: Vec<String>,
    #[serde(default)]
    reconcile: bool,
    /// A check no agent takes within this long fails, e.g. `"15m"`. Default 1h.
    queue_timeout: Option<String>,
}

/// What a stacks file declares.
#[derive(Debug)]
pub struct Declared {
    pub stacks: Vec<StackSpec>,
    /// `Some`: replace the global webhook targets.
    pub notify: Option<Vec<crate::notify::Target>>,
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
    /// Rego file of the approval policy (`package outpost.approval`:
    /// `approve`, `reject`), instead of `approvals_required`.
    approval_policy: Option<PathBuf>,
    /// How often the branch is polled, e.g. `"30s"`. Default: never (use `outpost stack sync`).
    poll_interval: Option<String>,
    /// Secret files of the run's jobs: name = path of the file holding the value.
    #[serde(default)]
    secrets: BTreeMap<String, PathBuf>,
    /// AWS role ARN of the run's jobs.
    aws_role: Option<String>,
    /// Session duration of that role, e.g. `"1h"`. Default: the agent's.
    aws_duration: Option<String>,
    drift: Option<DriftToml>,
    #[serde(default)]
    notify: Vec<NotifyToml>,
}

fn duration_ms(what: &str, d: &Option<String>) -> Result<u64, String> {
    match d {
        None => Ok(0),
        Some(d) => Ok(outpost_agent::units::parse_duration(d)
            .map_err(|e| format!("{what}: {e}"))?
            .as_millis() as u64),
    }
}

fn read_secret(base: &Path, what: &str, file: &Path) -> Result<Vec<u8>, String> {
    let p = base.join(file);
    std::fs::read(&p).map_err(|e| format!("{what}: cannot read {}: {e}", p.display()))
}

fn target(base: &Path, t: NotifyToml) -> Result<crate::notify::Target, String> {
    let what = format!("notify {}", t.url);
    let secret_value = match (&t.secret_file, &t.secret_env) {
        (Some(_), Some(_)) => {
            return Err(format!("{what}: give secret_file or secret_env, not both"));
        }
        (Some(f), None) => read_secret(base, &what, f)?,
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("{what}: environment variable {var} is not set"))?
            .into_bytes(),
        (None, None) => Vec::new(),
    };
    let target = crate::notify::Target {
        url: t.url.clone(),
        format: t.format.unwrap_or_default(),
        events: t.events,
        timeout_ms: duration_ms(&format!("{what}: timeout"), &t.timeout)?,
        secret: None,
        secret_value,
    };
    target.check().map_err(|e| format!("{what}: {e}"))?;
    Ok(target)
}

/// Reads `path`; the error names the file and what is wrong.
pub fn load(path: &Path) -> Result<Declared, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a stacks file whose relative paths start at `base`.
pub fn parse(text: &str, base: &Path) -> Result<Declared, String> {
    let file: StacksFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let notify = file
        .notify
        .map(|ts| {
            ts.into_iter()
                .map(|t| target(base, t))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let stacks = file
        .stack
        .into_iter()
        .map(|s| {
            let rego = |what: &str, path: &Option<PathBuf>| match path {
                None => Ok(String::new()),
                Some(p) => {
                    let p = base.join(p);
                    std::fs::read_to_string(&p).map_err(|e| {
                        format!("stack {}: cannot read {what} {}: {e}", s.name, p.display())
                    })
                }
            };
            let plan_policy = rego("plan_policy", &s.plan_policy)?;
            let approval_policy = rego("approval_policy", &s.approval_policy)?;
            let poll_interval_ms = match &s.poll_interval {
                None => 0,
                Some(d) => outpost_agent::units::parse_duration(d)
                    .map_err(|e| format!("stack {}: poll_interval: {e}", s.name))?
                    .as_millis() as u64,
            };
            let n = &s.name;
            let mut secret_values = Vec::new();
            for (name, file) in &s.secrets {
                secret_values.push(crate::model::JobSecret {
                    name: name.clone(),
                    value: read_secret(base, &format!("stack {n}: secret {name}"), file)?,
                });
            }
            let aws = match &s.aws_role {
                None => None,
                Some(arn) => Some(crate::model::AwsRole {
                    role_arn: arn.clone(),
                    session_policy: String::new(),
                    duration_s: duration_ms(&format!("stack {n}: aws_duration"), &s.aws_duration)?
                        / 1000,
                }),
            };
            let drift = match &s.drift {
                None => None,
                Some(d) => Some(super::drift::DriftSpec {
                    schedule: d.schedule.clone(),
                    timezone: d.timezone.clone().unwrap_or_default(),
                    min_interval_ms: duration_ms(
                        &format!("stack {n}: drift.min_interval"),
                        &d.min_interval,
                    )?,
                    jitter_ms: duration_ms(&format!("stack {n}: drift.jitter"), &d.jitter)?,
                    ignore: d.ignore.clone(),
                    reconcile: d.reconcile,
                    queue_timeout_ms: duration_ms(
                        &format!("stack {n}: drift.queue_timeout"),
                        &d.queue_timeout,
                    )?,
                }),
            };
            let notify = s
                .notify
                .into_iter()
                .map(|t| target(base, t).map_err(|e| format!("stack {n}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
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
                approval_policy,
                poll_interval_ms,
                secrets: BTreeMap::new(),
                secret_values,
                aws,
                drift,
                notify,
            }
            .normalized()
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Declared { stacks, notify })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stacks_and_refuses_unknown_keys_and_missing_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.rego"), "package outpost.plan\n").unwrap();
        std::fs::write(dir.path().join("a.rego"), "package outpost.approval\n").unwrap();
        let ok = parse(
            r#"
[[stack]]
name = "net"
repo = "file:///r"
image = "img"
plan_policy = "p.rego"
approval_policy = "a.rego"
poll_interval = "30s"
[stack.variables]
region = "x"
"#,
            dir.path(),
        )
        .unwrap()
        .stacks;
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].plan_policy, "package outpost.plan\n");
        assert_eq!(ok[0].approval_policy, "package outpost.approval\n");
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

    #[test]
    fn drift_secrets_roles_and_webhooks_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db.txt"), "db-canary").unwrap();
        std::fs::write(dir.path().join("hook.txt"), "hook-canary").unwrap();
        let d = parse(
            r#"
[[stack]]
name = "net"
repo = "file:///r"
image = "img"
aws_role = "arn:aws:iam::1:role/plan"
aws_duration = "30m"
[stack.secrets]
db = "db.txt"
[stack.drift]
schedule = "0 3 * * *"
timezone = "Europe/Paris"
min_interval = "1h"
jitter = "5m"
queue_timeout = "15m"
ignore = ["null_resource.x*"]
reconcile = true
[[stack.notify]]
url = "https://hooks.example.com/a"
secret_file = "hook.txt"
format = "slack"
events = ["drift.detected"]
timeout = "2s"

[[notify]]
url = "http://127.0.0.1:9/global"
"#,
            dir.path(),
        )
        .unwrap();
        let s = &d.stacks[0];
        assert_eq!(s.secret_values[0].name, "db");
        assert_eq!(s.secret_values[0].value, b"db-canary");
        assert!(!format!("{s:?}").contains("canary"), "{s:?}");
        assert_eq!(s.aws.as_ref().unwrap().duration_s, 1800);
        let drift = s.drift.as_ref().unwrap();
        assert_eq!(
            (
                drift.min_interval_ms,
                drift.jitter_ms,
                drift.queue_timeout_ms
            ),
            (3_600_000, 300_000, 900_000)
        );
        assert!(drift.reconcile);
        assert_eq!(s.notify[0].secret_value, b"hook-canary");
        assert_eq!(s.notify[0].timeout_ms, 2000);
        assert_eq!(d.notify.as_ref().unwrap().len(), 1);
        // Absent `[[notify]]`: the global targets are left alone.
        let none = parse(
            "[[stack]]\nname = \"a\"\nrepo = \"r\"\nimage = \"i\"\n",
            dir.path(),
        )
        .unwrap();
        assert!(none.notify.is_none());
        let bad = |extra: &str| {
            parse(
                &format!("[[stack]]\nname = \"a\"\nrepo = \"r\"\nimage = \"i\"\n{extra}"),
                dir.path(),
            )
            .unwrap_err()
        };
        assert!(bad("[stack.drift]\nschedule = \"every day\"\n").contains("schedule"));
        assert!(
            bad("[stack.drift]\nschedule = \"* * * * *\"\ntimezone = \"Nowhere/Land\"\n")
                .contains("Nowhere/Land")
        );
        assert!(bad("[stack.drift]\nschedule = \"* * * * *\"\nevery = 1\n").contains("every"));
        assert!(bad("[stack.secrets]\ndb = \"missing.txt\"\n").contains("missing.txt"));
        assert!(bad("aws_role = \"role/x\"\n").contains("aws role"));
        assert!(bad("[[stack.notify]]\nurl = \"ftp://x/\"\n").contains("http"));
    }
}
