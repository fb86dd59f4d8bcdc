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

/// Hex SHA-256 over the plan file's hash, the source digest, the image and
/// the variables (length-prefixed fields, so no two inputs collide).
pub fn digest(
    plan_file: &[u8],
    source_digest: &str,
    image: &str,
    variables: &std::collections::BTreeMap<String, String>,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    field(b"outpost-plan-v1");
    field(ring::digest::digest(&ring::digest::SHA256, plan_file).as_ref());
    field(source_digest.as_bytes());
    field(image.as_bytes());
    for (k, v) in variables {
        field(k.as_bytes());
        field(v.as_bytes());
    }
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
        let d = digest(b"plan", "src", "img", &vars("1"));
        assert_ne!(d, digest(b"plan2", "src", "img", &vars("1")));
        assert_ne!(d, digest(b"plan", "src2", "img", &vars("1")));
        assert_ne!(d, digest(b"plan", "src", "img2", &vars("1")));
        assert_ne!(d, digest(b"plan", "src", "img", &vars("2")));
        assert_eq!(d, digest(b"plan", "src", "img", &vars("1")));
    }
}
