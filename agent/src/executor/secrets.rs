//! Per-job secret files on a host tmpfs.
//!
//! `secrets_dir` (default `/run/outpost-agent/secrets`) is a tmpfs (the agent
//! mounts one there at start if it is not), mode 0700, root only. Each agent
//! has its own subdirectory `<scope>` in it
//! ([`agent_scope`](super::spec::agent_scope)), created at start; at a clean
//! exit the agent removes it (if no job's secrets are left in it) and
//! unmounts the tmpfs if it mounted it and no other agent's `<scope>` is in
//! it ([`release`]). Agents sharing a host serialise these steps with a lock
//! file beside `secrets_dir`. Each job
//! with secrets gets `<scope>/<job_id>-<epoch>/` holding one file per secret,
//! mode 0400 and owned by the job's uid:gid, the directory mode 0500 and
//! owned by the job's user. It is bind-mounted read-only at `/run/secrets`
//! and removed with the container, however the job ends. Secrets are never
//! written to disk by the executor (tmpfs pages can still reach swap if the
//! host has swap; a kernel with tmpfs `noswap` avoids it).
//!
//! The files are written before the container is created, so the job can
//! never observe them missing or half-written.
//!
//! Filesystem calls are blocking; they run on tokio's blocking pool.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::ExecError;
use super::spec::is_workspace_name;
use crate::job::JobSecret;

/// Size of the tmpfs the agent mounts (a ceiling; only what is written
/// takes memory).
const TMPFS_SIZE: &str = "64m";
/// The source name of the tmpfs the agent mounts (how it knows it is its own).
const TMPFS_SOURCE: &str = "outpost-secrets";

/// Takes the host-wide lock of `dir` (a file beside it, which a mount on
/// `dir` cannot hide): agents starting and stopping together must neither
/// stack two mounts nor unmount one that another agent just claimed.
fn lock(dir: &Path) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.with_file_name(format!(".{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))
}

/// Makes `secrets_dir` a root-only tmpfs (mounting one if needed) and
/// creates this agent's `scope` directory in it. Returns its canonical path.
pub(super) async fn prepare(secrets_dir: &Path, scope: &str) -> Result<PathBuf, ExecError> {
    let dir = secrets_dir.to_path_buf();
    let scope = scope.to_string();
    blocking("preparing the secrets directory", move || {
        let fail = |reason: String| ExecError::SecretsDir {
            path: dir.clone(),
            reason,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| fail(e.to_string()))?;
        let lock = lock(&dir).map_err(|e| fail(format!("locking it: {e}")))?;
        if !is_tmpfs(&dir).map_err(|e| fail(e.to_string()))? {
            let options = format!("mode=0700,size={TMPFS_SIZE}");
            nix::mount::mount(
                Some(TMPFS_SOURCE),
                &dir,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                Some(options.as_str()),
            )
            .map_err(|e| {
                fail(format!(
                    "it is not on a tmpfs and mounting one failed ({e}); mount a tmpfs there or run the agent as root"
                ))
            })?;
            tracing::info!(path = %dir.display(), "mounted a tmpfs for job secrets");
        }
        if !is_tmpfs(&dir).map_err(|e| fail(e.to_string()))? {
            return Err(fail("it is not on a tmpfs".to_string()));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(e.to_string()))?;
        // Claimed under the lock: no other agent unmounts the tmpfs now.
        match std::fs::DirBuilder::new().mode(0o700).create(dir.join(&scope)) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(fail(e.to_string())),
            _ => {}
        }
        drop(lock);
        dir.canonicalize().map_err(|e| fail(e.to_string()))
    })
    .await
}

/// At a clean exit: removes this agent's `scope_dir` if it holds no job's
/// secrets, then unmounts `secrets_dir` if the agent mounted it (its source
/// is [`TMPFS_SOURCE`]) and nothing else is in it. Returns whether it
/// unmounted.
pub(super) async fn release(secrets_dir: &Path, scope_dir: &Path) -> Result<bool, ExecError> {
    let (dir, scope_dir) = (secrets_dir.to_path_buf(), scope_dir.to_path_buf());
    blocking("releasing the secrets directory", move || {
        let fail = |reason: String| ExecError::SecretsDir {
            path: dir.clone(),
            reason,
        };
        let _lock = lock(&dir).map_err(|e| fail(format!("locking it: {e}")))?;
        match std::fs::remove_dir(&scope_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Secrets of a job that could not be cleaned up: keep all.
            Err(_) => return Ok(false),
        }
        let empty = std::fs::read_dir(&dir)
            .map_err(|e| fail(e.to_string()))?
            .next()
            .is_none();
        if !empty || !mounted_by_agent(&dir).map_err(|e| fail(e.to_string()))? {
            return Ok(false);
        }
        nix::mount::umount(&dir).map_err(|e| fail(format!("unmounting it: {e}")))?;
        Ok(true)
    })
    .await
}

