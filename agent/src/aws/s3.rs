//! S3 for a job: its workspace archive (downloaded and unpacked before it
//! starts) and its artifacts (uploaded after it ends), both streamed, both
//! with the job's own (refreshed) credentials.
//!
//! The workspace directory is owned by the job, and the agent runs as root,
//! so both directions guard against the job's files: archives may only hold
//! regular files and directories below the workspace, and artifacts are
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and must be
//! regular files.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::primitives::Length;
use base64::Engine as _;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;

use super::AwsError;

/// Most entries a workspace archive may hold.
const MAX_ENTRIES: u64 = 200_000;

/// `s3://bucket/key`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub key: String,
}

impl S3Url {
    pub fn parse(url: &str) -> Result<S3Url, AwsError> {
        let bad = |reason| AwsError::WorkspaceUrl {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it must start with s3://"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names no object key"))?;
        if bucket.is_empty() || key.is_empty() {
            return Err(bad("it names no bucket or no object key"));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Downloads `url` (a gzipped tar) and unpacks it into `workspace`, owned by
/// `uid:gid`. Streamed: memory use does not depend on the archive's size.
pub async fn download_workspace(
    s3: &aws_sdk_s3::Client,
    url: &S3Url,
    workspace: &Path,
    uid: u32,
    gid: u32,
    max_bytes: u64,
) -> Result<u64, AwsError> {
    let object = s3
        .get_object()
        .bucket(&url.bucket)
        .key(&url.key)
        .send()
        .await
        .map_err(|e| AwsError::Download {
            url: url.to_string(),
            message: DisplayErrorContext(&e).to_string(),
        })?;
    let reader = tokio_util::io::SyncIoBridge::new(object.body.into_async_read());
    let dest = workspace.to_path_buf();
    let what = url.to_string();
    tokio::task::spawn_blocking(move || {
        let gz = flate2::read::GzDecoder::new(reader);
        unpack(gz, &dest, uid, gid, max_bytes)
            .map_err(|source| AwsError::Unpack { url: what, source })
    })
    .await
    .map_err(|source| AwsError::Blocking {
        operation: "unpacking the workspace",
        source,
    })?
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The relative path of an archive entry, or why it is refused.
fn entry_path(raw: &Path) -> io::Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "entry {} leaves the workspace",
                    raw.display()
                )));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Unpacks a tar stream into `dest` (an existing directory the agent
/// created). Only regular files and directories are accepted; every path
/// must stay below `dest`; the total size is capped. Returns bytes written.
pub fn unpack(
    reader: impl Read,
    dest: &Path,
    uid: u32,
    gid: u32,
    max_bytes: u64,
) -> io::Result<u64> {
    let mut archive = tar::Archive::new(reader);
    let mut total = 0u64;
    let mut entries = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} entries")));
        }
        let raw = entry.path()?.into_owned();
        let Some(rel) = entry_path(&raw)? else {
            continue;
        };
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        // Parents are created by us, never taken from the archive's links:
        // there are none, since only files and directories are accepted.
        if let Some(parent) = target.parent() {
            make_dirs(dest, parent, uid, gid)?;
        }
        match kind {
            tar::EntryType::Directory => make_dirs(dest, &target, uid, gid)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size()?;
                if total.saturating_add(size) > max_bytes {
                    return Err(invalid(format!(
                        "it unpacks to more than {max_bytes} bytes"
                    )));
                }
                let mut file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc_o_nofollow())
                    .open(&target)?;
                let written = io::copy(&mut (&mut entry).take(size), &mut file)?;
                total += written;
                file.flush()?;
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
                file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
                    (mode & 0o755) | 0o600,
                ))?;
            }
            other => {
                return Err(invalid(format!(
                    "entry {} is a {other:?}; only files and directories are allowed",
                    raw.display()
                )));
            }
        }
    }
    Ok(total)
}

fn libc_o_nofollow() -> i32 {
    OFlag::O_NOFOLLOW.bits()
}

/// Creates `dir` and its missing parents below `root`, owned by `uid:gid`.
fn make_dirs(root: &Path, dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    if dir == root {
        return Ok(());
    }
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(invalid(format!(
                "{} is both a file and a directory in the archive",
                dir.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        make_dirs(root, parent, uid, gid)?;
    }
    std::fs::DirBuilder::new().mode(0o755).create(dir)?;
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
}

/// A workspace-relative artifact path, checked.
pub fn artifact_path(path: &str) -> Result<PathBuf, AwsError> {
    let bad = |reason| AwsError::ArtifactPath {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() || path.contains('\0') {
        return Err(bad("it is empty or contains a NUL byte"));
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err(bad("it must be relative to the workspace, without '..'")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad("it names the workspace itself"));
    }
    Ok(out)
}

/// Opens an artifact below `workspace` without following any symlink and
/// checks that it is a regular file; returns it and its size.
pub fn open_artifact(workspace: &Path, rel: &Path) -> Result<(File, u64), AwsError> {
    let fail = |source: io::Error| AwsError::OpenArtifact {
        path: rel.display().to_string(),
        source,
    };
    let dir: OwnedFd = nix::fcntl::open(
        workspace,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(e.into()))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let fd = openat2(&dir, rel, how).map_err(|e| fail(e.into()))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(fail)?;
    if !meta.is_file() {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok((file, meta.len()))
}

/// Hex SHA-256 of a file, read from its start.
pub fn sha256_file(file: &File) -> io::Result<(String, [u8; 32])> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut reader = io::BufReader::with_capacity(256 * 1024, file);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let digest = ctx.finish();
    let mut raw = [0u8; 32];
    raw.copy_from_slice(digest.as_ref());
    let hex = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, raw))
}

/// One uploaded artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub path: String,
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub etag: String,
}

