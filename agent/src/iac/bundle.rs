//! The plan bundle: what `apply` needs of a plan (the configuration as
//! planned, with its `.terraform.lock.hcl`, and the saved plan file), packed
//! by the agent that planned, encrypted to the pool key ([`super::seal`])
//! and unpacked by the agent that applies. Provider binaries
//! (`.terraform/`) and local state files stay out: apply initializes again,
//! and state comes from the control plane.
//!
//! Files the job wrote are read without following symlinks; symlinks and
//! anything else that is not a regular file or directory are left out.

use std::io::Read;
use std::path::Path;

/// Largest bundle (before encryption).
pub const MAX_BUNDLE_BYTES: u64 = 60 << 20;

/// Packs `<ws>/src` (as `src/`) and `<ws>/tfplan` (as `tfplan`).
pub fn pack(ws: &Path) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    let mut total = 0u64;
    add_dir(&mut b, &ws.join("src"), "src", true, &mut total)?;
    add_file(&mut b, &ws.join("tfplan"), "tfplan", &mut total)?;
    let tar = b.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar)?;
    gz.finish()
}

fn add_dir(
    b: &mut tar::Builder<Vec<u8>>,
    dir: &Path,
    name: &str,
    top: bool,
    total: &mut u64,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let file_name = e.file_name();
        let Some(n) = file_name.to_str() else {
            continue;
        };
        if top && (n == ".terraform" || n.starts_with("terraform.tfstate")) {
            continue;
        }
        let meta = std::fs::symlink_metadata(e.path())?;
        let child = format!("{name}/{n}");
        if meta.is_dir() {
            add_dir(b, &e.path(), &child, false, total)?;
        } else if meta.is_file() {
            add_file(b, &e.path(), &child, total)?;
        }
    }
    Ok(())
}

fn add_file(
    b: &mut tar::Builder<Vec<u8>>,
    path: &Path,
    name: &str,
    total: &mut u64,
) -> std::io::Result<()> {
    let left = MAX_BUNDLE_BYTES.saturating_sub(*total);
    let data = super::read_nofollow(path, left)?;
    *total += data.len() as u64;
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, data.as_slice())
}

/// The files of a bundle (name, bytes), for checks.
pub fn list(bundle: &[u8]) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bundle));
    let mut out = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry
            .by_ref()
            .take(MAX_BUNDLE_BYTES)
            .read_to_end(&mut data)?;
        out.push((name, data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_hold_config_lock_and_plan_but_no_providers_state_or_symlinks() {
        let ws = tempfile::tempdir().unwrap();
        let src = ws.path().join("src");
        std::fs::create_dir_all(src.join(".terraform/providers")).unwrap();
        std::fs::create_dir_all(src.join("modules/a")).unwrap();
        std::fs::write(src.join("main.tf"), "resource x {}").unwrap();
        std::fs::write(src.join(".terraform.lock.hcl"), "lock").unwrap();
        std::fs::write(src.join("modules/a/a.tf"), "a").unwrap();
        std::fs::write(src.join(".terraform/providers/p"), "binary").unwrap();
        std::fs::write(src.join("terraform.tfstate"), "state").unwrap();
        std::fs::write(ws.path().join("host"), "host file").unwrap();
        std::os::unix::fs::symlink(ws.path().join("host"), src.join("link.tf")).unwrap();
        std::fs::write(ws.path().join("tfplan"), "plan").unwrap();
        let b = pack(ws.path()).unwrap();
        assert_eq!(b, pack(ws.path()).unwrap(), "deterministic");
        let names: Vec<String> = list(&b).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "src/.terraform.lock.hcl",
                "src/main.tf",
                "src/modules/a/a.tf",
                "tfplan"
            ]
        );
        // The plan file itself may not be a symlink.
        std::fs::remove_file(ws.path().join("tfplan")).unwrap();
        std::os::unix::fs::symlink(ws.path().join("host"), ws.path().join("tfplan")).unwrap();
        assert!(pack(ws.path()).is_err());
    }
}
