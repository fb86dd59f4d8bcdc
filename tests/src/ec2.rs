//! Local stand-ins for the two EC2 services the agent's lifecycle handling
//! talks to, on loopback ports: an IMDSv2 server (session tokens required,
//! a target lifecycle state the test flips) and the Auto Scaling query API's
//! two lifecycle actions (moto does not implement them), recording every
//! call. Plus small HTTP and Prometheus helpers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub const TOKEN: &str = "imds-session-token-standin";
pub const INSTANCE_ID: &str = "i-0123456789abcdef0";
pub const ACCESS_KEY: &str = "ASIASTANDIN000000000";

/// One HTTP request as the stand-ins see it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Reads one request from a keep-alive connection (`None` at EOF).
async fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.ok()?;
    Some(Request {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn write_response(w: &mut TcpStream, status: u16, content_type: &str, body: &str) -> bool {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).await.is_ok() && w.write_all(body.as_bytes()).await.is_ok()
}

/// Serves `handler` on a loopback port, keep-alive connections included.
async fn serve<F>(handler: F) -> SocketAddr
where
    F: Fn(Request) -> (u16, String, String) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stand-in");
    let addr = listener.local_addr().expect("addr");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(stream);
                while let Some(req) = read_request(&mut r).await {
                    let close = req.headers.get("connection").map(String::as_str) == Some("close");
                    let (status, ct, body) = handler(req);
                    if !write_response(r.get_mut(), status, &ct, &body).await || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The IMDSv2 stand-in.
pub struct Imds {
    pub addr: SocketAddr,
    pub target_state: Arc<Mutex<String>>,
    /// Requests without a valid token.
    pub unauthorized: Arc<Mutex<u32>>,
}

impl Imds {
    pub async fn start() -> Imds {
        let target_state = Arc::new(Mutex::new("InService".to_string()));
        let unauthorized = Arc::new(Mutex::new(0));
        let (state, unauth) = (target_state.clone(), unauthorized.clone());
        let addr = serve(move |req| {
            let text = |s: &str| (200, "text/plain".to_string(), s.to_string());
            if req.method == "PUT" && req.path == "/latest/api/token" {
                return if req.headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
                    text(TOKEN)
                } else {
                    (400, "text/plain".into(), String::new())
                };
            }
            if req.headers.get("x-aws-ec2-metadata-token").map(String::as_str) != Some(TOKEN) {
                *unauth.lock() += 1;
                return (401, "text/plain".into(), String::new());
            }
            match req.path.as_str() {
                "/latest/meta-data/instance-id" => text(INSTANCE_ID),
                "/latest/meta-data/placement/region" => text("eu-west-1"),
                "/latest/meta-data/autoscaling/target-lifecycle-state" => text(&state.lock()),
                "/latest/meta-data/iam/security-credentials/" => text("outpost-agent-pool"),
                "/latest/meta-data/iam/security-credentials/outpost-agent-pool" => text(&format!(
                    r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"{ACCESS_KEY}","SecretAccessKey":"standin-secret","Token":"standin-session-token","Expiration":"2099-01-01T00:00:00Z"}}"#
                )),
                _ => (404, "text/plain".into(), String::new()),
            }
        })
        .await;
        Imds {
            addr,
            target_state,
            unauthorized,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_target_state(&self, s: &str) {
        *self.target_state.lock() = s.to_string();
    }
}

/// One call to the Auto Scaling stand-in.
#[derive(Debug, Clone)]
pub struct AsgCall {
    pub action: String,
    pub params: BTreeMap<String, String>,
    pub authorization: String,
    pub at: std::time::SystemTime,
    /// Whether the stand-in answered with success.
    pub ok: bool,
}

/// The Auto Scaling stand-in. The first `fail_completes` calls of
/// CompleteLifecycleAction get a server error.
pub struct AutoScaling {
    pub addr: SocketAddr,
    pub calls: Arc<Mutex<Vec<AsgCall>>>,
}

fn form(body: &str) -> BTreeMap<String, String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%2F", "/")))
        .collect()
}

impl AutoScaling {
    pub async fn start(fail_completes: u32) -> AutoScaling {
        let calls: Arc<Mutex<Vec<AsgCall>>> = Arc::default();
        let rec = calls.clone();
        let failures = Arc::new(Mutex::new(fail_completes));
        let addr = serve(move |req| {
            let params = form(&req.body);
            let action = params.get("Action").cloned().unwrap_or_default();
            let mut ok = matches!(
                action.as_str(),
                "RecordLifecycleActionHeartbeat" | "CompleteLifecycleAction"
            );
            if action == "CompleteLifecycleAction" {
                let mut f = failures.lock();
                if *f > 0 {
                    *f -= 1;
                    ok = false;
                }
            }
            rec.lock().push(AsgCall {
                action: action.clone(),
                authorization: req.headers.get("authorization").cloned().unwrap_or_default(),
                params,
                at: std::time::SystemTime::now(),
                ok,
            });
            let xml = "text/xml".to_string();
            if ok {
                (
                    200,
                    xml,
                    format!(
                        r#"<{action}Response xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><{action}Result/><ResponseMetadata><RequestId>standin</RequestId></ResponseMetadata></{action}Response>"#
                    ),
                )
            } else {
                (
                    400,
                    xml,
                    r#"<ErrorResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><Error><Type>Sender</Type><Code>ValidationError</Code><Message>stand-in refuses this call once</Message></Error><RequestId>standin</RequestId></ErrorResponse>"#.to_string(),
                )
            }
        })
        .await;
        AutoScaling { addr, calls }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls_of(&self, action: &str) -> Vec<AsgCall> {
        self.calls
            .lock()
            .iter()
            .filter(|c| c.action == action)
            .cloned()
            .collect()
    }
}

/// `GET path` on `addr` (one request, connection closed): (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_string())
}

/// Parses a Prometheus text exposition with the reference parser
/// (`prometheus_client.parser`, in the venv `scripts/setup.sh` makes).
/// Returns every sample as `name{k="v",...}` (labels sorted) → value.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo");
    let py = repo.join(".cache/validators/bin/python");
    assert!(
        py.is_file(),
        "{} missing: run scripts/setup.sh",
        py.display()
    );
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
json.dump(out, sys.stdout)
"#;
    let mut child = std::process::Command::new(py)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write exposition");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

use std::path::Path;
