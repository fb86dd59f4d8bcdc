//! Agent identity with no long-lived secret on the agent's host.
//!
//! An operator creates an enrolment (`outpost enroll create`): a pool, the
//! labels its agents may claim, a number of uses and an expiry. Its one-time
//! bootstrap token is shown once; the store keeps only its SHA-256. An agent
//! generates its key itself and sends a CSR with the token (`api`,
//! `Enrollment.Enroll`, the only RPC served without a client certificate);
//! it receives a short-lived certificate (`csr`) carrying its name and pool,
//! and renews it over its live session at half its lifetime
//! (`agent_api`, `RenewCertificate`). `outpost agents revoke NAME` ends the
//! agent's session at once and refuses its certificate on every later call
//! (`gate`) and renewal; its leases are not renewed and are re-queued by the
//! lease sweeper once they expire (as for a lost agent, fenced by epoch).
//!
//! **Invariant:** the labels an enrolled agent is matched on are the ones of
//! its hello that its enrolment allows ([`Registry::bound_labels`]).
//!
//! **Several replicas** (a shared PostgreSQL store): any replica enrols,
//! renews and revokes; the store serializes enrolments of one name and
//! uses of one token (`store`). Each replica keeps its records in memory
//! for the gate and the sessions, and reads them again when another
//! replica signals a change (`Signal::Identities`) and every
//! [`RELOAD_EVERY`]: a revocation made anywhere refuses the agent and ends
//! its sessions on every replica within that time. A session's start and
//! a renewal read the agent's record from the store first, so an agent
//! enrolled a moment ago through another replica is bound to its labels.

pub mod api;
pub mod csr;
pub mod expiry;
pub mod gate;
pub mod session;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::model::now_ms;
use crate::pki::PkiDir;
use crate::replicas::{Bus, Signal};
use crate::store::{Store, StoreError};

/// On a shared store, the records are read again at least this often.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Lifetimes of what enrolment issues.
#[derive(Debug, Clone, Copy)]
pub struct IdentityConfig {
    /// Lifetime of an agent certificate (renewed at half of it).
    pub agent_cert_ttl: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            agent_cert_ttl: Duration::from_secs(3600),
        }
    }
}

/// Why an enrolment or a renewal was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown bootstrap token: create one with `outpost enroll create`")]
    UnknownToken,
    #[error("the bootstrap token was already used; create a new one with `outpost enroll create`")]
    TokenUsed,
    #[error(
        "the bootstrap token expired at {expires}; create a new one with `outpost enroll create`"
    )]
    TokenExpired { expires: String },
    #[error("this bootstrap token enrols only agent {allowed:?}, not {name:?}")]
    NameNotAllowed { name: String, allowed: String },
    #[error("agent {name:?} belongs to pool {pool:?}; this token enrols another pool")]
    NameTaken { name: String, pool: String },
    #[error("agent {name:?} was revoked; enrol it under another name")]
    Revoked { name: String },
    #[error("the CSR names {csr:?} but the agent is {name:?}")]
    CsrName { csr: String, name: String },
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("invalid agent name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    #[error(
        "agent {0:?} was not enrolled; its certificate cannot be renewed (enrol it with a bootstrap token)"
    )]
    NotEnrolled(String),
    #[error("{0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<EnrollError> for tonic::Status {
    fn from(e: EnrollError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            EnrollError::UnknownToken
            | EnrollError::TokenUsed
            | EnrollError::TokenExpired { .. } => tonic::Status::unauthenticated(msg),
            EnrollError::NameNotAllowed { .. }
            | EnrollError::NameTaken { .. }
            | EnrollError::Revoked { .. }
            | EnrollError::NotEnrolled(_) => tonic::Status::permission_denied(msg),
            EnrollError::CsrName { .. }
            | EnrollError::BadCsr(_)
            | EnrollError::BadName(_)
            | EnrollError::Invalid(_) => tonic::Status::invalid_argument(msg),
            EnrollError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

/// What the control plane knows of one agent name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    pub name: String,
    /// Empty for an agent whose certificate was issued by hand.
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub enrollment_id: String,
    pub cert_not_after_ms: i64,
    /// Zero: not revoked.
    pub revoked_ms: i64,
}

