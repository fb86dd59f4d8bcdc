//! What the CLI prints: stdout lines that end the command quietly when the
//! reader went away (`outpost jobs | head -1`), notices on stderr, error
//! chains without repeated phrases, and how jobs, times and durations read.

use std::io::Write;
use std::time::Duration;

use outpost_proto::admin::v1 as admin;
use outpost_proto::agent::v1 as pb;

/// Writes one line to stdout. A closed pipe is an error the caller returns
/// with `?`; `main` then exits quietly (see [`is_broken_pipe`]).
pub fn line(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Writes raw bytes (a job's output) to stdout.
pub fn bytes(data: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(data)?;
    out.flush()
}

/// `println!` that returns the error instead of panicking on a closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))?
    };
}
pub(crate) use outln;

/// A line on stderr for the user (progress, warnings). Never fails: a
/// closed stderr loses the notice, not the command.
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
}

macro_rules! note {
    ($($arg:tt)*) => {
        $crate::cli::output::stderr_line(format_args!("outpost: {}", format_args!($($arg)*)))
    };
}
pub(crate) use note;

/// Whether the command failed only because its stdout was closed.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, joined by `": "`, skipping a cause whose text
/// the message before it already holds (transport errors repeat their
/// sources: "tcp connect error: tcp connect error").
pub fn error_chain(e: &anyhow::Error) -> String {
    chain_text(e.chain().map(|c| c.to_string()))
}

/// [`error_chain`] of a plain error.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut messages = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        messages.push(c.to_string());
        cur = c.source();
    }
    chain_text(messages.into_iter())
}

fn chain_text(messages: impl Iterator<Item = String>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for m in messages {
        let m = m.trim();
        if m.is_empty() || parts.iter().any(|p| p.contains(m)) {
            continue;
        }
        parts.push(m.to_string());
    }
    parts.join(": ")
}

pub fn job_state(j: &admin::Job) -> pb::JobState {
    pb::JobState::try_from(j.state).unwrap_or(pb::JobState::Unspecified)
}

pub fn state_name(j: &admin::Job) -> &'static str {
    state_str(job_state(j))
}

pub fn state_str(s: pb::JobState) -> &'static str {
    match s {
        pb::JobState::Unspecified => "unknown",
        pb::JobState::Queued => "queued",
        pb::JobState::Leased => "leased",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::TimedOut => "timed_out",
        pb::JobState::Rejected => "rejected",
        pb::JobState::Lost => "lost",
    }
}

pub fn is_final(j: &admin::Job) -> bool {
    !matches!(
        job_state(j),
        pb::JobState::Queued
            | pb::JobState::Leased
            | pb::JobState::Running
            | pb::JobState::Unspecified
    )
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds);
/// zero (not happened yet) as `None`.
pub fn rfc3339(ms: i64) -> Option<String> {
    use time::format_description::well_known::Rfc3339;
    if ms <= 0 {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// A duration for people: `850ms`, `12s`, `3m05s`, `2h07m`, `3d04h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The time between two instants in ms since the epoch; `None` unless both happened.
pub fn between(from_ms: i64, to_ms: i64) -> Option<Duration> {
    (from_ms > 0 && to_ms > 0)
        .then(|| Duration::from_millis(to_ms.saturating_sub(from_ms).max(0) as u64))
}

/// Bytes for people: `64 MiB`, `1.5 GiB`, `1000 bytes`.
pub fn bytes_text(n: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift {
            let v = n as f64 / (1u64 << shift) as f64;
            return if n.is_multiple_of(1 << shift) {
                format!("{} {unit}", n >> shift)
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{n} bytes")
}

/// A command line as a shell would read it back.
pub fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn now_ms() -> i64 {
    crate::model::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_never_repeat_a_phrase() {
        let text = chain_text(
            [
                "failed to connect to the control plane at https://127.0.0.1:1",
                "transport error",
                "tcp connect error",
                "tcp connect error",
                "Connection refused (os error 111)",
            ]
            .into_iter()
            .map(String::from),
        );
        assert_eq!(
            text,
            "failed to connect to the control plane at https://127.0.0.1:1: transport error: tcp connect error: Connection refused (os error 111)"
        );
        // A message that already quotes its source.
        let text = chain_text(
            [
                "client error (Connect): tcp connect error",
                "tcp connect error",
                "",
            ]
            .into_iter()
            .map(String::from),
        );
        assert_eq!(text, "client error (Connect): tcp connect error");
    }

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the log");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("Broken pipe")));
    }

    #[test]
    fn times_and_durations_read_well() {
        assert_eq!(
            rfc3339(1_764_380_000_123).as_deref(),
            Some("2025-11-29T01:33:20.123Z")
        );
        assert_eq!(rfc3339(0), None);
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(2 * 3600 + 7 * 60)), "2h07m");
        assert_eq!(human(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d04h");
        assert_eq!(between(1_000, 4_500), Some(Duration::from_millis(3_500)));
        assert_eq!(between(1_000, 0), None);
        assert_eq!(bytes_text(64 << 20), "64 MiB");
        assert_eq!(bytes_text(3 << 29), "1.5 GiB");
        assert_eq!(bytes_text(1000), "1000 bytes");
        let words = ["sh", "-c", "echo 'hi' there", ""].map(String::from);
        assert_eq!(shell_words(&words), "sh -c 'echo '\\''hi'\\'' there' ''");
    }
}
