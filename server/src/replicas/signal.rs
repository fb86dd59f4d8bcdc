//! What replicas tell each other, and its encoding on the channel.

use base64::Engine as _;
use outpost_proto::agent::v1 as pb;
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// The largest payload PostgreSQL's `NOTIFY` takes is just under 8000
/// bytes; a message for an agent larger than this is not relayed.
pub const MAX_PAYLOAD: usize = 7900;

/// One signal from a replica.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// The queue changed: run a dispatch pass.
    Kick,
    /// A job, a log or an agent changed: wake followers and waiters.
    Changed,
    /// Enrolment records changed (an enrolment, a renewal, a revocation):
    /// reload them (`crate::enroll::Registry`).
    Identities,
    /// A message for `agent`'s session, wherever it is held.
    Deliver {
        agent: String,
        msg: Box<pb::server_message::Msg>,
    },
}

#[derive(Serialize, Deserialize)]
struct Wire {
    /// The replica that sent it (a replica ignores its own).
    from: String,
    kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    agent: String,
    /// A `ServerMessage`, protobuf then base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    msg: String,
}

impl Signal {
    /// The payload for `NOTIFY`, or `None` if it would not fit.
    pub fn encode(&self, from: &str) -> Option<String> {
        let (kind, agent, msg) = match self {
            Signal::Kick => ("kick", String::new(), String::new()),
            Signal::Changed => ("changed", String::new(), String::new()),
            Signal::Identities => ("identities", String::new(), String::new()),
            Signal::Deliver { agent, msg } => {
                let bytes = pb::ServerMessage {
                    msg: Some((**msg).clone()),
                }
                .encode_to_vec();
                (
                    "deliver",
                    agent.clone(),
                    base64::engine::general_purpose::STANDARD.encode(bytes),
                )
            }
        };
        let text = serde_json::to_string(&Wire {
            from: from.to_string(),
            kind: kind.to_string(),
            agent,
            msg,
        })
        .ok()?;
        (text.len() <= MAX_PAYLOAD).then_some(text)
    }

    /// The sender and the signal of a payload; `None` for one this version
    /// does not know (a newer replica's), which is ignored.
    pub fn decode(payload: &str) -> Option<(String, Signal)> {
        let w: Wire = serde_json::from_str(payload).ok()?;
        let signal = match w.kind.as_str() {
            "kick" => Signal::Kick,
            "changed" => Signal::Changed,
            "identities" => Signal::Identities,
            "deliver" => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(w.msg)
                    .ok()?;
                let msg = pb::ServerMessage::decode(bytes.as_slice()).ok()?.msg?;
                Signal::Deliver {
                    agent: w.agent,
                    msg: Box::new(msg),
                }
            }
            _ => return None,
        };
        Some((w.from, signal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_and_carry_their_sender() {
        let cancel = Signal::Deliver {
            agent: "a1".into(),
            msg: Box::new(pb::server_message::Msg::Cancel(pb::Cancel {
                job_id: "j".into(),
                epoch: 3,
                reason: "cancelled by admin".into(),
            })),
        };
        for s in [Signal::Kick, Signal::Changed, Signal::Identities, cancel] {
            let text = s.encode("r1").expect("fits");
            assert_eq!(Signal::decode(&text), Some(("r1".to_string(), s)));
        }
    }

    #[test]
    fn unknown_or_malformed_payloads_are_ignored() {
        assert_eq!(Signal::decode("not json"), None);
        assert_eq!(Signal::decode(r#"{"from":"r2","kind":"reticulate"}"#), None);
        assert_eq!(
            Signal::decode(r#"{"from":"r2","kind":"deliver","agent":"a","msg":"%%%"}"#),
            None
        );
    }

    #[test]
    fn a_message_too_large_for_notify_is_not_encoded() {
        let big = Signal::Deliver {
            agent: "a1".into(),
            msg: Box::new(pb::server_message::Msg::Drain(pb::Drain {
                reason: "x".repeat(MAX_PAYLOAD),
            })),
        };
        assert_eq!(big.encode("r1"), None);
    }
}
