//! Signed webhook notifications of stack events: a run needs approval,
//! finished or failed; drift detected, changed, resolved, or a drift check
//! failed. Targets are declared per stack (`[[stack.notify]]`) and globally
//! (`[[notify]]`, every stack's events).
//!
//! - The body is JSON (`format = "json"`): stack, run, event, the states it
//!   moved between, counts, the drift fingerprint, the addresses with their
//!   actions, a one-line summary, the delivery id and a timestamp. Never a
//!   value. `format = "slack"` sends `{"text": <summary>}`.
//! - `X-Outpost-Signature-256: sha256=<hex HMAC-SHA256 of the body>` under
//!   the target's shared secret; `X-Outpost-Delivery` (the same id on every
//!   attempt) and `X-Outpost-Timestamp` (Unix seconds, also in the signed
//!   body) let a receiver refuse replays.
//! - Every event is first recorded ([`store`]), then delivered by one
//!   background task ([`send`]): a failed attempt (no connection, timeout,
//!   a status other than 2xx) is retried with exponential backoff; every
//!   attempt is recorded and listed by `outpost notifications`.
//!
//! **Invariant:** emitting never blocks nor fails the caller: a run's state
//! never depends on a webhook.
//!
//! Shared secrets are sealed at rest like stack secrets
//! (`iac::secrets::Sealer`) and never logged.

pub mod cli;
pub mod send;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::iac::model::{ResourceChange, Sealed};
use crate::iac::secrets::Sealer;
use crate::metrics::IacMetrics;
use crate::model::now_ms;
use store::{Delivery, NotifyStore};

/// Every event name, as receivers see it.
pub const EVENTS: [&str; 7] = [
    "run.needs_approval",
    "run.finished",
    "run.failed",
    "drift.detected",
    "drift.changed",
    "drift.resolved",
    "drift.check_failed",
];

/// Longest one attempt may take unless the target says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts before a delivery is given up.
pub const MAX_ATTEMPTS: u32 = 8;
/// Backoff after the first failure; doubles after each one.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// A webhook target.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Target {
    pub url: String,
    /// `json` or `slack`.
    pub format: String,
    /// Events sent; empty: all.
    pub events: Vec<String>,
    /// Zero: [`DEFAULT_TIMEOUT`].
    pub timeout_ms: u64,
    /// The shared secret, sealed.
    pub secret: Option<Sealed>,
    /// The shared secret as declared, on its way in (sealed, then cleared).
    #[serde(skip)]
    pub secret_value: Vec<u8>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("format", &self.format)
            .field("events", &self.events)
            .field("timeout_ms", &self.timeout_ms)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Target {
    /// Checks a declared target; the error names what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let uri: hyper::Uri = self
            .url
            .parse()
            .map_err(|e| format!("url {:?} is not a URL: {e}", self.url))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "url {:?} must be an http:// or https:// URL with a host",
                self.url
            ));
        }
        if self.url.len() > 2048 {
            return Err("url is longer than 2048 bytes".into());
        }
        if !matches!(self.format.as_str(), "" | "json" | "slack") {
            return Err(format!(
                "format must be \"json\" or \"slack\", not {:?}",
                self.format
            ));
        }
        for e in &self.events {
            if !EVENTS.contains(&e.as_str()) {
                return Err(format!(
                    "unknown event {e:?} (one of {})",
                    EVENTS.join(", ")
                ));
            }
        }
        if self.timeout_ms > 60_000 {
            return Err("timeout is longer than 60s".into());
        }
        if self.secret_value.len() > 4096 {
            return Err("the secret is longer than 4096 bytes".into());
        }
        Ok(())
    }

    pub fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event)
    }

    /// Seals the declared secret (keeping `old`'s if the value is the same).
    pub fn seal(
        mut self,
        sealer: &Sealer,
        old: Option<&Target>,
    ) -> Result<Target, crate::iac::secrets::SecretsError> {
        if self.format.is_empty() {
            self.format = "json".into();
        }
        if !self.secret_value.is_empty() {
            let old = old.and_then(|o| o.secret.as_ref());
            self.secret = Some(sealer.reseal(&self.url, &self.secret_value, old)?);
        }
        self.secret_value = Vec::new();
        Ok(self)
    }

    fn timeout(&self) -> Duration {
        if self.timeout_ms == 0 {
            DEFAULT_TIMEOUT
        } else {
            Duration::from_millis(self.timeout_ms)
        }
    }
}

