//! The control plane as an OpenID Connect issuer of per-job web-identity
//! tokens, which agents exchange with STS `AssumeRoleWithWebIdentity`.
//!
//! Tokens are JWTs signed with ES256 (a P-256 key in the data directory,
//! mode 0600, created on first use). The public key is published in OIDC
//! discovery form (`outpost oidc publish --out DIR` writes
//! `.well-known/openid-configuration` and `jwks.json` to be hosted at the
//! issuer URL, e.g. in an S3 bucket like an EKS IRSA issuer), so that an IAM
//! OIDC identity provider can trust it.
//!
//! Claims: `iss`, `aud`, `sub` = `job:<job_id>`, `iat`, `nbf`, `exp`, `jti`;
//! `outpost` = `{job_id, epoch, agent, labels}`; and the AWS claims
//! `https://aws.amazon.com/source_identity` = `outpost-<job_id>` and
//! `https://aws.amazon.com/tags` (principal tag `outpost-job` = the job id,
//! transitive). Tokens are secrets: they are never logged.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

/// Default audience: what IAM expects for `AssumeRoleWithWebIdentity`.
pub const DEFAULT_AUDIENCE: &str = "sts.amazonaws.com";
/// Default issuer URL: a placeholder until one that IAM can reach is configured.
pub const DEFAULT_ISSUER: &str = "https://oidc.outpost.invalid";
/// Longest token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Session-tag key holding the job id.
pub const JOB_TAG: &str = "outpost-job";

/// Errors of the issuer. Messages never contain a token.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("reading the oidc signing key {} failed", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {} failed", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the oidc signing key {} is not a P-256 PKCS#8 key", path.display())]
    BadKey { path: PathBuf },
    #[error("generating an oidc signing key failed")]
    Generate,
    #[error("signing a token for job {job_id} failed")]
    Sign { job_id: String },
    #[error("invalid oidc issuer {issuer:?}: {reason}")]
    Issuer {
        issuer: String,
        reason: &'static str,
    },
    #[error("token verification failed: {0}")]
    Invalid(&'static str),
}

/// Issuer settings of the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// `https://` URL where the discovery document is hosted (`iss`).
    pub issuer: String,
    /// `aud` of every token.
    pub audience: String,
    /// Token lifetime for jobs without a timeout (a job with one gets its
    /// timeout plus 15 minutes); capped at 24h. The token must outlive the
    /// job: the agent presents it again at every credentials refresh.
    pub token_ttl: Duration,
    /// PKCS#8 file of the signing key (created if missing).
    pub key_file: PathBuf,
}

impl OidcConfig {
    /// Defaults with the key in `data_dir/oidc-signing-key.p8`.
    pub fn new(data_dir: &Path) -> Self {
        OidcConfig {
            issuer: DEFAULT_ISSUER.to_string(),
            audience: DEFAULT_AUDIENCE.to_string(),
            token_ttl: Duration::from_secs(6 * 3600),
            key_file: data_dir.join("oidc-signing-key.p8"),
        }
    }

    /// Lifetime of the token of a job with `timeout` (zero: none).
    pub fn ttl_for(&self, timeout: Duration) -> Duration {
        let ttl = if timeout.is_zero() {
            self.token_ttl
        } else {
            timeout + Duration::from_secs(15 * 60)
        };
        ttl.min(MAX_TOKEN_TTL)
    }
}

/// Who a token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobClaims {
    pub job_id: String,
    pub epoch: u64,
    pub agent: String,
    pub labels: BTreeMap<String, String>,
}

