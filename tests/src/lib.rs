//! Shared harness for the end-to-end tests: a real control plane, real agents,
//! a real Docker engine and real mTLS with certificates generated per test.

pub mod bench;
pub mod ec2;
pub mod faults;
pub mod iac;
pub mod identity;
pub mod moto;
pub mod pg;
mod procs;
mod raw;
pub mod replicas;
pub mod sandbox_helpers;
pub mod webhook;

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost::client::{ClientConfig, StateDir};
use outpost::hub::LeaseTiming;
use outpost_proto::admin::v1 as admin;
use outpost_proto::admin::v1::admin_service_client::AdminServiceClient;
use outpost_proto::agent::v1 as pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use outpost::dev::RUNNER_IMAGE;
pub use procs::*;
pub use raw::*;

/// A control plane running in this process.
pub struct Server {
    pub addr: std::net::SocketAddr,
    /// Its `/metrics` and `/healthz` (plain HTTP, loopback).
    pub metrics_addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), outpost::server::ServerError>>,
}

/// An agent running in this process.
pub struct Agent {
    pub shutdown: outpost_agent::Shutdown,
    pub task: JoinHandle<Result<(), outpost_agent::AgentError>>,
}

impl Agent {
    /// Stops the agent (drain, then force) and waits for it to exit; panics
    /// with the agent's error, or if it does not exit within 60 s.
    pub async fn stop(mut self) {
        self.shutdown.drain.cancel();
        self.shutdown.force.cancel();
        match tokio::time::timeout(Duration::from_secs(60), &mut self.task).await {
            Err(_) => {
                self.task.abort();
                panic!("the agent did not stop within 60s of being told to");
            }
            Ok(Err(e)) => panic!("the agent's task failed: {e}"),
            Ok(Ok(Err(e))) => panic!("the agent stopped with an error: {}", error_chain(&e)),
            Ok(Ok(Ok(()))) => {}
        }
    }
}

/// `error: cause: cause ...` of an error and its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// What the TLS layer said somewhere in `e`'s chain: the message of each
/// `rustls::Error` in it, including those the I/O layer carries as an
/// `io::Error` payload (a local verification failure, or an alert the peer
/// sent). Compare with `rustls::Error::...to_string()`.
pub fn tls_messages(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            out.push(t.to_string());
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            out.push(inner.to_string());
            out.extend(tls_messages(inner));
        }
        next = err.source();
    }
    out
}

