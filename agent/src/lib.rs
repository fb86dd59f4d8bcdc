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
pub mod identity;
pub mod job;
pub mod lifecycle;
pub mod netns;
pub mod observe;
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
    #[error(
        "no Docker engine socket at {path}: this node runs no Docker engine (containerd-only \
         Kubernetes nodes cannot host the agent; run it where dockerd runs, or set DOCKER_HOST)"
    )]
    NoDockerSocket { path: std::path::PathBuf },
    #[error("the Docker engine is not usable")]
    Docker(#[source] ExecError),
    #[error("the metrics endpoint cannot start")]
    Metrics(#[source] observe::http::HttpError),
    #[error("failed to write {path}")]
    WriteState {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the EC2 lifecycle handling is not usable")]
    Lifecycle(#[source] lifecycle::LifecycleError),
    #[error("the agent's policy is not usable")]
    Policy(#[source] policy::PolicyError),
    #[error("the agent's iac settings are not usable")]
    Iac(#[source] iac::IacError),
    #[error("the control plane endpoint is not usable")]
    Endpoint(#[source] session::SessionError),
    #[error("the agent has no usable identity")]
    Identity(#[source] identity::IdentityError),
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

/// The Docker engine's Unix socket the agent will use (`DOCKER_HOST` or the
/// default), if it is a Unix socket at all.
fn docker_socket() -> Option<std::path::PathBuf> {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => h.strip_prefix("unix://").map(std::path::PathBuf::from),
        _ => Some(std::path::PathBuf::from("/var/run/docker.sock")),
    }
}

/// Runs the agent until it has drained. `ready` is called once the agent is
/// really ready: Docker answered, leftovers are cleaned and the first
/// session with the control plane is up (systemd gets `READY=1` then too).
pub async fn run(
    cfg: AgentConfig,
    shutdown: Shutdown,
    ready: impl FnOnce(),
) -> Result<(), AgentError> {
    // Private (0700) and ours alone until this function returns.
    let _lock = statedir::lock(&cfg.state_dir).map_err(AgentError::StateDir)?;
    let notify = lifecycle::systemd::Notifier::from_env();
    // The operator's endpoint first: a taken address is a clear error before
    // anything else starts.
    let metrics_listener = match &cfg.metrics_listen {
        Some(addr) => Some(
            observe::http::bind(addr)
                .await
                .map_err(AgentError::Metrics)?,
        ),
        None => None,
    };
    if let Some(path) = docker_socket()
        && !path.exists()
    {
        return Err(AgentError::NoDockerSocket { path });
    }
    write_state(
        &cfg.state_dir.join("agent.pid"),
        &std::process::id().to_string(),
    )?;
    let spool_dir = cfg.state_dir.join("spool");
    statedir::private_dir(&spool_dir).map_err(AgentError::StateDir)?;
    let spool = Spool::open(&spool_dir, cfg.spool_max_bytes, cfg.spool_segment_bytes)
        .map_err(AgentError::Spool)?;
    let recovered = spool.recover().map_err(AgentError::Spool)?;
    let check = policy::lease_check(&cfg).map_err(AgentError::Policy)?;
    let mut cfg = cfg;
    cfg.sandbox.allow_egress = cfg.policy.allow_egress;
    notify.status("checking the Docker engine");
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
    let metrics = rt.metrics.clone();
    metrics.set_docker_ok(true);
    metrics.tick();
    let ec2 = match &cfg.asg {
        Some(asg) => Some(Arc::new(
            lifecycle::Ec2Lifecycle::new(asg.clone(), metrics.clone())
                .map_err(AgentError::Lifecycle)?,
        )),
        None => None,
    };
    // Re-adopt what a previous run of this agent left running, then remove
    // every other container carrying our labels.
    let _ = rt.aws.set(Arc::new(
        aws::AwsAgent::new(cfg.aws.clone()).with_metrics(metrics.clone()),
    ));
    // IaC calls (source blobs, plan reports) use the agent's own mTLS
    // identity on a lazily dialled channel: still outbound only.
    // An enrolling agent gets its certificate before anything dials with it.
    let ident = identity::Identity::new(&cfg);
    if let Some(id) = &ident {
        id.ensure().await.map_err(AgentError::Identity)?;
    }
    // The IaC calls follow the session to whichever control plane replica
    // it is on, and each renewed certificate.
    let (iac_route, iac_channel) = session::IacRoute::new(&cfg).map_err(AgentError::Endpoint)?;
    let iac_agent = iac::IacAgent::new(&cfg.iac, iac_channel).map_err(AgentError::Iac)?;
    let _ = rt.iac.set(Arc::new(iac_agent));
    let adopted = rt.restore(recovered).await;
    match rt.executor.cleanup_orphans_except(&adopted).await {
        Ok(0) => {}
        Ok(n) => info!(containers = n, "removed containers left by an earlier run"),
        Err(e) => {
            metrics.docker_error();
            warn!(error = %e, "could not clean up containers left by an earlier run")
        }
    }
    let stop = CancellationToken::new();

    let endpoint = metrics_listener.map(|listener| {
        let addr = listener.local_addr().ok();
        let source = Arc::new(Exposition {
            rt: rt.clone(),
            stall_after: Duration::from_secs(30),
        });
        if let Some(addr) = addr {
            info!(%addr, "serving /metrics and /healthz");
            if let Err(e) = write_state(&cfg.state_dir.join("metrics.addr"), &addr.to_string()) {
                warn!(error = %e, "could not record the metrics address");
            }
        }
        tokio::spawn(
            observe::http::serve(listener, source, stop.clone()).instrument(info_span!("metrics")),
        )
    });
    let session = tokio::spawn(
        session::maintain(
            session::Link {
                cfg: cfg.clone(),
                rt: rt.clone(),
                ident,
                iac: iac_route,
            },
            shutdown.drain.clone(),
            stop.clone(),
        )
        .instrument(info_span!("session")),
    );
    let watcher = ec2.clone().map(|ec2| {
        let drain = shutdown.drain.clone();
        let stop = stop.clone();
        tokio::spawn(async move { ec2.watch(drain, stop).await }.instrument(info_span!("ec2")))
    });
    let notify = Arc::new(notify);
    // The live loop: self-fencing, spool syncs, health, watchdog, status.
    let fencer = {
        let rt = rt.clone();
        let stop = stop.clone();
        let notify = notify.clone();
        tokio::spawn(
            async move {
                let mut tick: u64 = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    tick += 1;
                    rt.metrics.tick();
                    notify.watchdog();
                    if tick.is_multiple_of(4) {
                        rt.sync_spools();
                        notify.status(&status_line(&rt));
                    }
                    for k in rt.fence_expired() {
                        warn!(job = %k.job_id, epoch = k.epoch, "lease could not be renewed; stopping the job");
                    }
                }
            }
            .instrument(info_span!("fencer")),
        )
    };

    // Ready once the first session is up (or never, if asked to stop first).
    let mut connected = metrics.connected();
    tokio::select! {
        _ = connected.wait_for(|up| *up) => {
            info!(capacity = cfg.capacity, server = %cfg.server, "agent ready");
            notify.ready(&status_line(&rt));
            ready();
        }
        _ = shutdown.drain.cancelled() => {}
        _ = shutdown.force.cancelled() => {}
    }

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
    notify.stopping(&status_line(&rt));
    info!(
        running = rt.len(),
        grace_s = cfg.drain_grace.as_secs(),
        "draining"
    );
    let heartbeats = CancellationToken::new();
    let hook_beats = ec2.clone().map(|ec2| {
        let done = heartbeats.clone();
        tokio::spawn(async move { ec2.heartbeats(done).await }.instrument(info_span!("ec2")))
    });
    let deadline = tokio::time::Instant::now() + cfg.drain_grace;
    let ended = wait_empty(&rt, deadline, &shutdown.force, &notify).await;
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
            &notify,
        )
        .await
        {
            warn!(
                unreported = rt.len(),
                "exiting with final states not yet acknowledged by the control plane"
            );
        }
    }
    heartbeats.cancel();
    if let Some(h) = hook_beats {
        let _ = h.await;
    }
    if let Some(ec2) = &ec2
        && ec2.termination().is_some()
    {
        notify.status("drained; completing the lifecycle hook");
        notify.extend_timeout(Duration::from_secs(150));
        ec2.complete(Duration::from_secs(120)).await;
    }
    stop.cancel();
    rt.tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), rt.tracker.wait()).await;
    let _ = session.await;
    let _ = fencer.await;
    rt.executor.shutdown().await;
    if let Some(w) = watcher {
        let _ = w.await;
    }
    if let Some(e) = endpoint {
        let _ = e.await;
    }
    let _ = std::fs::remove_file(cfg.state_dir.join("agent.pid"));
    info!("agent stopped");
    Ok(())
}

/// Writes a small state file, `0600` whatever the umask, like every file
/// in the state directory.
fn write_state(path: &std::path::Path, text: &str) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        })
        .map_err(|source| AgentError::WriteState {
            path: path.to_path_buf(),
            source,
        })
}

