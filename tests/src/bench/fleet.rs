//! Many agents: N simulated agent sessions over real mTLS from this process
//! (the wire types of the real agent), heartbeating at the interval the
//! control plane asks for. Measures pickup (submit → lease at the agent)
//! under a steady submission rate, the control plane's memory, threads and
//! idle CPU, and a reconnect storm after a control-plane restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outpost::client::StateDir;
use outpost::identity::Role;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use parking_lot::Mutex;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::procs::{ServerProc, cpu_time, status_field};

/// What one fleet run measured.
#[derive(Debug, Clone, Default)]
pub struct FleetFigures {
    pub agents: usize,
    /// All N sessions open, from the first dial.
    pub connect: Duration,
    pub pickup_p50: Duration,
    pub pickup_p99: Duration,
    /// Jobs never leased within the wait.
    pub pickup_lost: usize,
    pub rss_kb: u64,
    pub rss_idle_kb: u64,
    pub threads: u64,
    /// Cores used while every agent only heartbeats.
    pub idle_cpu: f64,
    /// Restart → all N sessions back.
    pub storm: Duration,
    /// Pickup p99 right after the storm.
    pub storm_pickup_p99: Duration,
}

/// How a fleet run goes.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    pub agents: usize,
    /// Jobs submitted per second while measuring pickup.
    pub rate: u32,
    /// Jobs measured.
    pub jobs: usize,
    /// Idle window for CPU.
    pub idle: Duration,
    pub storm: bool,
}

/// Shared by the simulated agents.
pub(super) struct Shared {
    pub(super) connected: AtomicUsize,
    /// Job → when its lease reached an agent.
    arrivals: Mutex<HashMap<String, Instant>>,
}

impl Shared {
    pub(super) fn new() -> Arc<Shared> {
        Arc::new(Shared {
            connected: AtomicUsize::new(0),
            arrivals: Mutex::new(HashMap::new()),
        })
    }
}

/// Starts one simulated agent per `names` entry; agent `i` dials
/// `urls[i % urls.len()]` (so a fleet splits evenly between replicas) until
/// `stop`.
pub(super) fn spawn_agents(
    names: &[(String, Identity)],
    ca: &Arc<Certificate>,
    urls: &[Arc<Mutex<String>>],
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(!urls.is_empty(), "no control plane to dial");
    // Dial in waves so the listen backlog is not the thing measured.
    let dial = Arc::new(tokio::sync::Semaphore::new(256));
    for (i, (name, identity)) in names.iter().enumerate() {
        let a = SimAgent {
            name: name.clone(),
            identity: identity.clone(),
            ca: ca.clone(),
            url: urls[i % urls.len()].clone(),
            shared: shared.clone(),
            stop: stop.clone(),
            dial: dial.clone(),
        };
        tokio::spawn(a.run());
    }
    Ok(())
}

