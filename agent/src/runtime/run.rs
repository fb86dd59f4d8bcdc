//! Driving one job to its final status: the executor (or the IaC and AWS
//! layers), its output into the spool and the table, its outcome recorded.

use super::*;

impl Runtime {
    pub(super) async fn run_job(self: &Arc<Self>, lease: &Lease, drive: Drive) -> Outcome {
        let Some((cancel, space, spool)) = self
            .jobs
            .lock()
            .get(&lease.key)
            .map(|e| (e.cancel.clone(), e.space.clone(), e.spool.clone()))
        else {
            return Outcome::Failed {
                reason: "job vanished before it started".into(),
            };
        };
        let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(64);
        let (started_tx, mut started_rx) = oneshot::channel();
        let exec = self.executor.clone();
        let key = lease.key.clone();
        let spec = lease.spec.clone();
        let job_cancel = cancel.clone();
        let aws = self.aws.get().cloned();
        let iac = self.iac.get().cloned();
        let task = lease.iac.clone();
        let run = tokio::spawn(
            async move {
                match drive {
                    Drive::Run if task.is_some() => {
                        let task = task.unwrap_or_default();
                        let outcome = crate::iac::run_job(
                            iac.as_ref(),
                            aws.as_ref(),
                            &exec,
                            &key,
                            &spec,
                            &task,
                            out_tx,
                            job_cancel,
                            started_tx,
                        )
                        .await;
                        (outcome, Vec::new())
                    }
                    Drive::Run => {
                        crate::aws::run_job(
                            aws.as_ref(),
                            &exec,
                            &key,
                            &spec,
                            out_tx,
                            job_cancel,
                            started_tx,
                        )
                        .await
                    }
                    Drive::Adopt { skip } => {
                        let _ = started_tx.send(());
                        let outcome = match &task {
                            Some(task) => {
                                crate::iac::adopt_job(
                                    iac.as_ref(),
                                    &exec,
                                    &key,
                                    &spec,
                                    task,
                                    skip,
                                    out_tx,
                                    job_cancel,
                                )
                                .await
                            }
                            None => exec.adopt(&key, &spec, skip, out_tx, job_cancel).await,
                        };
                        (outcome, Vec::new())
                    }
                }
            }
            .in_current_span(),
        );
        let key = &lease.key;
        let mut started_open = true;
        loop {
            tokio::select! {
                r = &mut started_rx, if started_open => {
                    started_open = false;
                    if r.is_ok() {
                        if let Some(e) = self.jobs.lock().get_mut(key) { e.running = true; }
                        self.wake.notify_one();
                    }
                }
                data = out_rx.recv() => {
                    let Some(data) = data else { break };
                    if let Err(reason) = self.push_output(key, data, &space, &spool).await {
                        warn!(reason = %reason, "stopping the job");
                        self.cancel_as(key, &reason);
                        // Keep draining the stream so the container can stop.
                        while out_rx.recv().await.is_some() {}
                        break;
                    }
                }
            }
        }
        let outcome = match run.await {
            Ok((outcome, uploaded)) => {
                if let Some(e) = self.jobs.lock().get_mut(key) {
                    e.reports = uploaded
                        .iter()
                        .map(|a| wire::artifact_to_pb(key, a))
                        .collect();
                }
                outcome
            }
            Err(e) => Outcome::Failed {
                reason: format!("executor task failed: {e}"),
            },
        };
        if let Some(s) = spool.lock().as_mut() {
            let rec = serde_json::to_vec(&OutcomeRecord::from(&outcome)).unwrap_or_default();
            if let Err(e) = s.set_outcome(&rec) {
                warn!(error = %e, "could not persist the job's outcome");
            }
        }
        outcome
    }

    /// Spools then buffers output, waiting while the unacknowledged buffer or
    /// the spool is full (backpressure on the container's stream; nothing is
    /// dropped). Fails only when the spool stayed full for too long.
    pub(super) async fn push_output(
        &self,
        key: &LeaseKey,
        data: Bytes,
        space: &Notify,
        spool: &Mutex<Option<JobSpool>>,
    ) -> Result<(), String> {
        let mut full_since: Option<Instant> = None;
        loop {
            let waiter = space.notified();
            let ready = {
                let jobs = self.jobs.lock();
                let Some(e) = jobs.get(key) else {
                    return Ok(());
                };
                if e.revoked {
                    return Ok(());
                }
                e.buf.len() < self.limits.log_buffer
            };
            if ready {
                let r = match spool.lock().as_mut() {
                    Some(s) => s.append(&data),
                    None => return Ok(()),
                };
                match r {
                    Ok(()) => break,
                    Err(e) if e.is_full() => {
                        if full_since.is_none() {
                            warn!(error = %e, "log spool full; slowing the job's output down");
                        }
                        let since = *full_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.limits.spool_full_timeout {
                            return Err(format!(
                                "failed: {e}; the job's output waited {}s for space",
                                self.limits.spool_full_timeout.as_secs()
                            ));
                        }
                    }
                    Err(e) => return Err(format!("failed: cannot write the log spool: {e}")),
                }
            }
            tokio::select! {
                _ = waiter => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if let Some(e) = self.jobs.lock().get_mut(key) {
            e.buf.extend_from_slice(&data);
        }
        self.wake.notify_one();
        Ok(())
    }

    pub(super) fn finish(&self, key: &LeaseKey, mut outcome: Outcome) {
        let mut jobs = self.jobs.lock();
        let Some(e) = jobs.get_mut(key) else { return };
        if e.revoked {
            if let Some(e) = jobs.remove(key) {
                drop(jobs);
                remove_spool(&e);
            }
            self.gone.notify_waiters();
            return;
        }
        if let (Outcome::Cancelled { .. }, Some(reason)) = (&outcome, &e.cancel_reason) {
            outcome = Outcome::Cancelled {
                reason: reason.clone(),
            };
        }
        if let (Outcome::Cancelled { .. }, Some(reason)) = (&outcome, &e.cancel_reason)
            && reason.starts_with("failed: ")
        {
            outcome = Outcome::Failed {
                reason: reason.trim_start_matches("failed: ").to_string(),
            };
        }
        let counted = match &outcome {
            Outcome::Exited {
                code: 0,
                oom_killed: false,
            } => JobOutcome::Succeeded,
            Outcome::Exited { .. } => JobOutcome::Failed,
            Outcome::Cancelled { .. } => JobOutcome::Cancelled,
            Outcome::TimedOut => JobOutcome::TimedOut,
            Outcome::Rejected { .. } => JobOutcome::Rejected,
            Outcome::Failed { .. } => {
                self.metrics.docker_error();
                JobOutcome::Error
            }
        };
        self.metrics.job_finished(counted);
        e.outcome = Some(outcome);
        drop(jobs);
        self.wake.notify_one();
    }

    /// Bytes in the log spool.
    pub fn spool_bytes(&self) -> u64 {
        self.spool.used()
    }
}
