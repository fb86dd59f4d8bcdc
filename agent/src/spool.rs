//! The durable log spool: each job's output is written here before it is sent,
//! and deleted only once the control plane acknowledged it.
//!
//! Layout: `<root>/<job_id>-<epoch>/` holds `lease.pb` (the lease as received,
//! for re-adoption after a restart), `outcome.json` once the job ended, and
//! segment files `<start offset, 20 digits>.seg`. A segment is a sequence of
//! records `[len: u32 LE][crc32 of data: u32 LE][data]`; its records are
//! contiguous in the job's log from the offset in its name.
//!
//! **fsync policy:** a record is written (to the page cache) before its bytes
//! can be sent, so an agent crash or `kill -9` loses nothing. A segment is
//! fsynced when it is closed (rotation), when the job ends (before its final
//! status is sent), and by `sync()` which the runtime calls at most every
//! second while there is unsynced data: a host power loss can lose at most the
//! last second of output, and only bytes the control plane may already hold.
//!
//! **Recovery:** segments are read in order; the first record whose header is
//! incomplete, whose length is implausible, or whose checksum does not match
//! ends the log (a torn tail from a crash mid-write). The segment is truncated
//! there, and every complete record before it is kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::job::LeaseKey;

/// Largest record accepted on recovery (a sanity bound on the length field).
pub const MAX_RECORD: usize = 16 << 20;
const HEADER: usize = 8;

/// Errors of the spool. Messages name the operation and the path.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the log spool is full ({used} of {max} bytes used)")]
    Full { used: u64, max: u64 },
}

