//! The one place where generated protobuf types meet the control plane's
//! domain types.

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;

use crate::model::{
    AgentInfo, Artifact, AwsRole, Job, JobSecret, JobSpec, JobState, Network, StatusReport,
};
use crate::store::JobFilter;

pub fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Leased => pb::JobState::Leased,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::TimedOut => pb::JobState::TimedOut,
        JobState::Rejected => pb::JobState::Rejected,
        JobState::Lost => pb::JobState::Lost,
    }
}

pub fn state_from_pb(s: pb::JobState) -> Option<JobState> {
    Some(match s {
        pb::JobState::Unspecified => return None,
        pb::JobState::Queued => JobState::Queued,
        pb::JobState::Leased => JobState::Leased,
        pb::JobState::Running => JobState::Running,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
        pb::JobState::TimedOut => JobState::TimedOut,
        pb::JobState::Rejected => JobState::Rejected,
        pb::JobState::Lost => JobState::Lost,
    })
}

/// Validates and converts a submitted spec.
pub fn spec_from_pb(spec: Option<pb::JobSpec>) -> Result<JobSpec, String> {
    let spec = spec.ok_or("a job spec is required")?;
    if spec.image.trim().is_empty() {
        return Err("an image is required".into());
    }
    let network = match pb::NetworkMode::try_from(spec.network) {
        Ok(pb::NetworkMode::Unspecified) | Ok(pb::NetworkMode::None) => Network::None,
        Ok(pb::NetworkMode::Egress) => Network::Egress,
        Err(_) => return Err(format!("unknown network mode {}", spec.network)),
    };
    let r = spec.resources.unwrap_or_default();
    check_minimums(&r)?;
    let aws = spec.aws.map(aws_from_pb).transpose()?;
    check_s3_use(aws.is_some(), &spec.workspace_source, &spec.artifacts)?;
    let secrets = secrets_from_pb(spec.secrets)?;
    Ok(JobSpec {
        image: spec.image,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        selector: spec.selector.into_iter().collect(),
        memory_bytes: r.memory_bytes,
        nano_cpus: r.nano_cpus,
        pids: r.pids,
        timeout_ms: spec.timeout_ms,
        network,
        aws,
        workspace_source: spec.workspace_source,
        artifacts: spec.artifacts,
        secrets,
        queue_timeout_ms: spec.queue_timeout_ms,
    })
}

/// Refuses resources no agent can run a job with (zero: the agent's
/// default). The agent refuses the same (`REJECTED`); refusing at submit
/// tells the user at once.
fn check_minimums(r: &pb::Resources) -> Result<(), String> {
    use outpost_agent::executor::spec::{MIN_MEMORY_BYTES, MIN_NANO_CPUS, MIN_PIDS};
    if r.memory_bytes != 0 && r.memory_bytes < MIN_MEMORY_BYTES {
        return Err(format!(
            "memory {} bytes is below the minimum of {} MiB a job container needs",
            r.memory_bytes,
            MIN_MEMORY_BYTES >> 20
        ));
    }
    if r.nano_cpus != 0 && r.nano_cpus < MIN_NANO_CPUS {
        return Err(format!(
            "cpus {} is below the minimum of {} a job container needs",
            r.nano_cpus as f64 / 1e9,
            MIN_NANO_CPUS as f64 / 1e9
        ));
    }
    if r.pids != 0 && r.pids < MIN_PIDS {
        return Err(format!(
            "pids {} is below the minimum of {MIN_PIDS} a job needs to start (the container's init, a shell and the command)",
            r.pids
        ));
    }
    Ok(())
}

/// Most secrets one job may have, and most bytes of values in all (the
/// agent checks the same).
const MAX_SECRETS: usize = 64;
const MAX_SECRET_BYTES: usize = 1 << 20;

