//! Tests of the store as a whole: leases, fencing, logs, secrets, pages.

use super::*;
use crate::model::{JobSpec, JobState, StatusReport};

fn spec() -> JobSpec {
    JobSpec {
        image: "img".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn secret_values_are_dropped_once_the_job_is_final() {
    use crate::model::{JobSecret, StatusReport};
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db")).unwrap();
    let with_secret = || JobSpec {
        secrets: vec![JobSecret {
            name: "token".into(),
            value: b"canary-7f3a".to_vec(),
        }],
        ..spec()
    };
    s.insert_job("j1".into(), with_secret()).await.unwrap();
    s.insert_job("j2".into(), with_secret()).await.unwrap();
    let j = s
        .lease_job("j1".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    // A running job keeps them (a re-lease needs them again).
    assert!(j.spec.holds_secret_values());
    let done = s
        .report(
            "j1".into(),
            j.epoch,
            "a".into(),
            StatusReport {
                state: JobState::Succeeded,
                exit_code: Some(0),
                message: String::new(),
                log_total: 0,
                oom_killed: false,
            },
        )
        .await
        .unwrap();
    assert!(!done.spec.holds_secret_values());
    assert_eq!(done.spec.secrets[0].name, "token");
    let j1 = s.get_job("j1".into()).await.unwrap().unwrap();
    assert!(!j1.spec.holds_secret_values());
    // Cancelled before it ran.
    s.request_cancel("j2".into()).await.unwrap();
    let j2 = s.get_job("j2".into()).await.unwrap().unwrap();
    assert!(!j2.spec.holds_secret_values());
    assert_eq!(j2.spec.secrets.len(), 1);
}

#[tokio::test]
async fn log_append_is_exactly_once_and_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db")).unwrap();
    s.insert_job("j1".into(), spec()).await.unwrap();
    let j = s
        .lease_job("j1".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.epoch, 1);
    let b = |s: &str| bytes::Bytes::from(s.to_string());
    assert_eq!(
        s.append_log("j1".into(), 1, "a".into(), 0, b("hello "))
            .await
            .unwrap(),
        6
    );
    // duplicate, overlap, gap
    assert_eq!(
        s.append_log("j1".into(), 1, "a".into(), 0, b("hello "))
            .await
            .unwrap(),
        6
    );
    assert_eq!(
        s.append_log("j1".into(), 1, "a".into(), 3, b("lo world"))
            .await
            .unwrap(),
        11
    );
    assert!(matches!(
        s.append_log("j1".into(), 1, "a".into(), 20, b("x")).await,
        Err(StoreError::Gap { .. })
    ));
    // stale epoch and wrong agent
    assert!(matches!(
        s.append_log("j1".into(), 0, "a".into(), 11, b("x")).await,
        Err(StoreError::Stale { .. })
    ));
    assert!(matches!(
        s.append_log("j1".into(), 1, "b".into(), 11, b("x")).await,
        Err(StoreError::Stale { .. })
    ));
    assert_eq!(
        s.read_log("j1".into(), 1, 0, 1 << 20).await.unwrap(),
        b"hello world"
    );
    assert_eq!(
        s.read_log("j1".into(), 1, 4, 1 << 20).await.unwrap(),
        b"o world"
    );
    assert_eq!(s.read_log("j1".into(), 1, 11, 1 << 20).await.unwrap(), b"");
    assert_eq!(s.read_log("j1".into(), 2, 0, 1 << 20).await.unwrap(), b"");
}

#[tokio::test]
async fn expired_lease_requeues_and_next_lease_has_higher_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db")).unwrap();
    s.insert_job("j1".into(), spec()).await.unwrap();
    s.lease_job("j1".into(), "a".into(), 0)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let exp = s.expire_leases().await.unwrap();
    assert!(
        matches!(&exp[..], [Expired::Requeued { job: j, agent }] if j.state == JobState::Queued && agent == "a")
    );
    // the old lease is refused
    let r = StatusReport {
        state: JobState::Succeeded,
        exit_code: Some(0),
        message: String::new(),
        log_total: 0,
        oom_killed: false,
    };
    assert!(matches!(
        s.report("j1".into(), 1, "a".into(), r.clone()).await,
        Err(StoreError::Stale { .. })
    ));
    let j = s
        .lease_job("j1".into(), "b".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.epoch, 2);
    let j = s.report("j1".into(), 2, "b".into(), r).await.unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert!(j.log_complete());
}

#[tokio::test]
async fn a_lease_never_taken_ends_the_job_failed_after_a_bounded_number_of_tries() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db")).unwrap();
    s.insert_job("j".into(), spec()).await.unwrap();
    for n in 1..=MAX_UNDELIVERED {
        let j = s
            .lease_job("j".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .expect("queued again");
        // A stale lease is not counted.
        assert!(
            s.lease_not_taken("j".into(), j.epoch - 1, "a".into(), "x".into())
                .await
                .unwrap()
                .is_none()
        );
        let after = s
            .lease_not_taken("j".into(), j.epoch, "a".into(), "cannot decode".into())
            .await
            .unwrap()
            .unwrap();
        if n < MAX_UNDELIVERED {
            assert_eq!(after.state, JobState::Queued, "try {n}");
        } else {
            assert_eq!(after.state, JobState::Failed);
            assert!(after.message.contains("cannot decode"), "{}", after.message);
            assert!(after.log_complete());
        }
    }
    // A job that ran once starts counting afresh.
    s.insert_job("k".into(), spec()).await.unwrap();
    let j = s
        .lease_job("k".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    s.lease_not_taken("k".into(), j.epoch, "a".into(), "x".into())
        .await
        .unwrap();
    let j = s
        .lease_job("k".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    let running = StatusReport {
        state: JobState::Running,
        exit_code: None,
        message: String::new(),
        log_total: 0,
        oom_killed: false,
    };
    s.report("k".into(), j.epoch, "a".into(), running)
        .await
        .unwrap();
    // Its session breaks while running: re-queued, never failed for it.
    let after = s
        .lease_not_taken("k".into(), j.epoch, "a".into(), "x".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.state, JobState::Queued);
}

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
async fn list_jobs_filters_by_state_and_label_and_pages_with_a_total() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db")).unwrap();
    for i in 0..7 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let spec = JobSpec {
            selector: [("team".to_string(), team.to_string())].into(),
            ..spec()
        };
        s.insert_job(format!("j{i}"), spec).await.unwrap();
    }
    s.request_cancel("j6".into()).await.unwrap();
    s.request_cancel("j5".into()).await.unwrap();
    let ids = |p: &JobPage| p.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>();

    let all = s.list_jobs(JobFilter::default(), 3).await.unwrap();
    assert_eq!(
        (ids(&all), all.total),
        (vec!["j6".into(), "j5".into(), "j4".into()], 7)
    );
    let next = JobFilter {
        before: all.next,
        ..Default::default()
    };
    let p2 = s.list_jobs(next.clone(), 3).await.unwrap();
    assert_eq!(ids(&p2), ["j3", "j2", "j1"]);
    let p3 = s
        .list_jobs(
            JobFilter {
                before: p2.next,
                ..next
            },
            3,
        )
        .await
        .unwrap();
    assert_eq!((ids(&p3), p3.next, p3.total), (vec!["j0".into()], None, 7));

    let queued_a = JobFilter {
        states: vec![JobState::Queued],
        labels: [("team".to_string(), "a".to_string())].into(),
        before: None,
    };
    let p = s.list_jobs(queued_a, 10).await.unwrap();
    assert_eq!(
        (ids(&p), p.total),
        (vec!["j4".into(), "j2".into(), "j0".into()], 3)
    );
    let cancelled = JobFilter {
        states: vec![JobState::Cancelled, JobState::Failed],
        ..Default::default()
    };
    assert_eq!(s.list_jobs(cancelled, 10).await.unwrap().total, 2);
    // A quote in a label cannot escape the query.
    let odd = JobFilter {
        labels: [("team'\"".to_string(), "a') OR 1=1 --".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(s.list_jobs(odd, 10).await.unwrap().total, 0);
}

#[tokio::test]
async fn queued_jobs_past_their_queue_timeout_end_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db")).unwrap();
    let with_timeout = |ms| JobSpec {
        queue_timeout_ms: ms,
        ..spec()
    };
    s.insert_job("short".into(), with_timeout(1)).await.unwrap();
    s.insert_job("long".into(), with_timeout(3_600_000))
        .await
        .unwrap();
    s.insert_job("none".into(), spec()).await.unwrap();
    s.insert_job("leased".into(), with_timeout(1))
        .await
        .unwrap();
    s.lease_job("leased".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let gone = s
        .expire_queued(|j| format!("waited too long: {}", j.id))
        .await
        .unwrap();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(gone[0].id, "short");
    assert_eq!(gone[0].state, JobState::TimedOut);
    assert_eq!(gone[0].message, "waited too long: short");
    assert!(gone[0].finished_ms > 0);
    // Once timed out it can never be leased.
    assert!(
        s.lease_job("short".into(), "a".into(), 1)
            .await
            .unwrap()
            .is_none()
    );
    for id in ["long", "none"] {
        let j = s.get_job(id.into()).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Queued, "{id}");
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

#[tokio::test]
async fn a_batch_stores_every_good_chunk_and_refuses_only_the_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("db")).unwrap();
    for id in ["j1", "j2"] {
        s.insert_job(id.into(), spec()).await.unwrap();
        s.lease_job(id.into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
    }
    let b = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
    // Queued back to back, so that they share transactions.
    let mut done = Vec::new();
    for (id, epoch, offset, data) in [
        ("j1", 1, 0, b("aaa")),
        ("j2", 1, 0, b("bbb")),
        ("j1", 1, 10, b("gap")),
        ("j2", 7, 3, b("stale")),
        ("j1", 1, 3, b("ccc")),
    ] {
        done.push(
            s.append_log_queued(id.into(), epoch, "a".into(), offset, data)
                .await
                .unwrap(),
        );
    }
    let mut results = Vec::new();
    for d in done {
        results.push(d.await);
    }
    assert!(matches!(results[0], Ok(3)));
    assert!(matches!(results[1], Ok(3)));
    assert!(matches!(results[2], Err(StoreError::Gap { acked: 3, .. })));
    assert!(matches!(results[3], Err(StoreError::Stale { .. })));
    assert!(matches!(results[4], Ok(6)));
    assert_eq!(
        s.read_log("j1".into(), 1, 0, 1 << 20).await.unwrap(),
        b"aaaccc"
    );
    assert_eq!(
        s.read_log("j2".into(), 1, 0, 1 << 20).await.unwrap(),
        b"bbb"
    );
    // The held table knows the stored offsets (heartbeat acks carry them).
    let (renewed, _) = s.renew_held("a", vec![("j1".into(), 1)], 60_000);
    assert_eq!(renewed, [("j1".to_string(), 1, 6)]);
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
