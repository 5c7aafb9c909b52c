//! A job's network: named network namespace, veth pair, addresses, default route.
//!
//! Owns the kernel objects of one job on the host side and inside its namespace:
//! - `<netns_dir>/<netns>`: a named namespace made like `ip netns add` does (a thread
//!   `unshare(CLONE_NEWNET)`s and bind-mounts `/proc/thread-self/ns/net` onto the file), so
//!   `ip netns exec` and runsc (which takes a netns path) can use it;
//! - host veth `<host_veth>` with the gateway address, and its peer created directly as `eth0`
//!   inside the namespace with the sandbox address, tx checksum/segmentation offloads off, MTU =
//!   underlay MTU − 56, `lo` up, default route via the gateway;
//! - for a dual-stack job ([`JobNetInfo::sandbox6`]): the host veth also holds the link-local
//!   [`GATEWAY6`] and `eth0` the job's IPv6 /128, both without duplicate address detection so
//!   they are usable at once; `eth0` neither accepts router advertisements nor autoconfigures
//!   addresses (its only global address is the one the agent gave it, which tier 1 checks as
//!   the source), and its IPv6 default route goes via [`GATEWAY6`]. The host answers the
//!   sandbox's neighbour solicitations for it (tier 1 passes neighbour discovery to the host).
//!
//! The one set-up thread opens a netlink socket in the host namespace first, then unshares and
//! opens a second one inside the new namespace; each socket stays bound to its namespace, so no
//! `setns` round trips are needed and the thread simply ends afterwards (its namespace lives on
//! through the bind mount).
//!
//! # Invariants
//! - [`JobNetwork`] is a guard: until [`JobNetwork::into_info`] hands the network over to the
//!   agent, dropping it tears everything down, so a failed or panicking create never leaks.
//! - Teardown is idempotent: missing objects are not errors.
//! - Nothing here touches the network of an existing job except [`teardown_network`].

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ethtool::{Ethtool, EthtoolError};
use crate::naming::{JobNames, SANDBOX_IFNAME};
use crate::netlink::{NetlinkError, Rtnl};
use crate::pool::JobAddrs;

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The IPv6 gateway of every dual-stack job: a link-local address on the host veth. Link-local
/// addresses are per link, so every job's veth holds the same one, and the sandbox's route
/// needs nothing from the node's own addressing.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Errors from creating, inspecting or removing a job network. Each names the object.
#[derive(Debug, thiserror::Error)]
pub enum JobNetError {
    /// Preparing the namespace directory failed.
    #[error("netns directory {dir}: {source}")]
    NetnsDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A namespace with this name already exists.
    #[error("network namespace {0} already exists")]
    NetnsExists(PathBuf),
    /// A system call on the namespace failed.
    #[error("network namespace {path}: {op}: {source}")]
    Netns {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Turning offloads off failed.
    #[error(transparent)]
    Ethtool(#[from] EthtoolError),
    /// An interface that was just created cannot be found.
    #[error("interface {0} vanished during set-up")]
    Vanished(String),
    /// The set-up thread panicked or could not start.
    #[error("set-up thread for {0} failed")]
    Thread(String),
    /// Several teardown steps failed.
    #[error("teardown of {netns}: {}", errors.join("; "))]
    Teardown { netns: String, errors: Vec<String> },
}

/// Everything needed to find a job's network again (also stored in the job record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobNetInfo {
    /// Network namespace name.
    pub netns: String,
    /// Path of the namespace file (for runsc and `setns`).
    pub netns_path: PathBuf,
    /// Host-side veth name.
    pub host_veth: String,
    /// Interface name inside the namespace.
    pub sandbox_ifname: String,
    /// Index of the job subnet in the pool.
    pub slot: u32,
    /// Gateway (host veth) address; also the DNS stub address.
    pub gateway: Ipv4Addr,
    /// Sandbox address.
    pub sandbox: Ipv4Addr,
    /// Prefix length of the job subnet.
    pub prefix_len: u8,
    /// MTU of both veth ends.
    pub mtu: u32,
    /// Largest TCP super-packet the sandbox interface may send ([`sandbox_gso_max_size`]).
    #[serde(default = "default_gso_max_size")]
    pub gso_max_size: u32,
    /// ifindex of the host veth at creation (re-read on adoption).
    pub host_ifindex: u32,
    /// MAC address of the host veth.
    #[serde(default)]
    pub host_mac: [u8; 6],
    /// MAC address of the sandbox interface.
    #[serde(default)]
    pub sandbox_mac: [u8; 6],
    /// The sandbox's IPv6 address (a /128, default route via [`GATEWAY6`]); `None` for an
    /// IPv4-only job (`job_ipv6 = false`, or a record written before dual stack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox6: Option<Ipv6Addr>,
}

impl JobNetInfo {
    /// Whether the sandbox has an IPv6 address and route. Without them tier 1 drops its IPv6
    /// (`ipv6_denied`) and the DNS stub answers its AAAA queries with NODATA at once instead of
    /// spending the job's budget on addresses it cannot reach.
    pub fn has_ipv6_route(&self) -> bool {
        self.sandbox6.is_some()
    }

