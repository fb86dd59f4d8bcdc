//! The hub's side of the replicas' channel (`crate::replicas`): what it
//! sends (kicks that found no agent here, changes, messages for agents
//! whose sessions are elsewhere) and what it does with what arrives.

use std::sync::Arc;

use outpost_proto::agent::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Hub;
use crate::replicas::{Bus, Signal};

impl Hub {
    /// Joins the other replicas through `bus`, acting on their signals
    /// (`incoming`) until `shutdown`.
    pub fn join_replicas(
        self: &Arc<Self>,
        bus: Arc<Bus>,
        mut incoming: mpsc::Receiver<Signal>,
        shutdown: CancellationToken,
    ) {
        let _ = self.bus.set(bus);
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                let signal = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    s = incoming.recv() => match s {
                        Some(s) => s,
                        None => break,
                    },
                };
                hub.on_signal(signal);
            }
            debug!("replica signals stopped");
        });
    }

    fn on_signal(&self, signal: Signal) {
        match signal {
            // Not `kick`: a relayed kick is never relayed again.
            Signal::Kick => self.dispatch.notify_one(),
            Signal::Changed => self.changed_here(),
            // The bus hands it to the enrolment registry, not here.
            Signal::Identities => {}
            Signal::Deliver { agent, msg } => {
                if !self.is_connected(&agent) {
                    return;
                }
                if matches!(*msg, pb::server_message::Msg::Drain(_)) {
                    self.set_draining(&agent);
                }
                let sent = self.send(&agent, *msg);
                debug!(agent = %agent, delivered = sent, "message relayed from another replica");
            }
        }
    }

    /// Sends `signal` to the other replicas, if there are any.
    pub(super) fn publish(&self, signal: Signal) {
        if let Some(bus) = self.bus.get() {
            bus.publish(signal);
        }
    }

    /// Sends a message to an agent: here if its session is here, else
    /// through the replica that holds it. Returns whether it was handed to
    /// a session on this replica.
    pub fn send_anywhere(&self, agent: &str, msg: pb::server_message::Msg) -> bool {
        if self.send(agent, msg.clone()) {
            return true;
        }
        self.publish(Signal::Deliver {
            agent: agent.to_string(),
            msg: Box::new(msg),
        });
        false
    }
}
