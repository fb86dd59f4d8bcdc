//! The admin client used by the CLI: finds the control plane and the admin
//! certificate through the state directory (or explicit flags).

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_proto::admin::v1::admin_service_client::AdminServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::identity::Role;
use crate::pki::PkiDir;

/// Errors reaching the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no control plane address: {path} is missing (is `outpost dev` or `outpost server` running with this --state-dir?), or pass --server"
    )]
    NoAddress { path: PathBuf },
    #[error("failed to read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid control plane address {url}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("failed to connect to the control plane at {url} (TLS name {name:?})")]
    Connect {
        url: String,
        name: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "no admin certificate {}: issue one with `outpost pki issue admin {name}`, or choose another with --admin NAME", path.display()
    )]
    NoAdminCert { name: String, path: PathBuf },
    #[error(
        "the admin certificate {} expired at {at}: renew it with `outpost pki issue admin NAME --replace` on the CA's host", path.display()
    )]
    AdminCertExpired { path: PathBuf, at: String },
}

/// Layout of an Outpost state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn pki(&self) -> PkiDir {
        PkiDir::new(self.root.join("pki"))
    }
    pub fn addr_file(&self) -> PathBuf {
        self.root.join("server.addr")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn agent_dir(&self) -> PathBuf {
        self.root.join("agent")
    }
    /// The default state directory: `$XDG_STATE_HOME/outpost` or `~/.local/state/outpost`.
    pub fn default_root() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
            return PathBuf::from(x).join("outpost");
        }
        if let Some(h) = std::env::var_os("HOME") {
            return PathBuf::from(h).join(".local/state/outpost");
        }
        PathBuf::from(".outpost")
    }
}

/// How to reach the control plane as an admin.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Control plane URL; when `addr_file` is set, re-read from it at each
    /// connection (a restarted `outpost dev` may listen on a new port).
    pub server: String,
    pub addr_file: Option<PathBuf>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name the server's certificate must carry; `None`: the URL's host if
    /// the state directory's server certificate names it, else that
    /// certificate's first DNS name other than `localhost`.
    pub server_name: Option<String>,
    /// How long `logs --follow` and `submit --follow|--wait` keep trying to
    /// reach a control plane that went away.
    pub reconnect_for: Duration,
}

/// Default of [`ClientConfig::reconnect_for`].
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(300);

impl ClientConfig {
    /// Reads the address from `server.addr` (unless `server` is given) and
    /// uses the state directory's `admin-admin` certificate.
    pub fn from_state(state: &StateDir, server: Option<String>) -> Result<Self, ClientError> {
        let (server, addr_file) = match server {
            Some(s) => (s, None),
            None => (read_addr(&state.addr_file())?, Some(state.addr_file())),
        };
        let pki = state.pki();
        let admin = pki.issued(Role::Admin, "admin");
        Ok(ClientConfig {
            server,
            addr_file,
            ca: pki.ca_cert(),
            cert: admin.cert,
            key: admin.key,
            server_name: None,
            reconnect_for: DEFAULT_RECONNECT_FOR,
        })
    }

    /// Uses the state directory's `admin-NAME` certificate.
    pub fn with_admin(mut self, state: &StateDir, name: &str) -> Result<Self, ClientError> {
        let paths = state.pki().issued(Role::Admin, name);
        if !paths.cert.is_file() || !paths.key.is_file() {
            return Err(ClientError::NoAdminCert {
                name: name.to_string(),
                path: paths.cert,
            });
        }
        self.cert = paths.cert;
        self.key = paths.key;
        Ok(self)
    }

    /// The URL to dial now.
    fn url(&self) -> String {
        self.addr_file
            .as_deref()
            .and_then(|p| read_addr(p).ok())
            .unwrap_or_else(|| self.server.clone())
    }

    /// The name the server's certificate is checked against for `url`.
    pub fn tls_name(&self, url: &str) -> String {
        if let Some(name) = &self.server_name {
            return name.clone();
        }
        let server_cert = self.ca.with_file_name("server.pem");
        let names = std::fs::read(&server_cert)
            .map(|pem| cert_names(&pem))
            .unwrap_or_default();
        pick_tls_name(url_host(url), &names)
    }

    pub async fn connect(&self) -> Result<AdminServiceClient<Channel>, ClientError> {
        Ok(AdminServiceClient::new(self.channel().await?).max_decoding_message_size(64 << 20))
    }

