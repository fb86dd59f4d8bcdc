//! The benchmark harness: prints every figure beside its baseline.
//!
//! `cargo build --release --workspace --bins && target/release/outpost-bench`
//!
//! Options: `--smoke` (seconds: 50 agents, small outputs, a small stores
//! section; checks that the harness runs, not the numbers),
//! `--agents 1000,3000,10000` (the stores section: 1000 unless given),
//! `--only fleet,jobs,credentials,stores` (default: fleet and jobs),
//! `--rounds N`, `--log-mb N`, `--peak-mb N`, `--rate JOBS_PER_S`,
//! `--jobs N`, `--idle SECONDS`, `--no-storm`, `--submits N` (jobs of the
//! stores section's throughput, 2000), `--clients N` (its concurrent
//! clients, 16).
//!
//! Environment: `OUTPOST_BENCH_DIR` (keep the state and server logs in a
//! new directory there), `OUTPOST_BENCH_SERVER_LOG` (the control plane's
//! log level, `warn` by default), `OUTPOST_BENCH_BIN` (binaries measured),
//! `OUTPOST_REQUIRE_PG=1` (the smoke run fails instead of skipping the
//! PostgreSQL set-ups without PostgreSQL).

use std::process::ExitCode;
use std::time::Duration;

use outpost_tests::bench::{self, Report, fleet, jobs, procs, stores};

struct Args {
    agents: Vec<usize>,
    /// `--agents` given (else the stores section runs 1000).
    agents_given: bool,
    only: Vec<String>,
    rounds: usize,
    log_mb: u64,
    peak_mb: u64,
    rate: u32,
    jobs: usize,
    idle: Duration,
    storm: bool,
    smoke: bool,
    submits: usize,
    clients: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        agents: vec![1000, 3000, 10000],
        agents_given: false,
        only: vec!["fleet".into(), "jobs".into()],
        rounds: 3,
        log_mb: 100,
        peak_mb: 200,
        rate: 20,
        jobs: 300,
        idle: Duration::from_secs(20),
        storm: true,
        smoke: false,
        submits: 2000,
        clients: 16,
    };
    let mut only_given = false;
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{what} needs a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => {
                a.agents = vec![50];
                a.rounds = 1;
                a.log_mb = 2;
                a.peak_mb = 4;
                a.rate = 20;
                a.jobs = 20;
                a.idle = Duration::from_secs(1);
                a.smoke = true;
                a.submits = 200;
            }
            "--agents" => {
                a.agents = it
                    .next()
                    .ok_or("--agents needs a list")?
                    .split(',')
                    .map(|n| n.trim().parse().map_err(|_| format!("bad agent count {n}")))
                    .collect::<Result<_, _>>()?;
                a.agents_given = true;
            }
            "--only" => {
                a.only = it
                    .next()
                    .ok_or("--only needs a list")?
                    .split(',')
                    .map(str::to_string)
                    .collect();
                only_given = true;
            }
            "--rounds" => a.rounds = num(it.next(), "--rounds")? as usize,
            "--log-mb" => a.log_mb = num(it.next(), "--log-mb")?,
            "--peak-mb" => a.peak_mb = num(it.next(), "--peak-mb")?,
            "--rate" => a.rate = num(it.next(), "--rate")? as u32,
            "--jobs" => a.jobs = num(it.next(), "--jobs")? as usize,
            "--idle" => a.idle = Duration::from_secs(num(it.next(), "--idle")?),
            "--no-storm" => a.storm = false,
            "--submits" => a.submits = num(it.next(), "--submits")? as usize,
            "--clients" => a.clients = num(it.next(), "--clients")? as usize,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    for o in &a.only {
        if !["fleet", "jobs", "credentials", "stores"].contains(&o.as_str()) {
            return Err(format!(
                "unknown section {o} (fleet, jobs, credentials, stores)"
            ));
        }
    }
    if a.smoke && !only_given {
        a.only.push("stores".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("outpost-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let fds = procs::raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args, fds)) {
        Ok(report) => {
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args, fds: u64) -> anyhow::Result<Report> {
    println!("machine: {}", procs::machine());
    println!("open files limit: {fds}");
    // `OUTPOST_BENCH_DIR` keeps the state (server logs, stores) for a look
    // afterwards; by default it is a temporary directory.
    let dir = match std::env::var_os("OUTPOST_BENCH_DIR") {
        Some(d) => tempfile::Builder::new()
            .prefix("outpost-bench-")
            .disable_cleanup(true)
            .tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let mut report = Report::default();
    if args.only.iter().any(|o| o == "fleet") {
        for &n in &args.agents {
            let plan = fleet::FleetPlan {
                agents: n,
                rate: args.rate,
                jobs: args.jobs,
                idle: args.idle,
                storm: args.storm,
            };
            eprintln!("fleet: {n} agents");
            let f = fleet::run(&plan, dir.path()).await?;
            bench::fleet_rows(&mut report, &f);
        }
    }
    if args.only.iter().any(|o| o == "jobs") {
        let plan = jobs::JobPlan {
            log_mb: args.log_mb,
            peak_mb: args.peak_mb,
            rounds: args.rounds,
        };
        eprintln!("jobs: {} MiB output, {} rounds", args.log_mb, args.rounds);
        let j = jobs::run(&plan, dir.path()).await?;
        bench::job_rows(&mut report, &j);
    }
    if args.only.iter().any(|o| o == "credentials") {
        let (plain, with) = bench::credentials::credentials_channel(args.rounds.min(6)).await;
        report.add("pickup without AWS role ms", plain);
        report.add("pickup with AWS role ms", with);
    }
    if args.only.iter().any(|o| o == "stores") {
        let counts = if args.agents_given || args.smoke {
            args.agents.clone()
        } else {
            vec![1000]
        };
        for n in counts {
            let plan = stores::StorePlan {
                agents: n,
                rate: args.rate,
                jobs: args.jobs,
                submits: args.submits,
                clients: args.clients,
                settle: Duration::from_secs(6).min(args.idle),
                // The smoke run (CI) skips PostgreSQL where it has none,
                // unless told it must have it.
                require_pg: !args.smoke
                    || std::env::var(outpost_tests::pg::REQUIRE_ENV).is_ok_and(|v| v == "1"),
            };
            let s = stores::run(&plan, dir.path()).await?;
            bench::store_rows(&mut report, n, &s);
        }
    }
    Ok(report)
}
