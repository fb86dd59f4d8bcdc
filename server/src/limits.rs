//! Size limits on what the control plane accepts and returns, so that every
//! job it accepts can be leased to an agent and listed.
//!
//! **Invariant:** a job spec accepted at submit encodes to at most
//! [`outpost_proto::MAX_SPEC_BYTES`], so its lease (spec plus an envelope of
//! ids, epoch and a web-identity token of a few KiB) always fits in
//! [`outpost_proto::MAX_MESSAGE_BYTES`], the most an agent decodes; and a
//! list response is cut to [`LIST_BUDGET_BYTES`] with long fields
//! summarised, so it never exceeds the message limit either.

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;
use prost::Message;

/// Longest image reference.
pub const MAX_IMAGE_BYTES: usize = 1024;
/// Most command arguments, and most bytes of them in all.
pub const MAX_COMMAND_ARGS: usize = 4096;
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;
/// Most environment variables, and most bytes of names and values in all.
pub const MAX_ENV_VARS: usize = 1024;
pub const MAX_ENV_BYTES: usize = 256 * 1024;
/// Most selector labels, and longest key and value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 128;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Longest workspace URL and artifact path.
pub const MAX_URL_BYTES: usize = 2048;
pub const MAX_ARTIFACT_PATH_BYTES: usize = 1024;

/// Most bytes of jobs in one list response (half the message limit: room
/// for the framing and for fields later versions add).
pub const LIST_BUDGET_BYTES: usize = outpost_proto::MAX_MESSAGE_BYTES / 2;
/// Most bytes of a job's command in a list response (the whole command is
/// in `GetJob`).
pub const LIST_COMMAND_BYTES: usize = 1024;
/// Most bytes of a job's message kept in the store and returned.
pub const MAX_MESSAGE_TEXT_BYTES: usize = 4096;

