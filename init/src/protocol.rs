//! What the agent and `outpost-init` agree on: the command line, the lease
//! file and the exit codes. Shared by both, so that they cannot drift.

use std::time::{Duration, SystemTime};

/// Where the agent mounts the init binary (read-only) in a job container.
pub const INIT_PATH: &str = "/run/outpost-init";
/// Where the agent mounts the job's lease directory (read-only).
pub const LEASE_DIR: &str = "/run/outpost-lease";
/// The lease file's name in [`LEASE_DIR`]. The agent replaces it by
/// `rename`, so the directory, not the file, is mounted.
pub const LEASE_FILE: &str = "lease";

/// The init could not start the job (bad arguments, no lease file, the lease
/// already over).
pub const EXIT_INIT_FAILED: i32 = 250;
/// The job was stopped because its lease deadline passed.
pub const EXIT_LEASE_EXPIRED: i32 = 251;
/// The job was stopped because its timeout passed.
pub const EXIT_TIMED_OUT: i32 = 252;
/// The job's command could not be found.
pub const EXIT_NOT_FOUND: i32 = 127;
/// The job's command could not be run.
pub const EXIT_CANNOT_RUN: i32 = 126;

/// The lease as the agent last renewed it, in wall-clock time (the host's
/// `CLOCK_REALTIME`, shared by every container on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// No lease bounds the job (a run without a control plane); only the
    /// timeout applies.
    Unbounded,
    /// Stop the job (one `SIGINT` to its process group) at `stop_at`; kill
    /// everything at `kill_at` at the latest.
    Until {
        stop_at: SystemTime,
        kill_at: SystemTime,
    },
}

impl Lease {
    /// `v1 <stop_at_ms> <kill_at_ms>\n` (Unix milliseconds) or `v1 none\n`.
    pub fn encode(&self) -> String {
        match self {
            Lease::Unbounded => "v1 none\n".to_string(),
            Lease::Until { stop_at, kill_at } => {
                format!("v1 {} {}\n", unix_ms(*stop_at), unix_ms(*kill_at))
            }
        }
    }

    /// The inverse of [`encode`](Self::encode); `None` for anything else.
    pub fn decode(text: &str) -> Option<Lease> {
        let mut words = text.split_ascii_whitespace();
        if words.next()? != "v1" {
            return None;
        }
        let lease = match (words.next()?, words.next()) {
            ("none", None) => Lease::Unbounded,
            (stop, Some(kill)) => {
                let stop_at = from_unix_ms(stop.parse().ok()?)?;
                let kill_at = from_unix_ms(kill.parse().ok()?)?;
                if kill_at < stop_at {
                    return None;
                }
                Lease::Until { stop_at, kill_at }
            }
            _ => return None,
        };
        words.next().is_none().then_some(lease)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_unix_ms(ms: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The init's arguments before the job's command: the lease file, the job's
/// timeout (if any) and the stop grace.
pub fn args(timeout: Option<Duration>, grace: Duration) -> Vec<String> {
    let mut args = vec![
        INIT_PATH.to_string(),
        "--lease".to_string(),
        format!("{LEASE_DIR}/{LEASE_FILE}"),
        "--grace-ms".to_string(),
        grace.as_millis().to_string(),
    ];
    if let Some(timeout) = timeout {
        args.push("--timeout-ms".to_string());
        args.push(timeout.as_millis().to_string());
    }
    args.push("--".to_string());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trips_and_rejects_garbage() {
        let at = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let lease = Lease::Until {
            stop_at: at(1_700_000_000_123),
            kill_at: at(1_700_000_002_000),
        };
        assert_eq!(lease.encode(), "v1 1700000000123 1700000002000\n");
        assert_eq!(Lease::decode(&lease.encode()), Some(lease));
        assert_eq!(Lease::decode("v1 none\n"), Some(Lease::Unbounded));
        for bad in [
            "",
            "v1",
            "v2 1 2",
            "v1 2 1",
            "v1 1",
            "v1 1 2 3",
            "v1 none 1",
            "v1 -1 2",
            "v1 x y",
        ] {
            assert_eq!(Lease::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn args_end_with_the_separator() {
        let a = args(Some(Duration::from_secs(3)), Duration::from_millis(1500));
        assert_eq!(
            a,
            [
                "/run/outpost-init",
                "--lease",
                "/run/outpost-lease/lease",
                "--grace-ms",
                "1500",
                "--timeout-ms",
                "3000",
                "--"
            ]
        );
        assert_eq!(args(None, Duration::ZERO).len(), 6);
    }
}
