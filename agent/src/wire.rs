//! The one place where generated protobuf types meet the agent's domain types.

use std::time::Duration;

use outpost_proto::agent::v1 as pb;

use crate::aws::Uploaded;
use crate::job::{
    AwsRole, JobSecret, JobSpec, Lease, LeaseKey, Network, Outcome, Resources, Secret, SecretBytes,
};

/// Converts a pushed lease; an error names what is wrong with it.
pub fn lease_from_pb(l: pb::Lease) -> Result<Lease, String> {
    let spec = l.spec.ok_or("lease carries no job spec")?;
    let network = match pb::NetworkMode::try_from(spec.network) {
        Ok(pb::NetworkMode::Unspecified) | Ok(pb::NetworkMode::None) => Network::None,
        Ok(pb::NetworkMode::Egress) => Network::Egress,
        Err(_) => return Err(format!("unknown network mode {}", spec.network)),
    };
    let r = spec.resources.unwrap_or_default();
    let nz = |v: u64| (v > 0).then_some(v);
    Ok(Lease {
        key: LeaseKey {
            job_id: l.job_id,
            epoch: l.epoch,
        },
        lease_id: l.lease_id,
        ttl: Duration::from_millis(l.ttl_ms),
        spec: JobSpec {
            image: spec.image,
            command: spec.command,
            env: spec.env.into_iter().collect(),
            resources: Resources {
                memory_bytes: nz(r.memory_bytes),
                nano_cpus: nz(r.nano_cpus),
                pids: nz(r.pids),
                workspace_bytes: nz(r.workspace_bytes),
            },
            timeout: nz(spec.timeout_ms).map(Duration::from_millis),
            network,
            aws: spec.aws.map(aws_role_from_pb).transpose()?,
            workspace_source: (!spec.workspace_source.is_empty()).then_some(spec.workspace_source),
            artifacts: spec.artifacts,
            secrets: spec
                .secrets
                .into_iter()
                .map(|s| JobSecret {
                    name: s.name,
                    value: SecretBytes::new(s.value),
                })
                .collect(),
        },
        log_offset: l.log_offset,
        iac: l.iac.map(iac_task_from_pb),
    })
}

fn iac_task_from_pb(t: pb::IacTask) -> crate::iac::IacTask {
    crate::iac::IacTask {
        run_id: t.run_id,
        stack: t.stack,
        phase: t.phase,
        source_digest: t.source_digest,
        tool: t.tool,
        plan_policy: t.plan_policy,
        variables: t.variables.into_iter().collect(),
        plan_digest: t.plan_digest,
        bundle_digest: t.bundle_digest,
        state_serial: t.state_serial,
        state_lineage: t.state_lineage,
        drift: t.drift,
    }
}

fn aws_role_from_pb(a: pb::AwsRole) -> Result<AwsRole, String> {
    if a.role_arn.is_empty() {
        return Err("the job's aws role names no role ARN".into());
    }
    Ok(AwsRole {
        role_arn: a.role_arn,
        session_policy: (!a.session_policy.is_empty()).then_some(a.session_policy),
        duration: (a.duration_s > 0).then(|| Duration::from_secs(a.duration_s)),
        web_identity_token: (!a.web_identity_token.is_empty())
            .then(|| Secret::new(a.web_identity_token)),
    })
}

/// The report of an artifact uploaded for a lease.
pub fn artifact_to_pb(key: &LeaseKey, a: &Uploaded) -> pb::ArtifactUploaded {
    pb::ArtifactUploaded {
        job_id: key.job_id.clone(),
        epoch: key.epoch,
        path: a.path.clone(),
        bucket: a.bucket.clone(),
        key: a.key.clone(),
        size: a.size,
        sha256: a.sha256.clone(),
        etag: a.etag.clone(),
    }
}

pub fn key_from_pb(l: &pb::LeaseRef) -> LeaseKey {
    LeaseKey {
        job_id: l.job_id.clone(),
        epoch: l.epoch,
    }
}

pub fn key_to_pb(k: &LeaseKey) -> pb::LeaseRef {
    pb::LeaseRef {
        job_id: k.job_id.clone(),
        epoch: k.epoch,
    }
}

/// The final status an outcome is reported as.
pub fn final_status(key: &LeaseKey, outcome: &Outcome, log_length: u64) -> pb::JobStatus {
    let (state, exit_code, message, oom) = match outcome {
        Outcome::Exited { code: 0, .. } => (pb::JobState::Succeeded, Some(0), String::new(), false),
        Outcome::Exited {
            code,
            oom_killed: true,
        } => (
            pb::JobState::Failed,
            Some(*code),
            "killed: out of memory (the job hit its memory limit)".to_string(),
            true,
        ),
        Outcome::Exited { code, .. } => (
            pb::JobState::Failed,
            Some(*code),
            format!("exited with code {code}"),
            false,
        ),
        Outcome::Cancelled { reason } => (pb::JobState::Cancelled, None, reason.clone(), false),
        Outcome::TimedOut => (
            pb::JobState::TimedOut,
            None,
            "stopped: the job ran past its timeout".to_string(),
            false,
        ),
        Outcome::Failed { reason } => (pb::JobState::Failed, None, reason.clone(), false),
        Outcome::Rejected { reason } => (pb::JobState::Rejected, None, reason.clone(), false),
    };
    pb::JobStatus {
        job_id: key.job_id.clone(),
        epoch: key.epoch,
        state: state as i32,
        exit_code,
        message,
        log_length,
        oom_killed: oom,
    }
}

pub fn running_status(key: &LeaseKey) -> pb::JobStatus {
    pb::JobStatus {
        job_id: key.job_id.clone(),
        epoch: key.epoch,
        state: pb::JobState::Running as i32,
        ..Default::default()
    }
}
