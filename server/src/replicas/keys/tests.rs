//! The check on a real PostgreSQL database, with keys loaded the way the
//! control plane loads them (files in a data directory).

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::iac::secrets::Sealer;
use crate::oidc::{Issuer, OidcConfig};

/// The two keys of a control plane whose data directory is `dir` (created
/// there if missing).
fn keys_of(dir: &Path) -> Vec<ReplicaKey> {
    let issuer = Issuer::load_or_create(OidcConfig::new(dir)).unwrap();
    let file = dir.join("iac").join("secrets.key");
    let sealer = Sealer::load_or_create(&file).unwrap();
    vec![
        ReplicaKey::oidc(&issuer),
        ReplicaKey::secrets(&sealer, file),
    ]
}

async fn pg_store() -> Option<(String, Store)> {
    let url = crate::store::postgres::testdb::fresh_db().await?;
    let s = Store::postgres(&url).await.unwrap();
    Some((url, s))
}

async fn recorded(s: &Store) -> Vec<(String, String)> {
    let c = s.pg().unwrap().get().await.unwrap();
    c.query(
        "SELECT name, fingerprint FROM replica_keys ORDER BY name",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn keys_fingerprints_follow_the_key_and_reveal_nothing() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ka = keys_of(a.path());
    // The same files again (a restart): the same fingerprints.
    assert_eq!(keys_of(a.path()), ka);
    let kb = keys_of(b.path());
    for (x, y) in ka.iter().zip(&kb) {
        assert_eq!(x.name, y.name);
        assert_ne!(x.fingerprint, y.fingerprint, "{}", x.name);
        assert_eq!(x.fingerprint.len(), 64);
    }
    // The secrets key's fingerprint is neither half of the key nor a
    // digest of the file.
    let secret = std::fs::read(a.path().join("iac").join("secrets.key")).unwrap();
    let hex = outpost_agent::iac::plan::hex(&secret);
    let fp = &ka[1].fingerprint;
    assert!(!hex.contains(fp.as_str()) && !fp.contains(&hex[..16]));
    assert_ne!(fp, &crate::iac::blobs::sha256_hex(&secret));
}

#[tokio::test]
async fn keys_are_not_checked_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("db")).unwrap();
    let k = keys_of(dir.path());
    check_keys(&s, &k).await.unwrap();
    let other = tempfile::tempdir().unwrap();
    check_keys(&s, &keys_of(other.path())).await.unwrap();
}

#[tokio::test]
async fn keys_first_replica_records_same_passes_different_refuses() {
    let Some((url, first)) = pg_store().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_of(dir.path());
    check_keys(&first, &keys).await.unwrap();
    let want: Vec<(String, String)> = keys
        .iter()
        .map(|k| (k.name.to_string(), k.fingerprint.clone()))
        .collect();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(recorded(&first).await, sorted);

    // A second replica with copies of the same files starts.
    let second = Store::postgres(&url).await.unwrap();
    let copy = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(copy.path().join("iac")).unwrap();
    for f in ["oidc-signing-key.p8", "iac/secrets.key"] {
        std::fs::copy(dir.path().join(f), copy.path().join(f)).unwrap();
    }
    check_keys(&second, &keys_of(copy.path())).await.unwrap();
    // So does the first again (a restart).
    check_keys(&first, &keys).await.unwrap();

    // A replica with a fresh data directory refuses, naming both files.
    let fresh = tempfile::tempdir().unwrap();
    let other = keys_of(fresh.path());
    let err = check_keys(&second, &other).await.unwrap_err();
    let KeysError::Differ(d) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(d.len(), 2);
    let msg = err.to_string();
    for k in &other {
        let file = k.file.display().to_string();
        assert!(
            msg.contains(&format!("copy {file} from a running replica")),
            "{msg}"
        );
        assert!(msg.contains(k.name), "{msg}");
    }
    assert!(msg.contains("refusing to start"), "{msg}");
    // Nothing was overwritten.
    assert_eq!(recorded(&first).await, sorted);

    // Only the secrets key differs: only it is named.
    let mixed = vec![keys[0].clone(), other[1].clone()];
    let err = check_keys(&second, &mixed).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(SECRETS_KEY) && !msg.contains(OIDC_SIGNING_KEY),
        "{msg}"
    );
    assert!(
        msg.contains("secrets.key") && !msg.contains("oidc-signing-key.p8"),
        "{msg}"
    );
}

#[tokio::test]
async fn keys_concurrent_first_starts_agree() {
    let Some((url, _s)) = pg_store().await else {
        return;
    };
    // Four replicas start at once, each with keys of its own.
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let keys: Vec<_> = dirs.iter().map(|d| keys_of(d.path())).collect();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Store::postgres(&url).await.unwrap());
    }
    let checks = stores
        .iter()
        .zip(&keys)
        .map(|(s, k)| check_keys(s, k.as_slice()));
    let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(checks))
        .await
        .unwrap();
    // Each key was recorded once, by one replica; a replica whose key lost
    // was refused for that key.
    let rec = recorded(&stores[0]).await;
    assert_eq!(rec.len(), 2);
    for (name, fp) in &rec {
        let holders: Vec<usize> = keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.iter().any(|k| k.name == name && &k.fingerprint == fp))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(holders.len(), 1, "{name}");
        for (i, r) in results.iter().enumerate() {
            let refused_for_it = match r {
                Ok(()) => false,
                Err(KeysError::Differ(d)) => d.iter().any(|d| d.name == name),
                Err(e) => panic!("{e:?}"),
            };
            assert_eq!(refused_for_it, i != holders[0], "replica {i}, key {name}");
        }
    }

    // Four more replicas with one shared pair of keys, on a new database:
    // all start.
    let Some((url, _s)) = pg_store().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shared = keys_of(dir.path());
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Store::postgres(&url).await.unwrap());
    }
    let checks = stores.iter().map(|s| check_keys(s, &shared));
    for r in tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(checks))
        .await
        .unwrap()
    {
        r.unwrap();
    }
}
