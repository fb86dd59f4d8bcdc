//! Expiry of the certificates in a PKI directory (the CA, the server's,
//! admin and hand-issued agent certificates): `outpost pki show` lists it,
//! and the admin client refuses an expired admin certificate before
//! dialling and warns when one is near its end. Admin certificates are
//! renewed by hand (`outpost pki issue admin NAME --replace`).

use std::path::Path;
use std::time::Duration;

use crate::model::now_ms;

/// An admin certificate this close to its end is warned about.
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// One certificate file.
#[derive(Debug, Clone)]
pub struct CertExpiry {
    pub file: String,
    pub not_after_ms: i64,
}

/// The expiry of the (first) certificate in a PEM file.
pub fn not_after_ms(path: &Path) -> Option<i64> {
    let pem = std::fs::read(path).ok()?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = p.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp() * 1000)
}

/// Every `*.pem` certificate in `dir`.
pub fn certificates(dir: &Path) -> std::io::Result<Vec<CertExpiry>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "pem")
            && let Some(not_after_ms) = not_after_ms(&path)
        {
            out.push(CertExpiry {
                file: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                not_after_ms,
            });
        }
    }
    Ok(out)
}

/// `expired`, `expires in N days` (within [`WARN_BEFORE`]) or `valid`.
pub fn state(not_after_ms: i64) -> String {
    let left = not_after_ms - now_ms();
    if left <= 0 {
        "expired".into()
    } else if left < WARN_BEFORE.as_millis() as i64 {
        format!("expires in {} days", left / 86_400_000)
    } else {
        "valid".into()
    }
}