/// Whether the mount on `dir` is a tmpfs the agent mounted (by its source
/// name in `/proc/self/mountinfo`).
fn mounted_by_agent(dir: &Path) -> io::Result<bool> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let target = dir.to_string_lossy();
    Ok(table.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        let mount_point = left.split(' ').nth(4).map(unescape_mountinfo);
        let mut right = right.split(' ');
        mount_point.as_deref() == Some(&*target)
            && right.next() == Some("tmpfs")
            && right.next() == Some(TMPFS_SOURCE)
    }))
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, b| v.wrapping_mul(8) + (b - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_tmpfs(path: &Path) -> io::Result<bool> {
    let stat = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(stat.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Writes a job's secrets into a fresh `dir` (a leftover one is replaced):
/// files 0400 and directory 0500, owned by `uid:gid`.
pub(super) async fn write(
    dir: &Path,
    secrets: &[JobSecret],
    uid: u32,
    gid: u32,
) -> Result<(), ExecError> {
    let path = dir.to_path_buf();
    let secrets = secrets.to_vec();
    blocking("writing secrets", move || {
        // Never write a secret to disk, whatever happened to the mount.
        let on_tmpfs = path.parent().and_then(Path::parent).map(is_tmpfs);
        if !matches!(on_tmpfs, Some(Ok(true))) {
            return Err(ExecError::WriteSecrets {
                path: path.clone(),
                source: io::Error::other("the secrets directory is no longer a tmpfs"),
            });
        }
        let result = remove_if_present(&path).and_then(|()| {
            if let Some(scope) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(scope)?;
            }
            std::fs::DirBuilder::new().mode(0o700).create(&path)?;
            for s in &secrets {
                // Names were checked by the spec builder ([A-Za-z0-9_.-], no "..").
                let file = path.join(&s.name);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o400)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&file)?;
                f.write_all(s.value.expose())?;
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
                f.set_permissions(std::fs::Permissions::from_mode(0o400))?;
            }
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o500))
        });
        result.map_err(|source| ExecError::WriteSecrets { path, source })
    })
    .await
}

/// The secret values of a job that an earlier agent process started (for
/// masking its output after a restart). Unreadable files are skipped.
pub(super) async fn read_values(dir: &Path) -> Vec<Vec<u8>> {
    let dir = dir.to_path_buf();
    let read = blocking("reading secrets", move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .collect())
    })
    .await;
    read.unwrap_or_default()
}

/// Removes a job's secrets directory; a missing one is not an error.
pub(super) async fn remove(dir: &Path) -> Result<(), ExecError> {
    let path = dir.to_path_buf();
    blocking("removing secrets", move || {
        remove_if_present(&path).map_err(|source| ExecError::RemoveSecrets { path, source })
    })
    .await
}

/// Removes every per-job directory in this agent's `scope_dir` but those in
/// `keep`. Returns how many were removed.
pub(super) async fn remove_leftovers(
    scope_dir: &Path,
    keep: Vec<PathBuf>,
) -> Result<usize, ExecError> {
    let scope_dir = scope_dir.to_path_buf();
    blocking("removing leftover secrets", move || {
        remove_job_dirs_except(&scope_dir, &keep, |path, source| {
            tracing::warn!(path = %path.display(), error = %source, "removing leftover secrets failed");
            ExecError::RemoveSecrets { path, source }
        })
    })
    .await
}

/// Removes every per-job directory (named like a workspace) in `dir` but
/// those in `keep`; a missing `dir` holds none. Goes on past a failure and
/// returns the first one (made by `error`), else how many were removed.
pub(super) fn remove_job_dirs_except(
    dir: &Path,
    keep: &[PathBuf],
    error: impl Fn(PathBuf, io::Error) -> ExecError,
) -> Result<usize, ExecError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(error(dir.to_path_buf(), source)),
    };
    let mut removed = 0;
    let mut first_error = None;
    for entry in entries.flatten() {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || !entry.file_name().to_str().is_some_and(is_workspace_name) {
            continue;
        }
        let path = entry.path();
        if keep.contains(&path) {
            continue;
        }
        match remove_if_present(&path) {
            Ok(()) => removed += 1,
            Err(source) => {
                let e = error(path, source);
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Removes a directory tree; one that is already gone is not an error.
pub(super) fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Runs blocking file-system work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    operation: &'static str,
    f: impl FnOnce() -> Result<T, ExecError> + Send + 'static,
) -> Result<T, ExecError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(source) => Err(ExecError::Blocking { operation, source }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(super::unescape_mountinfo("/run/a\\040b"), "/run/a b");
        assert_eq!(super::unescape_mountinfo("/plain"), "/plain");
        assert_eq!(super::unescape_mountinfo("/x\\9"), "/x\\9");
    }
}