impl IdentityRecord {
    pub fn enrolled(&self) -> bool {
        !self.enrollment_id.is_empty()
    }
}

/// A created enrolment: its token is shown once.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: String,
    pub token: String,
    pub expires_ms: i64,
}

/// What an enrolled agent receives.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate_pem: String,
    pub ttl: Duration,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
}

/// Enrolment, renewal and revocation; revoked names and the labels each
/// enrolled agent may claim are kept in memory (loaded at start; on a
/// shared store, reloaded when another replica changes them and every
/// [`RELOAD_EVERY`]).
pub struct Registry {
    store: Store,
    /// `None` when the CA key is not on this host: enrolment is off.
    ca: Option<Arc<csr::Ca>>,
    config: IdentityConfig,
    records: RwLock<HashMap<String, IdentityRecord>>,
    revocations: watch::Sender<u64>,
    /// The replicas' channel, when the store is shared.
    bus: OnceLock<Arc<Bus>>,
}

impl Registry {
    /// Creates the tables if needed and loads every identity.
    pub async fn load(
        store: Store,
        pki: &PkiDir,
        config: IdentityConfig,
    ) -> Result<Arc<Registry>, StoreError> {
        let ca = match csr::Ca::load(pki) {
            Ok(ca) => Some(Arc::new(ca)),
            Err(e) => {
                tracing::warn!(error = %e, "agent enrolment and renewal are off: the CA cannot sign");
                None
            }
        };
        let records = store::init(&store).await?;
        let (revocations, _) = watch::channel(0);
        Ok(Arc::new(Registry {
            store,
            ca,
            config,
            records: RwLock::new(records.into_iter().map(|r| (r.name.clone(), r)).collect()),
            revocations,
            bus: OnceLock::new(),
        }))
    }

