//! Decoding what both backends store as text in a job's row.

use super::StoreError;
use crate::model::{JobSpec, JobState};

/// A job's spec (JSON) and state (its name), as stored for job `id`.
pub(super) fn spec_and_state(
    id: &str,
    spec: &str,
    state: &str,
) -> Result<(JobSpec, JobState), StoreError> {
    let spec: JobSpec = serde_json::from_str(spec).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        what: format!("spec: {e}"),
    })?;
    let state = JobState::parse(state).ok_or_else(|| StoreError::Corrupt {
        id: id.to_string(),
        what: format!("state {state:?}"),
    })?;
    Ok((spec, state))
}

/// `spec` without its secret values, as stored (JSON) for job `id`.
pub(super) fn spec_without_secrets(
    id: &str,
    spec: &JobSpec,
) -> Result<(JobSpec, String), StoreError> {
    let spec = spec.clone().without_secret_values();
    let json = serde_json::to_string(&spec).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        what: e.to_string(),
    })?;
    Ok((spec, json))
}