    /// The info for a job whose objects are (to be) named `names` in `netns_dir`.
    pub fn new(names: &JobNames, addrs: JobAddrs, mtu: u32, netns_dir: &Path) -> JobNetInfo {
        JobNetInfo {
            netns: names.netns.clone(),
            netns_path: netns_dir.join(&names.netns),
            host_veth: names.host_veth.clone(),
            sandbox_ifname: SANDBOX_IFNAME.to_owned(),
            slot: addrs.slot,
            gateway: addrs.gateway,
            sandbox: addrs.sandbox,
            prefix_len: addrs.prefix_len,
            mtu,
            gso_max_size: default_gso_max_size(),
            host_ifindex: 0,
            host_mac: [0; 6],
            sandbox_mac: [0; 6],
            sandbox6: None,
        }
    }
}

/// The kernel's default and largest `gso_max_size` (without BIG TCP).
pub const GSO_MAX_SIZE: u32 = 65536;

fn default_gso_max_size() -> u32 {
    GSO_MAX_SIZE
}

/// The largest super-packet a job sending at `egress_bps` may hand its veth: half of what its
/// EDT `horizon` holds at that rate, so that two super-packets fit and tier 1 (a policer where
/// the kernel has no fq) never refuses a whole 64 KiB burst of a slow job; at least two MTUs,
/// at most [`GSO_MAX_SIZE`]. 100 Mbit/s and faster with the 20 ms default keep 64 KiB;
/// 10 Mbit/s gets 12.5 KB.
pub fn sandbox_gso_max_size(egress_bps: u64, horizon: Duration, mtu: u32) -> u32 {
    let bytes = u128::from(egress_bps) * horizon.as_nanos() / 8 / 1_000_000_000 / 2;
    let floor = u128::from(mtu.saturating_mul(2));
    bytes.clamp(
        floor.min(u128::from(GSO_MAX_SIZE)),
        u128::from(GSO_MAX_SIZE),
    ) as u32
}

/// Guard over a job network being set up. Dropping it tears the network down.
#[derive(Debug)]
pub struct JobNetwork {
    info: JobNetInfo,
    armed: bool,
    /// Whether the host veth is ours: a failed create must not delete a foreign interface that
    /// happens to have the name.
    owns_veth: bool,
}

impl JobNetwork {
    /// Creates the namespace, the veth pair, addresses, routes and offload settings.
    ///
    /// Must be called from a thread in the host network namespace.
    pub fn create(info: JobNetInfo) -> Result<JobNetwork, JobNetError> {
        let dir = info
            .netns_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/run/netns"));
        prepare_netns_dir(&dir)?;
        create_netns_file(&info.netns_path)?;
        // From here on the guard owns whatever exists.
        let mut guard = JobNetwork {
            info: info.clone(),
            armed: true,
            owns_veth: false,
        };
        let name = info.netns.clone();
        let (owns_veth, result) = std::thread::Builder::new()
            .name(format!("netns-{}", info.netns))
            .spawn(move || {
                let mut owns_veth = false;
                let r = setup_in_new_netns(&info, &mut owns_veth);
                (owns_veth, r)
            })
            .map_err(|_| JobNetError::Thread(name.clone()))?
            .join()
            .map_err(|_| {
                // The thread may have created the veth before panicking.
                guard.owns_veth = true;
                JobNetError::Thread(name)
            })?;
        guard.owns_veth = owns_veth;
        let created = result?;
        guard.info.host_ifindex = created.host_ifindex;
        guard.info.host_mac = created.host_mac;
        guard.info.sandbox_mac = created.sandbox_mac;
        Ok(guard)
    }

    /// The network's description.
    pub fn info(&self) -> &JobNetInfo {
        &self.info
    }

    /// Hands the network over to the caller: it will no longer be torn down on drop.
    pub fn into_info(mut self) -> JobNetInfo {
        self.armed = false;
        self.info.clone()
    }

    /// Tears the network down, reporting every failed step.
    pub fn teardown(mut self) -> Result<(), JobNetError> {
        self.armed = false;
        teardown_parts(&self.info, self.owns_veth)
    }
}

impl Drop for JobNetwork {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = teardown_parts(&self.info, self.owns_veth) {
                tracing::error!(netns = %self.info.netns, error = %e, "teardown on drop failed");
            }
        }
    }
}

