//! The replicas' channel: one dedicated PostgreSQL connection per replica
//! that `LISTEN`s, and sends this replica's signals with `pg_notify`.
//! It reconnects by itself (a database restart, a failover) and, once
//! back, hands the replica a `Kick` and a `Changed` to catch up on what it
//! may have missed, and tells the enrolment registry to reload. It connects
//! as the store does (TLS as the URL's `sslmode` says:
//! `store::postgres::tls`). `Identities` does not go to the hub: it bumps
//! [`Bus::identities`], which the enrolment registry watches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Signal;
use crate::store::postgres::tls::Target;

/// The `LISTEN/NOTIFY` channel's name.
const CHANNEL: &str = "outpost_replicas";
/// Messages for agents waiting to be sent at most (beyond, dropped: the
/// agent's next session start reconciles its leases anyway).
const QUEUE: usize = 1024;

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the database connection settings are not usable")]
    Settings(#[source] crate::store::postgres::tls::TlsSetupError),
}

/// This replica's end of the channel; cheap to share.
pub struct Bus {
    id: String,
    kick: AtomicBool,
    changed: AtomicBool,
    identities: AtomicBool,
    wake: Notify,
    deliver: mpsc::Sender<Signal>,
    /// Bumped when another replica changed enrolment records (and after
    /// the channel reconnected).
    identities_changed: watch::Sender<u64>,
}

impl Bus {
    /// Starts the channel for replica `id` on the database at `url`;
    /// signals of the other replicas arrive on the returned receiver. It
    /// stops on `shutdown`.
    pub fn start(
        url: &str,
        id: String,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Bus>, mpsc::Receiver<Signal>), BusError> {
        let target = crate::store::postgres::tls::target(url).map_err(BusError::Settings)?;
        let (deliver, outgoing) = mpsc::channel(QUEUE);
        let (incoming, rx) = mpsc::channel(QUEUE);
        let bus = Arc::new(Bus {
            id,
            kick: AtomicBool::new(false),
            changed: AtomicBool::new(false),
            identities: AtomicBool::new(false),
            wake: Notify::new(),
            deliver,
            identities_changed: watch::channel(0).0,
        });
        tokio::spawn(run(bus.clone(), target, outgoing, incoming, shutdown));
        Ok((bus, rx))
    }

    /// This replica's name on the channel.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Changes whenever another replica says enrolment records changed,
    /// and after the channel was lost and is back.
    pub fn identities(&self) -> watch::Receiver<u64> {
        self.identities_changed.subscribe()
    }

    fn identities_changed(&self) {
        self.identities_changed
            .send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Sends `signal` to the other replicas. `Kick`, `Changed` and
    /// `Identities` are coalesced (one pending of each at most); a message
    /// for an agent is queued.
    pub fn publish(&self, signal: Signal) {
        match signal {
            Signal::Kick => {
                self.kick.store(true, Ordering::Release);
                self.wake.notify_one();
            }
            Signal::Changed => {
                self.changed.store(true, Ordering::Release);
                self.wake.notify_one();
            }
            Signal::Identities => {
                self.identities.store(true, Ordering::Release);
                self.wake.notify_one();
            }
            deliver @ Signal::Deliver { .. } => {
                if self.deliver.try_send(deliver).is_err() {
                    warn!("too many messages for agents on other replicas: one dropped");
                }
            }
        }
    }
}

async fn run(
    bus: Arc<Bus>,
    target: Target,
    mut outgoing: mpsc::Receiver<Signal>,
    incoming: mpsc::Sender<Signal>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let session = connect(&bus, &target, &incoming, &shutdown);
        match session.await {
            Ok((client, ended)) => {
                if !first {
                    info!("replica channel back");
                }
                first = false;
                backoff = Duration::from_millis(100);
                // Whatever happened while the channel was down.
                let _ = incoming.try_send(Signal::Kick);
                let _ = incoming.try_send(Signal::Changed);
                bus.identities_changed();
                // `ended` is a child of `shutdown`: a stop ends both.
                if serve(&bus, &client, ended, &mut outgoing, &shutdown).await
                    || shutdown.is_cancelled()
                {
                    return;
                }
                warn!("replica channel lost; reconnecting");
            }
            Err(e) => debug!(error = %e, "replica channel: cannot connect"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Connects, listens, and spawns the task that reads notifications; the
/// returned token is cancelled when the connection ends.
async fn connect(
    bus: &Arc<Bus>,
    target: &Target,
    incoming: &mpsc::Sender<Signal>,
    shutdown: &CancellationToken,
) -> Result<(tokio_postgres::Client, CancellationToken), tokio_postgres::Error> {
    let (client, mut connection) = target.config.connect(target.tls.clone()).await?;
    let ended = shutdown.child_token();
    let (me, tx, done) = (bus.id.clone(), incoming.clone(), ended.clone());
    let bus = bus.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        loop {
            let msg = tokio::select! {
                _ = done.cancelled() => break,
                m = messages.next() => m,
            };
            match msg {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    match Signal::decode(n.payload()) {
                        Some((from, _)) if from == me => {}
                        Some((_, Signal::Identities)) => bus.identities_changed(),
                        Some((_, signal)) => {
                            if tx.send(signal).await.is_err() {
                                break;
                            }
                        }
                        None => debug!("replica channel: a signal this version does not know"),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    debug!(error = %e, "replica channel connection failed");
                    break;
                }
                None => break,
            }
        }
        done.cancel();
    });
    let listen = format!("LISTEN {CHANNEL}");
    if let Err(e) = client.batch_execute(&listen).await {
        ended.cancel();
        return Err(e);
    }
    Ok((client, ended))
}

/// Sends this replica's signals until the connection ends (`false`) or
/// the replica stops (`true`).
async fn serve(
    bus: &Bus,
    client: &tokio_postgres::Client,
    ended: CancellationToken,
    outgoing: &mut mpsc::Receiver<Signal>,
    shutdown: &CancellationToken,
) -> bool {
    let send = |signal: Signal| async move {
        let Some(payload) = signal.encode(&bus.id) else {
            warn!("a message for an agent on another replica is too large to relay");
            return Ok(());
        };
        client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .await
            .map(|_| ())
    };
    loop {
        let signal = tokio::select! {
            _ = shutdown.cancelled() => {
                ended.cancel();
                return true;
            }
            _ = ended.cancelled() => return false,
            _ = bus.wake.notified() => None,
            s = outgoing.recv() => match s {
                Some(s) => Some(s),
                None => return true,
            },
        };
        let mut batch = Vec::with_capacity(4);
        if bus.kick.swap(false, Ordering::AcqRel) {
            batch.push(Signal::Kick);
        }
        if bus.changed.swap(false, Ordering::AcqRel) {
            batch.push(Signal::Changed);
        }
        if bus.identities.swap(false, Ordering::AcqRel) {
            batch.push(Signal::Identities);
        }
        batch.extend(signal);
        for s in batch {
            if let Err(e) = send(s).await {
                debug!(error = %e, "replica channel: send failed");
                ended.cancel();
                return false;
            }
        }
    }
}
