//! The deliveries' store on both backends, and due deliveries claimed by
//! several replicas of one PostgreSQL database.

use std::collections::BTreeSet;

use super::*;
use crate::store::conformance::conformance;

conformance! {
    deliveries_are_due_saved_and_listed =>
        sqlite_deliveries_are_due_saved_and_listed,
        postgres_deliveries_are_due_saved_and_listed;
    global_targets_are_replaced =>
        sqlite_global_targets_are_replaced,
        postgres_global_targets_are_replaced;
}

fn target(url: &str) -> Target {
    Target {
        url: url.into(),
        format: "json".into(),
        ..Default::default()
    }
}

/// A pending delivery of `event` on `stack`, due at `next_at_ms`.
fn delivery(stack: &str, event: &str, next_at_ms: i64) -> Delivery {
    let mut d = Delivery::new(
        &target("http://127.0.0.1:9/hook"),
        &Event::new(event, stack, "r1"),
    );
    d.next_at_ms = next_at_ms;
    d
}

fn ids(ds: &[Delivery]) -> Vec<&str> {
    ds.iter().map(|d| d.id.as_str()).collect()
}

async fn deliveries_are_due_saved_and_listed(s: Store) {
    let n = NotifyStore::open(s).await.unwrap();
    let now = now_ms();
    let d1 = delivery("s1", "run.finished", now - 10);
    let d2 = delivery("s2", "run.failed", now - 5);
    let later = delivery("s1", "drift.detected", now + 60_000);
    for d in [&d1, &d2, &later] {
        n.insert(d.clone()).await.unwrap();
    }
    // Oldest first, as recorded, at most `limit`.
    let due = n.due(now, 1).await.unwrap();
    assert_eq!(due, std::slice::from_ref(&d1));
    // Saving gives a delivery back its next attempt (a claim ends).
    n.save(d1.clone()).await.unwrap();
    let due = n.due(now, 64).await.unwrap();
    assert_eq!(ids(&due), [d1.id.as_str(), d2.id.as_str()]);
    // Delivered, and retried later: neither is due now.
    let mut done = d1.clone();
    done.state = "delivered".into();
    done.attempts = 1;
    done.history.push(Attempt {
        at_ms: now,
        status: 200,
        error: String::new(),
        duration_ms: 3,
    });
    n.save(done.clone()).await.unwrap();
    let mut retry = d2.clone();
    retry.attempts = 1;
    retry.next_at_ms = now + 30_000;
    n.save(retry.clone()).await.unwrap();
    assert!(n.due(now, 64).await.unwrap().is_empty());
    assert_eq!(n.due(now + 30_000, 64).await.unwrap(), [retry.clone()]);
    // Newest first, by stack, at most `limit`; every attempt kept.
    let all = n.list(None, 10).await.unwrap();
    assert_eq!(
        ids(&all),
        [later.id.as_str(), d2.id.as_str(), d1.id.as_str()]
    );
    assert_eq!(all[2], done);
    let s1 = n.list(Some("s1".into()), 10).await.unwrap();
    assert_eq!(ids(&s1), [later.id.as_str(), d1.id.as_str()]);
    assert_eq!(n.list(None, 1).await.unwrap().len(), 1);
    assert!(n.list(Some("none".into()), 10).await.unwrap().is_empty());
}

async fn global_targets_are_replaced(s: Store) {
    let n = NotifyStore::open(s).await.unwrap();
    assert!(n.global().await.unwrap().is_empty());
    let a = target("https://a.example/hook");
    n.set_global(vec![a.clone()]).await.unwrap();
    assert_eq!(n.global().await.unwrap(), [a]);
    let (b, c) = (target("https://b.example/x"), target("http://c.example/y"));
    n.set_global(vec![b.clone(), c.clone()]).await.unwrap();
    assert_eq!(n.global().await.unwrap(), [b, c]);
    n.set_global(Vec::new()).await.unwrap();
    assert!(n.global().await.unwrap().is_empty());
}

/// Two handles on one fresh database (two replicas), or `None` (skipped).
async fn two_replicas() -> Option<(NotifyStore, NotifyStore)> {
    let url = crate::store::postgres::testdb::fresh_db().await?;
    let a = NotifyStore::open(Store::postgres(&url).await.unwrap())
        .await
        .unwrap();
    let b = NotifyStore::open(Store::postgres(&url).await.unwrap())
        .await
        .unwrap();
    Some((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_two_replicas_claim_each_due_delivery_once() {
    let Some((a, b)) = two_replicas().await else {
        return;
    };
    let now = now_ms();
    let mut all = BTreeSet::new();
    for i in 0..200 {
        let d = delivery(&format!("s{}", i % 3), "run.finished", now - 1);
        all.insert(d.id.clone());
        a.insert(d).await.unwrap();
    }
    // Both replicas take due deliveries at once, in small bites, until
    // none is left.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let take = |n: NotifyStore| {
        let start = start.clone();
        async move {
            start.wait().await;
            let mut got = Vec::new();
            loop {
                let due = n.due(now_ms(), 3).await.unwrap();
                if due.is_empty() {
                    return got;
                }
                got.extend(due.into_iter().map(|d| d.id));
            }
        }
    };
    let (ga, gb) = tokio::join!(tokio::spawn(take(a.clone())), tokio::spawn(take(b)));
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    let mut seen = BTreeSet::new();
    for id in ga.iter().chain(&gb) {
        assert!(seen.insert(id.clone()), "delivery {id} claimed twice");
    }
    assert_eq!(seen, all);
    assert!(
        !ga.is_empty() && !gb.is_empty(),
        "{} {}",
        ga.len(),
        gb.len()
    );
    // Every one is still pending until its attempt is saved, then listed.
    assert_eq!(a.list(None, 500).await.unwrap().len(), 200);
}

#[tokio::test]
async fn pg_a_claim_lapses_when_its_replica_dies() {
    let Some((a, b)) = two_replicas().await else {
        return;
    };
    let now = now_ms();
    let d = delivery("s", "run.failed", now - 1);
    a.insert(d.clone()).await.unwrap();
    assert_eq!(ids(&a.due(now, 10).await.unwrap()), [d.id.as_str()]);
    // Claimed by a: b does not attempt it…
    assert!(b.due(now_ms(), 10).await.unwrap().is_empty());
    // …until the claim lapses (a died mid-attempt): then b takes it over.
    let lapsed = now + CLAIM.as_millis() as i64 + 1;
    assert_eq!(ids(&b.due(lapsed, 10).await.unwrap()), [d.id.as_str()]);
    assert!(a.due(lapsed, 10).await.unwrap().is_empty());
}
