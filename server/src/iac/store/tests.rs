//! The IaC store's behaviour, one body per case, run on the embedded
//! store and on PostgreSQL (`conformance!`); then what only several
//! replicas over one PostgreSQL database can do: start runs of one stack
//! at the same moment.

use std::time::Duration;

use super::{IacStore, Task};
use crate::iac::IacError;
use crate::iac::drift::Status;
use crate::iac::launch::new_run;
use crate::iac::model::{Run, RunKind, RunState, Stack, StackSpec};
use crate::iac::state::Writer;
use crate::store::Store;
use crate::store::conformance::conformance;

/// Every call of a case ends within this (a lock never released fails the
/// test rather than hanging it).
const BOUND: Duration = Duration::from_secs(30);

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("store call bounded in time")
}

async fn open(s: Store) -> IacStore {
    let iac = IacStore::open(s).await.unwrap();
    iac.open_state().await.unwrap();
    iac
}

fn stack(name: &str, branch: &str) -> Stack {
    Stack {
        spec: StackSpec {
            name: name.into(),
            repo: "https://git.invalid/r".into(),
            branch: branch.into(),
            tool: "terraform".into(),
            ..Default::default()
        },
        commit: None,
        source_digest: None,
        fetch_error: None,
        fetched_ms: 0,
        created_ms: 1,
        updated_ms: 1,
    }
}

fn task(r: &Run) -> Task {
    Task {
        run_id: r.id.clone(),
        stack: r.stack.clone(),
        phase: "plan".into(),
        ..Default::default()
    }
}

async fn queued(iac: &IacStore, stack: &str, kind: RunKind) -> Run {
    iac.insert_run(new_run(stack, kind, "c1", "d1", "admin", "test"))
        .await
        .unwrap()
}

async fn state_of(iac: &IacStore, id: &str) -> RunState {
    iac.get_run(id.into()).await.unwrap().unwrap().state
}

async fn stacks(s: Store) {
    let iac = open(s).await;
    assert_eq!(iac.put_stack(stack("b", "main")).await.unwrap(), "created");
    assert_eq!(iac.put_stack(stack("a", "main")).await.unwrap(), "created");
    assert_eq!(
        iac.put_stack(stack("b", "main")).await.unwrap(),
        "unchanged"
    );
    // Source bookkeeping is kept across a change of the spec.
    let mut fetched = iac.get_stack("b".into()).await.unwrap().unwrap();
    fetched.commit = Some("abc".into());
    fetched.fetched_ms = 42;
    iac.save_stack(fetched).await.unwrap();
    assert_eq!(iac.put_stack(stack("b", "dev")).await.unwrap(), "updated");
    let b = iac.get_stack("b".into()).await.unwrap().unwrap();
    assert_eq!(b.spec.branch, "dev");
    assert_eq!(b.commit.as_deref(), Some("abc"));
    assert_eq!(b.fetched_ms, 42);
    let names: Vec<String> = iac
        .list_stacks()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(iac.get_stack("zz".into()).await.unwrap().is_none());

    // A stack with a run in progress is kept; its drift state goes with it.
    let r = queued(&iac, "b", RunKind::Tracked).await;
    iac.update_drift("b".into(), |d| d.status = Status::Drifted)
        .await
        .unwrap();
    let busy = iac.delete_stack("b".into()).await;
    assert!(matches!(busy, Err(IacError::Conflict(_))), "{busy:?}");
    assert!(iac.get_stack("b".into()).await.unwrap().is_some());
    iac.update_run(r.id.clone(), |r| {
        r.go(RunState::Cancelled, "").map_err(IacError::Conflict)
    })
    .await
    .unwrap();
    assert!(iac.delete_stack("b".into()).await.unwrap());
    assert!(!iac.delete_stack("b".into()).await.unwrap());
    assert!(iac.get_stack("b".into()).await.unwrap().is_none());
    assert!(!iac.drift_states().await.unwrap().contains_key("b"));
}

