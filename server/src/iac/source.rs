//! Stack sources: the real `git` program fetches the tracked branch into a
//! bare mirror per stack (`<data>/iac/git/<stack>`), resolves it to a commit,
//! and the project root at that commit is packed into a deterministic
//! tarball (entries sorted by path, mtime 0, owner 0:0, modes 0644/0755,
//! gzip without a timestamp), so the same tree always has the same SHA-256.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::IacError;

/// Longest a git command may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest source tarball accepted.
pub const MAX_SOURCE_BYTES: usize = 64 << 20;

/// A fetched source.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub commit: String,
    pub tarball: Vec<u8>,
}

async fn git(dir: Option<&Path>, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut cmd = tokio::process::Command::new("git");
    if let Some(d) = dir {
        cmd.arg("--git-dir").arg(d);
    }
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "/bin/false")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("git {} took longer than {GIT_TIMEOUT:?}", args[0]))?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        return Err(if err.is_empty() {
            format!("git {} failed ({})", args[0], out.status)
        } else {
            err.lines().last().unwrap_or(err).to_string()
        });
    }
    Ok(out.stdout)
}

/// Fetches `branch` of `repo` into the mirror `mirror` and packs
/// `project_root` at the fetched commit.
pub async fn fetch(
    mirror: &Path,
    repo: &str,
    branch: &str,
    project_root: &str,
) -> Result<Fetched, IacError> {
    fetch_ref(
        mirror,
        repo,
        &format!("refs/heads/{branch}"),
        branch,
        "refs/outpost/tracked",
        project_root,
    )
    .await
}

/// Checks a ref given for a proposed run (a branch, a tag, a full ref or
/// a commit): nothing git could take for an option or a refspec.
pub fn check_ref(r: &str) -> Result<(), String> {
    if r.is_empty()
        || r.len() > 256
        || r.starts_with('-')
        || r.contains("..")
        || r.chars().any(|c| {
            c.is_whitespace()
                || c.is_control()
                || matches!(c, ':' | '^' | '~' | '?' | '*' | '[' | '\\')
        })
    {
        return Err(format!("{r:?} is not a branch, tag or commit"));
    }
    Ok(())
}

/// Fetches `src` (a ref or a commit of `repo`) into `local` of the mirror
/// and packs `project_root` at that commit; `name` names it in errors.
pub async fn fetch_ref(
    mirror: &Path,
    repo: &str,
    src: &str,
    name: &str,
    local: &str,
    project_root: &str,
) -> Result<Fetched, IacError> {
    let fail = |reason: String| IacError::Fetch {
        repo: repo.to_string(),
        branch: name.to_string(),
        reason,
    };
    if !mirror.join("HEAD").exists() {
        tokio::fs::create_dir_all(mirror)
            .await
            .map_err(|e| fail(format!("cannot create the mirror: {e}")))?;
        let m = mirror.to_string_lossy().into_owned();
        git(None, &["init", "--bare", "--quiet", &m])
            .await
            .map_err(fail)?;
    }
    let refspec = format!("+{src}:{local}");
    git(
        Some(mirror),
        &["fetch", "--quiet", "--no-tags", "--", repo, &refspec],
    )
    .await
    .map_err(fail)?;
    let commit = git(
        Some(mirror),
        &["rev-parse", "--verify", &format!("{local}^{{commit}}")],
    )
    .await
    .map_err(fail)?;
    let commit = String::from_utf8_lossy(&commit).trim().to_string();
    let tree = if project_root == "." {
        commit.clone()
    } else {
        format!("{commit}:{project_root}")
    };
    let tar = git(Some(mirror), &["archive", "--format=tar", &tree])
        .await
        .map_err(|e| fail(format!("project root {project_root:?}: {e}")))?;
    let tarball = tokio::task::spawn_blocking(move || normalize(&tar))
        .await
        .map_err(|_| IacError::Join)?
        .map_err(|e| fail(format!("packing the source failed: {e}")))?;
    if tarball.len() > MAX_SOURCE_BYTES {
        return Err(fail(format!(
            "the packed source is {} bytes, above {MAX_SOURCE_BYTES}",
            tarball.len()
        )));
    }
    Ok(Fetched { commit, tarball })
}

enum Item {
    Dir,
    File { data: Vec<u8>, exec: bool },
    Link(PathBuf),
}

/// Re-packs a tar stream deterministically (see the module docs).
pub fn normalize(tar_bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut items: Vec<(String, Item)> = Vec::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let path = path.trim_end_matches('/').to_string();
        if path.is_empty() || path == "." {
            continue;
        }
        let kind = entry.header().entry_type();
        let item = if kind.is_dir() {
            Item::Dir
        } else if kind.is_file() {
            let exec = entry.header().mode()? & 0o111 != 0;
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            Item::File { data, exec }
        } else if kind.is_symlink() {
            match entry.link_name()? {
                Some(l) => Item::Link(l.into_owned()),
                None => continue,
            }
        } else {
            // pax headers (git's commit comment) and anything else.
            continue;
        };
        items.push((path, item));
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::default());
    let mut out = tar::Builder::new(gz);
    out.mode(tar::HeaderMode::Deterministic);
    for (path, item) in items {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match item {
            Item::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                out.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Item::File { data, exec } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if exec { 0o755 } else { 0o644 });
                h.set_size(data.len() as u64);
                out.append_data(&mut h, &path, data.as_slice())?;
            }
            Item::Link(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                out.append_link(&mut h, &path, &target)?;
            }
        }
    }
    out.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{script}");
    }

    #[tokio::test]
    async fn the_same_tree_packs_to_the_same_digest_and_errors_name_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join("infra/mod")).unwrap();
        std::fs::write(repo.join("infra/main.tf"), "# a\n").unwrap();
        std::fs::write(repo.join("infra/mod/x.tf"), "# x\n").unwrap();
        std::fs::write(repo.join("README"), "outside the root\n").unwrap();
        sh(
            &repo,
            "git init -q -b main . && git -c user.name=t -c user.email=t@t add -A && git -c user.name=t -c user.email=t@t commit -qm one",
        );
        let url = format!("file://{}", repo.display());
        let a = fetch(&dir.path().join("m1"), &url, "main", "infra")
            .await
            .unwrap();
        // A second mirror, later (different mtimes on disk): same bytes.
        sh(&repo, "touch infra/main.tf");
        let b = fetch(&dir.path().join("m2"), &url, "main", "infra")
            .await
            .unwrap();
        assert_eq!(a.commit, b.commit);
        assert_eq!(a.tarball, b.tarball);
        let mut names = Vec::new();
        let gz = flate2::read::GzDecoder::new(a.tarball.as_slice());
        for e in tar::Archive::new(gz).entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.header().mtime().unwrap(), 0);
            names.push(e.path().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(names, ["main.tf", "mod/", "mod/x.tf"]);

        let e = fetch(&dir.path().join("m1"), &url, "nope", "infra")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = fetch(
            &dir.path().join("m3"),
            "file:///nonexistent/repo",
            "main",
            ".",
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/repo"), "{e}");
    }
}
