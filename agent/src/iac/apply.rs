//! The apply phase on the agent. Before the container starts:
//!
//! 1. the sealed plan bundle named by the lease is fetched (served only for
//!    the current lease), opened with the pool key (a changed byte fails
//!    the authenticated decryption) and its plan digest recomputed from
//!    the bundle, the source digest, the image's content ID, the variables and the state
//!    the plan was made against: anything but the approved digest is
//!    refused;
//! 2. the stack's current state is fetched and compared with the state the
//!    plan was made against (serial and lineage, and "no state" as its own
//!    value, which Terraform's own check misses): if it moved, the run is
//!    reported stale and nothing runs;
//! 3. only then is the bundle unpacked and the container runs `init` and
//!    `apply` of the saved plan, then `output -json`. A managed state (the
//!    bundle holds the agent's backend file) is served by the state
//!    endpoint ([`super::backend`]), which stores each state Terraform
//!    writes as a new version while the lease is current.
//!
//! If Terraform could not store its final state (it then leaves it in
//! `errored.tfstate`), the agent stores that file once the process has
//! ended, under the same checks and fence. On success the outputs are
//! reported, the values of sensitive ones replaced by `(sensitive)`.

use outpost_proto::iac::v1 as iacpb;
use tracing::{info, warn};

use super::backend::{self, Managed};
use super::job::JobIac;
use super::plan::{self, DigestInput, StateRef};
use super::{IacError, bundle, read_nofollow, state};
use crate::executor::hooks::HookContext;
use crate::job::Outcome;

/// The apply phase's script; the outputs go to a file, never to the log.
pub const APPLY_SCRIPT: &str = r#"set -u
cd /workspace/src
tf="$OUTPOST_TOOL"
"$tf" init -input=false -no-color || exit 1
"$tf" apply -input=false -no-color -auto-approve /workspace/tfplan || exit 1
"$tf" output -json > /workspace/outputs.json || exit 1
"#;

/// Largest outputs file, number of outputs and length of one value.
const MAX_OUTPUTS_BYTES: u64 = 4 << 20;
const MAX_OUTPUTS: usize = 1000;
const MAX_OUTPUT_VALUE: usize = 4096;

/// Steps 1–3 of the module documentation.
pub(super) async fn before_start(j: &JobIac, ctx: &HookContext<'_>) -> Result<(), IacError> {
    let task = &j.task;
    let image_id = j.image_id.lock().clone();
    let pool = j.agent.pool()?;
    let sealed = j.fetch_blob(&task.bundle_digest).await?;
    let plain = pool.open(&sealed).map_err(|e| {
        IacError::Bundle(format!(
            "it does not open with the pool key (changed, or sealed to another pool): {e}"
        ))
    })?;
    let planned = StateRef {
        serial: task.state_serial,
        lineage: task.state_lineage.clone(),
    };
    let digest = plan::digest(&DigestInput {
        bundle: &plain,
        source_digest: &task.source_digest,
        image: &image_id,
        variables: &task.variables,
        state: &planned,
    });
    if digest != task.plan_digest {
        return Err(IacError::Bundle(format!(
            "its plan digest {digest} is not the approved {} (the bundle, the source, the image {} ({image_id}), the variables or the planned state differ)",
            task.plan_digest, j.image
        )));
    }
    check_bundle(&plain)?;
    let current = state::fetch(&j.agent, &j.key).await?;
    if current.state != planned {
        let message = format!(
            "the state moved since the plan: planned against {}, now {}; nothing applied",
            describe(&planned),
            describe(&current.state)
        );
        j.report_apply(true, &message, Default::default()).await?;
        return Err(IacError::Stale(message));
    }
    let ws = ctx.workspace.to_path_buf();
    let (uid, gid) = (j.uid, j.gid);
    let managed = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        unpack_bundle(&plain, &ws, uid, gid)?;
        Ok(
            std::fs::symlink_metadata(ws.join("src").join(backend::BACKEND_FILE))
                .is_ok_and(|m| m.is_file()),
        )
    })
    .await
    .map_err(|_| IacError::Join("unpacking the plan bundle"))?
    .map_err(IacError::Unpack)?;
    if managed {
        j.manage_state(ctx, current).await?;
    } else {
        *j.state_before.lock() = current.state;
    }
    info!(digest = %task.plan_digest, managed_state = managed, "plan bundle verified; applying");
    Ok(())
}