async fn runs(s: Store) {
    let iac = open(s).await;
    let r1 = queued(&iac, "a", RunKind::Tracked).await;
    let r2 = queued(&iac, "b", RunKind::Proposed).await;
    let r3 = queued(&iac, "a", RunKind::Tracked).await;
    assert_eq!(
        iac.get_run(r2.id.clone()).await.unwrap().as_ref(),
        Some(&r2)
    );
    assert!(iac.get_run("run-none".into()).await.unwrap().is_none());
    let ids = |v: Vec<Run>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(iac.list_runs(None, 10).await.unwrap()),
        [r3.id.clone(), r2.id.clone(), r1.id.clone()]
    );
    assert_eq!(
        ids(iac.list_runs(None, 2).await.unwrap()),
        [r3.id.clone(), r2.id.clone()]
    );
    assert_eq!(
        ids(iac.list_runs(Some("a".into()), 10).await.unwrap()),
        [r3.id.clone(), r1.id.clone()]
    );

    // A refused change writes nothing.
    let refused = iac
        .update_run(r1.id.clone(), |r| {
            r.message = "half".into();
            Err(IacError::Conflict("no".into()))
        })
        .await;
    assert!(matches!(refused, Err(IacError::Conflict(m)) if m == "no"));
    assert_eq!(
        iac.get_run(r1.id.clone()).await.unwrap().as_ref(),
        Some(&r1)
    );
    let missing = iac.update_run("run-none".into(), |_| Ok(())).await;
    assert!(matches!(missing, Err(IacError::NotFound(_))), "{missing:?}");

    let changed = iac
        .update_run(r1.id.clone(), |r| {
            r.message = "why".into();
            r.go(RunState::Cancelled, "by test")
                .map_err(IacError::Conflict)
        })
        .await
        .unwrap();
    assert_eq!(changed.state, RunState::Cancelled);
    assert_eq!(
        iac.get_run(r1.id.clone()).await.unwrap().as_ref(),
        Some(&changed)
    );
    // Open runs: not final, oldest first.
    assert_eq!(
        ids(iac.open_runs().await.unwrap()),
        [r2.id.clone(), r3.id.clone()]
    );
}

