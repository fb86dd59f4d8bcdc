//! TLS against real PostgreSQL servers: a cluster of its own serving TLS
//! with a certificate of the project's PKI, and the shared plain cluster.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::params::split;
use super::*;
use crate::pki::PkiDir;
use crate::store::Store;
use crate::store::postgres::testdb;

/// Every message of an error's chain.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A CA and a server certificate for localhost, 127.0.0.1 and ::1.
fn pki(tmp: &Path, name: &str) -> PkiDir {
    let pki = PkiDir::new(tmp.join(name));
    pki.init(&[]).unwrap();
    pki
}

/// Whether the server serves this session over TLS (`pg_stat_ssl`).
async fn session_ssl(s: &Store) -> bool {
    let c = s.pg().unwrap().get().await.unwrap();
    c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[test]
fn tls_params_are_taken_out_of_both_url_forms() {
    let s = split(
        "postgres://u:p@db:5432/o?sslmode=require&sslrootcert=%2Fetc%2Fca%20x.pem&application_name=a",
    )
    .unwrap();
    assert_eq!(
        s.rest,
        "postgres://u:p@db:5432/o?sslmode=require&application_name=a"
    );
    assert_eq!(s.root_cert, Some(PathBuf::from("/etc/ca x.pem")));
    assert!(!s.verify);

    let s = split("postgresql://db/o?application_name=a&sslmode=verify-full&sslrootcert=/ca.pem")
        .unwrap();
    assert_eq!(s.rest, "postgresql://db/o?application_name=a");
    assert_eq!(s.root_cert, Some(PathBuf::from("/ca.pem")));
    assert!(s.verify);

    let s = split("postgres://db/o?sslrootcert=/ca.pem").unwrap();
    assert_eq!(s.rest, "postgres://db/o");

    let s = split("host=db sslrootcert='/a b/c\\'a.pem' dbname=o sslmode=verify-ca").unwrap();
    assert_eq!(s.root_cert, Some(PathBuf::from("/a b/c'a.pem")));
    assert!(s.verify);
    let cfg: tokio_postgres::Config = s.rest.parse().unwrap();
    assert_eq!(cfg.get_dbname(), Some("o"));

    let s = split("host=db dbname=o").unwrap();
    assert_eq!(
        (s.rest.as_str(), s.root_cert, s.verify),
        ("host=db dbname=o", None, false)
    );
    assert!(split("postgres://db/o?sslrootcert=%zz").is_err());
    assert!(split("host=db sslrootcert='/ca.pem").is_err());

    // A string that is no URL at all gets tokio-postgres's error.
    assert!(matches!(
        target_with("not a url at all", None),
        Err(TlsSetupError::Url(_))
    ));
    // verify-* means require; the URL parses with the rest.
    let t = target_with("postgres://db/o?sslmode=verify-full", None).unwrap();
    assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
    // A CA file is read only when TLS may be used.
    let t = target_with(
        "host=db sslmode=disable sslrootcert=/nonexistent/ca.pem",
        None,
    );
    assert_eq!(t.unwrap().config.get_ssl_mode(), SslMode::Disable);
    let err = target_with("host=db sslrootcert=/nonexistent/ca.pem", None)
        .err()
        .unwrap();
    assert!(
        chain(&err).contains("/nonexistent/ca.pem"),
        "{}",
        chain(&err)
    );
}

#[tokio::test]
async fn tls_to_postgres_is_verified_against_the_ca_and_seen_by_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let good = pki(tmp.path(), "good");
    let wrong = pki(tmp.path(), "wrong");
    let server = good.server();
    let cert_pem = std::fs::read(&server.cert).unwrap();
    let key_pem = std::fs::read(&server.key).unwrap();
    let port = match testdb::tls_cluster(&testdb::ServerTls {
        cert_pem: &cert_pem,
        key_pem: &key_pem,
    }) {
        Ok(p) => p,
        Err(why) => {
            if std::env::var("OUTPOST_REQUIRE_PG").as_deref() == Ok("1") {
                panic!("PostgreSQL is required (OUTPOST_REQUIRE_PG=1) but cannot start: {why}");
            }
            println!("SKIPPED: {why}");
            return;
        }
    };
    let ca = good.ca_cert();
    let url = |mode: &str, ca: &Path| {
        format!(
            "postgres://postgres@127.0.0.1:{port}/postgres?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };

    // sslmode=require: TLS, verified, and the server says so.
    let s = Store::postgres(&url("require", &ca)).await.unwrap();
    assert!(session_ssl(&s).await, "the server sees a plain session");
    s.insert_job("over-tls".into(), crate::store::conformance::spec())
        .await
        .unwrap();
    // prefer: TLS when offered, verified the same way.
    let p = Store::postgres(&url("prefer", &ca)).await.unwrap();
    assert!(session_ssl(&p).await);
    assert!(p.get_job("over-tls".into()).await.unwrap().is_some());
    // The key-value form, with the host's name (verify-full).
    let kv = format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{}'",
        ca.display()
    );
    assert!(session_ssl(&Store::postgres(&kv).await.unwrap()).await);
    // The CA file from the environment's default when the URL has none.
    let t = target_with(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require"),
        Some(ca.clone()),
    )
    .unwrap();
    let (client, conn) = t.config.connect(t.tls.clone()).await.unwrap();
    let task = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    drop(client);
    let _ = task.await;

    // The replicas' channel connects the same way.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (_bus, _rx) =
        crate::replicas::Bus::start(&url("require", &ca), "tls-test".into(), shutdown.clone())
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let c = s.pg().unwrap().get().await.unwrap();
    loop {
        let row = c
            .query_opt(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.query LIKE 'LISTEN %'",
                &[],
            )
            .await
            .unwrap();
        if let Some(r) = row {
            assert!(r.get::<_, bool>(0), "the replica channel is not on TLS");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica channel never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();

    // Another CA: refused, in either mode, naming the CA file.
    for mode in ["require", "prefer"] {
        let started = Instant::now();
        let err = Store::postgres(&url(mode, &wrong.ca_cert()))
            .await
            .err()
            .unwrap();
        let msg = chain(&err);
        assert!(
            msg.contains(&format!(
                "its certificate was checked against the CA file {}",
                wrong.ca_cert().display()
            )),
            "{msg}"
        );
        // Both CAs are named "Outpost CA": the chain fails on the
        // signature.
        assert!(msg.contains("invalid peer certificate"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // The right CA but another name: refused.
    let err = Store::postgres(&format!(
        "host=db.example hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require sslrootcert={}",
        ca.display()
    ))
    .await
    .err()
    .unwrap();
    let msg = chain(&err);
    assert!(
        msg.contains("TLS handshake with the PostgreSQL server db.example"),
        "{msg}"
    );
    assert!(
        msg.contains("its certificate does not name db.example"),
        "{msg}"
    );
}

#[tokio::test]
async fn tls_modes_against_a_server_without_tls() {
    let Some(url) = testdb::fresh_db().await else {
        return;
    };
    // The shared cluster has no TLS: require refuses, prefer and disable
    // connect in plain.
    let err = Store::postgres(&format!("{url} sslmode=require"))
        .await
        .err()
        .unwrap();
    assert!(
        chain(&err).contains("server does not support TLS"),
        "{}",
        chain(&err)
    );
    for mode in ["prefer", "disable"] {
        let s = Store::postgres(&format!("{url} sslmode={mode}"))
            .await
            .unwrap();
        assert!(!session_ssl(&s).await, "{mode}");
    }
}
