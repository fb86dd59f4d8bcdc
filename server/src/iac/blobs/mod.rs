//! Content-addressed blobs (source tarballs, sealed plan bundles and state
//! versions), named by the SHA-256 of their bytes, in one of two places:
//!
//! - `dir`: a directory under the data directory (`<data>/iac/blobs/<sha256
//!   hex>`), for the embedded store: one control plane, one machine;
//! - `pg`: the `iac_blobs` table of the PostgreSQL store, so every replica
//!   reads the blobs any replica wrote.
//!
//! **Invariants (both places):** a blob is either whole or absent (a file is
//! written to a temporary name and renamed; a row is one `INSERT`); putting
//! a blob that is already there is a no-op (concurrent puts of the same bytes
//! from several replicas agree); every read is checked against its digest,
//! so damaged bytes are reported, never served.

use std::path::PathBuf;

use super::IacError;
use crate::store::Store;

/// Blobs in a directory.
mod dir;
/// Blobs in the PostgreSQL store's `iac_blobs` table.
mod pg;

#[cfg(test)]
mod tests;

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The blob store; cheap to clone.
#[derive(Clone)]
pub struct Blobs {
    place: Place,
}

#[derive(Clone)]
enum Place {
    Dir(dir::DirBlobs),
    Pg(pg::PgBlobs),
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.place {
            Place::Dir(d) => f.debug_struct("Blobs").field("dir", &d.dir()).finish(),
            Place::Pg(_) => f
                .debug_struct("Blobs")
                .field("table", &"iac_blobs")
                .finish(),
        }
    }
}

impl Blobs {
    /// Blobs in the directory `dir` (created on the first put).
    pub fn new(dir: impl Into<PathBuf>) -> Blobs {
        Blobs {
            place: Place::Dir(dir::DirBlobs::new(dir.into())),
        }
    }

    /// The blobs of `store`: its `iac_blobs` table when it is PostgreSQL
    /// (shared by the replicas), else the directory `dir`.
    pub fn for_store(store: &Store, dir: impl Into<PathBuf>) -> Blobs {
        match store.pg() {
            Some(pool) => Blobs {
                place: Place::Pg(pg::PgBlobs::new(pool.clone())),
            },
            None => Blobs::new(dir),
        }
    }

    /// Stores `data`; returns its digest.
    pub async fn put(&self, data: Vec<u8>) -> Result<String, IacError> {
        let digest = sha256_hex(&data);
        check_digest(&digest)?;
        match &self.place {
            Place::Dir(d) => d.put(&digest, data).await?,
            Place::Pg(p) => p.put(&digest, data).await?,
        }
        Ok(digest)
    }

    /// The blob's bytes, checked against its digest.
    pub async fn get(&self, digest: &str) -> Result<Vec<u8>, IacError> {
        check_digest(digest)?;
        let data = match &self.place {
            Place::Dir(d) => d.get(digest).await?,
            Place::Pg(p) => p.get(digest).await?,
        }
        .ok_or_else(|| IacError::NotFound(format!("blob {digest}")))?;
        if sha256_hex(&data) != digest {
            return Err(IacError::Blob {
                op: "verify",
                source: std::io::Error::other(format!("blob {digest} is corrupt")),
            });
        }
        Ok(data)
    }
}

/// Refuses anything but a lowercase hex SHA-256 (a digest names a file).
fn check_digest(s: &str) -> Result<(), IacError> {
    let ok = s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if ok {
        Ok(())
    } else {
        Err(IacError::BadRequest(format!(
            "{s:?} is not a sha256 digest"
        )))
    }
}