async fn start_next_takes_the_stack_lock(s: Store) {
    let iac = open(s).await;
    let r1 = queued(&iac, "a", RunKind::Tracked).await;
    let r2 = queued(&iac, "a", RunKind::Tracked).await;
    let other = queued(&iac, "b", RunKind::Tracked).await;
    assert_eq!(
        iac.tracked_busy("a".into()).await.unwrap(),
        Some(r1.id.clone())
    );

    // The oldest queued run starts, with its job's task recorded.
    let (run, t) = iac
        .start_next("a".into(), "job-1".into(), task)
        .await
        .unwrap()
        .expect("r1 starts");
    assert_eq!(run.id, r1.id);
    assert_eq!(run.state, RunState::Planning);
    assert_eq!(run.plan_job.as_deref(), Some("job-1"));
    assert_eq!(t, task(&run));
    assert_eq!(state_of(&iac, &r1.id).await, RunState::Planning);
    assert_eq!(iac.task_of("job-1".into()).await.unwrap(), Some(t));

    // The lock is held: nothing else of the stack starts; other stacks do.
    assert!(
        iac.start_next("a".into(), "job-2".into(), task)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(state_of(&iac, &r2.id).await, RunState::Queued);
    assert!(iac.task_of("job-2".into()).await.unwrap().is_none());
    let (b, _) = iac
        .start_next("b".into(), "job-b".into(), task)
        .await
        .unwrap()
        .expect("another stack starts");
    assert_eq!(b.id, other.id);

    // Held through approval and apply; released when the run ends.
    for to in [RunState::Confirmed, RunState::Applying] {
        iac.update_run(r1.id.clone(), move |r| {
            r.go(to, "").map_err(IacError::Conflict)
        })
        .await
        .unwrap();
        assert!(
            iac.start_next("a".into(), "job-2".into(), task)
                .await
                .unwrap()
                .is_none()
        );
    }
    iac.update_run(r1.id.clone(), |r| {
        r.go(RunState::Finished, "").map_err(IacError::Conflict)
    })
    .await
    .unwrap();
    let (next, _) = iac
        .start_next("a".into(), "job-2".into(), task)
        .await
        .unwrap()
        .expect("r2 starts once r1 ended");
    assert_eq!(next.id, r2.id);
    // Nothing queued is nothing started.
    iac.update_run(r2.id.clone(), |r| {
        r.go(RunState::Failed, "").map_err(IacError::Conflict)
    })
    .await
    .unwrap();
    assert!(
        iac.start_next("a".into(), "job-3".into(), task)
            .await
            .unwrap()
            .is_none()
    );
}

async fn drift_checks_and_proposed_runs(s: Store) {
    let iac = open(s).await;
    let tracked = queued(&iac, "a", RunKind::Tracked).await;
    let drift = queued(&iac, "a", RunKind::Drift).await;
    let proposed = queued(&iac, "a", RunKind::Proposed).await;

    // A queued tracked run keeps the drift check from starting.
    assert!(
        iac.start_unlocked(drift.id.clone(), "job-d".into(), true, task)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(state_of(&iac, &drift.id).await, RunState::Queued);
    assert!(iac.task_of("job-d".into()).await.unwrap().is_none());
    // A proposed run takes no lock.
    let p = iac
        .start_unlocked(proposed.id.clone(), "job-p".into(), false, task)
        .await
        .unwrap()
        .expect("a proposed run starts");
    assert_eq!(p.state, RunState::Planning);
    assert_eq!(p.plan_job.as_deref(), Some("job-p"));
    assert!(iac.task_of("job-p".into()).await.unwrap().is_some());
    // A run that is no longer queued does not start again.
    assert!(
        iac.start_unlocked(proposed.id.clone(), "job-p2".into(), false, task)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        iac.start_unlocked("run-none".into(), "job-x".into(), false, task)
            .await
            .unwrap()
            .is_none()
    );

    // Once the tracked run is gone the drift check starts, and then holds
    // back tracked runs while it plans.
    iac.update_run(tracked.id.clone(), |r| {
        r.go(RunState::Cancelled, "").map_err(IacError::Conflict)
    })
    .await
    .unwrap();
    let d = iac
        .start_unlocked(drift.id.clone(), "job-d".into(), true, task)
        .await
        .unwrap()
        .expect("the drift check starts");
    assert_eq!(d.state, RunState::Planning);
    let later = queued(&iac, "a", RunKind::Tracked).await;
    assert!(
        iac.start_next("a".into(), "job-t".into(), task)
            .await
            .unwrap()
            .is_none()
    );
    iac.update_run(drift.id.clone(), |r| {
        r.go(RunState::Finished, "").map_err(IacError::Conflict)
    })
    .await
    .unwrap();
    let (t, _) = iac
        .start_next("a".into(), "job-t".into(), task)
        .await
        .unwrap()
        .expect("the tracked run starts after the check");
    assert_eq!(t.id, later.id);
}

async fn newest_run(s: Store) {
    let iac = open(s).await;
    let d1 = queued(&iac, "a", RunKind::Drift).await;
    let d2 = queued(&iac, "a", RunKind::Drift).await;
    queued(&iac, "a", RunKind::Tracked).await;
    queued(&iac, "b", RunKind::Drift).await;
    iac.update_run(d1.id.clone(), |r| {
        r.go(RunState::Cancelled, "").map_err(IacError::Conflict)
    })
    .await
    .unwrap();
    let newest =
        |kind: RunKind, states: &'static [&'static str]| iac.newest_run("a".into(), kind, states);
    assert_eq!(
        newest(RunKind::Drift, &[]).await.unwrap().map(|r| r.id),
        Some(d2.id.clone())
    );
    assert_eq!(
        newest(RunKind::Drift, &["CANCELLED", "FINISHED"])
            .await
            .unwrap()
            .map(|r| r.id),
        Some(d1.id.clone())
    );
    assert!(newest(RunKind::Proposed, &[]).await.unwrap().is_none());
    assert!(
        newest(RunKind::Tracked, &["PLANNING"])
            .await
            .unwrap()
            .is_none()
    );
}

async fn drift_state(s: Store) {
    let iac = open(s).await;
    assert!(iac.drift_states().await.unwrap().is_empty());
    let (d, out) = iac
        .update_drift("a".into(), |d| {
            assert_eq!(d.status, Status::Unknown);
            d.status = Status::Drifted;
            d.fingerprint = "f1".into();
            7
        })
        .await
        .unwrap();
    assert_eq!(out, 7);
    assert_eq!(d.fingerprint, "f1");
    let (d2, seen) = iac
        .update_drift("a".into(), |d| {
            let seen = d.fingerprint.clone();
            d.checked_ms = 5;
            seen
        })
        .await
        .unwrap();
    assert_eq!(seen, "f1");
    assert_eq!(d2.status, Status::Drifted);
    iac.update_drift("b".into(), |d| d.status = Status::InSync)
        .await
        .unwrap();
    let all = iac.drift_states().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["a"], d2);
    assert_eq!(all["b"].status, Status::InSync);
}

