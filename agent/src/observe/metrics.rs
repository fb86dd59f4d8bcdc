//! The agent's metrics: lock-free counters updated where things happen, and
//! gauges read at scrape time, rendered in the Prometheus text format 0.0.4.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::watch;

/// How a job ended, as counted in `outpost_agent_jobs_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Exit code 0.
    Succeeded,
    /// Any other exit code (or killed for memory).
    Failed,
    /// The agent could not run it (Docker, workspace, credentials ...).
    Error,
    Cancelled,
    TimedOut,
    /// Refused by the agent's local policy.
    Rejected,
}

impl JobOutcome {
    const ALL: [JobOutcome; 6] = [
        JobOutcome::Succeeded,
        JobOutcome::Failed,
        JobOutcome::Error,
        JobOutcome::Cancelled,
        JobOutcome::TimedOut,
        JobOutcome::Rejected,
    ];

    fn label(self) -> &'static str {
        match self {
            JobOutcome::Succeeded => "succeeded",
            JobOutcome::Failed => "failed",
            JobOutcome::Error => "error",
            JobOutcome::Cancelled => "cancelled",
            JobOutcome::TimedOut => "timed_out",
            JobOutcome::Rejected => "rejected",
        }
    }
}

/// Values read at scrape time from the parts that own them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub running_jobs: u64,
    pub spool_bytes: u64,
    pub draining: bool,
}

