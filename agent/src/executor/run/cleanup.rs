//! Removing what a job leaves (container, network, rules, workspace,
//! lease file, secrets), at its end and for orphans at start.

use super::*;

impl DockerExecutor {
    /// A job's container name and workspace, and the clean-up of what it
    /// leaves on the host (for a run and for an adoption alike).
    pub(super) fn job_host_paths(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
    ) -> Result<(String, PathBuf, Cleanup), ExecError> {
        let name = spec::container_name(key)?;
        let workspace = spec::workspace_dir(key, &self.cfg.work_dir)?;
        let leftovers = self.leftovers(key, spec, &name, &workspace)?;
        let cleanup = Cleanup {
            docker: self.docker.clone(),
            leftovers,
            done: false,
        };
        Ok((name, workspace, cleanup))
    }

    /// What a job leaves on the host until [`remove_job`] removes it.
    pub(super) fn leftovers(
        &self,
        key: &LeaseKey,
        spec: &JobSpec,
        name: &str,
        workspace: &Path,
    ) -> Result<Leftovers, ExecError> {
        Ok(Leftovers {
            name: name.to_string(),
            workspace: workspace.to_path_buf(),
            secrets: spec::secrets_dir(key, &self.cfg)?,
            lease: spec::lease_dir(key, &self.cfg)?,
            disks: spec::disks_dir(&self.cfg),
            egress: spec.network == Network::Egress,
            scope: self.scope.clone(),
            tag: job_tag(key),
        })
    }

    /// Removes every container labelled `outpost.job` that this agent's
    /// `work_dir` created (left by a crashed agent; running ones are killed)
    /// and every leftover workspace directory in `work_dir`. Returns how many
    /// containers were removed. Call it only while this agent runs no job.
    ///
    /// Containers of other agents sharing the engine (other `work_dir`) are
    /// left alone. Everything removable is removed even if one removal fails;
    /// the first failure is then returned.
    pub async fn cleanup_orphans(&self) -> Result<usize, ExecError> {
        self.cleanup_orphans_except(&[]).await
    }

