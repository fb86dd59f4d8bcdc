//! Throwaway PostgreSQL servers for the tests of the PostgreSQL store: the
//! distribution's own `initdb` and `postgres` (`scripts/setup.sh` installs
//! them), run by the tests themselves. Every cluster listens on 127.0.0.1
//! only (no Unix socket), lets its superuser [`USER`] in without a password
//! from loopback only, and keeps `fsync` on, like a real deployment.
//!
//! - [`database`]: a fresh, uniquely named database on the *shared* cluster
//!   (kept after the test, see [`Database`]). nextest runs every test in a
//!   process of its own and `initdb` plus a start take about a second, so
//!   one cluster serves every test process of a workspace: it lives in a
//!   directory keyed by user and workspace under the temporary directory
//!   ([`shared_dir`]), the first test that needs it creates and starts it
//!   (in a process group of its own) under a `flock`, later ones find it
//!   running. It stays up after the tests (the next run reuses it) until
//!   `outpost-test-pg stop` stops it and deletes its directory;
//!   `scripts/test.sh` runs that before and after the suite, so every run of
//!   the suite starts from a fresh cluster. A cluster found stopped is
//!   recreated, never restarted.
//! - [`dedicated`]: a cluster of one test's own, to stop and start under a
//!   running control plane. Its `postgres` is a child of the test process
//!   (a killed test takes it along); it stops and its directory goes on drop.
//! - [`require`] and [`require_pg!`](crate::require_pg): the skip policy.
//!   Without PostgreSQL a test prints `SKIPPED: ...` and returns, unless
//!   `OUTPOST_REQUIRE_PG=1` (`scripts/test.sh` sets it): then it fails.
//!
//! `initdb` and `postgres` refuse to run as root: as root (CI) they run as
//! the `postgres` user the package creates, which owns the clusters' files.
//!
//! Environment: `OUTPOST_REQUIRE_PG` ([`REQUIRE_ENV`]), `OUTPOST_PG_BIN`
//! (the directory of `initdb` and `postgres`, [`BIN_ENV`]), `OUTPOST_PG_DIR`
//! (the shared cluster's directory, [`DIR_ENV`]).

mod cluster;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use cluster::{POLL, START_LIMIT, Toolkit, alive, free_port, lock, running, shutdown, tail};

/// `1`: a test that needs PostgreSQL fails instead of skipping without it.
pub const REQUIRE_ENV: &str = "OUTPOST_REQUIRE_PG";
/// The directory of `initdb` and `postgres`, instead of looking for them.
pub const BIN_ENV: &str = "OUTPOST_PG_BIN";
/// The shared cluster's directory, instead of [`shared_dir`]'s default.
pub const DIR_ENV: &str = "OUTPOST_PG_DIR";
/// The superuser of every test cluster.
pub const USER: &str = "outpost";

/// A connection, and one statement of the fixture.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Test databases of dead processes kept before a purge (7.5 MB each).
const PURGE_OVER: usize = 32;

/// Why no PostgreSQL server is available to a test.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

fn unavailable(msg: impl Into<String>) -> Unavailable {
    Unavailable(msg.into())
}

/// `Some(value)`, or, without PostgreSQL, `None` after printing `SKIPPED:`
/// with the reason; a panic instead when `OUTPOST_REQUIRE_PG=1`.
#[track_caller]
pub fn require<T>(r: Result<T, Unavailable>) -> Option<T> {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    require_if(r, required)
}

/// [`require`] with the policy given: `required` panics instead of skipping.
#[track_caller]
pub fn require_if<T>(r: Result<T, Unavailable>, required: bool) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if required => {
            panic!("PostgreSQL is required ({REQUIRE_ENV}=1) but unavailable: {e}")
        }
        Err(e) => {
            let at = std::panic::Location::caller();
            let test = std::thread::current().name().unwrap_or("?").to_string();
            eprintln!(
                "SKIPPED: {test} ({at}) needs PostgreSQL, unavailable because {e} \
                 (set {REQUIRE_ENV}=1 to fail instead)"
            );
            None
        }
    }
}

