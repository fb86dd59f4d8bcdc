//! Secrets kept by the control plane for longer than one job: a stack's
//! secret files and its notification targets' shared secrets. They are
//! sealed at rest with AES-256-GCM under a key of the control plane's own
//! (`<data>/iac/secrets.key`, `0600`, apart from the database), so the store
//! never holds a value in clear. A keyed digest (HMAC-SHA256 under a second
//! key) lets a re-declared stack with the same values compare unchanged
//! without revealing anything about low-entropy values.
//!
//! A run's jobs get the opened values in their `JobSpec.secrets`, which the
//! store keeps only until the job is final, like any job's secrets.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::model::Sealed;
use crate::model::JobSecret;

/// Most secrets per stack, most bytes of values in all (as for a job).
pub const MAX_SECRETS: usize = 64;
pub const MAX_SECRET_BYTES: usize = 1 << 20;

/// Checks secret names (file names under `/run/secrets`, as for jobs) and
/// sizes; errors name secrets, never show values.
pub fn check_names(secrets: &[JobSecret]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for s in secrets {
        let n = &s.name;
        let ok = !n.is_empty()
            && n.len() <= 128
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && n != "."
            && !n.contains("..");
        if !ok {
            return Err(format!(
                "secret name {n:?} is not allowed: use 1 to 128 letters, digits, '_', '.' or '-', not '.' and no '..'"
            ));
        }
        if s.value.is_empty() {
            return Err(format!("secret {n:?} has no value"));
        }
        if !names.insert(n.as_str()) {
            return Err(format!("secret {n:?} is given twice"));
        }
    }
    let total: usize = secrets.iter().map(|s| s.value.len()).sum();
    if secrets.len() > MAX_SECRETS || total > MAX_SECRET_BYTES {
        return Err(format!(
            "too many or too large secrets: at most {MAX_SECRETS} secrets of {MAX_SECRET_BYTES} bytes in all"
        ));
    }
    Ok(())
}

/// Errors of sealing and opening.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("the secrets key {path} is not usable: {reason}")]
    Key { path: String, reason: String },
    #[error("secret {name} cannot be opened (wrong key or damaged)")]
    Open { name: String },
    #[error("no randomness for a nonce")]
    Random,
}

/// Seals and opens secret values with the control plane's key.
pub struct Sealer {
    key: LessSafeKey,
    mac: ring::hmac::Key,
    rng: SystemRandom,
    /// HMAC-SHA256 of [`FINGERPRINT_INPUT`] under the whole key file (hex).
    fingerprint: String,
}

/// What the key's fingerprint is the keyed digest of.
const FINGERPRINT_INPUT: &[u8] = b"outpost key fingerprint";

impl Sealer {
    /// Reads the key file, or creates it (`0600`, 64 random bytes).
    pub fn load_or_create(path: &Path) -> Result<Sealer, SecretsError> {
        let fail = |reason: String| SecretsError::Key {
            path: path.display().to_string(),
            reason,
        };
        let rng = SystemRandom::new();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; 64];
                rng.fill(&mut b).map_err(|_| SecretsError::Random)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
                }
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| fail(e.to_string()))?;
                f.write_all(&b).map_err(|e| fail(e.to_string()))?;
                f.sync_all().map_err(|e| fail(e.to_string()))?;
                b
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        if bytes.len() != 64 {
            return Err(fail(format!("{} bytes, expected 64", bytes.len())));
        }
        let key =
            UnboundKey::new(&AES_256_GCM, &bytes[..32]).map_err(|_| fail("bad key".into()))?;
        let whole = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes);
        let fingerprint =
            outpost_agent::iac::plan::hex(ring::hmac::sign(&whole, FINGERPRINT_INPUT).as_ref());
        Ok(Sealer {
            key: LessSafeKey::new(key),
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes[32..]),
            rng,
            fingerprint,
        })
    }

    /// Names the key without revealing anything about it (a keyed digest
    /// of a constant under the whole key file): equal on every control
    /// plane that shares the key, different otherwise.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The keyed digest of a value (hex).
    pub fn mac(&self, value: &[u8]) -> String {
        outpost_agent::iac::plan::hex(ring::hmac::sign(&self.mac, value).as_ref())
    }

    /// Seals `value`, bound to `name` (a sealed value cannot be moved to
    /// another name).
    pub fn seal(&self, name: &str, value: &[u8]) -> Result<Sealed, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| SecretsError::Random)?;
        let mut buf = value.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SecretsError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(Sealed {
            mac: self.mac(value),
            sealed: STANDARD.encode(out),
        })
    }

    /// Seals `value` unless `old` already holds the same value (then `old`
    /// is kept, so a re-declared stack compares unchanged).
    pub fn reseal(
        &self,
        name: &str,
        value: &[u8],
        old: Option<&Sealed>,
    ) -> Result<Sealed, SecretsError> {
        match old {
            Some(o) if o.mac == self.mac(value) => Ok(o.clone()),
            _ => self.seal(name, value),
        }
    }

    pub fn open(&self, name: &str, s: &Sealed) -> Result<Vec<u8>, SecretsError> {
        let fail = || SecretsError::Open {
            name: name.to_string(),
        };
        let raw = STANDARD.decode(&s.sealed).map_err(|_| fail())?;
        if raw.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| fail())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_name_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let s = Sealer::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = s.seal("db", b"canary-value").unwrap();
        assert!(!sealed.sealed.contains("canary"));
        assert!(!format!("{sealed:?}").contains(&sealed.mac));
        assert_eq!(s.open("db", &sealed).unwrap(), b"canary-value");
        assert!(s.open("other", &sealed).is_err());
        // The same key again: the same digest, so an unchanged value is kept.
        let again = Sealer::load_or_create(&path).unwrap();
        assert_eq!(again.open("db", &sealed).unwrap(), b"canary-value");
        assert_eq!(
            again.reseal("db", b"canary-value", Some(&sealed)).unwrap(),
            sealed
        );
        assert_ne!(again.reseal("db", b"new", Some(&sealed)).unwrap(), sealed);
        std::fs::write(&path, b"short").unwrap();
        assert!(Sealer::load_or_create(&path).is_err());
    }

    #[test]
    fn names_are_checked_like_job_secrets() {
        let s = |n: &str, v: &[u8]| JobSecret {
            name: n.into(),
            value: v.to_vec(),
        };
        assert!(check_names(&[s("db.pass", b"x"), s("tok", b"y")]).is_ok());
        assert!(check_names(&[s("../x", b"x")]).is_err());
        assert!(check_names(&[s("a", b"x"), s("a", b"y")]).is_err());
        let e = check_names(&[s("a", b"")]).unwrap_err();
        assert!(e.contains("no value"), "{e}");
    }
}
