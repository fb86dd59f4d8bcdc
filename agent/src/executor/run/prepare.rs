//! Before a container is created: its image (pulled by policy, checked)
//! and its workspace, network, secrets and lease file; the container's
//! creation; the spare workspace images formatted again.

use super::*;

/// Formats the successors of the spare workspace images a job took once
/// dropped: after its container started, or when the job ended before.
pub(super) struct RefillSpares<'a>(pub(super) Option<&'a DockerExecutor>);

impl Drop for RefillSpares<'_> {
    fn drop(&mut self) {
        if let Some(exec) = self.0.take() {
            exec.refill_spares();
        }
    }
}

impl DockerExecutor {
    /// The job's host resources, ready for its container: no container or
    /// network of an earlier, crashed attempt at the same lease, a fresh
    /// workspace on its own filesystem, its lease file, its secrets and,
    /// with egress, its fenced network. The engine's answers about stale
    /// objects and the workspace's filesystem work overlap; the lease file,
    /// the secrets and the network come once both are done. Returns whether
    /// a spare workspace image was taken ([`Self::refill_spares`]).
    pub(super) async fn prepare_host(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        name: &str,
        workspace: &Path,
    ) -> Result<bool, ExecError> {
        let egress = spec.network == Network::Egress;
        let stale = async {
            if remove_container(&self.docker, name).await? {
                tracing::warn!(container = name, "removed a stale container of this lease");
            }
            if egress && network::remove_named(&self.docker, name).await? {
                tracing::warn!(network = name, "removed a stale network of this lease");
            }
            Ok::<(), ExecError>(())
        };
        let filesystem = async {
            let mut steps = Steps::new("workspace");
            // A workspace left by a crashed earlier attempt: unmounted first.
            workspace::remove(workspace, &spec::disks_dir(&self.cfg)).await?;
            workspace::create(workspace, self.uid, self.gid).await?;
            steps.done("workspace directory");
            let bytes = spec::validate(key, spec, &self.cfg)?.workspace_bytes;
            let disks = spec::disks_dir(&self.cfg);
            let (size, uid, gid) = (self.cfg.workspace_bytes, self.uid, self.gid);
            let spare = workspace::attach_disk(&disks, workspace, bytes, size, uid, gid).await?;
            steps.done("workspace filesystem mounted");
            Ok::<bool, ExecError>(spare)
        };
        let (stale, spare) = tokio::join!(stale, filesystem);
        stale?;
        let spare = spare?;
        let lease_dir = spec::lease_dir(key, &self.cfg)?;
        let lease = self
            .leases
            .lock()
            .get(key)
            .copied()
            .unwrap_or(Lease::Unbounded);
        fence::write(&lease_dir, &lease).map_err(|source| ExecError::Fence {
            path: lease_dir.clone(),
            source,
        })?;
        if !spec.secrets.is_empty() {
            let dir = spec::secrets_dir(key, &self.cfg)?;
            secrets::write(&dir, &spec.secrets, self.uid, self.gid).await?;
        }
        if egress {
            let labels = spec::labels(key, &self.cfg);
            let net =
                network::create(&self.docker, name, labels, &self.scope, &job_tag(key)).await?;
            tracing::info!(network = name, bridge = %net.bridge, "egress network ready and fenced");
        }
        Ok(spare)
    }

    /// Creates the job's container from `body` (not started).
    pub(super) async fn create(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<(), ExecError> {
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|source| ExecError::CreateContainer {
                name: name.to_string(),
                source,
            })?;
        for warning in created.warnings.iter().filter(|w| !w.is_empty()) {
            tracing::warn!(container = name, %warning, "docker engine warning");
        }
        Ok(())
    }

    /// Formats the successors of the spare workspace images taken, in the
    /// background (one refill at a time).
    pub(super) fn refill_spares(&self) {
        let refilling = self.refilling.clone();
        let disks = spec::disks_dir(&self.cfg);
        let (size, uid, gid) = (self.cfg.workspace_bytes, self.uid, self.gid);
        let refill = async move {
            let Ok(_one_at_a_time) = refilling.try_lock() else {
                return;
            };
            if let Err(e) = workspace::refill_disks(&disks, size, uid, gid).await {
                tracing::warn!(error = %error_chain(&e), "formatting spare workspace filesystems failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(refill.in_current_span());
            }
            Err(_) => tracing::debug!("no runtime: spares are formatted at the next pickup"),
        }
    }

    /// Makes sure the image is present (pulling it if allowed); returns its
    /// configuration (entrypoint and command).
    pub(super) async fn ensure_image(&self, image: &str) -> Result<Option<ImageConfig>, ExecError> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => return Ok(inspect.config),
            Err(e) if status(&e) == Some(404) => {}
            Err(source) => {
                return Err(ExecError::InspectImage {
                    image: image.to_string(),
                    source,
                });
            }
        }
        if self.cfg.pull == PullPolicy::Never {
            return Err(ExecError::ImageNotPresent {
                image: image.to_string(),
            });
        }
        tracing::info!(image, "pulling image");
        let (from_image, tag) = split_reference(image);
        let options = CreateImageOptions {
            from_image: Some(from_image.to_string()),
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            item.map_err(|source| ExecError::PullImage {
                image: image.to_string(),
                source,
            })?;
        }
        let inspect =
            self.docker
                .inspect_image(image)
                .await
                .map_err(|source| ExecError::InspectImage {
                    image: image.to_string(),
                    source,
                })?;
        Ok(inspect.config)
    }
}
