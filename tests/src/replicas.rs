//! Several `outpost server` processes (replicas) over one PostgreSQL
//! database, with one PKI, for the tests of failover and of dispatch across
//! replicas. Each replica is a real process (so a test can `SIGKILL` it)
//! with a state directory of its own holding a copy of the PKI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost::client::{ClientConfig, StateDir};
use outpost::identity::Role;
use outpost_proto::admin::v1 as admin;
use outpost_proto::admin::v1::admin_service_client::AdminServiceClient;
use outpost_proto::agent::v1 as pb;
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use outpost_proto::identity::v1 as idpb;
use tonic::transport::Channel;

use crate::{AgentProc, bin, is_final, spawn_agent_process, write_agent_config_at};

/// The key files, under a replica's data directory, that every replica of
/// an installation must share (README: "Several control-plane replicas").
pub const REPLICA_KEYS: [&str; 2] = ["oidc-signing-key.p8", "iac/secrets.key"];

/// Copies the keys of replica `from` that `to` lacks (as an operator
/// would before `to` first starts).
pub fn copy_keys(from: &StateDir, to: &StateDir) -> std::io::Result<()> {
    for key in REPLICA_KEYS {
        let (src, dst) = (from.data_dir().join(key), to.data_dir().join(key));
        if src.exists() && !dst.exists() {
            if let Some(dir) = dst.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// One replica process.
pub struct Replica {
    pub state: StateDir,
    pub url: String,
    pub log: PathBuf,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replicas of one installation over the database at `db_url`.
pub struct Replicas {
    pub dir: tempfile::TempDir,
    /// The installation's PKI and admin certificate.
    pub base: StateDir,
    pub db_url: String,
    pub lease_ttl: &'static str,
    replicas: Vec<Option<Replica>>,
}

impl Replicas {
    /// Starts `n` replicas over `db_url` (lease TTL `lease_ttl`, e.g. `"10s"`);
    /// returns once each answers admin calls.
    pub async fn start(n: usize, db_url: &str, lease_ttl: &'static str) -> Replicas {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = StateDir::new(dir.path().join("base"));
        std::fs::create_dir_all(&base.root).expect("base dir");
        outpost::dev::ensure_pki(&base).expect("pki");
        let mut r = Replicas {
            dir,
            base,
            db_url: db_url.to_string(),
            lease_ttl,
            replicas: Vec::new(),
        };
        for i in 0..n {
            r.replicas.push(None);
            r.spawn(i).await;
        }
        r
    }

    /// Starts one more replica.
    pub async fn add_replica(&mut self) {
        self.replicas.push(None);
        self.spawn(self.replicas.len() - 1).await;
    }

    /// Starts replica `i` (again, after a kill: on a new port).
    pub async fn spawn(&mut self, i: usize) {
        let state = StateDir::new(self.dir.path().join(format!("r{i}")));
        std::fs::create_dir_all(&state.root).expect("replica dir");
        let _ = std::fs::remove_file(state.addr_file());
        copy_dir(&self.base.pki().dir, &state.pki().dir);
        // Every replica of one installation holds the same keys: those the
        // first replica created, copied as an operator would.
        if i > 0 {
            copy_keys(&StateDir::new(self.dir.path().join("r0")), &state)
                .expect("copy the first replica's keys");
        }
        let log = state.root.join("server.log");
        let child = Command::new(bin("outpost"))
            .arg("--state-dir")
            .arg(&state.root)
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--lease-ttl",
                self.lease_ttl,
            ])
            .env("OUTPOST_STORE", &self.db_url)
            .env("OUTPOST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("replica log"),
            )
            .spawn()
            .expect("spawn outpost server");
        let mut replica = Replica {
            state,
            url: String::new(),
            log,
            child,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        replica.url = loop {
            if let Ok(url) = std::fs::read_to_string(replica.state.addr_file()) {
                break url;
            }
            if let Ok(Some(st)) = replica.child.try_wait() {
                panic!("replica {i} exited ({st}):\n{}", read(&replica.log));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {i} wrote no address in 60s:\n{}",
                read(&replica.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.replicas[i] = Some(replica);
        loop {
            if let Ok(mut c) = self.client_config(i).connect().await
                && c.list_agents(admin::ListAgentsRequest {}).await.is_ok()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {i} does not answer:\n{}",
                self.log_text(i)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn replica(&self, i: usize) -> &Replica {
        self.replicas[i].as_ref().expect("replica running")
    }

    pub fn url(&self, i: usize) -> String {
        self.replica(i).url.clone()
    }

    pub fn log_text(&self, i: usize) -> String {
        self.replicas[i]
            .as_ref()
            .map(|r| read(&r.log))
            .unwrap_or_default()
    }

    /// Kills replica `i` with `SIGKILL` (no shutdown at all).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut r) = self.replicas[i].take() {
            r.child.kill().expect("kill replica");
            let _ = r.child.wait();
        }
    }

    pub fn client_config(&self, i: usize) -> ClientConfig {
        ClientConfig::from_state(&self.base, Some(self.url(i))).expect("client config")
    }

    pub async fn client(&self, i: usize) -> AdminServiceClient<Channel> {
        self.client_config(i)
            .connect()
            .await
            .expect("admin connects")
    }

    /// The operator's identity API on replica `i`.
    pub async fn identity_admin(
        &self,
        i: usize,
    ) -> idpb::identity_admin_client::IdentityAdminClient<Channel> {
        idpb::identity_admin_client::IdentityAdminClient::new(
            self.client_config(i)
                .channel()
                .await
                .expect("admin channel"),
        )
    }

    /// Enrols `name` with `token` through replica `i`, as an agent would.
    pub async fn enroll(
        &self,
        i: usize,
        token: &str,
        name: &str,
    ) -> Result<crate::identity::Enrolled, tonic::Status> {
        let dir = self.dir.path().join("enrolled").join(name);
        crate::identity::enroll_at(&self.url(i), &self.base.pki().ca_cert(), token, name, &dir)
            .await
    }

    /// A scripted session on replica `i` with the certificate in `cert`
    /// and `key`.
    pub async fn raw_agent_as(
        &self,
        i: usize,
        cert: &Path,
        key: &Path,
        hello: pb::Hello,
    ) -> Result<crate::RawAgent, tonic::Status> {
        crate::raw_session(&self.url(i), &self.base.pki().ca_cert(), cert, key, hello).await
    }

    /// Submits `spec` through replica `i`.
    pub async fn submit(&self, i: usize, spec: pb::JobSpec) -> String {
        self.client(i)
            .await
            .submit_job(admin::SubmitJobRequest { spec: Some(spec) })
            .await
            .expect("submit")
            .into_inner()
            .job_id
    }

    /// Polls replica `i` until the job is final (bounded).
    pub async fn wait_final(&self, i: usize, id: &str, limit: Duration) -> admin::Job {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(mut c) = self.client_config(i).connect().await
                && let Ok(j) = c.get_job(admin::GetJobRequest { job_id: id.into() }).await
                && is_final(j.get_ref())
            {
                return j.into_inner();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} not final in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The whole stored log of attempt `epoch` of a job, read through `i`.
    pub async fn logs(&self, i: usize, id: &str, epoch: u64) -> Vec<u8> {
        crate::stored_log(self.client(i).await, id, epoch).await
    }

    /// Writes agent `name`'s config: it dials the replicas `order` in turn.
    pub fn agent_config(&self, name: &str, capacity: u32, order: &[usize]) -> PathBuf {
        self.agent_config_with(name, capacity, order, "")
    }

    /// [`Replicas::agent_config`] with `extra` TOML (tables such as `[iac]`).
    pub fn agent_config_with(
        &self,
        name: &str,
        capacity: u32,
        order: &[usize],
        extra: &str,
    ) -> PathBuf {
        let urls: Vec<String> = order.iter().map(|&i| self.url(i)).collect();
        let rest: Vec<String> = urls[1..].iter().map(|u| format!("{u:?}")).collect();
        write_agent_config_at(
            &self.base,
            self.dir.path(),
            &urls[0],
            name,
            capacity,
            &format!("servers = [{}]\n{extra}", rest.join(", ")),
            "",
        )
    }

    /// A client of the stacks' API on replica `i`, with the admin
    /// certificate of `name` (issued by the installation's CA on first use).
    pub async fn iac(&self, i: usize, name: &str) -> IacAdminClient<Channel> {
        let pki = self.base.pki();
        let paths = pki.issued(Role::Admin, name);
        if !paths.cert.exists() {
            pki.issue(Role::Admin, name).expect("issue admin cert");
        }
        let cfg = ClientConfig {
            cert: paths.cert,
            key: paths.key,
            ..self.client_config(i)
        };
        IacAdminClient::new(cfg.channel().await.expect("the admin channel"))
    }

    /// Starts agent `name` with `config`; returns once replica `i` lists it
    /// as connected.
    pub async fn spawn_agent(&self, i: usize, name: &str, config: &Path) -> AgentProc {
        let proc = spawn_agent_process(name, config);
        self.wait_agent_connected(i, name, Duration::from_secs(30))
            .await;
        proc
    }

    /// Waits (bounded) until agent `name`'s session is on replica `i`.
    pub async fn wait_agent_connected(&self, i: usize, name: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(mut c) = self.client_config(i).connect().await
                && let Ok(r) = c.list_agents(admin::ListAgentsRequest {}).await
                && r.into_inner()
                    .agents
                    .iter()
                    .any(|a| a.agent_id == name && a.connected)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {name} not connected to replica {i} in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Copies the directory tree `from` into `to` (created if needed).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("dir entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}
