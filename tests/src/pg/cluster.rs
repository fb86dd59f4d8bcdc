//! One PostgreSQL cluster on this machine, below [`super`]'s fixtures: the
//! distribution's binaries, the account that runs them (`postgres` when
//! the tests run as root), `initdb`, the `postgres` process and its pid
//! file, and the bounded waits around them.

use std::fs;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{BIN_ENV, USER, Unavailable, unavailable};

/// `initdb`, bounded (a loaded machine takes several seconds).
const INITDB_LIMIT: Duration = Duration::from_secs(60);
/// From `postgres` spawned to accepting connections, and for a shutdown.
pub(super) const START_LIMIT: Duration = Duration::from_secs(30);
/// Waiting for another test process that creates the shared cluster.
const LOCK_LIMIT: Duration = Duration::from_secs(120);
pub(super) const POLL: Duration = Duration::from_millis(20);

/// An exclusive `flock` on `path`, waited for (bounded).
pub(super) fn lock(path: &Path) -> Result<nix::fcntl::Flock<fs::File>, Unavailable> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + LOCK_LIMIT;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| unavailable(format!("opening {}: {e}", path.display())))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(POLL);
            }
            Err((_, e)) => {
                return Err(unavailable(format!(
                    "no lock on {} within {LOCK_LIMIT:?}: {e}",
                    path.display()
                )));
            }
        }
    }
}

/// Signals `postgres` and waits for its end (bounded; then SIGKILL).
pub(super) fn shutdown(mut child: Child, signal: Signal) -> Result<(), Unavailable> {
    let pid = i32::try_from(child.id()).map_err(|e| unavailable(e.to_string()))?;
    let _ = kill(Pid::from_raw(pid), signal);
    let deadline = Instant::now() + START_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(unavailable(format!(
                    "postgres (pid {pid}) did not stop within {START_LIMIT:?} of {signal}; killed"
                )));
            }
        }
    }
}

/// The server's binaries and the account that runs them.
#[derive(Debug, Clone)]
pub(super) struct Toolkit {
    bin: PathBuf,
    /// As root: the `postgres` user's uid and gid.
    run_as: Option<(u32, u32)>,
}

