//! `outpost-agent` entry point: tracing, configuration (exit 64 if invalid),
//! run, signals (SIGTERM/SIGINT drain; a second one or SIGQUIT forces).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use outpost_agent::config::AgentConfig;
use outpost_agent::{Shutdown, run};
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
}

const EX_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let filter = outpost_agent::aws::quiet_sdk_logs(filter);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never in a journal or a file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
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
        match run(cfg, shutdown, notify_ready).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("outpost-agent: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        }
    })
}

/// Tells systemd (Type=notify) that the agent is ready, if it runs under it.
fn notify_ready() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = std::os::unix::net::UnixDatagram::unbound();
        if let Ok(sock) = sock {
            let path = PathBuf::from(path);
            let _ = sock.send_to(b"READY=1", &path);
        }
    }
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
