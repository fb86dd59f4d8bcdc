//! The one place where generated protobuf types meet the control plane's
//! domain types.

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;

use crate::model::{AgentInfo, Job, JobSpec, JobState, Network, StatusReport};

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
    })
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
        ..Default::default()
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
    }
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
