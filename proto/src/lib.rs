//! The Outpost wire contract. Only this crate knows the generated types'
//! layout; `agent` and `server` convert them to their own domain types at
//! their edges (`agent::wire`, `server::wire`).

pub mod codec;

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("outpost.agent.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("outpost.admin.v1");
    }
}

pub mod iac {
    pub mod v1 {
        tonic::include_proto!("outpost.iac.v1");
    }
}

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("outpost.identity.v1");
    }
}
/// Largest gRPC message either side decodes (the control plane's services,
/// the agent's session and the admin client). Everything the control plane
/// accepts fits in it with room to spare: a job spec is at most
/// [`MAX_SPEC_BYTES`], and a lease adds its envelope (ids, epoch, the
/// per-lease web-identity token) to that.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Largest encoded job spec (`JobSpec`, secrets included) the control plane
/// accepts at submit. Half the message limit: a lease's envelope is a few
/// KiB at most.
pub const MAX_SPEC_BYTES: usize = 2 << 20;
