//! Managed state: for a stack whose configuration declares no backend of
//! its own, the agent serves Terraform's `http` backend to the job, on
//! `127.0.0.1:`[`STATE_PORT`] inside the job's own network namespace, and
//! keeps nothing on disk:
//!
//! - before the container starts, the agent adds [`BACKEND_FILE`] to the
//!   root module (an `http` backend at that address, lock and unlock
//!   included), fetches the stack's current state version from the control
//!   plane and opens it with the pool key, in memory only;
//! - the job's script blocks on a ready pipe ([`crate::netns::ready`])
//!   until the agent has bound the endpoint inside the namespace, which
//!   exists only once the container has started;
//! - `GET` answers the state; `POST` (a new state, written by `apply`) is
//!   checked (valid, same lineage, serial not going back), sealed to the
//!   pool key and stored by the control plane as a new version, fenced by
//!   the job's `(job, epoch)`: a lease that is no longer current is
//!   refused there, and Terraform reports the failed write; `LOCK` and
//!   `UNLOCK` take and release a lock that lives with the endpoint, so it
//!   belongs to the lease and ends with it;
//! - the endpoint closes when the job's process ends.
//!
//! The plan records its backend, so the apply of a saved plan talks to the
//! same address, served by whichever agent of the pool holds the apply.
//! A stack with a backend of its own (S3 with the job's AWS role, say) is
//! left alone.

mod http;
pub mod scan;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use outpost_proto::iac::v1 as iacpb;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::plan::StateRef;
use super::{IacAgent, IacError};
use crate::job::LeaseKey;

pub use crate::netns::STATE_PORT;
/// The file the agent adds to the root module of a managed-state stack.
pub const BACKEND_FILE: &str = "outpost_managed_state.tf";
/// The ready pipe in the workspace on which the job's script waits.
pub const READY_FIFO: &str = ".outpost-state-ready";
/// Largest state accepted from a job.
pub const MAX_STATE_BYTES: usize = 48 << 20;

/// The start of every IaC script: wait for the state endpoint when the
/// agent has set one up (the ready pipe exists), else go on.
pub const WAIT_FOR_ENDPOINT: &str = "if [ -p /workspace/.outpost-state-ready ]; then \
IFS= read -r _ < /workspace/.outpost-state-ready || exit 1; fi\n";

/// The backend block the agent adds.
pub fn backend_file() -> String {
    let url = format!("http://127.0.0.1:{STATE_PORT}/state");
    format!(
        "# Added by the Outpost agent: the stack's state is managed by Outpost.\n\
         terraform {{\n  backend \"http\" {{\n    address        = \"{url}\"\n    \
         lock_address   = \"{url}\"\n    unlock_address = \"{url}\"\n    \
         retry_max      = 1\n  }}\n}}\n"
    )
}

/// Writes [`BACKEND_FILE`] into the root module `src` unless it declares a
/// backend of its own; returns whether the state is managed.
pub fn prepare(src: &Path, uid: u32, gid: u32) -> Result<bool, IacError> {
    let own = scan::declares_backend(src, BACKEND_FILE).map_err(|source| IacError::Read {
        what: "the configuration",
        source,
    })?;
    if own {
        return Ok(false);
    }
    if std::fs::symlink_metadata(src.join("terraform.tfstate")).is_ok() {
        return Err(IacError::Task(
            "the configuration holds a terraform.tfstate, but its state is managed by Outpost: \
             store that file with `outpost state push STACK terraform.tfstate --recipient pool.pub` \
             and remove it from the repository"
                .into(),
        ));
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = src.join(BACKEND_FILE);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)?;
        f.write_all(backend_file().as_bytes())?;
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
    };
    write().map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            IacError::Task(format!(
                "the configuration already has a file named {BACKEND_FILE}, which the agent writes itself"
            ))
        } else {
            IacError::Unpack(e)
        }
    })?;
    Ok(true)
}

/// A state write the endpoint refused, with the status Terraform sees.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl Refused {
    fn new(status: u16, message: impl Into<String>) -> Refused {
        Refused {
            status,
            message: message.into(),
        }
    }
}

/// The state of one job as its endpoint serves it.
pub struct Managed {
    agent: Arc<IacAgent>,
    key: LeaseKey,
    inner: tokio::sync::Mutex<Inner>,
    stop: CancellationToken,
}

struct Inner {
    current: StateRef,
    plain: Option<Vec<u8>>,
    /// The lock Terraform holds: its ID and its `LockInfo` as sent.
    lock: Option<(String, Vec<u8>)>,
    /// Versions this job stored.
    stored: u32,
}

impl Managed {
    pub fn new(
        agent: Arc<IacAgent>,
        key: LeaseKey,
        current: StateRef,
        plain: Option<Vec<u8>>,
    ) -> Managed {
        Managed {
            agent,
            key,
            inner: tokio::sync::Mutex::new(Inner {
                current,
                plain,
                lock: None,
                stored: 0,
            }),
            stop: CancellationToken::new(),
        }
    }

    /// The state as it is now, and how many versions this job stored.
    pub async fn current(&self) -> (StateRef, u32) {
        let inner = self.inner.lock().await;
        (inner.current.clone(), inner.stored)
    }