/// A `tracing` writer keeping everything written to it, for tests that
/// search what a component logged.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// One isolated installation: its own PKI, store and agents.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub state: StateDir,
    pub server: Option<Server>,
    pub timing: LeaseTiming,
    /// Retention of the control plane (applied at its next start).
    pub retention: outpost::retention::Retention,
    /// Lifetime of enrolled agents' certificates (applied at its next start).
    pub identity: outpost::enroll::IdentityConfig,
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_with(LeaseTiming {
            ttl: Duration::from_secs(20),
            heartbeat: Duration::from_secs(2),
            sweep: Duration::from_millis(200),
        })
        .await
    }

    pub async fn start_with(timing: LeaseTiming) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("state"));
        std::fs::create_dir_all(&state.root).expect("state dir");
        outpost::dev::ensure_pki(&state).expect("pki");
        let mut c = Cluster {
            dir,
            state,
            server: None,
            timing,
            retention: outpost::retention::Retention::default(),
            identity: outpost::enroll::IdentityConfig::default(),
        };
        c.start_server("127.0.0.1:0").await;
        c
    }

    async fn start_server(&mut self, bind: &str) {
        let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut cfg =
            outpost::server::ServerConfig::new(self.state.pki().dir, self.state.data_dir());
        cfg.timing = self.timing;
        cfg.retention = self.retention;
        cfg.identity = self.identity;
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind metrics");
        let metrics_addr = metrics.local_addr().expect("metrics addr");
        cfg.metrics = Some(metrics);
        let stop = CancellationToken::new();
        let task = tokio::spawn(outpost::server::run(listener, cfg, stop.clone()));
        std::fs::write(self.state.addr_file(), format!("https://{addr}")).expect("addr file");
        self.server = Some(Server {
            addr,
            metrics_addr,
            stop,
            task,
        });
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.server.as_ref().expect("server").addr)
    }

    /// Stops the control plane (its store stays on disk).
    pub async fn stop_server(&mut self) -> std::net::SocketAddr {
        let s = self.server.take().expect("server running");
        s.stop.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), s.task)
            .await
            .expect("server stops within 20s");
        r.expect("server task").expect("server exits cleanly");
        s.addr
    }

    /// Stops and starts the control plane on the same address.
    pub async fn restart_server(&mut self) {
        let addr = self.stop_server().await;
        self.start_server(&addr.to_string()).await;
    }

    /// Starts the control plane again on `addr`.
    pub async fn start_server_at(&mut self, addr: std::net::SocketAddr) {
        self.start_server(&addr.to_string()).await;
    }

    pub fn agent_config(&self, capacity: u32) -> outpost_agent::config::AgentConfig {
        let mut cfg = outpost::dev::local_agent_config(&self.state, &self.url(), capacity);
        cfg.max_backoff = Duration::from_millis(500);
        cfg.sandbox.stop_grace = Duration::from_secs(2);
        cfg.sandbox.pull = outpost_agent::executor::PullPolicy::Never;
        cfg
    }

    /// Starts the `local` agent with `capacity` slots; returns once it is ready.
    pub async fn start_agent(&self, capacity: u32) -> Agent {
        self.start_agent_with(self.agent_config(capacity)).await
    }

    pub async fn start_agent_with(&self, cfg: outpost_agent::config::AgentConfig) -> Agent {
        let shutdown = outpost_agent::Shutdown::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut task = tokio::spawn(outpost_agent::run(cfg, shutdown.clone(), move || {
            let _ = tx.send(());
        }));
        tokio::select! {
            r = rx => r.expect("the agent reports ready"),
            r = &mut task => match r {
                Ok(Err(e)) => panic!("the agent failed to start: {}", error_chain(&e)),
                r => panic!("the agent ended before it was ready: {r:?}"),
            },
            _ = tokio::time::sleep(Duration::from_secs(30)) => panic!("agent not ready within 30s"),
        }
        Agent { shutdown, task }
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::from_state(&self.state, Some(self.url())).expect("client config")
    }

    pub async fn client(&self) -> AdminServiceClient<Channel> {
        self.client_config()
            .connect()
            .await
            .expect("admin connects")
    }

    pub async fn submit(&self, command: &[&str]) -> String {
        self.submit_spec(spec(command)).await
    }

    pub async fn submit_spec(&self, spec: pb::JobSpec) -> String {
        self.client()
            .await
            .submit_job(admin::SubmitJobRequest { spec: Some(spec) })
            .await
            .expect("submit")
            .into_inner()
            .job_id
    }

    pub async fn job(&self, id: &str) -> admin::Job {
        self.client()
            .await
            .get_job(admin::GetJobRequest { job_id: id.into() })
            .await
            .expect("get job")
            .into_inner()
    }

    /// Polls until the job is final (bounded).
    pub async fn wait_final(&self, id: &str, limit: Duration) -> admin::Job {
        self.wait_state(id, limit, is_final).await
    }

    pub async fn wait_state(
        &self,
        id: &str,
        limit: Duration,
        pred: impl Fn(&admin::Job) -> bool,
    ) -> admin::Job {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(mut c) = self.client_config().connect().await
                && let Ok(j) = c.get_job(admin::GetJobRequest { job_id: id.into() }).await
            {
                let j = j.into_inner();
                if pred(&j) {
                    return j;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("job {id} did not reach the expected state in {limit:?}: {j:?}");
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!("job {id}: control plane unreachable for {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The complete stored log of a job.
    pub async fn logs(&self, id: &str) -> Vec<u8> {
        let mut s = self
            .client()
            .await
            .follow_logs(admin::FollowLogsRequest {
                job_id: id.into(),
                offset: 0,
                follow: false,
                epoch: 0,
            })
            .await
            .expect("logs")
            .into_inner();
        let mut out = Vec::new();
        while let Some(d) = s.message().await.expect("log stream") {
            assert_eq!(d.offset as usize, out.len(), "log data arrives in order");
            out.extend_from_slice(&d.data);
        }
        out
    }
}

pub fn spec(command: &[&str]) -> pb::JobSpec {
    pb::JobSpec {
        image: RUNNER_IMAGE.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn is_final(j: &admin::Job) -> bool {
    !matches!(
        pb::JobState::try_from(j.state),
        Ok(pb::JobState::Queued | pb::JobState::Leased | pb::JobState::Running)
    )
}

pub fn state(j: &admin::Job) -> pb::JobState {
    pb::JobState::try_from(j.state).unwrap_or(pb::JobState::Unspecified)
}

/// Containers carrying `outpost.job=<id>`, running or not.
pub async fn containers_of(job_id: &str) -> Vec<String> {
    let docker = bollard::Docker::connect_with_local_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("docker version");
    let filters: std::collections::HashMap<String, Vec<String>> =
        [("label".to_string(), vec![format!("outpost.job={job_id}")])].into();
    let opts = bollard::query_parameters::ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    docker
        .list_containers(Some(opts))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Path of a binary built from this workspace (`cargo build --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Test binaries live in target/<profile>/deps, other binaries beside ours.
    let dir = exe.parent().expect("exe dir");
    let p = [dir.join(name), dir.parent().unwrap_or(dir).join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join(name));
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first (cargo build --bins)",
        p.display()
    );
    p
}

impl Cluster {
    /// Writes the config of agent `name` (certificate issued if missing) and
    /// returns its path. `extra` is appended to the top-level table.
    pub fn write_agent_config(
        &self,
        name: &str,
        capacity: u32,
        extra: &str,
        sandbox_extra: &str,
    ) -> PathBuf {
        write_agent_config_at(
            &self.state,
            self.dir.path(),
            &self.url(),
            name,
            capacity,
            extra,
            sandbox_extra,
        )
    }

    /// Starts `outpost-agent` with `config`; returns once the control plane
    /// lists it as connected.
    pub async fn spawn_agent(&self, name: &str, config: &Path) -> AgentProc {
        let proc = spawn_agent_process(name, config);
        self.wait_agent_connected(name, true, Duration::from_secs(30))
            .await;
        proc
    }

    /// Waits (bounded) until the control plane lists agent `name` in a state
    /// `pred` accepts; panics with what it last listed.
    pub async fn wait_agent(
        &self,
        name: &str,
        limit: Duration,
        pred: impl Fn(&admin::Agent) -> bool,
    ) -> admin::Agent {
        let deadline = tokio::time::Instant::now() + limit;
        let mut seen = None;
        loop {
            if let Ok(mut c) = self.client_config().connect().await
                && let Ok(r) = c.list_agents(admin::ListAgentsRequest {}).await
            {
                let agent = r
                    .into_inner()
                    .agents
                    .into_iter()
                    .find(|a| a.agent_id == name);
                if let Some(a) = agent.as_ref().filter(|a| pred(a)) {
                    return a.clone();
                }
                seen = agent;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {name} did not reach the expected state in {limit:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens an agent session as a scripted agent holding the certificate
    /// of agent `cert_name` (issued if missing), sends `hello` and waits for
    /// the welcome.
    pub async fn raw_agent(
        &self,
        cert_name: &str,
        hello: pb::Hello,
    ) -> Result<RawAgent, tonic::Status> {
        self.raw_agent_with(RawIdentity::Issued(cert_name), hello)
            .await
    }

    /// Opens a scripted agent session with `identity`, sends `hello` and
    /// waits for the welcome. A connection that cannot be made is
    /// `Unavailable` with its cause; what the server refuses is its status.
    pub async fn raw_agent_with(
        &self,
        identity: RawIdentity<'_>,
        hello: pb::Hello,
    ) -> Result<RawAgent, tonic::Status> {
        let pki = self.state.pki();
        let (cert, key) = match identity {
            RawIdentity::Issued(name) => {
                let paths = pki.issued(outpost::identity::Role::Agent, name);
                if !paths.cert.exists() {
                    pki.issue(outpost::identity::Role::Agent, name)
                        .expect("issue agent cert");
                }
                (paths.cert, paths.key)
            }
            RawIdentity::Files { cert, key } => (cert.to_path_buf(), key.to_path_buf()),
        };
        raw_session(&self.url(), &pki.ca_cert(), &cert, &key, hello).await
    }
}

impl Cluster {
    pub async fn wait_agent_connected(&self, name: &str, connected: bool, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(mut c) = self.client_config().connect().await
                && let Ok(r) = c.list_agents(admin::ListAgentsRequest {}).await
                && r.into_inner()
                    .agents
                    .iter()
                    .any(|a| a.agent_id == name && a.connected == connected)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {name} connected={connected} not reached in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Bytes of attempt `epoch` of a job's log.
    pub async fn logs_of_epoch(&self, id: &str, epoch: u64) -> Vec<u8> {
        stored_log(self.client().await, id, epoch).await
    }
}

/// The whole stored log of attempt `epoch` of job `id`, read through `c`.
pub async fn stored_log(mut c: AdminServiceClient<Channel>, id: &str, epoch: u64) -> Vec<u8> {
    let mut s = c
        .follow_logs(admin::FollowLogsRequest {
            job_id: id.into(),
            offset: 0,
            follow: false,
            epoch,
        })
        .await
        .expect("logs")
        .into_inner();
    let mut out = Vec::new();
    while let Some(d) = s.message().await.expect("log stream") {
        out.extend_from_slice(&d.data);
    }
    out
}

/// A job that prints `lines` numbered lines, pausing `pause` seconds (busybox
/// `sleep` fraction) between them, and the exact log it must produce.
pub fn numbered_job(lines: u32, pause: &str) -> (Vec<String>, Vec<u8>) {
    let script = format!(
        "i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo \"line $i of {lines}\"; sleep {pause}; done"
    );
    let expected: String = (1..=lines)
        .map(|i| format!("line {i} of {lines}\n"))
        .collect();
    (
        vec!["sh".into(), "-c".into(), script],
        expected.into_bytes(),
    )
}

/// Every container and network carrying Outpost's job label.
pub async fn all_outpost_containers() -> Vec<String> {
    let docker = bollard::Docker::connect_with_local_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("docker version");
    let filters: std::collections::HashMap<String, Vec<String>> =
        [("label".to_string(), vec!["outpost.job".to_string()])].into();
    docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .expect("list containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}
