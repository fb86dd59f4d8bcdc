//! Leases: an expired lease re-queues its job, and the next lease has a
//! higher epoch; the old holder is refused everywhere; renewals are
//! fenced; a lease never taken ends the job after a bounded number of
//! tries.

use std::time::Duration;

use super::{b, conformance, done, running, spec};
use crate::model::JobState;
use crate::store::{Expired, MAX_UNDELIVERED, Store, StoreError};

conformance! {
    expired_lease_requeues_and_next_lease_has_higher_epoch =>
        sqlite_expired_lease_requeues_and_next_lease_has_higher_epoch,
        postgres_expired_lease_requeues_and_next_lease_has_higher_epoch;
    renewals_are_fenced_and_a_re_lease_revokes_the_old_holder =>
        sqlite_renewals_are_fenced_and_a_re_lease_revokes_the_old_holder,
        postgres_renewals_are_fenced_and_a_re_lease_revokes_the_old_holder;
    a_lease_never_taken_ends_the_job_failed_after_a_bounded_number_of_tries =>
        sqlite_a_lease_never_taken_ends_the_job_failed_after_a_bounded_number_of_tries,
        postgres_a_lease_never_taken_ends_the_job_failed_after_a_bounded_number_of_tries;
}

async fn expired_lease_requeues_and_next_lease_has_higher_epoch(s: Store) {
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
    // The old lease is refused.
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

async fn renewals_are_fenced_and_a_re_lease_revokes_the_old_holder(s: Store) {
    s.insert_job("j".into(), spec()).await.unwrap();
    // A lease granted with no time to live, renewed in memory only.
    let j = s
        .lease_job("j".into(), "a".into(), 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((j.epoch, s.held_count("a")), (1, 1));
    assert_eq!(s.held_by("a"), [("j".to_string(), 1)]);
    let (renewed, revoked) = s.renew_held("a", vec![("j".into(), 1)], 0);
    assert_eq!((renewed.len(), revoked.len()), (1, 0));
    // Another agent, or an older epoch, is never renewed.
    let (renewed, revoked) = s.renew_held("b", vec![("j".into(), 1), ("j".into(), 0)], 60_000);
    assert_eq!((renewed.len(), revoked.len()), (0, 2));
    // A renewal with no time to live does not keep the lease.
    tokio::time::sleep(Duration::from_millis(5)).await;
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
        s.append_log("j".into(), 1, "a".into(), 0, b("x")).await,
        Err(StoreError::Stale { .. })
    ));
    assert!(matches!(
        s.report("j".into(), 1, "a".into(), done()).await,
        Err(StoreError::Stale { .. })
    ));
    assert!(matches!(
        s.current_lease("j".into(), 1, "a".into()).await,
        Err(StoreError::Stale { .. })
    ));
    assert!(!s.requeue("j".into(), 1, "a".into()).await.unwrap());
    assert_eq!(
        s.current_lease("j".into(), 2, "b".into())
            .await
            .unwrap()
            .epoch,
        2
    );
    // The new holder's renewals keep the lease past the sweep.
    let (renewed, _) = s.renew_held("b", vec![("j".into(), 2)], 60_000);
    assert_eq!(renewed, [("j".to_string(), 2, 0)]);
    assert!(s.expire_leases().await.unwrap().is_empty());
    s.report("j".into(), 2, "b".into(), done()).await.unwrap();
    assert_eq!(s.held_count("b"), 0, "a final status ends the held lease");
}

async fn a_lease_never_taken_ends_the_job_failed_after_a_bounded_number_of_tries(s: Store) {
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
    s.report("k".into(), j.epoch, "a".into(), running())
        .await
        .unwrap();
    // Its session breaks while running: re-queued, never failed for it.
    let after = s
        .lease_not_taken("k".into(), j.epoch, "a".into(), "x".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.state, JobState::Queued);
    assert_eq!(s.held_count("a"), 0);
}