/// Submitted secrets: names are file names under `/run/secrets` (letters,
/// digits, `_`, `.`, `-`; not `.`, no `..`), each once. Error messages name
/// secrets, never show values.
fn secrets_from_pb(secrets: Vec<pb::Secret>) -> Result<Vec<JobSecret>, String> {
    let mut names = std::collections::BTreeSet::new();
    for s in &secrets {
        let n = &s.name;
        let ok = !n.is_empty()
            && n.len() <= 128
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && n != "."
            && !n.contains("..");
        if !ok {
            return Err(format!(
                "secret name {n:?} is not allowed: use 1 to 128 letters, digits, '_', '.' or '-', not '.' and no '..'"
            ));
        }
        if !names.insert(n.as_str()) {
            return Err(format!("secret {n:?} is given twice"));
        }
    }
    let total: usize = secrets.iter().map(|s| s.value.len()).sum();
    if secrets.len() > MAX_SECRETS || total > MAX_SECRET_BYTES {
        return Err(format!(
            "too many or too large secrets: at most {MAX_SECRETS} secrets of {MAX_SECRET_BYTES} bytes in all"
        ));
    }
    Ok(secrets
        .into_iter()
        .map(|s| JobSecret {
            name: s.name,
            value: s.value,
        })
        .collect())
}

/// A submitted AWS role. A web-identity token in a submission is ignored:
/// only the control plane mints them, per lease.
fn aws_from_pb(a: pb::AwsRole) -> Result<AwsRole, String> {
    let arn = a.role_arn.trim();
    if !(arn.starts_with("arn:") && arn.contains(":role/")) {
        return Err(format!("aws role {arn:?} is not an IAM role ARN"));
    }
    if !a.session_policy.is_empty() {
        if a.session_policy.len() > 16 * 1024 {
            return Err("the aws session policy is longer than 16 KiB".into());
        }
        serde_json::from_str::<serde_json::Value>(&a.session_policy)
            .map_err(|e| format!("the aws session policy is not JSON: {e}"))?;
    }
    if a.duration_s > 12 * 3600 {
        return Err(format!(
            "aws session duration {}s is above the AWS maximum of 12h",
            a.duration_s
        ));
    }
    Ok(AwsRole {
        role_arn: arn.to_string(),
        session_policy: a.session_policy,
        duration_s: a.duration_s,
    })
}

fn check_s3_use(has_role: bool, workspace: &str, artifacts: &[String]) -> Result<(), String> {
    if !workspace.is_empty() {
        let ok = workspace
            .strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(bucket, key)| !bucket.is_empty() && !key.is_empty());
        if !ok {
            return Err(format!(
                "workspace {workspace:?} must be an s3://bucket/key URL"
            ));
        }
    }
    if artifacts.len() > 100 {
        return Err("a job may name at most 100 artifacts".into());
    }
    for a in artifacts {
        let bad = a.is_empty()
            || a.starts_with('/')
            || a.contains('\0')
            || a.split('/').any(|part| part == "..");
        if bad {
            return Err(format!(
                "artifact {a:?} must be a path relative to the workspace, without '..'"
            ));
        }
    }
    if (!workspace.is_empty() || !artifacts.is_empty()) && !has_role {
        return Err(
            "--workspace and --artifact need --aws-role: S3 is accessed with the job's role".into(),
        );
    }
    Ok(())
}

pub fn spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    pb::JobSpec {
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        selector: spec.selector.clone().into_iter().collect(),
        resources: Some(pb::Resources {
            memory_bytes: spec.memory_bytes,
            nano_cpus: spec.nano_cpus,
            pids: spec.pids,
        }),
        timeout_ms: spec.timeout_ms,
        network: match spec.network {
            Network::None => pb::NetworkMode::None,
            Network::Egress => pb::NetworkMode::Egress,
        } as i32,
        aws: spec.aws.as_ref().map(|a| pb::AwsRole {
            role_arn: a.role_arn.clone(),
            session_policy: a.session_policy.clone(),
            duration_s: a.duration_s,
            web_identity_token: String::new(),
        }),
        workspace_source: spec.workspace_source.clone(),
        artifacts: spec.artifacts.clone(),
        secrets: spec
            .secrets
            .iter()
            .map(|s| pb::Secret {
                name: s.name.clone(),
                value: s.value.clone(),
            })
            .collect(),
        queue_timeout_ms: spec.queue_timeout_ms,
    }
}

