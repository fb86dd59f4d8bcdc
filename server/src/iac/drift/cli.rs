//! `outpost drift`: stacks with their drift status, the age of the last
//! check and when the next one is due.

use outpost_proto::iac::v1 as iac;
use serde_json::{Value, json};

/// A drift status as JSON (also in `outpost stack show`).
pub fn status_json(d: &iac::DriftStatus) -> Value {
    json!({
        "status": d.status,
        "since_ms": d.since_ms,
        "fingerprint": d.fingerprint,
        "resources": d.resources.iter().map(|c| json!({"address": c.address, "actions": c.actions})).collect::<Vec<_>>(),
        "reason": d.reason,
        "checked_at_ms": d.checked_at_ms,
        "next_at_ms": d.next_at_ms,
        "last_run": d.last_run,
    })
}

/// `12s`, `5m`, `3h`, `2d`; `-` for never.
fn age(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn print(stacks: &[iac::Stack], as_json: bool) {
    let now = crate::model::now_ms();
    if as_json {
        let v: Vec<Value> = stacks
            .iter()
            .map(|s| {
                let name = s.spec.as_ref().map(|x| x.name.clone()).unwrap_or_default();
                let d = s.drift.clone().unwrap_or_default();
                let mut v = status_json(&d);
                v["stack"] = json!(name);
                v["last_check_age_ms"] = json!(if d.checked_at_ms > 0 {
                    now - d.checked_at_ms
                } else {
                    -1
                });
                v["next_in_ms"] = json!(if d.next_at_ms > 0 {
                    (d.next_at_ms - now).max(0)
                } else {
                    -1
                });
                v
            })
            .collect();
        println!("{}", Value::Array(v));
        return;
    }
    println!(
        "{:<24} {:<9} {:<10} {:<10} {:<12} DETAIL",
        "STACK", "STATUS", "CHECKED", "NEXT", "FINGERPRINT"
    );
    for s in stacks {
        let name = s.spec.as_ref().map(|x| x.name.as_str()).unwrap_or("");
        let d = s.drift.clone().unwrap_or_default();
        let checked = if d.checked_at_ms > 0 {
            format!("{} ago", age(now - d.checked_at_ms))
        } else {
            "never".into()
        };
        let manual = s
            .spec
            .as_ref()
            .and_then(|x| x.drift.as_ref())
            .is_some_and(|x| x.schedule.trim() == crate::iac::drift::MANUAL);
        let next = if d.next_at_ms > 0 {
            format!("in {}", age((d.next_at_ms - now).max(1)))
        } else if manual {
            "manual".into()
        } else {
            "-".into()
        };
        let detail = match d.status.as_str() {
            "drifted" => d
                .resources
                .iter()
                .map(|r| format!("{} {}", r.actions.join("+"), r.address))
                .collect::<Vec<_>>()
                .join(", "),
            _ => d.reason.clone(),
        };
        println!(
            "{:<24} {:<9} {:<10} {:<10} {:<12} {}",
            name,
            d.status,
            checked,
            next,
            d.fingerprint.get(..12).unwrap_or(&d.fingerprint),
            detail
        );
    }
}
