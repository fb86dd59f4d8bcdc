//! A job's AWS credentials: `AssumeRoleWithWebIdentity`, then a refresher
//! that renews them `margin` before they expire for as long as the job runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_sts::error::DisplayErrorContext;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::AwsError;
use crate::job::Secret;

/// One set of temporary credentials. `Debug` prints none of the values.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub session_token: Secret,
    pub expiration: SystemTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// What the refresher has for the job right now.
#[derive(Debug, Clone)]
pub enum CredState {
    /// The first `AssumeRoleWithWebIdentity` has not answered yet.
    Pending,
    /// The newest credentials (possibly being refreshed).
    Ready(Arc<Credentials>),
    /// The first attempt failed; the reason is meant for the job's owner.
    Failed(String),
}

/// Where the web-identity token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// Minted by the control plane for this job.
    Inline(Secret),
    /// A file re-read at every call (the EKS IRSA projected token).
    File(PathBuf),
}

impl TokenSource {
    async fn read(&self) -> Result<Secret, AwsError> {
        match self {
            TokenSource::Inline(token) => Ok(token.clone()),
            TokenSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| Secret::new(t.trim()))
                .map_err(|source| AwsError::ReadTokenFile {
                    path: path.clone(),
                    source,
                }),
        }
    }

    fn redact(&self, text: String) -> String {
        match self {
            TokenSource::Inline(token) => redact(text, token),
            TokenSource::File(_) => text,
        }
    }
}

/// Replaces every occurrence of `secret` in `text` (belt and braces: the SDK
/// does not echo request bodies, but no message may ever carry a token).
pub fn redact(text: String, secret: &Secret) -> String {
    if secret.expose().len() < 8 || !text.contains(secret.expose()) {
        return text;
    }
    text.replace(secret.expose(), "<redacted>")
}

/// The `AssumeRoleWithWebIdentity` request of one job.
#[derive(Debug, Clone)]
pub struct AssumeSpec {
    pub role_arn: String,
    /// `outpost-<job_id>`: visible in CloudTrail next to the SourceIdentity
    /// and session tags that the control plane's token carries.
    pub session_name: String,
    pub session_policy: Option<String>,
    pub duration: Duration,
    pub token: TokenSource,
}

/// `outpost-<job_id>`, restricted to the characters and length STS accepts.
pub fn session_name(job_id: &str) -> String {
    let mut name: String = format!("outpost-{job_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(64);
    name
}

/// Calls STS once.
pub async fn assume(sts: &aws_sdk_sts::Client, spec: &AssumeSpec) -> Result<Credentials, AwsError> {
    let token = spec.token.read().await?;
    let fail = |message: String| AwsError::AssumeRole {
        role_arn: spec.role_arn.clone(),
        message: redact(spec.token.redact(message), &token),
    };
    let duration = i32::try_from(spec.duration.as_secs()).unwrap_or(i32::MAX);
    let out = sts
        .assume_role_with_web_identity()
        .role_arn(&spec.role_arn)
        .role_session_name(&spec.session_name)
        .web_identity_token(token.expose())
        .set_policy(spec.session_policy.clone())
        .duration_seconds(duration)
        .send()
        .await
        .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
    let c = out.credentials().ok_or_else(|| AwsError::NoCredentials {
        role_arn: spec.role_arn.clone(),
    })?;
    let expiration = SystemTime::try_from(*c.expiration())
        .map_err(|_| fail("sts returned an expiration out of range".into()))?;
    Ok(Credentials {
        access_key_id: Secret::new(c.access_key_id()),
        secret_access_key: Secret::new(c.secret_access_key()),
        session_token: Secret::new(c.session_token()),
        expiration,
    })
}

/// The margin actually used for a session: at most half of it.
pub fn effective_margin(margin: Duration, session: Duration) -> Duration {
    margin.min(session / 2)
}

/// When to refresh credentials that expire at `expiration`.
fn refresh_delay(expiration: SystemTime, margin: Duration, now: SystemTime) -> Duration {
    expiration
        .checked_sub(margin)
        .and_then(|at| at.duration_since(now).ok())
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_millis(200))
}

