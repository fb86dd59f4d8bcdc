//! The agent's fence and the deadlines it writes for `outpost-init`.

use std::time::{Duration, SystemTime};

use crate::executor::Lease as FenceLease;

/// Largest log chunk sent in one message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Tunables of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeLimits {
    pub capacity: u32,
    /// Unacknowledged bytes held per job before its output is slowed down.
    pub log_buffer: usize,
    /// How long a job's output may wait for spool space before the job fails.
    pub spool_full_timeout: Duration,
    /// The executor's SIGINT-to-SIGKILL grace: self-fencing starts early
    /// enough for the job to be dead before the lease expires on the server.
    pub stop_grace: Duration,
}

impl RuntimeLimits {
    /// Time after a renewal at which the agent starts stopping a job it could
    /// not renew: the lease TTL minus the stop grace minus a safety margin,
    /// but never less than half the TTL.
    pub fn fence_after(&self, ttl: Duration) -> Duration {
        ttl.saturating_sub(self.stop_grace + Self::margin(ttl))
            .max(ttl / 2)
    }

    /// Safety margin between the job's death and the lease's expiry on the
    /// control plane (covers the renewal's trip and clock reading).
    fn margin(ttl: Duration) -> Duration {
        (ttl / 10).min(Duration::from_secs(2))
    }

    /// The lease `outpost-init` enforces in the container, for a renewal
    /// received now: one `SIGINT` a moment after the agent's own fence
    /// ([`fence_after`](Self::fence_after)), so that a live agent stops and
    /// reports the job itself; `SIGKILL` at `ttl − margin` at the latest,
    /// strictly before the control plane can lease the job again, even when
    /// the grace does not fit in the TTL.
    pub fn container_lease(&self, ttl: Duration, now: SystemTime) -> FenceLease {
        let kill_after = ttl.saturating_sub(Self::margin(ttl));
        let lag = (self.stop_grace / 4).min(INIT_LAG);
        let stop_after = (self.fence_after(ttl) + lag).min(kill_after);
        FenceLease::Until {
            stop_at: now + stop_after,
            kill_at: now + kill_after,
        }
    }
}

/// How long after the agent's own fence `outpost-init` sends its `SIGINT`.
const INIT_LAG: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_starts_before_the_server_can_expire_the_lease() {
        let limits = RuntimeLimits {
            capacity: 1,
            log_buffer: 1 << 20,
            spool_full_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(10),
        };
        let ttl = Duration::from_secs(30);
        let f = limits.fence_after(ttl);
        assert!(f + limits.stop_grace < ttl, "{f:?}");
        assert_eq!(f, Duration::from_secs(18));
        // A grace longer than the TTL still leaves half the TTL.
        assert_eq!(
            limits.fence_after(Duration::from_secs(4)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn the_container_kills_strictly_before_the_lease_expires() {
        let limits = RuntimeLimits {
            capacity: 1,
            log_buffer: 1 << 20,
            spool_full_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(10),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |d: Duration| now + d;
        // TTL 30 s: the agent fences at 18 s, the init interrupts at 18.5 s
        // and kills at 28 s (the margin is 2 s).
        assert_eq!(
            limits.container_lease(Duration::from_secs(30), now),
            FenceLease::Until {
                stop_at: at(Duration::from_millis(18_500)),
                kill_at: at(Duration::from_secs(28)),
            }
        );
        // A grace longer than the TTL: the kill still comes before expiry.
        let FenceLease::Until { stop_at, kill_at } =
            limits.container_lease(Duration::from_secs(4), now)
        else {
            panic!("bounded lease expected");
        };
        assert_eq!(kill_at, at(Duration::from_millis(3_600)));
        assert!(stop_at <= kill_at && kill_at < at(Duration::from_secs(4)));
    }
}
