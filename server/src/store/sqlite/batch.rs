//! Group commit: log chunks, status reports and agent records go through one
//! writer thread that runs as many as are waiting (up to a bound) in one
//! transaction, each in a savepoint of its own (so one refused chunk does
//! not undo the others), and commits once: one `fsync` per batch.
//!
//! **Invariant:** a caller hears its result only after the batch committed,
//! and operations run in the order they were queued (one queue, one
//! writer), so a session that queues its chunks in order gets them stored
//! in order. There is no batching window: a batch is whatever queued while
//! the previous one committed, so an idle store commits a chunk at once.

use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::Connection;
use tokio::sync::mpsc;

use super::held::Held;
use crate::store::batch::Op;
use crate::store::batch::{Done, QUEUE, Writer, gather, reply};

/// Starts the writer thread; it ends once every sender is gone. It holds
/// the connection only weakly, so the last `SqliteStore` handle dropped closes
/// the database at once (checkpointing the WAL into the file).
pub(super) fn spawn_writer(
    conn: std::sync::Weak<Mutex<Connection>>,
    held: Arc<Mutex<Held>>,
    latency: Arc<crate::metrics::Histogram>,
) -> std::io::Result<Writer> {
    let (tx, mut rx) = mpsc::channel::<Op>(QUEUE);
    std::thread::Builder::new()
        .name("outpost-store-writer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let started = std::time::Instant::now();
                let ops = gather(first, &mut rx);
                // Gone only when every handle is: the ops' waiters are gone too.
                let Some(conn) = conn.upgrade() else { break };
                run(&conn, &held, ops);
                drop(conn);
                latency.observe(started.elapsed());
            }
        })?;
    Ok(Writer(tx))
}

fn run(conn: &Mutex<Connection>, held: &Mutex<Held>, ops: Vec<Op>) {
    let mut c = conn.lock();
    let done = (|| -> Result<Vec<Done>, rusqlite::Error> {
        let mut tx = c.transaction()?;
        let mut done = Vec::with_capacity(ops.len());
        for op in &ops {
            let sp = tx.savepoint()?;
            let d = match op {
                Op::Append {
                    id,
                    epoch,
                    agent,
                    offset,
                    data,
                    ..
                } => Done::Appended(super::logs::append_in(
                    &sp, id, *epoch, agent, *offset, data,
                )),
                Op::Report {
                    id,
                    epoch,
                    agent,
                    report,
                    ..
                } => Done::Reported(super::leases::report_in(&sp, id, *epoch, agent, report)),
                Op::Agent { info, .. } => Done::Recorded(super::agents::upsert_in(&sp, info)),
            };
            if d.is_ok() {
                sp.commit()?;
            }
            // A failed one is rolled back when its savepoint drops.
            done.push(d);
        }
        tx.commit()?;
        Ok(done)
    })();
    match done {
        Ok(done) => {
            {
                let mut h = held.lock();
                for (op, d) in ops.iter().zip(&done) {
                    match (op, d) {
                        (Op::Append { id, .. }, Done::Appended(Ok(end))) => h.set_acked(id, *end),
                        (Op::Report { id, .. }, Done::Reported(Ok(_))) => {
                            if let Err(e) = h.sync(&c, id) {
                                tracing::warn!(job = %id, error = %e, "re-reading a lease after its report failed");
                            }
                        }
                        _ => {}
                    }
                }
            }
            drop(c);
            reply(ops, done);
        }
        Err(e) => {
            drop(c);
            let why = e.to_string();
            for op in ops {
                op.fail(&why);
            }
        }
    }
}
