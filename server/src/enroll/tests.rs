use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

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

async fn registry(dir: &std::path::Path) -> Arc<Registry> {
    let pki = PkiDir::new(dir.join("pki"));
    if !pki.has_ca() {
        pki.init(&[]).unwrap();
    }
    let store = Store::open(&dir.join("outpost.db")).unwrap();
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

#[tokio::test]
async fn a_token_enrols_once_and_its_certificate_names_agent_and_pool() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(dir.path()).await;
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

#[tokio::test]
async fn refused_enrolments_consume_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(dir.path()).await;
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

#[tokio::test]
async fn an_expired_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(dir.path()).await;
    let t = tf_token(&r, &[], Duration::from_millis(1), 1, "").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let e = r.enroll(&t.token, "a1", &csr("a1")).await.unwrap_err();
    assert!(matches!(e, EnrollError::TokenExpired { .. }), "{e}");
    assert!(e.to_string().contains("expired"), "{e}");
}

#[tokio::test]
async fn labels_are_bound_and_revocation_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(dir.path()).await;
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
    let r = registry(dir.path()).await;
    assert!(r.is_revoked("a1"));
    assert!(!r.is_revoked("a2"));
    r.enroll(&t.token, "a2", &csr("a2")).await.unwrap();
}