pub async fn run(plan: &FleetPlan, root: &std::path::Path) -> anyhow::Result<FleetFigures> {
    let state = StateDir::new(root.join(format!("fleet-{}", plan.agents)));
    let server = ServerProc::start(&state, "127.0.0.1:0")?;
    let idle_kb = status_field(server.pid(), "VmRSS").unwrap_or(0);
    let names = issue(&state, plan.agents).await?;
    let tls = Arc::new(tls_base(&state)?);
    let shared = Shared::new();
    let stop = CancellationToken::new();
    let addr = Arc::new(Mutex::new(server.url()));
    let started = Instant::now();
    spawn_agents(&names, &tls, &[addr], &shared, &stop)?;
    let limit = Duration::from_secs(120 + plan.agents as u64 / 50);
    wait_connected(&shared, plan.agents, limit).await?;
    let connect = started.elapsed();
    // Let the first heartbeats of every agent arrive.
    tokio::time::sleep(Duration::from_secs(6).min(plan.idle)).await;

    let cfg = server.client_config()?;
    let (p50, p99, lost) = pickup(&[cfg], &shared, plan.rate, plan.jobs).await?;

    // Idle: only heartbeats.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = cpu_time(server.pid()).unwrap_or_default();
    let t0 = Instant::now();
    tokio::time::sleep(plan.idle).await;
    let c1 = cpu_time(server.pid()).unwrap_or_default();
    let idle_cpu = (c1 - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let rss_kb = status_field(server.pid(), "VmRSS").unwrap_or(0);
    let threads = status_field(server.pid(), "Threads").unwrap_or(0);

    let mut figures = FleetFigures {
        agents: plan.agents,
        connect,
        pickup_p50: p50,
        pickup_p99: p99,
        pickup_lost: lost,
        rss_kb,
        rss_idle_kb: idle_kb,
        threads,
        idle_cpu,
        ..Default::default()
    };

    if plan.storm {
        let listen = server.addr.to_string();
        server.stop()?;
        // Every session noticed: the storm starts from none connected.
        let gone = Instant::now() + Duration::from_secs(60);
        while shared.connected.load(Ordering::Relaxed) > 0 && Instant::now() < gone {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let restarted = Instant::now();
        let server = ServerProc::start(&state, &listen)?;
        wait_connected(&shared, plan.agents, limit).await?;
        figures.storm = restarted.elapsed();
        let (_, p99, _) = pickup(
            &[server.client_config()?],
            &shared,
            plan.rate,
            plan.jobs.min(100),
        )
        .await?;
        figures.storm_pickup_p99 = p99;
        stop.cancel();
        server.stop()?;
    } else {
        stop.cancel();
        server.stop()?;
    }
    Ok(figures)
}

/// Issues `n` agent certificates (in threads: each is a key pair and a
/// signature); returns each agent's name and TLS identity.
pub(super) async fn issue(state: &StateDir, n: usize) -> anyhow::Result<Vec<(String, Identity)>> {
    let pki = state.pki();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunks: Vec<Vec<usize>> = (0..threads)
        .map(|t| (0..n).filter(|i| i % threads == t).collect())
        .collect();
    let mut handles = Vec::new();
    for chunk in chunks {
        let pki = pki.clone();
        handles.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<(String, Identity)>> {
                let mut out = Vec::new();
                for i in chunk {
                    let name = format!("sim-{i:05}");
                    let paths = pki.issued(Role::Agent, &name);
                    if !paths.cert.exists() {
                        pki.issue(Role::Agent, &name)?;
                    }
                    let id =
                        Identity::from_pem(std::fs::read(&paths.cert)?, std::fs::read(&paths.key)?);
                    out.push((name, id));
                }
                Ok(out)
            },
        ));
    }
    let mut all = Vec::new();
    for h in handles {
        let part = tokio::task::spawn_blocking(move || h.join())
            .await?
            .map_err(|_| anyhow::anyhow!("issuing certificates panicked"))??;
        all.extend(part);
    }
    Ok(all)
}

pub(super) fn tls_base(state: &StateDir) -> anyhow::Result<Certificate> {
    Ok(Certificate::from_pem(std::fs::read(state.pki().ca_cert())?))
}

pub(super) async fn wait_connected(
    shared: &Shared,
    n: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while shared.connected.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} agents connected within {limit:?}",
            shared.connected.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A trivial job (the simulated agents only lease it).