/// The one-line state systemd shows (`STATUS=`).
fn status_line(rt: &Runtime) -> String {
    let jobs = match rt.len() {
        1 => "1 job".to_string(),
        n => format!("{n} jobs"),
    };
    if rt.is_draining() {
        format!("draining: {jobs} running")
    } else if rt.metrics.is_connected() {
        format!("connected; {jobs} running")
    } else {
        format!("reconnecting to the control plane; {jobs} running")
    }
}

/// What the operator's endpoint serves.
struct Exposition {
    rt: Arc<Runtime>,
    /// `/healthz` fails once the live loop has not turned for this long.
    stall_after: Duration,
}

impl observe::http::Source for Exposition {
    fn metrics(&self) -> futures::future::BoxFuture<'static, String> {
        let text = self.rt.metrics.render(observe::Gauges {
            running_jobs: self.rt.len() as u64,
            spool_bytes: self.rt.spool_bytes(),
            draining: self.rt.is_draining(),
        });
        Box::pin(std::future::ready(text))
    }

    fn health(&self) -> observe::http::Health {
        let since = self.rt.metrics.since_tick();
        let ok = since < self.stall_after;
        let body = serde_json::json!({
            "status": if ok { "ok" } else { "stalled" },
            "connected": self.rt.metrics.is_connected(),
            "draining": self.rt.is_draining(),
            "running_jobs": self.rt.len(),
            "live_loop_ms_ago": since.as_millis() as u64,
        });
        observe::http::Health {
            ok,
            body: format!("{body}\n"),
        }
    }
}

/// Waits until the agent holds no job, `deadline` passes or `force` fires.
/// While jobs remain, systemd is told every few seconds that stopping takes
/// a little longer (`EXTEND_TIMEOUT_USEC`), so a hung agent is still killed.
async fn wait_empty(
    rt: &Runtime,
    deadline: tokio::time::Instant,
    force: &CancellationToken,
    notify: &lifecycle::systemd::Notifier,
) -> bool {
    let mut extended: Option<tokio::time::Instant> = None;
    loop {
        let gone = rt.gone.notified();
        if rt.is_empty() {
            return true;
        }
        if extended.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            notify.extend_timeout(Duration::from_secs(30));
            notify.status(&status_line(rt));
            extended = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            _ = gone => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::time::sleep_until(deadline) => return rt.is_empty(),
            _ = force.cancelled() => return rt.is_empty(),
        }
    }
}
