//! The container-credentials endpoint of one job: the HTTP protocol the AWS
//! SDKs use with `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)`.
//!
//! It listens on `127.0.0.1` inside the job's own network namespace (see
//! `netns.rs`), which every SDK accepts for a plain-HTTP full URI, and which
//! nothing outside that namespace can reach. It answers only requests whose
//! `Authorization` header is the job's random token (compared in constant
//! time), and only until the job ends.
//!
//! One request per connection (`Connection: close`); the SDKs fetch
//! credentials rarely, so keep-alive buys nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::creds::CredState;
use crate::job::Secret;

/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Credentials this close to their real expiry are not handed out.
const MIN_VALIDITY: Duration = Duration::from_secs(1);

/// What the endpoint serves and to whom.
pub struct EndpointState {
    token: Secret,
    creds: watch::Receiver<CredState>,
    /// Credentials are advertised as expiring this much before they really do.
    early: Duration,
    open: AtomicBool,
}

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    fn error(status: u16, code: &str, message: &str) -> Answer {
        Answer {
            status,
            body: serde_json::json!({ "Code": code, "Message": message }).to_string(),
        }
    }
}

impl EndpointState {
    pub fn new(token: Secret, creds: watch::Receiver<CredState>, early: Duration) -> Self {
        EndpointState {
            token,
            creds,
            early,
            open: AtomicBool::new(true),
        }
    }

    /// From now on every request is refused (the job ended).
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    /// The answer to one request with this `Authorization` header at `now`.
    pub fn answer(&self, authorization: Option<&[u8]>, now: SystemTime) -> Answer {
        let authorized = authorization
            .is_some_and(|given| constant_time_eq(given, self.token.expose().as_bytes()));
        // Checked after the comparison so that timing says nothing either way.
        if !self.open.load(Ordering::SeqCst) {
            return Answer::error(403, "AccessDenied", "the job has ended");
        }
        if !authorized {
            return Answer::error(403, "AccessDenied", "invalid authorization token");
        }
        let creds = match &*self.creds.borrow() {
            CredState::Ready(c) => c.clone(),
            CredState::Pending => {
                return Answer::error(503, "CredentialsUnavailable", "credentials not ready yet");
            }
            CredState::Failed(_) => {
                return Answer::error(503, "CredentialsUnavailable", "assuming the role failed");
            }
        };
        let Some(left) = creds
            .expiration
            .duration_since(now)
            .ok()
            .filter(|left| *left > MIN_VALIDITY)
        else {
            return Answer::error(
                503,
                "CredentialsUnavailable",
                "credentials are being refreshed",
            );
        };
        // Advertise an early expiry so SDKs come back before the real one;
        // never one in the past.
        let early = self.early.min(left / 2);
        let advertised = creds.expiration - early;
        Answer {
            status: 200,
            body: serde_json::json!({
                "AccessKeyId": creds.access_key_id.expose(),
                "SecretAccessKey": creds.secret_access_key.expose(),
                "Token": creds.session_token.expose(),
                "Expiration": rfc3339(advertised),
            })
            .to_string(),
        }
    }
}

/// Byte strings equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `YYYY-MM-DDTHH:MM:SSZ`, rounded down to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), for dates after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Serves `listener` until `stop`; then closes it (and every connection).
pub async fn serve(listener: TcpListener, state: Arc<EndpointState>, stop: CancellationToken) {
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let state = state.clone();
                let stop = stop.clone();
                conns.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = handle(stream, &state) => {
                            if let Err(e) = r {
                                debug!(error = %e, "credentials endpoint connection failed");
                            }
                        }
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "credentials endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

async fn handle(mut stream: TcpStream, state: &EndpointState) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return write_answer(
                &mut stream,
                &Answer::error(400, "BadRequest", "bad request"),
            )
            .await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let answer = match parse_request(&head) {
        Some((method, authorization)) if method == b"GET" => {
            state.answer(authorization, SystemTime::now())
        }
        Some(_) => Answer::error(405, "MethodNotAllowed", "only GET is supported"),
        None => Answer::error(400, "BadRequest", "bad request"),
    };
    write_answer(&mut stream, &answer).await
}

/// Reads up to the end of the request head; `None` if it is too long or the
/// peer closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The method and the `Authorization` header value of a request head.
pub fn parse_request(head: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let mut lines = head.split(|&b| b == b'\n').map(trim_cr);
    let request_line = lines.next()?;
    let mut parts = request_line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let method = parts.next()?;
    let _target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    let mut authorization = None;
    for line in lines {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"authorization") {
            authorization = Some(trim(value));
        }
    }
    Some((method, authorization))
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

