//! Content-addressed blobs (source tarballs, sealed plan bundles and state
//! versions), named by the SHA-256 of their bytes, in one of three places:
//!
//! - `dir`: a directory under the data directory (`<data>/iac/blobs/<sha256
//!   hex>`), for the embedded store: one control plane, one machine;
//! - `pg`: the `iac_blobs` table of the PostgreSQL store, so every replica
//!   reads the blobs any replica wrote;
//! - `s3`: an S3 bucket (`<prefix>/sha256/<hex>`), with either store, when
//!   the operator names one (`outpost server --blob-store s3://…`).
//!
//! The first two follow the store ([`Blobs::for_store`]); S3 is chosen.
//!
//! **Invariants (every place):** a blob is either whole or absent (a file is
//! written to a temporary name and renamed; a row is one `INSERT`; an object
//! one PUT); putting a blob that is already there is a no-op (concurrent puts
//! of the same bytes from several replicas agree); every read is checked
//! against its digest, so damaged bytes are reported, never served.

use std::path::PathBuf;

use super::IacError;
use crate::store::Store;

/// Blobs in a directory.
mod dir;
/// Blobs in the PostgreSQL store's `iac_blobs` table.
mod pg;
/// Blobs in an S3 bucket.
mod s3;

pub use s3::{S3Connection, S3Location};

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
    S3(s3::S3Blobs),
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.place {
            Place::Dir(d) => f.debug_struct("Blobs").field("dir", &d.dir()).finish(),
            Place::Pg(_) => f
                .debug_struct("Blobs")
                .field("table", &"iac_blobs")
                .finish(),
            Place::S3(s) => f
                .debug_struct("Blobs")
                .field("s3", &s.location().to_string())
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

    /// Blobs in the bucket and under the prefix of `location`, reached
    /// with `conn`. Nothing is sent until the first put or get.
    pub fn s3(location: S3Location, conn: S3Connection) -> Blobs {
        Blobs {
            place: Place::S3(s3::S3Blobs::new(location, conn)),
        }
    }

    /// Stores `data`; returns its digest.
    pub async fn put(&self, data: Vec<u8>) -> Result<String, IacError> {
        let digest = sha256_hex(&data);
        check_digest(&digest)?;
        match &self.place {
            Place::Dir(d) => d.put(&digest, data).await?,
            Place::Pg(p) => p.put(&digest, data).await?,
            Place::S3(s) => s.put(&digest, data).await?,
        }
        Ok(digest)
    }

    /// The blob's bytes, checked against its digest.
    pub async fn get(&self, digest: &str) -> Result<Vec<u8>, IacError> {
        check_digest(digest)?;
        let data = match &self.place {
            Place::Dir(d) => d.get(digest).await?,
            Place::Pg(p) => p.get(digest).await?,
            Place::S3(s) => s.get(digest).await?,
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