    /// [`cleanup_orphans`](Self::cleanup_orphans), but the containers and
    /// workspaces of `keep` (jobs being re-adopted) stay.
    pub async fn cleanup_orphans_except(&self, keep: &[LeaseKey]) -> Result<usize, ExecError> {
        let work_dir_label = format!("{LABEL_WORK_DIR}={}", self.cfg.work_dir.to_string_lossy());
        let options = ListContainersOptions {
            all: true,
            filters: Some(
                [(
                    "label".to_string(),
                    vec![LABEL_JOB.to_string(), work_dir_label.clone()],
                )]
                .into(),
            ),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|source| ExecError::ListContainers {
                label: format!("{LABEL_JOB} and {work_dir_label}"),
                source,
            })?;
        let mut removed = 0;
        let mut first_error = None;
        for container in containers {
            let Some(id) = container.id else { continue };
            let labels = container.labels.unwrap_or_default();
            let job_id = labels.get(LABEL_JOB).cloned().unwrap_or_default();
            let epoch = labels.get(LABEL_EPOCH).cloned().unwrap_or_default();
            if keep
                .iter()
                .any(|k| k.job_id == job_id && k.epoch.to_string() == epoch)
            {
                continue;
            }
            match remove_container(&self.docker, &id).await {
                Ok(true) => {
                    tracing::info!(container = %id, job_id = %job_id, "removed orphaned job container");
                    removed += 1;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(container = %id, error = %error_chain(&e), "removing orphaned job container failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        // Networks after their containers (an attached network cannot go),
        // then the firewall rules of every network that is gone.
        let mut fenced: Vec<String> = keep.iter().map(job_tag).collect();
        let mut networks_known = false;
        match network::list_labelled(&self.docker, vec![LABEL_JOB.to_string(), work_dir_label])
            .await
        {
            Ok(networks) => {
                networks_known = true;
                for (id, name, labels) in networks {
                    let job_id = labels.get(LABEL_JOB).cloned().unwrap_or_default();
                    let epoch = labels.get(LABEL_EPOCH).cloned().unwrap_or_default();
                    let tag = format!("{job_id}-{epoch}");
                    if fenced.contains(&tag) {
                        continue;
                    }
                    match network::remove_id(&self.docker, &id).await {
                        Ok(_) => tracing::info!(network = %name, "removed orphaned job network"),
                        Err(e) => {
                            tracing::warn!(network = %name, error = %error_chain(&e), "removing orphaned job network failed; keeping its firewall rules");
                            fenced.push(tag);
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "listing orphaned job networks failed; keeping all firewall rules");
                first_error.get_or_insert(e);
            }
        }
        if networks_known {
            match network::remove_rules_except(&self.scope, &fenced).await {
                Ok(0) => {}
                Ok(rules) => tracing::info!(rules, "removed leftover firewall rules"),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let kept: Vec<PathBuf> = keep
            .iter()
            .filter_map(|k| spec::workspace_dir(k, &self.cfg.work_dir).ok())
            .collect();
        match workspace::remove_leftovers(&self.cfg.work_dir, kept, &spec::disks_dir(&self.cfg))
            .await
        {
            Ok(0) => {}
            Ok(dirs) => tracing::info!(dirs, "removed leftover workspaces"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        let kept: Vec<PathBuf> = keep
            .iter()
            .filter_map(|k| spec::lease_dir(k, &self.cfg).ok())
            .collect();
        match fence::remove_leftovers(&spec::leases_dir(&self.cfg), kept).await {
            Ok(0) => {}
            Ok(dirs) => tracing::info!(dirs, "removed leftover lease directories"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        let kept: Vec<PathBuf> = keep
            .iter()
            .filter_map(|k| spec::secrets_dir(k, &self.cfg).ok())
            .collect();
        match secrets::remove_leftovers(&spec::secrets_scope_dir(&self.cfg), kept).await {
            Ok(0) => {}
            Ok(dirs) => tracing::info!(dirs, "removed leftover secrets"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }
}

/// Force-removes a container and its anonymous volumes. `Ok(false)` if
/// there was none.
pub(super) async fn remove_container(docker: &Docker, name: &str) -> Result<bool, ExecError> {
    let mut attempt = 1;
    loop {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match docker.remove_container(name, Some(options)).await {
            Ok(()) => return Ok(true),
            Err(e) if status(&e) == Some(404) => return Ok(false),
            // "removal already in progress"
            Err(e) if status(&e) == Some(409) && attempt < REMOVE_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(source) => {
                return Err(ExecError::RemoveContainer {
                    name: name.to_string(),
                    source,
                });
            }
        }
    }
}

/// What a job leaves on the host while it runs.
#[derive(Debug, Default)]
pub(super) struct Leftovers {
    /// Container (and, with egress, network) name.
    pub(super) name: String,
    pub(super) workspace: PathBuf,
    pub(super) secrets: PathBuf,
    /// Its lease directory (`outpost-init`'s deadline).
    pub(super) lease: PathBuf,
    /// Where its workspace image is.
    pub(super) disks: PathBuf,
    pub(super) egress: bool,
    pub(super) scope: String,
    /// `<job_id>-<epoch>`, naming its firewall rules.
    pub(super) tag: String,
}

/// Removes a job's container, network, firewall rules, workspace and
/// secrets when `run` ends, or, if its future is dropped before, from a
/// background task.
pub(super) struct Cleanup {
    pub(super) docker: Docker,
    pub(super) leftovers: Leftovers,
    pub(super) done: bool,
}

impl Cleanup {
    pub(super) async fn run(&mut self) {
        remove_job(&self.docker, &self.leftovers).await;
        self.done = true;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (docker, leftovers) = (self.docker.clone(), std::mem::take(&mut self.leftovers));
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let span = tracing::info_span!("job_cleanup", container = %leftovers.name);
                handle.spawn(async move { remove_job(&docker, &leftovers).await }.instrument(span));
            }
            Err(_) => tracing::warn!(
                container = %leftovers.name,
                "run was dropped outside a runtime; cleanup_orphans will remove the container"
            ),
        }
    }
}

pub(super) async fn remove_job(docker: &Docker, job: &Leftovers) {
    let name = job.name.as_str();
    // The container (then its network and rules), the workspace and the
    // secrets go at the same time: none waits for another, and each goes
    // whether or not the others could.
    let container = async {
        let container_gone = match remove_container(docker, name).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(container = name, error = %error_chain(&e), "removing the job container failed");
                false
            }
        };
        // The rules go only once the network (and so the container) is gone:
        // a job must never run unfenced.
        if job.egress && container_gone {
            match network::remove_named(docker, name).await {
                Ok(_) => {
                    if let Err(e) = network::remove_rules(&job.scope, &job.tag).await {
                        tracing::warn!(error = %error_chain(&e), "removing the job's firewall rules failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(network = name, error = %error_chain(&e), "removing the job network failed; its firewall rules stay")
                }
            }
        }
        container_gone
    };
    let workspace = async {
        if let Err(e) = workspace::remove(&job.workspace, &job.disks).await {
            tracing::warn!(error = %error_chain(&e), "removing the job workspace failed");
        }
    };
    let secrets = async {
        if let Err(e) = secrets::remove(&job.secrets).await {
            tracing::warn!(error = %error_chain(&e), "removing the job's secrets failed");
        }
    };
    let (container_gone, (), ()) = tokio::join!(container, workspace, secrets);
    // A container that could not be removed keeps the last lease it read.
    if container_gone && let Err(e) = fence::remove(&job.lease).await {
        tracing::warn!(error = %error_chain(&e), "removing the job's lease directory failed");
    }
}
