//! Tests of several replicas (several `PgStore`s) on one database:
//! leasing, renewals, expiry, log appends and migrations never conflict.

use std::time::Duration;

use super::PgStore;
use super::testdb::fresh_db;
use crate::model::JobState;
use crate::store::StoreError;
use crate::store::conformance::{b, spec};

/// A store on a fresh database, and its URL (for more replicas), or
/// `None` (skipped).
async fn store() -> Option<(PgStore, String)> {
    let url = fresh_db().await?;
    let s = PgStore::connect(&url).await.expect("connect");
    Some((s, url))
}

#[tokio::test]
async fn pg_renewals_are_flushed_and_fenced_across_replicas() {
    let Some((a, url)) = store().await else {
        return;
    };
    let b = PgStore::connect(&url).await.unwrap();
    a.insert_job("j".into(), spec()).await.unwrap();
    // Leased on replica a with no time to live, renewed there in memory.
    let j = a
        .lease_job("j".into(), "x".into(), 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((j.epoch, a.held_count("x"), b.held_count("x")), (1, 1, 0));
    let (renewed, revoked) = a.renew_held("x", vec![("j".into(), 1)], 60_000);
    assert_eq!((renewed.len(), revoked.len()), (1, 0));
    // Another agent, an older epoch, or a lease this replica does not hold
    // are never renewed.
    let (renewed, revoked) = a.renew_held("y", vec![("j".into(), 1), ("j".into(), 0)], 60_000);
    assert_eq!((renewed.len(), revoked.len()), (0, 2));
    assert_eq!(b.renew_held("x", vec![("j".into(), 1)], 60_000).1.len(), 1);
    // Within a flush interval the renewal is durable: b's sweep keeps it.
    tokio::time::sleep(super::FLUSH_EVERY * 2 + Duration::from_millis(200)).await;
    let stored = b.get_job("j".into()).await.unwrap().unwrap();
    assert!(
        stored.lease_deadline_ms > crate::model::now_ms() + 50_000,
        "{stored:?}"
    );
    assert!(b.expire_leases().await.unwrap().is_empty());
    // The agent's session moves to b: it loads the agent's durable leases.
    let (renewed, revoked) = b.renew("x".into(), vec![], 60_000).await.unwrap();
    assert!(renewed.is_empty() && revoked.is_empty());
    assert_eq!(b.held_by("x"), [("j".to_string(), 1)]);
    // b ends the lease (re-queued); a's next flush finds it revoked.
    assert!(b.requeue("j".into(), 1, "x".into()).await.unwrap());
    a.renew_held("x", vec![("j".into(), 1)], 60_000);
    a.expire_leases().await.unwrap();
    let (renewed, revoked) = a.renew_held("x", vec![("j".into(), 1)], 60_000);
    assert_eq!(
        (renewed.len(), revoked.len()),
        (0, 1),
        "a revoked lease stops renewing"
    );
    let j = b
        .lease_job("j".into(), "y".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(j.epoch, 2);
    // The old holder's renewal never reaches the new lease.
    let stored = b.get_job("j".into()).await.unwrap().unwrap();
    assert_eq!(stored.agent_id.as_deref(), Some("y"));
    assert!(matches!(
        a.append_log("j".into(), 1, "x".into(), 0, self::b("x"))
            .await,
        Err(StoreError::Stale { .. })
    ));
    // A replica's start gives every active lease at least one ttl.
    let n = a
        .extend_active_leases(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let stored = b.get_job("j".into()).await.unwrap().unwrap();
    assert!(stored.lease_deadline_ms > crate::model::now_ms() + 3_000_000);
}

#[tokio::test]
async fn pg_an_abandoned_lease_expires_once_with_every_replica_sweeping() {
    let Some((a, url)) = store().await else {
        return;
    };
    let b = PgStore::connect(&url).await.unwrap();
    for i in 0..20 {
        a.insert_job(format!("j{i}"), spec()).await.unwrap();
        a.lease_job(format!("j{i}"), "x".into(), 0)
            .await
            .unwrap()
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (ea, eb) = tokio::join!(a.expire_leases(), b.expire_leases());
    let (ea, eb) = (ea.unwrap(), eb.unwrap());
    assert_eq!(ea.len() + eb.len(), 20, "each lease ends once");
    for i in 0..20 {
        let j = a.get_job(format!("j{i}")).await.unwrap().unwrap();
        assert_eq!((j.state, j.epoch), (JobState::Queued, 1));
    }
    assert!(a.expire_leases().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_two_replicas_lease_every_job_exactly_once() {
    let Some((a, url)) = store().await else {
        return;
    };
    let b = PgStore::connect(&url).await.unwrap();
    for i in 0..200 {
        a.insert_job(format!("j{i:03}"), spec()).await.unwrap();
    }
    // Both replicas hold a warm connection, then start together.
    let go = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    async fn dispatch(
        s: PgStore,
        agent: &'static str,
        go: std::sync::Arc<tokio::sync::Barrier>,
    ) -> Vec<crate::model::Job> {
        let mut got = Vec::new();
        s.queued_jobs(1).await.unwrap();
        go.wait().await;
        let started = std::time::Instant::now();
        for _ in 0..500 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "bounded in time"
            );
            let queued = s.queued_jobs(8).await.unwrap();
            if queued.is_empty() {
                break;
            }
            let pairs = queued
                .into_iter()
                .map(|j| (j.id, agent.to_string()))
                .collect();
            got.extend(
                s.lease_jobs(pairs, 60_000)
                    .await
                    .unwrap()
                    .into_iter()
                    .flatten(),
            );
        }
        got
    }
    let (ga, gb) = tokio::join!(
        tokio::spawn(dispatch(a.clone(), "a", go.clone())),
        tokio::spawn(dispatch(b.clone(), "b", go))
    );
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    eprintln!("replica a leased {}, replica b {}", ga.len(), gb.len());
    let mut ids: Vec<&str> = ga.iter().chain(&gb).map(|j| j.id.as_str()).collect();
    assert_eq!(ids.len(), 200, "a: {}, b: {}", ga.len(), gb.len());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "no job leased twice");
    assert!(
        ga.iter()
            .chain(&gb)
            .all(|j| j.epoch == 1 && j.state == JobState::Leased)
    );
    let active = a.active_jobs().await.unwrap();
    assert_eq!(active.len(), 200);
    assert!(active.iter().all(|j| j.epoch == 1));
    // Leasing them again leases none; 100 new jobs listed in full by both
    // replicas at once (opposite orders) are each leased once.
    let again: Vec<(String, String)> = (0..200).map(|i| (format!("j{i:03}"), "c".into())).collect();
    assert!(
        a.lease_jobs(again, 1)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );
    for i in 0..100 {
        a.insert_job(format!("k{i:03}"), spec()).await.unwrap();
    }
    let fresh: Vec<(String, String)> = (0..100).map(|i| (format!("k{i:03}"), "c".into())).collect();
    let reversed: Vec<(String, String)> = fresh.iter().rev().cloned().collect();
    let (ra, rb) = tokio::join!(
        tokio::spawn({
            let a = a.clone();
            async move { a.lease_jobs(fresh, 60_000).await }
        }),
        tokio::spawn({
            let b = b.clone();
            async move { b.lease_jobs(reversed, 60_000).await }
        })
    );
    let (ra, rb) = (ra.unwrap().unwrap(), rb.unwrap().unwrap());
    let mut won: Vec<&str> = ra
        .iter()
        .chain(&rb)
        .flatten()
        .map(|j| j.id.as_str())
        .collect();
    won.sort();
    won.dedup();
    assert_eq!(won.len(), 100);
    assert_eq!(
        ra.iter().chain(&rb).flatten().count(),
        100,
        "each leased once"
    );
    assert_eq!(
        a.held_count("a") + b.held_count("b") + a.held_count("c") + b.held_count("c"),
        300,
        "each replica holds what it leased"
    );
}

#[tokio::test]
async fn pg_migrations_apply_once_with_replicas_starting_together() {
    let Some(url) = fresh_db().await else { return };
    let (a, b, c) = tokio::join!(
        PgStore::connect(&url),
        PgStore::connect(&url),
        PgStore::connect(&url)
    );
    let (a, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let o = a.client().await.unwrap();
    let n: i64 = super::leases::pgc(&o)
        .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, super::schema::MIGRATIONS.len());
    // Connecting again applies nothing and keeps the data.
    a.insert_job("j".into(), spec()).await.unwrap();
    let again = PgStore::connect(&url).await.unwrap();
    assert!(again.get_job("j".into()).await.unwrap().is_some());
    assert!(matches!(
        PgStore::connect("not a url at all").await,
        Err(StoreError::Pg { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_two_replicas_appending_the_same_log_store_each_byte_once() {
    let Some((a, url)) = store().await else {
        return;
    };
    let b = PgStore::connect(&url).await.unwrap();
    a.insert_job("j".into(), spec()).await.unwrap();
    a.lease_job("j".into(), "x".into(), 60_000)
        .await
        .unwrap()
        .unwrap();
    // The same log in chunks of 7 bytes, sent in full by both replicas at
    // once (as after a session moved while chunks were in flight).
    let data: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let send = |s: PgStore, data: Vec<u8>| async move {
        let mut acked = 0u64;
        for (i, chunk) in data.chunks(7).enumerate() {
            let off = (i * 7) as u64;
            let chunk = bytes::Bytes::copy_from_slice(chunk);
            match s.append_log("j".into(), 1, "x".into(), off, chunk).await {
                Ok(n) => acked = acked.max(n),
                Err(e) => panic!("chunk at {off}: {e}"),
            }
        }
        acked
    };
    let (ra, rb) = tokio::join!(
        tokio::spawn(send(a.clone(), data.clone())),
        tokio::spawn(send(b.clone(), data.clone()))
    );
    assert_eq!((ra.unwrap(), rb.unwrap()), (2000, 2000));
    assert_eq!(
        a.read_log("j".into(), 1, 0, usize::MAX).await.unwrap(),
        data
    );
    let stored = b.get_job("j".into()).await.unwrap().unwrap();
    assert_eq!(stored.log_acked, 2000);
    // A stale writer is refused on either replica.
    assert!(matches!(
        b.append_log("j".into(), 2, "x".into(), 2000, self::b("x"))
            .await,
        Err(StoreError::Stale { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_a_renewal_of_a_locked_row_is_written_before_the_sweep_expires_it() {
    let Some((s, url)) = store().await else {
        return;
    };
    s.insert_job("j".into(), spec()).await.unwrap();
    s.lease_job("j".into(), "x".into(), 0)
        .await
        .unwrap()
        .unwrap();
    // Another writer holds the job's row; then the agent renews.
    let (mut other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tx = other.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM jobs WHERE id = 'j' FOR UPDATE", &[])
        .await
        .unwrap();
    s.renew_held("x", vec![("j".into(), 1)], 60_000);
    let sweep = tokio::spawn({
        let s = s.clone();
        async move { s.expire_leases().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sweep.is_finished(), "the renewal waits for the row");
    tx.commit().await.unwrap();
    let swept = tokio::time::timeout(Duration::from_secs(10), sweep)
        .await
        .expect("the sweep ends once the row is free")
        .unwrap()
        .unwrap();
    assert!(
        swept.is_empty(),
        "a renewed lease is not expired: {swept:?}"
    );
    let stored = s.get_job("j".into()).await.unwrap().unwrap();
    assert!(stored.lease_deadline_ms > crate::model::now_ms() + 50_000);
    let (renewed, _) = s.renew_held("x", vec![("j".into(), 1)], 60_000);
    assert_eq!(renewed.len(), 1);
}
