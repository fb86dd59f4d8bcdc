//! Tests of the PostgreSQL store as a whole, on a throwaway cluster
//! (`testdb`): leases, fencing, logs, cancellation, expiry, pruning, and
//! two replicas on one database.

use std::time::Duration;

use super::PgStore;
use super::testdb::fresh_db;
use crate::model::{Artifact, JobSecret, JobSpec, JobState, StatusReport};
use crate::store::{
    CancelOutcome, Expired, JobFilter, JobPage, MAX_UNDELIVERED, PruneRule, Pruned, StoreError,
};

pub(super) fn spec() -> JobSpec {
    JobSpec {
        image: "img".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

fn done() -> StatusReport {
    StatusReport {
        state: JobState::Succeeded,
        exit_code: Some(0),
        message: String::new(),
        log_total: 0,
        oom_killed: false,
    }
}

fn running() -> StatusReport {
    StatusReport {
        state: JobState::Running,
        ..done()
    }
}

pub(super) fn b(s: &str) -> bytes::Bytes {
    bytes::Bytes::from(s.to_string())
}

/// A store on a fresh database, or `None` (skipped).
pub(super) async fn store() -> Option<(PgStore, String)> {
    let url = fresh_db().await?;
    let s = PgStore::connect(&url).await.expect("connect");
    Some((s, url))
}

#[tokio::test]
async fn pg_log_append_is_exactly_once_and_fenced() {
    let Some((s, _)) = store().await else { return };
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

#[tokio::test]
async fn pg_a_batch_stores_every_good_chunk_and_refuses_only_the_bad_ones() {
    let Some((s, _)) = store().await else { return };
    for id in ["j1", "j2"] {
        s.insert_job(id.into(), spec()).await.unwrap();
        s.lease_job(id.into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
    }
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

#[tokio::test]
async fn pg_expired_lease_requeues_and_next_lease_has_higher_epoch() {
    let Some((s, _)) = store().await else { return };
    s.insert_job("j1".into(), spec()).await.unwrap();
    s.lease_job("j1".into(), "a".into(), 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.held_count("a"), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let exp = s.expire_leases().await.unwrap();
    assert!(
        matches!(&exp[..], [Expired::Requeued { job: j, agent }] if j.state == JobState::Queued && agent == "a"),
        "{exp:?}"
    );
    assert_eq!(s.held_count("a"), 0);
    assert!(matches!(
        s.report("j1".into(), 1, "a".into(), done()).await,
        Err(StoreError::Stale { .. })
    ));
    let j = s
        .lease_job("j1".into(), "b".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.epoch, 2);
    let j = s.report("j1".into(), 2, "b".into(), done()).await.unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert!(j.log_complete());
    assert_eq!(s.held_count("b"), 0, "a final status ends the lease");
    // Leasing a job that is not queued gives nothing.
    assert!(
        s.lease_job("j1".into(), "c".into(), 60_000)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn pg_a_lease_never_taken_ends_the_job_failed_after_a_bounded_number_of_tries() {
    let Some((s, _)) = store().await else { return };
    s.insert_job("j".into(), spec()).await.unwrap();
    for n in 1..=MAX_UNDELIVERED {
        let j = s
            .lease_job("j".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .expect("queued again");
        assert_eq!(j.epoch, n as u64, "every lease has the next epoch");
        assert!(
            s.lease_not_taken("j".into(), j.epoch - 1, "a".into(), "x".into())
                .await
                .unwrap()
                .is_none(),
            "a stale lease is not counted"
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
    // A job that ran once is re-queued when its session breaks.
    s.insert_job("k".into(), spec()).await.unwrap();
    let j = s
        .lease_job("k".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    s.report("k".into(), j.epoch, "a".into(), running())
        .await
        .unwrap();
    let after = s
        .lease_not_taken("k".into(), j.epoch, "a".into(), "x".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.state, JobState::Queued);
    assert_eq!(s.held_count("a"), 0);
}

#[tokio::test]
async fn pg_cancel_dequeues_asks_the_agent_or_ends_at_expiry_and_secrets_go() {
    let Some((s, _)) = store().await else { return };
    let with_secret = || JobSpec {
        secrets: vec![JobSecret {
            name: "token".into(),
            value: b"canary-7f3a".to_vec(),
        }],
        ..spec()
    };
    for id in ["q", "r", "f"] {
        s.insert_job(id.into(), with_secret()).await.unwrap();
    }
    // Queued: cancelled at once, its secret values gone, never leased.
    let CancelOutcome::Dequeued(q) = s.request_cancel("q".into()).await.unwrap() else {
        panic!("a queued job is dequeued");
    };
    assert_eq!(q.state, JobState::Cancelled);
    assert!(!q.spec.holds_secret_values());
    assert_eq!(q.spec.secrets[0].name, "token");
    assert!(
        s.lease_job("q".into(), "a".into(), 60_000)
            .await
            .unwrap()
            .is_none()
    );
    // Running: the agent must be told; its lease expires: cancelled.
    let r = s
        .lease_job("r".into(), "a".into(), 0)
        .await
        .unwrap()
        .unwrap();
    assert!(r.spec.holds_secret_values(), "a lease keeps them");
    let CancelOutcome::Requested(r) = s.request_cancel("r".into()).await.unwrap() else {
        panic!("a running job's agent is asked");
    };
    assert!(r.cancel_requested);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let exp = s.expire_leases().await.unwrap();
    let [Expired::Cancelled { job, agent }] = &exp[..] else {
        panic!("{exp:?}");
    };
    assert_eq!((job.state, agent.as_str()), (JobState::Cancelled, "a"));
    assert!(!job.spec.holds_secret_values());
    assert!(matches!(
        s.request_cancel("r".into()).await.unwrap(),
        CancelOutcome::AlreadyFinal(_)
    ));
    assert!(matches!(
        s.request_cancel("nope".into()).await,
        Err(StoreError::NotFound(_))
    ));
    // A final report drops them too; so does failing a queued job.
    let f = s
        .lease_job("f".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    let f = s
        .report("f".into(), f.epoch, "a".into(), done())
        .await
        .unwrap();
    assert!(!f.spec.holds_secret_values());
    let stored = s.get_job("f".into()).await.unwrap().unwrap();
    assert!(!stored.spec.holds_secret_values());
    s.insert_job("g".into(), with_secret()).await.unwrap();
    let g = s
        .fail_queued("g".into(), "no agent".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((g.state, g.log_total), (JobState::Failed, Some(0)));
    assert!(!g.spec.holds_secret_values());
    assert!(
        s.fail_queued("g".into(), "again".into())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn pg_list_jobs_filters_by_state_and_label_and_pages_with_a_total() {
    let Some((s, _)) = store().await else { return };
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
    let odd = JobFilter {
        labels: [("team'\"".to_string(), "a') OR 1=1 --".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(s.list_jobs(odd, 10).await.unwrap().total, 0);
    let depth = s.queue_depth().await.unwrap();
    assert_eq!(depth.get("team=a"), Some(&3));
    assert_eq!(depth.get("team=b"), Some(&2));
}

#[tokio::test]
async fn pg_queued_jobs_past_their_queue_timeout_end_timed_out() {
    let Some((s, _)) = store().await else { return };
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
    tokio::time::sleep(Duration::from_millis(5)).await;
    let gone = s
        .expire_queued(|j| format!("waited too long: {}", j.id))
        .await
        .unwrap();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(
        (gone[0].id.as_str(), gone[0].state, gone[0].message.as_str()),
        ("short", JobState::TimedOut, "waited too long: short")
    );
    assert!(gone[0].finished_ms > 0);
    assert!(
        s.lease_job("short".into(), "a".into(), 1)
            .await
            .unwrap()
            .is_none()
    );
    let queued = s.queued_jobs(10).await.unwrap();
    let ids: Vec<&str> = queued.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["long", "none"]);
}

#[tokio::test]
async fn pg_only_the_current_leases_artifacts_are_recorded() {
    let Some((s, _)) = store().await else { return };
    let artifact = |epoch, path: &str| Artifact {
        job_id: "j1".into(),
        epoch,
        path: path.into(),
        bucket: "b".into(),
        key: format!("outpost/j1/{epoch}/{path}"),
        size: 3,
        sha256: "ab".repeat(32),
        etag: "e".into(),
        uploaded_ms: 0,
    };
    s.insert_job("j1".into(), spec()).await.unwrap();
    s.lease_job("j1".into(), "a".into(), 0)
        .await
        .unwrap()
        .unwrap();
    s.record_artifact("a".into(), artifact(1, "out.bin"))
        .await
        .unwrap();
    s.record_artifact("a".into(), artifact(1, "out.bin"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.expire_leases().await.unwrap();
    s.lease_job("j1".into(), "b".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        s.record_artifact("a".into(), artifact(1, "late.bin")).await,
        Err(StoreError::Stale { epoch: 1, .. })
    ));
    s.record_artifact("b".into(), artifact(2, "out.bin"))
        .await
        .unwrap();
    let listed = s.list_artifacts("j1".into()).await.unwrap();
    let got: Vec<(u64, &str)> = listed.iter().map(|a| (a.epoch, a.path.as_str())).collect();
    assert_eq!(got, [(1, "out.bin"), (2, "out.bin")]);
    assert!(listed.iter().all(|a| a.uploaded_ms > 0));
}

#[tokio::test]
async fn pg_prune_keeps_active_and_newest_jobs() {
    let Some((s, _)) = store().await else { return };
    async fn finished(s: &PgStore, id: &str, log: usize) {
        s.insert_job(id.into(), spec()).await.unwrap();
        let j = s
            .lease_job(id.into(), "a".into(), 60_000)
            .await
            .unwrap()
            .unwrap();
        let mut off = 0;
        while off < log {
            let n = (log - off).min(64 * 1024);
            let chunk = bytes::Bytes::from(vec![b'x'; n]);
            s.append_log(id.into(), j.epoch, "a".into(), off as u64, chunk)
                .await
                .unwrap();
            off += n;
        }
        let report = StatusReport {
            log_total: log as u64,
            ..done()
        };
        s.report(id.into(), j.epoch, "a".into(), report)
            .await
            .unwrap();
    }
    for i in 0..3 {
        finished(&s, &format!("old{i}"), 3 << 20).await;
    }
    s.insert_job("queued".into(), spec()).await.unwrap();
    s.insert_job("running".into(), spec()).await.unwrap();
    s.lease_job("running".into(), "a".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    finished(&s, "new", 10).await;
    assert_eq!(s.size().await.unwrap().jobs, 6);
    assert_eq!(
        s.prune(PruneRule::default()).await.unwrap(),
        Pruned::default()
    );
    let young = PruneRule {
        older_than_ms: Some(3_600_000),
        keep: None,
    };
    assert_eq!(s.prune(young).await.unwrap().jobs, 0);
    let keep_one = PruneRule {
        older_than_ms: None,
        keep: Some(1),
    };
    let pruned = s.prune(keep_one).await.unwrap();
    assert_eq!((pruned.jobs, pruned.log_bytes), (3, 3 * (3 << 20)));
    for id in ["queued", "running", "new"] {
        assert!(s.get_job(id.into()).await.unwrap().is_some(), "{id} kept");
    }
    assert!(s.get_job("old0".into()).await.unwrap().is_none());
    assert_eq!(s.read_log("old0".into(), 1, 0, 1 << 20).await.unwrap(), b"");
    assert_eq!(s.delete_final_job("running".into()).await.unwrap(), None);
    s.vacuum().await.unwrap();
    let size = s.size().await.unwrap();
    assert_eq!(size.jobs, 3);
    assert!(size.bytes > 0);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let all = PruneRule {
        older_than_ms: Some(0),
        keep: None,
    };
    assert_eq!(s.prune(all).await.unwrap().jobs, 1);
    assert!(s.get_job("running".into()).await.unwrap().is_some());
}

#[tokio::test]
async fn pg_agents_are_recorded_and_drain() {
    let Some((s, _)) = store().await else { return };
    let info = crate::model::AgentInfo {
        id: "a1".into(),
        version: "1".into(),
        labels: [("zone".to_string(), "z".to_string())].into(),
        capacity: 4,
        draining: false,
        last_seen_ms: 7,
    };
    s.upsert_agent(info.clone()).await.unwrap();
    s.upsert_agent(crate::model::AgentInfo {
        capacity: 8,
        ..info.clone()
    })
    .await
    .unwrap();
    s.set_agent_draining("a1".into()).await.unwrap();
    let listed = s.list_agents().await.unwrap();
    assert_eq!(
        listed,
        [crate::model::AgentInfo {
            capacity: 8,
            draining: true,
            ..info
        }]
    );
}