/// What happened (never a value).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Event {
    /// One of [`EVENTS`].
    pub event: String,
    pub stack: String,
    pub run: String,
    /// The states the run or the stack's drift status moved between.
    pub from: String,
    pub to: String,
    /// add / change / destroy (a plan), drifted (a drift check).
    pub counts: BTreeMap<String, u64>,
    pub fingerprint: String,
    pub resources: Vec<ResourceChange>,
    /// One line for people, without URLs.
    pub summary: String,
    pub at_ms: i64,
}

impl Event {
    pub fn new(event: &str, stack: &str, run: &str) -> Event {
        Event {
            event: event.to_string(),
            stack: stack.to_string(),
            run: run.to_string(),
            at_ms: now_ms(),
            ..Default::default()
        }
    }

    /// Counts of a plan's changes by action.
    pub fn plan_counts(changes: &[ResourceChange]) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        for (key, action) in [
            ("add", "create"),
            ("change", "update"),
            ("destroy", "delete"),
        ] {
            let n = changes
                .iter()
                .filter(|r| r.actions.iter().any(|a| a == action))
                .count();
            c.insert(key.to_string(), n as u64);
        }
        c
    }
}

/// Records events and delivers them.
pub struct Notifier {
    store: NotifyStore,
    sealer: Arc<Sealer>,
    client: send::Client,
    wake: tokio::sync::Notify,
    in_flight: parking_lot::Mutex<BTreeSet<String>>,
    metrics: Arc<IacMetrics>,
}

impl Notifier {
    pub async fn open(
        store: crate::store::Store,
        sealer: Arc<Sealer>,
        metrics: Arc<IacMetrics>,
    ) -> Result<Arc<Notifier>, crate::store::StoreError> {
        Ok(Arc::new(Notifier {
            store: NotifyStore::open(store).await?,
            sealer,
            client: send::Client::new(),
            wake: tokio::sync::Notify::new(),
            in_flight: parking_lot::Mutex::new(BTreeSet::new()),
            metrics,
        }))
    }

    /// Replaces the global targets (secrets sealed, same values kept).
    pub async fn set_global(&self, targets: Vec<Target>) -> Result<(), String> {
        let old = self.store.global().await.map_err(|e| e.to_string())?;
        let mut sealed = Vec::new();
        for t in targets {
            t.check().map_err(|e| format!("notify: {e}"))?;
            let prev = old.iter().find(|o| o.url == t.url);
            sealed.push(t.seal(&self.sealer, prev).map_err(|e| e.to_string())?);
        }
        self.store
            .set_global(sealed)
            .await
            .map_err(|e| e.to_string())
    }

    /// Records `event` for the stack's targets and the global ones and wakes
    /// the sender. Returns at once; a failure is logged, never returned.
    pub fn emit(self: &Arc<Self>, stack_targets: Vec<Target>, event: Event) {
        let me = self.clone();
        tokio::spawn(
            async move {
                let result = async {
                    let mut targets = stack_targets;
                    targets.extend(me.store.global().await?);
                    let mut n = 0;
                    for t in targets.into_iter().filter(|t| t.wants(&event.event)) {
                        me.store.insert(Delivery::new(&t, &event)).await?;
                        n += 1;
                    }
                    Ok::<_, crate::store::StoreError>(n)
                }
                .await;
                match result {
                    Ok(0) => {}
                    Ok(n) => {
                        info!(event = %event.event, stack = %event.stack, targets = n, "notification queued");
                        me.wake.notify_one();
                    }
                    Err(e) => warn!(error = %e, event = %event.event, "recording a notification failed"),
                }
            }
            .instrument(info_span!("notify_emit")),
        );
    }

