//! How an AWS job's container is set up to find its credentials, and how its
//! start waits for the credentials endpoint.
//!
//! The job's network namespace exists only once its container has started,
//! and the endpoint can only be bound inside it then. So the container starts
//! with a tiny POSIX-shell entry that blocks on a FIFO in the workspace; the
//! agent binds the endpoint, then writes the job's authorization token into
//! the FIFO; the entry stores it in a private tmpfs and `exec`s the job's real
//! command (same PID, same signals). The token therefore never appears in the
//! container's configuration, environment or logs, nor on disk.
//!
//! Jobs find the endpoint through the standard variables
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, which every current AWS SDK
//! refreshes by itself. The image needs `/bin/sh` with `read`, `printf`,
//! `umask` and `exec` (any POSIX shell).

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, ImageConfig};

/// tmpfs (in the container only) that holds the authorization token.
pub const TOKEN_DIR: &str = "/run/outpost";
/// The authorization token file, mode 0600, owned by the job's user.
pub const TOKEN_FILE: &str = "/run/outpost/aws-token";
/// FIFO in the workspace through which the agent releases the job.
pub const READY_FIFO: &str = ".outpost-aws-ready";
/// Exit code of the entry when it could not receive its token.
pub const ENTRY_FAILED: i64 = 125;

/// The entry: wait for the token, store it, become the job's command.
const ENTRY_SCRIPT: &str = "IFS= read -r t < /workspace/.outpost-aws-ready || exit 125; \
umask 077; printf '%s' \"$t\" > /run/outpost/aws-token || exit 125; unset t; exec \"$@\"";

/// Variables a job may not set itself on an AWS job: they would redirect or
/// bypass its credentials.
const OWNED_VARS: &[&str] = &[
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_PROFILE",
];

/// Rewrites a job container's configuration for the credentials channel.
/// `image` is the image's own configuration (for its entrypoint and command).
pub fn configure(
    body: &mut ContainerCreateBody,
    image: Option<&ImageConfig>,
    port: u16,
    region: &str,
    uid: u32,
    gid: u32,
) {
    // The command the container would have run: the image's entrypoint (if
    // the body does not override it) followed by the body's command, or the
    // image's command when the body has none.
    let entrypoint = body
        .entrypoint
        .clone()
        .or_else(|| image.and_then(|i| i.entrypoint.clone()))
        .unwrap_or_default();
    let cmd = body
        .cmd
        .clone()
        .or_else(|| image.and_then(|i| i.cmd.clone()))
        .unwrap_or_default();
    let mut command = entrypoint;
    command.extend(cmd);

    body.entrypoint = Some(vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        ENTRY_SCRIPT.to_string(),
        "outpost-entry".to_string(),
    ]);
    body.cmd = Some(command);

    let mut env: Vec<String> = body
        .env
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|kv| {
            let name = kv.split('=').next().unwrap_or_default();
            !OWNED_VARS.contains(&name)
        })
        .collect();
    env.push(format!(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:{port}/v1/credentials"
    ));
    env.push(format!(
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={TOKEN_FILE}"
    ));
    for var in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        if !env.iter().any(|kv| kv.starts_with(&format!("{var}="))) {
            env.push(format!("{var}={region}"));
        }
    }
    body.env = Some(env);

    let host = body.host_config.get_or_insert_with(Default::default);
    host.tmpfs.get_or_insert_with(HashMap::new).insert(
        TOKEN_DIR.to_string(),
        format!("rw,noexec,nosuid,nodev,size=65536,mode=0700,uid={uid},gid={gid}"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> ContainerCreateBody {
        ContainerCreateBody {
            cmd: Some(vec!["terraform".into(), "apply".into()]),
            env: Some(vec![
                "TF_LOG=info".into(),
                "AWS_ACCESS_KEY_ID=AKIASTATIC".into(),
                "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://evil".into(),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn wraps_the_command_and_points_sdks_at_the_endpoint() {
        let mut b = body();
        configure(&mut b, None, 9911, "eu-west-1", 1000, 1000);
        let ep = b.entrypoint.clone().unwrap();
        assert_eq!(ep[0], "/bin/sh");
        assert!(ep[2].contains(READY_FIFO) && ep[2].contains(TOKEN_FILE));
        assert!(ep[2].ends_with("exec \"$@\""));
        assert_eq!(b.cmd.unwrap(), ["terraform", "apply"]);
        let env = b.env.unwrap();
        assert!(env.contains(&"TF_LOG=info".to_string()));
        assert!(env.contains(
            &"AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:9911/v1/credentials".to_string()
        ));
        assert!(env.contains(&format!(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={TOKEN_FILE}"
        )));
        assert!(env.contains(&"AWS_REGION=eu-west-1".to_string()));
        assert!(
            !env.iter()
                .any(|e| e.contains("AKIASTATIC") || e.contains("evil"))
        );
        let tmpfs = b.host_config.unwrap().tmpfs.unwrap();
        let opts = &tmpfs[TOKEN_DIR];
        assert!(opts.contains("noexec") && opts.contains("mode=0700") && opts.contains("uid=1000"));
    }

    #[test]
    fn keeps_the_images_entrypoint_and_default_command() {
        let image = ImageConfig {
            entrypoint: Some(vec!["terraform".into()]),
            cmd: Some(vec!["version".into()]),
            ..Default::default()
        };
        let mut b = ContainerCreateBody::default();
        configure(&mut b, Some(&image), 9911, "us-east-1", 1000, 1000);
        assert_eq!(b.cmd.unwrap(), ["terraform", "version"]);
        let mut b = ContainerCreateBody {
            cmd: Some(vec!["plan".into()]),
            ..Default::default()
        };
        configure(&mut b, Some(&image), 9911, "us-east-1", 1000, 1000);
        assert_eq!(b.cmd.unwrap(), ["terraform", "plan"]);
    }
}
