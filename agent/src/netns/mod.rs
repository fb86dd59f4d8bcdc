//! Reaching into a job's network namespace: binding a listening socket
//! there ([`bind_in_netns_of`]), and the ready pipe that holds the job's
//! entry until such listeners are bound ([`ready`]).
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

pub mod ready;

/// The managed state endpoint's port on a job's loopback (`crate::iac::backend`).
/// Fixed, because a saved plan records its backend's address and may be
/// applied by another agent; the credentials endpoint may not take it.
pub const STATE_PORT: u16 = 9912;

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
    use std::os::unix::fs::MetadataExt;

    /// A process in a network namespace of its own (killed on drop).
    struct OtherNetns(std::process::Child);

    impl Drop for OtherNetns {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Inodes of the listening TCP sockets in the namespace `/proc/<pid>/net` shows.
    fn listening_inodes(pid: u32, port: u16) -> Vec<u64> {
        let mut out = Vec::new();
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let local_port = f[1].rsplit(':').next().unwrap();
                if u16::from_str_radix(local_port, 16).unwrap() == port && f[3] == "0A" {
                    out.push(f[9].parse().unwrap());
                }
            }
        }
        out
    }

    fn socket_inode(l: &TcpListener) -> u64 {
        use std::os::fd::AsRawFd;
        std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .ino()
    }

    #[test]
    fn binds_inside_the_other_namespace_and_the_caller_never_moves() {
        // Needs CAP_SYS_ADMIN like the agent (the test suite runs as root).
        let child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .expect("unshare --net (util-linux)");
        let other = OtherNetns(child);
        let pid = other.0.id();
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() == Some(ours.clone()) {
            assert!(
                std::time::Instant::now() < deadline,
                "unshare did not enter a new network namespace"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }

        // A port that happens to be taken here already would prove nothing:
        // try a few.
        let (listener, here) = (0..5)
            .find_map(|_| {
                let l = bind_in_netns_of(pid, "0.0.0.0:0".parse().unwrap())
                    .expect("bind in another namespace (run as root)");
                let port = l.local_addr().unwrap().port();
                // Free in our namespace: the bind did not happen here.
                TcpListener::bind(("0.0.0.0", port)).ok().map(|h| (l, h))
            })
            .expect("the other namespace's port is free in ours");
        let port = listener.local_addr().unwrap().port();
        assert!(port > 0);
        let inode = socket_inode(&listener);
        // The socket listens in the other namespace, not in ours.
        assert_eq!(listening_inodes(pid, port), [inode]);
        assert!(!listening_inodes(std::process::id(), port).contains(&inode));
        assert_eq!(
            listening_inodes(std::process::id(), port),
            [socket_inode(&here)]
        );
        // The calling thread never moved.
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            ours
        );
    }
}
