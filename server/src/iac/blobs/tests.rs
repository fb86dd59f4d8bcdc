//! Each case runs on both places: the directory (embedded store) and the
//! `iac_blobs` table (PostgreSQL).

use super::*;
use crate::store::conformance::conformance;

conformance! {
    round_trip => sqlite_round_trip, postgres_round_trip;
    corruption_is_detected => sqlite_corruption_is_detected, postgres_corruption_is_detected;
    missing_is_not_found => sqlite_missing_is_not_found, postgres_missing_is_not_found;
    concurrent_puts_agree => sqlite_concurrent_puts_agree, postgres_concurrent_puts_agree;
}

const HELLO: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// The blobs of `s`, with a directory in `tmp` for the embedded store.
fn blobs(s: &Store, tmp: &tempfile::TempDir) -> Blobs {
    Blobs::for_store(s, tmp.path().join("blobs"))
}

/// Checks that the place chosen is the store's.
fn check_place(s: &Store, b: &Blobs) {
    match (&b.place, s.pg().is_some()) {
        (Place::Dir(_), false) | (Place::Pg(_), true) => {}
        _ => panic!("blobs of {b:?} do not follow the store"),
    }
}

async fn round_trip(s: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let b = blobs(&s, &tmp);
    check_place(&s, &b);
    let d = b.put(b"hello".to_vec()).await.unwrap();
    assert_eq!(d, HELLO);
    assert_eq!(b.get(&d).await.unwrap(), b"hello");
    // Putting it again is a no-op.
    assert_eq!(b.put(b"hello".to_vec()).await.unwrap(), HELLO);
    assert_eq!(b.get(&d).await.unwrap(), b"hello");
    // Empty and binary blobs too.
    let empty = b.put(Vec::new()).await.unwrap();
    assert_eq!(b.get(&empty).await.unwrap(), b"");
    let bin: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let d = b.put(bin.clone()).await.unwrap();
    assert_eq!(b.get(&d).await.unwrap(), bin);
    // A name that is not a digest never reaches the place.
    assert!(matches!(b.get("../x").await, Err(IacError::BadRequest(_))));
    assert!(matches!(
        b.get(&HELLO.to_uppercase()).await,
        Err(IacError::BadRequest(_))
    ));
}

async fn corruption_is_detected(s: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let b = blobs(&s, &tmp);
    let d = b.put(b"hello".to_vec()).await.unwrap();
    match s.pg() {
        Some(pool) => {
            let c = pool.get().await.unwrap();
            let n = c
                .execute(
                    "UPDATE iac_blobs SET data = $2 WHERE digest = $1",
                    &[&d, &b"hellp".to_vec()],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
        None => std::fs::write(tmp.path().join("blobs").join(&d), b"hellp").unwrap(),
    }
    let err = b.get(&d).await.unwrap_err();
    assert!(
        matches!(err, IacError::Blob { op: "verify", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("corrupt"), "{err}");
}

async fn missing_is_not_found(s: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let b = blobs(&s, &tmp);
    // Before anything was put (no directory yet) and after.
    assert!(matches!(b.get(HELLO).await, Err(IacError::NotFound(_))));
    b.put(b"other".to_vec()).await.unwrap();
    let err = b.get(HELLO).await.unwrap_err();
    assert!(matches!(err, IacError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains(HELLO), "{err}");
}

async fn concurrent_puts_agree(s: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (blobs(&s, &tmp), blobs(&s, &tmp));
    for i in 0..20u32 {
        let data = format!("blob {i}").repeat(1000).into_bytes();
        let (da, db) = tokio::join!(a.put(data.clone()), b.put(data.clone()));
        let (da, db) = (da.unwrap(), db.unwrap());
        assert_eq!(da, db);
        assert_eq!(a.get(&db).await.unwrap(), data);
        assert_eq!(b.get(&da).await.unwrap(), data);
    }
    match s.pg() {
        Some(pool) => {
            let c = pool.get().await.unwrap();
            let n: i64 = c
                .query_one("SELECT COUNT(*) FROM iac_blobs", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 20);
        }
        None => {
            let names: Vec<_> = std::fs::read_dir(tmp.path().join("blobs"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names.len(), 20, "no temporary file left: {names:?}");
            assert!(names.iter().all(|n| check_digest(n).is_ok()), "{names:?}");
        }
    }
}

/// Two replicas (two stores on one database): a blob put through either
/// is read through the other, concurrent puts of the same bytes store one
/// row, and the row records the blob's size.
#[tokio::test]
async fn postgres_blobs_are_shared_by_replicas() {
    let Some(url) = crate::store::postgres::testdb::fresh_db().await else {
        return;
    };
    let (one, two) = tokio::join!(Store::postgres(&url), Store::postgres(&url));
    let (one, two) = (one.unwrap(), two.unwrap());
    let tmp = tempfile::tempdir().unwrap();
    // Different directories: only the table is shared.
    let a = Blobs::for_store(&one, tmp.path().join("a"));
    let b = Blobs::for_store(&two, tmp.path().join("b"));
    let d = a.put(b"from one".to_vec()).await.unwrap();
    assert_eq!(b.get(&d).await.unwrap(), b"from one");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let blobs = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { blobs.put(b"same bytes".to_vec()).await })
        })
        .collect();
    let mut digests = std::collections::BTreeSet::new();
    for t in tasks {
        digests.insert(
            tokio::time::timeout(std::time::Duration::from_secs(30), t)
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(digests.len(), 1);
    let same = digests.pop_first().unwrap();
    assert_eq!(a.get(&same).await.unwrap(), b"same bytes");
    let c = one.pg().unwrap().get().await.unwrap();
    let rows = c
        .query(
            "SELECT size FROM iac_blobs WHERE digest = $1",
            &[&same.as_str()],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), 10);
    assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists());
}
