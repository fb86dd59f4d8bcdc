//! Following a job from the command line: its log (`logs --follow`,
//! `submit --follow`), its end (`submit --wait`) and its wait in the queue.
//!
//! A control plane that goes away (a restart, an upgrade) does not end the
//! command: it says so on stderr, retries with a bounded backoff for up to
//! [`ClientConfig::reconnect_for`], and resumes the log at the offset it
//! had written, so no byte is lost or printed twice.
//!
//! One command keeps one connection ([`Link`]): `submit --wait` submits,
//! follows and reads the final state over one TLS handshake, and connects
//! again only after that connection failed.

use std::time::Duration;

use anyhow::{Result, bail};
use outpost_proto::admin::v1 as admin;
use outpost_proto::admin::v1::admin_service_client::AdminServiceClient;
use outpost_proto::agent::v1 as pb;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::output::{self, human, is_final, job_state, note};
use crate::client::{ClientConfig, ClientError};

/// After this long in the queue with no agent able to take it, a waiting
/// command says so.
pub const QUEUE_NOTICE_AFTER: Duration = Duration::from_secs(5);

/// Delay before retry number `attempt` (0-based): 200 ms doubling to 5 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(5))
}

/// Retries across one outage of the control plane at a time.
pub struct Reconnect {
    limit: Duration,
    outage: Option<(Instant, u32)>,
    /// Whether the control plane answered once: a first connection that
    /// fails is an error at once (a wrong address, nothing running).
    answered: bool,
}

impl Reconnect {
    pub fn new(client: &ClientConfig) -> Self {
        Reconnect {
            limit: client.reconnect_for,
            outage: None,
            answered: false,
        }
    }

    /// After a failure: says so (once per outage), waits the next backoff,
    /// or gives up when the outage has lasted `reconnect_for`.
    pub async fn failed(&mut self, why: &str) -> Result<()> {
        if !self.answered {
            bail!("{why}");
        }
        let (since, attempt) = match self.outage {
            Some(o) => o,
            None => {
                note!(
                    "lost the control plane ({why}); retrying for up to {}",
                    human(self.limit)
                );
                (Instant::now(), 0)
            }
        };
        if since.elapsed() >= self.limit {
            bail!(
                "gave up after {} without the control plane: {why}",
                human(since.elapsed())
            );
        }
        self.outage = Some((since, attempt + 1));
        tokio::time::sleep(backoff(attempt)).await;
        Ok(())
    }

    /// After a success: ends the outage.
    pub fn ok(&mut self) {
        self.answered = true;
        if let Some((since, _)) = self.outage.take() {
            note!(
                "reconnected to the control plane after {}",
                human(since.elapsed())
            );
        }
    }
}

/// The connection of one command to the control plane: made on first use,
/// kept for the command's later calls, made again after it failed.
pub struct Link<'a> {
    client: &'a ClientConfig,
    conn: Option<AdminServiceClient<Channel>>,
}

impl<'a> Link<'a> {
    pub fn new(client: &'a ClientConfig) -> Self {
        Link { client, conn: None }
    }

    /// The client for the next call (a handle on the one connection).
    pub async fn get(&mut self) -> Result<AdminServiceClient<Channel>, ClientError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let c = self.client.connect().await?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// A call failed: the next one connects again.
    pub fn lost(&mut self) {
        self.conn = None;
    }
}

/// Whether an error from the control plane may go away by itself.
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::Internal
    )
}

/// Whether a connection error may go away by itself (not a missing file or
/// a malformed address).
fn transient_connect(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connect { .. } | ClientError::NoAddress { .. }
    )
}

/// Where the printed log stands: the attempt (lease epoch) and how many of
/// its bytes were written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCursor {
    pub epoch: u64,
    pub offset: u64,
}

impl LogCursor {
    /// The part of `d` not written yet. Data of a newer attempt restarts the
    /// log (`restarted` is set); bytes before the cursor are skipped; data
    /// past it (a gap) is an error.
    pub fn take<'a>(&mut self, d: &'a admin::LogData) -> Result<(&'a [u8], bool), u64> {
        let mut restarted = false;
        if d.epoch != 0 && d.epoch != self.epoch {
            restarted = self.epoch != 0;
            *self = LogCursor {
                epoch: d.epoch,
                offset: 0,
            };
        }
        if d.offset > self.offset {
            return Err(d.offset);
        }
        let end = d.offset + d.data.len() as u64;
        if end <= self.offset {
            return Ok((&[], restarted));
        }
        let skip = (self.offset - d.offset) as usize;
        self.offset = end;
        Ok((&d.data[skip..], restarted))
    }
}

