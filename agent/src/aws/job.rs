//! One AWS job as the executor's hooks: its credentials channel (the
//! endpoint in the job's network namespace, released through the entry's
//! ready pipe), its S3 workspace and its artifacts.

use super::*;

/// 32 random bytes from the OS, hex: the job's endpoint authorization token.
pub(super) fn random_token() -> Secret {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The OS RNG failing is not survivable for anything secret.
        panic!("the operating system's random number generator failed");
    }
    Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The job's credentials as an SDK credentials provider (for its S3 calls).
#[derive(Debug)]
pub(super) struct JobCredentials {
    pub(super) creds: watch::Receiver<CredState>,
    pub(super) early: Duration,
}

impl ProvideCredentials for JobCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let result = match &*self.creds.borrow() {
            CredState::Ready(c) if c.expiration > SystemTime::now() + self.early => {
                Ok(aws_credential_types::Credentials::new(
                    c.access_key_id.expose(),
                    c.secret_access_key.expose(),
                    Some(c.session_token.expose().to_string()),
                    Some(c.expiration - self.early),
                    "outpost-job-role",
                ))
            }
            _ => Err(CredentialsError::not_loaded(
                "the job's credentials are not available",
            )),
        };
        future::ProvideCredentials::ready(result)
    }
}

/// One job's AWS state. Dropping it stops everything it started.
pub struct JobAws {
    pub(super) agent: Arc<AwsAgent>,
    pub(super) key: LeaseKey,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) endpoint_token: Secret,
    pub(super) creds: watch::Receiver<CredState>,
    pub(super) early: Duration,
    pub(super) endpoint_stop: CancellationToken,
    pub(super) endpoint: Mutex<Option<Arc<EndpointState>>>,
    pub(super) workspace_source: Option<s3::S3Url>,
    pub(super) artifacts: Vec<String>,
    pub(super) uploaded: Mutex<Vec<Uploaded>>,
    pub(super) _stop: DropGuard,
}

impl JobAws {
    /// Artifacts uploaded so far (taken).
    pub fn take_uploaded(&self) -> Vec<Uploaded> {
        std::mem::take(&mut *self.uploaded.lock())
    }

    /// Waits for the first credentials (or the reason there are none).
    async fn ready(&self) -> Result<(), AwsError> {
        let mut rx = self.creds.clone();
        let waited = tokio::time::timeout(
            CREDENTIALS_WAIT,
            rx.wait_for(|s| !matches!(s, CredState::Pending)),
        )
        .await;
        let state = match waited {
            Err(_) => {
                return Err(AwsError::CredentialsTimeout {
                    waited_s: CREDENTIALS_WAIT.as_secs(),
                });
            }
            Ok(Err(_)) => {
                return Err(AwsError::CredentialsUnavailable {
                    reason: "the credentials refresher stopped".into(),
                });
            }
            Ok(Ok(state)) => state.clone(),
        };
        match state {
            CredState::Ready(_) => Ok(()),
            CredState::Failed(reason) => Err(AwsError::CredentialsUnavailable { reason }),
            CredState::Pending => Err(AwsError::CredentialsUnavailable {
                reason: "no credentials yet".into(),
            }),
        }
    }

    fn s3(&self) -> aws_sdk_s3::Client {
        self.agent.s3_for(self.creds.clone(), self.early)
    }

    fn fifo(workspace: &Path) -> PathBuf {
        workspace.join(entry::READY_FIFO)
    }

    async fn configure(
        &self,
        ctx: &HookContext<'_>,
        body: &mut ContainerCreateBody,
    ) -> Result<(), AwsError> {
        let image = ctx
            .docker
            .inspect_image(ctx.image)
            .await
            .map_err(|source| AwsError::Inspect {
                what: "image",
                name: ctx.image.to_string(),
                source,
            })?;
        entry::configure(
            body,
            image.config.as_ref(),
            self.agent.cfg.credentials_port,
            &self.agent.cfg.region,
            self.uid,
            self.gid,
        );
        Ok(())
    }

    async fn before_start(&self, ctx: &HookContext<'_>) -> Result<(), AwsError> {
        if let Some(url) = &self.workspace_source {
            self.ready().await?;
            let started = Instant::now();
            let bytes = s3::download_workspace(
                &self.s3(),
                url,
                ctx.workspace,
                self.uid,
                self.gid,
                self.agent.cfg.max_workspace_bytes,
            )
            .await?;
            info!(%url, bytes, elapsed_ms = started.elapsed().as_millis() as u64, "workspace unpacked");
        }
        let fifo = Self::fifo(ctx.workspace);
        let (uid, gid) = (self.uid, self.gid);
        let path = fifo.clone();
        tokio::task::spawn_blocking(move || crate::netns::ready::make_fifo(&path, uid, gid))
            .await
            .map_err(|source| AwsError::Blocking {
                operation: "creating the ready pipe",
                source,
            })?
            .map_err(|source| AwsError::ReadyPipe { path: fifo, source })
    }

