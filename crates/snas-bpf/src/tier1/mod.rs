//! [`Tier1`]: the node's tier-1 dataplane handle — load, pin, attach, program the maps.
//!
//! Owns: loading both BPF objects with the node constants, pinning every map and program
//! under `NodeConfig::pin_dir`, attaching the uplink program (clsact ingress) and each job's
//! sandbox program (clsact ingress of the host-side veth), and every map write the agent
//! needs. Reopening from the pins ([`Tier1::open_pinned`]) gives the same handle after an
//! agent restart without detaching anything.
//!
//! Invariants: the pinned maps are the single source of truth (this struct holds only fds and
//! a lock that serialises its own read-modify-write sequences); both objects share the same
//! maps (the second object reuses the first one's pins); a job's map entries are keyed by its
//! veth ifindex (config, state, connection count, flows) or its job key (rules, counters) and
//! are all removed by [`Tier1::detach_job`]. Userspace never writes a map value BPF also
//! writes, except to create it: `job_state` and `job_conns` are created by
//! [`Tier1::configure_job`] and then belong to BPF; the ageing pass corrects the connection
//! count through a separate bias map.
//!
//! Limits: attach uses netlink clsact (libbpf-rs has no safe tcx API); the filter handle and
//! priority are fixed ([`TC_HANDLE`], [`TC_PRIORITY`]) and replaced on re-attach.
//!
//! # Layout
//! One `impl Tier1` block per concern, each in its own file:
//! - `load`: load the objects with the node constants, pin, reopen from pins, tear down.
//! - `pins`: the bpffs mount and removing a node's pins ([`ensure_bpffs`], [`remove_pins`]).
//! - `maps`: the pinned maps by name, the layout check, typed lookup/update/iteration.
//! - `tc`: clsact attach and detach.
//! - `jobs`: a job's configuration, attach, adopt, detach.
//! - `rules`: a job's destinations (DNS-learned addresses, CIDR rules).
//! - `infra`, `proxies`: the node-wide infrastructure set; the proxy set and Maglev table.
//! - `stats`: counters, suppressed events, the connection count.
//! - `ageing`: the flow-table ageing pass.
//! - `audit`, `debug`: the audit ring buffer reader; the test-only redirect record.

mod ageing;
mod audit;
mod debug;
mod infra;
mod jobs;
mod load;
mod maps;
mod pins;
mod proxies;
mod rules;
mod stats;
mod tc;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::config::{Clocks, MAX_PORT_RULES};

pub use ageing::{AgeingReport, COUNT_MARGIN};
pub use audit::AuditReader;
pub use debug::DebugRecord;
pub use infra::{MAX_INFRA, MAX_INFRA6};
pub use pins::{ensure_bpffs, remove_pins};
pub use proxies::MAX_PROXIES;
pub use tc::{TC_HANDLE, TC_PRIORITY};

/// Errors of loading, attaching and map programming.
#[derive(Debug, thiserror::Error)]
pub enum Tier1Error {
    /// The pin directory could not be created or removed.
    #[error("pin directory {path}: {source}")]
    PinDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A libbpf operation failed.
    #[error("{what}: {source}")]
    Bpf {
        /// What was being done.
        what: String,
        /// Cause.
        source: libbpf_rs::Error,
    },
    /// More port rules than one map entry holds.
    #[error("{0} port rules given, at most {MAX_PORT_RULES} fit one destination")]
    TooManyPortRules(usize),
    /// More proxies than the proxies map holds.
    #[error("{0} proxies given, at most {MAX_PROXIES} supported")]
    TooManyProxies(usize),
    /// More infrastructure prefixes of one family than its map holds.
    #[error("{count} IPv{family} infrastructure prefixes given, at most {max} supported")]
    TooManyInfrastructurePrefixes {
        /// 4 or 6.
        family: u8,
        /// Prefixes given.
        count: usize,
        /// The map's size.
        max: usize,
    },
    /// No job is configured on this veth.
    #[error("no job on veth ifindex {0}")]
    UnknownJob(u32),
    /// No job has this key.
    #[error("no job with key {0:#018x}")]
    UnknownJobKey(u64),
    /// A map key or value had an unexpected size (BTF and Rust types disagree).
    #[error("map {0}: key or value size differs from the generated Rust type")]
    ValueSize(&'static str),
    /// Reading CLOCK_MONOTONIC failed.
    #[error("clock_gettime(CLOCK_MONOTONIC): {0}")]
    Clock(io::Error),
}

fn bpf_err(what: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> Tier1Error {
    let what = what.into();
    move |source| Tier1Error::Bpf { what, source }
}

/// The tier-1 dataplane of one node.
#[derive(Debug)]
pub struct Tier1 {
    pin_dir: PathBuf,
    maps: maps::Maps,
    sandbox_prog: OwnedFd,
    sandbox_egress_prog: OwnedFd,
    uplink_prog: OwnedFd,
    /// Serialises this handle's read-modify-write sequences on the maps (job configuration,
    /// binding merges, the infrastructure set, the ageing pass). BPF never takes it.
    writers: Mutex<()>,
    /// Live port rules that did not fit an address's entry (see [`crate::binding`]).
    displaced_rules: AtomicU64,
}

impl Tier1 {
    fn writers(&self) -> MutexGuard<'_, ()> {
        // The guarded data is (); a panic while holding it leaves nothing inconsistent here.
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// File descriptor of the sandbox-veth program (for test runs).
    pub fn sandbox_prog(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sandbox_prog.as_fd()
    }

    /// File descriptor of the sandbox-veth egress program (for test runs).
    pub fn sandbox_egress_prog(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sandbox_egress_prog.as_fd()
    }

    /// File descriptor of the uplink program (for test runs).
    pub fn uplink_prog(&self) -> std::os::fd::BorrowedFd<'_> {
        self.uplink_prog.as_fd()
    }
}

/// Current CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn mono_now() -> Result<Duration, Tier1Error> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC is always supported.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return Err(Tier1Error::Clock(io::Error::last_os_error()));
    }
    Ok(Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    ))
}

fn clocks() -> Result<Clocks, Tier1Error> {
    Ok(Clocks {
        wall: SystemTime::now(),
        mono: mono_now()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier1_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tier1>();
    }
}
