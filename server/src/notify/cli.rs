//! `outpost notifications`: deliveries with every attempt.

use outpost_proto::iac::v1 as iac;
use serde_json::{Value, json};

pub fn print(deliveries: &[iac::Delivery], as_json: bool) {
    if as_json {
        let v: Vec<Value> = deliveries
            .iter()
            .map(|d| {
                json!({
                    "delivery_id": d.delivery_id,
                    "stack": d.stack,
                    "run_id": d.run_id,
                    "event": d.event,
                    "url": d.url,
                    "state": d.state,
                    "attempts": d.attempts,
                    "history": d.history.iter().map(|a| json!({"at_ms": a.at_ms, "status": a.status, "error": a.error, "duration_ms": a.duration_ms})).collect::<Vec<_>>(),
                    "created_at_ms": d.created_at_ms,
                })
            })
            .collect();
        println!("{}", Value::Array(v));
        return;
    }
    println!(
        "{:<36} {:<16} {:<20} {:<10} {:<8} LAST",
        "DELIVERY", "STACK", "EVENT", "STATE", "ATTEMPTS"
    );
    for d in deliveries {
        let last = d
            .history
            .last()
            .map(|a| {
                if a.error.is_empty() {
                    format!("{} in {}ms", a.status, a.duration_ms)
                } else {
                    a.error.clone()
                }
            })
            .unwrap_or_default();
        println!(
            "{:<36} {:<16} {:<20} {:<10} {:<8} {}",
            d.delivery_id, d.stack, d.event, d.state, d.attempts, last
        );
    }
}
