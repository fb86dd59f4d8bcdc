//! The job container's configuration, as a pure function of the lease, the
//! job spec and the agent's [`SandboxConfig`]. Nothing here talks to Docker,
//! so every sandbox property is unit tested.
//!
//! **Invariant:** the only host paths a job container ever sees are its own:
//! its workspace directory, `work_dir/<job_id>-<epoch>`, at `/workspace`
//! (read-write), and, if it has secrets, its secrets directory,
//! `secrets_dir/<scope>/<job_id>-<epoch>` on tmpfs, at `/run/secrets`
//! (read-only), plus the agent's `outpost-init` binary (read-only, the
//! container's PID 1) and its lease directory,
//! `work_dir/.outpost/leases/<job_id>-<epoch>` (read-only). Its network is
//! `none`, or, if the agent allows egress, its own network
//! `outpost-<job_id>-<epoch>`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigCgroupnsModeEnum, HostConfigLogConfig, ImageConfig,
    Mount, MountBindOptions, MountBindOptionsPropagationEnum, MountType, RestartPolicy,
    RestartPolicyNameEnum,
};
use outpost_init::protocol::{INIT_PATH, LEASE_DIR};

use super::SandboxConfig;

/// Names and host paths of a lease.
mod paths;
/// Checking a job against the sandbox, and a container against it.
mod validate;

use crate::job::{JobSpec, LeaseKey, Network};
pub use paths::*;
pub use validate::*;

/// Label holding the job id; every container the agent creates carries it.
pub const LABEL_JOB: &str = "outpost.job";
/// Label holding the lease epoch.
pub const LABEL_EPOCH: &str = "outpost.epoch";
/// Label marking containers managed by an Outpost agent (`true`).
pub const LABEL_MANAGED: &str = "outpost.managed";
/// Label holding the creating agent's `work_dir`, so that agents sharing an
/// engine (or parallel tests) only clean up their own containers.
pub const LABEL_WORK_DIR: &str = "outpost.workdir";
/// Where the workspace is mounted in the container (also the working directory).
pub const WORKSPACE_MOUNT: &str = "/workspace";
/// Where a job's secrets are mounted (read-only), one file per secret.
pub const SECRETS_MOUNT: &str = "/run/secrets";
/// Most secrets one job may have.
pub const MAX_SECRETS: usize = 64;
/// Most bytes of secret values one job may have, all together.
pub const MAX_SECRET_BYTES: usize = 1 << 20;
/// Longest secret name (it is a file name).
const MAX_SECRET_NAME_LEN: usize = 128;
/// Container sysctls of an egress job: no IPv6 at all (the network has none,
/// and link-local IPv6 would reach the host past the IPv4 firewall).
const EGRESS_SYSCTLS: [&str; 2] = [
    "net.ipv6.conf.all.disable_ipv6",
    "net.ipv6.conf.default.disable_ipv6",
];
/// Docker's smallest accepted memory limit (6 MiB).
pub const MIN_MEMORY_BYTES: u64 = 6 << 20;
/// Docker's smallest accepted CPU limit (0.01 CPU).
pub const MIN_NANO_CPUS: u64 = 10_000_000;
/// Smallest pids limit a job may ask for: below it the container's init
/// cannot even fork the job's process, and a shell running one command
/// needs a few more (the AWS entry is one of them).
pub const MIN_PIDS: u64 = 8;
/// The agent's own directory in `work_dir` (not a workspace name).
pub const AGENT_DIR: &str = ".outpost";
const MAX_JOB_ID_LEN: usize = 128;

