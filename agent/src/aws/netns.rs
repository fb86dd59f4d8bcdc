//! Binding a listening socket inside another process's network namespace.
//!
//! `setns(2)` moves only the calling thread, and a thread that entered a job's
//! namespace must never run anything else, so each bind happens on a thread
//! of its own that ends right after. The socket keeps the namespace it was
//! created in, so the listener then works from any thread (and keeps the
//! namespace alive until it is closed). Needs `CAP_SYS_ADMIN` (the agent runs
//! as root to drive Docker anyway).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};

use nix::sched::{CloneFlags, setns};

/// Binds `addr` inside the network namespace of process `pid`.
pub fn bind_in_netns_of(pid: u32, addr: SocketAddr) -> io::Result<TcpListener> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    bind_in_netns(ns, addr)
}

/// Binds `addr` inside the network namespace `ns` (an open `/proc/*/ns/net`).
pub fn bind_in_netns(ns: File, addr: SocketAddr) -> io::Result<TcpListener> {
    let thread = std::thread::Builder::new()
        .name("outpost-netns".into())
        .spawn(move || -> io::Result<TcpListener> {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
            // The thread ends here, with it its membership of the namespace.
        })?;
    thread
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_in_our_own_namespace() {
        // Entering one's own namespace is allowed for root and a no-op
        // otherwise fails with EPERM; both show the plumbing works.
        let pid = std::process::id();
        match bind_in_netns_of(pid, "127.0.0.1:0".parse().unwrap()) {
            Ok(l) => assert!(l.local_addr().unwrap().port() > 0),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
        // The calling thread never moved.
        assert!(std::net::TcpListener::bind("127.0.0.1:0").is_ok());
    }
}
