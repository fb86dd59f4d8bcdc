//! Containers of leases that survived an agent restart: found, re-fenced,
//! followed again from the engine's log past the spooled bytes.

use super::*;

impl DockerExecutor {
    /// Whether the container of `key` exists (in any state) and was created
    /// by an agent with this `work_dir`, i.e. whether [`adopt`](Self::adopt)
    /// can follow it.
    pub async fn container_exists(&self, key: &LeaseKey) -> bool {
        let Ok(name) = spec::container_name(key) else {
            return false;
        };
        match self.docker.inspect_container(&name, None).await {
            Ok(inspect) => {
                let labels = inspect.config.and_then(|c| c.labels).unwrap_or_default();
                let epoch = key.epoch.to_string();
                let work_dir = self.cfg.work_dir.to_string_lossy();
                labels.get(LABEL_JOB) == Some(&key.job_id)
                    && labels.get(LABEL_EPOCH) == Some(&epoch)
                    && labels.get(LABEL_WORK_DIR).map(String::as_str) == Some(&*work_dir)
            }
            Err(e) if status(&e) == Some(404) => false,
            Err(source) => {
                let e = ExecError::InspectContainer { name, source };
                tracing::warn!(error = %error_chain(&e), "cannot tell whether a job container exists");
                false
            }
        }
    }

    /// Follows the container of a job that an earlier run of this agent
    /// started (after a restart), to its end, like [`run`](Self::run) does.
    ///
    /// Output is replayed from the container's log from the start, the first
    /// `skip` bytes (already delivered before the restart) left out. The
    /// timeout counts from the container's original start. Cancel, grace,
    /// cleanup and the never-panics rule are those of `run`.
    pub async fn adopt(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        skip: u64,
        output: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
    ) -> Outcome {
        self.adopt_with_hooks(key, spec, skip, output, cancel, None)
            .await
    }

    /// [`adopt`](Self::adopt), with [`JobHooks::adopted`] once the container
    /// is found and [`JobHooks::after_exit`] at its end.
    pub async fn adopt_with_hooks(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        skip: u64,
        output: mpsc::Sender<Bytes>,
        cancel: CancellationToken,
        hooks: Option<&dyn JobHooks>,
    ) -> Outcome {
        let span =
            tracing::info_span!("job", job_id = %key.job_id, epoch = key.epoch, adopted = true);
        async move {
            let (name, workspace, mut cleanup) = match self.job_host_paths(key, spec) {
                Ok(found) => found,
                Err(e) => return failed(e),
            };
            let ctx = HookContext {
                docker: &self.docker,
                container: &name,
                workspace: &workspace,
                image: &spec.image,
            };
            if let Some(h) = hooks
                && let Err(e) = h.adopted(&ctx).await
            {
                tracing::warn!(error = %error_chain(e.as_ref()), "setting up the adopted job again failed");
            }
            let mut outcome = self
                .follow_adopted(key, &name, spec, skip, output, &cancel)
                .await;
            if let Some(h) = hooks {
                let r = h.after_exit(&ctx, &outcome).await;
                outcome = hooks::after_exit_outcome(outcome, r);
            }
            cleanup.run().await;
            self.forget_lease(key);
            match &outcome {
                Outcome::Failed { reason } => tracing::warn!(%reason, "adopted job failed"),
                outcome => tracing::info!(?outcome, "adopted job finished"),
            }
            outcome
        }
        .instrument(span)
        .await
    }

    pub(super) async fn follow_adopted(
        &self,
        key: &LeaseKey,
        name: &str,
        spec: &JobSpec,
        skip: u64,
        output: mpsc::Sender<Bytes>,
        cancel: &CancellationToken,
    ) -> Outcome {
        let state = match self.docker.inspect_container(name, None).await {
            Ok(inspect) => inspect.state.unwrap_or_default(),
            Err(e) if status(&e) == Some(404) => {
                return Outcome::Failed {
                    reason: "the job's container no longer exists".to_string(),
                };
            }
            Err(source) => {
                return failed(ExecError::InspectContainer {
                    name: name.to_string(),
                    source,
                });
            }
        };
        if state.status == Some(ContainerStateStatusEnum::CREATED) {
            // The agent stopped between create and start.
            return Outcome::Failed {
                reason: "the agent stopped before the job's process started".to_string(),
            };
        }
        let timeout = spec.timeout.map(|timeout| {
            let ran = state
                .started_at
                .as_deref()
                .and_then(parse_engine_time)
                .and_then(|started| SystemTime::now().duration_since(started).ok());
            match ran {
                Some(ran) => timeout.saturating_sub(ran),
                None => {
                    tracing::warn!("unknown start time; the timeout counts from the adoption");
                    timeout
                }
            }
        });
        if spec.network == Network::Egress
            && state.status == Some(ContainerStateStatusEnum::RUNNING)
            && let Err(e) = self.refence(key, name).await
        {
            // Never let a job run on without its fence.
            return failed(e);
        }
        tracing::info!(container = name, skip, "following an adopted job");
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        // The values may no longer be in the spooled lease; the job's own
        // secrets directory still holds them.
        let on_host = match spec::secrets_dir(key, &self.cfg) {
            Ok(dir) => secrets::read_values(&dir).await,
            Err(_) => Vec::new(),
        };
        let over_limit = CancellationToken::new();
        let filter = self.output_filter(masker(spec, on_host), skip, &over_limit, false);
        let logs: OutputStream = Box::pin(self.docker.logs(name, Some(options)));
        let pump = spawn_output(logs, output, filter);
        let outcome = self
            .follow(key, name, pump, timeout, cancel, &over_limit, true)
            .await;
        match spec::workspace_dir(key, &self.cfg.work_dir) {
            Ok(workspace) => self.workspace_full(key, spec, &workspace, outcome),
            Err(_) => outcome,
        }
    }

    /// Re-installs the firewall rules of an adopted egress job (idempotent),
    /// in case the host lost them while the agent was down.
    pub(super) async fn refence(&self, key: &LeaseKey, name: &str) -> Result<(), ExecError> {
        let inspect = self
            .docker
            .inspect_network(name, None)
            .await
            .map_err(|source| ExecError::ListNetworks {
                filter: format!("name={name}"),
                source,
            })?;
        let id = inspect.id.unwrap_or_default();
        let bridge = network::bridge_name(&id).ok_or_else(|| ExecError::Firewall {
            command: format!("docker network inspect {name}"),
            message: format!("unexpected network id {id:?}"),
        })?;
        network::install_rules(&self.scope, &job_tag(key), &bridge).await
    }

    /// Docker 20.10 may end a followed log before the container's last,
    /// unterminated line is written to it; once the container has exited the
    /// log is complete, so read it again and forward what follow missed.
    pub(super) async fn read_log_tail(&self, name: &str, done: Forwarded) {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let log: OutputStream = Box::pin(self.docker.logs(name, Some(options)));
        // Masked again from the start: the bytes already passed (delivered
        // or skipped) are a prefix of the masked whole, so skipping them
        // continues at the same offset. The carry is flushed at this end.
        let filter = OutputFilter {
            masker: done.filter.masker.restart(),
            stderr_masker: done.filter.stderr_masker.restart(),
            skip: done.position + done.unskipped,
            position: 0,
            flush: true,
            ..done.filter
        };
        let tail = forward_output(log, done.output, filter).await;
        if tail.unskipped > 0 {
            tracing::warn!(
                missing = tail.unskipped,
                "the container's log holds fewer bytes than were already delivered"
            );
        }
        tracing::debug!(bytes = tail.position, "output complete");
    }
}
