//! Retention: pruning removes final jobs (with their logs) by age or
//! beyond the newest few, never an active job.

use std::time::Duration;

use super::{conformance, done, spec};
use crate::model::StatusReport;
use crate::store::{PruneRule, Pruned, Store};

conformance! {
    prune_keeps_active_and_newest_jobs =>
        sqlite_prune_keeps_active_and_newest_jobs,
        postgres_prune_keeps_active_and_newest_jobs;
}

/// Runs job `id` to success with a log of `log` bytes.
async fn finished(s: &Store, id: &str, log: usize) {
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

async fn prune_keeps_active_and_newest_jobs(s: Store) {
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
    // Nothing selected without a rule; an age nothing reaches keeps all.
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
    // By age: everything final is older than 0 ms.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let all = PruneRule {
        older_than_ms: Some(0),
        keep: None,
    };
    assert_eq!(s.prune(all).await.unwrap().jobs, 1);
    assert!(s.get_job("running".into()).await.unwrap().is_some());
    assert!(s.get_job("queued".into()).await.unwrap().is_some());
    assert!(s.get_job("new".into()).await.unwrap().is_none());
}
