//! The host side of the fence that holds without the agent: the
//! `outpost-init` binary every job container runs as PID 1, and each job's
//! lease file, which the init enforces by itself (see the `outpost-init`
//! crate).
//!
//! The binary is built with the agent (statically, `agent/build.rs`) and
//! embedded in it; at start the agent writes it to
//! `work_dir/.outpost/outpost-init` (mode 0555, replaced by `rename` only if
//! it changed, so containers of an earlier agent keep their copy).
//! Each job gets `work_dir/.outpost/leases/<job_id>-<epoch>/lease`, written
//! before its container is created and replaced (write, then `rename`) on
//! every renewal. The directory is what is mounted, read-only: a
//! bind-mounted single file would keep showing the replaced inode.
//!
//! Filesystem calls are short and local; those on the job's path run on
//! tokio's blocking pool, a renewal's rewrite (a few bytes) inline.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use outpost_init::protocol::{LEASE_FILE, Lease};

use super::ExecError;
use super::secrets::{blocking, remove_if_present, remove_job_dirs_except};

/// The static `outpost-init` binary.
static INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/outpost-init"));

/// Writes the init binary to `path` (0555, root-owned) unless it is already
/// there, and creates `leases` (0700).
pub(super) async fn prepare(path: &Path, leases: &Path) -> Result<(), ExecError> {
    let (path, leases) = (path.to_path_buf(), leases.to_path_buf());
    blocking("installing outpost-init", move || {
        let fail = |path: &Path, source| ExecError::Fence {
            path: path.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&leases)
            .map_err(|e| fail(&leases, e))?;
        let same = std::fs::read(&path).is_ok_and(|b| b == INIT_BINARY);
        if !same {
            let tmp = path.with_extension("new");
            let _ = std::fs::remove_file(&tmp);
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o555)
                .open(&tmp)
                .and_then(|mut f| {
                    f.write_all(INIT_BINARY)?;
                    f.set_permissions(std::fs::Permissions::from_mode(0o555))?;
                    f.sync_all()
                })
                .and_then(|()| std::fs::rename(&tmp, &path));
            written.map_err(|e| fail(&path, e))?;
        }
        Ok(())
    })
    .await
}

/// Writes `lease` into `dir` (created 0755 if missing) atomically: a new
/// file (0444), then `rename` over the old one.
pub(super) fn write(dir: &Path, lease: &Lease) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let tmp = dir.join(format!(".{LEASE_FILE}.new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(lease.encode().as_bytes())?;
    f.set_permissions(std::fs::Permissions::from_mode(0o444))?;
    drop(f);
    std::fs::rename(&tmp, dir.join(LEASE_FILE))
}

/// Rewrites the lease of a job whose directory exists (a renewal); a job
/// that has none (not started, or already cleaned up) is left alone.
pub(super) fn renew(dir: &Path, lease: &Lease) -> io::Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    write(dir, lease).map(|()| true)
}

/// The lease currently in `dir`, if readable.
pub(super) fn read(dir: &Path) -> Option<Lease> {
    std::fs::read_to_string(dir.join(LEASE_FILE))
        .ok()
        .and_then(|t| Lease::decode(&t))
}

/// Removes a job's lease directory; a missing one is not an error.
pub(super) async fn remove(dir: &Path) -> Result<(), ExecError> {
    let dir = dir.to_path_buf();
    blocking("removing a lease directory", move || {
        remove_if_present(&dir).map_err(|source| ExecError::Fence { path: dir, source })
    })
    .await
}

/// Removes every lease directory in `leases` but those in `keep`. Returns
/// how many were removed.
pub(super) async fn remove_leftovers(
    leases: &Path,
    keep: Vec<PathBuf>,
) -> Result<usize, ExecError> {
    let leases = leases.to_path_buf();
    blocking("removing leftover lease directories", move || {
        remove_job_dirs_except(&leases, &keep, |path, source| ExecError::Fence {
            path,
            source,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn the_embedded_init_is_a_static_executable() {
        let b = INIT_BINARY;
        assert_eq!(&b[..4], b"\x7fELF");
        // No program interpreter (PT_INTERP): it runs in images without a libc.
        let u16_at = |o: usize| usize::from(u16::from_le_bytes([b[o], b[o + 1]]));
        let phoff = usize::try_from(u64::from_le_bytes(b[0x20..0x28].try_into().unwrap())).unwrap();
        let (size, count) = (u16_at(0x36), u16_at(0x38));
        assert!(count > 0);
        for i in 0..count {
            let at = phoff + i * size;
            let kind = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            assert_ne!(
                kind, 3,
                "outpost-init must be linked statically (PT_INTERP found)"
            );
        }
    }

    #[test]
    fn a_renewal_replaces_the_file_and_never_creates_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("job-1");
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let lease = |s| Lease::Until {
            stop_at: at(s),
            kill_at: at(s + 1),
        };
        assert!(!renew(&dir, &lease(10)).unwrap(), "no directory yet");
        assert!(!dir.exists());
        write(&dir, &lease(10)).unwrap();
        assert_eq!(read(&dir), Some(lease(10)));
        let before = std::fs::metadata(dir.join(LEASE_FILE)).unwrap();
        assert!(renew(&dir, &lease(20)).unwrap());
        assert_eq!(read(&dir), Some(lease(20)));
        let after = std::fs::metadata(dir.join(LEASE_FILE)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_ne!(before.ino(), after.ino(), "replaced by rename");
        assert_eq!(after.mode() & 0o777, 0o444);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [LEASE_FILE], "no temporary file left");
    }
}
