//! Managed state on the agent: the stack's current state version comes from
//! the control plane (ciphertext, opened with the pool key) into the job's
//! workspace before the container starts, and what the job leaves there is
//! sealed and sent back as a new version, fenced by the job's `(job,
//! epoch)`: the control plane refuses a version from any lease but the
//! current apply lease of the stack's run.

use std::path::Path;

use outpost_proto::iac::v1 as iacpb;

use super::plan::StateRef;
use super::{IacAgent, IacError, read_nofollow};
use crate::job::LeaseKey;

/// Where the configuration finds its state (Terraform's local backend).
pub const STATE_FILE: &str = "src/terraform.tfstate";
/// Largest state file read back from a workspace.
const MAX_STATE_BYTES: u64 = 48 << 20;

/// The stack's current state: its reference and its plaintext.
pub struct Current {
    pub state: StateRef,
    pub plain: Option<Vec<u8>>,
}

/// Fetches and opens the stack's current state.
pub async fn fetch(agent: &IacAgent, key: &LeaseKey) -> Result<Current, IacError> {
    let data = agent
        .client
        .clone()
        .get_state(iacpb::StateRequest {
            job_id: key.job_id.clone(),
            epoch: key.epoch,
        })
        .await
        .map_err(|s| IacError::State(format!("fetching it failed: {}", s.message())))?
        .into_inner();
    let Some(v) = data.version else {
        return Ok(Current {
            state: StateRef::default(),
            plain: None,
        });
    };
    let pool = agent.pool()?;
    let plain = pool
        .open(&data.sealed)
        .map_err(|e| IacError::State(format!("it does not open with the pool key: {e}")))?;
    let state = StateRef::of(&plain)
        .map_err(|e| IacError::State(format!("it is not a Terraform state: {e}")))?;
    if state.serial != v.serial || state.lineage != v.lineage {
        return Err(IacError::State(format!(
            "its content (serial {}, lineage {}) is not the version it was stored as (serial {}, lineage {})",
            state.serial, state.lineage, v.serial, v.lineage
        )));
    }
    Ok(Current {
        state,
        plain: Some(plain),
    })
}

/// Writes the state into the workspace, owned by the job's user.
pub fn write(ws: &Path, plain: &[u8], uid: u32, gid: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = ws.join(STATE_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(plain)?;
    f.sync_all()?;
    std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
}

/// Sends the workspace's state back if it moved from `before`; returns the
/// new reference.
pub async fn push_if_changed(
    agent: &IacAgent,
    key: &LeaseKey,
    ws: &Path,
    before: &StateRef,
) -> Result<Option<StateRef>, IacError> {
    let path = ws.join(STATE_FILE);
    let plain = match tokio::task::spawn_blocking(move || read_nofollow(&path, MAX_STATE_BYTES))
        .await
        .map_err(|_| IacError::Join("reading the state"))?
    {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(IacError::Read {
                what: "the state",
                source,
            });
        }
    };
    let state = StateRef::of(&plain)
        .map_err(|e| IacError::State(format!("the job left a state that is not valid: {e}")))?;
    if &state == before {
        return Ok(None);
    }
    let sealed = agent.pool()?.seal(&plain).map_err(IacError::Seal)?;
    agent
        .client
        .clone()
        .push_state(iacpb::StatePush {
            job_id: key.job_id.clone(),
            epoch: key.epoch,
            serial: state.serial,
            lineage: state.lineage.clone(),
            sealed,
        })
        .await
        .map_err(|s| IacError::State(format!("storing it failed: {}", s.message())))?;
    Ok(Some(state))
}