/// The value of a fixture, or `return` from the test (skipped) without
/// PostgreSQL: `let db = require_pg!(pg::database().await);`.
#[macro_export]
macro_rules! require_pg {
    ($fixture:expr) => {
        match $crate::pg::require($fixture) {
            Some(v) => v,
            None => return,
        }
    };
}

/// Connects to `url` (bounded), driving the connection on a task of the
/// current runtime.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut cfg: tokio_postgres::Config = url.parse()?;
    cfg.connect_timeout(CONNECT_LIMIT);
    let (client, conn) = tokio::time::timeout(CONNECT_LIMIT, cfg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| anyhow::anyhow!("no connection to {url} within {CONNECT_LIMIT:?}"))??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn url(port: u16, db: &str) -> String {
    format!("postgres://{USER}@127.0.0.1:{port}/{db}")
}

// ---------------------------------------------------------------- shared

/// The shared cluster of this workspace's tests (see the module's docs).
#[derive(Debug, Clone)]
pub struct Server {
    port: u16,
    dir: PathBuf,
}

impl Server {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://outpost@127.0.0.1:PORT/<db>`.
    pub fn url(&self, db: &str) -> String {
        url(self.port, db)
    }

    /// The URL of its `postgres` database, for administration.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// Its directory: `data/` and the server's log `server.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new empty database, uniquely named, dropped with the handle.
    pub async fn create_database(&self) -> Result<Database, Unavailable> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "test_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let admin = self.admin_url();
        let create = async {
            let c = connect(&admin).await?;
            c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(CONNECT_LIMIT, create)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_LIMIT:?}"))
            .and_then(|r| r)
            .map_err(|e| {
                unavailable(format!(
                    "CREATE DATABASE on the shared cluster ({admin}) failed: {e:#}"
                ))
            })?;
        Ok(Database {
            url: self.url(&name),
            name,
        })
    }

    /// Drops the test databases of processes that are gone, if there are
    /// more than `keep` of them; the names dropped.
    pub async fn purge(&self, keep: usize) -> anyhow::Result<Vec<String>> {
        let c = connect(&self.admin_url()).await?;
        let rows = c
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'test\\_%'",
                &[],
            )
            .await?;
        let dead: Vec<String> = rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|n| creator(n).is_some_and(|pid| !alive(pid)))
            .collect();
        if dead.len() <= keep {
            return Ok(Vec::new());
        }
        // Another process may purge the same ones: each drop on its own.
        let (mut failed, limit) = (Vec::new(), CONNECT_LIMIT * 3);
        for name in &dead {
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            match tokio::time::timeout(limit, c.batch_execute(&sql)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("{name}: {e}")),
                Err(_) => failed.push(format!("{name}: no answer within {limit:?}")),
            }
        }
        anyhow::ensure!(failed.is_empty(), "not dropped: {}", failed.join("; "));
        Ok(dead)
    }
}

/// The pid of the process that created test database `name`.
fn creator(name: &str) -> Option<i32> {
    name.strip_prefix("test_")?.split('_').next()?.parse().ok()
}

/// A database of one test on the shared cluster, named
/// `test_<pid>_<n>_<random>`. It stays after the test: dropping a database
/// forces a checkpoint, which syncs every other test's new database to disk
/// and stalls them all (seconds with a few tests in parallel). Databases of
/// dead processes go in batches ([`Server::purge`]), or all at once with
/// the cluster (`outpost-test-pg stop`).
#[derive(Debug)]
pub struct Database {
    name: String,
    url: String,
}

