//! Process plumbing: signals, reaping, the child-subreaper flag, finding a run's runsc
//! processes, and the pre-exec steps that put runsc into the job's world.
//!
//! Owns every `unsafe` call of the crate.
//!
//! # The root-namespace workaround
//! runsc (20221219, still 20240729) decides "this is the root network namespace" by whether
//! `/proc/sys/net/core/rmem_default` exists, and then refuses `--network=sandbox`. On newer
//! kernels that sysctl exists in every namespace. [`hide_root_ns_marker`] makes runsc run in
//! a private mount namespace (a slave of the host's, so nothing leaks out) with an empty,
//! read-only tmpfs over `/proc/sys/net`. Only that path changes, and only for runsc and
//! its children: systrap and ptrace work, nothing on disk is patched. `/proc/sys/net/core`
//! cannot be covered instead: its dentry is per network namespace, so a mount made from the host's
//! namespace is not seen once runsc has entered the job's. The cost is that procfs is no
//! longer "fully visible", which on hosts where KVM works stops the sandbox from mounting a
//! fresh proc; [`root_ns_marker_visible`] tells whether the workaround is needed at all, so
//! it is applied only on kernels that have the problem.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Sends `sig` to `pid`; errors (already gone) are ignored.
pub fn kill(pid: i32, sig: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; pid > 1 never targets init or a group.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`), so
/// runsc's sandbox and gofer come back to us, not to init, when runsc dies; init reaps them
/// late and `runsc delete` then stalls and leaks cgroups.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps `pid` if it is a zombie child of ours; returns true when it was reaped or is not our
/// child (nothing left to wait for).
pub fn try_reap(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid writes only into `status`, a valid local.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
    r == pid || r < 0
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Pids of live processes whose command line contains `needle` (runsc, its sandbox and
/// gofer all carry `--root <per-run dir>`).
pub fn pids_with_arg(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0)
                    .any(|a| a.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
        })
        .collect()
}

/// Runs `f` on a short-lived thread that entered the network namespace `netns`, so the
/// caller's namespace never changes. Inside, `/proc/thread-self/net/*` describes `netns`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a valid descriptor; it changes only this short-lived thread.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Whether `/proc/sys/net/core/rmem_default` is visible inside the network namespace `netns`
/// (then runsc 20221219 mistakes it for the root namespace).
pub fn root_ns_marker_visible(netns: &Path) -> io::Result<bool> {
    in_netns(netns, || {
        Path::new("/proc/sys/net/core/rmem_default").exists()
    })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd` start in a private mount namespace where `/proc/sys/net` is an empty
/// read-only tmpfs (see the module docs).
pub fn hide_root_ns_marker(cmd: &mut Command) {
    let target = c"/proc/sys/net";
    let root = c"/";
    let tmpfs = c"tmpfs";
    let opts = c"size=4k,mode=0555";
    // SAFETY: runs between fork and exec and makes only async-signal-safe system calls with
    // NUL-terminated strings that live in the closure.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ))?;
            Ok(())
        });
    }
}

/// Sets runsc's SIGINT/SIGQUIT dispositions: SIGQUIT default (Ctrl-\\ ends the sandbox at
/// once; the launcher may ignore it, and ignored dispositions survive exec). SIGINT is ignored
/// when the launcher forwards it (`forwarded`): runsc's `run` does not pass signals on to the
/// workload, it dies of them, so Ctrl-C from the terminal (which reaches runsc too, in the
/// same process group) would kill the sandbox before the workload saw it. A Go program
/// started with SIGINT ignored keeps it ignored. Otherwise SIGINT is left at its default.
pub fn terminal_signals_for_runsc(cmd: &mut Command, forwarded: bool) {
    let int = if forwarded {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: signal() is async-signal-safe; runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGINT, int);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
}

/// Makes `cmd` enter the network namespace `netns` before exec.
pub fn enter_netns(cmd: &mut Command, netns: &Path) -> io::Result<()> {
    let f = File::open(netns)?;
    // SAFETY: setns on a descriptor owned by the closure; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || check(libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET)));
    }
    Ok(())
}

/// Ignores SIGQUIT in this process (Ctrl-\\ reaches runsc directly and ends the sandbox; the
/// launcher stays to clean up). SIGINT is one of the [`FORWARDED_SIGNALS`], blocked by
/// [`block_forwarded_signals`] and passed on to the workload.
pub fn shield_terminal_signals() {
    // SAFETY: installing SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}

/// Signals a launcher passes on to the workload with `runsc kill`: Ctrl-C (SIGINT) and a polite
/// "stop" (SIGTERM, SIGHUP). runsc's `run` (20240729) does not forward signals itself: it dies
/// of them and the workload never sees them.
pub const FORWARDED_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks [`FORWARDED_SIGNALS`] in the calling thread and every thread it starts later, so that
/// they stay pending until [`wait_forwarded_signal`] takes them. Call it first thing in `main`
/// (before any thread exists) in a process that runs sandboxes with `forward_signals`.
/// Children get an empty mask back (std resets it before exec).
pub fn block_forwarded_signals() -> io::Result<()> {
    let set = forwarded_set();
    // SAFETY: valid set pointer; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits up to `timeout` for a pending forwarded signal; returns it.
pub fn wait_forwarded_signal(timeout: std::time::Duration) -> Option<libc::c_int> {
    let set = forwarded_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: valid set and timespec; a null siginfo pointer is allowed.
    let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// A close-on-exec pipe (read end, write end), for capturing a sandbox's output: pipes, not
/// regular files, because gVisor writes a shared file at its own offset.
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the valid two-element array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    Ok((r, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_reaped_child_is_not() {
        assert!(alive(std::process::id() as i32));
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        assert!(!alive(pid));
    }

    #[test]
    fn processes_are_found_by_an_argument() {
        let tag = format!("snas-sandbox-test-{}", std::process::id());
        let mut c = Command::new("sleep").arg("5").arg0(&tag).spawn().unwrap();
        // Right after fork the child's cmdline is still the parent's until execve completes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut found = pids_with_arg(&tag);
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            found = pids_with_arg(&tag);
        }
        c.kill().unwrap();
        c.wait().unwrap();
        assert_eq!(found, vec![c.id() as i32]);
    }
}
