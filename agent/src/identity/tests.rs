use super::*;

fn config(dir: &std::path::Path) -> Arc<AgentConfig> {
    let text = format!(
        r#"
server = "https://127.0.0.1:1"
agent_id = "a1"
bootstrap_token_file = "{dir}/token"
[tls]
ca = "{dir}/ca.pem"
cert = "{dir}/id/agent.pem"
key = "{dir}/id/agent.key"
"#,
        dir = dir.display()
    );
    Arc::new(AgentConfig::parse(&text).unwrap())
}

fn expired_cert(path: &std::path::Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let cert = params.self_signed(&key).unwrap();
    files::write_public(path, cert.pem().as_bytes()).unwrap();
    files::write_private(&path.with_extension("key"), key.serialize_pem().as_bytes()).unwrap();
}

#[tokio::test]
async fn an_expired_certificate_without_a_token_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let id = Identity::new(&cfg).unwrap();
    // No certificate and no token yet.
    let e = id.ensure().await.unwrap_err().to_string();
    assert!(
        e.contains("no certificate yet") && e.contains("outpost enroll create"),
        "{e}"
    );
    expired_cert(&cfg.tls.cert);
    assert!(matches!(id.remaining(), Some(Err(_))));
    let e = id.ensure().await.unwrap_err().to_string();
    assert!(e.contains("expired at"), "{e}");
    assert!(e.contains("must enrol again"), "{e}");
    assert!(
        e.contains(&dir.path().join("token").display().to_string()),
        "{e}"
    );
    // An empty token file is no token.
    std::fs::write(dir.path().join("token"), "\n").unwrap();
    let e = id.ensure().await.unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
}

#[tokio::test]
async fn renewal_is_scheduled_at_half_of_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let id = Identity::new(&cfg).unwrap();
    let mut r = Renewal::start(Some(&id));
    // No certificate: as soon as possible, but not in a loop.
    let due = r.next.unwrap() - tokio::time::Instant::now();
    assert!(due <= Duration::from_millis(200), "{due:?}");
    let after = r.done(Duration::from_secs(10));
    assert!(after.is_none());
    let due = r.next.unwrap() - tokio::time::Instant::now();
    assert!(
        due > Duration::from_secs(4) && due <= Duration::from_secs(5),
        "{due:?}"
    );
    r.sent(&id);
    let due = r.next.unwrap() - tokio::time::Instant::now();
    assert!(due >= Duration::from_millis(900), "a retry waits: {due:?}");
    assert!(Renewal::start(None).next.is_none());
}

#[tokio::test]
async fn enrolment_tries_every_address_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let dead = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let (first, second) = (dead(), dead());
    let mut cfg = (*config(dir.path())).clone();
    cfg.server = first.clone();
    cfg.servers = vec![second.clone()];
    let cfg = Arc::new(cfg);
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(&cfg.tls.ca, ca.pem()).unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let e = Identity::new(&cfg).unwrap().ensure().await.unwrap_err();
    assert!(matches!(e, IdentityError::Connect(_)), "{e}");
    let e = e.to_string();
    assert_eq!(e.matches("Connection refused").count(), 2, "{e}");
    let (at_first, at_second) = (e.find(&first), e.find(&second));
    assert!(
        at_first.is_some() && at_second.is_some() && at_first < at_second,
        "both addresses, in order: {e}"
    );
}
