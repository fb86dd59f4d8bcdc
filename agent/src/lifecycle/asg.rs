//! The two Auto Scaling calls the agent makes, signed with the instance
//! role's credentials read from IMDS: `RecordLifecycleActionHeartbeat` while
//! jobs finish, `CompleteLifecycleAction` (CONTINUE) once drained.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use aws_sdk_autoscaling::config::{BehaviorVersion, Region};
use aws_sdk_autoscaling::error::DisplayErrorContext;

use super::LifecycleError;
use super::imds::Imds;

/// Credentials of the instance profile, read from IMDS at each call.
#[derive(Debug)]
struct InstanceRole(Arc<Imds>);

impl ProvideCredentials for InstanceRole {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let c = self
                .0
                .role_credentials()
                .await
                .map_err(|e| CredentialsError::provider_error(e.to_string()))?;
            let expiry = c
                .expiration
                .as_deref()
                .and_then(|t| {
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .map(SystemTime::from);
            Ok(aws_credential_types::Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                Some(c.token),
                expiry,
                "outpost-instance-role",
            ))
        })
    }
}

/// The instance's hook in its group.
#[derive(Debug, Clone)]
pub struct Hook {
    pub group_name: String,
    pub hook_name: String,
    pub instance_id: String,
}

/// An Auto Scaling API client.
#[derive(Debug, Clone)]
pub struct AutoScaling {
    client: aws_sdk_autoscaling::Client,
}

impl AutoScaling {
    pub fn new(imds: Arc<Imds>, region: String, endpoint: Option<&str>) -> AutoScaling {
        let timeouts = aws_sdk_autoscaling::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_timeout(Duration::from_secs(20))
            .build();
        let mut conf = aws_sdk_autoscaling::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .http_client(crate::aws::http_client())
            .credentials_provider(InstanceRole(imds))
            .timeout_config(timeouts);
        if let Some(url) = endpoint {
            conf = conf.endpoint_url(url);
        }
        AutoScaling {
            client: aws_sdk_autoscaling::Client::from_conf(conf.build()),
        }
    }

    pub async fn heartbeat(&self, hook: &Hook) -> Result<(), LifecycleError> {
        self.client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&hook.group_name)
            .lifecycle_hook_name(&hook.hook_name)
            .instance_id(&hook.instance_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| LifecycleError::AutoScaling {
                call: "RecordLifecycleActionHeartbeat",
                message: DisplayErrorContext(&e).to_string(),
            })
    }

    pub async fn complete(&self, hook: &Hook) -> Result<(), LifecycleError> {
        self.client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&hook.group_name)
            .lifecycle_hook_name(&hook.hook_name)
            .instance_id(&hook.instance_id)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await
            .map(|_| ())
            .map_err(|e| LifecycleError::AutoScaling {
                call: "CompleteLifecycleAction",
                message: DisplayErrorContext(&e).to_string(),
            })
    }
}
