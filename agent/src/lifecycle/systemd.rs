//! The systemd notification protocol (`Type=notify`), through `sd-notify`.
//!
//! `READY=1` once Docker answered and the first session is up; `WATCHDOG=1`
//! from the live loop; `STATUS=` when what the agent does changes;
//! `STOPPING=1` and `EXTEND_TIMEOUT_USEC=` while it drains. Outside systemd
//! (no `NOTIFY_SOCKET`) every call does nothing.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sd_notify::NotifyState;
use tracing::debug;

/// Sends notifications to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    /// Half the watchdog timeout systemd asked for (`WATCHDOG_USEC`).
    watchdog_every: Option<Duration>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last_watchdog: Option<Instant>,
    last_status: String,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` / `WATCHDOG_USEC` / `WATCHDOG_PID` once.
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut usec = 0u64;
        let watchdog_every = (enabled && sd_notify::watchdog_enabled(false, &mut usec))
            .then(|| Duration::from_micros(usec / 2))
            .filter(|d| !d.is_zero());
        Notifier {
            enabled,
            watchdog_every,
            state: Mutex::new(State {
                last_watchdog: None,
                last_status: String::new(),
            }),
        }
    }

    /// A notifier that never sends (tests, `--check-config`).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog_every: None,
            state: Mutex::new(State {
                last_watchdog: None,
                last_status: String::new(),
            }),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            debug!(error = %e, "could not notify the service manager");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.state.lock().last_status = status.to_string();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `STATUS=` if it changed since the last one.
    pub fn status(&self, status: &str) {
        {
            let mut s = self.state.lock();
            if s.last_status == status {
                return;
            }
            s.last_status = status.to_string();
        }
        self.send(&[NotifyState::Status(status)]);
    }

    /// `WATCHDOG=1`, at most every half watchdog period (call it from the
    /// live loop as often as it turns).
    pub fn watchdog(&self) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        {
            let mut s = self.state.lock();
            let now = Instant::now();
            if s.last_watchdog
                .is_some_and(|t| now.duration_since(t) < every)
            {
                return;
            }
            s.last_watchdog = Some(now);
        }
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.state.lock().last_status = status.to_string();
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// `EXTEND_TIMEOUT_USEC=`: the stop may take `by` more from now.
    pub fn extend_timeout(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }
}
