//! A minimal IMDSv2 client: a session token (`PUT /latest/api/token`), then
//! `GET`s carrying it. Plain HTTP to a link-local address, one request per
//! connection, short deadlines: the instance metadata service is on the
//! host, it answers in milliseconds or not at all.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::LifecycleError;

const TOKEN_TTL_SECS: u64 = 21600;
const MAX_RESPONSE: usize = 64 * 1024;

/// The instance metadata service at `endpoint` (`http://host[:port]`).
#[derive(Debug)]
pub struct Imds {
    authority: String,
    timeout: Duration,
    token: Mutex<Option<(String, Instant)>>,
}

impl Imds {
    pub fn new(endpoint: &str) -> Result<Imds, LifecycleError> {
        let authority = endpoint
            .strip_prefix("http://")
            .map(|r| r.trim_end_matches('/'))
            .filter(|r| !r.is_empty() && !r.contains('/'))
            .ok_or_else(|| {
                LifecycleError::Config(format!(
                    "imds_endpoint {endpoint:?} must be http://host[:port]"
                ))
            })?;
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Imds {
            authority,
            timeout: Duration::from_secs(2),
            token: Mutex::new(None),
        })
    }

    async fn request(&self, head: String) -> Result<(u16, String), LifecycleError> {
        let fail = |message: String| LifecycleError::Imds {
            endpoint: self.authority.clone(),
            message,
        };
        let exchange = async {
            let mut s = TcpStream::connect(&self.authority).await?;
            s.write_all(head.as_bytes()).await?;
            // Read until the body announced by Content-Length is complete (or
            // the peer closes): a keep-alive server need not close.
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                if out.len() > MAX_RESPONSE {
                    break;
                }
                if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if let Some(len) = len
                        && out.len() >= end + 4 + len
                    {
                        out.truncate(end + 4 + len);
                        break;
                    }
                }
            }
            Ok::<_, std::io::Error>(out)
        };
        let raw = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| fail(e.to_string()))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| fail("malformed response".into()))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| fail("malformed status line".into()))?;
        Ok((status, body.to_string()))
    }

    async fn token(&self) -> Result<String, LifecycleError> {
        if let Some((t, at)) = self.token.lock().clone()
            && at.elapsed() < Duration::from_secs(TOKEN_TTL_SECS / 2)
        {
            return Ok(t);
        }
        let (status, body) = self
            .request(format!(
                "PUT /latest/api/token HTTP/1.1\r\nHost: {}\r\nX-aws-ec2-metadata-token-ttl-seconds: {TOKEN_TTL_SECS}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.authority
            ))
            .await?;
        if status != 200 || body.trim().is_empty() {
            return Err(LifecycleError::Imds {
                endpoint: self.authority.clone(),
                message: format!("token request answered {status}"),
            });
        }
        let t = body.trim().to_string();
        *self.token.lock() = Some((t.clone(), Instant::now()));
        Ok(t)
    }

    /// `GET path`: `Some(body)` on 200, `None` on 404 (e.g. no spot notice).
    pub async fn get(&self, path: &str) -> Result<Option<String>, LifecycleError> {
        let token = self.token().await?;
        let (status, body) = self
            .request(format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nX-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n",
                self.authority
            ))
            .await?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            401 => {
                // The token expired early (instance stopped and started).
                self.token.lock().take();
                Err(LifecycleError::Imds {
                    endpoint: self.authority.clone(),
                    message: format!("{path}: token refused"),
                })
            }
            s => Err(LifecycleError::Imds {
                endpoint: self.authority.clone(),
                message: format!("{path}: answered {s}"),
            }),
        }
    }

    /// `GET path` that must exist.
    pub async fn require(&self, path: &str) -> Result<String, LifecycleError> {
        self.get(path).await?.ok_or_else(|| LifecycleError::Imds {
            endpoint: self.authority.clone(),
            message: format!("{path}: not found"),
        })
    }
}

/// The instance role's credentials from IMDS.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RoleCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    pub expiration: Option<String>,
}

impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleCredentials")
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl Imds {
    /// The credentials of the instance profile's role.
    pub async fn role_credentials(&self) -> Result<RoleCredentials, LifecycleError> {
        let base = "/latest/meta-data/iam/security-credentials/";
        let roles = self.require(base).await?;
        let role = roles
            .lines()
            .next()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| LifecycleError::Imds {
                endpoint: self.authority.clone(),
                message: "the instance has no role".into(),
            })?;
        let body = self.require(&format!("{base}{role}")).await?;
        serde_json::from_str(&body).map_err(|e| LifecycleError::Imds {
            endpoint: self.authority.clone(),
            message: format!("instance role credentials: {e}"),
        })
    }
}
