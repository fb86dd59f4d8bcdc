//! Drift checks on the agent. One checkout, two plans: `plan -refresh-only`
//! (the world moved away from the state: resources whose refreshed values
//! differ from the state before the refresh, or that are gone) and a normal
//! plan (the code and the world disagree: what apply would change). The
//! comparison of values happens here; only addresses and actions leave the
//! agent. No policy is evaluated and nothing is kept for an apply.

use std::collections::BTreeMap;

use serde_json::Value;

use super::plan::Change;

/// The drift check's script: the state as it is, the refresh-only plan,
/// the normal plan; each `show -json` goes to a file, never to the log.
pub const SCRIPT: &str = r#"set -u
cd /workspace/src
tf="$OUTPOST_TOOL"
"$tf" init -input=false -no-color || exit 1
"$tf" show -json > /workspace/state.json || exit 1
"$tf" plan -refresh-only -input=false -no-color -out=/workspace/refresh.tfplan -detailed-exitcode
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then exit 1; fi
"$tf" show -json /workspace/refresh.tfplan > /workspace/refresh.json || exit 1
"$tf" plan -input=false -no-color -out=/workspace/tfplan -detailed-exitcode
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then exit 1; fi
echo "$rc" > /workspace/plan.exitcode
"$tf" show -json /workspace/tfplan > /workspace/plan.json || exit 1
"#;

/// Managed resource instances of a `values` tree (root and child modules):
/// address → values.
fn instances(values: Option<&Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<&Value> = values
        .and_then(|v| v.get("root_module"))
        .into_iter()
        .collect();
    while let Some(module) = stack.pop() {
        for r in module
            .get("resources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if r.get("mode").and_then(Value::as_str) != Some("managed") {
                continue;
            }
            if let Some(addr) = r.get("address").and_then(Value::as_str) {
                out.insert(
                    addr.to_string(),
                    r.get("values").cloned().unwrap_or(Value::Null),
                );
            }
        }
        for child in module
            .get("child_modules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            stack.push(child);
        }
    }
    out
}

/// What the refresh found moved: `state` is `show -json` of the state
/// before the refresh, `refresh` the refresh-only plan's `show -json`.
/// Terraform versions that report `resource_drift` are taken at their
/// word; for the others (1.0) the refreshed state (`prior_state`) is
/// compared with the state before: a resource gone from the world is
/// `delete`, one whose values changed is `update`. Sorted by address.
pub fn drifted(state: &Value, refresh: &Value) -> Vec<Change> {
    if let Some(drift) = refresh.get("resource_drift") {
        return super::plan::summary(&serde_json::json!({ "resource_changes": drift }));
    }
    let before = instances(state.get("values"));
    let after = instances(
        refresh
            .get("prior_state")
            .and_then(|p| p.get("values"))
            .or_else(|| refresh.get("planned_values")),
    );
    let mut out = Vec::new();
    for (addr, old) in &before {
        let action = match after.get(addr) {
            None => "delete",
            Some(new) if new != old => "update",
            Some(_) => continue,
        };
        out.push(Change {
            address: addr.clone(),
            actions: vec![action.to_string()],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_what_the_refresh_changed_or_removed_without_values() {
        let state = serde_json::json!({"values": {"root_module": {
            "resources": [
                {"address": "a.x", "mode": "managed", "values": {"v": "secret-canary"}},
                {"address": "a.gone", "mode": "managed", "values": {"v": 1}},
                {"address": "data.a.d", "mode": "data", "values": {"v": 1}},
            ],
            "child_modules": [{"resources": [
                {"address": "module.m.a.y", "mode": "managed", "values": {"v": 2}},
            ]}],
        }}});
        let refresh = serde_json::json!({"prior_state": {"values": {"root_module": {
            "resources": [
                {"address": "a.x", "mode": "managed", "values": {"v": "moved"}},
            ],
            "child_modules": [{"resources": [
                {"address": "module.m.a.y", "mode": "managed", "values": {"v": 2}},
            ]}],
        }}}});
        let d = drifted(&state, &refresh);
        assert_eq!(
            d,
            [
                Change {
                    address: "a.gone".into(),
                    actions: vec!["delete".into()]
                },
                Change {
                    address: "a.x".into(),
                    actions: vec!["update".into()]
                },
            ]
        );
        assert!(!format!("{d:?}").contains("canary"));
        assert!(
            drifted(
                &state,
                &serde_json::json!({"prior_state": {"values": state["values"]}})
            )
            .is_empty()
        );
        let newer = serde_json::json!({"resource_drift": [
            {"address": "a.x", "change": {"actions": ["update"], "after": {"v": "canary"}}},
        ]});
        assert_eq!(drifted(&state, &newer)[0].address, "a.x");
    }
}
