//! The pool key: an age x25519 identity that every agent of a pool holds
//! (`[iac] pool_key_file`). Plan bundles and state versions are encrypted to
//! its recipient (the public key, derived from the identity) before they
//! leave the agent, so the control plane only ever stores ciphertext; it
//! never holds the identity. Operators who write a state version by hand
//! (`outpost state push`) encrypt to the recipient alone (`pool.pub`).

use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;

/// The pool's identity (private) and recipient (public).
pub struct PoolKey {
    identity: age::x25519::Identity,
}

impl std::fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolKey")
            .field("recipient", &self.recipient_string())
            .finish()
    }
}

impl PoolKey {
    /// Reads an identity file (`AGE-SECRET-KEY-1…`; `#` comments and blank
    /// lines ignored). The error never contains the key.
    pub fn load(path: &Path) -> Result<PoolKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| "it holds no age identity".to_string())?;
        let identity = age::x25519::Identity::from_str(line).map_err(|_| {
            "it does not hold an age x25519 identity (AGE-SECRET-KEY-1…)".to_string()
        })?;
        Ok(PoolKey { identity })
    }

    /// A new random identity.
    pub fn generate() -> PoolKey {
        PoolKey {
            identity: age::x25519::Identity::generate(),
        }
    }

    /// Writes the identity to `key` (mode 0600, created new) and its
    /// recipient to `public`.
    pub fn write(&self, key: &Path, public: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = key.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key)?;
        writeln!(
            f,
            "# outpost pool key; public key: {}",
            self.recipient_string()
        )?;
        writeln!(f, "{}", self.identity.to_string().expose_secret())?;
        f.sync_all()?;
        std::fs::write(public, format!("{}\n", self.recipient_string()))
    }

    pub fn recipient_string(&self) -> String {
        self.identity.to_public().to_string()
    }

    /// Encrypts to this pool's recipient.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
        age::encrypt(&self.identity.to_public(), plain).map_err(|e| e.to_string())
    }

    /// Decrypts what was sealed to this pool; any changed byte is refused.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        age::decrypt(&self.identity, sealed).map_err(|e| e.to_string())
    }
}

/// Encrypts to a recipient given as text (`age1…`), for holders of the
/// public key only.
pub fn seal_to(recipient: &str, plain: &[u8]) -> Result<Vec<u8>, String> {
    let r = age::x25519::Recipient::from_str(recipient.trim())
        .map_err(|e| format!("not an age x25519 recipient (age1…): {e}"))?;
    age::encrypt(&r, plain).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_whole_and_only_with_the_pool_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = PoolKey::generate();
        let (key, public) = (dir.path().join("pool.key"), dir.path().join("pool.pub"));
        k.write(&key, &public).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k = PoolKey::load(&key).unwrap();
        let sealed = k.seal(b"plan canary").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"canary"));
        assert_eq!(k.open(&sealed).unwrap(), b"plan canary");
        let by_public = seal_to(&std::fs::read_to_string(&public).unwrap(), b"state").unwrap();
        assert_eq!(k.open(&by_public).unwrap(), b"state");
        for i in [0, sealed.len() / 2, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(k.open(&bad).is_err(), "byte {i} changed");
        }
        assert!(PoolKey::generate().open(&sealed).is_err());
        std::fs::write(dir.path().join("bad"), "not a key").unwrap();
        let e = PoolKey::load(&dir.path().join("bad")).unwrap_err();
        assert!(e.contains("age x25519 identity"), "{e}");
        assert!(!format!("{k:?}").contains("SECRET"));
    }
}
