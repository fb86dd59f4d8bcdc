//! The processes a benchmark measures: the control plane (`outpost server`)
//! and an agent (`outpost-agent`), each its own process so that its memory
//! and CPU are its own; and what `/proc` says about them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost::client::{ClientConfig, StateDir};
use outpost::identity::Role;

use crate::{RUNNER_IMAGE, bin};

/// The `outpost` or `outpost-agent` binary measured: from the directory in
/// `OUTPOST_BENCH_BIN` if set (e.g. binaries of an earlier version, for a
/// baseline), else the one built beside this harness.
pub fn exe(name: &str) -> PathBuf {
    match std::env::var_os("OUTPOST_BENCH_BIN") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => bin(name),
    }
}

/// The measured control plane's log level: `warn`, or
/// `OUTPOST_BENCH_SERVER_LOG` (e.g. `info` to see each lease pushed, with
/// its time, in the fleet's `server.log`).
fn server_log_level() -> String {
    std::env::var("OUTPOST_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into())
}

/// `outpost server` in its own process, with its own state directory.
pub struct ServerProc {
    pub state: StateDir,
    pub addr: std::net::SocketAddr,
    child: Child,
}

impl ServerProc {
    /// Starts a control plane in `state` (its PKI made if missing) on
    /// `listen` (`127.0.0.1:0`: any port) with the default lease timing
    /// (30 s leases, 5 s heartbeats) and its embedded store; returns once
    /// it listens.
    pub fn start(state: &StateDir, listen: &str) -> anyhow::Result<ServerProc> {
        Self::start_with(state, listen, None)
    }

    /// [`ServerProc::start`] with the store at `store` (`OUTPOST_STORE`, a
    /// `postgres://` URL) instead of the embedded one. Replicas of one
    /// installation each get a state directory of their own holding a copy
    /// of one PKI ([`copy_pki`]).
    pub fn start_with(
        state: &StateDir,
        listen: &str,
        store: Option<&str>,
    ) -> anyhow::Result<ServerProc> {
        std::fs::create_dir_all(&state.root)?;
        outpost::dev::ensure_pki(state)?;
        let _ = std::fs::remove_file(state.addr_file());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.root.join("server.log"))?;
        let mut cmd = Command::new(exe("outpost"));
        cmd.arg("--state-dir")
            .arg(&state.root)
            .args(["server", "--listen", listen, "--lease-ttl", "30s"])
            .env("OUTPOST_LOG", server_log_level())
            .stdout(Stdio::null())
            .stderr(log);
        match store {
            Some(url) => cmd.env("OUTPOST_STORE", url),
            None => cmd.env_remove("OUTPOST_STORE"),
        };
        let child = cmd.spawn()?;
        let mut server = ServerProc {
            state: state.clone(),
            addr: "127.0.0.1:0".parse()?,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(state.addr_file())
                && let Some(addr) = text.trim().strip_prefix("https://")
                && let Ok(addr) = addr.parse()
            {
                server.addr = addr;
                return Ok(server);
            }
            if let Some(st) = server.child.try_wait()? {
                anyhow::bail!(
                    "outpost server exited with {st}; see {}",
                    state.root.join("server.log").display()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "outpost server not up in 60s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        Ok(ClientConfig::from_state(&self.state, Some(self.url()))?)
    }

    /// SIGTERM, then SIGKILL after 30 s; waits for the exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        stop_child(&mut self.child)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stop_child(child: &mut Child) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Copies the PKI of `from` (CA, server and admin certificates, issued
/// agents) into `to`'s, for a replica of the same installation.
pub fn copy_pki(from: &StateDir, to: &StateDir) -> anyhow::Result<()> {
    copy_dir(&from.pki().dir, &to.pki().dir)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)?;
        }
    }
    Ok(())
}

/// `outpost-agent` in its own process.
pub struct AgentProc {
    child: Child,
    pub dir: PathBuf,
}

impl AgentProc {
    /// Starts agent `name` of `server` with `capacity` slots (certificate
    /// issued if missing); returns once its state directory says it runs.
    pub fn start(server: &ServerProc, name: &str, capacity: u32) -> anyhow::Result<AgentProc> {
        let pki = server.state.pki();
        let paths = pki.issued(Role::Agent, name);
        if !paths.cert.exists() {
            pki.issue(Role::Agent, name)?;
        }
        let dir = server.state.root.join("agents").join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"server = "{url}"
server_name = "localhost"
agent_id = "{name}"
capacity = {capacity}
state_dir = "{state}"
max_backoff = "500ms"
[labels]
bench = "yes"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[sandbox]
work_dir = "{work}"
stop_grace = "2s"
pull = "never"
[policy]
allowed_images = ["{RUNNER_IMAGE}"]
"#,
                url = server.url(),
                state = dir.join("state").display(),
                ca = pki.ca_cert().display(),
                cert = paths.cert.display(),
                key = paths.key.display(),
                work = dir.join("work").display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new(exe("outpost-agent"))
            .arg("--config")
            .arg(&config)
            .env("OUTPOST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(AgentProc { child, dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        stop_child(&mut self.child)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`) or a count (`Threads`).
pub fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resets the process's peak resident size (`VmHWM`) to its current one.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// CPU time (user + system) the process used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at `)`.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// Raises this process's open-file limit to its hard limit (children
/// inherit it): thousands of sessions need thousands of sockets.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            getrlimit(Resource::RLIMIT_NOFILE)
                .map(|(s, _)| s)
                .unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// One line about the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {:.1} GiB, Linux {}",
        mem_kb as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

/// Runs `cmd` with stdout to /dev/null; how long it took. Fails if it fails.
pub fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let st = cmd.stdout(Stdio::null()).status()?;
    anyhow::ensure!(st.success(), "{cmd:?} failed: {st}");
    Ok(t.elapsed())
}

/// `outpost --state-dir S ARGS...` against `server`.
pub fn outpost_cli(server: &ServerProc, args: &[&str]) -> Command {
    let mut c = Command::new(exe("outpost"));
    c.arg("--state-dir")
        .arg(&server.state.root)
        .arg("--server")
        .arg(server.url())
        .args(args);
    c
}

/// Waits (bounded) until `path` exists.
pub fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
