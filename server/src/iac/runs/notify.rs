//! Run events for the webhook targets: needs approval, finished, failed.

use super::Engine;
use crate::iac::model::{Run, RunKind, RunState};
use crate::notify::Event;

impl Engine {
    /// Tells the stack's and the global targets about a tracked run that
    /// needs approval, finished or failed (never blocks, never fails). A
    /// run that ends `STALE` (its plan no longer matches the state or the
    /// source, nothing applied) failed too: `run.failed` with `to: STALE`.
    pub(crate) async fn notify_run(&self, run: &Run) {
        if run.kind != RunKind::Tracked {
            return;
        }
        let event = match run.state {
            RunState::Unconfirmed => "run.needs_approval",
            RunState::Finished => "run.finished",
            RunState::Failed | RunState::Stale => "run.failed",
            _ => return,
        };
        let targets = match self.store.get_stack(run.stack.clone()).await {
            Ok(Some(s)) => s.spec.notify,
            _ => Vec::new(),
        };
        let mut ev = Event::new(event, &run.stack, &run.id);
        ev.from = run
            .transitions
            .iter()
            .rev()
            .nth(1)
            .map(|t| t.state.as_str().to_string())
            .unwrap_or_default();
        ev.to = run.state.as_str().to_string();
        let changes = run
            .plan
            .as_ref()
            .map(|p| p.changes.clone())
            .unwrap_or_default();
        ev.counts = Event::plan_counts(&changes);
        ev.resources = changes;
        ev.summary = match run.state {
            RunState::Unconfirmed => format!("stack {}: run {} needs approval", run.stack, run.id),
            RunState::Finished => format!("stack {}: run {} finished", run.stack, run.id),
            RunState::Stale => format!(
                "stack {}: run {} failed: stale, its plan no longer matches the state or the source; nothing was applied",
                run.stack, run.id
            ),
            _ => format!("stack {}: run {} failed", run.stack, run.id),
        };
        if run.drift {
            ev.summary.push_str(" (reverting drift)");
        }
        self.notifier.emit(targets, ev);
    }
}
