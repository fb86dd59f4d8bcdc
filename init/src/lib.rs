//! `outpost-init`: PID 1 of every Outpost job container.
//!
//! The agent bind-mounts this static binary read-only into each job's
//! container and makes it the entrypoint. It starts the job's command as its
//! child in a process group of its own, forwards the signals it receives to
//! that group (a `SIGINT` only once, whoever sends it), reaps every zombie,
//! and enforces two limits **by itself, without the agent**:
//!
//! - the **lease**: the agent writes the lease's deadlines into a file on
//!   the host ([`protocol::Lease`]), mounted read-only, and rewrites it on
//!   each renewal. At `stop_at` the job's process group gets one `SIGINT`;
//!   at the earlier of `stop_at + grace` and `kill_at` the init sends
//!   `SIGKILL` to the group and exits with [`EXIT_LEASE_EXPIRED`], which
//!   makes the kernel kill whatever is left in the container's PID
//!   namespace. An unreadable or malformed file keeps the last deadline: it
//!   never extends the lease.
//! - the job's **timeout**, counted from the init's start: the same sequence,
//!   then [`EXIT_TIMED_OUT`].
//!
//! So a job never outlives its lease, even if the agent was killed and never
//! comes back. The job cannot stop this: the kernel does not deliver
//! `SIGKILL` or `SIGSTOP` from inside a PID namespace to its init, the init
//! makes itself non-dumpable (no `ptrace`, no `/proc/1/mem`), and the lease
//! file and this binary are read-only mounts.
//!
//! Otherwise the init exits with the job's own status (`128 + n` if signal
//! `n` killed it). It prints only its own failures, to stderr.

pub mod protocol;
mod sys;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

pub use protocol::{EXIT_INIT_FAILED, EXIT_LEASE_EXPIRED, EXIT_TIMED_OUT, Lease};

/// How often the lease file is read again (and the longest a deadline can
/// be overshot by).
const TICK: Duration = Duration::from_millis(100);

/// The init's command line.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    lease: PathBuf,
    grace: Duration,
    timeout: Option<Duration>,
    command: Vec<OsString>,
}

fn parse_args(args: Vec<OsString>) -> Result<Args, String> {
    let mut lease = None;
    let mut grace = None;
    let mut timeout = None;
    let mut it = args.into_iter();
    let ms = |v: Option<OsString>, name: &str| -> Result<Duration, String> {
        v.and_then(|v| v.into_string().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .ok_or_else(|| format!("{name} needs a number of milliseconds"))
    };
    loop {
        let Some(arg) = it.next() else {
            return Err("missing `--` before the job's command".to_string());
        };
        match arg.to_str() {
            Some("--lease") => lease = it.next().map(PathBuf::from),
            Some("--grace-ms") => grace = Some(ms(it.next(), "--grace-ms")?),
            Some("--timeout-ms") => timeout = Some(ms(it.next(), "--timeout-ms")?),
            Some("--") => break,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let command: Vec<OsString> = it.collect();
    if command.is_empty() {
        return Err("no command to run".to_string());
    }
    Ok(Args {
        lease: lease.ok_or("--lease is required")?,
        grace: grace.ok_or("--grace-ms is required")?,
        timeout,
        command,
    })
}

/// Why the init is stopping the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Lease,
    Timeout,
}

impl Reason {
    fn exit_code(self) -> i32 {
        match self {
            Reason::Lease => EXIT_LEASE_EXPIRED,
            Reason::Timeout => EXIT_TIMED_OUT,
        }
    }
}

/// What to do to the job now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// One `SIGINT` to the job's group (unless it already had one).
    Interrupt(Reason),
    /// `SIGKILL` to the job's group, then exit.
    Kill(Reason),
}

/// The fence's decisions, as a pure function of the clocks (unit tested).
#[derive(Debug)]
pub struct Fence {
    lease: Lease,
    grace: Duration,
    timeout_at: Option<Instant>,
    /// Why and when (monotonic) the stop began.
    stopping: Option<(Reason, Instant)>,
}

impl Fence {
    pub fn new(lease: Lease, grace: Duration, started: Instant, timeout: Option<Duration>) -> Self {
        Fence {
            lease,
            grace,
            timeout_at: timeout.map(|t| started + t),
            stopping: None,
        }
    }

    /// The lease as last read (a renewal replaces it).
    pub fn renew(&mut self, lease: Lease) {
        self.lease = lease;
    }

    pub fn stopping(&self) -> Option<Reason> {
        self.stopping.map(|(r, _)| r)
    }

    pub fn step(&mut self, wall: SystemTime, mono: Instant) -> Action {
        let (stop_due, kill_due) = match self.lease {
            Lease::Unbounded => (false, false),
            Lease::Until { stop_at, kill_at } => (wall >= stop_at, wall >= kill_at),
        };
        if let Some((reason, since)) = self.stopping {
            if kill_due {
                return Action::Kill(Reason::Lease);
            }
            if mono >= since + self.grace {
                return Action::Kill(reason);
            }
            return Action::Nothing;
        }
        let reason = if stop_due {
            Reason::Lease
        } else if self.timeout_at.is_some_and(|t| mono >= t) {
            Reason::Timeout
        } else {
            return Action::Nothing;
        };
        self.stopping = Some((reason, mono));
        if kill_due {
            Action::Kill(reason)
        } else {
            Action::Interrupt(reason)
        }
    }
}

/// Runs the init with its arguments (without the program name); returns
/// the exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("outpost-init: {message}");
            EXIT_INIT_FAILED
        }
    }
}

