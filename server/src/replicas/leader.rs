//! One replica at a time runs the background work of stacks (the run
//! engine's steps, source polling, drift scheduling): the one holding a
//! session-level advisory lock on a dedicated connection to the database.
//! When that replica dies or loses the database, its connection ends, the
//! lock is released, and another replica takes it within
//! [`RETRY_EVERY`].
//!
//! **What it guarantees, and what it does not.** Leadership is an
//! optimisation, not fencing: every write the engine makes is a
//! transaction that checks the state it changes (a run leaves `QUEUED`
//! only where the stack lock is free, `CONFIRMED` becomes `APPLYING` once),
//! so two replicas that both believe they lead for a moment (one whose
//! connection died unnoticed, until its next check [`CHECK_EVERY`] later)
//! do no harm; they only repeat reads and git fetches.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::BusError;
use crate::store::postgres::tls::Target;

/// The advisory lock's key ("outplead" in ASCII).
const LOCK: i64 = 0x6f75_7470_6c65_6164;
/// How often the leader checks that its connection (and so its lock) is
/// still there.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often a replica that does not lead tries to.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for the database on one check.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this replica leads; cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// Kept for [`Leadership::always`], whose value never changes.
    _fixed: Option<std::sync::Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// A control plane alone (the embedded store): it always leads.
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(true);
        Leadership {
            rx,
            _fixed: Some(std::sync::Arc::new(tx)),
        }
    }

    /// Takes part in the election on the database at `url` until
    /// `shutdown`.
    pub fn elect(url: &str, shutdown: CancellationToken) -> Result<Leadership, BusError> {
        let target = crate::store::postgres::tls::target(url).map_err(BusError::Settings)?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(run(target, tx, shutdown));
        Ok(Leadership { rx, _fixed: None })
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until leadership is gained or lost (or the election stopped).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The election ended (shutdown): nothing will change again.
            std::future::pending::<()>().await;
        }
    }
}

async fn run(target: Target, tx: watch::Sender<bool>, shutdown: CancellationToken) {
    loop {
        let connect = target.config.connect(target.tls.clone());
        match tokio::time::timeout(TIMEOUT, connect).await {
            Ok(Ok((client, connection))) => {
                let ended = CancellationToken::new();
                let done = ended.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        debug!(error = %e, "election connection ended");
                    }
                    done.cancel();
                });
                hold(&client, &ended, &tx, &shutdown).await;
                if tx.send_replace(false) {
                    warn!("this replica no longer runs the background work of stacks");
                }
            }
            Ok(Err(e)) => debug!(error = %e, "election: cannot connect"),
            Err(_) => debug!("election: connecting timed out"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
}

/// Tries for the lock and, once held, checks the connection, until the
/// connection fails or `shutdown`.
async fn hold(
    client: &tokio_postgres::Client,
    ended: &CancellationToken,
    tx: &watch::Sender<bool>,
    shutdown: &CancellationToken,
) {
    loop {
        let query = async {
            if *tx.borrow() {
                client.simple_query("SELECT 1").await.map(|_| true)
            } else {
                client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])
                    .await
                    .map(|row| row.get::<_, bool>(0))
            }
        };
        let held = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ended.cancelled() => return,
            r = tokio::time::timeout(TIMEOUT, query) => match r {
                Ok(Ok(held)) => held,
                Ok(Err(e)) => {
                    debug!(error = %e, "election query failed");
                    return;
                }
                Err(_) => {
                    debug!("election query timed out");
                    return;
                }
            },
        };
        if held && !*tx.borrow() {
            info!("this replica runs the background work of stacks");
            tx.send_replace(true);
        }
        let wait = if held { CHECK_EVERY } else { RETRY_EVERY };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ended.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::Leadership;

    /// Waits up to `limit` for `f` to hold.
    async fn until(limit: Duration, f: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        f()
    }

    #[tokio::test]
    async fn one_replica_leads_and_another_takes_over_when_its_connection_dies() {
        let Some(url) = crate::store::postgres::testdb::fresh_db().await else {
            return;
        };
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let a = Leadership::elect(&url, stop_a.clone()).unwrap();
        let b = Leadership::elect(&url, stop_b.clone()).unwrap();
        assert!(
            until(Duration::from_secs(10), || a.is_leader() || b.is_leader()).await,
            "nobody leads"
        );
        // Stays exactly one over a few checks.
        for _ in 0..10 {
            assert!(
                a.is_leader() ^ b.is_leader(),
                "exactly one replica leads: a={} b={}",
                a.is_leader(),
                b.is_leader()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (leader, other, stop_leader, stop_other) = if a.is_leader() {
            (a, b, stop_a, stop_b)
        } else {
            (b, a, stop_b, stop_a)
        };

        // The leader's connection dies (as when its machine does): it
        // knows at once that it no longer leads.
        let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(killed.len(), 1, "one backend holds the lock");
        assert!(
            until(Duration::from_secs(5), || !leader.is_leader()).await,
            "the old leader knows it lost"
        );
        // It is gone for good (its process died): the other takes over.
        stop_leader.cancel();
        assert!(
            until(Duration::from_secs(10), || other.is_leader()).await,
            "the other replica takes over"
        );
        assert!(!leader.is_leader());
        stop_other.cancel();
    }

    #[tokio::test]
    async fn alone_it_always_leads() {
        let l = Leadership::always();
        assert!(l.is_leader());
    }
}
