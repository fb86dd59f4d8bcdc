//! `outpost-agent` entry point: tracing, configuration (exit 64 if invalid),
//! run, signals (SIGTERM/SIGINT drain; a second one or SIGQUIT forces).
//! `outpost-agent drain` asks a running agent to drain and waits for it to
//! exit (a Kubernetes preStop hook).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outpost_agent::config::AgentConfig;
use outpost_agent::observe::logging::{self, LogFormat};
use outpost_agent::{AgentError, Shutdown, run};
use tokio::signal::unix::{SignalKind, signal};

/// The Outpost worker agent.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(
        long,
        env = "OUTPOST_AGENT_CONFIG",
        default_value = "/etc/outpost-agent/agent.toml"
    )]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log output: `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, value_enum, env = "OUTPOST_LOG_FORMAT", default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

/// One malloc arena for the whole process, unless the operator set
/// `MALLOC_ARENA_MAX`. glibc gives threads that allocate at once arenas of
/// their own (up to 8 per core); the log path allocates and frees 64 KiB
/// chunks on whichever worker or blocking thread runs it, and what is freed
/// stays resident in each arena. Measured while a job prints 200 MiB after
/// three 100 MiB jobs: 76 MB peak with the default, 44 MB with one arena,
/// the same throughput (`docs/bench.md`).
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        #[allow(unsafe_code)]
        // SAFETY: called first in `main`, before any other thread exists;
        // `mallopt` only sets one of the allocator's parameters.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Tell the agent running with this configuration to drain (as SIGTERM
    /// does) and wait until it has exited.
    Drain,
}

const EX_CONFIG: u8 = 64;
/// sysexits EX_UNAVAILABLE: a service the agent needs is missing.
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    one_malloc_arena();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let filter = outpost_agent::aws::quiet_sdk_logs(filter);
    logging::init(args.log_format, filter);
    let cfg = match AgentConfig::load(&args.config, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost-agent: {}", error_chain(&e));
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Err(e) = cfg.sandbox.validate() {
        eprintln!(
            "outpost-agent: invalid [sandbox] configuration: {}",
            error_chain(&e)
        );
        return ExitCode::from(EX_CONFIG);
    }
    if args.check_config {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Drain) = args.command {
        // drain grace + one stop grace + time to report final states
        let limit = cfg.drain_grace + cfg.sandbox.stop_grace + std::time::Duration::from_secs(60);
        return match outpost_agent::lifecycle::drain::request(&cfg.state_dir, limit) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("outpost-agent drain: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost-agent: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = Shutdown::default();
        let sig = shutdown.clone();
        tokio::spawn(async move {
            let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::quit()),
            ) else {
                return;
            };
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => seen += 1,
                    _ = int.recv() => seen += 1,
                    _ = quit.recv() => seen += 2,
                }
                sig.drain.cancel();
                if seen >= 2 {
                    sig.force.cancel();
                }
            }
        });
        match run(cfg, shutdown, || {}).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("outpost-agent: {}", error_chain(&e));
                match e {
                    AgentError::NoDockerSocket { .. } => ExitCode::from(EX_UNAVAILABLE),
                    _ => ExitCode::FAILURE,
                }
            }
        }
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
