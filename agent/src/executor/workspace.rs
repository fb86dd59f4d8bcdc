//! Per-job workspace directories on the host: `work_dir/<job_id>-<epoch>`,
//! mode 0700, owned by the job's uid:gid, bind-mounted at `/workspace`.
//!
//! Filesystem calls are blocking; they run on tokio's blocking pool.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::ExecError;
use super::spec::is_workspace_name;

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

/// Removes a workspace and everything in it (symlinks inside are removed,
/// never followed). A missing directory is not an error.
pub(super) async fn remove(path: &Path) -> Result<(), ExecError> {
    let path = path.to_path_buf();
    blocking("removing a workspace", move || {
        remove_if_present(&path).map_err(|source| ExecError::RemoveWorkspace { path, source })
    })
    .await
}

/// Removes every directory in `work_dir` whose name is a workspace name,
/// except those in `keep`; anything else is left alone. Returns how many
/// were removed.
pub(super) async fn remove_leftovers(
    work_dir: &Path,
    keep: Vec<PathBuf>,
) -> Result<usize, ExecError> {
    let work_dir = work_dir.to_path_buf();
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
            match remove_if_present(&path) {
                Ok(()) => removed += 1,
                Err(source) => {
                    tracing::warn!(path = %path.display(), error = %source, "removing leftover workspace failed");
                    first_error.get_or_insert(ExecError::RemoveWorkspace { path, source });
                }
            }
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
