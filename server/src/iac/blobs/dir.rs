//! Blobs as files named by their digest in one directory, each written to a
//! temporary file and renamed, so a blob is either whole or absent.

use std::path::{Path, PathBuf};

use crate::iac::IacError;

/// The blob directory; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct DirBlobs {
    dir: PathBuf,
}

impl DirBlobs {
    pub(super) fn new(dir: PathBuf) -> DirBlobs {
        DirBlobs { dir }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `data` as `digest` (a checked digest) unless it is there.
    pub(super) async fn put(&self, digest: &str, data: Vec<u8>) -> Result<(), IacError> {
        let dir = self.dir.clone();
        let path = self.dir.join(digest);
        tokio::task::spawn_blocking(move || write_atomic(&dir, &path, &data))
            .await
            .map_err(|_| IacError::Join)?
            .map_err(|source| IacError::Blob {
                op: "write",
                source,
            })
    }

    /// The stored bytes of `digest` (a checked digest), unverified, or
    /// `None`.
    pub(super) async fn get(&self, digest: &str) -> Result<Option<Vec<u8>>, IacError> {
        match tokio::fs::read(self.dir.join(digest)).await {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IacError::Blob { op: "read", source }),
        }
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
