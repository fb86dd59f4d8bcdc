//! What leaves the agent about a plan: the resources it changes with their
//! actions (never values), and the plan digest.

use serde_json::Value;

/// A changed resource: address and actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub address: String,
    pub actions: Vec<String>,
}

/// The changes of `terraform show -json` output, sorted by address; no-op
/// and read-only entries are left out.
pub fn summary(show: &Value) -> Vec<Change> {
    let mut out: Vec<Change> = show
        .get("resource_changes")
        .and_then(Value::as_array)
        .map(|rcs| {
            rcs.iter()
                .filter_map(|rc| {
                    let address = rc.get("address")?.as_str()?.to_string();
                    let actions: Vec<String> = rc
                        .get("change")?
                        .get("actions")?
                        .as_array()?
                        .iter()
                        .filter_map(|a| a.as_str().map(str::to_string))
                        .collect();
                    if actions.is_empty() || actions.iter().all(|a| a == "no-op" || a == "read") {
                        return None;
                    }
                    Some(Change { address, actions })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

/// The state a plan was made against: Terraform's serial and lineage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateRef {
    pub serial: u64,
    /// Empty: there was no state.
    pub lineage: String,
}

impl StateRef {
    /// Serial and lineage of a state file's JSON.
    pub fn of(state: &[u8]) -> Result<StateRef, String> {
        let v: Value = serde_json::from_slice(state).map_err(|e| e.to_string())?;
        let serial = v.get("serial").and_then(Value::as_u64).ok_or("no serial")?;
        let lineage = v
            .get("lineage")
            .and_then(Value::as_str)
            .filter(|l| !l.is_empty())
            .ok_or("no lineage")?;
        Ok(StateRef {
            serial,
            lineage: lineage.to_string(),
        })
    }
}

/// What the plan digest covers.
pub struct DigestInput<'a> {
    /// The plan bundle before encryption.
    pub bundle: &'a [u8],
    pub source_digest: &'a str,
    pub image: &'a str,
    pub variables: &'a std::collections::BTreeMap<String, String>,
    pub state: &'a StateRef,
}

/// Hex SHA-256 over the bundle's hash, the source digest, the image's content ID, the
/// variables and the state serial and lineage (length-prefixed fields, so
/// no two inputs collide).
pub fn digest(i: &DigestInput<'_>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    field(b"outpost-plan-v3");
    field(ring::digest::digest(&ring::digest::SHA256, i.bundle).as_ref());
    field(i.source_digest.as_bytes());
    field(i.image.as_bytes());
    field(&(i.variables.len() as u64).to_be_bytes());
    for (k, v) in i.variables {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    field(&i.state.serial.to_be_bytes());
    field(i.state.lineage.as_bytes());
    hex(ctx.finish().as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_keeps_addresses_and_actions_only() {
        let show = serde_json::json!({"resource_changes": [
            {"address": "b.x", "change": {"actions": ["create"], "after": {"secret": "canary"}}},
            {"address": "a.y", "change": {"actions": ["no-op"]}},
            {"address": "a.z", "change": {"actions": ["delete", "create"]}},
        ]});
        let s = summary(&show);
        assert_eq!(
            s,
            [
                Change {
                    address: "a.z".into(),
                    actions: vec!["delete".into(), "create".into()]
                },
                Change {
                    address: "b.x".into(),
                    actions: vec!["create".into()]
                }
            ]
        );
        assert!(!format!("{s:?}").contains("canary"));
    }

    #[test]
    fn the_digest_covers_every_input() {
        let vars = |v: &str| [("a".to_string(), v.to_string())].into();
        let st = |serial: u64, lineage: &str| StateRef {
            serial,
            lineage: lineage.into(),
        };
        let d = |b: &[u8], s: &str, i: &str, v: &str, state: StateRef| {
            digest(&DigestInput {
                bundle: b,
                source_digest: s,
                image: i,
                variables: &vars(v),
                state: &state,
            })
        };
        let base = d(b"plan", "src", "img", "1", st(0, ""));
        assert_ne!(base, d(b"plan2", "src", "img", "1", st(0, "")));
        assert_ne!(base, d(b"plan", "src2", "img", "1", st(0, "")));
        assert_ne!(base, d(b"plan", "src", "img2", "1", st(0, "")));
        assert_ne!(base, d(b"plan", "src", "img", "2", st(0, "")));
        assert_ne!(base, d(b"plan", "src", "img", "1", st(1, "")));
        assert_ne!(base, d(b"plan", "src", "img", "1", st(0, "l")));
        assert_eq!(base, d(b"plan", "src", "img", "1", st(0, "")));
    }

    #[test]
    fn state_refs_come_from_the_state_json() {
        let s = StateRef::of(br#"{"version":4,"serial":7,"lineage":"abc"}"#).unwrap();
        assert_eq!(
            s,
            StateRef {
                serial: 7,
                lineage: "abc".into()
            }
        );
        assert!(StateRef::of(b"{}").is_err());
        assert!(StateRef::of(b"not json").is_err());
    }
}
