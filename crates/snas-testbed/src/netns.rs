//! Network-namespace plumbing: create/delete named namespaces (iproute2's layout under
//! `/run/netns`), run closures or processes inside one, find processes that live in one, and
//! stop processes.
//!
//! Owns every `unsafe` call of the crate (setns, unshare, mount, kill, waitpid, statfs).
//! Interfaces, addresses and routes are configured with the `ip` tool (`ip -n NS …`), which
//! is enough for a testbed and keeps what is done readable in `docs/testbed.md`; the agent,
//! whose job set-up is on the hot path, uses netlink itself.
//!
//! Invariants: [`in_netns`] never changes the calling thread's namespace (it runs the closure
//! on a fresh thread); [`spawn_in_netns`] enters only the network namespace (not the mount
//! namespace, unlike `ip netns exec`), so daemons see `/sys/fs/bpf` and `/run/netns` as the
//! host does.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// iproute2's directory of named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// `statfs` magic of nsfs (a mounted namespace file).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Errors from namespace plumbing.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The closure thread panicked.
    #[error("thread inside namespace {0} panicked")]
    Panicked(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Io { what, source }
}

/// Path of a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip ARGS`; returns stdout.
pub fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running `ip`"))?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `path` is a mounted namespace file (not a leftover empty file).
pub fn is_mounted_netns(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` is a valid, writable statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    rc == 0 && magic == NSFS_MAGIC
}

/// Names under `/run/netns`.
pub fn list_netns() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Creates a named namespace unless a mounted one exists; a leftover unmounted file (crash
/// during creation or removal) is replaced. Returns whether it was created.
pub fn add_netns(name: &str) -> Result<bool, NetnsError> {
    let path = netns_path(name);
    if is_mounted_netns(&path) {
        return Ok(false);
    }
    if path.exists() {
        std::fs::remove_file(&path)
            .map_err(io_err(format!("removing stale {}", path.display())))?;
    }
    ip(&["netns", "add", name])?;
    Ok(true)
}

/// Removes a named namespace (unmount, then unlink); absent is fine. The namespace itself
/// disappears once no process and no other mount holds it.
pub fn del_netns(name: &str) -> Result<(), NetnsError> {
    let path = netns_path(name);
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: `c` is a NUL-terminated path; umount2 only reads it. Failure (not mounted)
        // is expected for half-removed namespaces and ignored.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
}

/// Identity (device, inode) of a namespace file or `/proc/PID/ns/net` link.
pub fn ns_id(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// Identity of a mounted named namespace.
pub fn named_ns_id(name: &str) -> Option<(u64, u64)> {
    let p = netns_path(name);
    if is_mounted_netns(&p) {
        ns_id(&p)
    } else {
        None
    }
}

fn setns_net(fd: i32) -> io::Result<()> {
    // SAFETY: fd is an open namespace file descriptor owned by the caller; setns does not
    // retain it.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that entered the named network namespace; returns its result.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = netns_path(name);
    let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    let name_owned = name.to_owned();
    let handle = std::thread::spawn(move || -> Result<T, NetnsError> {
        setns_net(file.as_raw_fd()).map_err(io_err(format!("setns into {name_owned}")))?;
        drop(file);
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| NetnsError::Panicked(name.to_owned()))?
}

/// Moves the calling thread into the named namespace (for a daemon's main thread before it
/// starts other threads; they inherit it).
pub fn enter_netns(name: &str) -> Result<(), NetnsError> {
    let path = netns_path(name);
    let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    setns_net(file.as_raw_fd()).map_err(io_err(format!("setns into {name}")))
}

/// Whether the calling thread is in the named namespace.
pub fn current_is(name: &str) -> bool {
    named_ns_id(name).is_some() && ns_id(Path::new("/proc/thread-self/ns/net")) == named_ns_id(name)
}

/// Spawns `cmd` detached (new session, stdin from /dev/null, stdout+stderr appended to
/// `log`) inside the named network namespace.
pub fn spawn_in_netns(cmd: &mut Command, netns: &str, log: &Path) -> Result<Child, NetnsError> {
    let path = netns_path(netns);
    let nsfile = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("opening {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io_err(format!("duplicating {}", log.display())))?;
    let fd = nsfile.as_raw_fd();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (setns, setsid) on a descriptor that stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            setns_net(fd)?;
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(io_err(format!("starting {:?}", cmd.get_program())))?;
    drop(nsfile);
    Ok(child)
}

/// Prepares `cmd` to run in a job: its network namespace and a private mount namespace in
/// which `resolv_conf` is bind-mounted over `/etc/resolv.conf`.
pub fn prepare_job_command(
    cmd: &mut Command,
    netns_file: File,
    resolv_conf: &Path,
) -> Result<(), NetnsError> {
    let src = std::ffi::CString::new(resolv_conf.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("resolv.conf path")(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let dst = c"/etc/resolv.conf";
    let root = c"/";
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls; every pointer it passes is a NUL-terminated string owned by the closure, and the
    // namespace descriptor is owned by the closure too.
    unsafe {
        cmd.pre_exec(move || {
            setns_net(netns_file.as_raw_fd())?;
            // The parent may ignore terminal signals (see `shield_terminal_signals`); ignored
            // dispositions survive exec, so give the command the defaults back.
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Keep our bind mount out of the host's mount namespace.
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Whether `pid` is a live (non-zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    match stat.rfind(')') {
        Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
        None => false,
    }
}

/// Network namespace identity of a process.
pub fn pid_ns(pid: i32) -> Option<(u64, u64)> {
    ns_id(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// Command line of a process, arguments joined by spaces.
pub fn pid_cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Processes (other than this one) whose network namespace is one of `ids`.
pub fn pids_in(ids: &[(u64, u64)]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| pid_ns(pid).is_some_and(|id| ids.contains(&id)))
        .collect()
}

fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: WNOHANG never blocks; for a pid that is not our child it fails with ECHILD,
    // which is fine.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Stops processes: SIGTERM, up to `grace` to exit, then SIGKILL (and reaps our children).
pub fn stop_pids(pids: &[i32], grace: Duration) {
    if pids.is_empty() {
        return;
    }
    for &pid in pids {
        // SAFETY: kill has no memory effects; the pid was just found alive.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    loop {
        for &pid in pids {
            reap(pid);
        }
        if pids.iter().all(|&p| !pid_alive(p)) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids {
        if pid_alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&p| pid_alive(p)) && Instant::now() < deadline {
        for &pid in pids {
            reap(pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ignores SIGINT and SIGQUIT in this process. `snas testbed exec` calls it before running the
/// job's command: Ctrl-C reaches the whole foreground process group, so the command gets it
/// and exits, and this process survives to delete the job. Commands prepared with
/// [`prepare_job_command`] get the default dispositions back.
pub fn shield_terminal_signals() {
    // SAFETY: setting a signal disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}