/// What set-up learns about the interfaces it created.
struct Created {
    host_ifindex: u32,
    host_mac: [u8; 6],
    sandbox_mac: [u8; 6],
}

/// Runs on a fresh thread: enters a new namespace, names it, and configures both ends.
fn setup_in_new_netns(info: &JobNetInfo, owns_veth: &mut bool) -> Result<Created, JobNetError> {
    let path = &info.netns_path;
    let ns_err = |op: &'static str| {
        let source = io::Error::last_os_error();
        JobNetError::Netns {
            path: path.clone(),
            op,
            source,
        }
    };
    let mut host = Rtnl::open()?;
    // SAFETY: unshare(2) affects only the calling thread's network namespace (this thread is
    // ours alone and ends after set-up).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(ns_err("unshare(CLONE_NEWNET)"));
    }
    let self_ns = c"/proc/thread-self/ns/net";
    let target = cstring(path)?;
    // SAFETY: both paths are valid NUL-terminated strings; a bind mount of our own namespace.
    let rc = unsafe {
        libc::mount(
            self_ns.as_ptr(),
            target.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ns_err("bind mount"));
    }
    // SAFETY: open(2) of a valid path; the result is checked.
    let nsfd = unsafe { libc::open(self_ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if nsfd < 0 {
        return Err(ns_err("open /proc/thread-self/ns/net"));
    }
    // SAFETY: nsfd is a fresh, valid descriptor nothing else owns.
    let nsfd = unsafe { OwnedFd::from_raw_fd(nsfd) };
    let mut ns = Rtnl::open()?;

    host.create_veth_into_netns(
        &info.host_veth,
        &info.sandbox_ifname,
        info.mtu,
        info.gso_max_size,
        nsfd.as_raw_fd(),
    )?;
    *owns_veth = true;
    drop(nsfd);
    let (hidx, host_mac) = host
        .link_index_mac(&info.host_veth)?
        .ok_or_else(|| JobNetError::Vanished(info.host_veth.clone()))?;
    host.add_address_v4(hidx, info.gateway, info.prefix_len)?;
    if info.sandbox6.is_some() {
        host.add_address_v6_nodad(hidx, GATEWAY6, 64)?;
    }
    host.set_up(hidx)?;

    let (sidx, sandbox_mac) = ns
        .link_index_mac(&info.sandbox_ifname)?
        .ok_or_else(|| JobNetError::Vanished(info.sandbox_ifname.clone()))?;
    Ethtool::open()?.restrict_tx_offloads(&info.sandbox_ifname)?;
    ns.set_up(1)?; // lo is always ifindex 1 in a new namespace
    ns.add_address_v4(sidx, info.sandbox, info.prefix_len)?;
    if let Some(a6) = info.sandbox6 {
        sandbox_ipv6_sysctls(&info.sandbox_ifname, path)?;
        ns.add_address_v6_nodad(sidx, a6, 128)?;
    }
    ns.set_up(sidx)?;
    ns.add_default_route_v4(info.gateway, sidx)?;
    if info.sandbox6.is_some() {
        ns.add_default_route_v6(GATEWAY6, sidx)?;
    }
    Ok(Created {
        host_ifindex: hidx,
        host_mac,
        sandbox_mac,
    })
}

/// IPv6 settings of the sandbox interface, written from the set-up thread (which is inside the
/// job's namespace, so `/proc/sys/net` is the namespace's): no router advertisements, no
/// address autoconfiguration (the job's only global address is the one tier 1 checks), no
/// duplicate address detection (the link-local address is usable at once for neighbour
/// discovery; the veth has one peer).
fn sandbox_ipv6_sysctls(ifname: &str, netns: &Path) -> Result<(), JobNetError> {
    for (key, value) in [
        ("disable_ipv6", "0"),
        ("accept_ra", "0"),
        ("autoconf", "0"),
        ("accept_dad", "0"),
        ("dad_transmits", "0"),
        ("router_solicitations", "0"),
    ] {
        let file = format!("/proc/sys/net/ipv6/conf/{ifname}/{key}");
        std::fs::write(&file, value).map_err(|source| JobNetError::Netns {
            path: netns.to_owned(),
            op: "write an IPv6 sysctl of the sandbox interface",
            source: io::Error::new(source.kind(), format!("{file}: {source}")),
        })?;
    }
    Ok(())
}

fn cstring(path: &Path) -> Result<CString, JobNetError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JobNetError::Netns {
        path: path.to_owned(),
        op: "path contains NUL",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// Makes `dir` exist and be a shared mount point, as iproute2 does, so that namespace bind
/// mounts propagate into other mount namespaces (runsc's). Done once per directory per process.
pub fn prepare_netns_dir(dir: &Path) -> Result<(), JobNetError> {
    static DONE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if done.iter().any(|d| d == dir) {
        return Ok(());
    }
    let err = |source: io::Error| JobNetError::NetnsDir {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let c = cstring(dir)?;
    let mut bound = false;
    loop {
        // SAFETY: valid NUL-terminated path; changes only propagation of an existing mount.
        let rc = unsafe {
            libc::mount(
                c"".as_ptr(),
                c.as_ptr(),
                c"none".as_ptr(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) || bound {
            return Err(err(e));
        }
        // Not a mount point yet: bind it onto itself, then retry.
        // SAFETY: valid NUL-terminated paths; a recursive bind of the directory onto itself.
        let rc = unsafe {
            libc::mount(
                c.as_ptr(),
                c.as_ptr(),
                c"none".as_ptr(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        bound = true;
    }
    done.push(dir.to_owned());
    Ok(())
}

fn create_netns_file(path: &Path) -> Result<(), JobNetError> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(JobNetError::NetnsExists(path.to_owned()))
        }
        Err(source) => Err(JobNetError::Netns {
            path: path.to_owned(),
            op: "create",
            source,
        }),
    }
}

/// Whether `path` is a mounted network namespace (not just a leftover file).
pub fn is_netns_mount(path: &Path) -> bool {
    let Ok(c) = cstring(path) else { return false };
    // SAFETY: statfs is plain old data; zeroed is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and a valid out-pointer to `st`.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == NSFS_MAGIC
}

/// Removes a named namespace: detaches the bind mount and deletes the file. Missing is fine.
pub fn remove_netns(path: &Path) -> Result<(), JobNetError> {
    let c = cstring(path)?;
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(JobNetError::Netns {
                path: path.to_owned(),
                op: "umount",
                source: e,
            });
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(JobNetError::Netns {
            path: path.to_owned(),
            op: "unlink",
            source,
        }),
    }
}

/// Tears a job network down: deletes the host veth (its peer goes with it), then the namespace.
/// Idempotent. Must be called from a thread in the host network namespace.
pub fn teardown_network(info: &JobNetInfo) -> Result<(), JobNetError> {
    teardown_parts(info, true)
}

fn teardown_parts(info: &JobNetInfo, delete_veth: bool) -> Result<(), JobNetError> {
    let mut errors = Vec::new();
    if delete_veth {
        if let Err(e) = Rtnl::open().and_then(|mut r| r.delete_link(&info.host_veth)) {
            errors.push(e.to_string());
        }
    }
    if let Err(e) = remove_netns(&info.netns_path) {
        errors.push(e.to_string());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(JobNetError::Teardown {
            netns: info.netns.clone(),
            errors,
        })
    }
}

/// What of a job's network still exists (used when adopting jobs after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    /// The namespace file is a mounted namespace.
    pub netns: bool,
    /// ifindex of the host veth, if it exists.
    pub host_ifindex: Option<u32>,
}

impl Presence {
    /// Both the namespace and the host veth exist.
    pub fn complete(&self) -> bool {
        self.netns && self.host_ifindex.is_some()
    }
}

/// Looks, without changing anything, for a job's namespace and host veth.
pub fn inspect(info: &JobNetInfo, rtnl: &mut Rtnl) -> Result<Presence, JobNetError> {
    Ok(Presence {
        netns: is_netns_mount(&info.netns_path),
        host_ifindex: rtnl.link_index(&info.host_veth)?,
    })
}

/// Runs `f` on a new thread that has entered the network namespace at `path`.
/// For tests, diagnostics and the sandbox launcher.
pub fn run_in_netns<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = std::fs::File::open(path)?;
    std::thread::spawn(move || {
        // SAFETY: file is an open namespace file; setns affects only this new thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        drop(file);
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread in netns panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_jobs_get_super_packets_that_fit_their_horizon() {
        let h = Duration::from_millis(20);
        assert_eq!(sandbox_gso_max_size(10_000_000, h, 1444), 12_500);
        assert_eq!(sandbox_gso_max_size(100_000_000, h, 1444), GSO_MAX_SIZE);
        assert_eq!(sandbox_gso_max_size(1_000_000, h, 1444), 2 * 1444);
        assert_eq!(
            sandbox_gso_max_size(u64::MAX, Duration::MAX, 1444),
            GSO_MAX_SIZE
        );
        assert_eq!(sandbox_gso_max_size(1, h, u32::MAX), GSO_MAX_SIZE);
    }
}
