//! How the agent's life is tied to what runs it: the systemd notification
//! protocol (`systemd`), and on an EC2 Auto Scaling group the termination
//! lifecycle hook the agent completes itself (`imds`, `asg`, here).
//!
//! EC2: a watcher polls IMDSv2 for the instance's target lifecycle state and
//! the spot interruption notice. On `Terminated` (or a notice) it starts the
//! drain; while jobs finish the agent sends lifecycle heartbeats; once
//! drained it completes the hook (CONTINUE), retrying until the hook's own
//! timeout would end it anyway. IMDS unreachable at start: the agent says so
//! once and runs on without lifecycle handling.

pub mod asg;
pub mod drain;
pub mod imds;
pub mod systemd;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::observe::Metrics;
use asg::{AutoScaling, Hook};
use imds::Imds;

/// Errors of the lifecycle integrations.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("invalid [asg] configuration: {0}")]
    Config(String),
    #[error("instance metadata at {endpoint}: {message}")]
    Imds { endpoint: String, message: String },
    #[error("auto scaling {call} failed: {message}")]
    AutoScaling { call: &'static str, message: String },
}

/// `[asg]`: the Auto Scaling group whose termination hook the agent completes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsgConfig {
    /// The instance's Auto Scaling group.
    pub group_name: String,
    /// The group's `autoscaling:EC2_INSTANCE_TERMINATING` hook.
    pub hook_name: String,
    /// Region of the Auto Scaling API (default: the instance's, from IMDS).
    #[serde(default)]
    pub region: Option<String>,
    /// The instance metadata service (IMDSv2).
    #[serde(default = "default_imds")]
    pub imds_endpoint: String,
    /// Auto Scaling API endpoint (default: the region's; a VPC endpoint or a test server).
    #[serde(default)]
    pub autoscaling_endpoint: Option<String>,
    /// How often the lifecycle state and the spot notice are read.
    #[serde(default = "default_poll", with = "crate::units::serde_duration")]
    pub poll_interval: Duration,
    /// How often the hook is extended while jobs finish (below its heartbeat timeout).
    #[serde(default = "default_heartbeat", with = "crate::units::serde_duration")]
    pub heartbeat_interval: Duration,
}

fn default_imds() -> String {
    "http://169.254.169.254".into()
}
fn default_poll() -> Duration {
    Duration::from_secs(5)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(60)
}

impl AsgConfig {
    pub fn validate(&self) -> Result<(), LifecycleError> {
        if self.group_name.trim().is_empty() || self.hook_name.trim().is_empty() {
            return Err(LifecycleError::Config(
                "group_name and hook_name must not be empty".into(),
            ));
        }
        Imds::new(&self.imds_endpoint)?;
        if self.poll_interval < Duration::from_millis(100)
            || self.heartbeat_interval < Duration::from_millis(100)
        {
            return Err(LifecycleError::Config(
                "poll_interval and heartbeat_interval must be at least 100ms".into(),
            ));
        }
        Ok(())
    }
}

/// Why the instance is going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// The group's target lifecycle state is `Terminated` (scale-in, refresh).
    ScaleIn,
    /// A spot interruption notice.
    SpotInterruption,
}

/// The EC2 side of the agent's life.
#[derive(Debug)]
pub struct Ec2Lifecycle {
    cfg: AsgConfig,
    imds: Arc<Imds>,
    metrics: Arc<Metrics>,
    /// Set once the watcher saw the termination (with the hook to complete).
    terminating: OnceLock<(Termination, Hook, AutoScaling)>,
}

impl Ec2Lifecycle {
    pub fn new(cfg: AsgConfig, metrics: Arc<Metrics>) -> Result<Ec2Lifecycle, LifecycleError> {
        let imds = Arc::new(Imds::new(&cfg.imds_endpoint)?);
        Ok(Ec2Lifecycle {
            cfg,
            imds,
            metrics,
            terminating: OnceLock::new(),
        })
    }

    /// Whether the watcher saw the instance being terminated.
    pub fn termination(&self) -> Option<Termination> {
        self.terminating.get().map(|(t, _, _)| *t)
    }

    /// Watches IMDS until the instance is being terminated (then cancels
    /// `drain`) or `stop`. Returns at once, after one warning, if IMDS does
    /// not answer at start.
    pub async fn watch(&self, drain: CancellationToken, stop: CancellationToken) {
        let start = async {
            let instance_id = self.imds.require("/latest/meta-data/instance-id").await?;
            let region = match &self.cfg.region {
                Some(r) => r.clone(),
                None => {
                    self.imds
                        .require("/latest/meta-data/placement/region")
                        .await?
                }
            };
            Ok::<_, LifecycleError>((instance_id.trim().to_string(), region.trim().to_string()))
        };
        let (instance_id, region) = tokio::select! {
            _ = stop.cancelled() => return,
            r = start => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "instance metadata unreachable: EC2 lifecycle handling is off (the agent runs on)");
                    return;
                }
            },
        };
        info!(instance = %instance_id, group = %self.cfg.group_name, hook = %self.cfg.hook_name, "watching the instance's lifecycle state");
        let mut failing = false;
        loop {
            match self.poll().await {
                Ok(Some(t)) => {
                    let hook = Hook {
                        group_name: self.cfg.group_name.clone(),
                        hook_name: self.cfg.hook_name.clone(),
                        instance_id,
                    };
                    let api = AutoScaling::new(
                        self.imds.clone(),
                        region,
                        self.cfg.autoscaling_endpoint.as_deref(),
                    );
                    warn!(reason = ?t, "the instance is being terminated: draining");
                    let _ = self.terminating.set((t, hook, api));
                    drain.cancel();
                    return;
                }
                Ok(None) => failing = false,
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "reading the lifecycle state failed; retrying");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = drain.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
            }
        }
    }

    async fn poll(&self) -> Result<Option<Termination>, LifecycleError> {
        let state = self
            .imds
            .get("/latest/meta-data/autoscaling/target-lifecycle-state")
            .await?;
        if state.as_deref().map(str::trim) == Some("Terminated") {
            return Ok(Some(Termination::ScaleIn));
        }
        if self
            .imds
            .get("/latest/meta-data/spot/instance-action")
            .await?
            .is_some()
        {
            return Ok(Some(Termination::SpotInterruption));
        }
        Ok(None)
    }

    /// While the agent drains after a termination: a lifecycle heartbeat
    /// every `heartbeat_interval` until `done`.
    pub async fn heartbeats(&self, done: CancellationToken) {
        let Some((_, hook, api)) = self.terminating.get() else {
            return;
        };
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.heartbeat_interval) => {}
            }
            match api.heartbeat(hook).await {
                Ok(()) => {
                    self.metrics.lifecycle_heartbeat();
                    debug!("lifecycle hook extended");
                }
                Err(e) => warn!(error = %e, "could not extend the lifecycle hook"),
            }
        }
    }

    /// Completes the hook (CONTINUE) once the agent has drained; retried
    /// with backoff for at most `within`. Returns whether it succeeded.
    pub async fn complete(&self, within: Duration) -> bool {
        let Some((_, hook, api)) = self.terminating.get() else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + within;
        let mut backoff = Duration::from_millis(500);
        loop {
            match api.complete(hook).await {
                Ok(()) => {
                    info!(group = %hook.group_name, hook = %hook.hook_name, "lifecycle hook completed: the instance may terminate");
                    return true;
                }
                Err(e) => {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        warn!(error = %e, "could not complete the lifecycle hook; its timeout will end it");
                        return false;
                    }
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "could not complete the lifecycle hook; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
