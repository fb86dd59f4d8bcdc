//! Per-job workspace directories on the host: `work_dir/<job_id>-<epoch>`,
//! mode 0700, owned by the job's uid:gid, bind-mounted at `/workspace`,
//! each the mount point of the job's own filesystem ([`disk`](super::disk)).
//!
//! Filesystem calls are blocking; they run on tokio's blocking pool.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::spec::is_workspace_name;
use super::{ExecError, disk};

/// Creates the agent's work directory (mode 0700, root only) if needed and
/// returns its canonical path, which is what containers are given.
pub(super) async fn prepare_work_dir(work_dir: &Path) -> Result<PathBuf, ExecError> {
    let path = work_dir.to_path_buf();
    blocking("preparing the work directory", move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .and_then(|()| path.canonicalize())
            .map_err(|source| ExecError::CreateWorkDir { path, source })
    })
    .await
}

/// Creates a fresh, empty workspace owned by `uid:gid`. A leftover directory
/// with the same name (a crashed earlier attempt of the same lease) is removed
/// first, so that no stale file ever reaches the job.
pub(super) async fn create(path: &Path, uid: u32, gid: u32) -> Result<(), ExecError> {
    let path = path.to_path_buf();
    blocking("creating a workspace", move || {
        let result = remove_if_present(&path).and_then(|()| {
            std::fs::DirBuilder::new().mode(0o700).create(&path)?;
            // The umask may have cleared bits; 0700 is exact.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
        });
        result.map_err(|source| ExecError::CreateWorkspace { path, source })
    })
    .await
}

/// Gives a created workspace its own filesystem of `bytes` (see
/// [`disk::attach`]); `spare_bytes` is the size of the spare images.
pub(super) async fn attach_disk(
    disks: &Path,
    path: &Path,
    bytes: u64,
    spare_bytes: u64,
    uid: u32,
    gid: u32,
) -> Result<bool, ExecError> {
    let (disks, path) = (disks.to_path_buf(), path.to_path_buf());
    blocking("mounting a workspace filesystem", move || {
        disk::attach(&disks, &path, bytes, spare_bytes, uid, gid)
    })
    .await
}

/// Tops the spare workspace images up (see [`disk::refill`]).
pub(super) async fn refill_disks(
    disks: &Path,
    bytes: u64,
    uid: u32,
    gid: u32,
) -> Result<(), ExecError> {
    let disks = disks.to_path_buf();
    blocking("formatting spare workspace filesystems", move || {
        disk::refill(&disks, bytes, uid, gid)
    })
    .await
}

/// Removes a workspace: unmounts its filesystem and deletes its image, then
/// removes the directory and everything in it (symlinks inside are removed,
/// never followed). A missing directory is not an error.
pub(super) async fn remove(path: &Path, disks: &Path) -> Result<(), ExecError> {
    let (path, disks) = (path.to_path_buf(), disks.to_path_buf());
    blocking("removing a workspace", move || {
        disk::detach(&disks, &path)
            .and_then(|()| remove_if_present(&path))
            .map_err(|source| ExecError::RemoveWorkspace { path, source })
    })
    .await
}

/// Removes every directory in `work_dir` whose name is a workspace name,
/// except those in `keep`; anything else is left alone. Returns how many
/// were removed.
pub(super) async fn remove_leftovers(
    work_dir: &Path,
    keep: Vec<PathBuf>,
    disks: &Path,
) -> Result<usize, ExecError> {
    let work_dir = work_dir.to_path_buf();
    let disks = disks.to_path_buf();
    blocking("removing leftover workspaces", move || {
        let entries = std::fs::read_dir(&work_dir).map_err(|source| ExecError::ReadWorkDir {
            path: work_dir.clone(),
            source,
        })?;
        let mut removed = 0;
        let mut first_error = None;
        for entry in entries {
            let entry = entry.map_err(|source| ExecError::ReadWorkDir {
                path: work_dir.clone(),
                source,
            })?;
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let name = entry.file_name();
            if !is_dir || !name.to_str().is_some_and(is_workspace_name) {
                continue;
            }
            let path = entry.path();
            if keep.contains(&path) {
                continue;
            }
            match disk::detach(&disks, &path).and_then(|()| remove_if_present(&path)) {
                Ok(()) => removed += 1,
                Err(source) => {
                    tracing::warn!(path = %path.display(), error = %source, "removing leftover workspace failed");
                    first_error.get_or_insert(ExecError::RemoveWorkspace { path, source });
                }
            }
        }
        let images = disk::remove_leftover_images(&disks, &keep);
        if images > 0 {
            tracing::info!(images, "removed leftover workspace images");
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    })
    .await
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

async fn blocking<T: Send + 'static>(
    operation: &'static str,
    f: impl FnOnce() -> Result<T, ExecError> + Send + 'static,
) -> Result<T, ExecError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(source) => Err(ExecError::Blocking { operation, source }),
    }
}
