//! Jobs: listing with filters and pages, queue depth, queue timeouts,
//! cancellation, and secret values forgotten once a job is final.

use std::time::Duration;

use super::{conformance, done, spec};
use crate::model::{JobSecret, JobSpec, JobState};
use crate::store::{CancelOutcome, Expired, JobFilter, JobPage, Store, StoreError};

conformance! {
    list_jobs_filters_by_state_and_label_and_pages_with_a_total =>
        sqlite_list_jobs_filters_by_state_and_label_and_pages_with_a_total,
        postgres_list_jobs_filters_by_state_and_label_and_pages_with_a_total;
    queued_jobs_past_their_queue_timeout_end_timed_out =>
        sqlite_queued_jobs_past_their_queue_timeout_end_timed_out,
        postgres_queued_jobs_past_their_queue_timeout_end_timed_out;
    cancel_dequeues_asks_the_agent_or_ends_at_expiry_and_secrets_go =>
        sqlite_cancel_dequeues_asks_the_agent_or_ends_at_expiry_and_secrets_go,
        postgres_cancel_dequeues_asks_the_agent_or_ends_at_expiry_and_secrets_go;
}

async fn list_jobs_filters_by_state_and_label_and_pages_with_a_total(s: Store) {
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
    let depth = s.queue_depth().await.unwrap();
    assert_eq!(depth.get("team=a"), Some(&3));
    assert_eq!(depth.get("team=b"), Some(&2));
}

async fn queued_jobs_past_their_queue_timeout_end_timed_out(s: Store) {
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
    // Once timed out it can never be leased.
    assert!(
        s.lease_job("short".into(), "a".into(), 1)
            .await
            .unwrap()
            .is_none()
    );
    let queued = s.queued_jobs(10).await.unwrap();
    let ids: Vec<&str> = queued.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["long", "none"]);
    for id in ["long", "none"] {
        let j = s.get_job(id.into()).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Queued, "{id}");
    }
    let leased = s.get_job("leased".into()).await.unwrap().unwrap();
    assert_eq!(leased.state, JobState::Leased);
}

async fn cancel_dequeues_asks_the_agent_or_ends_at_expiry_and_secrets_go(s: Store) {
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
    let stored = s.get_job("q".into()).await.unwrap().unwrap();
    assert!(!stored.spec.holds_secret_values());
    assert_eq!(stored.spec.secrets.len(), 1);
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
    assert!(f.spec.holds_secret_values(), "a running job keeps them");
    let f = s
        .report("f".into(), f.epoch, "a".into(), done())
        .await
        .unwrap();
    assert!(!f.spec.holds_secret_values());
    assert_eq!(f.spec.secrets[0].name, "token");
    let stored = s.get_job("f".into()).await.unwrap().unwrap();
    assert!(!stored.spec.holds_secret_values());
    assert_eq!(stored.spec.secrets[0].name, "token");
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
