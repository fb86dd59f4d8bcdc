//! The operator's read-only HTTP endpoint: `GET /metrics` (Prometheus text
//! format) and `GET /healthz`. Bound only when `metrics_listen` is set.
//!
//! A deliberately small HTTP/1.1 server: one request per connection, request
//! heads up to 8 KiB, a 5 s deadline per connection, at most 32 connections
//! at once; nothing it serves is secret (no job output, no configuration).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Errors of the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("metrics_listen {addr}: cannot listen there")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// What `/healthz` answers.
#[derive(Debug, Clone)]
pub struct Health {
    /// 200 when true, 503 otherwise.
    pub ok: bool,
    /// A one-line JSON object.
    pub body: String,
}

/// Renders the two documents at request time.
pub trait Source: Send + Sync + 'static {
    fn metrics(&self) -> futures::future::BoxFuture<'static, String>;
    fn health(&self) -> Health;
}

/// Binds `addr` (a clear error if it is taken or invalid).
pub async fn bind(addr: &str) -> Result<TcpListener, HttpError> {
    let fail = |source| HttpError::Bind {
        addr: addr.to_string(),
        source,
    };
    let parsed: SocketAddr = addr.parse().map_err(|e| {
        fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an IP:port address ({e})"),
        ))
    })?;
    TcpListener::bind(parsed).await.map_err(fail)
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(32));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics endpoint: too many connections; closing one");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(5), answer(stream, source)).await
            {
                debug!(%peer, error = %e, "metrics endpoint: request timed out");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, source: Arc<dyn Source>) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() > 8192 {
            let _ = respond(&mut stream, 431, "text/plain", "request head too large\n").await;
            return;
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let _ = match (method, path) {
        ("GET", "/metrics") => {
            let body = source.metrics().await;
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        ("GET", "/healthz") => {
            let h = source.health();
            let status = if h.ok { 200 } else { 503 };
            respond(&mut stream, status, "application/json", &h.body).await
        }
        ("GET", _) => respond(&mut stream, 404, "text/plain", "not found\n").await,
        _ => respond(&mut stream, 405, "text/plain", "only GET\n").await,
    };
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Source for Fixed {
        fn metrics(&self) -> futures::future::BoxFuture<'static, String> {
            Box::pin(async { "m 1\n".to_string() })
        }
        fn health(&self) -> Health {
            Health {
                ok: false,
                body: "{\"status\":\"stalled\"}".into(),
            }
        }
    }

    async fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_refuses_the_rest() {
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(l, Arc::new(Fixed), stop.clone()));
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("version=0.0.4") && r.ends_with("\r\n\r\nm 1\n"),
            "{r}"
        );
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        let r = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
        let r = get(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr).await.unwrap_err();
        let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(msg.contains(&addr) && msg.contains("in use"), "{msg}");
        let e = bind("localhost:x").await.unwrap_err();
        assert!(
            std::error::Error::source(&e)
                .unwrap()
                .to_string()
                .contains("IP:port")
        );
    }
}