/// Checks a submitted spec against the limits; the error names the limit.
pub fn check_spec(spec: &pb::JobSpec) -> Result<(), String> {
    if spec.image.len() > MAX_IMAGE_BYTES {
        return Err(format!(
            "the image reference is {} bytes; at most {MAX_IMAGE_BYTES}",
            spec.image.len()
        ));
    }
    let command: usize = spec.command.iter().map(String::len).sum();
    if spec.command.len() > MAX_COMMAND_ARGS || command > MAX_COMMAND_BYTES {
        return Err(format!(
            "the command has {} arguments of {command} bytes; at most {MAX_COMMAND_ARGS} arguments of {MAX_COMMAND_BYTES} bytes in all",
            spec.command.len()
        ));
    }
    let env: usize = spec.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if spec.env.len() > MAX_ENV_VARS || env > MAX_ENV_BYTES {
        return Err(format!(
            "the environment has {} variables of {env} bytes; at most {MAX_ENV_VARS} variables of {MAX_ENV_BYTES} bytes in all",
            spec.env.len()
        ));
    }
    if spec.selector.len() > MAX_LABELS {
        return Err(format!(
            "the selector has {} labels; at most {MAX_LABELS}",
            spec.selector.len()
        ));
    }
    for (k, v) in &spec.selector {
        if k.len() > MAX_LABEL_KEY_BYTES || v.len() > MAX_LABEL_VALUE_BYTES {
            return Err(format!(
                "selector label {:?} is too long: keys of at most {MAX_LABEL_KEY_BYTES} bytes, values of at most {MAX_LABEL_VALUE_BYTES}",
                truncate(k, 64)
            ));
        }
    }
    if spec.workspace_source.len() > MAX_URL_BYTES {
        return Err(format!(
            "the workspace URL is longer than {MAX_URL_BYTES} bytes"
        ));
    }
    if let Some(a) = spec
        .artifacts
        .iter()
        .find(|a| a.len() > MAX_ARTIFACT_PATH_BYTES)
    {
        return Err(format!(
            "artifact path {:?}… is longer than {MAX_ARTIFACT_PATH_BYTES} bytes",
            truncate(a, 64)
        ));
    }
    let total = spec.encoded_len();
    if total > outpost_proto::MAX_SPEC_BYTES {
        return Err(format!(
            "the job spec is {total} bytes encoded; at most {} (command, environment, secrets, labels and the rest together)",
            outpost_proto::MAX_SPEC_BYTES
        ));
    }
    Ok(())
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A job as a list shows it: its command cut to [`LIST_COMMAND_BYTES`]
/// (the last argument kept ends with `…` when cut).
pub fn summarise(mut job: admin::Job) -> admin::Job {
    let mut left = LIST_COMMAND_BYTES;
    let mut out = Vec::new();
    for arg in job.command.drain(..) {
        if arg.len() <= left {
            left -= arg.len();
            out.push(arg);
        } else {
            out.push(format!("{}…", truncate(&arg, left)));
            break;
        }
    }
    job.command = out;
    job
}

/// The longest prefix of `jobs` (summarised) whose encoding fits in
/// [`LIST_BUDGET_BYTES`]; a page ends early rather than overflow.
pub fn fit_page(jobs: impl IntoIterator<Item = admin::Job>) -> Vec<admin::Job> {
    let mut used = 0usize;
    let mut out = Vec::new();
    for j in jobs {
        let j = summarise(j);
        // Field tag and length prefix of each repeated entry: at most 6 bytes.
        let len = j.encoded_len() + 6;
        if used + len > LIST_BUDGET_BYTES {
            break;
        }
        used += len;
        out.push(j);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest spec every limit allows, one byte under each.
    fn largest() -> pb::JobSpec {
        let arg = "c".repeat(MAX_COMMAND_BYTES / MAX_COMMAND_ARGS);
        let env_value = "v".repeat(MAX_ENV_BYTES / MAX_ENV_VARS - 8);
        pb::JobSpec {
            image: "i".repeat(MAX_IMAGE_BYTES),
            command: vec![arg; MAX_COMMAND_ARGS],
            env: (0..MAX_ENV_VARS)
                .map(|i| (format!("E{i:07}"), env_value.clone()))
                .collect(),
            selector: (0..MAX_LABELS)
                .map(|i| {
                    (
                        format!("{i:0width$}", width = MAX_LABEL_KEY_BYTES),
                        "l".repeat(MAX_LABEL_VALUE_BYTES),
                    )
                })
                .collect(),
            resources: Some(pb::Resources {
                memory_bytes: u64::MAX,
                nano_cpus: u64::MAX,
                pids: u64::MAX,
                workspace_bytes: u64::MAX,
            }),
            timeout_ms: u64::MAX,
            secrets: (0..64)
                .map(|i| pb::Secret {
                    name: format!("{i:0128}"),
                    value: vec![0xff; (1 << 20) / 64],
                })
                .collect(),
            aws: Some(pb::AwsRole {
                role_arn: format!("arn:aws:iam::123456789012:role/{}", "r".repeat(64)),
                session_policy: "p".repeat(16 * 1024),
                duration_s: u64::MAX,
                web_identity_token: String::new(),
            }),
            workspace_source: "w".repeat(MAX_URL_BYTES),
            artifacts: vec!["a".repeat(MAX_ARTIFACT_PATH_BYTES); 100],
            ..Default::default()
        }
    }

    fn largest_iac_task() -> pb::IacTask {
        use crate::iac::model::{MAX_FIELD_BYTES, MAX_PLAN_POLICY_BYTES, MAX_VARIABLES_BYTES};
        pb::IacTask {
            run_id: "r".repeat(64),
            stack: "s".repeat(63),
            phase: "apply".into(),
            source_digest: "d".repeat(64),
            tool: "t".repeat(MAX_FIELD_BYTES),
            plan_policy: "p".repeat(MAX_PLAN_POLICY_BYTES),
            // Many small variables cost the most framing.
            variables: (0..MAX_VARIABLES_BYTES / 8)
                .map(|i| (format!("{i:07}"), "v".into()))
                .collect(),
            plan_digest: "p".repeat(64),
            bundle_digest: "b".repeat(64),
            state_serial: u64::MAX,
            state_lineage: "l".repeat(64),
            drift: true,
        }
    }

    #[test]
    fn the_largest_accepted_spec_leases_within_the_message_limit() {
        let mut spec = largest();
        check_spec(&spec).expect("every limit at its maximum is accepted");
        // The lease envelope at its largest: long ids, a web-identity token
        // far longer than the control plane mints.
        if let Some(aws) = spec.aws.as_mut() {
            aws.web_identity_token = "t".repeat(64 * 1024);
        }
        let id = "j".repeat(64);
        let lease = pb::ServerMessage {
            msg: Some(pb::server_message::Msg::Lease(pb::Lease {
                lease_id: format!("{id}-{}", u64::MAX),
                job_id: id,
                epoch: u64::MAX,
                ttl_ms: u64::MAX,
                spec: Some(spec),
                log_offset: u64::MAX,
                // A stack run's task at the stack limits.
                iac: Some(largest_iac_task()),
            })),
        };
        let len = lease.encoded_len();
        assert!(
            len + 5 < outpost_proto::MAX_MESSAGE_BYTES,
            "a lease of {len} bytes does not fit"
        );
    }

    #[test]
    fn each_limit_is_refused_with_its_name() {
        let ok = || pb::JobSpec {
            image: "img".into(),
            ..Default::default()
        };
        let cases: Vec<(pb::JobSpec, &str)> = vec![
            (
                pb::JobSpec {
                    command: vec!["x".repeat(MAX_COMMAND_BYTES + 1)],
                    ..ok()
                },
                "command",
            ),
            (
                pb::JobSpec {
                    command: vec![String::new(); MAX_COMMAND_ARGS + 1],
                    ..ok()
                },
                "command",
            ),
            (
                pb::JobSpec {
                    env: [("E".to_string(), "v".repeat(MAX_ENV_BYTES))].into(),
                    ..ok()
                },
                "environment",
            ),
            (
                pb::JobSpec {
                    selector: (0..=MAX_LABELS)
                        .map(|i| (i.to_string(), String::new()))
                        .collect(),
                    ..ok()
                },
                "selector",
            ),
            (
                pb::JobSpec {
                    selector: [("k".to_string(), "v".repeat(MAX_LABEL_VALUE_BYTES + 1))].into(),
                    ..ok()
                },
                "selector label",
            ),
            (
                pb::JobSpec {
                    image: "i".repeat(MAX_IMAGE_BYTES + 1),
                    ..ok()
                },
                "image",
            ),
        ];
        for (spec, what) in cases {
            let e = check_spec(&spec).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn a_list_of_the_largest_jobs_stays_under_the_message_limit() {
        let spec = largest();
        let job = admin::Job {
            job_id: "j".repeat(36),
            image: spec.image.clone(),
            command: spec.command.clone(),
            selector: spec.selector.clone(),
            message: "m".repeat(MAX_MESSAGE_TEXT_BYTES),
            ..Default::default()
        };
        let page = fit_page(std::iter::repeat_n(job, 10_000));
        assert!(!page.is_empty() && page.len() < 10_000);
        let resp = admin::ListJobsResponse {
            jobs: page,
            ..Default::default()
        };
        assert!(resp.encoded_len() <= LIST_BUDGET_BYTES);
        let cmd: usize = resp.jobs[0].command.iter().map(String::len).sum();
        assert!(cmd <= LIST_COMMAND_BYTES + "…".len(), "{cmd}");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
