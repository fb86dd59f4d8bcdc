//! Private state directories, shared by the agent (`state_dir`) and the
//! control plane (`--state-dir`): created `0700` whatever the umask, an
//! existing one tightened to `0700` (a group- or world-writable one is
//! refused: someone else may already have planted files in it), and held
//! with an exclusive `flock` for the life of the process, so a second
//! instance on the same directory refuses to start instead of corrupting
//! the first one's store, spool or leases.
//!
//! **Invariant:** one process at a time owns a state directory; the lock is
//! the kernel's (`flock` on `<dir>/lock`), so it is released however the
//! owner dies, and a stale PID in the file is never trusted on its own.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};

use std::path::{Path, PathBuf};

/// Errors preparing a state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to use {path}: it is writable by {who} (mode {mode:o}); make it private to this user (chmod 700)"
    )]
    Writable {
        path: PathBuf,
        who: &'static str,
        mode: u32,
    },
    #[error("state directory {path} in use by PID {pid}")]
    InUse { path: PathBuf, pid: String },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateDirError {
    let path = path.to_path_buf();
    move |source| StateDirError::Io { op, path, source }
}

/// Creates `dir` (and missing parents) with mode `0700`; an existing `dir`
/// is checked and tightened to `0700` if this user owns it. A group- or
/// world-writable `dir` is refused.
pub fn private_dir(dir: &Path) -> Result<(), StateDirError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("create", dir))?;
    let meta = fs::metadata(dir).map_err(io("inspect", dir))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(StateDirError::Writable {
            path: dir.to_path_buf(),
            who: "every user",
            mode,
        });
    }
    if mode & 0o020 != 0 {
        return Err(StateDirError::Writable {
            path: dir.to_path_buf(),
            who: "its group",
            mode,
        });
    }
    if mode & 0o077 != 0 {
        // Only the owner may chmod: a directory of another user that no
        // one else can write stays as it is (its contents are private).
        match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(io("restrict the mode of", dir)(e)),
        }
    }
    Ok(())
}

/// Makes an existing file `0600` (no-op if it does not exist).
pub fn private_file(path: &Path) -> Result<(), StateDirError> {
    match fs::metadata(path) {
        Ok(m) if m.mode() & 0o077 != 0 => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .map_err(io("restrict the mode of", path))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("inspect", path)(e)),
    }
}

/// An exclusive hold on a state directory; released when dropped (or when
/// the process dies, however it dies).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Prepares `dir` as a private state directory ([`private_dir`]) and takes
/// its exclusive lock; another live holder makes this fail with
/// [`StateDirError::InUse`] naming its PID.
pub fn lock(dir: &Path) -> Result<StateLock, StateDirError> {
    private_dir(dir)?;
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io("open", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StateDirError::InUse {
                path: dir.to_path_buf(),
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.to_string()
                },
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
    }
    private_file(&path)?;
    file.set_len(0).map_err(io("write", &path))?;
    file.rewind().map_err(io("write", &path))?;
    writeln!(file, "{}", std::process::id()).map_err(io("write", &path))?;
    Ok(StateLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn directories_are_private_whatever_the_umask_and_existing_ones_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let open = root.path().join("srv");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
        let nested = open.join("a/b");
        private_dir(&nested).unwrap();
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&open.join("a")), 0o700);

        let file = open.join("f");
        fs::write(&file, b"x").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn writable_by_others_is_refused() {
        let root = tempfile::tempdir().unwrap();
        for (m, who) in [(0o777, "every user"), (0o770, "its group")] {
            let d = root.path().join(format!("d{m:o}"));
            fs::create_dir(&d).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(m)).unwrap();
            let e = private_dir(&d).unwrap_err().to_string();
            assert!(e.contains(who) && e.contains("chmod 700"), "{e}");
            assert_eq!(mode(&d), m, "a refused directory is left as it was");
        }
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let root = tempfile::tempdir().unwrap();
        let held = lock(root.path()).unwrap();
        assert_eq!(mode(held.path()), 0o600);
        let e = lock(root.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("in use by PID {}", std::process::id())),
            "{e}"
        );
        drop(held);
        lock(root.path()).expect("free again once released");
    }
}
