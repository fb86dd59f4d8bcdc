//! The agent's configuration: one TOML file (unknown keys are an error) with
//! environment overrides. Everything is validated before anything starts;
//! `main` exits with code 64 on any error here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::executor::SandboxConfig;

/// Errors in the configuration. Messages name the file, key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// TLS material of the agent's identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the Outpost CA certificate that signed the control plane's certificate.
    pub ca: PathBuf,
    /// PEM file with this agent's client certificate (role `agent`). With
    /// `bootstrap_token_file`, the agent writes it itself (and each renewal).
    pub cert: PathBuf,
    /// PEM file with this agent's private key. Never leaves this host. With
    /// `bootstrap_token_file`, the agent generates it itself.
    pub key: PathBuf,
}

/// The agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Control plane URL, e.g. `https://outpost.internal:7443`. The agent only dials out.
    pub server: String,
    /// Further URLs of the same control plane (its other replicas), tried in
    /// turn after `server` when a connection fails or a session ends.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Name verified in the control plane's certificate on every address
    /// (default: each address's own host, so every replica's certificate
    /// must carry the host it is dialled by).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Informational agent name sent in the hello (the certificate is authoritative).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Jobs run at once.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// Labels jobs can select on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Directory for the agent's own state.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Grace period on SIGTERM for running jobs to finish before they are interrupted.
    #[serde(default = "default_drain_grace", with = "crate::units::serde_duration")]
    pub drain_grace: Duration,
    /// Longest wait between reconnect attempts (jittered exponential backoff).
    #[serde(default = "default_max_backoff", with = "crate::units::serde_duration")]
    pub max_backoff: Duration,
    /// Bytes of unacknowledged log kept per job before the job's output is slowed down.
    #[serde(default = "default_log_buffer")]
    pub log_buffer_bytes: usize,
    /// Most bytes the log spool (`<state_dir>/spool`) may hold for all jobs together.
    #[serde(default = "default_spool_max")]
    pub spool_max_bytes: u64,
    /// Size of one spool segment file; acknowledged segments are deleted.
    #[serde(default = "default_spool_segment")]
    pub spool_segment_bytes: u64,
    /// How long a job's output may wait for spool space before the job fails.
    #[serde(
        default = "default_spool_full_timeout",
        with = "crate::units::serde_duration"
    )]
    pub spool_full_timeout: Duration,
    /// Address of the operator's `/metrics` (Prometheus) and `/healthz`
    /// endpoint, e.g. `127.0.0.1:9464` (port 0: any free port, written to
    /// `<state_dir>/metrics.addr`). Unset (the default): the agent opens no port.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The EC2 Auto Scaling termination hook the agent completes itself
    /// (`crate::lifecycle`). Unset: no lifecycle handling.
    #[serde(default)]
    pub asg: Option<crate::lifecycle::AsgConfig>,
    pub tls: TlsConfig,
    /// File holding a one-time bootstrap token (`outpost enroll create`):
    /// the agent enrols with it when it has no valid certificate, then
    /// renews its short-lived certificate over its session (`crate::identity`).
    /// Requires `agent_id` (the name it enrols as).
    #[serde(default)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Sandbox defaults and limits for every job.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// AWS credentials for jobs, STS/S3 endpoints, role allow-list (`crate::aws`).
    #[serde(default)]
    pub aws: crate::aws::AwsConfig,
    /// The VPC owner's guardrails: allowed images, egress, denied environment
    /// names, maximum timeout, optional Rego policy (`crate::policy`).
    #[serde(default)]
    pub policy: crate::policy::PolicyConfig,
    /// Stack runs: the owner's local plan policy (`crate::iac`).
    #[serde(default)]
    pub iac: crate::iac::IacConfig,
}

fn default_capacity() -> u32 {
    1
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/outpost-agent")
}
fn default_drain_grace() -> Duration {
    Duration::from_secs(600)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(10)
}
fn default_spool_max() -> u64 {
    1 << 30
}
fn default_spool_segment() -> u64 {
    4 << 20
}
fn default_spool_full_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_log_buffer() -> usize {
    8 << 20
}

