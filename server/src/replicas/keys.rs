//! Keys every replica must hold the same copy of: the secrets key
//! (`<data>/iac/secrets.key`, seals stack and webhook secrets) and the OIDC
//! signing key (`<data>/oidc-signing-key.p8`, signs job tokens). Each is a
//! file of the data directory, created on first use; a replica started with
//! a fresh data directory would create keys of its own, and secrets sealed
//! or tokens signed by another replica would silently stop opening or
//! verifying.
//!
//! At start, a replica passes each key's fingerprint to [`check_keys`]: the
//! first replica of a database records them in `replica_keys`; every later
//! one must present the same, or refuses to start, naming the file to copy
//! from a running replica. A fingerprint reveals nothing about its key: the
//! SHA-256 of the OIDC public key, and a keyed digest (HMAC-SHA256 under the
//! key) of a constant for the secrets key. Concurrent first starts agree:
//! each inserts `ON CONFLICT DO NOTHING`, then compares with what was stored.
//!
//! With the embedded store there is one control plane: nothing to check.

use std::fmt;
use std::path::PathBuf;

use crate::store::postgres::{pg, pool_err};
use crate::store::{Store, StoreError};

/// The name under which the OIDC signing key's fingerprint is recorded.
pub const OIDC_SIGNING_KEY: &str = "oidc-signing-key";
/// The name under which the secrets key's fingerprint is recorded.
pub const SECRETS_KEY: &str = "iac-secrets-key";

/// One key this replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaKey {
    /// Its name in `replica_keys`.
    pub name: &'static str,
    /// The file it was read from (named in the error).
    pub file: PathBuf,
    /// Its fingerprint (never the key).
    pub fingerprint: String,
}

impl ReplicaKey {
    /// The OIDC signing key of `issuer`.
    pub fn oidc(issuer: &crate::oidc::Issuer) -> ReplicaKey {
        ReplicaKey {
            name: OIDC_SIGNING_KEY,
            file: issuer.config().key_file.clone(),
            fingerprint: issuer.fingerprint().to_string(),
        }
    }

    /// The secrets key of `sealer`, read from `file`.
    pub fn secrets(sealer: &crate::iac::secrets::Sealer, file: PathBuf) -> ReplicaKey {
        ReplicaKey {
            name: SECRETS_KEY,
            file,
            fingerprint: sealer.fingerprint().to_string(),
        }
    }
}

/// A key of this replica that is not the one the database recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Differs {
    pub name: &'static str,
    pub file: PathBuf,
    /// The fingerprint the first replica recorded.
    pub recorded: String,
    /// This replica's.
    pub found: String,
}

/// Errors of the check.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{}", differs_message(.0))]
    Differ(Vec<Differs>),
    #[error("checking the replicas' keys failed")]
    Store(#[from] StoreError),
}

fn differs_message(d: &[Differs]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for Differs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = |s: &str| s.chars().take(16).collect::<String>();
        write!(
            f,
            "this replica's {name} ({file}, fingerprint {found}…) is not the key the other replicas of this database use (fingerprint {recorded}…): refusing to start; copy {file} from a running replica (or the first one started) to this one, then start it again",
            name = self.name,
            file = self.file.display(),
            found = short(&self.found),
            recorded = short(&self.recorded),
        )
    }
}

/// Records `keys` if this is the first replica of the database to start
/// with them, else checks they are the recorded ones. Every key is checked;
/// the error names each that differs. A no-op on the embedded store.
pub async fn check_keys(store: &Store, keys: &[ReplicaKey]) -> Result<(), KeysError> {
    let Some(pool) = store.pg() else {
        return Ok(());
    };
    let client = pool
        .get()
        .await
        .map_err(pool_err("check the replicas' keys"))?;
    let mut differ = Vec::new();
    for key in keys {
        client
            .execute(
                "INSERT INTO replica_keys (name, fingerprint) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
                &[&key.name, &key.fingerprint],
            )
            .await
            .map_err(pg("record a replica key"))?;
        let recorded: String = client
            .query_one(
                "SELECT fingerprint FROM replica_keys WHERE name = $1",
                &[&key.name],
            )
            .await
            .map_err(pg("read a replica key"))?
            .try_get(0)
            .map_err(pg("read a replica key"))?;
        if recorded != key.fingerprint {
            differ.push(Differs {
                name: key.name,
                file: key.file.clone(),
                recorded,
                found: key.fingerprint.clone(),
            });
        } else {
            tracing::debug!(key = key.name, "replica key matches the recorded one");
        }
    }
    if differ.is_empty() {
        Ok(())
    } else {
        Err(KeysError::Differ(differ))
    }
}

#[cfg(test)]
mod tests;