/// Why a job cannot run under this agent's sandbox. The messages are shown to
/// the job's owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "job id {0:?} is not usable: it must be 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit"
    )]
    InvalidJobId(String),
    #[error("the job names no image")]
    NoImage,
    #[error("image reference {0:?} is not valid")]
    InvalidImage(String),
    #[error("egress is not allowed by this agent's policy")]
    EgressNotAllowed,
    #[error("the job asks for {resource} {requested}, above this agent's limit of {limit}")]
    AboveAgentLimit {
        resource: &'static str,
        requested: u64,
        limit: u64,
    },
    #[error("the job asks for {resource} {requested}, below the minimum of {minimum}")]
    BelowMinimum {
        resource: &'static str,
        requested: u64,
        minimum: u64,
    },
    #[error(
        "environment variable name {0:?} is not allowed: it is empty or contains '=' or a NUL byte"
    )]
    InvalidEnvName(String),
    #[error("the value of environment variable {0:?} contains a NUL byte")]
    InvalidEnvValue(String),
    #[error("the command contains a NUL byte")]
    InvalidCommand,
    #[error(
        "secret name {0:?} is not allowed: it must be 1 to 128 letters, digits, '_', '.' or '-', and neither be '.' nor contain '..'"
    )]
    InvalidSecretName(String),
    #[error("secret {0:?} is given twice")]
    DuplicateSecret(String),
    #[error(
        "the job's secrets are too large: at most {MAX_SECRETS} secrets of {MAX_SECRET_BYTES} bytes in all"
    )]
    SecretsTooLarge,
    #[error("workspace path {} is not allowed: {reason}", path.display())]
    WorkspacePath { path: PathBuf, reason: &'static str },
    #[error("sandbox setting {0} is out of range")]
    OutOfRange(&'static str),
    #[error("the job has no command: neither the job nor its image gives one")]
    NoCommand,
    #[error("the container's configuration no longer holds the sandbox ({0}); refusing to run it")]
    SandboxLoosened(&'static str),
}

/// Effective limits of one job: the job's requests, never above the agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub nano_cpus: u64,
    pub pids: u64,
    pub workspace_bytes: u64,
}

/// Labels of everything the agent creates for a lease (container, network).
pub fn labels(key: &LeaseKey, cfg: &SandboxConfig) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_JOB.to_string(), key.job_id.clone()),
        (LABEL_EPOCH.to_string(), key.epoch.to_string()),
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (
            LABEL_WORK_DIR.to_string(),
            cfg.work_dir.to_string_lossy().into_owned(),
        ),
    ])
}

fn to_i64(value: u64, what: &'static str) -> Result<i64, SpecError> {
    i64::try_from(value).map_err(|_| SpecError::OutOfRange(what))
}