async fn tasks(s: Store) {
    let iac = open(s).await;
    let r1 = queued(&iac, "a", RunKind::Tracked).await;
    let r2 = queued(&iac, "b", RunKind::Proposed).await;
    let (run1, t1) = iac
        .start_next("a".into(), "job-1".into(), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run1.id, r1.id);
    iac.start_unlocked(r2.id.clone(), "job-2".into(), false, task)
        .await
        .unwrap()
        .unwrap();
    let all = iac
        .tasks_of(vec!["job-1".into(), "job-2".into(), "plain-job".into()])
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["job-1"], t1);
    assert_eq!(all["job-2"].run_id, r2.id);
    assert!(iac.tasks_of(Vec::new()).await.unwrap().is_empty());
    assert!(iac.task_of("plain-job".into()).await.unwrap().is_none());
}

async fn state_versions(s: Store) {
    let iac = open(s).await;
    assert!(iac.current_state("a".into()).await.unwrap().is_none());
    let admin = || Writer::Admin("admin:alice".into());
    for serial in [1, 2, 5] {
        let v = iac
            .record_state(
                "a".into(),
                serial,
                "lin-1".into(),
                format!("sha-{serial}"),
                admin(),
            )
            .await
            .unwrap();
        assert_eq!(v.serial, serial);
        assert_eq!(v.written_by, "admin:alice");
    }
    // No going back within a lineage; a new lineage starts anywhere.
    let old = iac
        .record_state("a".into(), 3, "lin-1".into(), "sha-x".into(), admin())
        .await;
    assert!(matches!(old, Err(IacError::Conflict(_))), "{old:?}");
    let bad = iac
        .record_state("a".into(), 3, "no spaces".into(), "sha-x".into(), admin())
        .await;
    assert!(matches!(bad, Err(IacError::BadRequest(_))), "{bad:?}");
    iac.record_state("a".into(), 1, "lin-2".into(), "sha-n".into(), admin())
        .await
        .unwrap();
    iac.record_state("b".into(), 9, "lin-b".into(), "sha-b".into(), admin())
        .await
        .unwrap();
    let current = iac.current_state("a".into()).await.unwrap().unwrap();
    assert_eq!((current.serial, current.lineage.as_str()), (1, "lin-2"));
    let serials: Vec<(u64, String)> = iac
        .state_versions("a".into(), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.serial, v.digest))
        .collect();
    assert_eq!(
        serials,
        [
            (1u64, "sha-n".to_string()),
            (5, "sha-5".into()),
            (2, "sha-2".into()),
            (1, "sha-1".into())
        ]
    );
    assert_eq!(iac.state_versions("a".into(), 2).await.unwrap().len(), 2);

    // An apply writes only while its run is applying with that job.
    let run = queued(&iac, "a", RunKind::Tracked).await;
    let apply = |job: &str| Writer::Apply {
        run_id: run.id.clone(),
        job_id: job.into(),
    };
    let early = iac
        .record_state(
            "a".into(),
            2,
            "lin-2".into(),
            "sha-e".into(),
            apply("job-a"),
        )
        .await;
    assert!(matches!(early, Err(IacError::Refused(_))), "{early:?}");
    iac.start_next("a".into(), "job-p".into(), task)
        .await
        .unwrap()
        .unwrap();
    iac.update_run(run.id.clone(), |r| {
        r.go(RunState::Confirmed, "").map_err(IacError::Conflict)
    })
    .await
    .unwrap();
    let t = Task {
        phase: "apply".into(),
        ..task(&run)
    };
    let applying = iac
        .start_apply(run.id.clone(), "job-a".into(), t.clone())
        .await
        .unwrap()
        .expect("a confirmed run starts its apply");
    assert_eq!(applying.state, RunState::Applying);
    assert_eq!(iac.task_of("job-a".into()).await.unwrap(), Some(t.clone()));
    // A plan is consumed once.
    assert!(
        iac.start_apply(run.id.clone(), "job-b".into(), t)
            .await
            .unwrap()
            .is_none()
    );
    let other = iac
        .record_state(
            "a".into(),
            2,
            "lin-2".into(),
            "sha-o".into(),
            apply("job-b"),
        )
        .await;
    assert!(matches!(other, Err(IacError::Refused(_))), "{other:?}");
    let v = iac
        .record_state(
            "a".into(),
            2,
            "lin-2".into(),
            "sha-a".into(),
            apply("job-a"),
        )
        .await
        .unwrap();
    assert_eq!(v.written_by, "job:job-a");
    assert_eq!(iac.current_state("a".into()).await.unwrap(), Some(v));
}

