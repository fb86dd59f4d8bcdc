//! Tests of what only the embedded store does: its file (refused when
//! empty, private), restarts (jobs and renewals kept across them), and
//! log reassembly under arbitrary delivery (a property test). What every
//! backend does is tested in `store::conformance`.

use super::*;
use crate::model::{JobState, StatusReport};
use crate::store::conformance::spec;

#[tokio::test]
async fn an_empty_store_file_is_refused_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    std::fs::write(&path, b"").unwrap();
    let e = SqliteStore::open(&path).err().expect("refused");
    assert!(matches!(e, StoreError::Empty { .. }), "{e}");
    std::fs::remove_file(&path).unwrap();
    let s = SqliteStore::open(&path).unwrap();
    s.insert_job("j".into(), spec()).await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", path.display());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{p}");
    }
}

#[tokio::test]
async fn jobs_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.insert_job("j1".into(), spec()).await.unwrap();
        s.insert_job("j2".into(), spec()).await.unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let q = s.queued_jobs(10).await.unwrap();
    assert_eq!(
        q.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["j1", "j2"]
    );
}

#[tokio::test]
async fn renewals_in_memory_keep_every_fence_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let s = SqliteStore::open(&path).unwrap();
    s.insert_job("j".into(), spec()).await.unwrap();
    // A lease granted with no time to live, renewed in memory only.
    let j = s
        .lease_job("j".into(), "a".into(), 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((j.epoch, s.held_count("a")), (1, 1));
    let (renewed, revoked) = s.renew_held("a", vec![("j".into(), 1)], 0);
    assert_eq!((renewed.len(), revoked.len()), (1, 0));
    // Another agent, or an older epoch, is never renewed.
    let (renewed, revoked) = s.renew_held("b", vec![("j".into(), 1), ("j".into(), 0)], 60_000);
    assert_eq!((renewed.len(), revoked.len()), (0, 2));
    // The control plane stops without a word (the renewal was never written).
    drop(s);
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.held_by("a"), [("j".to_string(), 1)]);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let exp = s.expire_leases().await.unwrap();
    assert!(
        matches!(&exp[..], [Expired::Requeued { job: j, .. }] if j.id == "j"),
        "{exp:?}"
    );
    assert_eq!(s.held_count("a"), 0);
    let j = s
        .lease_job("j".into(), "b".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.epoch, 2, "a re-leased job gets a higher epoch");
    // The old holder is refused everywhere.
    let (_, revoked) = s.renew_held("a", vec![("j".into(), 1)], 60_000);
    assert_eq!(revoked, [("j".to_string(), 1)]);
    assert!(matches!(
        s.append_log(
            "j".into(),
            1,
            "a".into(),
            0,
            bytes::Bytes::from_static(b"x")
        )
        .await,
        Err(StoreError::Stale { .. })
    ));
    let done = StatusReport {
        state: JobState::Succeeded,
        exit_code: Some(0),
        message: String::new(),
        log_total: 0,
        oom_killed: false,
    };
    assert!(matches!(
        s.report("j".into(), 1, "a".into(), done.clone()).await,
        Err(StoreError::Stale { .. })
    ));
    // The new holder's renewals keep the lease past the sweep.
    s.renew_held("b", vec![("j".into(), 2)], 60_000);
    assert!(s.expire_leases().await.unwrap().is_empty());
    s.report("j".into(), 2, "b".into(), done).await.unwrap();
    assert_eq!(s.held_count("b"), 0, "a final status ends the held lease");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Chunks delivered out of order and duplicated, with the agent
    /// resending from the acknowledged offset (as it does after every
    /// reconnect), reassemble into exactly the original log.
    #[test]
    fn log_reassembles_from_out_of_order_and_duplicated_chunks(
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..4000),
        cuts in proptest::collection::vec(1usize..400, 1..30),
        order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 1..60),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = SqliteStore::open(&dir.path().join("db")).unwrap();
            s.insert_job("j".into(), spec()).await.unwrap();
            s.lease_job("j".into(), "a".into(), 60_000).await.unwrap().unwrap();
            // Split into chunks at arbitrary points.
            let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut pos = 0usize;
            for c in cuts.iter().cycle() {
                if pos >= data.len() { break; }
                let end = (pos + c).min(data.len());
                chunks.push((pos as u64, data[pos..end].to_vec()));
                pos = end;
            }
            // Deliver a random sequence (out of order, with duplicates).
            let mut acked = 0u64;
            for i in &order {
                let (off, d) = i.get(&chunks).clone();
                match s.append_log("j".into(), 1, "a".into(), off, d.into()).await {
                    Ok(a) => { assert!(a >= acked, "the ack never goes back"); acked = a; }
                    Err(StoreError::Gap { acked: a, .. }) => assert_eq!(a, acked),
                    Err(e) => panic!("{e}"),
                }
            }
            // The agent resends everything from the acknowledged offset.
            for (off, d) in &chunks {
                if off + d.len() as u64 > acked {
                    acked = s.append_log("j".into(), 1, "a".into(), *off, d.clone().into()).await.unwrap();
                }
            }
            assert_eq!(acked, data.len() as u64);
            assert_eq!(s.read_log("j".into(), 1, 0, usize::MAX).await.unwrap(), data);
        });
    }
}
