//! The benchmark harness (`outpost-bench`): every figure of the control
//! plane and the agent that matters for speed and memory, measured in one
//! run on this machine and printed beside its baseline with the ratio.
//!
//! - `fleet`: N simulated agents over real mTLS against a real
//!   `outpost server` process: pickup p50/p99, the control plane's memory,
//!   threads and idle CPU, and a reconnect storm after a restart;
//! - `jobs`: real jobs on a real `outpost-agent` and Docker engine: output
//!   through `submit --follow` beside `docker run`, the agent's peak memory
//!   while a job prints, a trivial job beside the engine's own API floor;
//! - `credentials`: the pickup cost of the AWS credentials channel (moto);
//! - `stores`: pickup and `SubmitJob` throughput of the embedded SQLite
//!   store beside one and two replicas over PostgreSQL (SQLite, measured in
//!   the same run, is the baseline of those rows).

pub mod credentials;
pub mod fleet;
pub mod jobs;
pub mod procs;
pub mod stores;

use std::fmt::Write as _;

/// The figures as measured before the control plane dispatched in memory
/// (release build, 2-core machine of `docs/bench.md`): `(key, value)`.
pub const BASELINE: &[(&str, f64)] = &[
    ("pickup p99 ms @1000", 97.0),
    ("pickup p99 ms @3000", 557.0),
    ("pickup p99 ms @10000", 4500.0),
    ("control plane RSS MB @10000", 600.0),
    ("control plane threads @10000", 515.0),
    ("control plane idle CPU cores @10000", 0.55),
    ("follow / docker run", 1.9),
    ("agent peak RSS MB", 160.0),
    ("trivial job / engine API", 1.27),
    ("trivial job / docker run --rm", 0.63),
];

/// The goals: `(key, value)`; every one is an upper bound.
pub const GOALS: &[(&str, f64)] = &[
    ("pickup p99 ms @10000", 100.0),
    ("control plane RSS MB @10000", 150.0),
    ("control plane idle CPU cores @10000", 0.25),
    ("follow / docker run", 1.1),
    ("agent peak RSS MB", 48.0),
    ("trivial job / engine API", 1.10),
    ("trivial job / docker run --rm", 0.7),
];

fn lookup(table: &[(&str, f64)], key: &str) -> Option<f64> {
    table.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// The report: one row per figure, with the baseline measured in the same
/// run if any (else the one of [`BASELINE`]).
#[derive(Default)]
pub struct Report {
    rows: Vec<(String, f64, Option<f64>)>,
}

impl Report {
    pub fn add(&mut self, key: impl Into<String>, value: f64) {
        self.rows.push((key.into(), value, None));
    }

    /// A row whose baseline was measured in this run.
    pub fn add_vs(&mut self, key: impl Into<String>, value: f64, baseline: f64) {
        self.rows.push((key.into(), value, Some(baseline)));
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.rows.iter().map(|(k, _, _)| k.as_str())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<42} {:>10} {:>10} {:>8} {:>8}",
            "figure", "baseline", "now", "ratio", "goal"
        );
        for (key, v, measured) in &self.rows {
            let base = measured.or_else(|| lookup(BASELINE, key));
            let goal = lookup(GOALS, key);
            let show = |x: Option<f64>| x.map_or("—".to_string(), num);
            let ratio = base
                .filter(|b| *b > 0.0)
                .map_or("—".to_string(), |b| format!("{:.2}×", v / b));
            let mark = match goal {
                Some(g) if *v <= g => " ok",
                Some(_) => " over",
                None => "",
            };
            let _ = writeln!(
                out,
                "{key:<42} {:>10} {:>10} {ratio:>8} {:>8}{mark}",
                show(base),
                num(*v),
                show(goal)
            );
        }
        out
    }
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Milliseconds of a duration.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Adds the rows of one fleet run.
pub fn fleet_rows(r: &mut Report, f: &fleet::FleetFigures) {
    let n = f.agents;
    r.add(format!("connect all ms @{n}"), ms(f.connect));
    r.add(format!("pickup p50 ms @{n}"), ms(f.pickup_p50));
    r.add(format!("pickup p99 ms @{n}"), ms(f.pickup_p99));
    r.add(format!("pickup never leased @{n}"), f.pickup_lost as f64);
    r.add(
        format!("control plane RSS MB @{n}"),
        f.rss_kb as f64 / 1024.0,
    );
    r.add(
        format!("control plane KB per agent @{n}"),
        f.rss_kb.saturating_sub(f.rss_idle_kb) as f64 / n.max(1) as f64,
    );
    r.add(format!("control plane threads @{n}"), f.threads as f64);
    r.add(format!("control plane idle CPU cores @{n}"), f.idle_cpu);
    if f.storm > std::time::Duration::ZERO {
        r.add(format!("restart: all back ms @{n}"), ms(f.storm));
        r.add(
            format!("restart: pickup p99 ms @{n}"),
            ms(f.storm_pickup_p99),
        );
    }
}

/// Adds the rows of the jobs run.
pub fn job_rows(r: &mut Report, j: &jobs::JobFigures) {
    r.add(
        format!("docker run, {} MiB output ms", j.log_mb),
        ms(j.docker_log),
    );
    r.add(
        format!("submit --follow, {} MiB output ms", j.log_mb),
        ms(j.outpost_log),
    );
    r.add(
        "follow / docker run",
        j.outpost_log.as_secs_f64() / j.docker_log.as_secs_f64().max(1e-9),
    );
    r.add("agent peak RSS MB", j.agent_peak_kb as f64 / 1024.0);
    r.add("engine API create/start/wait/rm ms", ms(j.engine_api));
    r.add("docker run --rm true ms", ms(j.docker_run));
    r.add("submit --wait -- true ms", ms(j.outpost_trivial));
    r.add(
        "trivial job / engine API",
        j.outpost_trivial.as_secs_f64() / j.engine_api.as_secs_f64().max(1e-9),
    );
    r.add(
        "trivial job / docker run --rm",
        j.outpost_trivial.as_secs_f64() / j.docker_run.as_secs_f64().max(1e-9),
    );
}

/// Adds the rows of a stores run: each PostgreSQL figure against SQLite's
/// (the first set-up) as its baseline. Throughput is higher-is-better: its
/// ratio above 1 is a gain, the latencies' a loss.
pub fn store_rows(r: &mut Report, agents: usize, setups: &[stores::SetupFigures]) {
    let Some(sqlite) = setups.first() else {
        return;
    };
    for s in setups {
        let name = s.name;
        let mut row = |key: String, v: f64, base: f64| {
            if std::ptr::eq(s, sqlite) {
                r.add(key, v)
            } else {
                r.add_vs(key, v, base)
            }
        };
        row(
            format!("stores {name}: pickup p50 ms @{agents}"),
            ms(s.pickup_p50),
            ms(sqlite.pickup_p50),
        );
        row(
            format!("stores {name}: pickup p99 ms @{agents}"),
            ms(s.pickup_p99),
            ms(sqlite.pickup_p99),
        );
        row(
            format!("stores {name}: never leased @{agents}"),
            s.pickup_lost as f64,
            sqlite.pickup_lost as f64,
        );
        row(
            format!("stores {name}: submit jobs/s"),
            s.submit_rate,
            sqlite.submit_rate,
        );
    }
}