fn read_lease(path: &std::path::Path) -> Option<Lease> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| Lease::decode(&text))
}

fn run(args: Vec<OsString>) -> Result<i32, String> {
    let args = parse_args(args)?;
    sys::make_undumpable().map_err(|e| format!("making the init undumpable failed: {e}"))?;
    sys::block_all_signals().map_err(|e| format!("blocking signals failed: {e}"))?;
    let lease = read_lease(&args.lease)
        .ok_or_else(|| format!("no valid lease in {}", args.lease.display()))?;
    let started = Instant::now();
    let mut fence = Fence::new(lease, args.grace, started, args.timeout);
    if let Action::Kill(_) | Action::Interrupt(_) = fence.step(SystemTime::now(), started) {
        return Err("the job's lease or timeout is already over; not starting it".to_string());
    }

    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    let child = sys::spawn_in_group(&mut command);
    let child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!("outpost-init: cannot run {:?}: {e}", args.command[0]);
            return Ok(match e.kind() {
                std::io::ErrorKind::NotFound => protocol::EXIT_NOT_FOUND,
                _ => protocol::EXIT_CANNOT_RUN,
            });
        }
    };
    // The child's pid is its process group id (process_group(0)).
    let pgid = i32::try_from(child.id()).map_err(|_| "child pid out of range".to_string())?;
    let mut interrupted = false;
    let mut last_read = started;
    loop {
        let signal = sys::wait_signal(TICK);
        match signal {
            Some(sys::SIGCHLD) | None => {}
            Some(sys::SIGINT) => {
                if !interrupted {
                    interrupted = true;
                    sys::kill_group(pgid, sys::SIGINT);
                }
            }
            Some(sig) => sys::kill_group(pgid, sig),
        }
        while let Some((pid, status)) = sys::reap() {
            if pid == pgid {
                return Ok(match fence.stopping() {
                    Some(reason) => reason.exit_code(),
                    None => exit_code(status),
                });
            }
        }
        let now = Instant::now();
        if now.duration_since(last_read) >= TICK {
            last_read = now;
            if let Some(lease) = read_lease(&args.lease) {
                fence.renew(lease);
            }
        }
        match fence.step(SystemTime::now(), now) {
            Action::Nothing => {}
            Action::Interrupt(_) => {
                if !interrupted {
                    interrupted = true;
                    sys::kill_group(pgid, sys::SIGINT);
                }
            }
            Action::Kill(reason) => {
                if !interrupted {
                    sys::kill_group(pgid, sys::SIGINT);
                }
                sys::kill_group(pgid, sys::SIGKILL);
                // Exiting kills everything left in the PID namespace.
                return Ok(reason.exit_code());
            }
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
fn exit_code(status: i32) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::ExitStatus::from_raw(status);
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => EXIT_INIT_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_parse_and_errors_are_named() {
        let a = parse_args(os(&[
            "--lease",
            "/l",
            "--grace-ms",
            "2000",
            "--timeout-ms",
            "5",
            "--",
            "sh",
            "-c",
            "x",
        ]))
        .unwrap();
        assert_eq!(
            a,
            Args {
                lease: "/l".into(),
                grace: Duration::from_secs(2),
                timeout: Some(Duration::from_millis(5)),
                command: os(&["sh", "-c", "x"]),
            }
        );
        assert!(parse_args(os(&["--lease", "/l", "--grace-ms", "1", "--"])).is_err());
        assert!(parse_args(os(&["--grace-ms", "1", "--", "true"])).is_err());
        assert!(parse_args(os(&["--lease", "/l", "--grace-ms", "x", "--", "true"])).is_err());
        assert!(parse_args(os(&["--lease", "/l", "--grace-ms", "1", "true"])).is_err());
    }

    #[test]
    fn the_lease_stops_then_kills_within_its_bounds() {
        let wall0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mono0 = Instant::now();
        let s = Duration::from_secs;
        let lease = Lease::Until {
            stop_at: wall0 + s(10),
            kill_at: wall0 + s(12),
        };
        let mut f = Fence::new(lease, s(5), mono0, None);
        assert_eq!(f.step(wall0 + s(9), mono0 + s(9)), Action::Nothing);
        assert_eq!(
            f.step(wall0 + s(10), mono0 + s(10)),
            Action::Interrupt(Reason::Lease)
        );
        assert_eq!(f.step(wall0 + s(11), mono0 + s(11)), Action::Nothing);
        // kill_at comes before the grace is over.
        assert_eq!(
            f.step(wall0 + s(12), mono0 + s(12)),
            Action::Kill(Reason::Lease)
        );
    }

    #[test]
    fn a_renewal_moves_the_deadline_and_the_grace_bounds_the_stop() {
        let wall0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mono0 = Instant::now();
        let s = Duration::from_secs;
        let until = |stop, kill| Lease::Until {
            stop_at: wall0 + s(stop),
            kill_at: wall0 + s(kill),
        };
        let mut f = Fence::new(until(10, 20), s(2), mono0, None);
        f.renew(until(30, 40));
        assert_eq!(f.step(wall0 + s(15), mono0 + s(15)), Action::Nothing);
        assert_eq!(
            f.step(wall0 + s(30), mono0 + s(30)),
            Action::Interrupt(Reason::Lease)
        );
        assert_eq!(f.step(wall0 + s(31), mono0 + s(31)), Action::Nothing);
        assert_eq!(
            f.step(wall0 + s(32), mono0 + s(32)),
            Action::Kill(Reason::Lease)
        );
        // A lease already past its kill time kills at once.
        let mut f = Fence::new(until(1, 2), s(2), mono0, None);
        assert_eq!(
            f.step(wall0 + s(3), mono0 + s(3)),
            Action::Kill(Reason::Lease)
        );
    }

    #[test]
    fn the_timeout_counts_from_the_start_and_the_lease_still_bounds_it() {
        let wall0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mono0 = Instant::now();
        let s = Duration::from_secs;
        let mut f = Fence::new(Lease::Unbounded, s(3), mono0, Some(s(5)));
        assert_eq!(f.step(wall0 + s(100), mono0 + s(4)), Action::Nothing);
        assert_eq!(
            f.step(wall0 + s(100), mono0 + s(5)),
            Action::Interrupt(Reason::Timeout)
        );
        assert_eq!(f.step(wall0 + s(100), mono0 + s(7)), Action::Nothing);
        assert_eq!(
            f.step(wall0 + s(100), mono0 + s(8)),
            Action::Kill(Reason::Timeout)
        );
        assert_eq!(f.stopping(), Some(Reason::Timeout));

        let lease = Lease::Until {
            stop_at: wall0 + s(50),
            kill_at: wall0 + s(51),
        };
        let mut f = Fence::new(lease, s(30), mono0, Some(s(5)));
        assert_eq!(
            f.step(wall0 + s(5), mono0 + s(5)),
            Action::Interrupt(Reason::Timeout)
        );
        assert_eq!(
            f.step(wall0 + s(51), mono0 + s(10)),
            Action::Kill(Reason::Lease)
        );
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(9), 137);
        assert_eq!(exit_code(2), 130);
    }
}
