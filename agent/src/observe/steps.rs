//! Debug-level timings of a sequence of steps (a job's start, its end):
//! one `debug` event per step with what it took and the time since the
//! first, so that `OUTPOST_LOG=outpost_agent=debug` shows where the time
//! between a lease and its running container goes. Nothing is logged at
//! the default level.

use std::time::Instant;

/// The clock of one sequence of steps.
#[derive(Debug)]
pub struct Steps {
    what: &'static str,
    start: Instant,
    last: Instant,
}

impl Steps {
    /// Starts timing `what` (e.g. `"job start"`).
    pub fn new(what: &'static str) -> Steps {
        let now = Instant::now();
        Steps {
            what,
            start: now,
            last: now,
        }
    }

    /// `step` has just ended: logs its time and the time so far.
    pub fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        tracing::debug!(
            what = self.what,
            step,
            step_ms = millis(now - self.last),
            total_ms = millis(now - self.start),
            "step done"
        );
        self.last = now;
    }
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_milliseconds_to_a_tenth() {
        assert_eq!(millis(std::time::Duration::from_micros(1_234)), 1.2);
        assert_eq!(millis(std::time::Duration::from_micros(250_060)), 250.1);
    }
}