/// Keeps `state` filled with valid credentials until `stop`: assumes the
/// role, sleeps until `margin` before expiry, assumes it again. Failures are
/// retried with backoff; until the first success they are also published as
/// [`CredState::Failed`] so the job can fail with the reason.
pub async fn refresh_loop(
    sts: aws_sdk_sts::Client,
    spec: AssumeSpec,
    margin: Duration,
    state: watch::Sender<CredState>,
    stop: CancellationToken,
    metrics: Arc<crate::observe::Metrics>,
) {
    let mut backoff = Duration::from_millis(500);
    let mut refreshes = 0u64;
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = assume(&sts, &spec) => r,
        };
        metrics.credential_refresh(attempt.is_ok());
        let delay = match attempt {
            Ok(creds) => {
                backoff = Duration::from_millis(500);
                let delay = refresh_delay(creds.expiration, margin, SystemTime::now());
                if refreshes == 0 {
                    info!(role = %spec.role_arn, refresh_in_ms = delay.as_millis() as u64, "assumed the job's aws role");
                } else {
                    debug!(role = %spec.role_arn, refreshes, refresh_in_ms = delay.as_millis() as u64, "refreshed the job's aws credentials");
                }
                refreshes += 1;
                state.send_replace(CredState::Ready(Arc::new(creds)));
                delay
            }
            Err(e) => {
                let reason = super::error_chain(&e);
                warn!(role = %spec.role_arn, error = %reason, retry_in_ms = backoff.as_millis() as u64, "assuming the job's aws role failed");
                state.send_if_modified(|s| match s {
                    CredState::Ready(_) => false,
                    _ => {
                        *s = CredState::Failed(reason.clone());
                        true
                    }
                });
                let delay = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                delay
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_carry_the_job_id_within_sts_limits() {
        assert_eq!(
            session_name("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
            "outpost-0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        );
        assert_eq!(session_name("a b/c"), "outpost-a-b-c");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn refresh_happens_margin_before_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let exp = now + Duration::from_secs(3600);
        assert_eq!(
            refresh_delay(exp, Duration::from_secs(900), now),
            Duration::from_secs(2700)
        );
        // Already inside the margin: refresh (almost) at once.
        assert_eq!(
            refresh_delay(exp, Duration::from_secs(4000), now),
            Duration::from_millis(200)
        );
        assert_eq!(
            effective_margin(Duration::from_secs(900), Duration::from_secs(6)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn debug_and_errors_never_show_secrets() {
        let c = Credentials {
            access_key_id: Secret::new("ASIAEXAMPLEKEYID1234"),
            secret_access_key: Secret::new("very-secret-key"),
            session_token: Secret::new("very-secret-session"),
            expiration: SystemTime::UNIX_EPOCH,
        };
        let text = format!("{c:?}");
        assert!(
            !text.contains("ASIAEXAMPLE") && !text.contains("very-secret"),
            "{text}"
        );
        let token = Secret::new("eyJhbGciOiJFUzI1NiJ9.payload.signature");
        assert_eq!(
            redact(format!("sts said: bad token {}", token.expose()), &token),
            "sts said: bad token <redacted>"
        );
    }

    #[tokio::test]
    async fn a_failed_assume_names_the_role_but_not_the_token() {
        // Nothing listens on port 1: the call fails fast with a dispatch error.
        let sts = aws_sdk_sts::Client::from_conf(
            aws_sdk_sts::Config::builder()
                .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
                .region(aws_sdk_sts::config::Region::new("us-east-1"))
                .endpoint_url("http://127.0.0.1:1")
                .http_client(super::super::http_client())
                .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
                .build(),
        );
        let token = Secret::new("eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl");
        let spec = AssumeSpec {
            role_arn: "arn:aws:iam::123456789012:role/outpost-test".into(),
            session_name: session_name("job-1"),
            session_policy: None,
            duration: Duration::from_secs(900),
            token: TokenSource::Inline(token.clone()),
        };
        let e = assume(&sts, &spec).await.unwrap_err();
        let text = super::super::error_chain(&e);
        assert!(
            text.contains("arn:aws:iam::123456789012:role/outpost-test"),
            "{text}"
        );
        assert!(!text.contains(token.expose()), "{text}");
        assert!(!format!("{e:?}").contains(token.expose()));
    }
}
