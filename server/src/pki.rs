//! Local PKI: a self-contained certificate authority for one Outpost
//! installation.
//!
//! Every certificate carries its role in a URI subject-alternative name
//! `urn:outpost:<role>:<name>` (and in the subject's OU). The control plane
//! authorises by that role only (`identity.rs`): an agent certificate cannot
//! call the admin API and an admin certificate cannot open an agent session.
//! Private keys are written with mode 0600 and never leave the directory they
//! were created in.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::Role;

/// Errors of the local PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to generate {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("invalid certificate name {name:?}: use letters, digits, '.', '_' or '-'")]
    InvalidName { name: String },
    #[error("the CA at {dir} is missing; run `outpost pki init` first")]
    NoCa { dir: PathBuf },
}

/// File layout of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    pub dir: PathBuf,
}

/// Paths of one issued certificate and its key.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PkiDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server(&self) -> CertPaths {
        self.named("server")
    }
    pub fn issued(&self, role: Role, name: &str) -> CertPaths {
        self.named(&format!("{}-{name}", role.as_str()))
    }
    fn named(&self, stem: &str) -> CertPaths {
        CertPaths {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        }
    }
    pub fn has_ca(&self) -> bool {
        self.ca_cert().exists() && self.ca_key().exists()
    }

    /// Creates the CA and the server certificate. `server_names` are DNS names
    /// or IP addresses the server is reached at (loopback is always included).
    pub fn init(&self, server_names: &[String]) -> Result<(), PkiError> {
        if self.has_ca() {
            return Err(PkiError::Exists {
                path: self.ca_cert(),
            });
        }
        create_dir_private(&self.dir)?;
        let ca_key = KeyPair::generate().map_err(gen_err("the CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("the CA"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Outpost CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Outpost");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let ca = params.self_signed(&ca_key).map_err(gen_err("the CA"))?;
        write_private(&self.ca_key(), ca_key.serialize_pem().as_bytes())?;
        write_public(&self.ca_cert(), ca.pem().as_bytes())?;

        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for n in server_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        self.issue_inner(Role::Server, "server", &names, &self.server())?;
        Ok(())
    }

    /// Issues a certificate for `role` named `name`; returns where it was written.
    pub fn issue(&self, role: Role, name: &str) -> Result<CertPaths, PkiError> {
        validate_name(name)?;
        let paths = self.issued(role, name);
        if paths.cert.exists() || paths.key.exists() {
            return Err(PkiError::Exists { path: paths.cert });
        }
        self.issue_inner(role, name, &[], &paths)?;
        Ok(paths)
    }

    /// Issues `role` `name` again, replacing its certificate and key (the
    /// new files are written first, then renamed over the old ones).
    pub fn reissue(&self, role: Role, name: &str) -> Result<CertPaths, PkiError> {
        validate_name(name)?;
        let paths = self.issued(role, name);
        let fresh = self.named(&format!(".{}-{name}.new", role.as_str()));
        for p in [&fresh.cert, &fresh.key] {
            let _ = fs::remove_file(p);
        }
        self.issue_inner(role, name, &[], &fresh)?;
        for (from, to) in [(&fresh.key, &paths.key), (&fresh.cert, &paths.cert)] {
            fs::rename(from, to).map_err(|source| PkiError::Write {
                path: to.clone(),
                source,
            })?;
        }
        Ok(paths)
    }

    fn issue_inner(
        &self,
        role: Role,
        name: &str,
        dns: &[String],
        out: &CertPaths,
    ) -> Result<(), PkiError> {
        if !self.has_ca() {
            return Err(PkiError::NoCa {
                dir: self.dir.clone(),
            });
        }
        let ca_pem = read(&self.ca_cert())?;
        let ca_key_pem = read(&self.ca_key())?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(gen_err("the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(gen_err("the CA"))?;

        let key = KeyPair::generate().map_err(gen_err("a key"))?;
        let mut params = CertificateParams::new(dns.to_vec()).map_err(gen_err(name))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        let uri = format!("urn:outpost:{}:{name}", role.as_str());
        params
            .subject_alt_names
            .push(SanType::URI(uri.clone().try_into().map_err(|e| {
                PkiError::Generate {
                    what: uri.clone(),
                    source: e,
                }
            })?));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match role {
            Role::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Role::Agent | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err(name))?;
        write_private(&out.key, key.serialize_pem().as_bytes())?;
        write_public(&out.cert, cert.pem().as_bytes())?;
        Ok(())
    }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate {
        what: what.to_string(),
        source,
    }
}

fn validate_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            name: name.to_string(),
        })
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir_private(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

fn write_with_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_with_mode(path, data, 0o600)
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    write_with_mode(path, data, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_and_issue_write_private_keys_0600_and_roles() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(&["outpost.example".into()]).unwrap();
        let agent = pki.issue(Role::Agent, "a1").unwrap();
        let admin = pki.issue(Role::Admin, "ops").unwrap();
        for key in [
            pki.ca_key(),
            pki.server().key,
            agent.key.clone(),
            admin.key.clone(),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let der = pem_to_der(&fs::read_to_string(&agent.cert).unwrap());
        let id = crate::identity::Identity::from_der(&der).unwrap();
        assert_eq!(id.role, Role::Agent);
        assert_eq!(id.name, "a1");
        let der = pem_to_der(&fs::read_to_string(&admin.cert).unwrap());
        let id = crate::identity::Identity::from_der(&der).unwrap();
        assert_eq!(id.role, Role::Admin);
        assert!(matches!(
            pki.issue(Role::Agent, "a1"),
            Err(PkiError::Exists { .. })
        ));
        assert!(matches!(
            pki.issue(Role::Agent, "../x"),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(pki.init(&[]), Err(PkiError::Exists { .. })));
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }
}
