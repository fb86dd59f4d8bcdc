//! Plan policies in Rego (`package outpost.plan`): `deny` and `warn` sets of
//! messages, evaluated on the agent over `terraform show -json` of the plan.
//! Both the stack's policy (from the lease) and the agent owner's local one
//! (from `[iac] plan_policy`) run here, inside the VPC: only the verdict and
//! its messages leave the agent.

use std::num::NonZeroU32;
use std::time::Duration;

/// The package every plan policy declares.
pub const PACKAGE: &str = "data.outpost.plan";
/// Longest one evaluation may take.
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// A compiled plan policy.
pub struct PlanPolicy {
    name: String,
    engine: regorus::Engine,
}

impl std::fmt::Debug for PlanPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanPolicy")
            .field("name", &self.name)
            .finish()
    }
}

/// The messages of one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub deny: Vec<String>,
    pub warn: Vec<String>,
}

fn error_text(e: &anyhow::Error) -> String {
    format!("{e:#}").trim_end().to_string()
}

impl PlanPolicy {
    /// Compiles `text`; the error says what is wrong (syntax, package).
    pub fn compile(name: &str, text: &str) -> Result<PlanPolicy, String> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: TIME_LIMIT,
            check_interval: NonZeroU32::new(256).unwrap_or(NonZeroU32::MIN),
        });
        let package = engine
            .add_policy(name.to_string(), text.to_string())
            .map_err(|e| error_text(&e))?;
        if package != PACKAGE {
            return Err(format!(
                "it declares {package}; a plan policy declares `package outpost.plan`"
            ));
        }
        let mut p = PlanPolicy {
            name: name.to_string(),
            engine,
        };
        // An error that shows for every plan is found now, not at the first run.
        p.evaluate(&serde_json::json!({"plan": {}, "run": {}}))
            .map_err(|e| format!("evaluating it on an empty plan failed: {e}"))?;
        Ok(p)
    }

    /// The policy's verdict on `input`, or why it could not be evaluated
    /// (callers fail closed). A rule the policy does not define is empty.
    pub fn evaluate(&mut self, input: &serde_json::Value) -> Result<Verdict, String> {
        let input =
            regorus::Value::from_json_str(&input.to_string()).map_err(|e| error_text(&e))?;
        self.engine.set_input(input);
        let results = self
            .engine
            .eval_query(PACKAGE.to_string(), false)
            .map_err(|e| error_text(&e))?;
        let package = match results.result.first().and_then(|r| r.expressions.first()) {
            Some(e) => e.value.to_json_str().map_err(|e| error_text(&e))?,
            None => "{}".to_string(),
        };
        let package: serde_json::Value =
            serde_json::from_str(&package).map_err(|e| e.to_string())?;
        Ok(Verdict {
            deny: messages(&package, "deny")?,
            warn: messages(&package, "warn")?,
        })
    }
}

fn messages(package: &serde_json::Value, rule: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = match package.get(rule) {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Some(other) => {
            return Err(format!(
                "{PACKAGE}.{rule} must be a set of strings, not {other}"
            ));
        }
    };
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_and_warn_messages_and_compile_errors() {
        let mut p = PlanPolicy::compile(
            "t.rego",
            r#"package outpost.plan
deny contains msg if {
    some rc in input.plan.resource_changes
    "delete" in rc.change.actions
    msg := sprintf("%s would be destroyed", [rc.address])
}
warn contains "changes on a friday" if { input.run.friday }
"#,
        )
        .unwrap();
        let plan = serde_json::json!({"plan": {"resource_changes": [
            {"address": "null_resource.a", "change": {"actions": ["delete", "create"]}}
        ]}, "run": {"friday": true}});
        let v = p.evaluate(&plan).unwrap();
        assert_eq!(v.deny, ["null_resource.a would be destroyed"]);
        assert_eq!(v.warn, ["changes on a friday"]);
        let v = p
            .evaluate(&serde_json::json!({"plan": {}, "run": {}}))
            .unwrap();
        assert_eq!(v, Verdict::default());
        let e = PlanPolicy::compile("bad.rego", "package outpost.plan\ndeny contains if {")
            .unwrap_err();
        assert!(!e.is_empty());
        let e = PlanPolicy::compile("other.rego", "package other\n").unwrap_err();
        assert!(e.contains("outpost.plan"), "{e}");
    }
}
