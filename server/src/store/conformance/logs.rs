//! Logs: a chunk is stored once however often it is sent, contiguously
//! from offset 0, only by the job's current lease; a group-commit batch
//! stores its good chunks and refuses only its bad ones.

use super::{b, conformance, spec};
use crate::store::{Store, StoreError};

conformance! {
    log_append_is_exactly_once_and_fenced =>
        sqlite_log_append_is_exactly_once_and_fenced,
        postgres_log_append_is_exactly_once_and_fenced;
    a_batch_stores_every_good_chunk_and_refuses_only_the_bad_ones =>
        sqlite_a_batch_stores_every_good_chunk_and_refuses_only_the_bad_ones,
        postgres_a_batch_stores_every_good_chunk_and_refuses_only_the_bad_ones;
}

async fn log_append_is_exactly_once_and_fenced(s: Store) {
    s.insert_job("j1".into(), spec()).await.unwrap();
    let j = s
        .lease_job("j1".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.epoch, 1);
    let append = |off, data: &str| s.append_log("j1".into(), 1, "a".into(), off, b(data));
    assert_eq!(append(0, "hello ").await.unwrap(), 6);
    // A repeat is trimmed, an overlap stores only its new bytes, a gap is refused.
    assert_eq!(append(0, "hello ").await.unwrap(), 6);
    assert_eq!(append(3, "lo world").await.unwrap(), 11);
    assert!(matches!(
        append(20, "x").await,
        Err(StoreError::Gap { acked: 11, .. })
    ));
    // A stale epoch and a wrong agent are refused.
    assert!(matches!(
        s.append_log("j1".into(), 0, "a".into(), 11, b("x")).await,
        Err(StoreError::Stale { .. })
    ));
    assert!(matches!(
        s.append_log("j1".into(), 1, "b".into(), 11, b("x")).await,
        Err(StoreError::Stale { .. })
    ));
    let read = |off, max| s.read_log("j1".into(), 1, off, max);
    assert_eq!(read(0, 1 << 20).await.unwrap(), b"hello world");
    assert_eq!(read(4, 1 << 20).await.unwrap(), b"o world");
    assert_eq!(read(11, 1 << 20).await.unwrap(), b"");
    assert_eq!(
        read(0, 1).await.unwrap(),
        b"hello ",
        "whole chunks up to max"
    );
    assert_eq!(s.read_log("j1".into(), 2, 0, 1 << 20).await.unwrap(), b"");
    assert_eq!(s.get_job("j1".into()).await.unwrap().unwrap().log_acked, 11);
}

async fn a_batch_stores_every_good_chunk_and_refuses_only_the_bad_ones(s: Store) {
    for id in ["j1", "j2"] {
        s.insert_job(id.into(), spec()).await.unwrap();
        s.lease_job(id.into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
    }
    // Queued back to back, so that they share transactions.
    let mut pending = Vec::new();
    for (id, epoch, offset, data) in [
        ("j1", 1, 0, "aaa"),
        ("j2", 1, 0, "bbb"),
        ("j1", 1, 10, "gap"),
        ("j2", 7, 3, "stale"),
        ("j1", 1, 3, "ccc"),
    ] {
        pending.push(
            s.append_log_queued(id.into(), epoch, "a".into(), offset, b(data))
                .await
                .unwrap(),
        );
    }
    let mut results = Vec::new();
    for d in pending {
        results.push(d.await);
    }
    assert!(matches!(results[0], Ok(3)));
    assert!(matches!(results[1], Ok(3)));
    assert!(matches!(results[2], Err(StoreError::Gap { acked: 3, .. })));
    assert!(matches!(results[3], Err(StoreError::Stale { .. })));
    assert!(matches!(results[4], Ok(6)));
    let log = |id: &str| s.read_log(id.into(), 1, 0, 1 << 20);
    assert_eq!(log("j1").await.unwrap(), b"aaaccc");
    assert_eq!(log("j2").await.unwrap(), b"bbb");
    // Heartbeat answers carry the stored offsets.
    let (renewed, _) = s.renew_held("a", vec![("j1".into(), 1)], 60_000);
    assert_eq!(renewed, [("j1".to_string(), 1, 6)]);
}
