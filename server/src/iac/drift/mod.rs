//! Drift detection: a per-stack schedule starts drift runs (plan only, on
//! the agent: `plan -refresh-only -detailed-exitcode`, then a normal plan of
//! the same checkout). The drifted resources (what the refresh found moved,
//! and what the plan would change to bring the world back to the code),
//! minus the stack's `ignore` globs, make the **drift fingerprint**: a
//! SHA-256 of the sorted addresses and actions. The stack's drift status is
//! `in_sync`, `drifted` (since, fingerprint, resources) or `unknown` (never
//! checked, or the last check failed, with why).
//!
//! Notifications fire on transitions only ([`observe`]): a new drift, a
//! different fingerprint, the drift gone, and the first failed check of a
//! series; an identical drift found again sends nothing.
//!
//! Scheduling and running checks: [`schedule`]. The decisions here are pure
//! functions, tested without a control plane.

pub mod cli;
pub mod schedule;

use std::str::FromStr as _;

use super::model::ResourceChange;

/// The `[stack.drift]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DriftSpec {
    /// Cron expression: 5 fields, or 6 with seconds first.
    pub schedule: String,
    /// IANA time zone name; empty: UTC.
    pub timezone: String,
    /// Checks never closer together than this.
    pub min_interval_ms: u64,
    /// Each instant is delayed by up to this much (stable per stack).
    pub jitter_ms: u64,
    /// Address globs (`*`) whose drift does not count.
    pub ignore: Vec<String>,
    /// Drift found: queue a tracked run to revert it.
    pub reconcile: bool,
    /// A check no agent takes within this long fails; zero: [`QUEUE_TIMEOUT_MS`].
    pub queue_timeout_ms: u64,
}

/// How long a drift check waits for an agent by default.
pub const QUEUE_TIMEOUT_MS: u64 = 3_600_000;

/// The schedule of a stack checked only on demand.
pub const MANUAL: &str = "manual";

/// Longest jitter.
const MAX_JITTER_MS: u64 = 3_600_000;

impl DriftSpec {
    /// Parses the schedule and the time zone; the error says which is wrong.
    pub fn check(&self) -> Result<(), String> {
        if !self.is_manual() {
            self.cron()?;
        }
        self.tz()?;
        if self.jitter_ms > MAX_JITTER_MS {
            return Err("jitter is longer than 1h".into());
        }
        if self.ignore.len() > 1000 || self.ignore.iter().any(|g| g.is_empty() || g.len() > 1024) {
            return Err("ignore: at most 1000 non-empty globs of up to 1024 bytes".into());
        }
        Ok(())
    }

    /// `schedule = "manual"`: no scheduled check; `outpost stack check`
    /// runs one.
    pub fn is_manual(&self) -> bool {
        self.schedule.trim() == MANUAL
    }

    fn cron(&self) -> Result<croner::Cron, String> {
        if self.schedule.trim().is_empty() {
            return Err("schedule is required".into());
        }
        croner::Cron::from_str(self.schedule.trim())
            .map_err(|e| format!("schedule {:?} is not a cron expression: {e}", self.schedule))
    }

    fn tz(&self) -> Result<chrono_tz::Tz, String> {
        if self.timezone.is_empty() {
            return Ok(chrono_tz::UTC);
        }
        self.timezone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("timezone {:?} is not an IANA time zone", self.timezone))
    }

    /// The first scheduled instant strictly after `after_ms`, moved by the
    /// stack's jitter, and no earlier than `min_interval` after `last_ms`.
    pub fn next_after(&self, stack: &str, after_ms: i64, last_ms: i64) -> Option<i64> {
        let cron = self.cron().ok()?;
        let tz = self.tz().ok()?;
        let jitter = jitter_of(stack, self.jitter_ms) as i64;
        // The schedule is evaluated without the jitter, then shifted.
        // Schedules name whole seconds: evaluate from the whole second at
        // or before, so the next occurrence lands on a second boundary.
        let base_ms = (after_ms - jitter).div_euclid(1000) * 1000;
        let base = chrono::DateTime::from_timestamp_millis(base_ms)?.with_timezone(&tz);
        let next = cron.find_next_occurrence(&base, false).ok()?;
        let at = next.timestamp_millis() + jitter;
        let floor = if last_ms > 0 {
            last_ms + self.min_interval_ms as i64
        } else {
            0
        };
        Some(at.max(floor))
    }

    pub fn ignored(&self, address: &str) -> bool {
        self.ignore
            .iter()
            .any(|g| outpost_agent::aws::glob::matches(g, address))
    }
}

