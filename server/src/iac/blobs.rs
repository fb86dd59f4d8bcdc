//! Content-addressed blob store under the data directory
//! (`<data>/iac/blobs/<sha256 hex>`): source tarballs. Written to a temporary
//! file and renamed, so a blob is either whole or absent.

use std::path::{Path, PathBuf};

use super::IacError;

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The blob directory; cheap to clone.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Blobs {
    pub fn new(dir: impl Into<PathBuf>) -> Blobs {
        Blobs { dir: dir.into() }
    }

    fn path(&self, digest: &str) -> Result<PathBuf, IacError> {
        if !is_digest(digest) {
            return Err(IacError::BadRequest(format!(
                "{digest:?} is not a sha256 digest"
            )));
        }
        Ok(self.dir.join(digest))
    }

    /// Stores `data`; returns its digest.
    pub async fn put(&self, data: Vec<u8>) -> Result<String, IacError> {
        let digest = sha256_hex(&data);
        let path = self.path(&digest)?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_atomic(&dir, &path, &data))
            .await
            .map_err(|_| IacError::Join)?
            .map_err(|source| IacError::Blob {
                op: "write",
                source,
            })?;
        Ok(digest)
    }

    /// The blob's bytes, checked against its digest.
    pub async fn get(&self, digest: &str) -> Result<Vec<u8>, IacError> {
        let path = self.path(digest)?;
        let data = tokio::fs::read(&path).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                IacError::NotFound(format!("blob {digest}"))
            } else {
                IacError::Blob { op: "read", source }
            }
        })?;
        if sha256_hex(&data) != digest {
            return Err(IacError::Blob {
                op: "verify",
                source: std::io::Error::other(format!("blob {digest} is corrupt")),
            });
        }
        Ok(data)
    }
}

fn write_atomic(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_round_trip_and_refuse_bad_names_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::new(dir.path().join("blobs"));
        let d = b.put(b"hello".to_vec()).await.unwrap();
        assert_eq!(
            d,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(b.get(&d).await.unwrap(), b"hello");
        assert!(matches!(b.get("../x").await, Err(IacError::BadRequest(_))));
        std::fs::write(dir.path().join("blobs").join(&d), b"hellp").unwrap();
        assert!(matches!(b.get(&d).await, Err(IacError::Blob { .. })));
    }
}