/// An artifact report from an agent.
pub fn artifact_from_pb(a: &pb::ArtifactUploaded) -> Artifact {
    Artifact {
        job_id: a.job_id.clone(),
        epoch: a.epoch,
        path: a.path.clone(),
        bucket: a.bucket.clone(),
        key: a.key.clone(),
        size: a.size,
        sha256: a.sha256.clone(),
        etag: a.etag.clone(),
        uploaded_ms: 0,
    }
}

pub fn artifact_to_pb(a: &Artifact) -> admin::Artifact {
    admin::Artifact {
        job_id: a.job_id.clone(),
        epoch: a.epoch,
        path: a.path.clone(),
        bucket: a.bucket.clone(),
        key: a.key.clone(),
        size: a.size,
        sha256: a.sha256.clone(),
        etag: a.etag.clone(),
        uploaded_at_ms: a.uploaded_ms,
    }
}

pub fn job_to_pb(j: &Job) -> admin::Job {
    admin::Job {
        job_id: j.id.clone(),
        state: state_to_pb(j.state) as i32,
        epoch: j.epoch,
        agent_id: j.agent_id.clone().unwrap_or_default(),
        exit_code: j.exit_code,
        message: j.message.clone(),
        image: j.spec.image.clone(),
        command: j.spec.command.clone(),
        selector: j.spec.selector.clone().into_iter().collect(),
        created_at_ms: j.created_ms,
        started_at_ms: j.started_ms,
        finished_at_ms: j.finished_ms,
        log_length: j.log_acked,
        oom_killed: j.oom_killed,
        resources: Some(pb::Resources {
            memory_bytes: j.spec.memory_bytes,
            nano_cpus: j.spec.nano_cpus,
            pids: j.spec.pids,
        }),
        timeout_ms: j.spec.timeout_ms,
        network: match j.spec.network {
            Network::None => pb::NetworkMode::None,
            Network::Egress => pb::NetworkMode::Egress,
        } as i32,
        env_names: j.spec.env.keys().cloned().collect(),
        secret_names: j.spec.secrets.iter().map(|s| s.name.clone()).collect(),
        aws_role: j
            .spec
            .aws
            .as_ref()
            .map(|a| a.role_arn.clone())
            .unwrap_or_default(),
        cancel_requested: j.cancel_requested,
        queue_timeout_ms: j.spec.queue_timeout_ms,
        // Only the hub knows; the admin service fills it in.
        matching_agents: None,
    }
}

