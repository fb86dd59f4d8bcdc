//! Running drift checks: the scheduler queues one drift run per stack at
//! each scheduled instant (at most one open at a time; instants passed while
//! one is open fold into it), `outpost stack check` queues one now.
//!
//! A drift run is a plan only, and of lower priority than tracked runs:
//!
//! - it starts only when no tracked run of its stack is queued or holds the
//!   stack lock (it waits, and its message says why), and a tracked run
//!   waits for a drift check that is planning (a short plan) rather than
//!   running beside it;
//! - its job enters the job queue only when no other job waits for the
//!   agents it selects, so it never delays a tracked run's plan;
//! - its job selects agents that take drift checks (`DRIFT_LABEL`).
//!
//! It plans the commit of the stack's last finished tracked run (what was
//! last applied), or the stack's current commit if there is none.

use tracing::{info, warn};

use super::super::IacError;
use super::super::launch::new_run;
use super::super::model::{Run, RunKind, RunState};
use super::super::runs::Engine;
use super::{Change, DriftState, Outcome, observe};
use crate::model::{JobState, now_ms};
use crate::notify::Event;

impl Engine {
    /// Queues the drift checks that are due and keeps each stack's next
    /// instant.
    pub(crate) async fn drift_due(&self) -> Result<(), IacError> {
        let now = now_ms();
        let states = self.store.drift_states().await?;
        for stack in self.store.list_stacks().await? {
            let Some(spec) = stack.spec.drift.clone().filter(|d| !d.is_manual()) else {
                continue;
            };
            let name = stack.spec.name.clone();
            let st = states.get(&name).cloned().unwrap_or_default();
            let key = serde_json::to_string(&spec).unwrap_or_default();
            if st.next_ms != 0 && st.schedule_of == key && now < st.next_ms {
                continue;
            }
            let due = st.next_ms != 0 && st.schedule_of == key;
            let last = st.checked_ms;
            let next = spec.next_after(&name, now, last).unwrap_or(0);
            self.store
                .update_drift(name.clone(), move |s| {
                    s.next_ms = next;
                    s.schedule_of = key;
                })
                .await?;
            if due {
                match self.queue_drift(&name, "schedule").await {
                    Ok(_) => {}
                    Err(e) => warn!(stack = %name, error = %e, "queueing a drift check failed"),
                }
            }
        }
        Ok(())
    }

    /// Queues a drift check of `name` now (or returns the one already open).
    pub async fn check_drift(&self, name: &str, who: &str) -> Result<Run, IacError> {
        self.stack(name).await?;
        let run = self.queue_drift(name, who).await?;
        self.kick();
        Ok(run)
    }

    async fn queue_drift(&self, name: &str, who: &str) -> Result<Run, IacError> {
        if let Some(open) = self
            .store
            .newest_run(name.to_string(), RunKind::Drift, &["QUEUED", "PLANNING"])
            .await?
        {
            info!(stack = %name, run = %open.id, "a drift check is already open; not queueing another");
            return Ok(open);
        }
        let stack = self.stack(name).await?;
        let applied = self
            .store
            .newest_run(name.to_string(), RunKind::Tracked, &["FINISHED"])
            .await?;
        let (commit, digest) = match (&applied, &stack.commit, &stack.source_digest) {
            (Some(r), _, _) => (r.commit.clone(), r.source_digest.clone()),
            (None, Some(c), Some(d)) => (c.clone(), d.clone()),
            _ => {
                return Err(IacError::Conflict(format!(
                    "stack {name} has no fetched source yet: sync it first"
                )));
            }
        };
        self.hub
            .metrics
            .iac
            .drift_runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.insert_run(new_run(
            name,
            RunKind::Drift,
            &commit,
            &digest,
            who,
            "drift check",
        ))
        .await
    }

    /// Starts a queued drift run if nothing of higher priority waits.
    pub(crate) async fn start_drift(&self, run: &Run) -> Result<(), IacError> {
        let Some(stack) = self.store.get_stack(run.stack.clone()).await? else {
            return Ok(());
        };
        if let Some(busy) = self.store.tracked_busy(run.stack.clone()).await? {
            let note = format!("waiting: tracked run {busy} is queued or holds the stack lock");
            if run.message != note {
                info!(run = %run.id, stack = %run.stack, tracked = %busy, "drift check waits for the stack lock");
                self.store
                    .update_run(run.id.clone(), move |r| {
                        r.message = note;
                        Ok(())
                    })
                    .await?;
            }
            return Ok(());
        }
        let mut selector = stack.spec.labels.clone();
        selector.insert(
            super::super::launch::DRIFT_LABEL.0.to_string(),
            super::super::launch::DRIFT_LABEL.1.to_string(),
        );
        // Lower priority: wait while any queued job could take the agents
        // this check would run on (its selector is a subset of ours).
        let mine: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let queued = self.hub.store.queue_depth().await?;
        let ahead = queued.iter().any(|(set, n)| {
            *n > 0
                && set
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .all(|kv| mine.iter().any(|m| m == kv))
        });
        if ahead {
            return Ok(());
        }
        self.start_plan_job(&stack, run, true).await
    }