async fn every_call_is_bounded(s: Store) {
    // The store answers each of a stack's calls in turn however they
    // interleave on one handle.
    let iac = open(s).await;
    for _ in 0..3 {
        queued(&iac, "a", RunKind::Tracked).await;
    }
    let calls = (0..8).map(|i| {
        let iac = iac.clone();
        async move {
            bounded(iac.start_next("a".into(), format!("job-{i}"), task))
                .await
                .unwrap()
        }
    });
    let started = futures::future::join_all(calls).await;
    assert_eq!(started.iter().filter(|s| s.is_some()).count(), 1);
}

conformance! {
    stacks => sqlite_stacks, postgres_stacks;
    runs => sqlite_runs, postgres_runs;
    start_next_takes_the_stack_lock => sqlite_start_next_takes_the_stack_lock, postgres_start_next_takes_the_stack_lock;
    drift_checks_and_proposed_runs => sqlite_drift_checks_and_proposed_runs, postgres_drift_checks_and_proposed_runs;
    newest_run => sqlite_newest_run, postgres_newest_run;
    drift_state => sqlite_drift_state, postgres_drift_state;
    tasks => sqlite_tasks, postgres_tasks;
    state_versions => sqlite_state_versions, postgres_state_versions;
    every_call_is_bounded => sqlite_every_call_is_bounded, postgres_every_call_is_bounded;
}

