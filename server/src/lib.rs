//! `outpost`: the reference control plane (`outpost server`), the admin CLI,
//! the local PKI and `outpost dev`.
//!
//! The control plane never dials an agent: agents open sessions to it
//! (`agent_api`), operators call the admin API (`admin_api`); both are served
//! on one mTLS port and authorised by the role in the client certificate
//! (`identity`). Jobs, leases and logs live in an embedded SQLite store
//! (`store`); `hub` pushes leases to connected agents and expires stale ones.
//! `iac` adds stacks, runs, plans and approvals on top of jobs.

pub mod admin_api;
pub mod agent_api;
pub mod cli;
pub mod client;
pub mod dev;
pub mod enroll;
pub mod hub;
pub mod iac;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod oidc;
pub mod pki;
pub mod replicas;
pub mod retention;
pub mod server;
pub mod store;
pub mod wire;
