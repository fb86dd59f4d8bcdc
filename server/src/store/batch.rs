//! What both backends' group commit shares: the operations it queues
//! (log chunks, status reports, agent records), their outcomes, how a batch
//! is gathered and how its callers are answered. Each backend's `batch.rs`
//! runs a batch in one transaction of its own.

use tokio::sync::{mpsc, oneshot};

use super::{Committed, StoreError};
use crate::model::{AgentInfo, Job, StatusReport};

/// Operations queued at most (senders wait beyond it).
pub(super) const QUEUE: usize = 512;
/// Operations per transaction at most.
const MAX_OPS: usize = 256;
/// Log bytes per transaction at most.
const MAX_BYTES: usize = 8 << 20;

// Queued by value and moved once: the size of the largest variant does
// not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Op {
    Append {
        id: String,
        epoch: u64,
        agent: String,
        offset: u64,
        data: bytes::Bytes,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Report {
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
        reply: oneshot::Sender<Result<Job, StoreError>>,
    },
    Agent {
        info: AgentInfo,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Append { data, .. } => data.len(),
            Op::Report { .. } | Op::Agent { .. } => 256,
        }
    }

    /// Answers with the batch's failure.
    pub(super) fn fail(self, why: &str) {
        let err = || StoreError::Batch(why.to_string());
        match self {
            Op::Append { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Op::Report { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Op::Agent { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
        }
    }
}

/// The outcome of one operation of a batch.
// One per queued operation, short-lived: the size of the largest variant
// does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Done {
    Appended(Result<u64, StoreError>),
    Reported(Result<Job, StoreError>),
    Recorded(Result<(), StoreError>),
}

impl Done {
    pub(super) fn is_ok(&self) -> bool {
        match self {
            Done::Appended(r) => r.is_ok(),
            Done::Reported(r) => r.is_ok(),
            Done::Recorded(r) => r.is_ok(),
        }
    }

    /// Its error, if it failed.
    pub(super) fn error(&self) -> Option<&StoreError> {
        match self {
            Done::Appended(Err(e)) | Done::Reported(Err(e)) | Done::Recorded(Err(e)) => Some(e),
            _ => None,
        }
    }
}

/// `first` and whatever else is queued now, up to the bounds of a batch
/// (there is no batching window: an idle store commits a chunk at once).
pub(super) fn gather(first: Op, rx: &mut mpsc::Receiver<Op>) -> Vec<Op> {
    let mut bytes = first.bytes();
    let mut ops = vec![first];
    while ops.len() < MAX_OPS && bytes < MAX_BYTES {
        match rx.try_recv() {
            Ok(op) => {
                bytes += op.bytes();
                ops.push(op);
            }
            Err(_) => break,
        }
    }
    ops
}

/// Answers every caller with its operation's outcome (after the commit).
pub(super) fn reply(ops: Vec<Op>, done: Vec<Done>) {
    for (op, d) in ops.into_iter().zip(done) {
        match (op, d) {
            (Op::Append { reply, .. }, Done::Appended(r)) => {
                let _ = reply.send(r);
            }
            (Op::Report { reply, .. }, Done::Reported(r)) => {
                let _ = reply.send(r);
            }
            (Op::Agent { reply, .. }, Done::Recorded(r)) => {
                let _ = reply.send(r);
            }
            (op, _) => op.fail("the store batch lost an answer"),
        }
    }
}

/// The queue of a backend's writer; what callers of group commit hold.
#[derive(Clone)]
pub(super) struct Writer(pub(super) mpsc::Sender<Op>);

impl Writer {
    async fn queue(&self, op: Op) -> Result<(), StoreError> {
        self.0.send(op).await.map_err(|_| StoreError::Join)
    }

    /// Queues a log chunk for the next batch (in the order of the calls);
    /// what it returns resolves once its batch is committed.
    pub(super) async fn append(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<Committed<u64>, StoreError> {
        let (reply, done) = Committed::new();
        self.queue(Op::Append {
            id,
            epoch,
            agent,
            offset,
            data,
            reply,
        })
        .await?;
        Ok(done)
    }

    /// Queues a status report, as [`Writer::append`].
    pub(super) async fn report(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<Committed<Job>, StoreError> {
        let (reply, done) = Committed::new();
        self.queue(Op::Report {
            id,
            epoch,
            agent,
            report,
            reply,
        })
        .await?;
        Ok(done)
    }

    /// Queues an agent's record, as [`Writer::append`].
    pub(super) async fn agent(&self, info: AgentInfo) -> Result<Committed<()>, StoreError> {
        let (reply, done) = Committed::new();
        self.queue(Op::Agent { info, reply }).await?;
        Ok(done)
    }
}
