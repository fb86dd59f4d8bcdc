//! The Outpost wire contract. Only this crate knows the generated types'
//! layout; `agent` and `server` convert them to their own domain types at
//! their edges (`agent::wire`, `server::wire`).

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
