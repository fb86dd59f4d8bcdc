//! `outpost-agent drain`: asks the agent running with a state directory to
//! drain (SIGTERM, as systemd or the kubelet would send) and waits until it
//! has exited. The agent records its pid in `<state_dir>/agent.pid`.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Errors of a drain request.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("no agent is running with state directory {dir} (no readable agent.pid)")]
    NotRunning { dir: std::path::PathBuf },
    #[error("agent.pid names process {pid}, which is not an outpost-agent")]
    NotAnAgent { pid: i32 },
    #[error("signalling the agent (pid {pid}) failed")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("the agent (pid {pid}) was still running after {waited:?}")]
    StillRunning { pid: i32, waited: Duration },
}

/// Whether `pid` is a live `outpost-agent` (an exited one not yet reaped by
/// its parent is a zombie: it counts as gone).
fn is_agent(pid: i32) -> bool {
    let named = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end() == "outpost-agent");
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    });
    named && !zombie
}

/// Sends SIGTERM to the agent of `state_dir` and waits up to `limit` for it
/// to exit. An agent that is not running is not an error.
pub fn request(state_dir: &Path, limit: Duration) -> Result<(), DrainError> {
    let pid_file = state_dir.join("agent.pid");
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return Err(DrainError::NotRunning {
            dir: state_dir.to_path_buf(),
        });
    };
    if pid == std::process::id() as i32 {
        return Err(DrainError::NotAnAgent { pid });
    }
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Ok(());
    }
    if !is_agent(pid) {
        return Err(DrainError::NotAnAgent { pid });
    }
    kill(Pid::from_raw(pid), Signal::SIGTERM)
        .map_err(|source| DrainError::Signal { pid, source })?;
    let started = Instant::now();
    while is_agent(pid) {
        if started.elapsed() >= limit {
            return Err(DrainError::StillRunning { pid, waited: limit });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