/// Stores a state Terraform could not store itself, then reports the
/// outputs.
pub(super) async fn after_exit(
    j: &JobIac,
    ctx: &HookContext<'_>,
    outcome: &Outcome,
    managed: Option<&Managed>,
) -> Result<(), IacError> {
    if let Some(m) = managed {
        store_errored_state(m, ctx).await?;
        let (now, stored) = m.current().await;
        info!(serial = now.serial, versions_stored = stored, "apply ended");
    }
    if !matches!(outcome, Outcome::Exited { code: 0, .. }) {
        return Ok(());
    }
    let path = ctx.workspace.join("outputs.json");
    let raw = tokio::task::spawn_blocking(move || read_nofollow(&path, MAX_OUTPUTS_BYTES))
        .await
        .map_err(|_| IacError::Join("reading the outputs"))?
        .map_err(|source| IacError::Read {
            what: "the outputs",
            source,
        })?;
    let outputs = redacted_outputs(&raw)?;
    j.report_apply(false, "", outputs).await
}

/// `errored.tfstate`, which Terraform leaves when it could not store its
/// state, stored as the next version if it is one.
async fn store_errored_state(m: &Managed, ctx: &HookContext<'_>) -> Result<(), IacError> {
    let path = ctx.workspace.join("src").join("errored.tfstate");
    let read =
        tokio::task::spawn_blocking(move || read_nofollow(&path, backend::MAX_STATE_BYTES as u64))
            .await
            .map_err(|_| IacError::Join("reading the errored state"))?;
    let plain = match read {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(IacError::Read {
                what: "errored.tfstate",
                source,
            });
        }
    };
    match m.store(None, plain).await {
        Ok(s) => {
            warn!(
                serial = s.serial,
                "Terraform could not store its state; the agent stored errored.tfstate"
            );
            Ok(())
        }
        Err(refused) => Err(IacError::State(format!(
            "Terraform could not store its state and errored.tfstate was refused: {}",
            refused.message
        ))),
    }
}

fn describe(s: &StateRef) -> String {
    if s.lineage.is_empty() {
        "no state".into()
    } else {
        format!("serial {} of lineage {}", s.serial, s.lineage)
    }
}

/// `output -json` as name → JSON value, sensitive values redacted.
pub fn redacted_outputs(
    raw: &[u8],
) -> Result<std::collections::BTreeMap<String, String>, IacError> {
    let v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| IacError::Invalid {
        what: "the outputs",
        message: e.to_string(),
    })?;
    let mut out = std::collections::BTreeMap::new();
    for (name, o) in v.as_object().into_iter().flatten().take(MAX_OUTPUTS) {
        let sensitive = o
            .get("sensitive")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true);
        let value = if sensitive {
            "(sensitive)".to_string()
        } else {
            let mut s = o.get("value").map(|v| v.to_string()).unwrap_or_default();
            if s.len() > MAX_OUTPUT_VALUE {
                let mut cut = MAX_OUTPUT_VALUE;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push('…');
            }
            s
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

impl JobIac {
    async fn report_apply(
        &self,
        stale: bool,
        message: &str,
        outputs: std::collections::BTreeMap<String, String>,
    ) -> Result<(), IacError> {
        self.agent
            .client
            .clone()
            .report_apply(iacpb::ApplyReport {
                job_id: self.key.job_id.clone(),
                epoch: self.key.epoch,
                stale,
                message: message.to_string(),
                outputs: outputs.into_iter().collect(),
            })
            .await
            .map_err(|s| IacError::Report(s.message().to_string()))?;
        Ok(())
    }
}

/// Unpacks the bundle into the workspace (`src/`, `tfplan`), owned by the
/// job's user; entries may not leave it.
fn unpack_bundle(plain: &[u8], ws: &std::path::Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(plain));
    archive.set_preserve_permissions(false);
    for entry in archive.entries()? {
        entry?.unpack_in(ws)?;
    }
    super::chown_tree(&ws.join("src"), uid, gid)?;
    std::os::unix::fs::lchown(ws.join("tfplan"), Some(uid), Some(gid))
}

/// The bundle's files must be what an apply needs.
pub fn check_bundle(plain: &[u8]) -> Result<(), IacError> {
    let files = bundle::list(plain).map_err(|e| IacError::Bundle(e.to_string()))?;
    if !files.iter().any(|(n, _)| n == "tfplan") {
        return Err(IacError::Bundle("it holds no plan file".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_outputs_are_redacted() {
        let raw = br#"{"id": {"sensitive": false, "type": "string", "value": "abc"},
                       "token": {"sensitive": true, "type": "string", "value": "canary"},
                       "n": {"sensitive": false, "type": "number", "value": 3}}"#;
        let o = redacted_outputs(raw).unwrap();
        assert_eq!(o["id"], "\"abc\"");
        assert_eq!(o["token"], "(sensitive)");
        assert_eq!(o["n"], "3");
        assert!(!format!("{o:?}").contains("canary"));
        assert!(redacted_outputs(b"nope").is_err());
    }
}