    /// Joins the other replicas of a shared store: tells them through
    /// `bus` after every enrolment, renewal and revocation made here, and
    /// reloads the records when one of them says so, and every
    /// [`RELOAD_EVERY`] in any case (so a lost signal delays a revocation
    /// made elsewhere by that much at most). Stops on `shutdown`.
    pub fn join_replicas(self: &Arc<Self>, bus: Arc<Bus>, shutdown: CancellationToken) {
        let mut signals = bus.identities();
        let _ = self.bus.set(bus);
        let me = Arc::downgrade(self);
        tokio::spawn(
            async move {
                let mut listening = true;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        changed = signals.changed(), if listening => {
                            listening = changed.is_ok();
                        }
                        _ = tokio::time::sleep(RELOAD_EVERY) => {}
                    }
                    let Some(registry) = me.upgrade() else { break };
                    if let Err(e) = registry.reload().await {
                        tracing::warn!(error = %e, "reloading agent identities failed");
                    }
                }
            }
            .instrument(tracing::info_span!("identities_follow")),
        );
    }

    /// Reads every record again from the store. A revocation is never
    /// undone (one made here after the read stays); sessions are told of
    /// every agent revoked since the last read.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let loaded = store::list(&self.store).await?;
        let revoked = {
            let mut records = self.records.write();
            let mut revoked = false;
            for mut r in loaded {
                match records.get(&r.name) {
                    Some(old) if old.revoked_ms > 0 && r.revoked_ms == 0 => {
                        r.revoked_ms = old.revoked_ms;
                    }
                    Some(old) if old.revoked_ms == 0 && r.revoked_ms > 0 => revoked = true,
                    None if r.revoked_ms > 0 => revoked = true,
                    _ => {}
                }
                records.insert(r.name.clone(), r);
            }
            revoked
        };
        if revoked {
            tracing::info!("an agent was revoked on another replica");
            self.revocations.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(())
    }

    /// Reads agent `name`'s record again when the store is shared (it may
    /// have enrolled through another replica moments ago).
    pub async fn refresh(&self, name: &str) -> Result<(), StoreError> {
        if self.store.pg().is_none() {
            return Ok(());
        }
        if let Some(r) = store::get(&self.store, name.to_string()).await? {
            let revoked = r.revoked_ms > 0;
            let mut records = self.records.write();
            let was = records.get(name).is_some_and(|old| old.revoked_ms > 0);
            if !was {
                records.insert(name.to_string(), r);
            }
            drop(records);
            if revoked && !was {
                self.revocations.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
        Ok(())
    }

    /// Tells the other replicas that enrolment records changed.
    fn publish(&self) {
        if let Some(bus) = self.bus.get() {
            bus.publish(Signal::Identities);
        }
    }

    pub fn config(&self) -> IdentityConfig {
        self.config
    }

    /// Whether agent `name` was revoked.
    pub fn is_revoked(&self, name: &str) -> bool {
        self.records
            .read()
            .get(name)
            .is_some_and(|r| r.revoked_ms > 0)
    }

    /// Changes whenever an agent is revoked (sessions watch it).
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    pub fn records(&self) -> Vec<IdentityRecord> {
        let mut v: Vec<_> = self.records.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The labels agent `name` is matched on given those its hello claims,
    /// and the claimed keys ignored: an enrolled agent gets only the claims
    /// its enrolment allows (same key and value); an agent whose certificate
    /// was issued by hand keeps its claims.
    pub fn bound_labels(
        &self,
        name: &str,
        claimed: BTreeMap<String, String>,
    ) -> (BTreeMap<String, String>, Vec<String>) {
        let records = self.records.read();
        let Some(allowed) = records
            .get(name)
            .filter(|r| r.enrolled())
            .map(|r| &r.labels)
        else {
            return (claimed, Vec::new());
        };
        let mut kept = BTreeMap::new();
        let mut ignored = Vec::new();
        for (k, v) in claimed {
            if allowed.get(&k) == Some(&v) {
                kept.insert(k, v);
            } else {
                ignored.push(format!("{k}={v}"));
            }
        }
        (kept, ignored)
    }

    /// Creates an enrolment; returns its token (shown once).
    pub async fn create(
        &self,
        pool: String,
        labels: BTreeMap<String, String>,
        ttl: Duration,
        uses: u32,
        agent_name: String,
    ) -> Result<Created, EnrollError> {
        if !valid_name(&pool) {
            return Err(EnrollError::Invalid(format!(
                "invalid pool name {pool:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )));
        }
        if !agent_name.is_empty() && !valid_name(&agent_name) {
            return Err(EnrollError::BadName(agent_name));
        }
        if uses == 0 || uses > 10_000 {
            return Err(EnrollError::Invalid(format!(
                "uses must be between 1 and 10000, not {uses}"
            )));
        }
        if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
            return Err(EnrollError::Invalid(
                "a bootstrap token lives between 1 ms and 30 days".into(),
            ));
        }
        for (k, v) in &labels {
            if k.is_empty() || k.contains(['=', ',']) || v.contains(',') {
                return Err(EnrollError::Invalid(format!("invalid label {k:?}={v:?}")));
            }
        }
        let token = new_token().map_err(EnrollError::Internal)?;
        let id = uuid::Uuid::now_v7().to_string();
        let expires_ms = now_ms() + ttl.as_millis() as i64;
        store::insert_enrollment(
            &self.store,
            store::NewEnrollment {
                id: id.clone(),
                token_hash: token_hash(&token),
                pool,
                labels,
                agent_name,
                uses,
                expires_ms,
            },
        )
        .await
        .map_err(|e| EnrollError::Internal(e.to_string()))?;
        Ok(Created {
            id,
            token,
            expires_ms,
        })
    }

    /// Enrols agent `name` with `token` and its CSR.
    pub async fn enroll(
        &self,
        token: &str,
        name: &str,
        csr_pem: &str,
    ) -> Result<Issued, EnrollError> {
        if !valid_name(name) {
            return Err(EnrollError::BadName(name.to_string()));
        }
        // The CSR is checked before the token is looked at: a bad CSR
        // consumes nothing.
        csr::check_csr(csr_pem, name)?;
        let ca = self.signer()?;
        let ttl = self.config.agent_cert_ttl;
        let (csr_owned, name_owned) = (csr_pem.to_string(), name.to_string());
        let result = store::enroll(
            &self.store,
            token_hash(token.trim()),
            name.to_string(),
            move |consumed| {
                let signed = ca.sign_agent(&csr_owned, &name_owned, &consumed.pool, ttl)?;
                let not_after = signed.not_after_ms;
                Ok((signed, not_after))
            },
        )
        .await
        .map_err(|e| EnrollError::Internal(e.to_string()))?;
        let (consumed, signed) = result?;
        self.records.write().insert(
            name.to_string(),
            IdentityRecord {
                name: name.to_string(),
                pool: consumed.pool.clone(),
                labels: consumed.labels.clone(),
                enrollment_id: consumed.enrollment_id,
                cert_not_after_ms: signed.not_after_ms,
                revoked_ms: 0,
            },
        );
        self.publish();
        Ok(Issued {
            certificate_pem: signed.pem,
            ttl,
            pool: consumed.pool,
            labels: consumed.labels,
        })
    }

    /// Signs the next certificate of enrolled agent `name`.
    pub async fn renew(&self, name: &str, csr_pem: &str) -> Result<Issued, EnrollError> {
        // On a shared store the record may have changed on another replica.
        self.refresh(name)
            .await
            .map_err(|e| EnrollError::Internal(e.to_string()))?;
        let record = self.records.read().get(name).cloned();
        let record = match record {
            Some(r) if r.revoked_ms > 0 => {
                return Err(EnrollError::Revoked {
                    name: name.to_string(),
                });
            }
            Some(r) if r.enrolled() => r,
            _ => return Err(EnrollError::NotEnrolled(name.to_string())),
        };
        let ttl = self.config.agent_cert_ttl;
        let signed = self
            .signer()?
            .sign_agent(csr_pem, name, &record.pool, ttl)?;
        store::renewed(&self.store, name.to_string(), signed.not_after_ms)
            .await
            .map_err(|e| EnrollError::Internal(e.to_string()))?;
        if let Some(r) = self.records.write().get_mut(name) {
            r.cert_not_after_ms = signed.not_after_ms;
        }
        self.publish();
        Ok(Issued {
            certificate_pem: signed.pem,
            ttl,
            pool: record.pool,
            labels: record.labels,
        })
    }

    fn signer(&self) -> Result<Arc<csr::Ca>, EnrollError> {
        self.ca.clone().ok_or_else(|| {
            EnrollError::Internal("this control plane has no CA key: enrolment is off".into())
        })
    }

    /// Revokes agent `name` (known to the control plane), durably, then
    /// tells every session. Revoking twice keeps the first time.
    pub async fn revoke(&self, name: &str) -> Result<IdentityRecord, EnrollError> {
        if !valid_name(name) {
            return Err(EnrollError::BadName(name.to_string()));
        }
        let known = store::known_agent(&self.store, name.to_string())
            .await
            .map_err(|e| EnrollError::Internal(e.to_string()))?;
        if !known {
            return Err(EnrollError::Invalid(format!(
                "no agent named {name:?} has enrolled or connected"
            )));
        }
        let record = store::revoke(&self.store, name.to_string(), now_ms())
            .await
            .map_err(|e| EnrollError::Internal(e.to_string()))?;
        self.records
            .write()
            .insert(name.to_string(), record.clone());
        self.revocations.send_modify(|v| *v = v.wrapping_add(1));
        self.publish();
        Ok(record)
    }
}

/// Agent and pool names: what `outpost pki issue` accepts.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A new bootstrap token: 256 random bits.
fn new_token() -> Result<String, String> {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system random number generator failed".to_string())?;
    Ok(format!(
        "opb_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// What the store keeps of a token.
fn token_hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A time in ms since the epoch, RFC 3339 (UTC).
pub fn show_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests;