    /// An mTLS channel to the control plane with the admin certificate (for
    /// any admin service).
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let read = |what, p: &Path| {
            std::fs::read(p).map_err(|source| ClientError::Read {
                what,
                path: p.to_path_buf(),
                source,
            })
        };
        if let Some(ms) = crate::enroll::expiry::not_after_ms(&self.cert) {
            let left = ms - crate::model::now_ms();
            if left <= 0 {
                return Err(ClientError::AdminCertExpired {
                    path: self.cert.clone(),
                    at: crate::enroll::show_time(ms),
                });
            }
            if left < crate::enroll::expiry::WARN_BEFORE.as_millis() as i64 {
                tracing::warn!(cert = %self.cert.display(), expires = %crate::enroll::show_time(ms), "the admin certificate expires soon: renew it with `outpost pki issue admin NAME --replace`");
            }
        }
        let url = self.url();
        let name = self.tls_name(&url);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", &self.ca)?))
            .identity(Identity::from_pem(
                read("admin certificate", &self.cert)?,
                read("admin key", &self.key)?,
            ))
            .domain_name(name.clone());
        let ep = Endpoint::from_shared(url.clone())
            .and_then(|e| e.tls_config(tls))
            .map_err(|source| ClientError::Endpoint {
                url: url.clone(),
                source,
            })?
            .connect_timeout(Duration::from_secs(5));
        let ch = ep
            .connect()
            .await
            .map_err(|source| ClientError::Connect { url, name, source })?;
        Ok(ch)
    }
}

fn read_addr(path: &Path) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|_| ClientError::NoAddress {
        path: path.to_path_buf(),
    })?;
    Ok(text.trim().to_string())
}

/// The host of `https://host:port/...` (without IPv6 brackets).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// DNS names and IP addresses of a PEM certificate's subject alternative names.
fn cert_names(pem: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(pem) else {
        return Vec::new();
    };
    let Ok(cert) = pem.parse_x509() else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|gn| match gn {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The URL's host if the certificate names it; else its first DNS name
/// other than `localhost`; else `localhost` if it has it; else the host.
fn pick_tls_name(host: &str, names: &[String]) -> String {
    if names.iter().any(|n| n.eq_ignore_ascii_case(host)) {
        return host.to_string();
    }
    let dns = |n: &&String| n.parse::<std::net::IpAddr>().is_err();
    names
        .iter()
        .filter(dns)
        .find(|n| !n.eq_ignore_ascii_case("localhost"))
        .or_else(|| names.iter().find(dns))
        .cloned()
        .unwrap_or_else(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_name_comes_from_the_certificate_not_a_constant() {
        let names: Vec<String> = ["localhost", "127.0.0.1", "::1", "outpost.internal"]
            .map(String::from)
            .into();
        assert_eq!(url_host("https://127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(url_host("https://[::1]:7443/"), "::1");
        assert_eq!(
            url_host("https://outpost.internal:7443"),
            "outpost.internal"
        );
        // The URL's host when the certificate names it.
        assert_eq!(pick_tls_name("127.0.0.1", &names), "127.0.0.1");
        assert_eq!(pick_tls_name("::1", &names), "::1");
        assert_eq!(
            pick_tls_name("OUTPOST.internal", &names),
            "OUTPOST.internal"
        );
        // Otherwise (an address the certificate does not carry): its own name.
        assert_eq!(pick_tls_name("10.0.0.7", &names), "outpost.internal");
        let local: Vec<String> = ["localhost", "127.0.0.1"].map(String::from).into();
        assert_eq!(pick_tls_name("10.0.0.7", &local), "localhost");
        assert_eq!(pick_tls_name("10.0.0.7", &[]), "10.0.0.7");
    }

    #[test]
    fn names_are_read_from_an_issued_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let pki = state.pki();
        pki.init(&["outpost.internal".to_string(), "10.1.2.3".to_string()])
            .unwrap();
        let names = cert_names(&std::fs::read(pki.server().cert).unwrap());
        for n in [
            "localhost",
            "127.0.0.1",
            "::1",
            "outpost.internal",
            "10.1.2.3",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
        }
        let cfg = ClientConfig {
            server: "https://10.9.9.9:1".into(),
            addr_file: None,
            ca: pki.ca_cert(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            server_name: None,
            reconnect_for: DEFAULT_RECONNECT_FOR,
        };
        assert_eq!(cfg.tls_name("https://10.9.9.9:1"), "outpost.internal");
        assert_eq!(cfg.tls_name("https://10.1.2.3:1"), "10.1.2.3");
        let named = ClientConfig {
            server_name: Some("other.example".into()),
            ..cfg
        };
        assert_eq!(named.tls_name("https://10.1.2.3:1"), "other.example");
        let e = ClientConfig::from_state(&state, Some("https://x:1".into()))
            .unwrap()
            .with_admin(&state, "alice")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outpost pki issue admin alice"), "{e}");
    }
}