/// Counters of one agent process (shared by its tasks).
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    jobs: [AtomicU64; 6],
    lease_renewals: AtomicU64,
    leases_revoked: AtomicU64,
    leases_fenced: AtomicU64,
    log_bytes_sent: AtomicU64,
    sessions: AtomicU64,
    reconnects: AtomicU64,
    docker_errors: AtomicU64,
    credential_refreshes: AtomicU64,
    credential_failures: AtomicU64,
    lifecycle_heartbeats: AtomicU64,
    /// Milliseconds since `started` at the last turn of the live loop.
    last_tick_ms: AtomicU64,
    docker_ok: AtomicBool,
    connected: watch::Sender<bool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            jobs: Default::default(),
            lease_renewals: AtomicU64::new(0),
            leases_revoked: AtomicU64::new(0),
            leases_fenced: AtomicU64::new(0),
            log_bytes_sent: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            docker_errors: AtomicU64::new(0),
            credential_refreshes: AtomicU64::new(0),
            credential_failures: AtomicU64::new(0),
            lifecycle_heartbeats: AtomicU64::new(0),
            last_tick_ms: AtomicU64::new(0),
            docker_ok: AtomicBool::new(false),
            connected: watch::Sender::new(false),
        }
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn job_finished(&self, outcome: JobOutcome) {
        if let Some(i) = JobOutcome::ALL.iter().position(|o| *o == outcome) {
            inc(&self.jobs[i]);
        }
    }
    pub fn job_count(&self, outcome: JobOutcome) -> u64 {
        JobOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.jobs[i].load(Ordering::Relaxed))
    }
    pub fn lease_renewed(&self) {
        inc(&self.lease_renewals);
    }
    pub fn lease_revoked(&self) {
        inc(&self.leases_revoked);
    }
    pub fn lease_fenced(&self) {
        inc(&self.leases_fenced);
    }
    pub fn log_bytes_sent(&self, n: u64) {
        self.log_bytes_sent.fetch_add(n, Ordering::Relaxed);
    }
    pub fn docker_error(&self) {
        inc(&self.docker_errors);
    }
    pub fn credential_refresh(&self, ok: bool) {
        inc(if ok {
            &self.credential_refreshes
        } else {
            &self.credential_failures
        });
    }
    pub fn lifecycle_heartbeat(&self) {
        inc(&self.lifecycle_heartbeats);
    }
    pub fn set_docker_ok(&self, ok: bool) {
        self.docker_ok.store(ok, Ordering::Relaxed);
    }

    /// A session was welcomed by the control plane.
    pub fn session_up(&self) {
        if self.sessions.fetch_add(1, Ordering::Relaxed) > 0 {
            inc(&self.reconnects);
        }
        self.connected.send_replace(true);
    }
    /// The session ended (the agent reconnects with backoff).
    pub fn session_down(&self) {
        self.connected.send_replace(false);
    }
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }
    /// Watches the connection state (`true` while a session is up).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// The live loop turned (health and the systemd watchdog follow it).
    pub fn tick(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }
    /// Time since the live loop last turned.
    pub fn since_tick(&self) -> std::time::Duration {
        let now = self.started.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.last_tick_ms.load(Ordering::Relaxed)),
        )
    }

    /// The exposition in the Prometheus text format.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push_str(
            "# HELP outpost_agent_jobs_total Jobs this agent finished, by outcome.\n\
             # TYPE outpost_agent_jobs_total counter\n",
        );
        for (i, o) in JobOutcome::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "outpost_agent_jobs_total{{outcome=\"{}\"}} {}",
                o.label(),
                load(&self.jobs[i])
            );
        }
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        one(
            "outpost_agent_running_jobs",
            "gauge",
            "Jobs held by this agent (running or reporting).",
            g.running_jobs,
        );
        one(
            "outpost_agent_lease_renewals_total",
            "counter",
            "Lease renewals acknowledged by the control plane.",
            load(&self.lease_renewals),
        );
        one(
            "outpost_agent_leases_revoked_total",
            "counter",
            "Leases the control plane revoked or refused.",
            load(&self.leases_revoked),
        );
        one(
            "outpost_agent_leases_fenced_total",
            "counter",
            "Jobs the agent stopped itself because their lease could not be renewed in time.",
            load(&self.leases_fenced),
        );
        one(
            "outpost_agent_spool_bytes",
            "gauge",
            "Bytes in the log spool (not yet acknowledged).",
            g.spool_bytes,
        );
        one(
            "outpost_agent_log_bytes_sent_total",
            "counter",
            "Job log bytes sent to the control plane (resends included).",
            load(&self.log_bytes_sent),
        );
        one(
            "outpost_agent_connected",
            "gauge",
            "1 while a session with the control plane is up.",
            u64::from(*self.connected.borrow()),
        );
        one(
            "outpost_agent_session_reconnects_total",
            "counter",
            "Sessions established after the first one.",
            load(&self.reconnects),
        );
        one(
            "outpost_agent_docker_errors_total",
            "counter",
            "Jobs that failed because of the Docker engine or the sandbox set-up.",
            load(&self.docker_errors),
        );
        one(
            "outpost_agent_credential_refreshes_total",
            "counter",
            "Successful AssumeRoleWithWebIdentity calls for jobs (first and refreshes).",
            load(&self.credential_refreshes),
        );
        one(
            "outpost_agent_credential_failures_total",
            "counter",
            "Failed AssumeRoleWithWebIdentity calls for jobs.",
            load(&self.credential_failures),
        );
        one(
            "outpost_agent_lifecycle_heartbeats_total",
            "counter",
            "Auto Scaling lifecycle hook heartbeats sent while draining.",
            load(&self.lifecycle_heartbeats),
        );
        one(
            "outpost_agent_draining",
            "gauge",
            "1 once the agent takes no new lease.",
            u64::from(g.draining),
        );
        let _ = write!(
            out,
            "# HELP outpost_agent_build_info The agent's version.\n\
             # TYPE outpost_agent_build_info gauge\n\
             outpost_agent_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_type() {
        let m = Metrics::default();
        m.job_finished(JobOutcome::Succeeded);
        m.job_finished(JobOutcome::Succeeded);
        m.job_finished(JobOutcome::Rejected);
        m.log_bytes_sent(42);
        m.session_up();
        m.session_down();
        m.session_up();
        let text = m.render(Gauges {
            running_jobs: 3,
            spool_bytes: 7,
            draining: true,
        });
        assert!(
            text.contains("outpost_agent_jobs_total{outcome=\"succeeded\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("outpost_agent_jobs_total{outcome=\"rejected\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("outpost_agent_running_jobs 3\n"), "{text}");
        assert!(text.contains("outpost_agent_spool_bytes 7\n"), "{text}");
        assert!(
            text.contains("outpost_agent_log_bytes_sent_total 42\n"),
            "{text}"
        );
        assert!(
            text.contains("outpost_agent_session_reconnects_total 1\n"),
            "{text}"
        );
        assert!(text.contains("outpost_agent_connected 1\n"), "{text}");
        assert!(text.contains("outpost_agent_draining 1\n"), "{text}");
        // Every sample line belongs to a family declared just before it.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "undeclared sample {line:?}");
            }
        }
    }
}