pub(super) fn job_spec() -> pb::JobSpec {
    pb::JobSpec {
        image: crate::RUNNER_IMAGE.into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

/// Submits `jobs` jobs at `rate` per second, in turn through each control
/// plane of `cfgs` (replicas of one installation); returns pickup p50, p99
/// and how many were not leased within 60 s of the last submission
/// (counted at the worst latency).
pub(super) async fn pickup(
    cfgs: &[outpost::client::ClientConfig],
    shared: &Arc<Shared>,
    rate: u32,
    jobs: usize,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let mut clients = Vec::new();
    for cfg in cfgs {
        clients.push(cfg.connect().await?);
    }
    anyhow::ensure!(!clients.is_empty(), "no control plane to submit to");
    let submitted: Arc<Mutex<Vec<(String, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    let mut tasks = Vec::new();
    for i in 0..jobs {
        tick.tick().await;
        let mut c = clients[i % clients.len()].clone();
        let submitted = submitted.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = c
                .submit_job(admin::SubmitJobRequest {
                    spec: Some(job_spec()),
                })
                .await;
            if let Ok(r) = r {
                submitted.lock().push((r.into_inner().job_id, t0));
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = {
            let arrivals = shared.arrivals.lock();
            submitted
                .lock()
                .iter()
                .all(|(id, _)| arrivals.contains_key(id))
        };
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arrivals = shared.arrivals.lock();
    let submitted = submitted.lock();
    let mut lat: Vec<Duration> = Vec::new();
    let mut lost = 0;
    for (id, t0) in submitted.iter() {
        match arrivals.get(id) {
            Some(t) => lat.push(t.saturating_duration_since(*t0)),
            None => lost += 1,
        }
    }
    let worst = Duration::from_secs(60);
    lat.extend(std::iter::repeat_n(worst, lost + jobs - submitted.len()));
    lat.sort();
    Ok((quantile(&lat, 0.50), quantile(&lat, 0.99), lost))
}

pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// One simulated agent: capacity 1; ends every lease at once (succeeded).
struct SimAgent {
    name: String,
    identity: Identity,
    ca: Arc<Certificate>,
    url: Arc<Mutex<String>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    dial: Arc<tokio::sync::Semaphore>,
}

impl SimAgent {
    async fn run(self) {
        // As the real agent: jittered exponential backoff, 200 ms to 5 s.
        let mut backoff = Duration::from_millis(200);
        loop {
            let welcomed = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = self.session() => r,
            };
            if welcomed {
                backoff = Duration::from_millis(200);
            }
            let jittered = rand::rng().random_range(backoff / 2..=backoff);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One session; whether it got a welcome.
    async fn session(&self) -> bool {
        let url = self.url.lock().clone();
        let tls = ClientTlsConfig::new()
            .ca_certificate((*self.ca).clone())
            .identity(self.identity.clone())
            .domain_name("localhost");
        let channel = {
            let Ok(_permit) = self.dial.acquire().await else {
                return false;
            };
            let Ok(ep) = Endpoint::from_shared(url) else {
                return false;
            };
            let Ok(ep) = ep.tls_config(tls) else {
                return false;
            };
            match ep.connect_timeout(Duration::from_secs(30)).connect().await {
                Ok(c) => c,
                Err(_) => return false,
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let hello = pb::Hello {
            agent_id: self.name.clone(),
            version: "bench".into(),
            capacity: 1,
            capabilities: vec!["log-ack".into(), "status-ack".into()],
            ..Default::default()
        };
        let msg = |m| pb::AgentMessage { msg: Some(m) };
        if tx
            .send(msg(pb::agent_message::Msg::Hello(hello)))
            .await
            .is_err()
        {
            return false;
        }
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel)
            .max_decoding_message_size(outpost_proto::MAX_MESSAGE_BYTES);
        let Ok(resp) = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        else {
            return false;
        };
        let mut inbound = resp.into_inner();
        let interval = match inbound.message().await {
            Ok(Some(pb::ServerMessage {
                msg: Some(pb::server_message::Msg::Welcome(w)),
            })) => Duration::from_millis(w.heartbeat_interval_ms.max(100)),
            _ => return false,
        };
        self.shared.connected.fetch_add(1, Ordering::Relaxed);
        // Spread the heartbeats over the interval as a real fleet does.
        let first = rand::rng().random_range(Duration::ZERO..interval);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + first, interval);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let hb = pb::Heartbeat { leases: vec![], free_slots: 1 };
                    if tx.send(msg(pb::agent_message::Msg::Heartbeat(hb))).await.is_err() {
                        break;
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(pb::ServerMessage { msg: Some(pb::server_message::Msg::Lease(l)) })) => {
                        self.shared.arrivals.lock().insert(l.job_id.clone(), Instant::now());
                        let st = pb::JobStatus {
                            job_id: l.job_id,
                            epoch: l.epoch,
                            state: pb::JobState::Succeeded as i32,
                            exit_code: Some(0),
                            ..Default::default()
                        };
                        if tx.send(msg(pb::agent_message::Msg::Status(st))).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        self.shared.connected.fetch_sub(1, Ordering::Relaxed);
        true
    }
}
