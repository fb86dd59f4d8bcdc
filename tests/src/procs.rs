//! Agents as `outpost-agent` processes: their config files, starting,
//! signalling and waiting for them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost::client::StateDir;

use crate::*;

/// An agent running as its own `outpost-agent` process, so tests can kill,
/// stop and signal it like an operator or a crash would.
pub struct AgentProc {
    pub name: String,
    pub child: std::process::Child,
    pub config: PathBuf,
    pub log: PathBuf,
    pub state_dir: PathBuf,
}

/// Writes the config of agent `name` of the installation whose state is
/// `state` (certificate issued if missing) under `dir/agents/name`, dialing
/// `url`, and returns its path. `extra` is appended to the top-level table.
pub fn write_agent_config_at(
    state: &StateDir,
    dir: &Path,
    url: &str,
    name: &str,
    capacity: u32,
    extra: &str,
    sandbox_extra: &str,
) -> PathBuf {
    let pki = state.pki();
    let paths = pki.issued(outpost::identity::Role::Agent, name);
    if !paths.cert.exists() {
        pki.issue(outpost::identity::Role::Agent, name)
            .expect("issue agent cert");
    }
    let dir = dir.join("agents").join(name);
    std::fs::create_dir_all(&dir).expect("agent dir");
    let text = format!(
        r#"server = "{url}"
server_name = "localhost"
agent_id = "{name}"
capacity = {capacity}
state_dir = "{state}"
max_backoff = "500ms"
{extra}
[labels]
zone = "test"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[sandbox]
work_dir = "{work}"
stop_grace = "2s"
pull = "never"
{sandbox_extra}
"#,
        sandbox_extra = with_runner_allowed(sandbox_extra),
        url = url,
        state = dir.join("state").display(),
        ca = pki.ca_cert().display(),
        cert = paths.cert.display(),
        key = paths.key.display(),
        work = dir.join("work").display(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("write agent config");
    path
}

/// Starts `outpost-agent --config CONFIG` (log in `CONFIG.log`) without
/// waiting for anything.
pub fn spawn_agent_process(name: &str, config: &Path) -> AgentProc {
    let log = config.with_extension("log");
    let child = std::process::Command::new(bin("outpost-agent"))
        .arg("--config")
        .arg(config)
        .env("OUTPOST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("agent log"),
        )
        .spawn()
        .expect("spawn outpost-agent");
    let state_dir = config.parent().expect("dir").join("state");
    AgentProc {
        name: name.to_string(),
        child,
        config: config.to_path_buf(),
        log,
        state_dir,
    }
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`KILL`, `TERM`, `STOP`, `CONT`, `QUIT`).
    pub fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code();
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "agent {} did not exit within {limit:?}; log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `sandbox_extra` with a `[policy]` table that allows the runner image: the
/// agent allows no image by default. A `[policy]` table already in
/// `sandbox_extra` gets the line too, unless it sets `allowed_images` itself.
fn with_runner_allowed(sandbox_extra: &str) -> String {
    let allow = format!("allowed_images = [\"{RUNNER_IMAGE}\"]");
    if sandbox_extra.contains("allowed_images") {
        sandbox_extra.to_string()
    } else if sandbox_extra.contains("[policy]") {
        sandbox_extra.replacen("[policy]", &format!("[policy]\n{allow}"), 1)
    } else {
        format!("{sandbox_extra}\n[policy]\n{allow}")
    }
}
