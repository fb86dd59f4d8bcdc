//! Agents are recorded and drain; artifacts are recorded only for the
//! job's current lease.

use std::time::Duration;

use super::{conformance, done, spec};
use crate::model::{AgentInfo, Artifact};
use crate::store::{Store, StoreError};

conformance! {
    agents_are_recorded_and_drain =>
        sqlite_agents_are_recorded_and_drain,
        postgres_agents_are_recorded_and_drain;
    only_the_current_leases_artifacts_are_recorded =>
        sqlite_only_the_current_leases_artifacts_are_recorded,
        postgres_only_the_current_leases_artifacts_are_recorded;
}

async fn agents_are_recorded_and_drain(s: Store) {
    let info = AgentInfo {
        id: "a1".into(),
        version: "1".into(),
        labels: [("zone".to_string(), "z".to_string())].into(),
        capacity: 4,
        draining: false,
        last_seen_ms: 7,
    };
    s.upsert_agent(info.clone()).await.unwrap();
    s.upsert_agent(AgentInfo {
        capacity: 8,
        ..info.clone()
    })
    .await
    .unwrap();
    s.set_agent_draining("a1".into()).await.unwrap();
    let listed = s.list_agents().await.unwrap();
    assert_eq!(
        listed,
        [AgentInfo {
            capacity: 8,
            draining: true,
            ..info
        }]
    );
}

fn artifact(epoch: u64, path: &str) -> Artifact {
    Artifact {
        job_id: "j1".into(),
        epoch,
        path: path.into(),
        bucket: "b".into(),
        key: format!("outpost/j1/{epoch}/{path}"),
        size: 3,
        sha256: "ab".repeat(32),
        etag: "e".into(),
        uploaded_ms: 0,
    }
}

async fn only_the_current_leases_artifacts_are_recorded(s: Store) {
    s.insert_job("j1".into(), spec()).await.unwrap();
    s.lease_job("j1".into(), "a".into(), 0)
        .await
        .unwrap()
        .unwrap();
    s.record_artifact("a".into(), artifact(1, "out.bin"))
        .await
        .unwrap();
    // Reporting again is harmless.
    s.record_artifact("a".into(), artifact(1, "out.bin"))
        .await
        .unwrap();
    // The lease expires and the job goes to another agent with epoch 2.
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.expire_leases().await.unwrap();
    s.lease_job("j1".into(), "b".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    // The stale agent's late upload is refused; so is a wrong agent.
    assert!(matches!(
        s.record_artifact("a".into(), artifact(1, "late.bin")).await,
        Err(StoreError::Stale { epoch: 1, .. })
    ));
    assert!(matches!(
        s.record_artifact("a".into(), artifact(2, "late.bin")).await,
        Err(StoreError::Stale { .. })
    ));
    s.record_artifact("b".into(), artifact(2, "out.bin"))
        .await
        .unwrap();
    // Once the job is final, nothing more is accepted.
    s.report("j1".into(), 2, "b".into(), done()).await.unwrap();
    assert!(matches!(
        s.record_artifact("b".into(), artifact(2, "after.bin"))
            .await,
        Err(StoreError::Stale { .. })
    ));
    let unknown = Artifact {
        job_id: "nope".into(),
        ..artifact(2, "x")
    };
    assert!(matches!(
        s.record_artifact("b".into(), unknown).await,
        Err(StoreError::NotFound(_))
    ));
    let listed = s.list_artifacts("j1".into()).await.unwrap();
    let got: Vec<(u64, &str)> = listed.iter().map(|a| (a.epoch, a.path.as_str())).collect();
    assert_eq!(got, [(1, "out.bin"), (2, "out.bin")]);
    assert!(listed.iter().all(|a| a.uploaded_ms > 0));
}
