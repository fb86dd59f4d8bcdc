//! A real webhook receiver on loopback (hyper, HTTP/1.1) for the
//! notification tests: it records every request, answers by path (a
//! scripted list of statuses per path, then 200; `/hang` never answers).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub status: u16,
    /// When it arrived (ms since the epoch).
    pub at_ms: i64,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

#[derive(Clone, Default)]
pub struct Receiver {
    pub addr: Option<SocketAddr>,
    seen: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<BTreeMap<String, VecDeque<u16>>>>,
}

impl Receiver {
    /// Binds 127.0.0.1:0 and serves until the test ends.
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let r = Receiver {
            addr: Some(listener.local_addr().expect("receiver addr")),
            ..Default::default()
        };
        let me = r.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        r
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr.expect("started"))
    }

    /// The next answers on `path` (then 200).
    pub fn script(&self, path: &str, statuses: &[u16]) {
        self.script
            .lock()
            .insert(path.to_string(), statuses.iter().copied().collect());
    }

    pub fn seen(&self) -> Vec<Received> {
        self.seen.lock().clone()
    }

    /// Requests on `path` for `event`.
    pub fn of(&self, path: &str, event: &str) -> Vec<Received> {
        self.seen()
            .into_iter()
            .filter(|r| r.path == path && r.header("x-outpost-event") == event)
            .collect()
    }

    /// Waits (bounded) until `pred` holds on what was received.
    pub async fn wait(&self, limit: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = self.seen();
            if pred(&seen) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let events: Vec<_> = seen
                    .iter()
                    .map(|r| {
                        (
                            r.path.clone(),
                            r.header("x-outpost-event").to_string(),
                            r.status,
                        )
                    })
                    .collect();
                panic!("the receiver did not see {what} within {limit:?}; it saw {events:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        if path == "/hang" {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let status = self
            .script
            .lock()
            .get_mut(&path)
            .and_then(VecDeque::pop_front)
            .unwrap_or(200);
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.seen.lock().push(Received {
            path,
            headers,
            body,
            status,
            at_ms,
        });
        let mut resp = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
        resp
    }
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`.
pub fn verify(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).is_ok()
}
