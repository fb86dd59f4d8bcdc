//! The control plane's stores side by side, in one run: the embedded
//! SQLite store, one replica over PostgreSQL, and two replicas over one
//! PostgreSQL database (they relay queue kicks over LISTEN/NOTIFY). For
//! each set-up:
//!
//! - pickup p50/p99 (submit → lease at a simulated agent) of N simulated
//!   agents over real mTLS, the agents split evenly between the replicas and
//!   the submissions alternating between them;
//! - `SubmitJob` throughput: a fixed count of jobs from concurrent clients
//!   (alternating between the replicas) with no agent connected, so that it
//!   measures the store's write path.
//!
//! PostgreSQL is a throwaway cluster of the harness's own
//! ([`crate::pg::dedicated`], `fsync` on); each PostgreSQL set-up gets a
//! fresh database of it, as SQLite gets a fresh state directory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outpost::client::{ClientConfig, StateDir};
use outpost_proto::admin::v1 as admin;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::fleet::{self, Shared};
use super::procs::{ServerProc, copy_pki};
use crate::pg;

/// How a stores run goes.
#[derive(Debug, Clone)]
pub struct StorePlan {
    pub agents: usize,
    /// Jobs submitted per second while measuring pickup.
    pub rate: u32,
    /// Jobs measured for pickup.
    pub jobs: usize,
    /// Jobs submitted for the throughput.
    pub submits: usize,
    /// Concurrent submitting clients.
    pub clients: usize,
    /// Between all agents connected and the first submission.
    pub settle: Duration,
    /// Fail without PostgreSQL (else measure SQLite only, and say so).
    pub require_pg: bool,
}

/// What one set-up measured.
#[derive(Debug, Clone)]
pub struct SetupFigures {
    /// `sqlite`, `pg 1 replica`, `pg 2 replicas`.
    pub name: &'static str,
    pub pickup_p50: Duration,
    pub pickup_p99: Duration,
    pub pickup_lost: usize,
    /// Jobs per second accepted by `SubmitJob`.
    pub submit_rate: f64,
}

/// Measures every set-up; SQLite first (the baseline of the others).
pub async fn run(plan: &StorePlan, root: &std::path::Path) -> anyhow::Result<Vec<SetupFigures>> {
    let base = StateDir::new(root.join(format!("stores-{}", plan.agents)));
    std::fs::create_dir_all(&base.root)?;
    outpost::dev::ensure_pki(&base)?;
    let names = fleet::issue(&base, plan.agents).await?;
    let ca = Arc::new(fleet::tls_base(&base)?);
    let setup = Setup {
        plan,
        base: &base,
        names: &names,
        ca: &ca,
    };
    let mut out = vec![setup.measure("sqlite", &[None]).await?];
    let cluster = match pg::dedicated().await {
        Ok(c) => c,
        Err(e) if plan.require_pg => {
            anyhow::bail!("the stores section needs PostgreSQL (scripts/setup.sh): {e}")
        }
        Err(e) => {
            eprintln!("stores: PostgreSQL unavailable ({e}); SQLite only");
            return Ok(out);
        }
    };
    let one = cluster.url();
    out.push(setup.measure("pg 1 replica", &[Some(one)]).await?);
    let admin = pg::connect(&cluster.admin_url()).await?;
    admin.batch_execute("CREATE DATABASE outpost_two").await?;
    let two = format!(
        "postgres://{}@127.0.0.1:{}/outpost_two",
        pg::USER,
        cluster.port()
    );
    out.push(
        setup
            .measure("pg 2 replicas", &[Some(two.clone()), Some(two)])
            .await?,
    );
    drop(cluster);
    Ok(out)
}

/// What every set-up shares: one PKI and one set of agent identities.
struct Setup<'a> {
    plan: &'a StorePlan,
    base: &'a StateDir,
    names: &'a [(String, tonic::transport::Identity)],
    ca: &'a Arc<tonic::transport::Certificate>,
}

