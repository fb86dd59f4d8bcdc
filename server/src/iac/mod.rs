//! The infrastructure-as-code layer of the control plane: stacks (a git
//! source, a runner image, variables, labels, a plan policy, an approval
//! rule), their sources (`source`: real git, deterministic tarballs kept in
//! `blobs`), and runs (`runs`: the state machine of DESIGN.md, one tracked
//! run per stack at a time). A run's phases are ordinary jobs whose lease
//! carries an `IacTask` (`hub::LeaseTasks`); the agent plans, evaluates the
//! plan policies inside its network and reports only a summary (`api`:
//! `outpost.iac.v1.IacAgent`, fenced by the caller's current lease).
//! Operators use `outpost.iac.v1.IacAdmin` (`api`) through `cli`. A
//! confirmed run's apply (`apply`) applies exactly the approved plan, whose
//! bundle the control plane holds sealed to the pool key; stacks without a
//! backend of their own keep their state versions here (`state`), sealed too.
//! Operators use `outpost.iac.v1.IacAdmin` (`api`) through `cli`.
//! Proposed runs (`launch`) plan any ref without the stack lock; `drift`
//! schedules drift checks and keeps each stack's drift status; stack
//! secrets are sealed at rest (`secrets`); events go out as signed
//! webhooks (`crate::notify`).

pub mod api;
pub mod apply;
pub mod approval;
pub mod blobs;
pub mod cli;
pub mod config;
pub mod demo;
pub mod drift;
pub mod launch;
pub mod model;
pub mod runs;
pub mod secrets;
pub mod source;
pub mod state;
pub mod store;
pub mod wire;

use crate::store::StoreError;

/// Errors of the IaC layer; each maps to one gRPC status in `api`.
#[derive(Debug, thiserror::Error)]
pub enum IacError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Refused(String),
    #[error("fetching branch {branch} of {repo} failed: {reason}")]
    Fetch {
        repo: String,
        branch: String,
        reason: String,
    },
    #[error("blob store {op} failed: {source}")]
    Blob {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("iac task failed")]
    Join,
}

impl From<IacError> for tonic::Status {
    fn from(e: IacError) -> Self {
        let msg = e.to_string();
        match e {
            IacError::BadRequest(_) | IacError::Fetch { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            IacError::NotFound(_) => tonic::Status::not_found(msg),
            IacError::Conflict(_) => tonic::Status::failed_precondition(msg),
            IacError::Refused(_) => tonic::Status::permission_denied(msg),
            IacError::Store(StoreError::Stale { .. } | StoreError::NotFound(_)) => {
                tonic::Status::permission_denied(msg)
            }
            _ => tonic::Status::internal(msg),
        }
    }
}
