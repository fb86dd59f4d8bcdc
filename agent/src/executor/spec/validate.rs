//! Whether a job can run under this agent's sandbox ([`validate`]), and
//! whether a container's configuration still holds it ([`check_sandbox`]).

use super::*;

/// Image references go into engine API paths: only the characters of
/// Docker's reference grammar, and no empty or dot-led path component.
fn check_image(image: &str) -> Result<(), SpecError> {
    let charset_ok = image
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@'));
    let name = image.split('@').next().unwrap_or_default();
    let components_ok = image.len() <= 512
        && name
            .split('/')
            .all(|c| c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric()));
    if charset_ok && components_ok && !image.contains("..") {
        Ok(())
    } else {
        Err(SpecError::InvalidImage(image.to_string()))
    }
}

/// Checks a job against the agent's policy and computes its limits. A job may
/// only lower a limit; asking for more than the agent allows is rejected
/// (not clamped), so that the job's owner learns why it would not fit.
pub fn validate(key: &LeaseKey, spec: &JobSpec, cfg: &SandboxConfig) -> Result<Limits, SpecError> {
    check_job_id(&key.job_id)?;
    if spec.image.is_empty() {
        return Err(SpecError::NoImage);
    }
    check_image(&spec.image)?;
    if spec.network == Network::Egress && !cfg.allow_egress {
        return Err(SpecError::EgressNotAllowed);
    }
    let limit = |resource: &'static str, requested: Option<u64>, limit: u64, minimum: u64| {
        let Some(requested) = requested else {
            return Ok(limit);
        };
        if requested > limit {
            Err(SpecError::AboveAgentLimit {
                resource,
                requested,
                limit,
            })
        } else if requested < minimum {
            Err(SpecError::BelowMinimum {
                resource,
                requested,
                minimum,
            })
        } else {
            Ok(requested)
        }
    };
    let limits = Limits {
        memory_bytes: limit(
            "memory_bytes",
            spec.resources.memory_bytes,
            cfg.memory_bytes,
            MIN_MEMORY_BYTES,
        )?,
        nano_cpus: limit(
            "nano_cpus",
            spec.resources.nano_cpus,
            cfg.nano_cpus,
            MIN_NANO_CPUS,
        )?,
        pids: limit("pids", spec.resources.pids, cfg.pids, MIN_PIDS)?,
        workspace_bytes: limit(
            "workspace_bytes",
            spec.resources.workspace_bytes,
            cfg.workspace_bytes,
            crate::executor::disk::MIN_WORKSPACE_BYTES,
        )?,
    };
    for (name, value) in &spec.env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(SpecError::InvalidEnvName(name.clone()));
        }
        if value.contains('\0') {
            return Err(SpecError::InvalidEnvValue(name.clone()));
        }
    }
    if spec.command.iter().any(|arg| arg.contains('\0')) {
        return Err(SpecError::InvalidCommand);
    }
    let mut names = std::collections::BTreeSet::new();
    for secret in &spec.secrets {
        check_secret_name(&secret.name)?;
        if !names.insert(secret.name.as_str()) {
            return Err(SpecError::DuplicateSecret(secret.name.clone()));
        }
    }
    let total: usize = spec.secrets.iter().map(|s| s.value.expose().len()).sum();
    if spec.secrets.len() > MAX_SECRETS || total > MAX_SECRET_BYTES {
        return Err(SpecError::SecretsTooLarge);
    }
    Ok(limits)
}

/// The workspace must be exactly this lease's directory inside `work_dir`:
/// never the Docker socket, never anything else on the host.
pub(super) fn check_workspace(
    key: &LeaseKey,
    cfg: &SandboxConfig,
    path: &Path,
) -> Result<(), SpecError> {
    let refuse = |reason| {
        Err(SpecError::WorkspacePath {
            path: path.to_path_buf(),
            reason,
        })
    };
    if !path.is_absolute() {
        return refuse("it is not absolute");
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return refuse("it contains '.' or '..'");
    }
    let text = path.to_string_lossy();
    if path.file_name().is_some_and(|n| n == "docker.sock") || text.contains("docker.sock") {
        return refuse("it is the docker socket");
    }
    if path.parent() != Some(cfg.work_dir.as_path()) {
        return refuse("it is not directly inside the agent's work directory");
    }
    if path != workspace_dir(key, &cfg.work_dir)?.as_path() {
        return refuse("it is not this job's workspace");
    }
    Ok(())
}