impl Toolkit {
    pub(super) fn find() -> Result<Toolkit, Unavailable> {
        let bin = bin_dir(std::env::var_os(BIN_ENV))?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let u = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| {
                    unavailable(
                        "initdb and postgres refuse to run as root, and there is no \
                         `postgres` user to run them as",
                    )
                })?;
            Some((u.uid.as_raw(), u.gid.as_raw()))
        } else {
            None
        };
        Ok(Toolkit { bin, run_as })
    }

    /// `dir`, created private (0700) and owned by the account that runs
    /// the server; an existing one must be owned by it already.
    pub(super) fn prepare_dir(&self, dir: &Path) -> Result<(), Unavailable> {
        let err = |e: std::io::Error| unavailable(format!("{}: {e}", dir.display()));
        match fs::metadata(dir) {
            Ok(m) if m.uid() == self.owner() => Ok(()),
            Ok(m) => Err(unavailable(format!(
                "{} is owned by uid {}, not {}",
                dir.display(),
                m.uid(),
                self.owner()
            ))),
            Err(_) => {
                fs::create_dir_all(dir).map_err(err)?;
                self.own(dir)
            }
        }
    }

    /// The uid that owns the clusters' files.
    pub(super) fn owner(&self) -> u32 {
        self.run_as
            .map_or_else(|| nix::unistd::geteuid().as_raw(), |(u, _)| u)
    }

    /// Makes `dir` private (0700) to the account that runs the server.
    pub(super) fn own(&self, dir: &Path) -> Result<(), Unavailable> {
        let err = |e: std::io::Error| unavailable(format!("{}: {e}", dir.display()));
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(err)?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)
    }

    fn command(&self, program: &str, dir: &Path) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.current_dir(dir).stdin(Stdio::null());
        c
    }

    /// `dir/data`: a new cluster, configured for the tests.
    pub(super) fn initdb(&self, dir: &Path) -> Result<(), Unavailable> {
        let data = dir.join("data");
        let mut c = self.command("initdb", dir);
        c.arg("-D").arg(&data).args([
            "-U",
            USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            // The cluster is thrown away with any crash; not its server.
            "--no-sync",
        ]);
        run(c, INITDB_LIMIT)?;
        let conf = "\n# The tests' throwaway cluster: loopback only, no socket file.\n\
            listen_addresses = '127.0.0.1'\n\
            unix_socket_directories = ''\n\
            fsync = on\n\
            max_connections = 200\n\
            shared_buffers = 32MB\n\
            timezone = 'UTC'\n\
            recovery_init_sync_method = syncfs\n";
        let append = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))?;
            f.write_all(conf.as_bytes())?;
            // Truncates in place: the file stays the server account's.
            fs::write(
                data.join("pg_hba.conf"),
                "host all all 127.0.0.1/32 trust\n",
            )
        };
        append().map_err(|e| unavailable(format!("configuring {}: {e}", data.display())))
    }

    /// Starts `postgres` on `dir/data` and `port`, logging to
    /// `dir/server.log`; returns once it accepts connections (bounded).
    /// `detach`: in a process group of its own, to outlive this process.
    pub(super) fn spawn(&self, dir: &Path, port: u16, detach: bool) -> Result<Child, Unavailable> {
        let data = dir.join("data");
        let log_path = dir.join("server.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .and_then(|l| Ok((l.try_clone()?, l)))
            .map_err(|e| unavailable(format!("{}: {e}", log_path.display())))?;
        let mut c = self.command("postgres", dir);
        c.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .stdout(log.0)
            .stderr(log.1);
        if detach {
            c.process_group(0);
        }
        let mut child = c.spawn().map_err(|e| unavailable(format!("{c:?}: {e}")))?;
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(unavailable(format!(
                    "postgres exited ({status}) while starting; its log: {}",
                    tail(&log_path)
                )));
            }
            if running(&data).is_some_and(|p| i64::from(p.pid) == i64::from(child.id())) {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(unavailable(format!(
                    "postgres did not start within {START_LIMIT:?}; its log: {}",
                    tail(&log_path)
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The directory of `initdb` and `postgres`: `explicit`, else the newest
/// `/usr/lib/postgresql/<major>/bin` (Debian), else one on `PATH`.
fn bin_dir(explicit: Option<std::ffi::OsString>) -> Result<PathBuf, Unavailable> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = explicit.filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        return if has(&d) {
            Ok(d)
        } else {
            Err(unavailable(format!(
                "{BIN_ENV}={} has no initdb and postgres",
                d.display()
            )))
        };
    }
    let mut debian: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has(&bin).then_some((major, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, d)) = debian.pop() {
        return Ok(d);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|d| has(d))
        .ok_or_else(|| {
            unavailable(format!(
                "no PostgreSQL server binaries (initdb, postgres) in /usr/lib/postgresql/*/bin \
             or on PATH (scripts/setup.sh installs them; {BIN_ENV} names another directory)"
            ))
        })
}

/// What `postmaster.pid` says of a running server.
#[derive(Debug, PartialEq)]
pub(super) struct PidFile {
    pub pid: i32,
    pub port: u16,
    pub ready: bool,
}

/// `postmaster.pid`: pid, data directory, start time, port, socket
/// directory, listen address, shared memory key, status.
fn parse_pid_file(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.lines().collect();
    Some(PidFile {
        pid: lines.first()?.trim().parse().ok()?,
        port: lines.get(3)?.trim().parse().ok()?,
        ready: lines.get(7)?.trim() == "ready",
    })
}

/// The server of `data` if it runs and accepts connections: its pid file
/// says so and names a live `postgres` of that very directory.
pub(super) fn running(data: &Path) -> Option<PidFile> {
    let p = parse_pid_file(&fs::read_to_string(data.join("postmaster.pid")).ok()?)?;
    let cmdline = fs::read(format!("/proc/{}/cmdline", p.pid)).ok()?;
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == data.as_os_str().as_encoded_bytes());
    (p.ready && ours && alive(p.pid)).then_some(p)
}

/// Whether process `pid` exists and is not a zombie.
pub(super) fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.trim().chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

pub(super) fn free_port() -> Result<u16, Unavailable> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| unavailable(format!("no free loopback port: {e}")))
}

/// Runs `c` to its end (bounded); its output in the error.
fn run(mut c: Command, limit: Duration) -> Result<(), Unavailable> {
    let what = format!("{:?}", c.get_program());
    let err = |e: std::io::Error| unavailable(format!("{what}: {e}"));
    let mut out = tempfile::tempfile().map_err(err)?;
    c.stdout(out.try_clone().map_err(err)?)
        .stderr(out.try_clone().map_err(err)?);
    let mut child = c.spawn().map_err(err)?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(err)? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(unavailable(format!("{what} still running after {limit:?}")));
        }
        std::thread::sleep(POLL);
    };
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    let _ = out.rewind().and_then(|()| out.read_to_string(&mut text));
    Err(unavailable(format!(
        "{what} failed ({status}): {}",
        text.trim()
    )))
}

/// The last lines of a log, for error messages.
pub(super) fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_gives_pid_port_and_readiness() {
        let text = "4242\n/tmp/x/data\n1700000000\n54321\n\n127.0.0.1\n  1234   5678\nready   \n";
        assert_eq!(
            parse_pid_file(text),
            Some(PidFile {
                pid: 4242,
                port: 54321,
                ready: true
            })
        );
        let starting = text.replace("ready   ", "starting");
        assert!(!parse_pid_file(&starting).expect("parses").ready);
        assert_eq!(parse_pid_file("4242\n/tmp/x/data\n"), None);
    }

    #[test]
    fn binaries_named_where_there_are_none_are_unavailable() {
        let empty = tempfile::tempdir().expect("tempdir");
        let e = bin_dir(Some(empty.path().into())).expect_err("no binaries there");
        assert!(e.0.contains(BIN_ENV), "{e}");
    }
}
