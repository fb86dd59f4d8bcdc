//! Names and host paths of a lease: its container, network, workspace,
//! secrets and lease directories, each checked to stay its own.

use std::path::{Path, PathBuf};

use super::*;

/// Container name of a lease: `outpost-<job_id>-<epoch>`.
pub fn container_name(key: &LeaseKey) -> Result<String, SpecError> {
    check_job_id(&key.job_id)?;
    Ok(format!("outpost-{}-{}", key.job_id, key.epoch))
}

/// Network of a lease with egress: `outpost-<job_id>-<epoch>`, like its container.
pub fn network_name(key: &LeaseKey) -> Result<String, SpecError> {
    container_name(key)
}

/// Short, stable name of an agent's share of the host (hex FNV-1a of its
/// `work_dir`), so that agents sharing a host (or tests) only ever clean up
/// their own secrets directories and firewall rules.
pub fn agent_scope(work_dir: &Path) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in work_dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Directory holding this agent's per-job secrets directories:
/// `secrets_dir/<scope>`.
pub fn secrets_scope_dir(cfg: &SandboxConfig) -> PathBuf {
    cfg.secrets_dir.join(agent_scope(&cfg.work_dir))
}

/// Secrets directory of a lease: `secrets_dir/<scope>/<job_id>-<epoch>`.
pub fn secrets_dir(key: &LeaseKey, cfg: &SandboxConfig) -> Result<PathBuf, SpecError> {
    check_job_id(&key.job_id)?;
    Ok(secrets_scope_dir(cfg).join(format!("{}-{}", key.job_id, key.epoch)))
}

/// Secret names become file names under `/run/secrets`.
pub(super) fn check_secret_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(SpecError::InvalidSecretName(name.to_string()))
    }
}

/// The `outpost-init` binary on the host: `work_dir/.outpost/outpost-init`.
pub fn init_binary(cfg: &SandboxConfig) -> PathBuf {
    cfg.work_dir.join(AGENT_DIR).join("outpost-init")
}

/// Directory of the workspace images: `work_dir/.outpost/disks`.
pub fn disks_dir(cfg: &SandboxConfig) -> PathBuf {
    cfg.work_dir.join(AGENT_DIR).join("disks")
}

/// Directory holding every lease directory: `work_dir/.outpost/leases`.
pub fn leases_dir(cfg: &SandboxConfig) -> PathBuf {
    cfg.work_dir.join(AGENT_DIR).join("leases")
}

/// Lease directory of a lease (holding the file `outpost-init` reads):
/// `work_dir/.outpost/leases/<job_id>-<epoch>`.
pub fn lease_dir(key: &LeaseKey, cfg: &SandboxConfig) -> Result<PathBuf, SpecError> {
    check_job_id(&key.job_id)?;
    Ok(leases_dir(cfg).join(format!("{}-{}", key.job_id, key.epoch)))
}

/// Workspace directory of a lease: `work_dir/<job_id>-<epoch>`.
pub fn workspace_dir(key: &LeaseKey, work_dir: &Path) -> Result<PathBuf, SpecError> {
    check_job_id(&key.job_id)?;
    Ok(work_dir.join(format!("{}-{}", key.job_id, key.epoch)))
}

/// Whether a directory entry name is one [`workspace_dir`] can produce.
pub fn is_workspace_name(name: &str) -> bool {
    match name.rsplit_once('-') {
        Some((job_id, epoch)) => {
            check_job_id(job_id).is_ok()
                && !epoch.is_empty()
                && epoch.bytes().all(|b| b.is_ascii_digit())
                && epoch.parse::<u64>().is_ok()
        }
        None => false,
    }
}

/// Job ids become container names and path components: only a safe alphabet.
pub(super) fn check_job_id(job_id: &str) -> Result<(), SpecError> {
    let mut bytes = job_id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && job_id.len() <= MAX_JOB_ID_LEN {
        Ok(())
    } else {
        Err(SpecError::InvalidJobId(job_id.to_string()))
    }
}
