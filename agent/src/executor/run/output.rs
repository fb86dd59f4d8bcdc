//! A container's output on its way to the spool: masked per stream,
//! bounded by the output limit, forwarded by a task of its own.

use super::*;

impl DockerExecutor {
    pub(super) fn output_filter(
        &self,
        masker: Masker,
        skip: u64,
        over_limit: &CancellationToken,
        flush: bool,
    ) -> OutputFilter {
        OutputFilter {
            stderr_masker: masker.restart(),
            masker,
            skip,
            position: 0,
            limit: self.cfg.max_output_bytes,
            over_limit: over_limit.clone(),
            flush,
        }
    }
}

/// How a job's output is transformed on its way out: secrets masked, bytes
/// an earlier agent process already delivered skipped, and the total capped.
/// Offsets (`skip`, `position`, `limit`) count masked bytes, the bytes the
/// control plane receives.
///
/// stdout and stderr are masked apart, each with its own carry, so a secret
/// written in two pieces to one stream is masked even if the other stream
/// wrote in between (a piece that may begin a secret waits for the rest,
/// as the engine's log does with a partial line).
pub(super) struct OutputFilter {
    /// For stdout (and anything that is not stderr).
    pub(super) masker: Masker,
    pub(super) stderr_masker: Masker,
    /// Masked bytes still to drop (already delivered).
    pub(super) skip: u64,
    /// Masked bytes passed so far, skipped ones included.
    pub(super) position: u64,
    /// Most bytes ever delivered (`max_output_bytes`).
    pub(super) limit: u64,
    /// Fired when the output goes past `limit`.
    pub(super) over_limit: CancellationToken,
    /// Whether the end of the stream is the end of the output (the
    /// masker's carry is then flushed).
    pub(super) flush: bool,
}

impl OutputFilter {
    /// Skips and caps masked bytes; returns what may be sent.
    pub(super) fn pass(&mut self, mut bytes: Bytes) -> Bytes {
        self.position += bytes.len() as u64;
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            bytes = bytes.slice(n..);
            self.skip -= n as u64;
        }
        let from = self.position - bytes.len() as u64;
        let room = usize::try_from(self.limit.saturating_sub(from)).unwrap_or(usize::MAX);
        if bytes.len() > room {
            if !self.over_limit.is_cancelled() {
                tracing::warn!(limit = self.limit, "the job's output went past its limit");
                self.over_limit.cancel();
            }
            bytes.truncate(room);
        }
        bytes
    }
}

/// The masker of a job: its secret values and `more` (values found on the
/// host).
pub(super) fn masker(spec: &JobSpec, more: Vec<Vec<u8>>) -> Masker {
    Masker::new(
        spec.secrets
            .iter()
            .map(|s| s.value.expose())
            .chain(more.iter().map(Vec::as_slice)),
    )
}

/// The end of a forwarded stream.
pub(super) struct Forwarded {
    /// Masked bytes passed, including skipped ones.
    pub(super) position: u64,
    /// Bytes still to skip when the stream ended (it was shorter than `skip`).
    pub(super) unskipped: u64,
    pub(super) output: mpsc::Sender<Bytes>,
    pub(super) filter: OutputFilter,
}

pub(super) fn spawn_output(
    stream: OutputStream,
    output: mpsc::Sender<Bytes>,
    filter: OutputFilter,
) -> AbortOnDropHandle<Forwarded> {
    AbortOnDropHandle::new(tokio::spawn(
        forward_output(stream, output, filter).instrument(tracing::info_span!("output")),
    ))
}

/// Forwards the container's output through `filter` until its end.
pub(super) async fn forward_output(
    mut stream: OutputStream,
    output: mpsc::Sender<Bytes>,
    mut filter: OutputFilter,
) -> Forwarded {
    let mut receiver_gone = false;
    let send = async |bytes: Bytes, receiver_gone: &mut bool| {
        if bytes.is_empty() || *receiver_gone {
            return;
        }
        if output.send(bytes).await.is_err() {
            tracing::warn!("output receiver dropped; discarding the rest of the output");
            *receiver_gone = true;
        }
    };
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                let masked = match chunk {
                    LogOutput::StdErr { message } => filter.stderr_masker.push(message),
                    other => filter.masker.push(other.into_bytes()),
                };
                let bytes = filter.pass(masked);
                send(bytes, &mut receiver_gone).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the container's output failed");
                break;
            }
        }
    }
    if filter.flush {
        for rest in [filter.masker.finish(), filter.stderr_masker.finish()] {
            let bytes = filter.pass(rest);
            send(bytes, &mut receiver_gone).await;
        }
    }
    Forwarded {
        position: filter.position,
        unskipped: filter.skip,
        output,
        filter,
    }
}

/// Parses the engine's RFC 3339 UTC times (`2024-05-01T12:00:00.123456789Z`).
pub(super) fn parse_engine_time(text: &str) -> Option<SystemTime> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut hms = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days since 1970-01-01 in the proleptic Gregorian calendar.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    let nanos = if fraction.is_empty() {
        0
    } else {
        let digits: String = fraction.chars().take(9).collect();
        let value: u32 = digits.parse().ok()?;
        value * 10u32.pow(9 - u32::try_from(digits.len()).ok()?)
    };
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}