/// Streams a job's log to stdout; with `follow`, until the job ends.
pub async fn stream_logs(client: &ClientConfig, job: &str, follow: bool) -> Result<()> {
    stream_logs_on(&mut Link::new(client), job, follow).await
}

/// [`stream_logs`] over `link`.
pub async fn stream_logs_on(link: &mut Link<'_>, job: &str, follow: bool) -> Result<()> {
    let mut cursor = LogCursor::default();
    let mut retry = Reconnect::new(link.client);
    loop {
        let mut c = match link.get().await {
            Ok(c) => c,
            Err(e) if transient_connect(&e) => {
                retry.failed(&connect_reason(&e)).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let request = admin::FollowLogsRequest {
            job_id: job.to_string(),
            offset: cursor.offset,
            follow,
            epoch: cursor.epoch,
        };
        let mut stream = match c.follow_logs(request).await {
            Ok(s) => s.into_inner(),
            Err(s) if transient(&s) => {
                link.lost();
                retry.failed(s.message()).await?;
                continue;
            }
            Err(s) => bail!("{}", s.message()),
        };
        retry.ok();
        loop {
            match stream.message().await {
                Ok(Some(d)) => {
                    let data = match cursor.take(&d) {
                        Ok((data, restarted)) => {
                            if restarted {
                                note!(
                                    "job {job} was leased again (attempt {}); its output restarts",
                                    d.epoch
                                );
                            }
                            data
                        }
                        // Never print past a gap: ask again from the cursor.
                        Err(_) => break,
                    };
                    output::bytes(data)?;
                    if d.eof {
                        if follow && let Some(epoch) = newer_attempt(&mut c, job, cursor).await {
                            note!(
                                "job {job} was leased again (attempt {epoch}); its output restarts"
                            );
                            cursor = LogCursor { epoch, offset: 0 };
                            break;
                        }
                        return Ok(());
                    }
                    if !follow && d.data.is_empty() {
                        return Ok(());
                    }
                }
                Ok(None) if !follow => return Ok(()),
                // The control plane closed the stream (shutting down) or
                // the connection broke: resume from the cursor.
                Ok(None) | Err(_) => {
                    link.lost();
                    retry.failed("the log stream ended early").await?;
                    break;
                }
            }
        }
    }
}

/// After the end of attempt `cursor.epoch`: the job's newer attempt, if it
/// was leased again while this command was reconnecting.
async fn newer_attempt(
    c: &mut outpost_proto::admin::v1::admin_service_client::AdminServiceClient<
        tonic::transport::Channel,
    >,
    job: &str,
    cursor: LogCursor,
) -> Option<u64> {
    let j = c
        .get_job(admin::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .ok()?
        .into_inner();
    (cursor.epoch != 0 && j.epoch > cursor.epoch).then_some(j.epoch)
}

fn connect_reason(e: &ClientError) -> String {
    output::error_text(e)
}

/// Waits until the job is final, riding through control-plane restarts.
pub async fn wait_final(client: &ClientConfig, job: &str) -> Result<admin::Job> {
    wait_final_on(&mut Link::new(client), job).await
}

/// [`wait_final`] over `link`.
pub async fn wait_final_on(link: &mut Link<'_>, job: &str) -> Result<admin::Job> {
    let mut retry = Reconnect::new(link.client);
    loop {
        let mut c = match link.get().await {
            Ok(c) => c,
            Err(e) if transient_connect(&e) => {
                retry.failed(&connect_reason(&e)).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let j = match c
            .get_job(admin::GetJobRequest {
                job_id: job.to_string(),
            })
            .await
        {
            Ok(j) => j.into_inner(),
            Err(s) if transient(&s) => {
                link.lost();
                retry.failed(s.message()).await?;
                continue;
            }
            Err(s) => bail!("{}", s.message()),
        };
        retry.ok();
        if is_final(&j) {
            return Ok(j);
        }
        // The log stream is the change notification: it ends (`eof`) when
        // the job is final, and the state is read again at once. Look again
        // at least every few seconds; a stream that fails at once is not
        // asked again sooner than every 200 ms.
        let started = Instant::now();
        let watch = async {
            if let Ok(s) = c
                .follow_logs(admin::FollowLogsRequest {
                    job_id: job.to_string(),
                    offset: j.log_length,
                    follow: true,
                    epoch: 0,
                })
                .await
            {
                let mut s = s.into_inner();
                while let Ok(Some(d)) = s.message().await {
                    if d.eof {
                        return true;
                    }
                }
            }
            false
        };
        let ended = tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .unwrap_or(false);
        if !ended && started.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// While the job is queued: after [`QUEUE_NOTICE_AFTER`], says once on
/// stderr that no connected agent can take it. Ends when the job leaves
/// the queue or after the notice.
pub async fn watch_queue(client: ClientConfig, job: String) {
    let start = Instant::now();
    let mut conn = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if conn.is_none() {
            conn = client.connect().await.ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let j = match c
            .get_job(admin::GetJobRequest {
                job_id: job.clone(),
            })
            .await
        {
            Ok(j) => j.into_inner(),
            Err(_) => {
                conn = None;
                continue;
            }
        };
        if job_state(&j) != pb::JobState::Queued {
            return;
        }
        if j.matching_agents == Some(0) && start.elapsed() >= QUEUE_NOTICE_AFTER {
            note!("{}", queue_notice(&j, start.elapsed()));
            return;
        }
    }
}

/// Why a job is still queued, and what ends the wait.
pub fn queue_notice(j: &admin::Job, waited: Duration) -> String {
    let mut labels: Vec<String> = j.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let who = if labels.is_empty() {
        "no agent that takes jobs is connected".to_string()
    } else {
        format!("no connected agent has the labels {}", labels.join(","))
    };
    let end = if j.queue_timeout_ms > 0 {
        format!(
            "it ends at its queue timeout of {}",
            human(Duration::from_millis(j.queue_timeout_ms))
        )
    } else {
        "it waits until one connects (--queue-timeout bounds the wait; `outpost cancel` ends it)"
            .to_string()
    };
    format!(
        "job {} is still queued after {}: {who}; {end}",
        j.job_id,
        human(waited)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(epoch: u64, offset: u64, bytes: &[u8]) -> admin::LogData {
        admin::LogData {
            offset,
            data: bytes.to_vec(),
            eof: false,
            epoch,
        }
    }

    #[test]
    fn the_cursor_writes_each_byte_once_across_resumes() {
        let mut c = LogCursor::default();
        let mut out = Vec::new();
        let mut feed = |c: &mut LogCursor, d: admin::LogData| {
            let (bytes, restarted) = c.take(&d).unwrap();
            out.extend_from_slice(bytes);
            restarted
        };
        assert!(!feed(&mut c, data(1, 0, b"hello ")));
        // A resumed stream repeating bytes already written, then overlapping.
        feed(&mut c, data(1, 0, b"hello "));
        feed(&mut c, data(1, 3, b"lo wor"));
        feed(&mut c, data(1, 8, b"rld\n"));
        assert_eq!(out, b"hello world\n");
        assert_eq!(
            c,
            LogCursor {
                epoch: 1,
                offset: 12
            }
        );
        // A gap is refused, nothing is written and the cursor stays.
        assert_eq!(c.take(&data(1, 20, b"x")), Err(20));
        assert_eq!(c.offset, 12);
        // A new attempt starts over.
        let mut c2 = c;
        let again = data(2, 0, b"again");
        let (bytes, restarted) = c2.take(&again).unwrap();
        assert!(restarted);
        assert_eq!(
            (bytes, c2),
            (
                &b"again"[..],
                LogCursor {
                    epoch: 2,
                    offset: 5
                }
            )
        );
        // The end marker of a job never leased carries epoch 0.
        let mut c3 = LogCursor::default();
        assert_eq!(c3.take(&data(0, 0, b"")).unwrap(), (&b""[..], false));
    }

    #[test]
    fn the_backoff_grows_and_is_bounded() {
        let delays: Vec<u64> = (0..8).map(|a| backoff(a).as_millis() as u64).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn the_queue_notice_names_the_labels_and_the_way_out() {
        let j = admin::Job {
            job_id: "j1".into(),
            selector: [("pool".to_string(), "gpu".to_string())].into(),
            ..Default::default()
        };
        let text = queue_notice(&j, Duration::from_secs(6));
        assert!(
            text.contains("no connected agent has the labels pool=gpu"),
            "{text}"
        );
        assert!(text.contains("--queue-timeout"), "{text}");
        let j = admin::Job {
            queue_timeout_ms: 60_000,
            ..j
        };
        assert!(queue_notice(&j, Duration::from_secs(6)).contains("queue timeout of 1m00s"));
    }
}
