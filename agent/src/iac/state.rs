//! The stack's current state version, fetched from the control plane
//! (ciphertext, opened with the pool key, checked against the serial and
//! lineage it was stored as). New versions go back through the state
//! endpoint ([`super::backend`]), fenced by the job's `(job, epoch)`: the
//! control plane refuses a version from any lease but the current apply
//! lease of the stack's run.

use outpost_proto::iac::v1 as iacpb;

use super::plan::StateRef;
use super::{IacAgent, IacError};
use crate::job::LeaseKey;

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