impl Setup<'_> {
    /// Starts one control plane per `stores` entry (`None`: embedded),
    /// measures pickup with the fleet, then throughput without it.
    async fn measure(
        &self,
        name: &'static str,
        stores: &[Option<String>],
    ) -> anyhow::Result<SetupFigures> {
        let plan = self.plan;
        eprintln!("stores: {name}, {} agents", plan.agents);
        let slug = name.replace(' ', "-");
        let mut servers = Vec::new();
        for (i, store) in stores.iter().enumerate() {
            let state = StateDir::new(self.base.root.join(format!("{slug}-r{i}")));
            copy_pki(self.base, &state)?;
            if i > 0 {
                let first = StateDir::new(self.base.root.join(format!("{slug}-r0")));
                crate::replicas::copy_keys(&first, &state)?;
            }
            servers.push(ServerProc::start_with(
                &state,
                "127.0.0.1:0",
                store.as_deref(),
            )?);
        }
        let cfgs = servers
            .iter()
            .map(ServerProc::client_config)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let urls: Vec<_> = servers
            .iter()
            .map(|s| Arc::new(Mutex::new(s.url())))
            .collect();
        let shared = Shared::new();
        let stop = CancellationToken::new();
        fleet::spawn_agents(self.names, self.ca, &urls, &shared, &stop)?;
        let limit = Duration::from_secs(120 + plan.agents as u64 / 50);
        let connected = fleet::wait_connected(&shared, plan.agents, limit).await;
        if connected.is_ok() {
            tokio::time::sleep(plan.settle).await;
        }
        let pickup = match connected {
            Ok(()) => fleet::pickup(&cfgs, &shared, plan.rate, plan.jobs).await,
            Err(e) => Err(e),
        };
        stop.cancel();
        let (p50, p99, lost) = pickup?;
        wait_disconnected(&cfgs, Duration::from_secs(60)).await;
        let submit_rate = submit_rate(&cfgs, plan.submits, plan.clients).await?;
        for s in servers {
            s.stop()?;
        }
        Ok(SetupFigures {
            name,
            pickup_p50: p50,
            pickup_p99: p99,
            pickup_lost: lost,
            submit_rate,
        })
    }
}

/// Waits (bounded) until no control plane of `cfgs` lists a connected
/// agent, so that the throughput measures submissions alone.
async fn wait_disconnected(cfgs: &[ClientConfig], limit: Duration) {
    let deadline = Instant::now() + limit;
    for cfg in cfgs {
        loop {
            if let Ok(mut c) = cfg.connect().await
                && let Ok(r) = c.list_agents(admin::ListAgentsRequest {}).await
                && !r.into_inner().agents.iter().any(|a| a.connected)
            {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("stores: agents still listed as connected after {limit:?}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Submits `total` jobs from `clients` concurrent clients, each its own
/// connection, client `k` to `cfgs[k % cfgs.len()]`; returns jobs/s. One
/// warm-up submission per client comes first, outside the timing.
async fn submit_rate(cfgs: &[ClientConfig], total: usize, clients: usize) -> anyhow::Result<f64> {
    anyhow::ensure!(!cfgs.is_empty(), "no control plane to submit to");
    let mut conns = Vec::new();
    for k in 0..clients.max(1) {
        let mut c = cfgs[k % cfgs.len()].connect().await?;
        c.submit_job(admin::SubmitJobRequest {
            spec: Some(fleet::job_spec()),
        })
        .await?;
        conns.push(c);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut c in conns {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                c.submit_job(admin::SubmitJobRequest {
                    spec: Some(fleet::job_spec()),
                })
                .await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    let limit = Duration::from_secs(600);
    let deadline = tokio::time::Instant::now() + limit;
    for t in tasks {
        tokio::time::timeout_at(deadline, t)
            .await
            .map_err(|_| anyhow::anyhow!("{total} submissions not done in {limit:?}"))???;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64().max(1e-9))
}