async fn write_answer(stream: &mut TcpStream, answer: &Answer) -> std::io::Result<()> {
    let reason = match answer.status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{}",
        answer.status,
        answer.body.len(),
        answer.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::creds::Credentials;

    const TOKEN: &str = "3f1c9a7e5b2d4f608a1c3e5f7092b4d6e8f0a1c3e5b7d9f1a3c5e7092b4d6e8f";

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn creds(valid_for: Duration) -> Arc<Credentials> {
        Arc::new(Credentials {
            access_key_id: Secret::new("ASIAJOBKEY"),
            secret_access_key: Secret::new("secret"),
            session_token: Secret::new("session"),
            expiration: now() + valid_for,
        })
    }

    fn state(c: CredState) -> EndpointState {
        let (_tx, rx) = watch::channel(c);
        EndpointState::new(Secret::new(TOKEN), rx, Duration::from_secs(300))
    }

    #[test]
    fn answers_only_the_jobs_token() {
        let s = state(CredState::Ready(creds(Duration::from_secs(3600))));
        let ok = s.answer(Some(TOKEN.as_bytes()), now());
        assert_eq!(ok.status, 200, "{ok:?}");
        let v: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
        assert_eq!(v["AccessKeyId"], "ASIAJOBKEY");
        assert_eq!(v["Token"], "session");
        for bad in [
            None,
            Some(&b""[..]),
            Some(&TOKEN.as_bytes()[..63]),
            Some(b"3f1c9a7e5b2d4f608a1c3e5f7092b4d6e8f0a1c3e5b7d9f1a3c5e7092b4d6e8e".as_slice()),
            Some(format!("{TOKEN}0").as_bytes()),
        ] {
            let a = s.answer(bad, now());
            assert_eq!(a.status, 403, "{bad:?}");
            assert!(!a.body.contains("ASIAJOBKEY") && !a.body.contains(TOKEN));
        }
    }

    #[test]
    fn refuses_everything_once_closed() {
        let s = state(CredState::Ready(creds(Duration::from_secs(3600))));
        s.close();
        let a = s.answer(Some(TOKEN.as_bytes()), now());
        assert_eq!(a.status, 403);
        assert!(a.body.contains("ended"));
    }

    #[test]
    fn advertises_an_early_expiration_and_never_an_expired_credential() {
        let s = state(CredState::Ready(creds(Duration::from_secs(3600))));
        let v: serde_json::Value =
            serde_json::from_str(&s.answer(Some(TOKEN.as_bytes()), now()).body).unwrap();
        assert_eq!(v["Expiration"], rfc3339(now() + Duration::from_secs(3300)));
        // Close to expiry the early margin shrinks but stays in the future.
        let s = state(CredState::Ready(creds(Duration::from_secs(10))));
        let v: serde_json::Value =
            serde_json::from_str(&s.answer(Some(TOKEN.as_bytes()), now()).body).unwrap();
        assert_eq!(v["Expiration"], rfc3339(now() + Duration::from_secs(5)));
        // Expired or about to: refused, never handed out.
        for left in [Duration::ZERO, Duration::from_millis(900)] {
            let s = state(CredState::Ready(creds(left)));
            assert_eq!(s.answer(Some(TOKEN.as_bytes()), now()).status, 503);
        }
        assert_eq!(
            state(CredState::Pending)
                .answer(Some(TOKEN.as_bytes()), now())
                .status,
            503
        );
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn formats_rfc3339_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_999)),
            "2027-01-15T08:00:00Z"
        );
    }

    #[test]
    fn parses_request_heads() {
        let head = b"GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1:9911\r\nauthorization:  tok \r\nUser-Agent: x";
        let (method, auth) = parse_request(head).unwrap();
        assert_eq!(method, b"GET");
        assert_eq!(auth, Some(&b"tok"[..]));
        assert_eq!(parse_request(b"GET / HTTP/1.1").unwrap().1, None);
        assert!(parse_request(b"garbage").is_none());
        assert!(parse_request(b"GET / HTTP/1.1\r\nno-colon-header").is_none());
    }

    #[tokio::test]
    async fn serves_over_tcp_and_stops_answering_when_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(CredState::Ready(Arc::new(Credentials {
            access_key_id: Secret::new("ASIAJOBKEY"),
            secret_access_key: Secret::new("secret"),
            session_token: Secret::new("session"),
            expiration: SystemTime::now() + Duration::from_secs(3600),
        })));
        let st = Arc::new(EndpointState::new(
            Secret::new(TOKEN),
            rx,
            Duration::from_secs(60),
        ));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, st.clone(), stop.clone()));
        let get = |auth: &'static str| async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(
                format!("GET /v1/credentials HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            std::io::Result::Ok(out)
        };
        let ok = get(TOKEN).await.unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("\"AccessKeyId\":\"ASIAJOBKEY\""), "{ok}");
        let bad = get("another-jobs-token").await.unwrap();
        assert!(bad.starts_with("HTTP/1.1 403"), "{bad}");
        st.close();
        let closed = get(TOKEN).await.unwrap();
        assert!(closed.starts_with("HTTP/1.1 403"), "{closed}");
        stop.cancel();
        server.await.unwrap();
        assert!(
            get(TOKEN).await.is_err(),
            "the listener is gone once stopped"
        );
    }
}