/// The signing side: key, key id and settings.
pub struct Issuer {
    cfg: OidcConfig,
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
    /// Hex SHA-256 of the public key (the uncompressed point).
    fingerprint: String,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.cfg.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Loads the signing key, creating it (mode 0600) if it does not exist.
    pub fn load_or_create(cfg: OidcConfig) -> Result<Issuer, OidcError> {
        check_issuer(&cfg.issuer)?;
        let rng = SystemRandom::new();
        let path = cfg.key_file.clone();
        let pkcs8 = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc =
                    EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                        .map_err(|_| OidcError::Generate)?;
                write_private(&path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
            Err(source) => return Err(OidcError::ReadKey { path, source }),
        };
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
                .map_err(|_| OidcError::BadKey { path: path.clone() })?;
        let kid = thumbprint(&jwk_of(key.public_key().as_ref()));
        let fingerprint = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Issuer {
            cfg,
            key,
            kid,
            rng,
            fingerprint,
        })
    }

    /// Hex SHA-256 of the signing key's public key: the same on every
    /// control plane that signs with this key.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn config(&self) -> &OidcConfig {
        &self.cfg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mints a token for `claims`, valid from `now` for `ttl`.
    pub fn mint(
        &self,
        claims: &JobClaims,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<String, OidcError> {
        let iat = unix(now);
        let exp = iat + ttl.min(MAX_TOKEN_TTL).as_secs();
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let payload = json!({
            "iss": self.cfg.issuer,
            "aud": self.cfg.audience,
            "sub": format!("job:{}", claims.job_id),
            "iat": iat,
            "nbf": iat.saturating_sub(60),
            "exp": exp,
            "jti": uuid::Uuid::new_v4().to_string(),
            "outpost": {
                "job_id": claims.job_id,
                "epoch": claims.epoch,
                "agent": claims.agent,
                "labels": claims.labels,
            },
            "https://aws.amazon.com/source_identity": source_identity(&claims.job_id),
            "https://aws.amazon.com/tags": {
                "principal_tags": { JOB_TAG: [claims.job_id] },
                "transitive_tag_keys": [JOB_TAG],
            },
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(payload.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| OidcError::Sign {
                job_id: claims.job_id.clone(),
            })?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
    }

    /// The JSON Web Key Set with the public key.
    pub fn jwks(&self) -> Value {
        let mut jwk = jwk_of(self.key.public_key().as_ref());
        if let Some(o) = jwk.as_object_mut() {
            o.insert("kid".into(), json!(self.kid));
            o.insert("alg".into(), json!("ES256"));
            o.insert("use".into(), json!("sig"));
        }
        json!({ "keys": [jwk] })
    }

    /// The OpenID discovery document.
    pub fn discovery(&self) -> Value {
        let issuer = self.cfg.issuer.trim_end_matches('/');
        json!({
            "issuer": self.cfg.issuer,
            "jwks_uri": format!("{issuer}/jwks.json"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "claims_supported": ["sub", "aud", "iss", "iat", "exp", "nbf", "jti"],
        })
    }

    /// Writes `.well-known/openid-configuration` and `jwks.json` under `dir`.
    pub fn publish(&self, dir: &Path) -> Result<Vec<PathBuf>, OidcError> {
        let discovery = dir.join(".well-known").join("openid-configuration");
        let jwks = dir.join("jwks.json");
        for (path, doc) in [(&discovery, self.discovery()), (&jwks, self.jwks())] {
            let write = || -> std::io::Result<()> {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
                std::fs::write(path, text + "\n")
            };
            write().map_err(|source| OidcError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(vec![discovery, jwks])
    }
}

fn check_issuer(issuer: &str) -> Result<(), OidcError> {
    let bad = |reason| OidcError::Issuer {
        issuer: issuer.to_string(),
        reason,
    };
    let Some(rest) = issuer.strip_prefix("https://") else {
        return Err(bad("it must be an https:// URL"));
    };
    if rest.is_empty() || rest.contains(['?', '#']) {
        return Err(bad("it must name a host and have no query or fragment"));
    }
    Ok(())
}

/// `outpost-<job_id>` within SourceIdentity's alphabet and 64 characters.
pub fn source_identity(job_id: &str) -> String {
    let mut s: String = format!("outpost-{job_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(64);
    s
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), OidcError> {
    let write = || -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|source| OidcError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The public JWK (`kty`, `crv`, `x`, `y`) of an uncompressed P-256 point.
fn jwk_of(point: &[u8]) -> Value {
    let (x, y) = point
        .get(1..)
        .map(|xy| xy.split_at(xy.len() / 2))
        .unwrap_or_default();
    json!({ "kty": "EC", "crv": "P-256", "x": B64.encode(x), "y": B64.encode(y) })
}

/// RFC 7638 thumbprint of an EC JWK: the key id.
fn thumbprint(jwk: &Value) -> String {
    let canonical = format!(
        r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap_or_default(),
        jwk["kty"].as_str().unwrap_or_default(),
        jwk["x"].as_str().unwrap_or_default(),
        jwk["y"].as_str().unwrap_or_default(),
    );
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// Verifies a token against a published JWKS the way a relying party (IAM)
/// does: signature by a key of the set (by `kid`), `iss`, `aud`, and the time
/// window. Returns the claims.
pub fn verify(
    token: &str,
    jwks: &Value,
    issuer: &str,
    audience: &str,
    now: SystemTime,
) -> Result<Value, OidcError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OidcError::Invalid("not a compact JWS"));
    };
    let decode = |part: &str| {
        B64.decode(part)
            .map_err(|_| OidcError::Invalid("bad base64url"))
    };
    let header: Value =
        serde_json::from_slice(&decode(h)?).map_err(|_| OidcError::Invalid("bad header"))?;
    if header["alg"] != "ES256" {
        return Err(OidcError::Invalid("unexpected algorithm"));
    }
    let kid = header["kid"].as_str().ok_or(OidcError::Invalid("no kid"))?;
    let key = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == kid))
        .ok_or(OidcError::Invalid("unknown kid"))?;
    let coord = |name: &str| {
        key[name]
            .as_str()
            .and_then(|v| B64.decode(v).ok())
            .filter(|v| v.len() == 32)
            .ok_or(OidcError::Invalid("bad key"))
    };
    let mut point = vec![4u8];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    let public = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point);
    public
        .verify(format!("{h}.{p}").as_bytes(), &decode(s)?)
        .map_err(|_| OidcError::Invalid("bad signature"))?;
    let claims: Value =
        serde_json::from_slice(&decode(p)?).map_err(|_| OidcError::Invalid("bad payload"))?;
    if claims["iss"] != issuer {
        return Err(OidcError::Invalid("wrong issuer"));
    }
    if claims["aud"] != audience {
        return Err(OidcError::Invalid("wrong audience"));
    }
    let now = unix(now);
    let exp = claims["exp"].as_u64().ok_or(OidcError::Invalid("no exp"))?;
    let nbf = claims["nbf"].as_u64().unwrap_or(0);
    if now >= exp {
        return Err(OidcError::Invalid("expired"));
    }
    if now < nbf {
        return Err(OidcError::Invalid("not yet valid"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(dir: &Path) -> Issuer {
        Issuer::load_or_create(OidcConfig {
            issuer: "https://oidc.example.test/outpost".into(),
            ..OidcConfig::new(dir)
        })
        .unwrap()
    }

    fn claims() -> JobClaims {
        JobClaims {
            job_id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            epoch: 3,
            agent: "build-01".into(),
            labels: [("pool".to_string(), "terraform".to_string())].into(),
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn minted_tokens_verify_with_the_published_jwks_and_carry_the_claims() {
        let dir = tempfile::tempdir().unwrap();
        let iss = issuer(dir.path());
        let token = iss
            .mint(&claims(), now(), Duration::from_secs(3600))
            .unwrap();
        let c = verify(
            &token,
            &iss.jwks(),
            "https://oidc.example.test/outpost",
            DEFAULT_AUDIENCE,
            now(),
        )
        .unwrap();
        assert_eq!(c["sub"], "job:0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(c["aud"], "sts.amazonaws.com");
        assert_eq!(c["exp"].as_u64().unwrap(), 1_800_003_600);
        assert!(
            c["iat"].is_u64() && c["nbf"].is_u64(),
            "integer timestamps (STS requires them)"
        );
        assert_eq!(c["outpost"]["epoch"], 3);
        assert_eq!(c["outpost"]["agent"], "build-01");
        assert_eq!(c["outpost"]["labels"]["pool"], "terraform");
        assert_eq!(
            c["https://aws.amazon.com/source_identity"],
            "outpost-0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        );
        assert_eq!(
            c["https://aws.amazon.com/tags"]["principal_tags"][JOB_TAG][0],
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        );
        // The published documents point at each other.
        let d = iss.discovery();
        assert_eq!(d["issuer"], "https://oidc.example.test/outpost");
        assert_eq!(d["jwks_uri"], "https://oidc.example.test/outpost/jwks.json");
        assert_eq!(iss.jwks()["keys"][0]["kid"], iss.kid());
    }

    #[test]
    fn verification_rejects_expiry_tampering_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let iss = issuer(dir.path());
        let jwks = iss.jwks();
        let token = iss.mint(&claims(), now(), Duration::from_secs(60)).unwrap();
        let check = |t: &str, at: SystemTime| {
            verify(
                t,
                &jwks,
                "https://oidc.example.test/outpost",
                DEFAULT_AUDIENCE,
                at,
            )
        };
        assert!(check(&token, now() + Duration::from_secs(59)).is_ok());
        assert!(matches!(
            check(&token, now() + Duration::from_secs(60)),
            Err(OidcError::Invalid("expired"))
        ));
        assert!(
            check(&token, now() - Duration::from_secs(120)).is_err(),
            "not yet valid"
        );
        // A changed payload breaks the signature.
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut payload: Value = serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
        payload["sub"] = json!("job:another");
        parts[1] = B64.encode(payload.to_string());
        assert!(matches!(
            check(&parts.join("."), now()),
            Err(OidcError::Invalid("bad signature"))
        ));
        // Another issuer's key (same kid forged) does not verify.
        let other_dir = tempfile::tempdir().unwrap();
        let other = issuer(other_dir.path());
        let forged = other
            .mint(&claims(), now(), Duration::from_secs(60))
            .unwrap();
        assert!(check(&forged, now()).is_err());
        // Wrong audience or issuer.
        assert!(
            verify(
                &token,
                &jwks,
                "https://oidc.example.test/outpost",
                "other",
                now()
            )
            .is_err()
        );
        assert!(verify(&token, &jwks, "https://evil.test", DEFAULT_AUDIENCE, now()).is_err());
    }

    #[test]
    fn the_key_persists_with_mode_0600_and_publishes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = issuer(dir.path());
        let b = issuer(dir.path());
        assert_eq!(a.kid(), b.kid(), "the same key after a restart");
        let mode = std::fs::metadata(dir.path().join("oidc-signing-key.p8"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let out = tempfile::tempdir().unwrap();
        let files = a.publish(out.path()).unwrap();
        assert_eq!(files.len(), 2);
        let jwks: Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("jwks.json")).unwrap())
                .unwrap();
        let token = a
            .mint(&claims(), SystemTime::now(), Duration::from_secs(60))
            .unwrap();
        verify(
            &token,
            &jwks,
            "https://oidc.example.test/outpost",
            DEFAULT_AUDIENCE,
            SystemTime::now(),
        )
        .unwrap();
        assert!(
            out.path()
                .join(".well-known/openid-configuration")
                .is_file()
        );
    }

    #[test]
    fn token_lifetime_follows_the_job_timeout_within_bounds() {
        let c = OidcConfig::new(Path::new("/x"));
        assert_eq!(c.ttl_for(Duration::ZERO), Duration::from_secs(6 * 3600));
        assert_eq!(
            c.ttl_for(Duration::from_secs(3600)),
            Duration::from_secs(4500)
        );
        assert_eq!(c.ttl_for(Duration::from_secs(100 * 3600)), MAX_TOKEN_TTL);
        assert!(
            Issuer::load_or_create(OidcConfig {
                issuer: "http://insecure".into(),
                ..OidcConfig::new(Path::new("/nonexistent"))
            })
            .is_err()
        );
    }

    #[test]
    fn errors_and_debug_do_not_contain_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let iss = issuer(dir.path());
        let token = iss.mint(&claims(), now(), Duration::from_secs(60)).unwrap();
        let e = verify(&token, &json!({"keys": []}), "x", "y", now()).unwrap_err();
        assert!(!e.to_string().contains(&token));
        assert!(!format!("{iss:?}").contains("PRIVATE"));
    }
}
