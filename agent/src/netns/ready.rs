//! The ready pipe: a FIFO in the job's workspace on which the job's entry
//! blocks until the agent has set up what the job needs inside its network
//! namespace, which exists only once the container has started. The agent
//! then writes one line (which may carry a secret: it never touches the
//! disk) and removes the pipe.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::Docker;

/// How long the agent waits for the job's entry to open the pipe.
pub const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Creates the pipe at `path` (mode 0600, owned by the job's user),
/// replacing whatever the workspace held there.
pub fn make_fifo(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)?,
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Writes `line` (and a newline) to the pipe once the entry has opened it,
/// which releases the entry, then removes the pipe. Fails if the entry has
/// not opened it within [`RELEASE_WAIT`].
pub async fn release(fifo: &Path, line: &str) -> Result<(), String> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let deadline = Instant::now() + RELEASE_WAIT;
    let fd = loop {
        // Non-blocking: ENXIO until the entry has opened its end.
        match open(
            fifo,
            OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => break fd,
            Err(nix::errno::Errno::ENXIO) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(nix::errno::Errno::ENXIO) => {
                return Err(format!(
                    "its entry did not start within {}s (does the image have /bin/sh?)",
                    RELEASE_WAIT.as_secs()
                ));
            }
            Err(e) => return Err(format!("opening the ready pipe: {e}")),
        }
    };
    let line = format!("{line}\n");
    // Shorter than PIPE_BUF and the pipe is empty: one atomic write.
    let written = nix::unistd::write(fd.as_fd(), line.as_bytes())
        .map_err(|e| format!("writing to the ready pipe: {e}"))?;
    drop(fd);
    if written != line.len() {
        return Err("short write to the ready pipe".into());
    }
    if let Err(e) = std::fs::remove_file(fifo) {
        tracing::warn!(error = %e, "could not remove the ready pipe");
    }
    Ok(())
}

/// The host PID of a running container's first process.
pub async fn container_pid(docker: &Docker, container: &str) -> Result<u32, String> {
    let inspect = docker
        .inspect_container(container, None)
        .await
        .map_err(|e| format!("inspecting container {container}: {e}"))?;
    inspect
        .state
        .and_then(|s| s.pid)
        .filter(|pid| *pid > 0)
        .and_then(|pid| u32::try_from(pid).ok())
        .ok_or_else(|| format!("container {container} has no running process"))
}
