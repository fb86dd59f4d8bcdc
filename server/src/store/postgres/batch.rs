//! Group commit: log chunks, status reports and agent records go through one
//! writer task that runs as many as are waiting (up to a bound) in one
//! transaction, each in a savepoint of its own (so one refused chunk does
//! not undo the others), and commits once.
//!
//! **Invariant:** a caller hears its result only after the batch's `COMMIT`
//! succeeded, and operations run in the order they were queued (one queue,
//! one writer), so a session that queues its chunks in order gets them
//! stored in order. There is no batching window: a batch is whatever queued
//! while the previous one committed.

use std::sync::Arc;

use deadpool_postgres::Pool;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::local::Local;
use super::pool_err;
use crate::store::StoreError;
use crate::store::batch::Op;
use crate::store::batch::{Done, QUEUE, Writer, gather, reply};

/// Runs of one batch at most.
const TRIES: u32 = 3;

/// The error of `d` if it aborted the transaction (a deadlock).
fn retryable(d: &mut Done) -> Option<StoreError> {
    if !d.error().is_some_and(super::leases::retryable) {
        return None;
    }
    let take = |e: &mut StoreError| std::mem::replace(e, StoreError::Join);
    match d {
        Done::Appended(Err(e)) | Done::Reported(Err(e)) | Done::Recorded(Err(e)) => Some(take(e)),
        _ => None,
    }
}

/// Starts the writer task; it ends once every sender is gone.
pub(super) fn spawn_writer(
    pool: Pool,
    local: Arc<Mutex<Local>>,
    latency: Arc<crate::metrics::Histogram>,
) -> Writer {
    let (tx, mut rx) = mpsc::channel::<Op>(QUEUE);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let started = std::time::Instant::now();
            let ops = gather(first, &mut rx);
            let mut tries = 0;
            let result = loop {
                tries += 1;
                match run(&pool, &ops).await {
                    // Rolled back whole (a deadlock with another replica's
                    // writes): nothing of it is stored, so it runs again.
                    Err(e) if tries < TRIES && super::leases::retryable(&e) => continue,
                    r => break r,
                }
            };
            match result {
                Ok(done) => answer(&local, ops, done),
                Err(e) => {
                    let why = error_chain(&e);
                    tracing::warn!(error = %why, ops = ops.len(), "a store batch failed");
                    for op in ops {
                        op.fail(&why);
                    }
                }
            }
            latency.observe(started.elapsed());
        }
    });
    Writer(tx)
}

/// The error and its causes, on one line.
fn error_chain(e: &StoreError) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Runs `ops` in one transaction; each result, once committed.
async fn run(pool: &Pool, ops: &[Op]) -> Result<Vec<Done>, StoreError> {
    let mut o = pool.get().await.map_err(pool_err("store batch"))?;
    let append = super::logs::AppendStmts::prepare(&o).await?;
    let client: &mut tokio_postgres::Client = &mut o;
    let mut tx = client
        .transaction()
        .await
        .map_err(super::pg("begin batch"))?;
    let mut done = Vec::with_capacity(ops.len());
    for op in ops {
        let sp = tx
            .savepoint("op")
            .await
            .map_err(super::pg("begin savepoint"))?;
        let mut d = match op {
            Op::Append {
                id,
                epoch,
                agent,
                offset,
                data,
                ..
            } => Done::Appended(
                super::logs::append_in(&sp, &append, id, *epoch, agent, *offset, data).await,
            ),
            Op::Report {
                id,
                epoch,
                agent,
                report,
                ..
            } => Done::Reported(super::reports::report_in(&sp, id, *epoch, agent, report).await),
            Op::Agent { info, .. } => Done::Recorded(super::agents::upsert_in(&sp, info).await),
        };
        if let Some(e) = retryable(&mut d) {
            // The whole transaction must go: the caller runs it again.
            return Err(e);
        }
        if d.is_ok() {
            sp.commit().await.map_err(super::pg("release savepoint"))?;
        } else {
            sp.rollback()
                .await
                .map_err(super::pg("roll back to savepoint"))?;
        }
        done.push(d);
    }
    tx.commit().await.map_err(super::pg("commit batch"))?;
    Ok(done)
}

/// After the commit: updates the local table, then answers every caller.
fn answer(local: &Mutex<Local>, ops: Vec<Op>, done: Vec<Done>) {
    {
        let mut l = local.lock();
        for (op, d) in ops.iter().zip(&done) {
            match (op, d) {
                (Op::Append { id, epoch, .. }, Done::Appended(Ok(end))) => {
                    l.set_acked(id, *epoch, *end)
                }
                (Op::Report { .. }, Done::Reported(Ok(job))) => l.apply(job),
                _ => {}
            }
        }
    }
    reply(ops, done);
}