    /// Binds the endpoint inside the network namespace of process `pid`
    /// and serves it until [`close`](Self::close).
    pub async fn serve_in_netns_of(self: &Arc<Self>, pid: u32) -> Result<(), IacError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, STATE_PORT));
        let listener =
            tokio::task::spawn_blocking(move || crate::netns::bind_in_netns_of(pid, addr))
                .await
                .map_err(|_| IacError::Join("binding the state endpoint"))?
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| IacError::State(format!("binding its endpoint failed: {e}")))?;
        tokio::spawn(http::serve(listener, self.clone(), self.stop.clone()));
        Ok(())
    }

    /// The job's process has ended: the endpoint closes and the lock, which
    /// only that process could hold, is released.
    pub async fn end(&self) {
        self.stop.cancel();
        self.inner.lock().await.lock = None;
    }

    async fn get(&self) -> Option<Vec<u8>> {
        self.inner.lock().await.plain.clone()
    }

    async fn lock(&self, info: Vec<u8>) -> Result<(), Vec<u8>> {
        let id = lock_id(&info).unwrap_or_default();
        let mut inner = self.inner.lock().await;
        match &inner.lock {
            Some((held, body)) if *held != id || id.is_empty() => Err(body.clone()),
            _ => {
                inner.lock = Some((id, info));
                Ok(())
            }
        }
    }

    async fn unlock(&self, info: &[u8]) -> Result<(), Vec<u8>> {
        let id = lock_id(info).unwrap_or_default();
        let mut inner = self.inner.lock().await;
        match &inner.lock {
            Some((held, body)) if *held != id => Err(body.clone()),
            _ => {
                inner.lock = None;
                Ok(())
            }
        }
    }

    /// Checks a state the job sent and stores it as a new version.
    pub async fn store(&self, lock: Option<&str>, plain: Vec<u8>) -> Result<StateRef, Refused> {
        let mut inner = self.inner.lock().await;
        if let Some((held, _)) = &inner.lock
            && lock != Some(held.as_str())
        {
            return Err(Refused::new(
                409,
                "the state is locked by another operation",
            ));
        }
        let new = StateRef::of(&plain)
            .map_err(|e| Refused::new(400, format!("not a Terraform state: {e}")))?;
        let cur = &inner.current;
        if !cur.lineage.is_empty() && cur.lineage != new.lineage {
            return Err(Refused::new(
                409,
                format!(
                    "the state's lineage {} is not the stack's {}",
                    new.lineage, cur.lineage
                ),
            ));
        }
        if new.serial < cur.serial || (new.serial == cur.serial && !cur.lineage.is_empty()) {
            if new == *cur && inner.plain.as_deref() == Some(plain.as_slice()) {
                return Ok(new);
            }
            return Err(Refused::new(
                409,
                format!(
                    "serial {} does not follow the stack's serial {}",
                    new.serial, cur.serial
                ),
            ));
        }
        let sealed = self
            .agent
            .pool()
            .and_then(|p| p.seal(&plain).map_err(IacError::Seal))
            .map_err(|e| Refused::new(500, format!("sealing the state failed: {e}")))?;
        self.agent
            .client
            .clone()
            .push_state(iacpb::StatePush {
                job_id: self.key.job_id.clone(),
                epoch: self.key.epoch,
                serial: new.serial,
                lineage: new.lineage.clone(),
                sealed,
            })
            .await
            .map_err(|s| {
                Refused::new(
                    403,
                    format!("the control plane refused the state: {}", s.message()),
                )
            })?;
        info!(serial = new.serial, "state version stored");
        inner.current = new.clone();
        inner.plain = Some(plain);
        inner.stored += 1;
        Ok(new)
    }
}

/// The `ID` of a Terraform `LockInfo`.
fn lock_id(info: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(info).ok()?;
    v.get("ID")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_file_is_the_http_backend_at_the_fixed_address() {
        let f = backend_file();
        assert!(f.contains("backend \"http\""), "{f}");
        assert!(
            f.contains("address        = \"http://127.0.0.1:9912/state\""),
            "{f}"
        );
        assert!(f.contains("lock_address"), "{f}");
        assert!(scan::declares_backend_hcl(&f));
    }

    #[test]
    fn prepare_leaves_a_stack_with_its_own_backend_alone() {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.path()).unwrap();
        let (uid, gid) = (meta.uid(), meta.gid());
        std::fs::write(
            dir.path().join("main.tf"),
            "resource \"null_resource\" \"a\" {}\n",
        )
        .unwrap();
        assert!(prepare(dir.path(), uid, gid).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(BACKEND_FILE)).unwrap(),
            backend_file()
        );
        // A second preparation of the same checkout is refused, not doubled.
        assert!(prepare(dir.path(), uid, gid).is_err());
        // A state file in the checkout is refused, not silently shadowed.
        let committed = tempfile::tempdir().unwrap();
        std::fs::write(committed.path().join("terraform.tfstate"), "{}").unwrap();
        let e = prepare(committed.path(), uid, gid).unwrap_err().to_string();
        assert!(e.contains("outpost state push"), "{e}");
        let own = tempfile::tempdir().unwrap();
        std::fs::write(
            own.path().join("b.tf"),
            "terraform {\n backend \"s3\" {}\n}\n",
        )
        .unwrap();
        assert!(!prepare(own.path(), uid, gid).unwrap());
        assert!(!own.path().join(BACKEND_FILE).exists());
    }

    #[test]
    fn lock_ids_come_from_the_lock_info() {
        assert_eq!(
            lock_id(br#"{"ID":"abc","Operation":"OperationTypeApply"}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(lock_id(b"nope"), None);
    }
}
