//! One delivery attempt: the body (JSON or Slack text), its signature and
//! an HTTP/1.1 POST (hyper; https through rustls with the system's roots).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use super::store::Delivery;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Longest response body read (and thrown away).
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// What one attempt gave.
#[derive(Debug, Clone, Default)]
pub struct AttemptResult {
    /// Zero when no response came back.
    pub status: u16,
    /// Empty on success (a 2xx answer).
    pub error: String,
}

/// The webhook client: plain http and https.
pub struct Client {
    https: Option<HyperClient<Https, Full<Bytes>>>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
    /// Why https is unavailable (no system roots), if it is.
    https_error: String,
}

impl Client {
    pub fn new() -> Client {
        let http = HyperClient::builder(TokioExecutor::new()).build(HttpConnector::new());
        let (https, https_error) = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        {
            Ok(b) => (
                Some(
                    HyperClient::builder(TokioExecutor::new())
                        .build(b.https_or_http().enable_http1().build()),
                ),
                String::new(),
            ),
            Err(e) => (None, format!("https is unavailable: {e}")),
        };
        Client {
            https,
            http,
            https_error,
        }
    }

    /// POSTs the delivery's body to its target within `timeout`.
    pub async fn post(
        &self,
        d: &Delivery,
        secret: Option<&[u8]>,
        timeout: Duration,
    ) -> AttemptResult {
        let fail = |status: u16, error: String| AttemptResult { status, error };
        let now_s = crate::model::now_ms() / 1000;
        let body = body(d, now_s);
        let mut req = hyper::Request::post(d.target.url.as_str())
            .header("content-type", "application/json")
            .header("user-agent", concat!("outpost/", env!("CARGO_PKG_VERSION")))
            .header("x-outpost-event", d.event.event.as_str())
            .header("x-outpost-delivery", d.id.as_str())
            .header("x-outpost-timestamp", now_s.to_string());
        if let Some(secret) = secret {
            req = req.header("x-outpost-signature-256", signature(secret, &body));
        }
        let req = match req.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => return fail(0, format!("building the request failed: {e}")),
        };
        let send = async {
            let r = if d.target.url.starts_with("https://") {
                match &self.https {
                    Some(c) => c.request(req).await,
                    None => return Err(self.https_error.clone()),
                }
            } else {
                self.http.request(req).await
            };
            r.map_err(|e| format!("request failed: {}", chain(&e)))
        };
        let resp = match tokio::time::timeout(timeout, send).await {
            Err(_) => return fail(0, format!("no answer within {timeout:?}")),
            Ok(Err(e)) => return fail(0, e),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        // Read (a bounded part of) the answer so the connection can be reused.
        let _ = tokio::time::timeout(
            timeout,
            http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect(),
        )
        .await;
        if (200..300).contains(&status) {
            AttemptResult {
                status,
                error: String::new(),
            }
        } else {
            fail(status, format!("the receiver answered {status}"))
        }
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

/// The error and its causes (each once).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.iter().any(|o| o.contains(&t)) {
            out.push(t);
        }
        cur = c.source();
    }
    out.join(": ")
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "sha256={}",
        outpost_agent::iac::plan::hex(ring::hmac::sign(&key, body).as_ref())
    )
}

/// The body of one attempt: JSON, or Slack's `{"text": ...}`. The delivery
/// id and the timestamp are inside, so the signature binds them.
pub fn body(d: &Delivery, timestamp_s: i64) -> Vec<u8> {
    let e = &d.event;
    let v = if d.target.format == "slack" {
        json!({ "text": format!("[outpost] {}", e.summary) })
    } else {
        json!({
            "delivery": d.id,
            "timestamp": timestamp_s,
            "event": e.event,
            "stack": e.stack,
            "run": e.run,
            "states": {"from": e.from, "to": e.to},
            "counts": e.counts,
            "fingerprint": e.fingerprint,
            "resources": e.resources.iter().map(|r| json!({"address": r.address, "actions": r.actions})).collect::<Vec<_>>(),
            "summary": e.summary,
            "at_ms": e.at_ms,
        })
    };
    v.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{Event, Target};

    #[test]
    fn the_signature_is_the_hmac_of_the_body_and_slack_gets_text() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut ev = Event::new("drift.detected", "net", "run-1");
        ev.summary = "stack net: drift detected".into();
        let d = Delivery::new(
            &Target {
                url: "http://127.0.0.1:1/x".into(),
                format: "json".into(),
                ..Default::default()
            },
            &ev,
        );
        let v: serde_json::Value = serde_json::from_slice(&body(&d, 42)).unwrap();
        assert_eq!(v["event"], "drift.detected");
        assert_eq!(v["delivery"], d.id.as_str());
        assert_eq!(v["timestamp"], 42);
        let mut slack = d.clone();
        slack.target.format = "slack".into();
        let v: serde_json::Value = serde_json::from_slice(&body(&slack, 42)).unwrap();
        assert_eq!(v, json!({"text": "[outpost] stack net: drift detected"}));
    }
}