/// A stable delay in `[0, max)` for a stack, so stacks sharing a schedule
/// do not all fire at once.
pub fn jitter_of(stack: &str, max_ms: u64) -> u64 {
    if max_ms == 0 {
        return 0;
    }
    let d = ring::digest::digest(&ring::digest::SHA256, stack.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b) % max_ms
}

/// A stack's drift status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    InSync,
    Drifted,
    #[default]
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InSync => "in_sync",
            Status::Drifted => "drifted",
            Status::Unknown => "unknown",
        }
    }
}

/// What the control plane knows about a stack's drift.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DriftState {
    pub status: Status,
    /// Drifted: since when.
    pub since_ms: i64,
    pub fingerprint: String,
    pub resources: Vec<ResourceChange>,
    /// Unknown: why.
    pub reason: String,
    pub checked_ms: i64,
    /// Next scheduled check; zero: none.
    pub next_ms: i64,
    /// The schedule `next_ms` was computed for (recomputed when it changes).
    pub schedule_of: String,
    pub last_run: String,
    /// The fingerprint receivers were last told about ("" = in sync).
    pub notified: String,
    /// A `drift.check_failed` was sent for the current series of failures.
    pub failure_notified: bool,
}

/// A check's result as the agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The refresh-only plan's drift and the normal plan's changes.
    Checked {
        drifted: Vec<ResourceChange>,
        changes: Vec<ResourceChange>,
    },
    Failed(String),
}

/// Drifted resources minus the ignored ones, sorted, each once.
pub fn resources(
    spec: &DriftSpec,
    outcome_drifted: &[ResourceChange],
    changes: &[ResourceChange],
) -> Vec<ResourceChange> {
    let mut out: Vec<ResourceChange> = outcome_drifted
        .iter()
        .chain(changes)
        .filter(|r| !spec.ignored(&r.address))
        .cloned()
        .collect();
    out.sort_by(|a, b| (&a.address, &a.actions).cmp(&(&b.address, &b.actions)));
    out.dedup();
    out
}

/// Hex SHA-256 over the sorted `address actions` lines.
pub fn fingerprint(resources: &[ResourceChange]) -> String {
    let mut lines: Vec<String> = resources
        .iter()
        .map(|r| format!("{}\t{}\n", r.address, r.actions.join(",")))
        .collect();
    lines.sort();
    lines.dedup();
    let d = ring::digest::digest(&ring::digest::SHA256, lines.concat().as_bytes());
    outpost_agent::iac::plan::hex(d.as_ref())
}

/// The event a check causes, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Detected,
    Changed,
    Resolved,
    CheckFailed,
}

impl Change {
    pub fn event(self) -> &'static str {
        match self {
            Change::Detected => "drift.detected",
            Change::Changed => "drift.changed",
            Change::Resolved => "drift.resolved",
            Change::CheckFailed => "drift.check_failed",
        }
    }
}

