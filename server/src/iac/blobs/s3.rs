//! Blobs as objects of an S3 bucket, `<prefix>/sha256/<digest>`, written
//! with server-side encryption (SSE-S3, AES256). An S3 PUT is atomic, so an
//! object is either whole or absent; every replica pointed at the bucket
//! reads what any of them wrote.
//!
//! Where S3 is and who the control plane is come from the standard AWS
//! environment variables ([`S3Connection::from_env`]); credentials appear in
//! no message and no log.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;

use crate::iac::IacError;

/// `s3://BUCKET/PREFIX`: where `--blob-store` puts the blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET/PREFIX` (the prefix may be empty). The bucket
    /// must be an S3 bucket name; the prefix is `/`-separated segments,
    /// none empty, `.` or `..`.
    pub fn parse(text: &str) -> Result<S3Location, String> {
        let bad = |why: &str| {
            Err(format!(
                "--blob-store must be s3://BUCKET/PREFIX: {text:?} {why}"
            ))
        };
        let Some(rest) = text.trim().strip_prefix("s3://") else {
            return bad("does not start with s3://");
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !bucket_ok {
            return bad("has no valid bucket name (3 to 63 of a-z, 0-9, '.' and '-')");
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return bad("has an empty, '.' or '..' segment in its prefix");
        }
        if prefix
            .chars()
            .any(|c| c.is_control() || c == '?' || c == '#' || c == '\\')
        {
            return bad("has a control character, '?', '#' or '\\' in its prefix");
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The object key of `digest`: `<prefix>/sha256/<digest>`.
    pub fn key(&self, digest: &str) -> String {
        if self.prefix.is_empty() {
            format!("sha256/{digest}")
        } else {
            format!("{}/sha256/{digest}", self.prefix)
        }
    }
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// How the control plane reaches S3: region, endpoint and credentials.
/// `Debug` prints no credential.
#[derive(Clone)]
pub struct S3Connection {
    pub region: String,
    /// An S3-compatible endpoint (a VPC endpoint, a local server); unset:
    /// the region's. With one set, requests are path-style
    /// (`endpoint/bucket/key`), which S3-compatible servers expect.
    pub endpoint: Option<String>,
    pub credentials: Credentials,
}

impl std::fmt::Debug for S3Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Connection")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Connection {
    /// From the standard AWS environment variables: `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`; default `us-east-1`), `AWS_ENDPOINT_URL_S3` (or
    /// `AWS_ENDPOINT_URL`), and `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
    /// and `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Result<S3Connection, String> {
        S3Connection::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`S3Connection::from_env`], with the variables from `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<S3Connection, String> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        let endpoint = var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL"));
        if let Some(url) = &endpoint
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(format!(
                "the S3 endpoint {url:?} (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) is not an http(s) URL"
            ));
        }
        let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(
                "--blob-store s3:// needs AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)"
                    .to_string(),
            );
        };
        Ok(S3Connection {
            region,
            endpoint,
            credentials: Credentials::new(
                id,
                secret,
                var("AWS_SESSION_TOKEN"),
                None,
                "environment",
            ),
        })
    }
}

/// The bucket's handle; cheap to clone.
#[derive(Clone)]
pub(super) struct S3Blobs {
    client: aws_sdk_s3::Client,
    location: S3Location,
}

impl S3Blobs {
    pub(super) fn new(location: S3Location, conn: S3Connection) -> S3Blobs {
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .operation_timeout(std::time::Duration::from_secs(300))
            .build();
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(conn.region))
            .http_client(outpost_agent::aws::http_client())
            .credentials_provider(conn.credentials)
            .timeout_config(timeouts);
        if let Some(url) = conn.endpoint {
            b = b.endpoint_url(url).force_path_style(true);
        }
        S3Blobs {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            location,
        }
    }

    pub(super) fn location(&self) -> &S3Location {
        &self.location
    }

    /// Writes `data` as `digest` (a checked digest) unless an object of
    /// that size is there. The key names the bytes, so an object of the
    /// right size is the blob (reads verify it anyway): the check spares
    /// re-uploading a large source or state on every put, and a damaged
    /// object of another size is replaced. Concurrent puts write the same
    /// bytes; whichever lands last, the object is the blob.
    pub(super) async fn put(&self, digest: &str, data: Vec<u8>) -> Result<(), IacError> {
        let key = self.location.key(digest);
        let head = self
            .client
            .head_object()
            .bucket(&self.location.bucket)
            .key(&key)
            .send()
            .await;
        match head {
            Ok(h) if h.content_length() == i64::try_from(data.len()).ok() => return Ok(()),
            Ok(_) => {}
            Err(e) if head_found_nothing(&e) => {}
            Err(e) => return Err(self.fail("check", &key, &e)),
        }
        self.client
            .put_object()
            .bucket(&self.location.bucket)
            .key(&key)
            .server_side_encryption(ServerSideEncryption::Aes256)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.fail("write", &key, &e))?;
        Ok(())
    }

    /// The stored bytes of `digest` (a checked digest), unverified, or
    /// `None`.
    pub(super) async fn get(&self, digest: &str) -> Result<Option<Vec<u8>>, IacError> {
        let key = self.location.key(digest);
        let out = match self
            .client
            .get_object()
            .bucket(&self.location.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
            Err(e) => return Err(self.fail("read", &key, &e)),
        };
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| self.fail("read", &key, &e))?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// `op` of `key` failed: names the object and the cause, which never
    /// holds a credential (requests are signed, not echoed).
    fn fail(&self, op: &'static str, key: &str, e: &dyn std::error::Error) -> IacError {
        IacError::Blob {
            op,
            source: std::io::Error::other(format!(
                "s3://{}/{key}: {}",
                self.location.bucket,
                DisplayErrorContext(e)
            )),
        }
    }
}

/// Whether a HEAD found no object: a 404, which has no body to say more
/// (a missing bucket then fails the PUT that follows, with its name).
fn head_found_nothing(e: &SdkError<HeadObjectError, HttpResponse>) -> bool {
    match e {
        SdkError::ServiceError(s) => s.err().is_not_found() || s.raw().status().as_u16() == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_store_parses_bucket_and_prefix() {
        let l = S3Location::parse("s3://outpost-blobs/prod/eu").unwrap();
        assert_eq!(l.bucket, "outpost-blobs");
        assert_eq!(l.prefix, "prod/eu");
        assert_eq!(l.key("ab"), "prod/eu/sha256/ab");
        assert_eq!(l.to_string(), "s3://outpost-blobs/prod/eu");
        for bare in [
            "s3://outpost-blobs",
            "s3://outpost-blobs/",
            " s3://outpost-blobs// ",
        ] {
            let l = S3Location::parse(bare).unwrap();
            assert_eq!(
                (l.bucket.as_str(), l.prefix.as_str()),
                ("outpost-blobs", "")
            );
            assert_eq!(l.key("ab"), "sha256/ab");
        }
        assert_eq!(
            S3Location::parse("s3://b.example-1/a/").unwrap().prefix,
            "a"
        );
    }

    #[test]
    fn blob_store_refuses_what_is_not_an_s3_location() {
        for bad in [
            "",
            "bucket/prefix",
            "https://bucket/prefix",
            "s3:/bucket",
            "s3://",
            "s3:///prefix",
            "s3://ab/prefix",
            "s3://Bucket/prefix",
            "s3://bucket_x/prefix",
            "s3://-bucket/prefix",
            "s3://bucket/a//b",
            "s3://bucket/../b",
            "s3://bucket/a/./b",
            "s3://bucket/a?b",
        ] {
            let e = S3Location::parse(bad).unwrap_err();
            assert!(
                e.starts_with("--blob-store must be s3://BUCKET/PREFIX"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn blob_store_connection_reads_the_aws_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = S3Connection::from_vars(env(&[
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret-key"),
        ]))
        .unwrap();
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.credentials.access_key_id(), "AKIDEXAMPLE");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("AKIDEXAMPLE") && !shown.contains("very-secret-key"),
            "{shown}"
        );
        // The S3-specific variables win; the region defaults.
        let c = S3Connection::from_vars(env(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ENDPOINT_URL_S3", "https://s3.example"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "b"),
            ("AWS_SESSION_TOKEN", "t"),
        ]))
        .unwrap();
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.endpoint.as_deref(), Some("https://s3.example"));
        assert_eq!(c.credentials.session_token(), Some("t"));
        let e = S3Connection::from_vars(env(&[("AWS_ACCESS_KEY_ID", "a")])).unwrap_err();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
        let e = S3Connection::from_vars(env(&[
            ("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "b"),
        ]))
        .unwrap_err();
        assert!(e.contains("not an http(s) URL"), "{e}");
    }
}
