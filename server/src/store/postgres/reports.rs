//! Status reports of the current lease: queued for group commit
//! (`batch`), applied on the job's locked row (fencing).

use tokio_postgres::GenericClient;

use super::PgStore;
use super::schema::{JOB_COLS, big, current, forget_secrets, one_job};
use crate::model::{Job, JobState, StatusReport, now_ms};
use crate::store::Committed;
use crate::store::StoreError;

impl PgStore {
    /// Records a status report for the current lease. Final states end the
    /// lease. Returns the updated job once it is committed (with other
    /// reports and log chunks: `batch`).
    pub async fn report(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<Job, StoreError> {
        self.report_queued(id, epoch, agent, report).await?.await
    }

    /// Queues a status report for the next batch (in the order of the
    /// calls) and returns what resolves once its batch is committed.
    pub async fn report_queued(
        &self,
        id: String,
        epoch: u64,
        agent: String,
        report: StatusReport,
    ) -> Result<Committed<Job>, StoreError> {
        self.batch.report(id, epoch, agent, report).await
    }
}

/// A status report of the current lease, inside the caller's transaction.
pub(super) async fn report_in<C: GenericClient + Sync>(
    c: &C,
    id: &str,
    epoch: u64,
    agent: &str,
    report: &StatusReport,
) -> Result<Job, StoreError> {
    let job = current(c, id, epoch, agent, true).await?;
    let now = now_ms();
    if report.state.is_final() {
        let sql = format!(
            "UPDATE jobs SET state = $2, exit_code = $3, message = $4, oom_killed = $5,
                 finished_ms = $6, log_total = $7, lease_deadline_ms = 0,
                 started_ms = CASE WHEN started_ms = 0 THEN $6 ELSE started_ms END
             WHERE id = $1 RETURNING {JOB_COLS}"
        );
        let j = one_job(
            c,
            "record final status",
            &sql,
            &[
                &id,
                &report.state.as_str(),
                &report.exit_code,
                &report.message,
                &report.oom_killed,
                &now,
                &big(report.log_total),
            ],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        return forget_secrets(c, j).await;
    }
    if report.state == JobState::Running && job.state == JobState::Leased {
        let sql = format!(
            "UPDATE jobs SET state = 'running', started_ms = $2, undelivered = 0
             WHERE id = $1 RETURNING {JOB_COLS}"
        );
        return one_job(c, "record running", &sql, &[&id, &now])
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()));
    }
    Ok(job)
}