/// The filters of a `ListJobs` request.
pub fn job_filter_from_pb(req: &admin::ListJobsRequest) -> Result<JobFilter, String> {
    let states = req
        .states
        .iter()
        .map(|&s| {
            pb::JobState::try_from(s)
                .ok()
                .and_then(state_from_pb)
                .ok_or_else(|| format!("unknown job state {s}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let before = match req.page_token.as_str() {
        "" => None,
        t => Some(
            t.parse::<i64>()
                .map_err(|_| format!("invalid page token {t:?}"))?,
        ),
    };
    Ok(JobFilter {
        states,
        labels: req.labels.clone().into_iter().collect(),
        before,
    })
}

pub fn status_from_pb(s: &pb::JobStatus) -> Result<StatusReport, String> {
    let state = pb::JobState::try_from(s.state)
        .ok()
        .and_then(state_from_pb)
        .ok_or_else(|| format!("unknown job state {}", s.state))?;
    Ok(StatusReport {
        state,
        exit_code: s.exit_code,
        message: s.message.clone(),
        log_total: s.log_length,
        oom_killed: s.oom_killed,
    })
}

pub fn agent_to_pb(a: &AgentInfo, connected: bool, running: u32) -> admin::Agent {
    admin::Agent {
        agent_id: a.id.clone(),
        connected,
        version: a.version.clone(),
        labels: a.labels.clone().into_iter().collect(),
        capacity: a.capacity,
        running,
        draining: a.draining,
        last_seen_ms: a.last_seen_ms,
    }
}

/// A lease the control plane still honours, with the log offset it holds.
pub fn lease_resume(j: &Job, ttl_ms: u64) -> pb::LeaseResume {
    pb::LeaseResume {
        lease: Some(pb::LeaseRef {
            job_id: j.id.clone(),
            epoch: j.epoch,
        }),
        acked_offset: j.log_acked,
        ttl_ms,
    }
}

/// Leases the control plane no longer honours.
pub fn lease_refs(leases: Vec<(String, u64)>) -> Vec<pb::LeaseRef> {
    leases
        .into_iter()
        .map(|(job_id, epoch)| pb::LeaseRef { job_id, epoch })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted(secrets: Vec<(&str, &[u8])>) -> Result<JobSpec, String> {
        spec_from_pb(Some(pb::JobSpec {
            image: "img".into(),
            secrets: secrets
                .into_iter()
                .map(|(name, value)| pb::Secret {
                    name: name.into(),
                    value: value.to_vec(),
                })
                .collect(),
            ..Default::default()
        }))
    }

    #[test]
    fn secrets_are_checked_and_reach_the_lease() {
        let spec = submitted(vec![("db_password", b"hunter2"), ("tls.key", b"\x00\xff")]).unwrap();
        assert_eq!(spec.secrets.len(), 2);
        let pb = spec_to_pb(&spec);
        assert_eq!(pb.secrets[0].name, "db_password");
        assert_eq!(pb.secrets[0].value, b"hunter2");
        assert_eq!(pb.secrets[1].value, b"\x00\xff");
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x..y"] {
            let e = submitted(vec![(bad, b"v")]).unwrap_err();
            assert!(e.contains("not allowed"), "{bad:?}: {e}");
        }
        let e = submitted(vec![("a", b"secret-one"), ("a", b"secret-two")]).unwrap_err();
        assert!(e.contains("twice") && !e.contains("secret-"), "{e}");
        let big = vec![0u8; MAX_SECRET_BYTES + 1];
        assert!(submitted(vec![("big", &big)]).is_err());
    }

    fn with_resources(memory_bytes: u64, nano_cpus: u64, pids: u64) -> Result<JobSpec, String> {
        spec_from_pb(Some(pb::JobSpec {
            image: "img".into(),
            resources: Some(pb::Resources {
                memory_bytes,
                nano_cpus,
                pids,
            }),
            ..Default::default()
        }))
    }

    #[test]
    fn resources_no_container_can_start_with_are_refused_at_submit() {
        let e = with_resources(1 << 20, 0, 0).unwrap_err();
        assert!(
            e.contains("memory") && e.contains("minimum of 6 MiB"),
            "{e}"
        );
        let e = with_resources(0, 1_000_000, 0).unwrap_err();
        assert!(e.contains("cpus 0.001") && e.contains("0.01"), "{e}");
        let e = with_resources(0, 0, 1).unwrap_err();
        assert!(e.contains("pids 1") && e.contains("minimum of 8"), "{e}");
        // Zero is the agent's default; the minimums themselves are fine.
        with_resources(0, 0, 0).unwrap();
        with_resources(6 << 20, 10_000_000, 8).unwrap();
    }

    #[test]
    fn the_admin_view_of_a_job_names_env_and_secrets_never_their_values() {
        let mut spec = submitted(vec![("db_password", b"hunter2")]).unwrap();
        spec.env
            .insert("TF_VAR_token".into(), "canary-value".into());
        spec.timeout_ms = 30_000;
        spec.queue_timeout_ms = 5_000;
        let job = Job {
            id: "j".into(),
            spec,
            state: JobState::Queued,
            epoch: 0,
            agent_id: None,
            exit_code: None,
            message: String::new(),
            oom_killed: false,
            created_ms: 1,
            started_ms: 0,
            finished_ms: 0,
            lease_deadline_ms: 0,
            cancel_requested: false,
            log_acked: 0,
            log_total: None,
        };
        let pb = job_to_pb(&job);
        assert_eq!(pb.env_names, ["TF_VAR_token"]);
        assert_eq!(pb.secret_names, ["db_password"]);
        assert_eq!((pb.timeout_ms, pb.queue_timeout_ms), (30_000, 5_000));
        let text = format!("{pb:?}");
        assert!(
            !text.contains("canary-value") && !text.contains("hunter2"),
            "{text}"
        );
    }
}
