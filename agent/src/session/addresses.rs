//! Which control plane address the next connection goes to, and how long
//! to wait before it. The control plane may run as several replicas over
//! one store (`server` and `servers` in the configuration): the agent keeps
//! one session with one of them and moves on to the next address, round
//! robin, whenever a connection fails or a session ends.
//!
//! The backoff grows only once every address failed in a row, so a dead
//! replica costs one short wait, not a doubled one; a session that stayed
//! up for [`STABLE`] starts the backoff over.

use std::time::{Duration, Instant};

/// A session up at least this long resets the backoff and the failure count.
pub const STABLE: Duration = Duration::from_secs(30);

/// The shortest wait between two connection attempts.
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);

/// The control plane's addresses and the state of the rotation over them.
#[derive(Debug)]
pub struct Addresses {
    urls: Vec<String>,
    next: usize,
    /// Attempts failed in a row (connections and sessions that ended early).
    failures: usize,
    backoff: Duration,
    max_backoff: Duration,
    /// When the session on the current address came up.
    up_since: Option<Instant>,
}

impl Addresses {
    /// Starts at the first of `urls` (`server`); an empty list is treated
    /// as one empty address, which then fails to connect.
    pub fn new(urls: Vec<String>, max_backoff: Duration) -> Addresses {
        let urls = if urls.is_empty() {
            vec![String::new()]
        } else {
            urls
        };
        Addresses {
            urls,
            next: 0,
            failures: 0,
            backoff: MIN_BACKOFF.min(max_backoff),
            max_backoff,
            up_since: None,
        }
    }

    /// The address of the next connection attempt.
    pub fn current(&self) -> &str {
        &self.urls[self.next]
    }

    /// A session is up on [`Self::current`] since `at`.
    pub fn established(&mut self, at: Instant) {
        self.up_since = Some(at);
    }

    /// The attempt on [`Self::current`] failed, or its session ended at
    /// `at`: moves on to the next address and returns the wait before
    /// trying it (to be jittered by the caller).
    pub fn failed(&mut self, at: Instant) -> Duration {
        let stable = self
            .up_since
            .take()
            .is_some_and(|since| at.saturating_duration_since(since) >= STABLE);
        if stable {
            self.failures = 0;
            self.backoff = MIN_BACKOFF.min(self.max_backoff);
        }
        let wait = self.backoff;
        self.failures += 1;
        self.next = (self.next + 1) % self.urls.len();
        if self.failures.is_multiple_of(self.urls.len()) {
            self.backoff = (self.backoff * 2).min(self.max_backoff);
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Addresses {
        Addresses::new(
            vec!["https://a".into(), "https://b".into(), "https://c".into()],
            Duration::from_secs(10),
        )
    }

    #[test]
    fn failures_rotate_round_robin_from_server() {
        let mut a = three();
        let t = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(a.current().to_string());
            a.failed(t);
        }
        assert_eq!(
            seen,
            [
                "https://a",
                "https://b",
                "https://c",
                "https://a",
                "https://b",
                "https://c",
                "https://a"
            ]
        );
    }

    #[test]
    fn backoff_grows_only_once_every_address_failed_in_a_row() {
        let mut a = three();
        let t = Instant::now();
        let waits: Vec<u64> = (0..9).map(|_| a.failed(t).as_millis() as u64).collect();
        assert_eq!(waits, [200, 200, 200, 400, 400, 400, 800, 800, 800]);
        let mut one = Addresses::new(vec!["https://a".into()], Duration::from_millis(500));
        let waits: Vec<u64> = (0..4).map(|_| one.failed(t).as_millis() as u64).collect();
        assert_eq!(
            waits,
            [200, 400, 500, 500],
            "one address: doubles every time, capped"
        );
    }

    #[test]
    fn an_ended_session_moves_on_and_a_stable_one_resets_the_backoff() {
        let mut a = three();
        let t = Instant::now();
        for _ in 0..4 {
            a.failed(t);
        }
        assert_eq!(a.current(), "https://b");
        // Up briefly: the replica went away; next address, no reset.
        a.established(t);
        assert_eq!(
            a.failed(t + Duration::from_secs(1)),
            Duration::from_millis(400)
        );
        assert_eq!(a.current(), "https://c");
        // Up for a while: next address, tried after the shortest wait, and
        // the others get a full round before the backoff grows.
        a.established(t);
        assert_eq!(a.failed(t + STABLE), MIN_BACKOFF);
        assert_eq!(a.current(), "https://a");
        assert_eq!(a.failed(t + STABLE), MIN_BACKOFF);
        assert_eq!(a.failed(t + STABLE), MIN_BACKOFF);
        assert_eq!(a.failed(t + STABLE), MIN_BACKOFF * 2);
    }

    #[test]
    fn a_short_session_does_not_stop_the_backoff_from_growing() {
        let mut a = Addresses::new(
            vec!["https://a".into(), "https://b".into()],
            Duration::from_secs(10),
        );
        let t = Instant::now();
        let waits: Vec<u64> = (0..4)
            .map(|_| {
                a.established(t);
                a.failed(t + Duration::from_secs(1)).as_millis() as u64
            })
            .collect();
        assert_eq!(waits, [200, 200, 400, 400]);
    }
}
