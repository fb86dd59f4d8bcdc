//! The `[aws]` table of the agent's configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::AwsError;
use super::glob;

/// AWS settings of the agent: where STS and S3 are, which roles jobs may
/// assume, how long their sessions last and when they are refreshed.
///
/// Every field is optional. Without `allowed_roles`, no job may use AWS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region of STS and S3, also given to jobs as `AWS_REGION`. Default `"us-east-1"`.
    pub region: String,
    /// STS endpoint URL (a VPC endpoint, FIPS, or a local test server).
    /// Unset: the SDK's regional endpoint.
    pub sts_endpoint: Option<String>,
    /// S3 endpoint URL for workspace downloads and artifact uploads. Unset:
    /// the SDK's regional endpoint.
    pub s3_endpoint: Option<String>,
    /// Path-style S3 addressing (`endpoint/bucket/key`), which most local S3
    /// servers need. Default `false`.
    pub s3_force_path_style: bool,
    /// Roles jobs may assume: full ARNs where `*` matches any run of
    /// characters, e.g. `"arn:aws:iam::123456789012:role/outpost-*"`. A job
    /// whose role matches none is refused before anything runs. Default: none.
    pub allowed_roles: Vec<String>,
    /// Session length when the job asks for none. Default `"1h"`.
    #[serde(with = "crate::units::serde_duration")]
    pub default_session_duration: Duration,
    /// Longest session a job may ask for. Default `"1h"`. (AWS accepts 15
    /// minutes up to the role's maximum session duration.)
    #[serde(with = "crate::units::serde_duration")]
    pub max_session_duration: Duration,
    /// Credentials are refreshed this long before they expire, and jobs are
    /// told they expire half of it early, so that their SDKs come back for
    /// fresh ones in time. Capped at half the session. Default `"15m"`.
    #[serde(with = "crate::units::serde_duration")]
    pub refresh_margin: Duration,
    /// Port of the credentials endpoint on the loopback address inside each
    /// job's own network namespace. Default `9911`.
    pub credentials_port: u16,
    /// Web-identity token file to use instead of the control plane's per-job
    /// token, e.g. the EKS IRSA token
    /// `/var/run/secrets/eks.amazonaws.com/serviceaccount/token`. Re-read at
    /// every refresh.
    pub web_identity_token_file: Option<PathBuf>,
    /// Bucket artifacts are uploaded to (with the job's role). Unset: jobs
    /// that name artifacts are refused.
    pub artifact_bucket: Option<String>,
    /// Key prefix of artifacts: `<prefix><job_id>/<epoch>/<path>`. Default `"outpost/"`.
    pub artifact_prefix: String,
    /// Most bytes a workspace archive may unpack to. Default 1 GiB.
    pub max_workspace_bytes: u64,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: "us-east-1".to_string(),
            sts_endpoint: None,
            s3_endpoint: None,
            s3_force_path_style: false,
            allowed_roles: Vec::new(),
            default_session_duration: Duration::from_secs(3600),
            max_session_duration: Duration::from_secs(3600),
            refresh_margin: Duration::from_secs(15 * 60),
            credentials_port: 9911,
            web_identity_token_file: None,
            artifact_bucket: None,
            artifact_prefix: "outpost/".to_string(),
            max_workspace_bytes: 1 << 30,
        }
    }
}

