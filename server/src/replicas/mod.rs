//! Several control-plane replicas over one PostgreSQL database.
//!
//! Every replica accepts agent sessions and admin calls. What one replica
//! does that another must hear of goes over the database's own
//! `LISTEN/NOTIFY` channel (`bus`): no replica dials another.
//!
//! - **Queue changed** (a submit, a re-queue, an expiry): every replica runs
//!   a dispatch pass for the agents whose sessions it holds. Two replicas
//!   that pick the same job race on one conditional `UPDATE`: one leases it
//!   (epoch + 1), the other sees it gone, so a job is leased once.
//! - **Something changed** (a log chunk, a status): log followers and
//!   waiters on every replica look again.
//! - **A message for an agent** (cancel, drain) whose session is on another
//!   replica: the replica holding the session delivers it.
//! - **Enrolment records changed** (an enrolment, a renewal, a revocation):
//!   every replica's enrolment registry reads them again, so a revoked
//!   agent's sessions end wherever they are (the registry also reads them
//!   every 5 s).
//!
//! - **Background work of stacks** (run steps, source polling, drift
//!   scheduling) runs on one replica at a time, elected through an
//!   advisory lock (`leader`); any replica serves the stacks' API.
//! - **Keys** that sign or seal what another replica must verify or open
//!   (the OIDC signing key, the secrets key) are files of each replica's
//!   data directory: `keys` checks at start that every replica holds the
//!   same.
//!
//! **Invariant:** nothing depends on a signal arriving. Signals only make
//! things happen sooner: the dispatcher passes every 2 s and followers poll
//! every second anyway, fencing is checked in the database, and after the
//! bus reconnects a replica looks at everything once.

mod bus;
/// Keys every replica must share, checked at start against the database.
pub mod keys;
mod leader;
mod signal;

pub use bus::{Bus, BusError};
pub use leader::Leadership;
pub use signal::Signal;