impl SpoolError {
    /// True when retrying later may succeed (disk or quota full).
    pub fn is_full(&self) -> bool {
        match self {
            SpoolError::Full { .. } => true,
            SpoolError::Io { source, .. } => {
                source.raw_os_error() == Some(28) // ENOSPC
                    || source.raw_os_error() == Some(122) // EDQUOT
            }
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The spool directory of an agent, with a size bound shared by all jobs.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    used: Arc<AtomicU64>,
}

/// A job's spool found on start.
#[derive(Debug)]
pub struct Recovered {
    pub key: LeaseKey,
    /// The lease as received (`lease.pb`).
    pub lease: Vec<u8>,
    /// `outcome.json`, if the job had ended.
    pub outcome: Option<Vec<u8>>,
    /// The spool, positioned at its end.
    pub spool: JobSpool,
    /// Offset of the first byte still on disk.
    pub start: u64,
    /// Bytes dropped from a torn tail.
    pub torn_bytes: u64,
}

impl Spool {
    pub fn open(root: &Path, max_bytes: u64, segment_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(root).map_err(io_err("create the spool directory", root))?;
        Ok(Spool {
            root: root.to_path_buf(),
            max_bytes,
            segment_bytes: segment_bytes.max(64),
            used: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn job_dir(&self, key: &LeaseKey) -> PathBuf {
        self.root.join(format!("{}-{}", key.job_id, key.epoch))
    }

    /// Creates the spool of a newly leased job whose log starts at `offset`.
    pub fn create(
        &self,
        key: &LeaseKey,
        lease: &[u8],
        offset: u64,
    ) -> Result<JobSpool, SpoolError> {
        let dir = self.job_dir(key);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create the job spool", &dir))?;
        write_atomic(&dir.join("lease.pb"), lease)?;
        Ok(JobSpool {
            dir,
            spool: self.clone(),
            segments: Vec::new(),
            current: None,
            end: offset,
            dirty: false,
        })
    }

    /// Reads every job spool left on disk (after a restart).
    pub fn recover(&self) -> Result<Vec<Recovered>, SpoolError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(io_err("list", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let dir = entry.path();
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            let Some((job_id, epoch)) = name.rsplit_once('-') else {
                continue;
            };
            let Ok(epoch) = epoch.parse::<u64>() else {
                continue;
            };
            let Ok(lease) = fs::read(dir.join("lease.pb")) else {
                // Created but never written: nothing to recover.
                let _ = fs::remove_dir_all(&dir);
                continue;
            };
            let outcome = fs::read(dir.join("outcome.json")).ok();
            let (spool, start, torn_bytes) = self.recover_job(&dir)?;
            out.push(Recovered {
                key: LeaseKey {
                    job_id: job_id.to_string(),
                    epoch,
                },
                lease,
                outcome,
                spool,
                start,
                torn_bytes,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn recover_job(&self, dir: &Path) -> Result<(JobSpool, u64, u64), SpoolError> {
        let mut segs: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let path = entry.map_err(io_err("list", dir))?.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
            else {
                continue;
            };
            if let Ok(start) = stem.parse::<u64>() {
                segs.push((start, path));
            }
        }
        segs.sort();
        let mut segments = Vec::new();
        let mut torn = 0u64;
        let mut expected: Option<u64> = None;
        let mut broken = false;
        for (start, path) in segs {
            if broken || expected.is_some_and(|e| e != start) {
                // Anything after a torn record or a gap cannot be trusted.
                let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                torn += len;
                let _ = fs::remove_file(&path);
                broken = true;
                continue;
            }
            let (records, valid_len, file_len) = scan_segment(&path)?;
            if valid_len < file_len {
                torn += file_len - valid_len;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                f.set_len(valid_len).map_err(io_err("truncate", &path))?;
                f.sync_all().map_err(io_err("sync", &path))?;
                broken = true;
            }
            self.used.fetch_add(valid_len, Ordering::Relaxed);
            expected = Some(start + records);
            segments.push(Segment {
                start,
                len: records,
                file_bytes: valid_len,
                path,
            });
        }
        let start = segments.first().map(|s| s.start).unwrap_or(0);
        let end = expected.unwrap_or(0);
        Ok((
            JobSpool {
                dir: dir.to_path_buf(),
                spool: self.clone(),
                segments,
                current: None,
                end,
                dirty: false,
            },
            start,
            torn,
        ))
    }
}

/// Returns (log bytes in valid records, valid file length, file length).
fn scan_segment(path: &Path) -> Result<(u64, u64, u64), SpoolError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_err("read", path))?;
    let (records, valid) = parse_records(&data, |_| {});
    Ok((records, valid as u64, data.len() as u64))
}

/// Walks the records of a segment image, calling `each` with every valid
/// record's data; returns (log bytes, valid prefix length).
pub fn parse_records(data: &[u8], mut each: impl FnMut(&[u8])) -> (u64, usize) {
    let mut pos = 0usize;
    let mut bytes = 0u64;
    while data.len() - pos >= HEADER {
        let len =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len == 0 || len > MAX_RECORD || data.len() - pos - HEADER < len {
            break;
        }
        let body = &data[pos + HEADER..pos + HEADER + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        each(body);
        bytes += len as u64;
        pos += HEADER + len;
    }
    (bytes, pos)
}

/// Encodes one record.
pub fn encode_record(data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(data);
}

#[derive(Debug)]
struct Segment {
    start: u64,
    /// Log bytes in the segment.
    len: u64,
    file_bytes: u64,
    path: PathBuf,
}

/// One job's spool.
#[derive(Debug)]
pub struct JobSpool {
    dir: PathBuf,
    spool: Spool,
    segments: Vec<Segment>,
    current: Option<File>,
    end: u64,
    dirty: bool,
}

impl JobSpool {
    /// Offset just past the last byte written.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Appends `data` as one record (larger data is split). Fails with a
    /// "full" error, leaving the spool unchanged, when the agent's spool
    /// bound or the disk is full.
    pub fn append(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        for part in data.chunks(1 << 20) {
            self.append_record(part)?;
        }
        Ok(())
    }

    fn append_record(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        let need = (HEADER + data.len()) as u64;
        let used = self.spool.used();
        if used + need > self.spool.max_bytes {
            return Err(SpoolError::Full {
                used,
                max: self.spool.max_bytes,
            });
        }
        let rotate = match self.segments.last() {
            None => true,
            Some(s) => self.current.is_none() || s.file_bytes + need > self.spool.segment_bytes,
        };
        if rotate {
            self.rotate()?;
        }
        let mut rec = Vec::with_capacity(HEADER + data.len());
        encode_record(data, &mut rec);
        let seg = self.segments.last_mut().ok_or_else(|| SpoolError::Io {
            op: "append to",
            path: self.dir.clone(),
            source: io::Error::other("no open segment"),
        })?;
        let file = self.current.as_mut().ok_or_else(|| SpoolError::Io {
            op: "append to",
            path: seg.path.clone(),
            source: io::Error::other("no open segment"),
        })?;
        if let Err(e) = file.write_all(&rec) {
            // Undo a partial write so the segment stays well-formed.
            let _ = file.set_len(seg.file_bytes);
            return Err(SpoolError::Io {
                op: "append to",
                path: seg.path.clone(),
                source: e,
            });
        }
        seg.file_bytes += need;
        seg.len += data.len() as u64;
        self.end += data.len() as u64;
        self.dirty = true;
        self.spool.used.fetch_add(need, Ordering::Relaxed);
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        if let (Some(f), Some(s)) = (self.current.take(), self.segments.last()) {
            f.sync_all().map_err(io_err("sync", &s.path))?;
        }
        let path = self.dir.join(format!("{:020}.seg", self.end));
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create the segment", &path))?;
        // An empty segment from an earlier attempt at this offset is reused.
        let existing = f.metadata().map(|m| m.len()).unwrap_or(0);
        if existing > 0 {
            f.set_len(0).map_err(io_err("truncate", &path))?;
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.segments.push(Segment {
            start: self.end,
            len: 0,
            file_bytes: 0,
            path,
        });
        self.current = Some(f);
        Ok(())
    }

    /// fsyncs the open segment if anything was written since the last sync.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if !self.dirty {
            return Ok(());
        }
        if let (Some(f), Some(s)) = (&self.current, self.segments.last()) {
            f.sync_data().map_err(io_err("sync", &s.path))?;
        }
        self.dirty = false;
        Ok(())
    }

    /// Reads log bytes from `from` up to at most `max` bytes.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::new();
        for seg in &self.segments {
            if seg.start + seg.len <= from || out.len() >= max {
                continue;
            }
            let mut data = Vec::new();
            File::open(&seg.path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(io_err("read", &seg.path))?;
            let mut off = seg.start;
            parse_records(&data, |rec| {
                let rec_end = off + rec.len() as u64;
                if rec_end > from && out.len() < max {
                    let skip = from.saturating_sub(off) as usize;
                    let take = (rec.len() - skip).min(max - out.len());
                    out.extend_from_slice(&rec[skip..skip + take]);
                }
                off = rec_end;
            });
        }
        Ok(out)
    }

    /// Deletes segments entirely below `offset` (acknowledged by the server).
    pub fn ack(&mut self, offset: u64) {
        while self.segments.len() > 1 || (self.segments.len() == 1 && self.current.is_none()) {
            let s = &self.segments[0];
            if s.start + s.len > offset || s.len == 0 {
                break;
            }
            let _ = fs::remove_file(&s.path);
            self.spool.used.fetch_sub(s.file_bytes, Ordering::Relaxed);
            self.segments.remove(0);
        }
    }

    /// Records how the job ended (synced), so a restarted agent can report it.
    pub fn set_outcome(&mut self, outcome: &[u8]) -> Result<(), SpoolError> {
        self.sync()?;
        write_atomic(&self.dir.join("outcome.json"), outcome)
    }

    /// Deletes the job's spool.
    pub fn remove(mut self) {
        self.current = None;
        for s in self.segments.drain(..) {
            self.spool.used.fetch_sub(s.file_bytes, Ordering::Relaxed);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SpoolError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(data).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> LeaseKey {
        LeaseKey {
            job_id: "job-a".into(),
            epoch: 3,
        }
    }

    #[test]
    fn write_recover_read_ack() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30, 4096).unwrap();
        let mut js = spool.create(&key(), b"lease", 0).unwrap();
        let mut all = Vec::new();
        for i in 0..500u32 {
            let line = format!("line {i}\n");
            js.append(line.as_bytes()).unwrap();
            all.extend_from_slice(line.as_bytes());
        }
        assert_eq!(js.read(0, usize::MAX).unwrap(), all);
        assert_eq!(js.read(100, 50).unwrap(), &all[100..150]);
        drop(js);
        let spool = Spool::open(dir.path(), 1 << 30, 4096).unwrap();
        let mut rec = spool.recover().unwrap();
        assert_eq!(rec.len(), 1);
        let r = rec.remove(0);
        assert_eq!(r.key, key());
        assert_eq!(r.lease, b"lease");
        assert_eq!(r.torn_bytes, 0);
        let mut js = r.spool;
        assert_eq!(js.end(), all.len() as u64);
        assert_eq!(js.read(0, usize::MAX).unwrap(), all);
        let used = spool.used();
        js.ack(all.len() as u64 - 10);
        assert!(spool.used() < used, "acknowledged segments are deleted");
        assert_eq!(
            js.read(all.len() as u64 - 10, usize::MAX).unwrap(),
            &all[all.len() - 10..]
        );
        js.append(b"more").unwrap();
        assert_eq!(js.end(), all.len() as u64 + 4);
    }

    #[test]
    fn the_bound_is_enforced_and_frees_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 10_000, 4096).unwrap();
        let mut js = spool.create(&key(), b"l", 0).unwrap();
        let chunk = vec![b'x'; 1000];
        let mut n = 0u64;
        loop {
            match js.append(&chunk) {
                Ok(()) => n += 1000,
                Err(e) => {
                    assert!(e.is_full(), "{e}");
                    assert!(e.to_string().contains("spool is full"));
                    break;
                }
            }
        }
        assert!(n >= 8000);
        js.ack(n);
        js.append(&chunk).expect("space after acknowledgement");
    }

    proptest! {
        /// Any prefix of a valid segment (a crash mid-write) recovers exactly
        /// the complete records it contains.
        #[test]
        fn torn_tail_recovers_every_complete_record(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 1..40),
            cut in any::<prop::sample::Index>(),
            garbage in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut image = Vec::new();
            let mut ends = vec![0usize];
            for r in &records {
                encode_record(r, &mut image);
                ends.push(image.len());
            }
            let cut = cut.index(image.len() + 1);
            let mut torn = image[..cut].to_vec();
            // A torn write may leave junk after the last complete record.
            let complete = ends.iter().copied().filter(|e| *e <= cut).count() - 1;
            if cut < image.len() { torn.extend_from_slice(&garbage); }
            let mut got: Vec<Vec<u8>> = Vec::new();
            let (bytes, valid) = parse_records(&torn, |r| got.push(r.to_vec()));
            // Junk may by chance extend a record only if it forms a valid
            // checksum, which the CRC makes vanishingly unlikely; require the
            // complete records to be recovered exactly.
            prop_assert!(got.len() >= complete);
            prop_assert_eq!(&got[..complete], &records[..complete]);
            prop_assert!(valid >= ends[complete]);
            prop_assert_eq!(bytes as usize, got.iter().map(Vec::len).sum::<usize>());
        }

        /// Flipping any byte inside a record is detected: recovery stops there.
        #[test]
        fn corruption_is_detected(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..10),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut image = Vec::new();
            let mut ends = vec![0usize];
            for r in &records { encode_record(r, &mut image); ends.push(image.len()); }
            let i = at.index(image.len());
            image[i] ^= flip;
            let rec = ends.iter().filter(|e| **e <= i).count() - 1;
            let mut got = Vec::new();
            let (bytes, valid) = parse_records(&image, |r| got.push(r.to_vec()));
            // Every record before the corrupted one survives, exactly; the
            // corrupted one and everything after it are not trusted. (A flip
            // passing the CRC is a 2^-32 event.)
            prop_assert_eq!(&got[..], &records[..rec]);
            prop_assert_eq!(valid, ends[rec]);
            prop_assert_eq!(bytes as usize, records[..rec].iter().map(Vec::len).sum::<usize>());
        }
    }

    #[test]
    fn a_torn_segment_on_disk_is_truncated_and_later_segments_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30, 64).unwrap();
        let mut js = spool.create(&key(), b"lease", 0).unwrap();
        for i in 0..20 {
            js.append(format!("{i:04}-abcdefghijklmnopqrstuvwxyz\n").as_bytes())
                .unwrap();
        }
        drop(js);
        // Tear the third segment in the middle of its record.
        let jd = dir.path().join("job-a-3");
        let mut segs: Vec<_> = fs::read_dir(&jd)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        let third = &segs[2];
        let len = fs::metadata(third).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(third)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let mut rec = Spool::open(dir.path(), 1 << 30, 64)
            .unwrap()
            .recover()
            .unwrap();
        let r = rec.remove(0);
        assert!(r.torn_bytes > 0);
        let data = r.spool.read(0, usize::MAX).unwrap();
        let text = String::from_utf8(data).unwrap();
        // Everything in the segments before the torn one survives, and
        // nothing from the torn segment on.
        assert_eq!(text, records_before(&segs, 2), "{text:?}");
        assert_eq!(r.spool.end(), text.len() as u64);
    }

