//! What the agent shows its operator: counters and gauges in the Prometheus
//! text format (`metrics`), a minimal read-only HTTP endpoint serving them and
//! `/healthz` (`http`), the log output format (`logging`) and debug-level
//! timings of a job's steps (`steps`).
//!
//! Nothing here listens unless the operator sets `metrics_listen`.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod steps;

pub use metrics::{Gauges, JobOutcome, Metrics};
pub use steps::Steps;
