//! A throwaway PostgreSQL cluster for the store's tests: one per test
//! process (started on first use, on loopback, in a temporary directory),
//! a fresh database per test. A watcher process stops the cluster and
//! removes its directory once the test process is gone.
//!
//! The server binaries are `OUTPOST_PG_BIN`, else the newest
//! `/usr/lib/postgresql/<version>/bin`. Without PostgreSQL the tests print
//! `SKIPPED: <reason>` and pass, unless `OUTPOST_REQUIRE_PG=1`, where they
//! fail.
//!
//! [`tls_cluster`] starts a cluster of its own, serving TLS with a given
//! certificate, for the tests of `tls` (the shared one stays plain).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

struct Cluster {
    port: u16,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The server binaries: `OUTPOST_PG_BIN`, or the newest installed version.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OUTPOST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program args…`, as the `postgres` user when running as root (the
/// server refuses to run as root).
fn server_cmd(root: bool, program: &Path, dir: &Path) -> Command {
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(dir).stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// A server certificate and its key (PEM) for a cluster serving TLS.
pub(crate) struct ServerTls<'a> {
    pub(crate) cert_pem: &'a [u8],
    pub(crate) key_pem: &'a [u8],
}

/// Starts a new cluster with `ssl=on` and `tls`'s certificate; its port.
/// It stops once the test process is gone, like the shared one.
pub(crate) fn tls_cluster(tls: &ServerTls<'_>) -> Result<u16, String> {
    start(Some(tls)).map(|c| c.port)
}

/// Writes the server's certificate and key into the cluster's data
/// directory (the server's default file names), owned by the server's user.
fn install_tls(root: bool, data: &Path, tls: &ServerTls<'_>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for (name, pem, mode) in [
        ("server.crt", tls.cert_pem, 0o644),
        ("server.key", tls.key_pem, 0o600),
    ] {
        let path = data.join(name);
        std::fs::write(&path, pem).map_err(|e| format!("write {name}: {e}"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {name}: {e}"))?;
        if root {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&path);
            run(chown, "chown the server's TLS files to postgres")?;
        }
    }
    Ok(())
}

fn start(tls: Option<&ServerTls<'_>>) -> Result<Cluster, String> {
    let bin = bin_dir().ok_or("no PostgreSQL server binaries (initdb) found")?;
    let root = is_root();
    // Removed on failure; kept (for the watcher to remove) once started.
    let tmp = tempfile::Builder::new()
        .prefix("outpost-pg-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let dir = tmp.path().to_path_buf();
    if root {
        let mut chown = Command::new("chown");
        chown.arg("postgres:postgres").arg(&dir);
        run(chown, "chown the cluster directory to postgres")?;
    }
    let data = dir.join("data");
    let mut initdb = server_cmd(root, &bin.join("initdb"), &dir);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
    run(initdb, "initdb")?;
    let ssl = match tls {
        Some(tls) => {
            install_tls(root, &data, tls)?;
            " -c ssl=on"
        }
        None => "",
    };
    let port = free_port()?;
    let mut pg_ctl = server_cmd(root, &bin.join("pg_ctl"), &dir);
    pg_ctl
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("log"))
        .args(["-w", "-t", "30", "-o"])
        .arg(format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=300{ssl}",
            dir.display()
        ))
        .arg("start");
    run(pg_ctl, "pg_ctl start")?;
    let _ = tmp.keep();
    // Stops the cluster and removes it once this process is gone.
    let stop = format!(
        "{}{} -D {} -m immediate stop",
        if root { "runuser -u postgres -- " } else { "" },
        bin.join("pg_ctl").display(),
        data.display()
    );
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; cd /; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cluster watcher: {e}"))?;
    Ok(Cluster { port })
}

/// The URL of a new, empty database; `None` (after printing why) if
/// PostgreSQL cannot run here and it is not required.
pub(crate) async fn fresh_db() -> Option<String> {
    let cluster = CLUSTER.get_or_init(|| start(None));
    let port = match cluster {
        Ok(c) => c.port,
        Err(why) => {
            if std::env::var("OUTPOST_REQUIRE_PG").as_deref() == Ok("1") {
                panic!("PostgreSQL is required (OUTPOST_REQUIRE_PG=1) but cannot start: {why}");
            }
            println!("SKIPPED: {why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
    };
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let admin = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("connect to the test cluster");
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    drop(client);
    let _ = task.await;
    Some(format!(
        "host=127.0.0.1 port={port} user=postgres dbname={name}"
    ))
}
