use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::store::conformance::conformance;

conformance! {
    a_token_enrols_once_and_its_certificate_names_agent_and_pool =>
        sqlite_a_token_enrols_once_and_its_certificate_names_agent_and_pool,
        postgres_a_token_enrols_once_and_its_certificate_names_agent_and_pool;
    refused_enrolments_consume_nothing =>
        sqlite_refused_enrolments_consume_nothing,
        postgres_refused_enrolments_consume_nothing;
    an_expired_token_is_refused =>
        sqlite_an_expired_token_is_refused,
        postgres_an_expired_token_is_refused;
    labels_are_bound_and_revocation_survives_a_restart =>
        sqlite_labels_are_bound_and_revocation_survives_a_restart,
        postgres_labels_are_bound_and_revocation_survives_a_restart;
    identity_records_are_kept =>
        sqlite_identity_records_are_kept,
        postgres_identity_records_are_kept;
}

/// An RSA-1024 request for `a1` (made with `openssl req -newkey rsa:1024`).
const RSA_1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIIBTDCBtgIBADANMQswCQYDVQQDDAJhMTCBnzANBgkqhkiG9w0BAQEFAAOBjQAw
gYkCgYEA0YasR70TO7abLg6gZBtb+bTeYm7jcQW/1ASKNQySWsuXBEjqHDJMLLCV
nJTNTo82jBES2/03xiRQ5hrt8Lf1NS4gEOXGia08IBhj6bARxF2g0bU4wAdI1W3r
R+lDxKZS8cQppRtqc1oHJYks3+2U6ILVgPeXb2+M7z0XySwC6kMCAwEAAaAAMA0G
CSqGSIb3DQEBCwUAA4GBACtOnLX3H6DtwvE0j5ZpyJqc1bIdY5aff7WYjZVcNcnq
+b6KoR+xkJiL3Ijg44BN3KvobNrAMMtpJ2Oe37BiHrVqS3ui0bB2NYy68v2W8drO
sLQGp+G4RHAvgsc0wC8zj2DqkRpIsmWhIhwb22ypxqg0faqyqt7qZA+c2oF79KiN
-----END CERTIFICATE REQUEST-----
";