fn read_only_bind(source: &Path, target: &str) -> Mount {
    Mount {
        typ: Some(MountType::BIND),
        source: Some(source.to_string_lossy().into_owned()),
        target: Some(target.to_string()),
        read_only: Some(true),
        bind_options: Some(MountBindOptions {
            propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds the create-container body of a job: the whole sandbox in one place.
///
/// The container mounts `outpost-init` and the job's lease directory; the
/// job's command is put under the init by [`supervise`] once the image's own
/// entrypoint and command are known (and hooks have had their say).
pub fn container_config(
    key: &LeaseKey,
    spec: &JobSpec,
    cfg: &SandboxConfig,
    workspace_host_path: &Path,
) -> Result<ContainerCreateBody, SpecError> {
    let limits = validate(key, spec, cfg)?;
    validate::check_workspace(key, cfg, workspace_host_path)?;
    let memory = to_i64(limits.memory_bytes, "memory_bytes")?;

    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();

    let labels = labels(key, cfg);

    let mut mounts = vec![Mount {
        typ: Some(MountType::BIND),
        source: Some(workspace_host_path.to_string_lossy().into_owned()),
        target: Some(WORKSPACE_MOUNT.to_string()),
        read_only: Some(false),
        bind_options: Some(MountBindOptions {
            propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
            ..Default::default()
        }),
        ..Default::default()
    }];
    mounts.push(read_only_bind(&init_binary(cfg), INIT_PATH));
    mounts.push(read_only_bind(&lease_dir(key, cfg)?, LEASE_DIR));
    if !spec.secrets.is_empty() {
        mounts.push(read_only_bind(&secrets_dir(key, cfg)?, SECRETS_MOUNT));
    }
    let egress = spec.network == Network::Egress;
    let network_mode = if egress {
        network_name(key)?
    } else {
        "none".to_string()
    };
    let sysctls = egress.then(|| {
        EGRESS_SYSCTLS
            .iter()
            .map(|k| (k.to_string(), "1".to_string()))
            .collect::<HashMap<_, _>>()
    });

    let host_config = HostConfig {
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".to_string()]),
        cap_add: None,
        security_opt: Some(vec!["no-new-privileges:true".to_string()]),
        readonly_rootfs: Some(true),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: Some(to_i64(limits.nano_cpus, "nano_cpus")?),
        pids_limit: Some(to_i64(limits.pids, "pids")?),
        oom_kill_disable: Some(false),
        network_mode: Some(network_mode),
        sysctls,
        ipc_mode: Some("private".to_string()),
        cgroupns_mode: Some(HostConfigCgroupnsModeEnum::PRIVATE),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_string(),
            format!("rw,noexec,nosuid,nodev,size={}", cfg.tmp_size_bytes),
        )])),
        binds: None,
        mounts: Some(mounts),
        // The `local` log driver keeps the output's raw bytes (json-file
        // turns invalid UTF-8 into U+FFFD), so that a re-adopted job's log
        // replays byte for byte at the offsets already delivered.
        log_config: Some(HostConfigLogConfig {
            typ: Some("local".to_string()),
            config: None,
        }),
        runtime: cfg.runtime.clone(),
        // outpost-init is PID 1, never the engine's own init.
        init: Some(false),
        auto_remove: Some(false),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        publish_all_ports: Some(false),
        ..Default::default()
    };

    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(env),
        user: Some(cfg.user.clone()),
        working_dir: Some(WORKSPACE_MOUNT.to_string()),
        labels: Some(labels),
        network_disabled: Some(!egress),
        tty: Some(false),
        open_stdin: Some(false),
        attach_stdin: Some(false),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// Puts the container's command under `outpost-init`: the entrypoint
/// becomes the init with the lease file, `stop_grace` and the job's
/// `timeout`, followed by the command the engine would have run (the body's
/// entrypoint or else the image's, then the body's command, or the image's
/// when neither entrypoint nor command is set in the body).
pub fn supervise(
    body: &mut ContainerCreateBody,
    image: Option<&ImageConfig>,
    cfg: &SandboxConfig,
    timeout: Option<std::time::Duration>,
) -> Result<(), SpecError> {
    let mut command = match body.entrypoint.take().filter(|e| !e.is_empty()) {
        Some(entrypoint) => {
            let mut c = entrypoint;
            c.extend(body.cmd.take().unwrap_or_default());
            c
        }
        None => {
            let mut c = image.and_then(|i| i.entrypoint.clone()).unwrap_or_default();
            match body.cmd.take().filter(|c| !c.is_empty()) {
                Some(cmd) => c.extend(cmd),
                None => c.extend(image.and_then(|i| i.cmd.clone()).unwrap_or_default()),
            }
            c
        }
    };
    if command.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let mut entrypoint = outpost_init::protocol::args(timeout, cfg.stop_grace);
    entrypoint.append(&mut command);
    body.entrypoint = Some(entrypoint);
    body.cmd = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::job::Resources;

    fn key() -> LeaseKey {
        LeaseKey {
            job_id: "job-0190a1b2".to_string(),
            epoch: 3,
        }
    }

    fn cfg() -> SandboxConfig {
        SandboxConfig {
            work_dir: PathBuf::from("/var/lib/outpost-agent/work"),
            ..Default::default()
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            image: "outpost/runner:dev".to_string(),
            command: vec!["terraform".to_string(), "plan".to_string()],
            env: BTreeMap::from([("TF_LOG".to_string(), "info".to_string())]),
            resources: Resources::default(),
            timeout: Some(Duration::from_secs(60)),
            network: Network::None,
            ..Default::default()
        }
    }

    fn ws() -> PathBuf {
        PathBuf::from("/var/lib/outpost-agent/work/job-0190a1b2-3")
    }

    /// The body as the executor runs it: built, then put under the init.
    fn full(
        k: &LeaseKey,
        s: &JobSpec,
        c: &SandboxConfig,
        w: &Path,
    ) -> Result<ContainerCreateBody, SpecError> {
        let mut body = container_config(k, s, c, w)?;
        supervise(&mut body, None, c, s.timeout)?;
        Ok(body)
    }

    fn build(spec: &JobSpec) -> Result<ContainerCreateBody, SpecError> {
        full(&key(), spec, &cfg(), &ws())
    }

    fn host(body: &ContainerCreateBody) -> &HostConfig {
        body.host_config.as_ref().unwrap()
    }

    #[test]
    fn sandbox_is_locked_down() {
        let body = build(&spec()).unwrap();
        let h = host(&body);
        assert_eq!(h.privileged, Some(false));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(h.cap_add, None);
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert!(
            !h.security_opt
                .iter()
                .flatten()
                .any(|o| o.contains("seccomp") || o.contains("apparmor")),
            "the engine's default seccomp and apparmor profiles stay on"
        );
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(body.network_disabled, Some(true));
        assert_eq!(h.ipc_mode.as_deref(), Some("private"));
        assert_eq!(h.pid_mode, None, "private pid namespace (the default)");
        assert_eq!(h.userns_mode, None);
        assert_eq!(h.auto_remove, Some(false));
        assert_eq!(h.devices, None);
        assert_eq!(h.sysctls, None);
        assert_eq!(h.volumes_from, None);
        assert_eq!(h.port_bindings, None);
        assert_eq!(body.user.as_deref(), Some("1000:1000"));
        assert_eq!(body.working_dir.as_deref(), Some("/workspace"));
        assert_eq!(body.tty, Some(false));
        assert_eq!(body.open_stdin, Some(false));
        assert_eq!(
            h.log_config.as_ref().and_then(|l| l.typ.as_deref()),
            Some("local")
        );
        assert_eq!(
            h.tmpfs,
            Some(HashMap::from([(
                "/tmp".to_string(),
                "rw,noexec,nosuid,nodev,size=268435456".to_string()
            )]))
        );
    }

    #[test]
    fn the_only_host_path_is_the_jobs_workspace() {
        let body = build(&spec()).unwrap();
        let h = host(&body);
        assert_eq!(h.binds, None);
        assert_eq!(body.volumes, None);
        let mounts = h.mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 3);
        let m = &mounts[0];
        assert_eq!(m.typ, Some(MountType::BIND));
        assert_eq!(
            m.source.as_deref(),
            Some("/var/lib/outpost-agent/work/job-0190a1b2-3")
        );
        assert_eq!(m.target.as_deref(), Some("/workspace"));
        assert_eq!(m.read_only, Some(false));
        // The init binary and the lease directory, both read-only.
        let init = &mounts[1];
        assert_eq!(
            init.source.as_deref(),
            Some("/var/lib/outpost-agent/work/.outpost/outpost-init")
        );
        assert_eq!(init.target.as_deref(), Some("/run/outpost-init"));
        assert_eq!(init.read_only, Some(true));
        let lease = &mounts[2];
        assert_eq!(
            lease.source.as_deref(),
            Some("/var/lib/outpost-agent/work/.outpost/leases/job-0190a1b2-3")
        );
        assert_eq!(lease.target.as_deref(), Some("/run/outpost-lease"));
        assert_eq!(lease.read_only, Some(true));
        // tmpfs is memory, not a host path; it is the only other mount.
        assert_eq!(h.tmpfs.as_ref().map(|t| t.len()), Some(1));
    }

    #[test]
    fn check_sandbox_accepts_the_built_body_and_catches_loosening() {
        let body = build(&spec()).unwrap();
        check_sandbox(&body, &key(), &cfg(), &ws()).unwrap();

        // What a hook may do: add a tmpfs and environment.
        let mut ok = body.clone();
        ok.host_config
            .as_mut()
            .unwrap()
            .tmpfs
            .as_mut()
            .unwrap()
            .insert(
                "/run/outpost".to_string(),
                "rw,noexec,nosuid,nodev,size=65536".to_string(),
            );
        ok.env
            .as_mut()
            .unwrap()
            .push("AWS_REGION=eu-west-1".to_string());
        check_sandbox(&ok, &key(), &cfg(), &ws()).unwrap();

        type Loosen = fn(&mut ContainerCreateBody);
        let cases: &[(&str, Loosen)] = &[
            ("outpost-init as PID 1", |b| {
                b.host_config.as_mut().unwrap().init = Some(true)
            }),
            ("outpost-init as PID 1", |b| {
                b.entrypoint.as_mut().unwrap().drain(..8);
            }),
            ("host paths", |b| {
                // No lease directory: the init would have no deadline.
                b.host_config
                    .as_mut()
                    .unwrap()
                    .mounts
                    .as_mut()
                    .unwrap()
                    .remove(2);
            }),
            ("host paths", |b| {
                // A writable lease directory.
                b.host_config.as_mut().unwrap().mounts.as_mut().unwrap()[2].read_only = Some(false);
            }),
            ("privileged", |b| {
                b.host_config.as_mut().unwrap().privileged = Some(true)
            }),
            ("capabilities", |b| {
                b.host_config.as_mut().unwrap().cap_add = Some(vec!["SYS_ADMIN".into()])
            }),
            ("security options", |b| {
                b.host_config.as_mut().unwrap().security_opt = Some(vec![
                    "no-new-privileges:true".into(),
                    "seccomp=unconfined".into(),
                ])
            }),
            ("read-only root filesystem", |b| {
                b.host_config.as_mut().unwrap().readonly_rootfs = Some(false)
            }),
            ("host namespaces", |b| {
                b.host_config.as_mut().unwrap().network_mode = Some("host".into())
            }),
            ("host namespaces", |b| {
                b.host_config.as_mut().unwrap().pid_mode = Some("host".into())
            }),
            ("host namespaces", |b| {
                b.host_config.as_mut().unwrap().ipc_mode = Some("host".into())
            }),
            ("host namespaces", |b| {
                b.host_config.as_mut().unwrap().ipc_mode = Some("container:other".into())
            }),
            ("host namespaces", |b| {
                b.host_config.as_mut().unwrap().uts_mode = Some("host".into())
            }),
            ("host namespaces", |b| {
                b.host_config.as_mut().unwrap().userns_mode = Some("host".into())
            }),
            ("host namespaces", |b| {
                b.host_config.as_mut().unwrap().cgroupns_mode =
                    Some(HostConfigCgroupnsModeEnum::HOST)
            }),
            ("user", |b| b.user = Some("0".into())),
            ("user", |b| b.user = Some("0:0".into())),
            ("user", |b| b.user = Some("root".into())),
            ("user", |b| b.user = Some("root:root".into())),
            ("user", |b| b.user = Some(String::new())),
            ("user", |b| b.user = None),
            ("user", |b| b.user = Some("1001:1001".into())),
            ("host paths", |b| {
                b.host_config.as_mut().unwrap().binds =
                    Some(vec!["/var/run/docker.sock:/var/run/docker.sock".into()])
            }),
            ("host paths", |b| {
                let h = b.host_config.as_mut().unwrap();
                let mut extra = h.mounts.as_ref().unwrap()[0].clone();
                extra.source = Some("/etc".into());
                extra.target = Some("/host-etc".into());
                h.mounts.as_mut().unwrap().push(extra);
            }),
            ("host paths", |b| {
                b.host_config.as_mut().unwrap().mounts.as_mut().unwrap()[0].source =
                    Some("/var/lib/outpost-agent/work/other-1".into())
            }),
            ("host paths", |b| b.volumes = Some(vec!["/data".into()])),
            ("devices", |b| {
                b.host_config.as_mut().unwrap().devices = Some(vec![Default::default()])
            }),
            ("resource limits", |b| {
                b.host_config.as_mut().unwrap().memory_swap = Some(-1)
            }),
        ];
        for (i, (what, loosen)) in cases.iter().enumerate() {
            let mut b = body.clone();
            loosen(&mut b);
            assert_eq!(
                check_sandbox(&b, &key(), &cfg(), &ws()),
                Err(SpecError::SandboxLoosened(what)),
                "case {i}: {what}"
            );
        }
        // Root is refused even when an unvalidated configuration names it.
        let root = SandboxConfig {
            user: "0:0".into(),
            ..cfg()
        };
        let mut b = body.clone();
        b.user = Some("0:0".into());
        assert_eq!(
            check_sandbox(&b, &key(), &root, &ws()),
            Err(SpecError::SandboxLoosened("user"))
        );
    }

    #[test]
    fn refuses_the_docker_socket_and_paths_outside_work_dir() {
        let refused = |cfg: &SandboxConfig, path: &str| {
            let e = full(&key(), &spec(), cfg, Path::new(path)).unwrap_err();
            assert!(matches!(e, SpecError::WorkspacePath { .. }), "{path}: {e}");
            e.to_string()
        };
        let c = cfg();
        assert!(refused(&c, "/var/run/docker.sock").contains("docker socket"));
        assert!(refused(&c, "/run/docker.sock").contains("docker socket"));
        assert!(refused(&c, "/etc").contains("work directory"));
        assert!(refused(&c, "/").contains("work directory"));
        assert!(refused(&c, "/var/lib/outpost-agent/work").contains("work directory"));
        assert!(refused(&c, "/var/lib/outpost-agent/work/../job-0190a1b2-3").contains(".."));
        assert!(refused(&c, "/var/lib/outpost-agent/work/other-1").contains("this job"));
        assert!(refused(&c, "/var/lib/outpost-agent/work/job-0190a1b2-3/sub").contains("work"));
        assert!(refused(&c, "relative/job-0190a1b2-3").contains("absolute"));
        // Even a work_dir misconfigured to /var/run cannot expose the socket.
        let run = SandboxConfig {
            work_dir: PathBuf::from("/var/run"),
            ..cfg()
        };
        assert!(refused(&run, "/var/run/docker.sock").contains("docker socket"));
    }

    #[test]
    fn a_job_can_lower_limits_but_not_raise_them() {
        let body = build(&spec()).unwrap();
        let h = host(&body);
        assert_eq!(h.memory, Some(1 << 30));
        assert_eq!(h.memory_swap, Some(1 << 30), "no swap");
        assert_eq!(h.nano_cpus, Some(1_000_000_000));
        assert_eq!(h.pids_limit, Some(256));

        let mut lower = spec();
        lower.resources = Resources {
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(500_000_000),
            pids: Some(32),
            workspace_bytes: None,
        };
        let body = build(&lower).unwrap();
        let h = host(&body);
        assert_eq!(h.memory, Some(64 << 20));
        assert_eq!(h.memory_swap, Some(64 << 20));
        assert_eq!(h.nano_cpus, Some(500_000_000));
        assert_eq!(h.pids_limit, Some(32));

        for resources in [
            Resources {
                memory_bytes: Some(2 << 30),
                ..Default::default()
            },
            Resources {
                nano_cpus: Some(2_000_000_000),
                ..Default::default()
            },
            Resources {
                pids: Some(257),
                ..Default::default()
            },
        ] {
            let mut higher = spec();
            higher.resources = resources;
            let e = build(&higher).unwrap_err();
            assert!(matches!(e, SpecError::AboveAgentLimit { .. }), "{e}");
            assert!(e.to_string().contains("above this agent's limit"), "{e}");
        }
        // Zero means "unlimited" to Docker: never let it through.
        for resources in [
            Resources {
                memory_bytes: Some(0),
                ..Default::default()
            },
            Resources {
                nano_cpus: Some(0),
                ..Default::default()
            },
            Resources {
                pids: Some(0),
                ..Default::default()
            },
        ] {
            let mut zero = spec();
            zero.resources = resources;
            assert!(matches!(
                build(&zero).unwrap_err(),
                SpecError::BelowMinimum { .. }
            ));
        }
    }

    #[test]
    fn image_references_are_checked() {
        for good in [
            "outpost/runner:dev",
            "alpine",
            "registry.local:5000/team/tf:1.9",
            "alpine@sha256:0123abcd",
        ] {
            let mut s = spec();
            s.image = good.to_string();
            assert!(build(&s).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../containers/create",
            "a/../b",
            "a//b",
            "reg:5000//x",
            "/abs",
            "x?y=1",
            "x#y",
            "a b",
            "img\0",
            ".hidden/x",
        ] {
            let mut s = spec();
            s.image = bad.to_string();
            assert!(
                matches!(
                    build(&s).unwrap_err(),
                    SpecError::InvalidImage(_) | SpecError::NoImage
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn egress_is_refused_unless_the_agent_allows_it() {
        let mut s = spec();
        s.network = Network::Egress;
        let e = build(&s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "egress is not allowed by this agent's policy"
        );
    }

    fn egress_cfg() -> SandboxConfig {
        SandboxConfig {
            allow_egress: true,
            ..cfg()
        }
    }

    #[test]
    fn egress_gets_the_jobs_own_network_without_ipv6() {
        let mut s = spec();
        s.network = Network::Egress;
        let c = egress_cfg();
        let body = full(&key(), &s, &c, &ws()).unwrap();
        let h = host(&body);
        assert_eq!(network_name(&key()).unwrap(), "outpost-job-0190a1b2-3");
        assert_eq!(h.network_mode.as_deref(), Some("outpost-job-0190a1b2-3"));
        assert_eq!(body.network_disabled, Some(false));
        assert_eq!(
            h.sysctls,
            Some(HashMap::from([
                (
                    "net.ipv6.conf.all.disable_ipv6".to_string(),
                    "1".to_string()
                ),
                (
                    "net.ipv6.conf.default.disable_ipv6".to_string(),
                    "1".to_string()
                ),
            ]))
        );
        check_sandbox(&body, &key(), &c, &ws()).unwrap();
        // The rest of the sandbox is unchanged.
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        // Allowing egress changes nothing for a job that does not ask for it.
        let body = full(&key(), &spec(), &c, &ws()).unwrap();
        assert_eq!(host(&body).network_mode.as_deref(), Some("none"));
        assert_eq!(host(&body).sysctls, None);
        assert_eq!(body.network_disabled, Some(true));
    }

    #[test]
    fn check_sandbox_allows_only_the_jobs_own_network() {
        let mut s = spec();
        s.network = Network::Egress;
        let c = egress_cfg();
        let body = full(&key(), &s, &c, &ws()).unwrap();
        for other in ["bridge", "outpost-job-0190a1b2-4", "outpost-other-3", ""] {
            let mut b = body.clone();
            b.host_config.as_mut().unwrap().network_mode = Some(other.to_string());
            assert_eq!(
                check_sandbox(&b, &key(), &c, &ws()),
                Err(SpecError::SandboxLoosened("network")),
                "{other}"
            );
        }
        let mut b = body.clone();
        b.host_config.as_mut().unwrap().network_mode = None;
        assert_eq!(
            check_sandbox(&b, &key(), &c, &ws()),
            Err(SpecError::SandboxLoosened("network"))
        );
        // Its own network, on an agent that does not allow egress.
        assert_eq!(
            check_sandbox(&body, &key(), &cfg(), &ws()),
            Err(SpecError::SandboxLoosened("network"))
        );
    }

    fn with_secrets(names: &[&str]) -> JobSpec {
        let mut s = spec();
        s.secrets = names
            .iter()
            .map(|n| crate::job::JobSecret {
                name: n.to_string(),
                value: crate::job::SecretBytes::new(format!("value of {n}")),
            })
            .collect();
        s
    }

    #[test]
    fn secrets_are_the_jobs_own_read_only_directory() {
        let c = cfg();
        let body = build(&with_secrets(&["db_password", "tls.key"])).unwrap();
        let h = host(&body);
        let mounts = h.mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 4);
        let m = &mounts[3];
        let scope = agent_scope(Path::new("/var/lib/outpost-agent/work"));
        assert_eq!(m.typ, Some(MountType::BIND));
        assert_eq!(
            m.source.as_deref(),
            Some(format!("/run/outpost-agent/secrets/{scope}/job-0190a1b2-3").as_str())
        );
        assert_eq!(
            secrets_dir(&key(), &c).unwrap(),
            PathBuf::from(format!("/run/outpost-agent/secrets/{scope}/job-0190a1b2-3"))
        );
        assert_eq!(m.target.as_deref(), Some("/run/secrets"));
        assert_eq!(m.read_only, Some(true));
        // Values are files, never environment.
        let env = body.env.as_ref().unwrap();
        assert!(!env.iter().any(|e| e.contains("value of")), "{env:?}");
        check_sandbox(&body, &key(), &c, &ws()).unwrap();
        // No secrets: no secrets mount.
        assert_eq!(
            host(&build(&spec()).unwrap())
                .mounts
                .as_ref()
                .unwrap()
                .len(),
            3
        );

        type Loosen = fn(&mut Mount);
        let cases: [Loosen; 5] = [
            |m| m.read_only = Some(false),
            |m| m.read_only = None,
            |m| m.target = Some("/workspace/secrets".into()),
            |m| {
                m.source = Some(
                    m.source
                        .as_deref()
                        .unwrap()
                        .replace("job-0190a1b2-3", "job-0190a1b2-4"),
                )
            },
            |m| m.source = Some("/run/outpost-agent/secrets".into()),
        ];
        for loosen in cases {
            let mut b = body.clone();
            loosen(&mut b.host_config.as_mut().unwrap().mounts.as_mut().unwrap()[3]);
            assert_eq!(
                check_sandbox(&b, &key(), &c, &ws()),
                Err(SpecError::SandboxLoosened("host paths"))
            );
        }
        // The secrets mount in the workspace's place, or a third mount.
        let mut b = body.clone();
        b.host_config.as_mut().unwrap().mounts.as_mut().unwrap()[3].target =
            Some(WORKSPACE_MOUNT.to_string());
        assert_eq!(
            check_sandbox(&b, &key(), &c, &ws()),
            Err(SpecError::SandboxLoosened("host paths"))
        );
        let mut b = body.clone();
        let extra = b.host_config.as_ref().unwrap().mounts.as_ref().unwrap()[3].clone();
        b.host_config
            .as_mut()
            .unwrap()
            .mounts
            .as_mut()
            .unwrap()
            .push(extra);
        assert_eq!(
            check_sandbox(&b, &key(), &c, &ws()),
            Err(SpecError::SandboxLoosened("host paths"))
        );
    }

    #[test]
    fn secret_names_are_file_names() {
        for good in [
            "A",
            "db_password",
            "tls.key",
            "x-1",
            ".npmrc",
            &"n".repeat(128),
        ] {
            assert!(build(&with_secrets(&[good])).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            "../etc",
            "a/b",
            "/abs",
            "a b",
            "é",
            "a\0",
            "a=b",
            &"n".repeat(129),
        ] {
            assert_eq!(
                build(&with_secrets(&[bad])).unwrap_err(),
                SpecError::InvalidSecretName(bad.to_string()),
                "{bad:?}"
            );
        }
        assert_eq!(
            build(&with_secrets(&["a", "a"])).unwrap_err(),
            SpecError::DuplicateSecret("a".to_string())
        );
        let many: Vec<String> = (0..=MAX_SECRETS).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            build(&with_secrets(&many)).unwrap_err(),
            SpecError::SecretsTooLarge
        );
        let mut big = with_secrets(&["big"]);
        big.secrets[0].value = crate::job::SecretBytes::new(vec![b'x'; MAX_SECRET_BYTES + 1]);
        assert_eq!(build(&big).unwrap_err(), SpecError::SecretsTooLarge);
    }

    #[test]
    fn agent_scopes_separate_agents() {
        let a = agent_scope(Path::new("/var/lib/outpost-agent/work"));
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, agent_scope(Path::new("/var/lib/outpost-agent/work")));
        assert_ne!(a, agent_scope(Path::new("/var/lib/outpost-agent/work2")));
        let other = SandboxConfig {
            work_dir: PathBuf::from("/srv/other"),
            ..cfg()
        };
        assert_ne!(
            secrets_dir(&key(), &cfg()).unwrap(),
            secrets_dir(&key(), &other).unwrap()
        );
    }

    #[test]
    fn env_names_are_checked() {
        for bad in ["", "A=B", "NUL\0"] {
            let mut s = spec();
            s.env.insert(bad.to_string(), "x".to_string());
            assert_eq!(
                build(&s).unwrap_err(),
                SpecError::InvalidEnvName(bad.to_string())
            );
        }
        let mut s = spec();
        s.env.insert("OK".to_string(), "a=b c".to_string());
        let body = build(&s).unwrap();
        let env = body.env.unwrap();
        assert!(env.contains(&"OK=a=b c".to_string()));
        assert!(env.contains(&"TF_LOG=info".to_string()));
        assert!(!env.iter().any(|e| e.starts_with("TINI_")), "{env:?}");
    }

    #[test]
    fn labels_name_and_runtime() {
        let c = SandboxConfig {
            runtime: Some("runsc".to_string()),
            ..cfg()
        };
        let body = full(&key(), &spec(), &c, &ws()).unwrap();
        let labels = body.labels.as_ref().unwrap();
        assert_eq!(
            labels.get(LABEL_JOB).map(String::as_str),
            Some("job-0190a1b2")
        );
        assert_eq!(labels.get(LABEL_EPOCH).map(String::as_str), Some("3"));
        assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
        assert_eq!(
            labels.get(LABEL_WORK_DIR).map(String::as_str),
            Some("/var/lib/outpost-agent/work")
        );
        let h = host(&body);
        assert_eq!(h.runtime.as_deref(), Some("runsc"));
        assert_eq!(h.init, Some(false), "outpost-init, not the engine's init");
        assert_eq!(container_name(&key()).unwrap(), "outpost-job-0190a1b2-3");
        assert_eq!(body.cmd, None);
        assert_eq!(
            body.entrypoint.unwrap(),
            [
                "/run/outpost-init",
                "--lease",
                "/run/outpost-lease/lease",
                "--grace-ms",
                "10000",
                "--timeout-ms",
                "60000",
                "--",
                "terraform",
                "plan"
            ]
        );
        let mut default_cmd = spec();
        default_cmd.command.clear();
        assert_eq!(build(&default_cmd).unwrap_err(), SpecError::NoCommand);
    }

    #[test]
    fn supervise_runs_what_the_engine_would_have_run_under_the_init() {
        let c = cfg();
        let image = ImageConfig {
            entrypoint: Some(vec!["terraform".into()]),
            cmd: Some(vec!["version".into()]),
            ..Default::default()
        };
        let job = |command: Vec<String>, entrypoint: Option<Vec<String>>| {
            let mut s = spec();
            s.command = command;
            s.timeout = None;
            let mut b = container_config(&key(), &s, &c, &ws()).unwrap();
            b.entrypoint = entrypoint;
            supervise(&mut b, Some(&image), &c, None).unwrap();
            let e = b.entrypoint.unwrap();
            assert_eq!(e[..6], outpost_init::protocol::args(None, c.stop_grace)[..]);
            e[6..].to_vec()
        };
        assert_eq!(job(vec![], None), ["terraform", "version"]);
        assert_eq!(job(vec!["plan".into()], None), ["terraform", "plan"]);
        // An entrypoint in the body (a hook's) drops the image's command.
        assert_eq!(job(vec![], Some(vec!["sh".into()])), ["sh"]);
        assert_eq!(
            job(vec!["-c".into(), "x".into()], Some(vec!["sh".into()])),
            ["sh", "-c", "x"]
        );
    }

    #[test]
    fn job_ids_are_safe_names() {
        for bad in [
            "",
            "../etc",
            "a/b",
            "-x",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            let k = LeaseKey {
                job_id: bad.to_string(),
                epoch: 1,
            };
            assert!(container_name(&k).is_err(), "{bad:?}");
            assert!(workspace_dir(&k, Path::new("/w")).is_err(), "{bad:?}");
        }
        let k = LeaseKey {
            job_id: "0190a1b2-c3d4-7e5f.x_y".to_string(),
            epoch: 12,
        };
        assert_eq!(
            workspace_dir(&k, Path::new("/w")).unwrap(),
            PathBuf::from("/w/0190a1b2-c3d4-7e5f.x_y-12")
        );
        assert!(is_workspace_name("0190a1b2-c3d4-7e5f.x_y-12"));
        assert!(!is_workspace_name("lost+found"));
        assert!(!is_workspace_name("job-"));
        assert!(!is_workspace_name("job-1x"));
        assert!(!is_workspace_name("-1"));
    }
}