/// Replicas: `n` handles on one PostgreSQL database (`None`: skipped).
async fn replicas(n: usize) -> Option<Vec<IacStore>> {
    let url = crate::store::postgres::testdb::fresh_db().await?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(open(Store::postgres(&url).await.unwrap()).await);
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_start_one_tracked_run_of_a_stack() {
    let Some(stores) = replicas(2).await else {
        return;
    };
    for round in 0..5 {
        let name = format!("s{round}");
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(queued(&stores[0], &name, RunKind::Tracked).await.id);
        }
        let calls = (0..16).map(|i| {
            let iac = stores[i % 2].clone();
            let name = name.clone();
            tokio::spawn(async move {
                bounded(iac.start_next(name, format!("job-{round}-{i}"), task))
                    .await
                    .unwrap()
            })
        });
        let started: Vec<_> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let winners: Vec<&(Run, Task)> = started.iter().flatten().collect();
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        assert_eq!(winners[0].0.id, ids[0], "the oldest queued run starts");
        let mut left = 0;
        for id in &ids {
            if state_of(&stores[1], id).await != RunState::Queued {
                left += 1;
            }
        }
        assert_eq!(left, 1, "round {round}: exactly one run left QUEUED");
        let job = winners[0].0.plan_job.clone().unwrap();
        assert!(stores[1].task_of(job).await.unwrap().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_never_plan_a_drift_check_beside_a_tracked_run() {
    let Some(stores) = replicas(2).await else {
        return;
    };
    for round in 0..10 {
        let name = format!("s{round}");
        let drift = queued(&stores[1], &name, RunKind::Drift).await;
        let (a, b) = (stores[0].clone(), stores[1].clone());
        let tracked_name = name.clone();
        let tracked = tokio::spawn(async move {
            let run = queued(&a, &tracked_name, RunKind::Tracked).await;
            let started = bounded(a.start_next(tracked_name, format!("t-{round}"), task))
                .await
                .unwrap();
            (run, started)
        });
        let check = tokio::spawn(async move {
            bounded(b.start_unlocked(drift.id.clone(), format!("d-{round}"), true, task))
                .await
                .unwrap()
        });
        let (run, started) = tracked.await.unwrap();
        let checked = check.await.unwrap();
        assert!(
            !(started.is_some() && checked.is_some()),
            "round {round}: a drift check and a tracked run planned together"
        );
        let tracked_state = state_of(&stores[0], &run.id).await;
        assert_eq!(started.is_some(), tracked_state == RunState::Planning);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_serialize_changes_of_one_run_and_one_drift_state() {
    let Some(stores) = replicas(2).await else {
        return;
    };
    let run = queued(&stores[0], "a", RunKind::Tracked).await;
    let calls = (0..20).map(|i| {
        let iac = stores[i % 2].clone();
        let id = run.id.clone();
        tokio::spawn(async move {
            bounded(iac.update_run(id, |r| {
                r.message.push('x');
                Ok(())
            }))
            .await
            .unwrap();
            bounded(iac.update_drift("a".into(), |d| d.checked_ms += 1))
                .await
                .unwrap();
        })
    });
    for c in futures::future::join_all(calls).await {
        c.unwrap();
    }
    let run = stores[1].get_run(run.id).await.unwrap().unwrap();
    assert_eq!(run.message.len(), 20, "no change of the run was lost");
    let drift = stores[0].drift_states().await.unwrap();
    assert_eq!(
        drift["a"].checked_ms, 20,
        "no change of the drift state was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_create_a_stack_once_and_record_its_versions_in_turn() {
    let Some(stores) = replicas(2).await else {
        return;
    };
    let puts = (0..8).map(|i| {
        let iac = stores[i % 2].clone();
        tokio::spawn(async move { bounded(iac.put_stack(stack("a", "main"))).await.unwrap() })
    });
    let mut answers: Vec<&str> = futures::future::join_all(puts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        [
            "created",
            "unchanged",
            "unchanged",
            "unchanged",
            "unchanged",
            "unchanged",
            "unchanged",
            "unchanged"
        ]
    );

    // Versions of one lineage written at once by two replicas: each serial
    // is checked against the version committed before it.
    let writes = (1..=10u64).map(|serial| {
        let iac = stores[(serial % 2) as usize].clone();
        tokio::spawn(async move {
            bounded(iac.record_state(
                "a".into(),
                serial,
                "lin".into(),
                format!("sha-{serial}"),
                Writer::Admin("admin:alice".into()),
            ))
            .await
        })
    });
    let mut kept = Vec::new();
    for w in futures::future::join_all(writes).await {
        match w.unwrap() {
            Ok(v) => kept.push(v.serial),
            Err(IacError::Conflict(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let stored: Vec<u64> = stores[0]
        .state_versions("a".into(), 100)
        .await
        .unwrap()
        .into_iter()
        .rev()
        .map(|v| v.serial)
        .collect();
    assert!(!stored.is_empty());
    assert!(
        stored.windows(2).all(|w| w[0] <= w[1]),
        "no version older than the one before it: {stored:?}"
    );
    kept.sort();
    let mut sorted = stored.clone();
    sorted.sort();
    assert_eq!(kept, sorted);
}
