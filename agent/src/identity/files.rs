//! The enrolled identity's files: the private key (0600, written once per
//! enrolment) and the certificate (replaced atomically by each renewal, so
//! a crash leaves the old or the new one, never half of either).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::IdentityError;

/// A PKCS#10 request with common name `name`, signed with `key`.
pub fn csr(key: &rcgen::KeyPair, name: &str) -> Result<String, IdentityError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| IdentityError::Key(format!("failed to make a CSR: {e}")))
}

/// The expiry of the certificate in `path`, if it is readable.
pub fn cert_not_after(path: &Path) -> Option<SystemTime> {
    let pem = std::fs::read(path).ok()?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = p.parse_x509().ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// A time, RFC 3339 (UTC).
pub fn show(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i128)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

pub fn write_private(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    write_atomic(path, data, 0o600)
}

pub fn write_public(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    write_atomic(path, data, 0o644)
}

/// Writes `data` to a temporary file next to `path` with `mode`, syncs it
/// and renames it over `path`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |what: &'static str| {
        move |source: std::io::Error| IdentityError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err("failed to create the directory of"))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(err("failed to remove a stale")(e));
        }
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err("failed to write"))?;
    f.write_all(data).map_err(err("failed to write"))?;
    f.sync_all().map_err(err("failed to write"))?;
    std::fs::rename(&tmp, path).map_err(err("failed to replace"))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_atomically_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id/agent.key");
        write_private(&key, b"one").unwrap();
        write_private(&key, b"two").unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"two");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k = rcgen::KeyPair::generate().unwrap();
        let pem = csr(&k, "a1").unwrap();
        assert!(pem.contains("CERTIFICATE REQUEST"), "{pem}");
        assert!(cert_not_after(&key).is_none());
    }
}
