//! `outpost state versions STACK` and `outpost state push STACK FILE
//! --recipient POOL.PUB`: read the managed state's metadata, and record a
//! state version written outside any run (the file is sealed here, to the
//! pool's public key, so the control plane receives ciphertext only).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use outpost_proto::iac::v1 as iac;
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::iac::cli::Output;

#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// The stack's state versions (serial, lineage, digest, writer), newest first.
    Versions {
        stack: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Record FILE (a Terraform state) as the stack's new current version.
    Push {
        stack: String,
        file: PathBuf,
        /// The pool's public key (`age1…`), e.g. `pool.pub` beside the pool key.
        #[arg(long)]
        recipient: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn version_json(v: &iac::StateVersion) -> Value {
    json!({
        "stack": v.stack,
        "serial": v.serial,
        "lineage": v.lineage,
        "digest": v.digest,
        "written_by": v.written_by,
        "at": crate::iac::cli::rfc3339(v.at_ms),
    })
}

pub async fn run(c: &mut IacAdminClient<Channel>, cmd: StateCommand) -> Result<()> {
    let status = |e: tonic::Status| anyhow::anyhow!("{}", e.message());
    match cmd {
        StateCommand::Versions {
            stack,
            limit,
            output,
        } => {
            let r = c
                .list_state_versions(iac::ListStateVersionsRequest { stack, limit })
                .await
                .map_err(status)?
                .into_inner();
            if output == Output::Json {
                let v: Vec<Value> = r.versions.iter().map(version_json).collect();
                println!("{}", Value::Array(v));
            } else {
                println!(
                    "{:<8} {:<38} {:<14} {:<26} WRITTEN BY",
                    "SERIAL", "LINEAGE", "DIGEST", "AT"
                );
                for v in &r.versions {
                    println!(
                        "{:<8} {:<38} {:<14} {:<26} {}",
                        v.serial,
                        v.lineage,
                        v.digest.get(..12).unwrap_or(&v.digest),
                        crate::iac::cli::rfc3339(v.at_ms),
                        v.written_by
                    );
                }
            }
        }
        StateCommand::Push {
            stack,
            file,
            recipient,
            output,
        } => {
            let plain = std::fs::read(&file)
                .with_context(|| format!("failed to read {}", file.display()))?;
            let state = outpost_agent::iac::plan::StateRef::of(&plain)
                .map_err(|e| anyhow::anyhow!("{} is not a Terraform state: {e}", file.display()))?;
            let pubkey = std::fs::read_to_string(&recipient)
                .with_context(|| format!("failed to read {}", recipient.display()))?;
            let sealed = outpost_agent::iac::seal::seal_to(&pubkey, &plain)
                .map_err(|e| anyhow::anyhow!("{}: {e}", recipient.display()))?;
            let v = c
                .push_state_version(iac::PushStateVersionRequest {
                    stack,
                    serial: state.serial,
                    lineage: state.lineage,
                    sealed,
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == Output::Json {
                println!("{}", version_json(&v));
            } else {
                println!(
                    "stored serial {} of lineage {} for stack {}",
                    v.serial, v.lineage, v.stack
                );
            }
        }
    }
    Ok(())
}