/// The new state after a check, and what to tell people (transitions and
/// new fingerprints only).
pub fn observe(
    spec: &DriftSpec,
    old: &DriftState,
    outcome: &Outcome,
    run: &str,
    now_ms: i64,
) -> (DriftState, Option<Change>) {
    let mut s = old.clone();
    s.checked_ms = now_ms;
    s.last_run = run.to_string();
    match outcome {
        Outcome::Failed(reason) => {
            s.status = Status::Unknown;
            s.reason = reason.clone();
            let change = (!old.failure_notified).then_some(Change::CheckFailed);
            s.failure_notified = true;
            (s, change)
        }
        Outcome::Checked { drifted, changes } => {
            s.failure_notified = false;
            s.reason.clear();
            let res = resources(spec, drifted, changes);
            if res.is_empty() {
                s.status = Status::InSync;
                s.since_ms = 0;
                s.fingerprint.clear();
                s.resources.clear();
                let change = (!old.notified.is_empty()).then_some(Change::Resolved);
                s.notified.clear();
                return (s, change);
            }
            let fp = fingerprint(&res);
            if old.status != Status::Drifted || old.fingerprint != fp {
                s.since_ms = now_ms;
            }
            s.status = Status::Drifted;
            s.fingerprint = fp.clone();
            s.resources = res;
            let change = if old.notified == fp {
                None
            } else if old.notified.is_empty() {
                Some(Change::Detected)
            } else {
                Some(Change::Changed)
            };
            s.notified = fp;
            (s, change)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(a: &str, act: &[&str]) -> ResourceChange {
        ResourceChange {
            address: a.into(),
            actions: act.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn checked(d: &[ResourceChange]) -> Outcome {
        Outcome::Checked {
            drifted: Vec::new(),
            changes: d.to_vec(),
        }
    }

    #[test]
    fn schedules_parse_with_time_zones_and_bad_ones_are_refused() {
        let spec = DriftSpec {
            schedule: "0 3 * * *".into(),
            timezone: "Europe/Paris".into(),
            ..Default::default()
        };
        spec.check().unwrap();
        // 2026-01-10T00:00:00Z: 03:00 in Paris (UTC+1) is 02:00Z.
        let t0 = 1_768_003_200_000;
        assert_eq!(spec.next_after("s", t0, 0), Some(t0 + 2 * 3_600_000));
        let bad = DriftSpec {
            schedule: "61 * * * *".into(),
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("schedule"));
        let bad = DriftSpec {
            schedule: "* * * * *".into(),
            timezone: "Mars/Olympus".into(),
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("Mars/Olympus"));
        // On demand only: valid, and never scheduled.
        let manual = DriftSpec {
            schedule: "manual".into(),
            ..Default::default()
        };
        manual.check().unwrap();
        assert!(manual.is_manual());
        assert_eq!(manual.next_after("s", t0, 0), None);
        // Seconds, jitter within bounds, minimum interval after the last check.
        let every5 = DriftSpec {
            schedule: "*/5 * * * * *".into(),
            jitter_ms: 2000,
            min_interval_ms: 60_000,
            ..Default::default()
        };
        every5.check().unwrap();
        let j = jitter_of("net", 2000);
        assert!(j < 2000);
        let n = every5.next_after("net", t0, 0).unwrap();
        assert!(n > t0 && n <= t0 + 7000, "{n}");
        assert_eq!((n - j as i64) % 5000, 0);
        assert_eq!(every5.next_after("net", t0, t0).unwrap(), t0 + 60_000);
    }

    #[test]
    fn the_fingerprint_ignores_order_and_ignored_addresses() {
        let spec = DriftSpec {
            ignore: vec!["null_resource.noise*".into()],
            ..Default::default()
        };
        let a = resources(
            &spec,
            &[rc("b.x", &["update"])],
            &[
                rc("a.y", &["delete", "create"]),
                rc("null_resource.noise[0]", &["update"]),
            ],
        );
        let b = resources(
            &spec,
            &[],
            &[rc("a.y", &["delete", "create"]), rc("b.x", &["update"])],
        );
        assert_eq!(a, b);
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&a[..1]));
        assert!(resources(&spec, &[], &[rc("null_resource.noise", &["create"])]).is_empty());
    }

    #[test]
    fn people_are_told_once_per_distinct_drift_and_once_per_failure_series() {
        let spec = DriftSpec::default();
        let s0 = DriftState::default();
        let (s1, c) = observe(&spec, &s0, &checked(&[]), "r1", 1);
        assert_eq!((s1.status, c), (Status::InSync, None));
        let d1 = [rc("null_resource.a", &["delete", "create"])];
        let (s2, c) = observe(&spec, &s1, &checked(&d1), "r2", 2);
        assert_eq!((s2.status, c), (Status::Drifted, Some(Change::Detected)));
        assert_eq!(s2.since_ms, 2);
        let (s3, c) = observe(&spec, &s2, &checked(&d1), "r3", 3);
        assert_eq!((s3.status, c, s3.since_ms), (Status::Drifted, None, 2));
        // Failures: one event per series, and the drift is not forgotten.
        let (s4, c) = observe(&spec, &s3, &Outcome::Failed("boom".into()), "r4", 4);
        assert_eq!((s4.status, c), (Status::Unknown, Some(Change::CheckFailed)));
        assert_eq!(s4.reason, "boom");
        let (s5, c) = observe(&spec, &s4, &Outcome::Failed("boom".into()), "r5", 5);
        assert_eq!(c, None);
        let (s6, c) = observe(&spec, &s5, &checked(&d1), "r6", 6);
        assert_eq!((s6.status, c), (Status::Drifted, None));
        let d2 = [d1[0].clone(), rc("null_resource.b", &["update"])];
        let (s7, c) = observe(&spec, &s6, &checked(&d2), "r7", 7);
        assert_eq!(c, Some(Change::Changed));
        let (s8, c) = observe(&spec, &s7, &checked(&[]), "r8", 8);
        assert_eq!((s8.status, c), (Status::InSync, Some(Change::Resolved)));
        let (_, c) = observe(&spec, &s8, &checked(&[]), "r9", 9);
        assert_eq!(c, None);
    }
}
