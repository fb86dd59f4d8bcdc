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

/// A compiled Rego module of one package, evaluated whole: the engine that
/// plan policies here and the control plane's approval policies share.
pub struct Rego {
    package: &'static str,
    engine: regorus::Engine,
}

fn error_text(e: &anyhow::Error) -> String {
    format!("{e:#}").trim_end().to_string()
}

impl Rego {
    /// Compiles `text`, which must declare `package` (`data.…`); `kind`
    /// names the policy in the error.
    pub fn compile(
        name: &str,
        text: &str,
        package: &'static str,
        kind: &str,
    ) -> Result<Rego, String> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: TIME_LIMIT,
            check_interval: NonZeroU32::new(256).unwrap_or(NonZeroU32::MIN),
        });
        let declared = engine
            .add_policy(name.to_string(), text.to_string())
            .map_err(|e| error_text(&e))?;
        if declared != package {
            return Err(format!(
                "it declares {declared}; {kind} declares `package {}`",
                package.trim_start_matches("data.")
            ));
        }
        Ok(Rego { package, engine })
    }

    /// The package's value on `input` as JSON (`{}` when no rule is
    /// defined), or why it could not be evaluated (callers fail closed).
    pub fn evaluate(&mut self, input: &serde_json::Value) -> Result<serde_json::Value, String> {
        let input =
            regorus::Value::from_json_str(&input.to_string()).map_err(|e| error_text(&e))?;
        self.engine.set_input(input);
        let results = self
            .engine
            .eval_query(self.package.to_string(), false)
            .map_err(|e| error_text(&e))?;
        let package = match results.result.first().and_then(|r| r.expressions.first()) {
            Some(e) => e.value.to_json_str().map_err(|e| error_text(&e))?,
            None => "{}".to_string(),
        };
        serde_json::from_str(&package).map_err(|e| e.to_string())
    }
}

/// A compiled plan policy.
pub struct PlanPolicy {
    name: String,
    rego: Rego,
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

impl PlanPolicy {
    /// Compiles `text`; the error says what is wrong (syntax, package).
    pub fn compile(name: &str, text: &str) -> Result<PlanPolicy, String> {
        let mut p = PlanPolicy {
            name: name.to_string(),
            rego: Rego::compile(name, text, PACKAGE, "a plan policy")?,
        };
        // An error that shows for every plan is found now, not at the first run.
        p.evaluate(&serde_json::json!({"plan": {}, "run": {}}))
            .map_err(|e| format!("evaluating it on an empty plan failed: {e}"))?;
        Ok(p)
    }

    /// The policy's verdict on `input`, or why it could not be evaluated
    /// (callers fail closed). A rule the policy does not define is empty.
    pub fn evaluate(&mut self, input: &serde_json::Value) -> Result<Verdict, String> {
        let package = self.rego.evaluate(input)?;
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
