//! Retention of final jobs: by age and by count (`outpost server
//! --retain-for`, `--retain-jobs`), applied every few minutes and on demand
//! (`outpost jobs prune`), then the freed space given back to the file
//! system by the store's incremental vacuum, a few hundred pages at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::Hub;
use crate::store::{PruneRule, Pruned, StoreError};

/// How long final jobs (with their logs) are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Delete final jobs that finished longer ago than this; `None`: keep.
    pub max_age: Option<Duration>,
    /// Keep at most this many final jobs (the newest); `None`: no limit.
    pub max_jobs: Option<u64>,
    /// How often the control plane applies it.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            max_jobs: Some(10_000),
            interval: Duration::from_secs(300),
        }
    }
}

impl Retention {
    /// The rule this retention applies.
    pub fn rule(&self) -> PruneRule {
        PruneRule {
            older_than_ms: self.max_age.map(|d| d.as_millis() as u64),
            keep: self.max_jobs,
        }
    }
}

/// Deletes what `rule` selects, then shrinks the store.
pub async fn prune(hub: &Hub, rule: PruneRule) -> Result<Pruned, StoreError> {
    let pruned = hub.store.prune(rule).await?;
    if pruned.jobs > 0 {
        hub.changed();
    }
    hub.store.vacuum().await?;
    Ok(pruned)
}

/// Applies `retention` every `retention.interval` (first a few seconds after
/// the start) until `shutdown`.
pub fn spawn(hub: Arc<Hub>, retention: Retention, shutdown: CancellationToken) {
    if retention.max_age.is_none() && retention.max_jobs.is_none() {
        return;
    }
    tokio::spawn(
        async move {
            let mut wait = Duration::from_secs(5).min(retention.interval);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = retention.interval;
                match prune(&hub, retention.rule()).await {
                    Ok(p) if p.jobs > 0 => {
                        let size = hub.store.size().await.ok().unwrap_or_default();
                        info!(
                            jobs = p.jobs,
                            log_bytes = p.log_bytes,
                            store_bytes = size.bytes,
                            "retention deleted final jobs"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "retention failed"),
                }
            }
            debug!("retention stopped");
        }
        .instrument(info_span!("retention")),
    );
}

/// `outpost server` flags of the retention.
#[derive(clap::Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Delete final jobs (and their logs) this long after they ended; 0: keep.
    #[arg(long, default_value = "30d", value_parser = outpost_agent::units::parse_duration)]
    pub retain_for: Duration,
    /// Keep at most this many final jobs, the newest; 0: no limit.
    #[arg(long, default_value_t = 10_000)]
    pub retain_jobs: u64,
}

impl RetentionArgs {
    pub fn retention(&self) -> Retention {
        Retention {
            max_age: (!self.retain_for.is_zero()).then_some(self.retain_for),
            max_jobs: (self.retain_jobs > 0).then_some(self.retain_jobs),
            ..Retention::default()
        }
    }
}

/// `outpost jobs SUBCOMMAND`.
#[derive(clap::Subcommand, Debug)]
pub enum JobsCommand {
    /// Delete final jobs and their logs now, and shrink the store. Without
    /// options: the server's own retention (`--retain-for`, `--retain-jobs`).
    Prune {
        /// Delete final jobs that ended longer ago than this (e.g. 7d, 0s: all).
        #[arg(long, value_parser = outpost_agent::units::parse_duration)]
        older_than: Option<Duration>,
        /// Keep only this many final jobs, the newest.
        #[arg(long)]
        keep: Option<u64>,
    },
}

type Admin =
    outpost_proto::admin::v1::admin_service_client::AdminServiceClient<tonic::transport::Channel>;

fn size(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn store_line(s: &outpost_proto::admin::v1::StoreStatus) -> String {
    format!(
        "store {} ({} free), {} jobs{}",
        size(s.bytes),
        size(s.free_bytes),
        s.jobs,
        if s.incremental_vacuum {
            ""
        } else {
            " (created before incremental vacuum: freed space is reused, the file does not shrink)"
        }
    )
}

pub async fn jobs_command(
    c: &mut Admin,
    cmd: JobsCommand,
) -> anyhow::Result<std::process::ExitCode> {
    use outpost_proto::admin::v1 as admin;
    let JobsCommand::Prune { older_than, keep } = cmd;
    let r = c
        .prune_jobs(admin::PruneJobsRequest {
            older_than_ms: older_than.map(|d| d.as_millis() as u64),
            keep,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!(
        "deleted {} jobs ({} of logs); {}",
        r.jobs_deleted,
        size(r.log_bytes_deleted),
        r.store.as_ref().map(store_line).unwrap_or_default()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn status_command(c: &mut Admin) -> anyhow::Result<std::process::ExitCode> {
    use outpost_proto::admin::v1 as admin;
    let s = c
        .get_status(admin::GetStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!("version {}", s.version);
    println!("{}", s.store.as_ref().map(store_line).unwrap_or_default());
    let age = match s.retain_for_ms {
        0 => "at any age".to_string(),
        ms if ms % 86_400_000 == 0 => format!("for {}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("for {}h", ms / 3_600_000),
        ms => format!("for {}s", ms / 1000),
    };
    let count = if s.retain_jobs == 0 {
        "any number".to_string()
    } else {
        s.retain_jobs.to_string()
    };
    println!("retention: final jobs kept {age}, at most {count}");
    println!("connected agents {}", s.connected_agents);
    Ok(std::process::ExitCode::SUCCESS)
}
