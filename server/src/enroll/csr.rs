//! Signing agent certificates from certificate signing requests with the
//! local CA. The CSR contributes only its public key and its common name
//! (checked against the agent's name); everything else in the certificate
//! is the control plane's: role, name, pool, lifetime, key usages.

use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::EnrollError;
use crate::pki::PkiDir;

/// The CA's signing half, loaded once at start.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

/// A signed agent certificate.
#[derive(Debug, Clone)]
pub struct Signed {
    pub pem: String,
    pub not_after_ms: i64,
}

impl Ca {
    pub fn load(pki: &PkiDir) -> Result<Ca, String> {
        let cert = std::fs::read_to_string(pki.ca_cert())
            .map_err(|e| format!("failed to read {}: {e}", pki.ca_cert().display()))?;
        let key = std::fs::read_to_string(pki.ca_key())
            .map_err(|e| format!("failed to read {}: {e}", pki.ca_key().display()))?;
        let key = KeyPair::from_pem(&key).map_err(|e| format!("the CA key is not usable: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)
            .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
        Ok(Ca { issuer })
    }

    /// Checks `csr_pem` (signature, key type, common name `name`) and signs
    /// a client certificate for agent `name` in `pool`, valid for `ttl`.
    pub fn sign_agent(
        &self,
        csr_pem: &str,
        name: &str,
        pool: &str,
        ttl: Duration,
    ) -> Result<Signed, EnrollError> {
        let csr = check_csr(csr_pem, name)?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| EnrollError::Internal(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "agent");
        for uri in [
            format!("urn:outpost:agent:{name}"),
            format!("urn:outpost:pool:{pool}"),
        ] {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().map_err(
                    |e: rcgen::Error| EnrollError::Internal(e.to_string()),
                )?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        // Second granularity: start one second back so a fresh certificate
        // is valid at once. Only the control plane checks the dates.
        params.not_before = now - time::Duration::seconds(1);
        let not_after = now + time::Duration::milliseconds(ttl.as_millis() as i64);
        params.not_after = not_after;
        let req = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = req
            .signed_by(&self.issuer)
            .map_err(|e| EnrollError::Internal(format!("signing failed: {e}")))?;
        Ok(Signed {
            pem: cert.pem(),
            not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000) as i64,
        })
    }
}

/// Parses and verifies a CSR: its signature, a supported key, and a common
/// name equal to `name`.
pub fn check_csr(
    csr_pem: &str,
    name: &str,
) -> Result<CertificateSigningRequestParams, EnrollError> {
    if csr_pem.len() > 16 * 1024 {
        return Err(EnrollError::BadCsr("the CSR is larger than 16 KiB".into()));
    }
    // The key type first, so a weak or unsupported key says so rather than
    // failing somewhere in parsing.
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| EnrollError::BadCsr(format!("not a PEM certificate signing request: {e}")))?;
    use x509_parser::prelude::FromDer;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| {
                EnrollError::BadCsr(format!("not a PKCS#10 certificate signing request: {e}"))
            })?;
    let spki = &req.certification_request_info.subject_pki;
    key_supported(spki)?;
    let cn = req
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("");
    if cn != name {
        return Err(EnrollError::CsrName {
            csr: cn.to_string(),
            name: name.to_string(),
        });
    }
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| EnrollError::BadCsr(format!("the CSR does not verify: {e}")))
}

fn key_supported(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), EnrollError> {
    use x509_parser::public_key::PublicKey;
    const P256: &str = "1.2.840.10045.3.1.7";
    const P384: &str = "1.3.132.0.34";
    const ED25519: &str = "1.3.101.112";
    let unsupported = |what: String| {
        EnrollError::BadCsr(format!(
            "the CSR's key is {what}: use an ECDSA P-256 (or P-384) or Ed25519 key"
        ))
    };
    let alg = spki.algorithm.algorithm.to_id_string();
    if alg == ED25519 {
        return Ok(());
    }
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            if curve == P256 || curve == P384 {
                Ok(())
            } else {
                Err(unsupported(format!("on an unsupported curve ({curve})")))
            }
        }
        Ok(PublicKey::RSA(rsa)) => Err(unsupported(format!(
            "RSA ({} bits), which agents may not use",
            rsa.key_size()
        ))),
        _ => Err(unsupported(format!("of an unsupported type ({alg})"))),
    }
}