impl AwsConfig {
    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), AwsError> {
        let invalid =
            |field: &'static str, reason: String| AwsError::InvalidConfig { field, reason };
        if self.region.trim().is_empty() {
            return Err(invalid("region", "must not be empty".into()));
        }
        for (field, url) in [
            ("sts_endpoint", &self.sts_endpoint),
            ("s3_endpoint", &self.s3_endpoint),
        ] {
            if let Some(url) = url
                && !(url.starts_with("https://") || url.starts_with("http://"))
            {
                return Err(invalid(field, format!("{url:?} is not an http(s) URL")));
            }
        }
        for pattern in &self.allowed_roles {
            glob::check_pattern(pattern).map_err(|reason| invalid("allowed_roles", reason))?;
        }
        if self.default_session_duration < Duration::from_secs(1) {
            return Err(invalid(
                "default_session_duration",
                "must be at least 1s".into(),
            ));
        }
        if self.max_session_duration < self.default_session_duration {
            return Err(invalid(
                "max_session_duration",
                "must not be below default_session_duration".into(),
            ));
        }
        if self.max_session_duration > Duration::from_secs(12 * 3600) {
            return Err(invalid(
                "max_session_duration",
                "must be at most 12h (the AWS limit)".into(),
            ));
        }
        if self.refresh_margin.is_zero() {
            return Err(invalid("refresh_margin", "must be positive".into()));
        }
        if self.credentials_port == 0 {
            return Err(invalid("credentials_port", "must not be 0".into()));
        }
        if self.credentials_port == crate::netns::STATE_PORT {
            return Err(invalid(
                "credentials_port",
                format!(
                    "{} is the managed state endpoint's port",
                    crate::netns::STATE_PORT
                ),
            ));
        }
        if let Some(bucket) = &self.artifact_bucket
            && (bucket.is_empty() || bucket.contains('/'))
        {
            return Err(invalid(
                "artifact_bucket",
                format!("{bucket:?} is not a bucket name"),
            ));
        }
        if self.artifact_prefix.starts_with('/') {
            return Err(invalid("artifact_prefix", "must not start with '/'".into()));
        }
        if self.max_workspace_bytes == 0 {
            return Err(invalid("max_workspace_bytes", "must be positive".into()));
        }
        Ok(())
    }

    /// Whether the allow-list admits `role_arn`.
    pub fn role_allowed(&self, role_arn: &str) -> bool {
        self.allowed_roles
            .iter()
            .any(|pattern| glob::matches(pattern, role_arn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_fields_and_rejects_unknown_ones() {
        let c: AwsConfig = toml::from_str(
            r#"
            region = "eu-west-1"
            sts_endpoint = "http://127.0.0.1:5000"
            s3_endpoint = "http://127.0.0.1:5000"
            s3_force_path_style = true
            allowed_roles = ["arn:aws:iam::123456789012:role/outpost-*"]
            default_session_duration = "30m"
            max_session_duration = "2h"
            refresh_margin = "5m"
            credentials_port = 8100
            web_identity_token_file = "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"
            artifact_bucket = "artifacts"
            artifact_prefix = "jobs/"
            max_workspace_bytes = 1048576
            "#,
        )
        .unwrap();
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.default_session_duration, Duration::from_secs(1800));
        assert_eq!(c.refresh_margin, Duration::from_secs(300));
        assert!(c.role_allowed("arn:aws:iam::123456789012:role/outpost-tf"));
        assert!(!c.role_allowed("arn:aws:iam::123456789012:role/admin"));
        c.validate().unwrap();

        let e = toml::from_str::<AwsConfig>("allowed_role = []").unwrap_err();
        assert!(e.to_string().contains("allowed_role"), "{e}");
    }

    #[test]
    fn defaults_allow_no_role() {
        let c = AwsConfig::default();
        c.validate().unwrap();
        assert!(!c.role_allowed("arn:aws:iam::123456789012:role/anything"));
    }

    #[test]
    fn validation_names_the_field() {
        let check = |c: AwsConfig, field: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{e}");
        };
        check(
            AwsConfig {
                sts_endpoint: Some("127.0.0.1:5000".into()),
                ..Default::default()
            },
            "sts_endpoint",
        );
        check(
            AwsConfig {
                max_session_duration: Duration::from_secs(60),
                ..Default::default()
            },
            "max_session_duration",
        );
        check(
            AwsConfig {
                allowed_roles: vec![String::new()],
                ..Default::default()
            },
            "allowed_roles",
        );
        check(
            AwsConfig {
                refresh_margin: Duration::ZERO,
                ..Default::default()
            },
            "refresh_margin",
        );
    }
}