    /// A drift run's job ended (or is gone): record the check.
    pub(crate) async fn finish_drift(&self, run: &Run) -> Result<(), IacError> {
        let Some(job_id) = &run.plan_job else {
            return Ok(());
        };
        let job = self.hub.store.get_job(job_id.clone()).await?;
        let (to, note, outcome) = match job {
            None => {
                let why = "the drift check's job is missing".to_string();
                (RunState::Failed, why.clone(), Some(Outcome::Failed(why)))
            }
            Some(j) if !j.state.is_final() => return Ok(()),
            Some(j) if j.state == JobState::Succeeded => match &run.plan {
                None => {
                    let why = "the agent finished the check without reporting it".to_string();
                    (RunState::Failed, why.clone(), Some(Outcome::Failed(why)))
                }
                Some(p) => (
                    RunState::Finished,
                    String::new(),
                    Some(Outcome::Checked {
                        drifted: p.drifted.clone(),
                        changes: p.changes.clone(),
                    }),
                ),
            },
            // A cancelled check tells nothing about the stack.
            Some(j) if j.state == JobState::Cancelled => (RunState::Cancelled, j.message, None),
            Some(j) => {
                let why = format!("drift check {}: {}", j.state.as_str(), j.message);
                (RunState::Failed, why.clone(), Some(Outcome::Failed(why)))
            }
        };
        let state = match outcome {
            Some(o) => Some(self.drift_observed(&run.stack, &run.id, o).await?),
            None => None,
        };
        let note = match (&state, to) {
            (Some(s), RunState::Finished) if s.status == super::Status::Drifted => {
                format!("drifted: {} resource(s)", s.resources.len())
            }
            (Some(_), RunState::Finished) => "in sync".to_string(),
            _ => note,
        };
        let job_id = job_id.clone();
        let run = self
            .store
            .update_run(run.id.clone(), move |r| {
                if r.state != RunState::Planning || r.plan_job.as_deref() != Some(job_id.as_str()) {
                    return Ok(());
                }
                r.go(to, note).map_err(IacError::Conflict)
            })
            .await?;
        info!(run = %run.id, stack = %run.stack, state = run.state.as_str(), message = %run.message, "drift checked");
        self.kick();
        Ok(())
    }

    /// Records a check's outcome on the stack, tells people about a
    /// transition, and queues a reconciling run for a new drift.
    async fn drift_observed(
        &self,
        name: &str,
        run: &str,
        outcome: Outcome,
    ) -> Result<DriftState, IacError> {
        let stack = self.stack(name).await?;
        if matches!(outcome, Outcome::Failed(_)) {
            self.hub
                .metrics
                .iac
                .drift_checks_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let spec = stack.spec.drift.clone().unwrap_or_default();
        let (run_id, now) = (run.to_string(), now_ms());
        let from_spec = spec.clone();
        let (state, (change, from)) = self
            .store
            .update_drift(name.to_string(), move |s| {
                let (new, change) = observe(&from_spec, s, &outcome, &run_id, now);
                let from = s.status;
                let next = new.next_ms;
                *s = new;
                s.next_ms = next;
                (change, from)
            })
            .await?;
        if state.status == super::Status::Drifted && change.is_some() {
            self.hub.metrics.iac.drift_detected(name);
        }
        let Some(change) = change else {
            return Ok(state);
        };
        let mut ev = Event::new(change.event(), name, run);
        ev.from = from.as_str().to_string();
        ev.to = state.status.as_str().to_string();
        ev.fingerprint = state.fingerprint.clone();
        ev.resources = state.resources.clone();
        ev.counts = crate::notify::Event::plan_counts(&state.resources);
        ev.counts
            .insert("drifted".into(), state.resources.len() as u64);
        ev.summary = match change {
            Change::Detected => format!(
                "stack {name}: drift detected ({} resource(s))",
                state.resources.len()
            ),
            Change::Changed => format!(
                "stack {name}: drift changed ({} resource(s))",
                state.resources.len()
            ),
            Change::Resolved => format!("stack {name}: drift resolved, in sync"),
            Change::CheckFailed => format!("stack {name}: drift check failed: {}", state.reason),
        };
        info!(stack = %name, event = change.event(), fingerprint = %state.fingerprint, "drift status changed");
        self.notifier.emit(stack.spec.notify.clone(), ev);
        if spec.reconcile && matches!(change, Change::Detected | Change::Changed) {
            self.reconcile(name).await?;
        }
        Ok(state)
    }

    /// Queues a tracked run reverting drift, unless a tracked run is already
    /// queued or under way.
    async fn reconcile(&self, name: &str) -> Result<(), IacError> {
        if let Some(busy) = self.store.tracked_busy(name.to_string()).await? {
            info!(stack = %name, run = %busy, "drift found; a tracked run is already open, not reconciling");
            return Ok(());
        }
        let stack = self.stack(name).await?;
        let applied = self
            .store
            .newest_run(name.to_string(), RunKind::Tracked, &["FINISHED"])
            .await?;
        let (commit, digest) = match (&applied, &stack.commit, &stack.source_digest) {
            (Some(r), _, _) => (r.commit.clone(), r.source_digest.clone()),
            (None, Some(c), Some(d)) => (c.clone(), d.clone()),
            _ => return Ok(()),
        };
        let mut run = new_run(
            name,
            RunKind::Tracked,
            &commit,
            &digest,
            "drift",
            "reconcile drift",
        );
        run.drift = true;
        let run = self.insert_run(run).await?;
        info!(stack = %name, run = %run.id, "reconciling drift");
        self.kick();
        Ok(())
    }
}