impl Database {
    /// `postgres://outpost@127.0.0.1:PORT/<name>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

/// A fresh database on the shared cluster, which starts if need be.
pub async fn database() -> Result<Database, Unavailable> {
    server().await?.create_database().await
}

/// The shared cluster, started by this process or found running; the
/// outcome (a failure too) is kept for the whole process.
pub async fn server() -> Result<&'static Server, Unavailable> {
    static SHARED: tokio::sync::OnceCell<Result<Server, Unavailable>> =
        tokio::sync::OnceCell::const_new();
    SHARED
        .get_or_init(|| async {
            let s = tokio::task::spawn_blocking(start_shared)
                .await
                .map_err(|e| unavailable(format!("starting the shared cluster: {e}")))??;
            connect(&s.admin_url()).await.map_err(|e| {
                unavailable(format!(
                    "the shared cluster in {} does not answer: {e:#}; its log: {}",
                    s.dir.display(),
                    tail(&s.dir.join("server.log"))
                ))
            })?;
            if let Err(e) = s.purge(PURGE_OVER).await {
                eprintln!("warning: purging the databases of finished tests: {e:#}");
            }
            Ok(s)
        })
        .await
        .as_ref()
        .map_err(Clone::clone)
}

/// The shared cluster's directory: `$OUTPOST_PG_DIR`, or
/// `<tmp>/outpost-pg-<uid>-<hash of this workspace's path>`.
pub fn shared_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(DIR_ENV).filter(|d| !d.is_empty()) {
        // Absolute: the server's command line names it, and runs elsewhere.
        let d = PathBuf::from(d);
        return std::path::absolute(&d).unwrap_or(d);
    }
    // FNV-1a: the same name for every binary and toolchain.
    let hash = env!("CARGO_MANIFEST_DIR")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let uid = nix::unistd::geteuid();
    std::env::temp_dir().join(format!("outpost-pg-{uid}-{hash:016x}"))
}

/// Finds the shared cluster running, or creates and starts it (blocking).
pub fn start_shared() -> Result<Server, Unavailable> {
    let kit = Toolkit::find()?;
    let dir = shared_dir();
    kit.prepare_dir(&dir)?;
    let _lock = lock(&dir.join("lock"))?;
    if let Some(pid) = running(&dir.join("data")) {
        return Ok(Server {
            port: pid.port,
            dir,
        });
    }
    let data = dir.join("data");
    if data.exists() {
        fs::remove_dir_all(&data)
            .map_err(|e| unavailable(format!("removing {}: {e}", data.display())))?;
    }
    kit.initdb(&dir)?;
    let mut last = unavailable("no attempt");
    for _ in 0..3 {
        let port = free_port()?;
        match kit.spawn(&dir, port, true) {
            // Detached: it outlives this process, on purpose.
            Ok(_child) => return Ok(Server { port, dir }),
            Err(e) => last = e, // most likely the port was taken meanwhile
        }
    }
    Err(last)
}

