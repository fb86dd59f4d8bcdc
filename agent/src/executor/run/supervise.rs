//! A started container to its end: cancel, timeout, output limit and lease
//! fences, its exit (OOM seen in the engine's events), signals.

use super::*;

impl DockerExecutor {
    /// Supervises a running container to its end, then collects the rest of
    /// its output. With `from_log` the output comes from the container's log
    /// and, once the container is gone, the log is read once more for its end.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn follow(
        &self,
        key: &LeaseKey,
        name: &str,
        mut pump: AbortOnDropHandle<Forwarded>,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        over_limit: &CancellationToken,
        from_log: bool,
    ) -> Outcome {
        let began = Instant::now();
        let mut steps = Steps::new("job run");
        let (outcome, exited) = self.supervise(name, timeout, cancel, over_limit).await;
        steps.done("exited (wait, inspect)");
        if !exited {
            // Its end was not observed: make sure it is gone so that the
            // output stream ends.
            let _ = self.signal(name, "SIGKILL").await;
            if tokio::time::timeout(ORPHAN_OUTPUT_WAIT, &mut pump)
                .await
                .is_err()
            {
                tracing::warn!(container = name, "output did not end; dropping the rest");
            }
        } else {
            match (&mut pump).await {
                Ok(done) if from_log => self.read_log_tail(name, done).await,
                Ok(done) => tracing::debug!(bytes = done.position, "output complete"),
                Err(e) => tracing::warn!(error = %e, "output task failed"),
            }
        }
        steps.done("output complete");
        // A job that ended by itself right after going past the limit still
        // failed: its output is incomplete.
        match outcome {
            Outcome::Exited { .. } if over_limit.is_cancelled() => {
                Stop::OutputLimit(self.cfg.max_output_bytes).outcome()
            }
            // outpost-init's own stops, when they are real (a job may exit
            // with these codes by itself).
            Outcome::Exited { code, .. }
                if code == i64::from(EXIT_LEASE_EXPIRED) && self.lease_over(key) =>
            {
                Outcome::Failed {
                    reason: LEASE_EXPIRED_REASON.to_string(),
                }
            }
            Outcome::Exited { code, .. }
                if code == i64::from(EXIT_TIMED_OUT)
                    && timeout.is_some_and(|t| began.elapsed() + TIMEOUT_SLACK >= t) =>
            {
                Outcome::TimedOut
            }
            outcome => outcome,
        }
    }

    /// Waits for the job to end, stopping it on cancel or timeout. Returns
    /// the outcome and whether the container's exit was observed.
    pub(super) async fn supervise(
        &self,
        name: &str,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        over_limit: &CancellationToken,
    ) -> (Outcome, bool) {
        let mut exit = Box::pin(self.wait_exit(name));
        let deadline = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);

        let stop = tokio::select! {
            biased;
            exit = &mut exit => return self.exited(name, exit).await,
            () = cancel.cancelled() => Stop::Cancelled,
            () = &mut deadline => Stop::TimedOut,
            () = over_limit.cancelled() => Stop::OutputLimit(self.cfg.max_output_bytes),
        };

        // Exactly one SIGINT, whatever happens next.
        tracing::info!(reason = stop.as_str(), "stopping job: sending SIGINT");
        match self.signal(name, "SIGINT").await {
            Ok(()) => {}
            Err(e) if is_not_running(&e) => {
                // It ended on its own just before: that is its outcome.
                return self.exited(name, exit.await).await;
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "sending SIGINT failed"),
        }
        if let Ok(result) = tokio::time::timeout(self.cfg.stop_grace, &mut exit).await {
            log_stopped(&result);
            return (stop.outcome(), result.is_ok());
        }
        tracing::info!(
            grace = ?self.cfg.stop_grace,
            "job still running after the grace period: sending SIGKILL"
        );
        if let Err(e) = self.signal(name, "SIGKILL").await
            && !is_not_running(&e)
        {
            tracing::warn!(error = %error_chain(&e), "sending SIGKILL failed");
        }
        match tokio::time::timeout(KILL_WAIT, &mut exit).await {
            Ok(result) => {
                log_stopped(&result);
                (stop.outcome(), result.is_ok())
            }
            Err(_) => {
                tracing::warn!("container still running after SIGKILL");
                (stop.outcome(), false)
            }
        }
    }

    /// The outcome of a container that exited by itself.
    pub(super) async fn exited(&self, name: &str, exit: Result<i64, ExecError>) -> (Outcome, bool) {
        let code = match exit {
            Ok(code) => code,
            Err(e) => return (failed(e), false),
        };
        match self.docker.inspect_container(name, None).await {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                let code = state.exit_code.unwrap_or(code);
                let mut oom_killed = state.oom_killed.unwrap_or(false);
                // Docker 20.10 sets `OOMKilled` only if the kernel's OOM
                // event reached it before the exit; under load it can come
                // after. The engine still records the event.
                if !oom_killed && code == 137 {
                    oom_killed = self.oom_event_seen(name, state.started_at.as_deref()).await;
                }
                (Outcome::Exited { code, oom_killed }, true)
            }
            Err(source) => {
                let e = ExecError::InspectContainer {
                    name: name.to_string(),
                    source,
                };
                tracing::warn!(error = %error_chain(&e), "out-of-memory state unknown");
                (
                    Outcome::Exited {
                        code,
                        oom_killed: false,
                    },
                    true,
                )
            }
        }
    }

    /// Whether the engine recorded an `oom` event for the container since it
    /// started (waiting up to six seconds for a late one: on a loaded
    /// machine the cgroup's notification can trail the exit by several).
    pub(super) async fn oom_event_seen(&self, name: &str, started_at: Option<&str>) -> bool {
        let until = SystemTime::now() + Duration::from_secs(6);
        let until = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let options = bollard::query_parameters::EventsOptions {
            // The engine takes Unix seconds here (RFC 3339 is a client-side
            // convenience of the docker CLI); a second early covers rounding.
            since: started_at
                .and_then(unix_seconds)
                .map(|t| (t - 1).to_string()),
            until: Some(format!("{}.{:09}", until.as_secs(), until.subsec_nanos())),
            filters: Some(
                [
                    ("type".to_string(), vec!["container".to_string()]),
                    ("container".to_string(), vec![name.to_string()]),
                    ("event".to_string(), vec!["oom".to_string()]),
                ]
                .into(),
            ),
        };
        let mut events = Box::pin(self.docker.events(Some(options)));
        let first = tokio::time::timeout(Duration::from_secs(8), events.next()).await;
        matches!(first, Ok(Some(Ok(_))))
    }

    /// The exit code once the container has stopped. A wait request that
    /// fails for another reason than the exit is retried a few times.
    pub(super) async fn wait_exit(&self, name: &str) -> Result<i64, ExecError> {
        let mut attempt = 1;
        loop {
            let mut wait = Box::pin(self.docker.wait_container(
                name,
                None::<bollard::query_parameters::WaitContainerOptions>,
            ));
            let error = match wait.next().await {
                Some(Ok(response)) => return Ok(response.status_code),
                // bollard reports a non-zero exit as an error.
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    return Ok(code);
                }
                Some(Err(e)) => e,
                None => bollard::errors::Error::DockerStreamError {
                    error: "the engine ended the wait without a status".to_string(),
                },
            };
            if attempt >= WAIT_ATTEMPTS || status(&error) == Some(404) {
                return Err(ExecError::Wait {
                    name: name.to_string(),
                    source: error,
                });
            }
            tracing::warn!(error = %error, attempt, "waiting for the container failed; retrying");
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub(super) async fn signal(&self, name: &str, signal: &str) -> Result<(), ExecError> {
        let options = KillContainerOptions {
            signal: signal.to_string(),
        };
        self.docker
            .kill_container(name, Some(options))
            .await
            .map_err(|source| ExecError::Signal {
                name: name.to_string(),
                signal: signal.to_string(),
                source,
            })
    }
}
