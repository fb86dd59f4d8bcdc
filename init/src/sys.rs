//! The few libc calls std does not wrap: the signal mask, `sigtimedwait`,
//! `kill`, `waitpid` and `prctl`. Declared by hand (the crate has no
//! dependency, so that it builds with `rustc` alone) for Linux with glibc.
#![allow(unsafe_code)]

use std::ffi::c_int;
use std::io;
use std::time::Duration;

pub const SIGINT: c_int = 2;
pub const SIGKILL: c_int = 9;
pub const SIGCHLD: c_int = 17;

const SIG_BLOCK: c_int = 0;
const SIG_SETMASK: c_int = 2;
const WNOHANG: c_int = 1;
const PR_SET_DUMPABLE: c_int = 4;

/// glibc's `sigset_t`: 1024 bits.
#[repr(C)]
struct SigSet([u64; 16]);

/// The kernel's `siginfo_t`: 128 bytes, the signal number first.
#[repr(C)]
struct SigInfo {
    signo: c_int,
    rest: [c_int; 31],
}

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

unsafe extern "C" {
    fn sigfillset(set: *mut SigSet) -> c_int;
    fn sigemptyset(set: *mut SigSet) -> c_int;
    fn sigprocmask(how: c_int, set: *const SigSet, old: *mut SigSet) -> c_int;
    fn sigtimedwait(set: *const SigSet, info: *mut SigInfo, timeout: *const Timespec) -> c_int;
    fn kill(pid: i32, sig: c_int) -> c_int;
    fn waitpid(pid: i32, status: *mut c_int, options: c_int) -> i32;
    fn prctl(option: c_int, ...) -> c_int;
}

fn full_set() -> SigSet {
    let mut set = SigSet([0; 16]);
    // SAFETY: `set` is a valid, writable sigset_t-sized buffer; sigfillset
    // only writes into it (glibc leaves out its own internal signals).
    unsafe { sigfillset(&mut set) };
    set
}

/// Blocks every signal, so that they wait for [`wait_signal`]. A blocked
/// signal is never ignored, not even by a namespace's init (whose default
/// actions the kernel otherwise drops). [`spawn_in_group`] gives the child
/// an empty mask again.
pub fn block_all_signals() -> io::Result<()> {
    let set = full_set();
    // SAFETY: `set` is initialised; a null `old` is allowed.
    if unsafe { sigprocmask(SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts `command` as the leader of a new process group, with every signal
/// unblocked (a child inherits the init's mask otherwise).
pub fn spawn_in_group(command: &mut std::process::Command) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls sigemptyset and sigprocmask, which are async-signal-safe, on a
    // local buffer.
    unsafe {
        command.pre_exec(|| {
            let mut set = SigSet([0; 16]);
            sigemptyset(&mut set);
            if sigprocmask(SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Makes this process non-dumpable: a process of the job (same uid, no
/// capability) can then neither ptrace it nor write its memory.
pub fn make_undumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument; the rest are
    // ignored. prctl reads nothing through pointers here.
    if unsafe { prctl(PR_SET_DUMPABLE, 0 as std::ffi::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The next pending signal, waiting at most `timeout`; `None` on timeout.
pub fn wait_signal(timeout: Duration) -> Option<c_int> {
    let set = full_set();
    let mut info = SigInfo {
        signo: 0,
        rest: [0; 31],
    };
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // SAFETY: every pointer refers to a live, correctly sized local.
    let sig = unsafe { sigtimedwait(&set, &mut info, &ts) };
    // -1 is a timeout (EAGAIN) or an interruption (EINTR): both mean "none".
    (sig > 0).then_some(sig)
}

/// Sends `sig` to process group `pgid`. A group already gone is not an error.
pub fn kill_group(pgid: i32, sig: c_int) {
    // SAFETY: kill has no memory arguments; a negative pid names the group.
    unsafe { kill(-pgid, sig) };
}

/// Reaps one exited child without blocking: `Some((pid, raw wait status))`,
/// or `None` if none has exited (or there are none).
pub fn reap() -> Option<(i32, i32)> {
    let mut status: c_int = 0;
    // SAFETY: `status` is a live local the call writes to.
    let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
    // 0: children remain, none exited; -1: no child at all (ECHILD).
    (pid > 0).then_some((pid, status))
}
