//! Terraform's `http` backend protocol, served on the job's loopback:
//! `GET` the state (`204` when there is none), `POST` a new one (with
//! `?ID=` the lock it holds), `LOCK`/`UNLOCK` with a `LockInfo` body
//! (`423` and the holder's `LockInfo` when it is taken). Anything else is
//! refused. One connection at a time is enough for Terraform; a few are
//! allowed, bodies are bounded, and nothing a job sends is logged.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{MAX_STATE_BYTES, Managed};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;

/// Serves `listener` until `stop`.
pub async fn serve(listener: TcpListener, state: Arc<Managed>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "state endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("state endpoint: too many connections");
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = conn => if let Err(e) = r { debug!(error = %e, "state endpoint: connection ended"); }
            }
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn body(req: Request<Incoming>) -> Result<Vec<u8>, Response<Full<Bytes>>> {
    match Limited::new(req.into_body(), MAX_STATE_BYTES)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes().to_vec()),
        Err(_) => Err(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a state is at most {MAX_STATE_BYTES} bytes\n"),
        )),
    }
}

/// The `ID` query parameter of a `POST`.
fn query_id(req: &Request<Incoming>) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "ID").then(|| percent_decode(v))
    })
}

fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(h) = v.get(i + 1..i + 3)
            && let Ok(n) = u8::from_str_radix(h, 16)
        {
            out.push(n);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn answer(state: &Managed, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/state" {
        return reply(StatusCode::NOT_FOUND, "only /state is served\n");
    }
    let method = req.method().clone();
    match method.as_str() {
        "GET" => match state.get().await {
            Some(plain) => reply(StatusCode::OK, plain),
            None => reply(StatusCode::NO_CONTENT, Bytes::new()),
        },
        "POST" => {
            let id = query_id(&req);
            let plain = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match state.store(id.as_deref(), plain).await {
                Ok(_) => reply(StatusCode::OK, Bytes::new()),
                Err(refused) => {
                    warn!(status = refused.status, reason = %refused.message, "state write refused");
                    reply(
                        StatusCode::from_u16(refused.status)
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        format!("{}\n", refused.message),
                    )
                }
            }
        }
        "LOCK" | "UNLOCK" => {
            let info = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let result = if method.as_str() == "LOCK" {
                state.lock(info).await
            } else {
                state.unlock(&info).await
            };
            match result {
                Ok(()) => reply(StatusCode::OK, Bytes::new()),
                Err(holder) if method.as_str() == "LOCK" => reply(StatusCode::LOCKED, holder),
                Err(holder) => reply(StatusCode::CONFLICT, holder),
            }
        }
        _ if method == Method::DELETE => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "a managed state is never deleted by a job\n",
        ),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET, POST, LOCK or UNLOCK\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iac::plan::StateRef;
    use crate::iac::{IacAgent, IacConfig, seal};
    use crate::job::LeaseKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn decodes_lock_ids() {
        assert_eq!(percent_decode("a%2Db+c"), "a-b c");
        assert_eq!(percent_decode("abc%"), "abc%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    /// An endpoint on loopback whose control plane is unreachable (a
    /// discard port nobody listens on), with a pool key.
    async fn endpoint(
        current: StateRef,
        plain: Option<Vec<u8>>,
    ) -> (std::net::SocketAddr, CancellationToken) {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = (dir.path().join("pool.key"), dir.path().join("pool.pub"));
        seal::PoolKey::generate().write(&key, &public).unwrap();
        let cfg = IacConfig {
            pool_key_file: Some(key),
            ..Default::default()
        };
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let agent = Arc::new(IacAgent::new(&cfg, channel).unwrap());
        let key = LeaseKey {
            job_id: "j".into(),
            epoch: 1,
        };
        let managed = Arc::new(Managed::new(agent, key, current, plain));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, managed, stop.clone()));
        (addr, stop)
    }

    async fn call(
        addr: std::net::SocketAddr,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    fn state(serial: u64, lineage: &str) -> Vec<u8> {
        format!(r#"{{"version":4,"serial":{serial},"lineage":"{lineage}","resources":[]}}"#)
            .into_bytes()
    }

    #[tokio::test]
    async fn an_empty_state_is_no_content() {
        let (addr, stop) = endpoint(StateRef::default(), None).await;
        assert_eq!(call(addr, "GET", "/state", b"").await.0, 204);
        stop.cancel();
    }

    #[tokio::test]
    async fn serves_locks_and_refuses_writes_that_do_not_follow() {
        let current = state(3, "L");
        let cur = StateRef::of(&current).unwrap();
        let (addr, stop) = endpoint(cur, Some(current.clone())).await;
        let (code, body) = call(addr, "GET", "/state", b"").await;
        assert_eq!((code, body.as_bytes()), (200, current.as_slice()));
        assert_eq!(call(addr, "GET", "/other", b"").await.0, 404);
        assert_eq!(call(addr, "DELETE", "/state", b"").await.0, 405);

        assert_eq!(
            call(addr, "LOCK", "/state", br#"{"ID":"a","Who":"first"}"#)
                .await
                .0,
            200
        );
        let (code, holder) = call(addr, "LOCK", "/state", br#"{"ID":"b"}"#).await;
        assert_eq!(code, 423);
        assert!(holder.contains("first"), "{holder}");
        // Writes must carry the lock's ID.
        assert_eq!(
            call(addr, "POST", "/state?ID=b", &state(4, "L")).await.0,
            409
        );
        assert_eq!(call(addr, "POST", "/state", &state(4, "L")).await.0, 409);
        // Another lineage, a serial going back, the same serial with other
        // content, not a state: refused before anything is sent.
        assert_eq!(
            call(addr, "POST", "/state?ID=a", &state(4, "M")).await.0,
            409
        );
        assert_eq!(
            call(addr, "POST", "/state?ID=a", &state(2, "L")).await.0,
            409
        );
        let mut same_serial = state(3, "L");
        same_serial.push(b' ');
        assert_eq!(call(addr, "POST", "/state?ID=a", &same_serial).await.0, 409);
        assert_eq!(call(addr, "POST", "/state?ID=a", b"nope").await.0, 400);
        // The same state again is accepted without a new version.
        assert_eq!(call(addr, "POST", "/state?ID=a", &current).await.0, 200);
        // A following version the control plane does not take (it is
        // unreachable here) is refused, and the state does not move.
        let (code, msg) = call(addr, "POST", "/state?ID=a", &state(4, "L")).await;
        assert_eq!(code, 403, "{msg}");
        assert!(msg.contains("control plane"), "{msg}");
        let (_, body) = call(addr, "GET", "/state", b"").await;
        assert_eq!(body.as_bytes(), current.as_slice());

        assert_eq!(
            call(addr, "UNLOCK", "/state", br#"{"ID":"b"}"#).await.0,
            409
        );
        assert_eq!(
            call(addr, "UNLOCK", "/state", br#"{"ID":"a"}"#).await.0,
            200
        );
        assert_eq!(call(addr, "LOCK", "/state", br#"{"ID":"b"}"#).await.0, 200);
        stop.cancel();
    }
}