impl AgentConfig {
    /// Reads `path`, applies `OUTPOST_AGENT_*` overrides from `env`, validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no overrides, no validation).
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Applies `OUTPOST_AGENT_SERVER`, `OUTPOST_AGENT_SERVERS` (`url,url`,
    /// replaces `servers`), `OUTPOST_AGENT_ID`, `OUTPOST_AGENT_CAPACITY`,
    /// `OUTPOST_AGENT_LABELS` (`k=v,k=v`, merged) and `OUTPOST_AGENT_STATE_DIR`.
    pub fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (k, v) in env {
            match k.as_str() {
                "OUTPOST_AGENT_SERVER" => self.server = v,
                "OUTPOST_AGENT_SERVERS" => {
                    self.servers = v
                        .split(',')
                        .map(str::trim)
                        .filter(|u| !u.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "OUTPOST_AGENT_ID" => self.agent_id = Some(v),
                "OUTPOST_AGENT_STATE_DIR" => self.state_dir = PathBuf::from(v),
                "OUTPOST_AGENT_CAPACITY" => {
                    self.capacity = v.parse().map_err(|_| ConfigError::Env {
                        var: "OUTPOST_AGENT_CAPACITY",
                        message: format!("{v:?} is not a whole number"),
                    })?
                }
                "OUTPOST_AGENT_LABELS" => {
                    for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
                        let (lk, lv) = pair.split_once('=').ok_or_else(|| ConfigError::Env {
                            var: "OUTPOST_AGENT_LABELS",
                            message: format!("{pair:?} is not key=value"),
                        })?;
                        self.labels
                            .insert(lk.trim().to_string(), lv.trim().to_string());
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url("server", &self.server)?;
        for (i, url) in self.servers.iter().enumerate() {
            check_url(&format!("servers[{i}]"), url)?;
        }
        if self.capacity == 0 || self.capacity > 256 {
            return Err(ConfigError::Invalid(format!(
                "capacity {} must be between 1 and 256",
                self.capacity
            )));
        }
        if self.spool_max_bytes < 2 * self.spool_segment_bytes.max(64 * 1024) {
            return Err(ConfigError::Invalid(
                "spool_max_bytes must be at least twice spool_segment_bytes (and 128 KiB)".into(),
            ));
        }
        if let Some(addr) = &self.metrics_listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "metrics_listen {addr:?} must be an IP:port address, e.g. 127.0.0.1:9464"
            )));
        }
        if let Some(asg) = &self.asg {
            asg.validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        self.aws
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // Compiles the policy (and its Rego file) once: a bad entry or file
        // stops the agent at start (exit 64), it never allows silently.
        crate::policy::Policy::new(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.log_buffer_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid(
                "log_buffer_bytes must be at least 65536".into(),
            ));
        }
        let enrols = self.bootstrap_token_file.is_some();
        if enrols && self.agent_id.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::Invalid(
                "bootstrap_token_file needs agent_id: the name the agent enrols as".into(),
            ));
        }
        let mut files = vec![("tls.ca", &self.tls.ca)];
        // An enrolling agent writes its own certificate and key.
        if !enrols {
            files.extend([("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)]);
        }
        for (what, p) in files {
            if !p.is_file() {
                return Err(ConfigError::Invalid(format!(
                    "{what}: {} does not exist or is not a file",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// Every address of the control plane in the order they are tried:
    /// `server` first, then `servers` (a repeated address only once).
    pub fn addresses(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::with_capacity(1 + self.servers.len());
        for url in std::iter::once(&self.server).chain(&self.servers) {
            if !all.contains(url) {
                all.push(url.clone());
            }
        }
        all
    }

    /// TLS name of the control plane at `server`.
    pub fn server_name(&self) -> String {
        self.server_name_for(&self.server)
    }

    /// TLS name verified when dialling `url`: `server_name` if set, else
    /// the URL's host.
    pub fn server_name_for(&self, url: &str) -> String {
        if let Some(n) = &self.server_name {
            return n.clone();
        }
        let rest = url.trim_start_matches("https://");
        let host = rest.split('/').next().unwrap_or(rest);
        let host = if let Some(h) = host.strip_prefix('[') {
            h.split(']').next().unwrap_or(h)
        } else {
            host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
        };
        host.to_string()
    }
}

/// A control plane address must be an https:// URL with a host.
fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let host = url.strip_prefix("https://").unwrap_or_default();
    if !url.starts_with("https://") || host.is_empty() || host.starts_with('/') {
        return Err(ConfigError::Invalid(format!(
            "{key} {url:?} must be an https:// URL with a host, e.g. https://outpost.internal:7443 (the agent only speaks mTLS)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
server = "https://127.0.0.1:7443"
[tls]
ca = "/ca.pem"
cert = "/agent.pem"
key = "/agent.key"
"#;

    #[test]
    fn minimal_config_has_defaults() {
        let c = AgentConfig::parse(MIN).unwrap();
        assert_eq!(c.capacity, 1);
        assert_eq!(c.server_name(), "127.0.0.1");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = AgentConfig::parse(&format!("{MIN}\nbogus = 1\n")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = AgentConfig::parse(&MIN.replace("[tls]", "[tls]\nkey_file = \"x\"")).unwrap_err();
        assert!(e.contains("key_file"), "{e}");
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let mut c = AgentConfig::parse(MIN).unwrap();
        c.apply_env([
            ("OUTPOST_AGENT_CAPACITY".to_string(), "4".to_string()),
            (
                "OUTPOST_AGENT_LABELS".to_string(),
                "zone=a, pool=tf".to_string(),
            ),
        ])
        .unwrap();
        assert_eq!(c.capacity, 4);
        assert_eq!(c.labels.get("pool").map(String::as_str), Some("tf"));
        let e = c
            .apply_env([("OUTPOST_AGENT_CAPACITY".to_string(), "many".to_string())])
            .unwrap_err();
        assert!(e.to_string().contains("OUTPOST_AGENT_CAPACITY"));
    }

    #[test]
    fn metrics_and_asg_are_off_by_default_and_checked() {
        let c = AgentConfig::parse(MIN).unwrap();
        assert!(c.metrics_listen.is_none() && c.asg.is_none());
        let c = AgentConfig::parse(&format!(
            "metrics_listen = \"127.0.0.1:9464\"\n{MIN}\n[asg]\ngroup_name = \"g\"\nhook_name = \"h\"\n"
        ))
        .unwrap();
        assert_eq!(c.metrics_listen.as_deref(), Some("127.0.0.1:9464"));
        let asg = c.asg.unwrap();
        assert_eq!(asg.imds_endpoint, "http://169.254.169.254");
        assert_eq!(asg.heartbeat_interval, Duration::from_secs(60));
        let mut c = AgentConfig::parse(MIN).unwrap();
        c.metrics_listen = Some("localhost:9464".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("metrics_listen")
        );
        let e = AgentConfig::parse(&format!("{MIN}\n[asg]\ngroup_name = \"g\"\n")).unwrap_err();
        assert!(e.contains("hook_name"), "{e}");
    }

    #[test]
    fn validation_rejects_plaintext_and_zero_capacity() {
        let mut c = AgentConfig::parse(MIN).unwrap();
        c.server = "http://x".into();
        assert!(c.validate().unwrap_err().to_string().contains("https"));
    }

    /// `MIN` with TLS files that exist, so `validate` reaches its end.
    fn valid(dir: &Path, extra: &str) -> AgentConfig {
        for f in ["ca.pem", "agent.pem", "agent.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let text = MIN.replace("/ca.pem", &dir.join("ca.pem").display().to_string());
        let text = text.replace("/agent.", &format!("{}/agent.", dir.display()));
        AgentConfig::parse(&format!("{extra}\n{text}")).unwrap()
    }

    #[test]
    fn further_servers_are_tried_after_server_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let c = valid(dir.path(), "");
        assert!(c.servers.is_empty());
        assert_eq!(c.addresses(), ["https://127.0.0.1:7443"]);
        let c = valid(
            dir.path(),
            r#"servers = ["https://b.internal:7443", "https://[::1]:7443", "https://127.0.0.1:7443"]"#,
        );
        c.validate().unwrap();
        assert_eq!(
            c.addresses(),
            [
                "https://127.0.0.1:7443",
                "https://b.internal:7443",
                "https://[::1]:7443"
            ]
        );
        // Each address's own host is verified unless server_name is set.
        assert_eq!(c.server_name_for("https://b.internal:7443"), "b.internal");
        assert_eq!(c.server_name_for("https://[::1]:7443"), "::1");
        let mut named = c.clone();
        named.server_name = Some("outpost.internal".into());
        assert_eq!(
            named.server_name_for("https://b.internal:7443"),
            "outpost.internal"
        );
    }

    #[test]
    fn a_bad_further_server_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["http://b.internal:7443", "b.internal:7443", "https://", ""] {
            let mut c = valid(dir.path(), "");
            c.servers = vec!["https://a.internal".into(), bad.into()];
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("servers[1] {bad:?}")), "{e}");
            assert!(e.contains("https://"), "{e}");
        }
        let e = AgentConfig::parse(&format!("servers = \"https://b\"\n{MIN}")).unwrap_err();
        assert!(e.contains("servers"), "{e}");
    }

    #[test]
    fn servers_come_from_the_environment_as_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = valid(dir.path(), r#"servers = ["https://old:7443"]"#);
        let var = |v: &str| [("OUTPOST_AGENT_SERVERS".to_string(), v.to_string())];
        c.apply_env(var(" https://b:7443, https://c:7443 ,"))
            .unwrap();
        assert_eq!(c.servers, ["https://b:7443", "https://c:7443"]);
        c.validate().unwrap();
        c.apply_env(var("https://b:7443,http://c:7443")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("servers[1] \"http://c:7443\""), "{e}");
        c.apply_env(var("")).unwrap();
        assert!(c.servers.is_empty());
        assert_eq!(c.addresses(), ["https://127.0.0.1:7443"]);
    }
}