/// Stops the shared cluster if it runs (fast shutdown, bounded) and deletes
/// its directory; whether it was running.
pub fn stop_shared() -> Result<bool, Unavailable> {
    let dir = shared_dir();
    if !dir.exists() {
        return Ok(false);
    }
    let lock = lock(&dir.join("lock"))?;
    let was = running(&dir.join("data"));
    if let Some(p) = &was {
        let pid = Pid::from_raw(p.pid);
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + START_LIMIT;
        while alive(p.pid) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if alive(p.pid) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
    drop(lock);
    fs::remove_dir_all(&dir)
        .map_err(|e| unavailable(format!("removing {}: {e}", dir.display())))?;
    Ok(was.is_some())
}

// ------------------------------------------------------------- dedicated

/// A cluster of one test's own (database `outpost`), to stop and start;
/// stopped (immediate shutdown) and deleted on drop.
#[derive(Debug)]
pub struct Dedicated {
    kit: Toolkit,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

/// A new cluster of the test's own, running, with an empty database
/// `outpost`; it keeps its port across [`Dedicated::stop`] and
/// [`Dedicated::start`].
pub async fn dedicated() -> Result<Dedicated, Unavailable> {
    let d = tokio::task::spawn_blocking(|| {
        let kit = Toolkit::find()?;
        let dir = tempfile::Builder::new()
            .prefix("outpost-pg-dedicated-")
            .tempdir()
            .map_err(|e| unavailable(format!("a temporary directory: {e}")))?;
        kit.own(dir.path())?;
        kit.initdb(dir.path())?;
        let port = free_port()?;
        let child = kit.spawn(dir.path(), port, false)?;
        Ok::<_, Unavailable>(Dedicated {
            kit,
            dir,
            port,
            child: Some(child),
        })
    })
    .await
    .map_err(|e| unavailable(format!("starting a dedicated cluster: {e}")))??;
    let c = connect(&d.admin_url())
        .await
        .map_err(|e| unavailable(format!("a dedicated cluster does not answer: {e:#}")))?;
    c.batch_execute("CREATE DATABASE outpost")
        .await
        .map_err(|e| unavailable(format!("CREATE DATABASE on a dedicated cluster: {e}")))?;
    Ok(d)
}

impl Dedicated {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://outpost@127.0.0.1:PORT/outpost`.
    pub fn url(&self) -> String {
        url(self.port, "outpost")
    }

    pub fn admin_url(&self) -> String {
        url(self.port, "postgres")
    }

    /// Its directory: `data/` and the server's log `server.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url()).await
    }

    /// Fast shutdown (sessions ended, a checkpoint), waited for (bounded).
    pub async fn stop(&mut self) -> Result<(), Unavailable> {
        self.shutdown(Signal::SIGINT).await
    }

    /// Immediate shutdown, as after a crash: no checkpoint, the next start
    /// recovers from the WAL.
    pub async fn crash(&mut self) -> Result<(), Unavailable> {
        self.shutdown(Signal::SIGQUIT).await
    }

    /// Starts it again on the same port; ready when this returns.
    pub async fn start(&mut self) -> Result<(), Unavailable> {
        if self.child.is_some() {
            return Ok(());
        }
        let (kit, dir, port) = (self.kit.clone(), self.dir.path().to_owned(), self.port);
        let child = tokio::task::spawn_blocking(move || kit.spawn(&dir, port, false))
            .await
            .map_err(|e| unavailable(format!("restarting a dedicated cluster: {e}")))??;
        self.child = Some(child);
        Ok(())
    }

    async fn shutdown(&mut self, signal: Signal) -> Result<(), Unavailable> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || shutdown(child, signal))
            .await
            .map_err(|e| unavailable(format!("stopping a dedicated cluster: {e}")))?
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        if let Some(child) = self.child.take()
            && let Err(e) = shutdown(child, Signal::SIGQUIT)
        {
            eprintln!("warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_databases_name_their_creator() {
        assert_eq!(creator("test_4242_0_0badcafe"), Some(4242));
        assert_eq!(creator("test_x_0_0badcafe"), None);
        assert_eq!(creator("outpost"), None);
    }

    #[test]
    fn unavailable_skips_unless_required() {
        assert_eq!(require_if(Ok(7), true), Some(7));
        assert_eq!(require_if::<u8>(Err(unavailable("no initdb")), false), None);
        let required =
            std::panic::catch_unwind(|| require_if::<u8>(Err(unavailable("no initdb")), true));
        let msg = required.expect_err("panics when required");
        let msg = msg.downcast_ref::<String>().expect("a formatted message");
        assert!(
            msg.contains("OUTPOST_REQUIRE_PG=1") && msg.contains("no initdb"),
            "{msg}"
        );
    }

    #[test]
    fn shared_dir_is_stable_and_per_user() {
        assert_eq!(shared_dir(), shared_dir());
        if std::env::var_os(DIR_ENV).is_none() {
            let name = shared_dir()
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned();
            let uid = nix::unistd::geteuid();
            assert!(name.starts_with(&format!("outpost-pg-{uid}-")), "{name}");
        }
    }
}