fn csr(name: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// A registry on `store` with the CA in `dir` (made on first use).
async fn registry_on(store: Store, dir: &std::path::Path) -> Arc<Registry> {
    let pki = PkiDir::new(dir.join("pki"));
    if !pki.has_ca() {
        pki.init(&[]).unwrap();
    }
    Registry::load(
        store,
        &pki,
        IdentityConfig {
            agent_cert_ttl: Duration::from_secs(10),
        },
    )
    .await
    .unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A token of pool `tf` with these labels, lifetime, uses and agent name
/// (empty: any).
async fn tf_token(
    r: &Registry,
    labels_: &[(&str, &str)],
    ttl: Duration,
    uses: u32,
    agent: &str,
) -> Created {
    r.create("tf".into(), labels(labels_), ttl, uses, agent.into())
        .await
        .unwrap()
}

async fn a_token_enrols_once_and_its_certificate_names_agent_and_pool(s: Store) {
    let dir = tempfile::tempdir().unwrap();
    let r = registry_on(s.clone(), dir.path()).await;
    let t = tf_token(&r, &[("env", "prod")], Duration::from_secs(60), 1, "").await;
    let issued = r.enroll(&t.token, "a1", &csr("a1")).await.unwrap();
    assert_eq!(issued.pool, "tf");
    assert_eq!(issued.ttl, Duration::from_secs(10));
    let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).unwrap();
    let id = crate::identity::Identity::from_der(&pem.contents).unwrap();
    assert_eq!(
        (id.role, id.name.as_str()),
        (crate::identity::Role::Agent, "a1")
    );
    let cert = pem.parse_x509().unwrap();
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert!(
        uris.iter().any(|u| u.contains("urn:outpost:pool:tf")),
        "{uris:?}"
    );
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!((10..=12).contains(&life), "{life}");
    // Reuse, a wrong token: refused with what to do.
    let e = r.enroll(&t.token, "a2", &csr("a2")).await.unwrap_err();
    assert!(matches!(e, EnrollError::TokenUsed), "{e}");
    assert!(e.to_string().contains("outpost enroll create"), "{e}");
    let e = r.enroll("opb_nope", "a2", &csr("a2")).await.unwrap_err();
    assert!(matches!(e, EnrollError::UnknownToken), "{e}");
}

async fn refused_enrolments_consume_nothing(s: Store) {
    let dir = tempfile::tempdir().unwrap();
    let r = registry_on(s.clone(), dir.path()).await;
    let t = tf_token(&r, &[], Duration::from_secs(60), 1, "a1").await;
    // Another name than the token allows.
    let e = r.enroll(&t.token, "a2", &csr("a2")).await.unwrap_err();
    assert!(matches!(e, EnrollError::NameNotAllowed { .. }), "{e}");
    // A CSR for another name than the one asked for.
    let e = r.enroll(&t.token, "a1", &csr("other")).await.unwrap_err();
    assert!(matches!(e, EnrollError::CsrName { .. }), "{e}");
    // A weak key: refused, naming the key.
    let e = r.enroll(&t.token, "a1", RSA_1024_CSR).await.unwrap_err();
    assert!(e.to_string().contains("RSA (1024 bits)"), "{e}");
    let e = r.enroll(&t.token, "a1", "not a csr").await.unwrap_err();
    assert!(matches!(e, EnrollError::BadCsr(_)), "{e}");
    let e = r.enroll(&t.token, "../x", &csr("../x")).await.unwrap_err();
    assert!(matches!(e, EnrollError::BadName(_)), "{e}");
    // The token still works.
    r.enroll(&t.token, "a1", &csr("a1")).await.unwrap();
}

async fn an_expired_token_is_refused(s: Store) {
    let dir = tempfile::tempdir().unwrap();
    let r = registry_on(s.clone(), dir.path()).await;
    let t = tf_token(&r, &[], Duration::from_millis(1), 1, "").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let e = r.enroll(&t.token, "a1", &csr("a1")).await.unwrap_err();
    assert!(matches!(e, EnrollError::TokenExpired { .. }), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
}

async fn labels_are_bound_and_revocation_survives_a_restart(s: Store) {
    let dir = tempfile::tempdir().unwrap();
    let r = registry_on(s.clone(), dir.path()).await;
    let t = tf_token(&r, &[("env", "prod")], Duration::from_secs(60), 2, "").await;
    r.enroll(&t.token, "a1", &csr("a1")).await.unwrap();
    let (kept, ignored) = r.bound_labels("a1", labels(&[("env", "prod"), ("gpu", "yes")]));
    assert_eq!(kept, labels(&[("env", "prod")]));
    assert_eq!(ignored, vec!["gpu=yes".to_string()]);
    let (kept, _) = r.bound_labels("a1", labels(&[("env", "dev")]));
    assert!(kept.is_empty());
    // A certificate issued by hand keeps its claims.
    let (kept, ignored) = r.bound_labels("manual", labels(&[("gpu", "yes")]));
    assert_eq!((kept.len(), ignored.len()), (1, 0));

    r.renew("a1", &csr("a1")).await.unwrap();
    let e = r.renew("a1", &csr("a2")).await.unwrap_err();
    assert!(matches!(e, EnrollError::CsrName { .. }), "{e}");
    let e = r.renew("manual", &csr("manual")).await.unwrap_err();
    assert!(matches!(e, EnrollError::NotEnrolled(_)), "{e}");
    let changes = r.revocations();
    r.revoke("a1").await.unwrap();
    assert!(changes.has_changed().unwrap());
    assert!(r.is_revoked("a1"));
    let e = r.renew("a1", &csr("a1")).await.unwrap_err();
    assert!(matches!(e, EnrollError::Revoked { .. }), "{e}");
    // Re-enrolling a revoked name is refused, the token's use kept.
    let e = r.enroll(&t.token, "a1", &csr("a1")).await.unwrap_err();
    assert!(matches!(e, EnrollError::Revoked { .. }), "{e}");
    let e = r.revoke("never-seen").await.unwrap_err();
    assert!(e.to_string().contains("no agent named"), "{e}");
    drop(r);
    let r = registry_on(s, dir.path()).await;
    assert!(r.is_revoked("a1"));
    assert!(!r.is_revoked("a2"));
    r.enroll(&t.token, "a2", &csr("a2")).await.unwrap();
}

/// What the store keeps of identities, below the registry.
async fn identity_records_are_kept(s: Store) {
    registry_on(s.clone(), tempfile::tempdir().unwrap().path()).await;
    // An agent that only connected (its certificate issued by hand) is
    // known; revoking it records its name.
    assert!(!store::known_agent(&s, "manual".into()).await.unwrap());
    s.upsert_agent(crate::model::AgentInfo {
        id: "manual".into(),
        version: "1".into(),
        labels: BTreeMap::new(),
        capacity: 1,
        draining: false,
        last_seen_ms: crate::model::now_ms(),
    })
    .await
    .unwrap();
    assert!(store::known_agent(&s, "manual".into()).await.unwrap());
    let first = store::revoke(&s, "manual".into(), 1_000).await.unwrap();
    assert_eq!((first.revoked_ms, first.enrolled()), (1_000, false));
    // Revoking twice keeps the first time.
    let again = store::revoke(&s, "manual".into(), 2_000).await.unwrap();
    assert_eq!(again.revoked_ms, 1_000);
    // An enrolment records pool, labels and expiry; a renewal the new expiry.
    store::insert_enrollment(
        &s,
        store::NewEnrollment {
            id: "e1".into(),
            token_hash: "h1".into(),
            pool: "tf".into(),
            labels: labels(&[("env", "prod")]),
            agent_name: String::new(),
            uses: 1,
            expires_ms: crate::model::now_ms() + 60_000,
        },
    )
    .await
    .unwrap();
    let (consumed, out) = store::enroll(&s, "h1".into(), "b1".into(), |c| {
        assert_eq!(c.pool, "tf");
        Ok(("signed", 5_000))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!((consumed.enrollment_id.as_str(), out), ("e1", "signed"));
    let e = store::enroll(&s, "h1".into(), "b2".into(), |_| Ok(((), 1)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, EnrollError::TokenUsed), "{e}");
    // A signing failure inside the transaction consumes nothing.
    store::insert_enrollment(
        &s,
        store::NewEnrollment {
            id: "e2".into(),
            token_hash: "h2".into(),
            pool: "tf".into(),
            labels: BTreeMap::new(),
            agent_name: String::new(),
            uses: 1,
            expires_ms: crate::model::now_ms() + 60_000,
        },
    )
    .await
    .unwrap();
    let e = store::enroll(&s, "h2".into(), "b2".into(), |_| {
        Err::<((), i64), _>(EnrollError::Internal("no signer".into()))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(e, EnrollError::Internal(_)), "{e}");
    assert!(store::get(&s, "b2".into()).await.unwrap().is_none());
    store::enroll(&s, "h2".into(), "b2".into(), |_| Ok(((), 1)))
        .await
        .unwrap()
        .unwrap();
    store::renewed(&s, "b1".into(), 9_000).await.unwrap();
    let b1 = store::get(&s, "b1".into()).await.unwrap().unwrap();
    assert_eq!(
        (
            b1.pool.as_str(),
            &b1.labels,
            b1.cert_not_after_ms,
            b1.revoked_ms
        ),
        ("tf", &labels(&[("env", "prod")]), 9_000, 0)
    );
    assert!(store::get(&s, "nobody".into()).await.unwrap().is_none());
    let names: Vec<String> = store::list(&s)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["b1", "b2", "manual"]);
}

/// Several replicas (registries on their own handles of one PostgreSQL
/// database).
mod replicas {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::{EnrollError, Registry, csr, labels, registry_on, tf_token};
    use crate::replicas::Bus;
    use crate::store::Store;
    use crate::store::postgres::testdb::fresh_db;

    /// Two registries on two handles of a fresh database, sharing one CA.
    async fn two() -> Option<(Arc<Registry>, Arc<Registry>, String, tempfile::TempDir)> {
        let url = fresh_db().await?;
        let dir = tempfile::tempdir().unwrap();
        let a = registry_on(Store::postgres(&url).await.unwrap(), dir.path()).await;
        let b = registry_on(Store::postgres(&url).await.unwrap(), dir.path()).await;
        Some((a, b, url, dir))
    }

    /// Waits up to `limit` for `f`; returns how long it took.
    async fn within(limit: Duration, f: impl Fn() -> bool) -> Duration {
        let started = Instant::now();
        while !f() {
            assert!(started.elapsed() < limit, "not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_a_one_time_token_enrols_once_across_replicas() {
        let Some((a, b, _url, _dir)) = two().await else {
            return;
        };
        let t = tf_token(&a, &[], Duration::from_secs(60), 1, "").await;
        // Eight agents race for the token through both replicas.
        let tries = (0..8).map(|i| {
            let r = if i % 2 == 0 { a.clone() } else { b.clone() };
            let token = t.token.clone();
            tokio::spawn(async move {
                let name = format!("a{i}");
                r.enroll(&token, &name, &csr(&name)).await
            })
        });
        let results = futures::future::join_all(tries).await;
        let ok = results
            .iter()
            .filter(|r| r.as_ref().unwrap().is_ok())
            .count();
        assert_eq!(ok, 1, "{results:?}");
        for r in results {
            match r.unwrap() {
                Ok(_) | Err(EnrollError::TokenUsed) => {}
                Err(e) => panic!("unexpected refusal: {e}"),
            }
        }
        // One name enrolled at once through both replicas with tokens of
        // two pools: one pool gets it, the other is told it is taken.
        let t1 = tf_token(&a, &[], Duration::from_secs(60), 1, "").await;
        let t2 = b
            .create(
                "other".into(),
                labels(&[]),
                Duration::from_secs(60),
                1,
                String::new(),
            )
            .await
            .unwrap();
        let (c1, c2) = (csr("same"), csr("same"));
        let (r1, r2) = tokio::join!(
            a.enroll(&t1.token, "same", &c1),
            b.enroll(&t2.token, "same", &c2)
        );
        let refused: Vec<_> = [&r1, &r2]
            .into_iter()
            .filter_map(|r| r.as_ref().err())
            .collect();
        assert_eq!(refused.len(), 1, "{r1:?} {r2:?}");
        assert!(
            matches!(refused[0], EnrollError::NameTaken { .. }),
            "{refused:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_a_revocation_through_one_replica_ends_the_session_on_another() {
        let Some((a, b, url, _dir)) = two().await else {
            return;
        };
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        let (bus_a, _in_a) = Bus::start(&url, "a".into(), stop.clone()).unwrap();
        let (bus_b, _in_b) = Bus::start(&url, "b".into(), stop.clone()).unwrap();
        a.join_replicas(bus_a, stop.clone());
        b.join_replicas(bus_b, stop.clone());
        // Both replicas listen before anything is said.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = tf_token(&a, &[("env", "prod")], Duration::from_secs(60), 1, "").await;
        a.enroll(&t.token, "a1", &csr("a1")).await.unwrap();
        // Its session on b at once: labels bound, certificate renewable.
        let mut session =
            crate::enroll::session::SessionIdentity::new(b.clone(), "a1".into(), None);
        let (kept, ignored) = session
            .bind_labels(labels(&[("env", "prod"), ("gpu", "yes")]))
            .await
            .unwrap();
        assert_eq!(
            (kept, ignored),
            (labels(&[("env", "prod")]), vec!["gpu=yes".to_string()])
        );
        b.renew("a1", &csr("a1")).await.unwrap();
        // Revoked through a: b refuses it and ends its session, by the
        // signal, well before the periodic reload.
        a.revoke("a1").await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(3), session.ended())
            .await
            .expect("the session on b ends within 3s");
        assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
        assert!(b.is_revoked("a1"));
        let e = b.renew("a1", &csr("a1")).await.unwrap_err();
        assert!(matches!(e, EnrollError::Revoked { .. }), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_a_missed_signal_is_repaired_by_the_periodic_reload() {
        let Some((a, b, url, _dir)) = two().await else {
            return;
        };
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        // Only b listens; a tells nobody.
        let (bus_b, _in_b) = Bus::start(&url, "b".into(), stop.clone()).unwrap();
        b.join_replicas(bus_b, stop.clone());
        let t = tf_token(&a, &[], Duration::from_secs(60), 1, "").await;
        a.enroll(&t.token, "a1", &csr("a1")).await.unwrap();
        let revocations = b.revocations();
        a.revoke("a1").await.unwrap();
        within(super::RELOAD_EVERY + Duration::from_secs(3), || {
            b.is_revoked("a1")
        })
        .await;
        assert!(revocations.has_changed().unwrap());
        assert!(
            b.records()
                .iter()
                .any(|r| r.name == "a1" && r.revoked_ms > 0)
        );
    }
}
