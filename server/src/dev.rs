//! `outpost dev`: the whole system on one machine. Creates the CA and
//! certificates if absent, builds the runner image if missing, starts the
//! control plane with its embedded store and one local agent; `--demo` also
//! runs a real Terraform init/plan/apply in a sandboxed container and streams
//! its log to the terminal, then the stack workflow (`crate::iac::demo`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use outpost_agent::config::{AgentConfig, TlsConfig};
use outpost_agent::executor::SandboxConfig;
use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::cli::{exit_code_of, state_name, stream_logs, wait_final, wait_for_signal};
use crate::client::{ClientConfig, StateDir};
use crate::identity::Role;

/// The image the demo and the tests run.
pub const RUNNER_IMAGE: &str = "outpost/runner:dev";

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Submit the demo job (Terraform init, plan and apply), stream its log, then exit.
    #[arg(long)]
    pub demo: bool,
    /// Address for the control plane (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Jobs the local agent runs at once (1 to 256).
    #[arg(long, default_value_t = 2)]
    pub capacity: u32,
}

/// Creates the CA, the server certificate, `admin-admin` and `agent-local` if absent.
pub fn ensure_pki(state: &StateDir) -> Result<()> {
    let pki = state.pki();
    if !pki.has_ca() {
        pki.init(&[]).context("failed to create the local CA")?;
    }
    for (role, name) in [(Role::Admin, "admin"), (Role::Agent, "local")] {
        if !pki.issued(role, name).cert.exists() {
            pki.issue(role, name)
                .with_context(|| format!("failed to issue the {} certificate", role.as_str()))?;
        }
    }
    let (key, public) = pool_key_paths(state);
    if !key.exists() {
        outpost_agent::iac::seal::PoolKey::generate()
            .write(&key, &public)
            .with_context(|| format!("failed to write the pool key {}", key.display()))?;
    }
    Ok(())
}

/// The local pool's key (an age identity, 0600: the agent's) and its public
/// key (`pool.pub`: what `outpost state push --recipient` seals to).
pub fn pool_key_paths(state: &StateDir) -> (PathBuf, PathBuf) {
    let dir = state.root.join("pool");
    (dir.join("pool.key"), dir.join("pool.pub"))
}

/// The configuration of the local agent.
pub fn local_agent_config(state: &StateDir, server: &str, capacity: u32) -> AgentConfig {
    let pki = state.pki();
    let cert = pki.issued(Role::Agent, "local");
    let sandbox = SandboxConfig {
        work_dir: state.agent_dir().join("work"),
        ..SandboxConfig::default()
    };
    AgentConfig {
        server: server.to_string(),
        servers: Vec::new(),
        server_name: Some("localhost".into()),
        agent_id: Some("local".into()),
        capacity,
        labels: [("env".to_string(), "dev".to_string())].into(),
        state_dir: state.agent_dir(),
        drain_grace: std::time::Duration::from_secs(60),
        max_backoff: std::time::Duration::from_secs(2),
        log_buffer_bytes: 64 << 20,
        spool_max_bytes: 1 << 30,
        spool_segment_bytes: 4 << 20,
        spool_full_timeout: std::time::Duration::from_secs(300),
        metrics_listen: None,
        asg: None,
        tls: TlsConfig {
            ca: pki.ca_cert(),
            cert: cert.cert,
            key: cert.key,
        },
        sandbox,
        aws: Default::default(),
        // The local agent runs the runner image it built, and nothing else.
        policy: outpost_agent::policy::PolicyConfig {
            allowed_images: vec![RUNNER_IMAGE.to_string()],
            ..Default::default()
        },
        iac: outpost_agent::iac::IacConfig {
            pool_key_file: Some(pool_key_paths(state).0),
            ..Default::default()
        },
        bootstrap_token_file: None,
    }
}

/// Finds `images/build-runner.sh`: `$OUTPOST_REPO`, then the current
/// directory and the executable's ancestors.
fn find_build_script() -> Option<PathBuf> {
    let rel = Path::new("images/build-runner.sh");
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(r) = std::env::var_os("OUTPOST_REPO") {
        roots.push(PathBuf::from(r));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(Path::to_path_buf));
    }
    roots.into_iter().map(|r| r.join(rel)).find(|p| p.is_file())
}