/// Uploads one artifact, streamed from the open file (re-opened through
/// `/proc/self/fd` so that a retried request can read it again), with the
/// job id and epoch as object metadata and S3 verifying its SHA-256.
#[allow(clippy::too_many_arguments)]
pub async fn upload_artifact(
    s3: &aws_sdk_s3::Client,
    workspace: &Path,
    path: &str,
    bucket: &str,
    key: String,
    job_id: &str,
    epoch: u64,
) -> Result<Uploaded, AwsError> {
    let rel = artifact_path(path)?;
    let ws = workspace.to_path_buf();
    let (file, size, sha_hex, sha_raw) = tokio::task::spawn_blocking(move || {
        let (file, size) = open_artifact(&ws, &rel)?;
        let (hex, raw) = sha256_file(&file).map_err(|source| AwsError::OpenArtifact {
            path: rel.display().to_string(),
            source,
        })?;
        Ok::<_, AwsError>((file, size, hex, raw))
    })
    .await
    .map_err(|source| AwsError::Blocking {
        operation: "reading an artifact",
        source,
    })??;
    let fail = |message: String| AwsError::Upload {
        path: path.to_string(),
        url: format!("s3://{bucket}/{key}"),
        message,
    };
    let body = ByteStream::read_from()
        .path(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .length(Length::Exact(size))
        .build()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let out = s3
        .put_object()
        .bucket(bucket)
        .key(&key)
        .body(body)
        .content_length(size as i64)
        .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(sha_raw))
        .metadata("outpost-job-id", job_id)
        .metadata("outpost-epoch", epoch.to_string())
        .metadata("outpost-path", path)
        .send()
        .await
        .map_err(|e| fail(DisplayErrorContext(&e).to_string()))?;
    drop(file);
    Ok(Uploaded {
        path: path.to_string(),
        bucket: bucket.to_string(),
        key,
        size,
        sha256: sha_hex,
        etag: out
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file_entry(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Bypass the builder's own path checks to forge hostile names.
        let name: &mut [u8] = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn me() -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let m = std::fs::metadata(dir.path()).unwrap();
        (m.uid(), m.gid())
    }

    #[test]
    fn unpacks_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let data = tarball(|b| {
            file_entry(b, "main.tf", b"resource x {}");
            file_entry(b, "./modules/net/vars.tf", b"variable y {}");
        });
        let (uid, gid) = me();
        let n = unpack(&data[..], dir.path(), uid, gid, 1 << 20).unwrap();
        assert_eq!(n, 13 + 13);
        assert_eq!(
            std::fs::read(dir.path().join("main.tf")).unwrap(),
            b"resource x {}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("modules/net/vars.tf")).unwrap(),
            b"variable y {}"
        );
    }

    #[test]
    fn refuses_traversal_links_and_bombs() {
        let (uid, gid) = me();
        for (name, data) in [
            ("dotdot", tarball(|b| file_entry(b, "../escape", b"x"))),
            (
                "nested dotdot",
                tarball(|b| file_entry(b, "a/../../escape", b"x")),
            ),
            ("absolute", tarball(|b| file_entry(b, "/tmp/escape", b"x"))),
            (
                "symlink",
                tarball(|b| {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, "link", "/etc").unwrap();
                }),
            ),
            (
                "hardlink",
                tarball(|b| {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, "hard", "/etc/passwd").unwrap();
                }),
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let ws = dir.path().join("ws");
            std::fs::create_dir(&ws).unwrap();
            let e = unpack(&data[..], &ws, uid, gid, 1 << 20).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{name}: {e}");
            assert!(!dir.path().join("escape").exists(), "{name}");
            assert!(
                std::fs::read_dir(&ws)
                    .unwrap()
                    .all(|e| { !e.unwrap().file_type().unwrap().is_symlink() })
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let big = tarball(|b| file_entry(b, "big", &vec![0u8; 4096]));
        let e = unpack(&big[..], dir.path(), uid, gid, 1000).unwrap_err();
        assert!(e.to_string().contains("more than 1000 bytes"), "{e}");
    }

    #[test]
    fn artifact_paths_stay_in_the_workspace() {
        assert_eq!(
            artifact_path("out/plan.bin").unwrap(),
            Path::new("out/plan.bin")
        );
        assert_eq!(artifact_path("./a").unwrap(), Path::new("a"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", ".", "a\0b"] {
            assert!(artifact_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn artifacts_are_opened_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::write(ws.join("real"), b"data").unwrap();
        std::fs::create_dir(ws.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", ws.join("leak")).unwrap();
        std::os::unix::fs::symlink("/etc", ws.join("dirlink")).unwrap();
        let (f, size) = open_artifact(ws, Path::new("real")).unwrap();
        assert_eq!(size, 4);
        assert_eq!(sha256_file(&f).unwrap().0.len(), 64);
        assert!(open_artifact(ws, Path::new("leak")).is_err());
        assert!(open_artifact(ws, Path::new("dirlink/hostname")).is_err());
        assert!(
            open_artifact(ws, Path::new("sub")).is_err(),
            "directories are refused"
        );
        assert!(open_artifact(ws, Path::new("missing")).is_err());
    }

    #[test]
    fn s3_urls_parse() {
        assert_eq!(
            S3Url::parse("s3://b/k/w.tar.gz").unwrap(),
            S3Url {
                bucket: "b".into(),
                key: "k/w.tar.gz".into()
            }
        );
        for bad in ["b/k", "s3://b", "s3:///k", "s3://b/", "https://b/k"] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }
}
