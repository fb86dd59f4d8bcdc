//! Per-job workspace filesystems: each job's `/workspace` is a fixed-size
//! ext4 filesystem of its own, so that the kernel bounds what a job can
//! write (`ENOSPC`), whatever the host's disks hold besides.
//!
//! Each filesystem lives in a sparse image file,
//! `work_dir/.outpost/disks/<job_id>-<epoch>.img` (only written blocks take
//! host space), loop-mounted `nosuid,nodev` on the job's workspace
//! directory, its root owned by the job's user, mode 0700. Images are
//! formatted **ahead of time**: a few spare ones of the agent's size
//! (`spare-*.img`) wait in the directory, and taking one is a `rename`, so
//! no filesystem is made on the pickup path; the spares are refilled in the
//! background once the job's container started (not while it starts). Only a job asking for a smaller workspace
//! than the agent's gets an image formatted when it is picked up (a few
//! milliseconds for a sparse image).
//!
//! Removal (every exit path, and leftovers at start): unmount (lazily if
//! busy; the loop device is released with the mount), remove the directory,
//! delete the image.
//!
//! Uses `mkfs.ext4` (e2fsprogs) and `mount`/`umount` (util-linux).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::ExecError;
use super::spec::is_workspace_name;

/// Spare images kept formatted.
const SPARES: usize = 2;
/// Prefix of spare image names.
const SPARE_PREFIX: &str = "spare-";
/// Smallest workspace (ext4 needs room for its metadata).
pub const MIN_WORKSPACE_BYTES: u64 = 16 << 20;

/// The image of a workspace directory: `disks/<name>.img`.
pub(super) fn image_of(disks: &Path, workspace: &Path) -> PathBuf {
    let name = workspace
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    disks.join(format!("{name}.img"))
}

/// Formats a sparse ext4 image of `bytes` at `image` whose root belongs to
/// `uid:gid` (blocking).
fn format(image: &Path, bytes: u64, uid: u32, gid: u32) -> Result<(), ExecError> {
    let fail = |reason: String| ExecError::Workspace {
        path: image.to_path_buf(),
        reason,
    };
    let _ = std::fs::remove_file(image);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| fail(e.to_string()))?;
    file.set_len(bytes).map_err(|e| fail(e.to_string()))?;
    drop(file);
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-L",
            "outpost-ws",
            "-O",
            "^has_journal",
            "-E",
        ])
        .arg(format!(
            "root_owner={uid}:{gid},lazy_itable_init=1,nodiscard"
        ))
        .arg(image)
        .output()
        .map_err(|e| fail(format!("running mkfs.ext4: {e} (install e2fsprogs)")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(fail(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Makes sure `disks` exists and holds [`SPARES`] formatted images of
/// `bytes`; half-made spares are removed first (blocking).
pub(super) fn refill(disks: &Path, bytes: u64, uid: u32, gid: u32) -> Result<(), ExecError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(disks)
        .map_err(|e| ExecError::Workspace {
            path: disks.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut ready = 0;
    for entry in std::fs::read_dir(disks).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(SPARE_PREFIX) {
            let ok = name.ends_with(".img") && entry.metadata().is_ok_and(|m| m.len() == bytes);
            if ok {
                ready += 1;
            } else {
                // Half-made, or of another size (the setting changed).
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    while ready < SPARES {
        let id = format!("{:016x}", rand::random::<u64>());
        let tmp = disks.join(format!("{SPARE_PREFIX}{id}.tmp"));
        format(&tmp, bytes, uid, gid)?;
        std::fs::rename(&tmp, disks.join(format!("{SPARE_PREFIX}{id}.img"))).map_err(|e| {
            ExecError::Workspace {
                path: tmp.clone(),
                reason: e.to_string(),
            }
        })?;
        ready += 1;
    }
    Ok(())
}

/// Gives `workspace` (an empty directory) a filesystem of `bytes`: a spare
/// image if one of that size is ready, else a freshly formatted one; then
/// mounts it `nosuid,nodev` (blocking). Returns whether a spare was used.
pub(super) fn attach(
    disks: &Path,
    workspace: &Path,
    bytes: u64,
    spare_bytes: u64,
    uid: u32,
    gid: u32,
) -> Result<bool, ExecError> {
    let fail = |reason: String| ExecError::Workspace {
        path: workspace.to_path_buf(),
        reason,
    };
    let mut steps = crate::observe::Steps::new("workspace filesystem");
    let image = image_of(disks, workspace);
    let mut from_spare = false;
    if bytes == spare_bytes {
        let spares = std::fs::read_dir(disks).map_err(|e| fail(e.to_string()))?;
        for entry in spares.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(SPARE_PREFIX)
                && name.ends_with(".img")
                // Taken by whoever renames it first.
                && std::fs::rename(entry.path(), &image).is_ok()
            {
                from_spare = true;
                break;
            }
        }
    }
    if !from_spare {
        format(&image, bytes, uid, gid)?;
    }
    steps.done(if from_spare {
        "spare taken"
    } else {
        "formatted"
    });
    let out = std::process::Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
        .arg(&image)
        .arg(workspace)
        .output()
        .map_err(|e| fail(format!("running mount: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&image);
        return Err(fail(format!(
            "mounting its filesystem failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    steps.done("mounted");
    let prepared = std::fs::remove_dir(workspace.join("lost+found"))
        .or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(workspace, std::fs::Permissions::from_mode(0o700))
        })
        .and_then(|()| std::os::unix::fs::chown(workspace, Some(uid), Some(gid)));
    if let Err(e) = prepared {
        let _ = detach(disks, workspace);
        return Err(fail(e.to_string()));
    }
    Ok(from_spare)
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub(super) fn is_mount_point(path: &Path) -> bool {
    let (Ok(me), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    me.dev() != parent.dev()
}

/// Unmounts the filesystem of `workspace` (lazily if busy) and deletes its
/// image (blocking). The directory itself is left for the caller.
pub(super) fn detach(disks: &Path, workspace: &Path) -> io::Result<()> {
    if is_mount_point(workspace) {
        let plain = std::process::Command::new("umount")
            .arg(workspace)
            .output()?;
        if !plain.status.success() {
            let lazy = std::process::Command::new("umount")
                .arg("-l")
                .arg(workspace)
                .output()?;
            if !lazy.status.success() {
                return Err(io::Error::other(format!(
                    "umount {}: {}",
                    workspace.display(),
                    String::from_utf8_lossy(&lazy.stderr).trim()
                )));
            }
        }
    }
    match std::fs::remove_file(image_of(disks, workspace)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Images in `disks` of jobs not in `keep` (by workspace name): removed.
pub(super) fn remove_leftover_images(disks: &Path, keep: &[PathBuf]) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(disks).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".img") else {
            continue;
        };
        if !is_workspace_name(stem)
            || keep
                .iter()
                .any(|k| k.file_name().is_some_and(|n| n == stem))
        {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether the job filled its workspace: less than 1 MiB, or 1 %, free.
pub(super) fn is_full(workspace: &Path, bytes: u64) -> bool {
    match nix::sys::statvfs::statvfs(workspace) {
        Ok(s) => {
            let free = s.blocks_available().saturating_mul(s.fragment_size());
            free < (1 << 20).max(bytes / 100)
        }
        Err(_) => false,
    }
}