/// Checks that a create-container body (after any hook changed it) still
/// holds the sandbox's non-negotiable properties: nothing privileged, no
/// capability, `no-new-privileges` with the default seccomp and AppArmor
/// profiles, a read-only root, the configured non-root user, no host
/// namespace, no device, no host path
/// but the job's own (its workspace, read-write, and its secrets directory,
/// read-only), and no network but `none` or its own (if egress is allowed).
/// Hooks may add tmpfs mounts and environment.
pub fn check_sandbox(
    body: &ContainerCreateBody,
    key: &LeaseKey,
    cfg: &SandboxConfig,
    workspace_host_path: &Path,
) -> Result<(), SpecError> {
    let loosened = |what| Err(SpecError::SandboxLoosened(what));
    let Some(h) = body.host_config.as_ref() else {
        return loosened("no host configuration");
    };
    if h.privileged != Some(false) {
        return loosened("privileged");
    }
    if h.cap_drop.as_deref() != Some(&["ALL".to_string()][..])
        || h.cap_add.as_ref().is_some_and(|c| !c.is_empty())
    {
        return loosened("capabilities");
    }
    let opts = h.security_opt.as_deref().unwrap_or_default();
    if !opts.iter().any(|o| o == "no-new-privileges:true")
        || opts.iter().any(|o| {
            o.contains("unconfined") || o.starts_with("seccomp") || o.starts_with("apparmor")
        })
    {
        return loosened("security options");
    }
    if h.readonly_rootfs != Some(true) {
        return loosened("read-only root filesystem");
    }
    // The configured (validated non-root) user, and never root whatever the
    // configuration says: an unset or empty user is the image's, often root.
    let user = body.user.as_deref().unwrap_or_default();
    let uid = user.split(':').next().unwrap_or_default();
    if user != cfg.user || uid.is_empty() || uid == "0" || uid == "root" {
        return loosened("user");
    }
    let host_mode = |mode: &Option<String>| {
        mode.as_deref()
            .is_some_and(|m| m == "host" || m.starts_with("container:"))
    };
    if host_mode(&h.network_mode)
        || host_mode(&h.pid_mode)
        || host_mode(&h.ipc_mode)
        || h.uts_mode.as_deref() == Some("host")
        || h.userns_mode.as_deref() == Some("host")
        || h.cgroupns_mode == Some(HostConfigCgroupnsModeEnum::HOST)
    {
        return loosened("host namespaces");
    }
    if h.devices.as_ref().is_some_and(|d| !d.is_empty())
        || h.device_requests.as_ref().is_some_and(|d| !d.is_empty())
        || h.device_cgroup_rules
            .as_ref()
            .is_some_and(|d| !d.is_empty())
    {
        return loosened("devices");
    }
    if h.binds.as_ref().is_some_and(|b| !b.is_empty())
        || h.volumes_from.as_ref().is_some_and(|v| !v.is_empty())
        || body.volumes.as_ref().is_some_and(|v| !v.is_empty())
    {
        return loosened("host paths");
    }
    let workspace = workspace_host_path.to_string_lossy();
    let is_workspace = |m: &Mount| {
        m.typ == Some(MountType::BIND)
            && m.source.as_deref() == Some(&*workspace)
            && m.target.as_deref() == Some(WORKSPACE_MOUNT)
    };
    let secrets = secrets_dir(key, cfg)?;
    let secrets = secrets.to_string_lossy();
    let is_secrets = |m: &Mount| {
        m.typ == Some(MountType::BIND)
            && m.source.as_deref() == Some(&*secrets)
            && m.target.as_deref() == Some(SECRETS_MOUNT)
            && m.read_only == Some(true)
    };
    let init = init_binary(cfg);
    let init = init.to_string_lossy();
    let is_init = |m: &Mount| {
        m.typ == Some(MountType::BIND)
            && m.source.as_deref() == Some(&*init)
            && m.target.as_deref() == Some(INIT_PATH)
            && m.read_only == Some(true)
    };
    let lease = lease_dir(key, cfg)?;
    let lease = lease.to_string_lossy();
    let is_lease = |m: &Mount| {
        m.typ == Some(MountType::BIND)
            && m.source.as_deref() == Some(&*lease)
            && m.target.as_deref() == Some(LEASE_DIR)
            && m.read_only == Some(true)
    };
    let mounts = h.mounts.as_deref().unwrap_or_default();
    let count = |f: &dyn Fn(&Mount) -> bool| mounts.iter().filter(|m| f(m)).count();
    let only_own_paths = count(&is_workspace) == 1
        && count(&is_init) == 1
        && count(&is_lease) == 1
        && count(&is_secrets) <= 1
        && mounts
            .iter()
            .all(|m| is_workspace(m) || is_init(m) || is_lease(m) || is_secrets(m));
    if !only_own_paths {
        return loosened("host paths");
    }
    // The fence: outpost-init is PID 1 (never under the engine's own init)
    // and runs the job.
    if h.init == Some(true)
        || body
            .entrypoint
            .as_deref()
            .and_then(|e| e.first())
            .map(String::as_str)
            != Some(INIT_PATH)
    {
        return loosened("outpost-init as PID 1");
    }
    let own_network = network_name(key)?;
    let network_ok = match h.network_mode.as_deref() {
        Some("none") => true,
        Some(n) => cfg.allow_egress && n == own_network,
        None => false,
    };
    if !network_ok {
        return loosened("network");
    }
    if h.memory.is_none_or(|m| m <= 0)
        || h.memory_swap != h.memory
        || h.pids_limit.is_none_or(|p| p <= 0)
        || h.nano_cpus.is_none_or(|c| c <= 0)
    {
        return loosened("resource limits");
    }
    Ok(())
}