    /// The log text held by the first `n` segments (sorted) of a spool.
    fn records_before(segs: &[PathBuf], n: usize) -> String {
        let mut out = Vec::new();
        for seg in &segs[..n] {
            let image = fs::read(seg).unwrap();
            let (_, valid) = parse_records(&image, |r| out.extend_from_slice(r));
            assert_eq!(valid, image.len(), "{} is intact", seg.display());
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_corrupted_record_on_disk_keeps_every_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of a few records each.
        let spool = Spool::open(dir.path(), 1 << 30, 200).unwrap();
        let mut js = spool.create(&key(), b"lease", 0).unwrap();
        let lines: Vec<String> = (0..40)
            .map(|i| format!("{i:04}-abcdefghijklmnopqrstuvwxyz\n"))
            .collect();
        for l in &lines {
            js.append(l.as_bytes()).unwrap();
        }
        drop(js);
        let jd = dir.path().join("job-a-3");
        let mut segs: Vec<_> = fs::read_dir(&jd)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        assert!(segs.len() >= 4, "{segs:?}");
        let before = records_before(&segs, 2);
        // Flip one byte in the data of the third segment's second record.
        let third = &segs[2];
        let mut image = fs::read(third).unwrap();
        let first_len = u32::from_le_bytes(image[..4].try_into().unwrap()) as usize;
        let mut kept_in_third = image[HEADER..HEADER + first_len].to_vec();
        let at = HEADER + first_len + HEADER + 3;
        image[at] ^= 0x20;
        fs::write(third, &image).unwrap();

        let mut rec = Spool::open(dir.path(), 1 << 30, 200)
            .unwrap()
            .recover()
            .unwrap();
        let r = rec.remove(0);
        assert!(r.torn_bytes > 0);
        let text = String::from_utf8(r.spool.read(0, usize::MAX).unwrap()).unwrap();
        let mut expected = before.into_bytes();
        expected.append(&mut kept_in_third);
        let expected = String::from_utf8(expected).unwrap();
        assert_eq!(text, expected);
        assert!(lines.concat().starts_with(&text));
        assert_eq!(r.spool.end(), text.len() as u64);
        // The later segments are gone from disk, the torn one truncated.
        assert_eq!(
            fs::metadata(third).unwrap().len() as usize,
            HEADER + first_len
        );
        for later in &segs[3..] {
            assert!(!later.exists(), "{} kept", later.display());
        }
    }
}
