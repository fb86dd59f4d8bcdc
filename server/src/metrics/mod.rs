//! The control plane's Prometheus metrics (`outpost server --metrics-listen`):
//! connected agents, queue depth per label set (the pool's scaling signal),
//! pickup latency (submit to lease pushed) and store call latency; drift
//! checks, drifts found per stack and webhook failures.
//! Served by the same small read-only endpoint as the agent's.

pub mod histogram;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

pub use histogram::{Histogram, LATENCY_BUCKETS};
use outpost_agent::observe::http::{self, Health, HttpError};

use crate::hub::Hub;

/// What only the hub measures.
#[derive(Debug)]
pub struct HubMetrics {
    /// Submit to lease pushed, first attempts only.
    pub pickup: Histogram,
    /// Drift checks and notifications (`crate::iac`, `crate::notify`).
    pub iac: Arc<IacMetrics>,
}

impl Default for HubMetrics {
    fn default() -> Self {
        HubMetrics {
            pickup: Histogram::new(&LATENCY_BUCKETS),
            iac: Arc::default(),
        }
    }
}

/// Counters of drift checks and webhook deliveries.
#[derive(Debug, Default)]
pub struct IacMetrics {
    /// Drift runs queued.
    pub drift_runs: AtomicU64,
    /// Drift checks that failed (the stack's status became unknown).
    pub drift_checks_failed: AtomicU64,
    /// New or changed drifts found, per stack.
    pub drifts_detected: parking_lot::Mutex<BTreeMap<String, u64>>,
    /// Webhook attempts that failed (each retry counts).
    pub notify_attempts_failed: AtomicU64,
    /// Deliveries given up after their last attempt.
    pub notify_given_up: AtomicU64,
    pub notify_delivered: AtomicU64,
}

impl IacMetrics {
    pub fn drift_detected(&self, stack: &str) {
        *self
            .drifts_detected
            .lock()
            .entry(stack.to_string())
            .or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP outpost_drift_runs_total Drift checks queued.\n\
             # TYPE outpost_drift_runs_total counter\n\
             outpost_drift_runs_total {}\n\
             # HELP outpost_drift_checks_failed_total Drift checks that failed.\n\
             # TYPE outpost_drift_checks_failed_total counter\n\
             outpost_drift_checks_failed_total {}\n\
             # HELP outpost_notification_attempts_failed_total Webhook attempts that failed (no answer, timeout, not 2xx).\n\
             # TYPE outpost_notification_attempts_failed_total counter\n\
             outpost_notification_attempts_failed_total {}\n\
             # HELP outpost_notifications_failed_total Webhook deliveries given up.\n\
             # TYPE outpost_notifications_failed_total counter\n\
             outpost_notifications_failed_total {}\n\
             # HELP outpost_notifications_delivered_total Webhook deliveries that succeeded.\n\
             # TYPE outpost_notifications_delivered_total counter\n\
             outpost_notifications_delivered_total {}\n\
             # HELP outpost_drifts_detected_total New or changed drift found, per stack.\n\
             # TYPE outpost_drifts_detected_total counter\n",
            n(&self.drift_runs),
            n(&self.drift_checks_failed),
            n(&self.notify_attempts_failed),
            n(&self.notify_given_up),
            n(&self.notify_delivered),
        );
        for (stack, count) in self.drifts_detected.lock().iter() {
            let _ = writeln!(
                out,
                "outpost_drifts_detected_total{{stack=\"{}\"}} {count}",
                escape(stack)
            );
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `k=v,k=v` of a selector (sorted), `""` for jobs any agent may take.
pub fn label_set(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders the exposition. `queued` is the queue depth per label set.
pub fn render(hub: &Hub, queued: &BTreeMap<String, u64>) -> String {
    let mut out = String::with_capacity(4096);
    let (connected, draining) = hub.agent_counts();
    let _ = write!(
        out,
        "# HELP outpost_agents_connected Agents with a session open.\n\
         # TYPE outpost_agents_connected gauge\n\
         outpost_agents_connected {connected}\n\
         # HELP outpost_agents_draining Connected agents that take no new lease.\n\
         # TYPE outpost_agents_draining gauge\n\
         outpost_agents_draining {draining}\n\
         # HELP outpost_queue_depth Queued jobs per agent label set they select (empty: any agent).\n\
         # TYPE outpost_queue_depth gauge\n"
    );
    for (labels, n) in queued {
        let _ = writeln!(
            out,
            "outpost_queue_depth{{selector=\"{}\"}} {n}",
            escape(labels)
        );
    }
    hub.metrics.pickup.render(
        &mut out,
        "outpost_pickup_latency_seconds",
        "Time from submission to the lease pushed to an agent (first attempts).",
    );
    hub.store.latency().render(
        &mut out,
        "outpost_store_call_seconds",
        "Duration of store calls (waiting for the connection included).",
    );
    hub.metrics.iac.render(&mut out);
    out
}

struct Exposition {
    hub: Arc<Hub>,
}

impl http::Source for Exposition {
    fn metrics(&self) -> futures::future::BoxFuture<'static, String> {
        let hub = self.hub.clone();
        Box::pin(async move {
            let queued = match hub.store.queue_depth().await {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: reading the queue depth failed");
                    BTreeMap::new()
                }
            };
            render(&hub, &queued)
        })
    }

    fn health(&self) -> Health {
        Health {
            ok: true,
            body: "{\"status\":\"ok\"}\n".into(),
        }
    }
}

/// Binds the metrics address (a clear error if taken).
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, HttpError> {
    http::bind(addr).await
}

/// Serves `/metrics` and `/healthz` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>, shutdown: CancellationToken) {
    let source = Arc::new(Exposition { hub });
    http::serve(listener, source, shutdown).await
}
