//! `outpost-agent`: the Outpost worker agent.
//!
//! It dials out to the control plane over mTLS gRPC (`session`), accepts the
//! leases pushed to it, runs each job in a sandboxed Docker container
//! (`executor`), streams the output back as acknowledged log chunks
//! (`runtime`), and drains on SIGTERM. Wire types are converted in `wire` only.

pub mod aws;
pub mod config;
pub mod executor;
pub mod iac;
pub mod job;
pub mod policy;
pub mod runtime;
pub mod session;
pub mod spool;
pub mod statedir;
pub mod units;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::AgentConfig;
use crate::executor::{DockerExecutor, ExecError};
use crate::runtime::{Runtime, RuntimeLimits};
use crate::spool::{Spool, SpoolError};

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the state directory is not usable")]
    StateDir(#[source] statedir::StateDirError),
    #[error("the log spool is not usable")]
    Spool(#[source] SpoolError),
    #[error("the Docker engine is not usable")]
    Docker(#[source] ExecError),
    #[error("the agent's policy is not usable")]
    Policy(#[source] policy::PolicyError),
    #[error("the agent's iac settings are not usable")]
    Iac(#[source] iac::IacError),
    #[error("the control plane endpoint is not usable")]
    Endpoint(#[source] session::SessionError),
}

/// Signals that stop the agent.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop taking leases, let running jobs finish within the drain grace.
    pub drain: CancellationToken,
    /// Stop running jobs now (one SIGINT, then SIGKILL), report, exit.
    pub force: CancellationToken,
    /// Stop like a restart: close the session and return at once, leaving
    /// running jobs' containers to the next run of this agent on the same
    /// `state_dir`, which re-adopts them (as after a crash). Their tasks
    /// still run in this process: the caller exits it right after.
    pub detach: CancellationToken,
}

/// Runs the agent until it has drained. `ready` is called once the agent is
/// really ready (Docker checked, leftovers cleaned, connecting).
pub async fn run(
    cfg: AgentConfig,
    shutdown: Shutdown,
    ready: impl FnOnce(),
) -> Result<(), AgentError> {
    // Private (0700) and ours alone until this function returns.
    let _lock = statedir::lock(&cfg.state_dir).map_err(AgentError::StateDir)?;
    let spool_dir = cfg.state_dir.join("spool");
    statedir::private_dir(&spool_dir).map_err(AgentError::StateDir)?;
    let spool = Spool::open(&spool_dir, cfg.spool_max_bytes, cfg.spool_segment_bytes)
        .map_err(AgentError::Spool)?;
    let recovered = spool.recover().map_err(AgentError::Spool)?;
    let check = policy::lease_check(&cfg).map_err(AgentError::Policy)?;
    let mut cfg = cfg;
    cfg.sandbox.allow_egress = cfg.policy.allow_egress;
    let executor = DockerExecutor::connect(cfg.sandbox.clone())
        .await
        .map_err(AgentError::Docker)?;
    let cfg = Arc::new(cfg);
    let rt = Runtime::with_check(
        Arc::new(executor),
        spool,
        RuntimeLimits {
            capacity: cfg.capacity,
            log_buffer: cfg.log_buffer_bytes,
            spool_full_timeout: cfg.spool_full_timeout,
            stop_grace: cfg.sandbox.stop_grace,
        },
        Some(check),
    );
    // Re-adopt what a previous run of this agent left running, then remove
    // every other container carrying our labels.
    let _ = rt.aws.set(Arc::new(aws::AwsAgent::new(cfg.aws.clone())));
    // IaC calls (source blobs, plan reports) use the agent's own mTLS
    // identity on a lazily dialled channel: still outbound only.
    let iac_channel = session::endpoint(&cfg)
        .map_err(AgentError::Endpoint)?
        .connect_lazy();
    let iac_agent = iac::IacAgent::new(&cfg.iac, iac_channel).map_err(AgentError::Iac)?;
    let _ = rt.iac.set(Arc::new(iac_agent));
    let adopted = rt.restore(recovered).await;
    match rt.executor.cleanup_orphans_except(&adopted).await {
        Ok(0) => {}
        Ok(n) => info!(containers = n, "removed containers left by an earlier run"),
        Err(e) => warn!(error = %e, "could not clean up containers left by an earlier run"),
    }
    let stop = CancellationToken::new();

    let session = tokio::spawn(
        session::maintain(
            cfg.clone(),
            rt.clone(),
            shutdown.drain.clone(),
            stop.clone(),
        )
        .instrument(info_span!("session")),
    );
    let fencer = {
        let rt = rt.clone();
        let stop = stop.clone();
        tokio::spawn(
            async move {
                let mut tick: u64 = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    tick += 1;
                    if tick.is_multiple_of(4) {
                        rt.sync_spools();
                    }
                    for k in rt.fence_expired() {
                        warn!(job = %k.job_id, epoch = k.epoch, "lease could not be renewed; stopping the job");
                    }
                }
            }
            .instrument(info_span!("fencer")),
        )
    };
    info!(capacity = cfg.capacity, server = %cfg.server, "agent ready");
    ready();

    tokio::select! {
        _ = shutdown.drain.cancelled() => {}
        _ = shutdown.force.cancelled() => {}
        _ = shutdown.detach.cancelled() => {
            rt.start_draining();
            stop.cancel();
            let _ = session.await;
            let _ = fencer.await;
            rt.sync_spools();
            info!(running = rt.len(), "agent stopped; running jobs are left for re-adoption");
            return Ok(());
        }
    }
    rt.start_draining();
    info!(
        running = rt.len(),
        grace_s = cfg.drain_grace.as_secs(),
        "draining"
    );
    let deadline = tokio::time::Instant::now() + cfg.drain_grace;
    let ended = wait_empty(&rt, deadline, &shutdown.force).await;
    if !ended {
        warn!(running = rt.len(), "interrupting the jobs still running");
        rt.cancel_all("stopped: the agent was shut down before the job finished");
        // The executor sends one SIGINT, then SIGKILL after its grace; allow
        // time to report the final states afterwards.
        let report = cfg.sandbox.stop_grace + Duration::from_secs(30);
        if !wait_empty(
            &rt,
            tokio::time::Instant::now() + report,
            &CancellationToken::new(),
        )
        .await
        {
            warn!(
                unreported = rt.len(),
                "exiting with final states not yet acknowledged by the control plane"
            );
        }
    }
    stop.cancel();
    rt.tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), rt.tracker.wait()).await;
    let _ = session.await;
    let _ = fencer.await;
    rt.executor.shutdown().await;
    info!("agent stopped");
    Ok(())
}

/// Waits until the agent holds no job, `deadline` passes or `force` fires.
async fn wait_empty(
    rt: &Runtime,
    deadline: tokio::time::Instant,
    force: &CancellationToken,
) -> bool {
    loop {
        let gone = rt.gone.notified();
        if rt.is_empty() {
            return true;
        }
        tokio::select! {
            _ = gone => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::time::sleep_until(deadline) => return rt.is_empty(),
            _ = force.cancelled() => return rt.is_empty(),
        }
    }
}