    pub async fn list(
        &self,
        stack: Option<String>,
        limit: u32,
    ) -> Result<Vec<Delivery>, crate::store::StoreError> {
        self.store.list(stack, limit).await
    }

    /// Spawns the sender; it stops on `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = me.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    let due = match me.store.due(now_ms(), 64).await {
                        Ok(d) => d,
                        Err(e) => {
                            warn!(error = %e, "reading due notifications failed");
                            continue;
                        }
                    };
                    for d in due {
                        if !me.in_flight.lock().insert(d.id.clone()) {
                            continue;
                        }
                        let me2 = me.clone();
                        tokio::spawn(
                            async move {
                                let id = d.id.clone();
                                me2.attempt(d).await;
                                me2.in_flight.lock().remove(&id);
                            }
                            .instrument(info_span!("notify_send")),
                        );
                    }
                }
            }
            .instrument(info_span!("notifier")),
        );
    }

    async fn attempt(&self, mut d: Delivery) {
        let secret = match &d.target.secret {
            None => None,
            Some(s) => match self.sealer.open(&d.target.url, s) {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!(delivery = %d.id, error = %e, "the target's secret cannot be opened");
                    None
                }
            },
        };
        let started = std::time::Instant::now();
        let at_ms = now_ms();
        let result = self
            .client
            .post(&d, secret.as_deref(), d.target.timeout())
            .await;
        let attempt = store::Attempt {
            at_ms,
            status: result.status,
            error: result.error.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
        };
        d.history.push(attempt);
        d.attempts += 1;
        if result.error.is_empty() {
            d.state = "delivered".into();
            self.metrics
                .notify_delivered
                .fetch_add(1, Ordering::Relaxed);
            info!(delivery = %d.id, event = %d.event.event, status = result.status, "notification delivered");
        } else {
            self.metrics
                .notify_attempts_failed
                .fetch_add(1, Ordering::Relaxed);
            let permanent =
                matches!(result.status, 400..=499) && !matches!(result.status, 408 | 429);
            if permanent || d.attempts >= MAX_ATTEMPTS {
                d.state = "failed".into();
                self.metrics.notify_given_up.fetch_add(1, Ordering::Relaxed);
                warn!(delivery = %d.id, event = %d.event.event, attempts = d.attempts, error = %result.error, "notification given up");
            } else {
                let wait = backoff(d.attempts);
                d.next_at_ms = now_ms() + wait.as_millis() as i64;
                warn!(delivery = %d.id, event = %d.event.event, attempt = d.attempts, error = %result.error, retry_in = ?wait, "notification attempt failed");
            }
        }
        if let Err(e) = self.store.save(d).await {
            warn!(error = %e, "recording a notification attempt failed");
        }
    }
}

/// Wait before the attempt after `failed` failed attempts.
pub fn backoff(failed: u32) -> Duration {
    let exp = failed.saturating_sub(1).min(20);
    FIRST_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn targets_are_checked_and_never_show_their_secret() {
        let t = Target {
            url: "https://hooks.example.com/x".into(),
            secret_value: b"shh-canary".to_vec(),
            ..Default::default()
        };
        assert!(t.check().is_ok());
        assert!(!format!("{t:?}").contains("shh-canary"));
        let bad = |f: fn(&mut Target)| {
            let mut x = t.clone();
            f(&mut x);
            x.check().unwrap_err()
        };
        assert!(bad(|t| t.url = "ftp://x/y".into()).contains("http"));
        assert!(bad(|t| t.url = "not a url".into()).contains("URL"));
        assert!(bad(|t| t.format = "xml".into()).contains("format"));
        assert!(bad(|t| t.events = vec!["drift.exploded".into()]).contains("drift.exploded"));
        assert!(t.wants("drift.detected"));
        let only = Target {
            events: vec!["run.failed".into()],
            ..t
        };
        assert!(!only.wants("drift.detected"));
    }
}
