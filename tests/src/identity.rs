//! Enrolment helpers: bootstrap tokens, enrolled agents (in process) and
//! scripted sessions holding an enrolled certificate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_proto::agent::v1 as pb;
use outpost_proto::identity::v1 as idpb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::{Cluster, RawAgent, RawIdentity};

/// An enrolled identity's files.
pub struct Enrolled {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Cluster {
    /// The operator's identity API.
    pub async fn identity_admin(
        &self,
    ) -> idpb::identity_admin_client::IdentityAdminClient<Channel> {
        idpb::identity_admin_client::IdentityAdminClient::new(
            self.client_config().channel().await.expect("admin channel"),
        )
    }

    /// A bootstrap token for `uses` agents of `pool` allowed `labels`.
    pub async fn bootstrap_token(&self, pool: &str, labels: &[(&str, &str)], uses: u32) -> String {
        self.identity_admin()
            .await
            .create_enrollment(idpb::CreateEnrollmentRequest {
                pool: pool.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ttl_ms: 600_000,
                uses,
                agent_name: String::new(),
            })
            .await
            .expect("create enrolment")
            .into_inner()
            .token
    }

    /// A TLS channel that presents no client certificate.
    pub async fn anonymous_channel(&self) -> Channel {
        anonymous_channel(&self.url(), &self.state.pki().ca_cert()).await
    }

    /// Enrols `name` with `token` as an agent would (key made here),
    /// writing its key and certificate under the test directory.
    pub async fn enroll(&self, token: &str, name: &str) -> Result<Enrolled, tonic::Status> {
        let dir = self.dir.path().join("enrolled").join(name);
        enroll_at(&self.url(), &self.state.pki().ca_cert(), token, name, &dir).await
    }

    /// The config of an in-process agent `name` that enrols with `token`
    /// (its own state directory and work directory).
    pub fn enrolling_agent_config(
        &self,
        name: &str,
        token: &str,
        labels: &[(&str, &str)],
        capacity: u32,
    ) -> outpost_agent::config::AgentConfig {
        let dir = self.dir.path().join("agents").join(name);
        std::fs::create_dir_all(&dir).expect("agent dir");
        let token_file = dir.join("bootstrap.token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token file");
        let mut cfg = self.agent_config(capacity);
        cfg.agent_id = Some(name.into());
        cfg.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        cfg.state_dir = dir.join("state");
        cfg.sandbox.work_dir = dir.join("work");
        cfg.tls.cert = dir.join("identity").join("agent.pem");
        cfg.tls.key = dir.join("identity").join("agent.key");
        cfg.bootstrap_token_file = Some(token_file);
        cfg
    }

    /// A scripted session with the certificate in `cert` and `key`.
    pub async fn raw_agent_as(
        &self,
        cert: &Path,
        key: &Path,
        hello: pb::Hello,
    ) -> Result<RawAgent, tonic::Status> {
        self.raw_agent_with(RawIdentity::Files { cert, key }, hello)
            .await
    }
}

/// A TLS channel to the control plane at `url` (its CA in `ca`) that
/// presents no client certificate.
pub async fn anonymous_channel(url: &str, ca: &Path) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")))
        .domain_name("localhost");
    Endpoint::from_shared(url.to_string())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("a TLS connection without a client certificate")
}

/// Enrols `name` with `token` at the control plane at `url` (its CA in
/// `ca`) as an agent would (key made here), writing its key and
/// certificate in `dir`.
pub async fn enroll_at(
    url: &str,
    ca: &Path,
    token: &str,
    name: &str,
    dir: &Path,
) -> Result<Enrolled, tonic::Status> {
    let key = rcgen::KeyPair::generate().expect("key");
    let resp = idpb::enrollment_client::EnrollmentClient::new(anonymous_channel(url, ca).await)
        .enroll(idpb::EnrollRequest {
            token: token.into(),
            agent_name: name.into(),
            csr_pem: csr(&key, name),
        })
        .await?
        .into_inner();
    std::fs::create_dir_all(dir).expect("dir");
    let out = Enrolled {
        cert: dir.join("agent.pem"),
        key: dir.join("agent.key"),
    };
    std::fs::write(&out.cert, resp.certificate_pem).expect("cert");
    std::fs::write(&out.key, key.serialize_pem()).expect("key");
    Ok(out)
}

/// A PKCS#10 request for `name` signed with `key`.
pub fn csr(key: &rcgen::KeyPair, name: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("pem")
}