async fn ensure_runner_image() -> Result<()> {
    let docker = bollard::Docker::connect_with_local_defaults()
        .context("failed to reach the Docker engine")?
        .negotiate_version()
        .await
        .context("failed to reach the Docker engine")?;
    if docker.inspect_image(RUNNER_IMAGE).await.is_ok() {
        return Ok(());
    }
    let Some(script) = find_build_script() else {
        bail!(
            "the runner image {RUNNER_IMAGE} is missing and images/build-runner.sh was not found; run it from the Outpost repository or set OUTPOST_REPO"
        );
    };
    eprintln!(
        "outpost dev: building {RUNNER_IMAGE} with {}",
        script.display()
    );
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .status()
        .await
        .with_context(|| format!("failed to run {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

/// Exit code of a refused configuration, as `outpost-agent` uses.
const EX_CONFIG: u8 = 64;

pub async fn run(state: &StateDir, args: DevArgs) -> Result<ExitCode> {
    // Private (0700) and ours alone: a second `outpost dev` or `outpost
    // server` on this directory refuses to start.
    let _lock = outpost_agent::statedir::lock(&state.root)?;
    ensure_pki(state)?;
    // The local agent's configuration is checked like `outpost-agent`
    // checks its file, before anything starts.
    let planned = local_agent_config(state, &format!("https://{}", args.listen), args.capacity);
    let invalid = match (planned.validate(), planned.sandbox.validate()) {
        (Err(e), _) => Some(e.to_string()),
        (_, Err(e)) => Some(format!("invalid [sandbox] configuration: {e}")),
        _ => None,
    };
    if let Some(e) = invalid {
        eprintln!("outpost dev: local agent: {e}");
        return Ok(ExitCode::from(EX_CONFIG));
    }
    // The store opens before anything starts: a broken one ends here.
    let server_cfg = crate::server::ServerConfig::new(state.pki().dir, state.data_dir());
    let prepared = crate::server::prepare(server_cfg).await?;
    let store = prepared.store();
    ensure_runner_image().await?;

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    crate::cli::write_addr(state, addr)?;
    let url = format!("https://{addr}");

    let server_stop = CancellationToken::new();
    let mut server = tokio::spawn(prepared.serve(listener, server_stop.clone()));

    let agent_cfg = local_agent_config(state, &url, args.capacity);
    let agent_shutdown = outpost_agent::Shutdown::default();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut agent = tokio::spawn(outpost_agent::run(
        agent_cfg,
        agent_shutdown.clone(),
        move || {
            let _ = ready_tx.send(());
        },
    ));
    let ready = tokio::select! {
        r = ready_rx => r.is_ok(),
        r = &mut server => return Err(server_ended(r)),
    };
    if !ready {
        server_stop.cancel();
        return match agent.await {
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the local agent failed to start")),
            _ => bail!("the local agent failed to start"),
        };
    }
    eprintln!(
        "outpost dev: control plane at {url}, state in {}",
        state.root.display()
    );
    eprintln!(
        "outpost dev: the local pool's public key is {} (plans and state are sealed to it)",
        pool_key_paths(state).1.display()
    );

    if args.demo {
        let client = ClientConfig::from_state(state, Some(url.clone()))?;
        let code = tokio::select! {
            c = run_demo(&client) => c?,
            r = &mut server => return Err(server_ended(r)),
        };
        tokio::select! {
            r = crate::iac::demo::run(state, &client) => r?,
            r = &mut server => return Err(server_ended(r)),
        };
        agent_shutdown.drain.cancel();
        agent_shutdown.force.cancel();
        let _ = agent.await;
        server_stop.cancel();
        let _ = server.await;
        return Ok(code);
    }
    eprintln!("outpost dev: agent \"local\" connected; try:");
    eprintln!(
        "  outpost --state-dir {} submit --image {RUNNER_IMAGE} --follow -- sh -c 'echo hello from a sandbox'",
        state.root.display()
    );
    eprintln!(
        "outpost dev: press Ctrl-C to stop; running jobs are left running and re-adopted by the next `outpost dev` (`outpost cancel ID` stops one)"
    );
    tokio::select! {
        _ = wait_for_signal() => {}
        r = &mut server => return Err(server_ended(r)),
        r = &mut agent => {
            server_stop.cancel();
            return match r {
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("the local agent stopped")),
                _ => bail!("the local agent stopped"),
            };
        }
    }
    // Like a restart (or a crash): the jobs' containers go on, the spool
    // keeps their output, and the next `outpost dev` re-adopts them under
    // the same lease.
    agent_shutdown.detach.cancel();
    let _ = agent.await;
    server_stop.cancel();
    let _ = server.await;
    let running = store
        .active_jobs()
        .await
        .map(|jobs| jobs.len())
        .unwrap_or(0);
    if running > 0 {
        eprintln!(
            "outpost dev: stopped; {running} running job(s) left running, re-adopted by the next `outpost dev` on {}",
            state.root.display()
        );
    } else {
        eprintln!("outpost dev: stopped");
    }
    // Exit now, as a restart would: unwinding the runtime would drop the
    // jobs' tasks, whose clean-up removes their containers.
    std::process::exit(0)
}

fn server_ended(
    r: Result<Result<(), crate::server::ServerError>, tokio::task::JoinError>,
) -> anyhow::Error {
    match r {
        Ok(Err(e)) => anyhow::Error::new(e).context("the control plane stopped"),
        Ok(Ok(())) => anyhow::anyhow!("the control plane stopped"),
        Err(e) => anyhow::anyhow!("the control plane failed: {e}"),
    }
}

async fn run_demo(client: &ClientConfig) -> Result<ExitCode> {
    let mut c = client.connect().await?;
    let spec = pb::JobSpec {
        image: RUNNER_IMAGE.into(),
        command: vec!["sh".into(), "/opt/outpost/demo/run.sh".into()],
        timeout_ms: 10 * 60 * 1000,
        ..Default::default()
    };
    let id = c
        .submit_job(admin::SubmitJobRequest { spec: Some(spec) })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .job_id;
    eprintln!("outpost dev: submitted demo job {id}");
    stream_logs(client, &id, true).await?;
    let job = wait_final(client, &id).await?;
    eprintln!(
        "outpost dev: job {id} {} (exit code {})",
        state_name(&job),
        job.exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into())
    );
    Ok(exit_code_of(&job))
}