    async fn after_start(&self, ctx: &HookContext<'_>) -> Result<(), AwsError> {
        let began = Instant::now();
        self.ready().await?;
        let creds_ms = began.elapsed().as_millis() as u64;
        let pid = crate::netns::ready::container_pid(ctx.docker, ctx.container)
            .await
            .map_err(|reason| AwsError::Release {
                name: ctx.container.to_string(),
                reason,
            })?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.agent.cfg.credentials_port));
        let std_listener =
            tokio::task::spawn_blocking(move || crate::netns::bind_in_netns_of(pid, addr))
                .await
                .map_err(|source| AwsError::Blocking {
                    operation: "binding the credentials endpoint",
                    source,
                })?
                .map_err(|source| AwsError::BindEndpoint {
                    name: ctx.container.to_string(),
                    source,
                })?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|source| {
            AwsError::BindEndpoint {
                name: ctx.container.to_string(),
                source,
            }
        })?;
        let state = Arc::new(EndpointState::new(
            self.endpoint_token.clone(),
            self.creds.clone(),
            self.early,
        ));
        *self.endpoint.lock() = Some(state.clone());
        tokio::spawn(endpoint::serve(listener, state, self.endpoint_stop.clone()));
        let bound_ms = began.elapsed().as_millis() as u64;
        release(
            &Self::fifo(ctx.workspace),
            &self.endpoint_token,
            ctx.container,
        )
        .await?;
        info!(
            pid,
            wait_for_credentials_ms = creds_ms,
            endpoint_bound_ms = bound_ms,
            released_ms = began.elapsed().as_millis() as u64,
            "credentials endpoint ready; job released"
        );
        Ok(())
    }

    /// Closes the endpoint, then uploads the artifacts.
    async fn after_exit(&self, ctx: &HookContext<'_>) -> Result<(), AwsError> {
        self.close_endpoint();
        if self.artifacts.is_empty() {
            return Ok(());
        }
        let Some(bucket) = self.agent.cfg.artifact_bucket.clone() else {
            return Err(AwsError::NoArtifactBucket);
        };
        self.ready().await?;
        let s3 = self.s3();
        let mut first_error = None;
        for path in &self.artifacts {
            let key = artifact_key(&self.agent.cfg.artifact_prefix, &self.key, path);
            match s3::upload_artifact(
                &s3,
                ctx.workspace,
                path,
                &bucket,
                key,
                &self.key.job_id,
                self.key.epoch,
            )
            .await
            {
                Ok(up) => {
                    info!(path = %up.path, bucket = %up.bucket, key = %up.key, size = up.size, "artifact uploaded");
                    self.uploaded.lock().push(up);
                }
                Err(e) => {
                    warn!(path = %path, error = %error_chain(&e), "artifact upload failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The endpoint stops answering and its socket closes.
    fn close_endpoint(&self) {
        if let Some(state) = self.endpoint.lock().take() {
            state.close();
        }
        self.endpoint_stop.cancel();
    }
}

impl Drop for JobAws {
    fn drop(&mut self) {
        self.close_endpoint();
    }
}

/// `<prefix><job_id>/<epoch>/<path>`: the epoch in the key means a stale
/// lease can never overwrite what a newer one uploaded.
pub fn artifact_key(prefix: &str, key: &LeaseKey, path: &str) -> String {
    let clean = s3::artifact_path(path)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| path.to_string());
    format!("{prefix}{}/{}/{clean}", key.job_id, key.epoch)
}

/// Creates the ready FIFO (replacing anything of that name the workspace
/// archive brought), readable by the job's user only.
/// Hands the token to the job's entry through the FIFO (which releases it).
async fn release(fifo: &Path, token: &Secret, container: &str) -> Result<(), AwsError> {
    crate::netns::ready::release(fifo, token.expose())
        .await
        .map_err(|reason| AwsError::Release {
            name: container.to_string(),
            reason,
        })
}

impl JobHooks for JobAws {
    fn configure<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
        body: &'a mut ContainerCreateBody,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobAws::configure(self, ctx, body).await?) }.boxed()
    }

    fn before_start<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobAws::before_start(self, ctx).await?) }.boxed()
    }

    fn after_start<'a>(&'a self, ctx: &'a HookContext<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobAws::after_start(self, ctx).await?) }.boxed()
    }

    fn after_exit<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
        _outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move { Ok(JobAws::after_exit(self, ctx).await?) }.boxed()
    }
}
