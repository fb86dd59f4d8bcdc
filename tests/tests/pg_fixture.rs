//! The PostgreSQL fixture of the store tests (`outpost_tests::pg`) against a
//! real server: a fresh, isolated database per test on the shared cluster,
//! the purge of those of finished tests, and a dedicated cluster that stops, crashes and starts again under its
//! clients without losing a committed row.
//!
//! Without PostgreSQL these tests print `SKIPPED: ...` and pass, unless
//! `OUTPOST_REQUIRE_PG=1` (as in `scripts/test.sh`): then they fail.

use std::time::Instant;

use outpost_tests::{pg, require_pg};
use tokio_postgres::error::SqlState;

async fn write_row(c: &tokio_postgres::Client) {
    c.batch_execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, state INT NOT NULL)")
        .await
        .expect("create table");
    c.execute("INSERT INTO jobs VALUES ($1, $2)", &[&"job-1", &3_i32])
        .await
        .expect("insert");
}

async fn read_row(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT state FROM jobs WHERE id = $1", &[&"job-1"])
        .await
        .expect("select")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_cluster_gives_each_test_an_isolated_database() {
    let t = Instant::now();
    let server = require_pg!(pg::server().await);
    eprintln!("shared cluster ready in {:?}", t.elapsed());
    let t = Instant::now();
    let db = require_pg!(pg::database().await);
    eprintln!("database created in {:?}", t.elapsed());
    let prefix = format!("postgres://outpost@127.0.0.1:{}/", server.port());
    assert_eq!(db.url(), format!("{prefix}{}", db.name()));

    let c = db.connect().await.expect("connect");
    write_row(&c).await;
    assert_eq!(read_row(&c).await, 3);

    // Loopback only, no socket file, durable commits.
    for (setting, want) in [
        ("listen_addresses", "127.0.0.1"),
        ("unix_socket_directories", ""),
        ("fsync", "on"),
        ("synchronous_commit", "on"),
    ] {
        let got: String = c
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("show")
            .get(0);
        assert_eq!(got, want, "{setting}");
    }

    // Another database: another name, none of the first one's tables.
    let other = require_pg!(pg::database().await);
    assert_ne!(other.name(), db.name());
    let o = other
        .connect()
        .await
        .expect("connect to the other database");
    let e = o
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .expect_err("no table jobs in a new database");
    assert_eq!(e.code(), Some(&SqlState::UNDEFINED_TABLE), "{e}");
    assert_eq!(read_row(&c).await, 3, "the first database is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_drops_the_databases_of_dead_processes_only() {
    let server = require_pg!(pg::server().await);
    let mine = require_pg!(pg::database().await);
    // A pid above the kernel's maximum never runs.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("a number");
    let dead = format!("test_{}_0_0badcafe", pid_max + 1);
    let admin = pg::connect(&server.admin_url()).await.expect("admin");
    admin
        .batch_execute(&format!("CREATE DATABASE \"{dead}\""))
        .await
        .expect("create the database of a dead process");
    let exists = async |name: &str| -> bool {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .expect("count")
            .get(0);
        n == 1
    };

    let over = server.purge(usize::MAX).await.expect("purge");
    assert!(over.is_empty(), "under the threshold: {over:?}");
    assert!(exists(&dead).await);
    let dropped = server.purge(0).await.expect("purge");
    assert!(dropped.contains(&dead), "{dropped:?}");
    assert!(!exists(&dead).await, "{dead} still there");
    assert!(
        exists(mine.name()).await,
        "the database of a live test went"
    );
    let c = mine
        .connect()
        .await
        .expect("the live database still answers");
    write_row(&c).await;
    assert_eq!(read_row(&c).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_cluster_keeps_committed_rows_across_a_restart() {
    let t = Instant::now();
    let mut pgd = require_pg!(pg::dedicated().await);
    eprintln!("dedicated cluster ready in {:?}", t.elapsed());
    let url = pgd.url();
    assert_eq!(
        url,
        format!("postgres://outpost@127.0.0.1:{}/outpost", pgd.port())
    );
    let c = pgd.connect().await.expect("connect");
    write_row(&c).await;

    let t = Instant::now();
    pgd.stop().await.expect("fast shutdown");
    eprintln!("stopped in {:?}", t.elapsed());
    assert!(!pgd.is_running());
    assert!(c.is_closed() || c.query_one("SELECT 1", &[]).await.is_err());
    let down = pg::connect(&url).await;
    assert!(down.is_err(), "a connection while it is stopped");

    let t = Instant::now();
    pgd.start().await.expect("start again");
    eprintln!("started again in {:?}", t.elapsed());
    assert!(pgd.is_running());
    let c = pg::connect(&url)
        .await
        .expect("the same URL after the restart");
    assert_eq!(read_row(&c).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_cluster_recovers_committed_rows_after_a_crash_and_goes_on_drop() {
    let mut pgd = require_pg!(pg::dedicated().await);
    let c = pgd.connect().await.expect("connect");
    write_row(&c).await;

    let t = Instant::now();
    pgd.crash().await.expect("immediate shutdown");
    eprintln!("crashed in {:?}", t.elapsed());
    let t = Instant::now();
    pgd.start().await.expect("start after the crash");
    eprintln!("recovered in {:?}", t.elapsed());
    let c = pgd.connect().await.expect("reconnect");
    assert_eq!(read_row(&c).await, 3, "a committed row survives a crash");
    let log = std::fs::read_to_string(pgd.dir().join("server.log")).expect("server log");
    assert!(
        log.contains("not properly shut down"),
        "the restart recovered from the WAL: {log}"
    );

    let (dir, url) = (pgd.dir().to_owned(), pgd.url());
    drop(c);
    let t = Instant::now();
    drop(pgd);
    eprintln!("dropped in {:?}", t.elapsed());
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        pg::connect(&url).await.is_err(),
        "the server outlived its handle"
    );
}
