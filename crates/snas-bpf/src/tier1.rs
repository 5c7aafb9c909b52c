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

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{
    MapCore, MapFlags, MapHandle, TcAttachPoint, TcHookBuilder, TC_EGRESS, TC_INGRESS,
};
use snas_wire::Reason;

use crate::audit::AuditEvent;
use crate::binding::{self, TimedRule};
use crate::config::{
    saturating_ns, Clocks, JobConfig, NodeConfig, PortRule, ProxyEntry, MAX_PORT_RULES,
};
use crate::counters::{DirCounters, Direction, JobCounters, PacketCount};
use crate::flows::{self, Ageing, FlowTimeouts};
use crate::maglev::{self, Backend};
use crate::pod::{bytes_of, from_bytes, Pod};
use crate::skel::{sandbox, sandbox_egress, types, uplink};

/// TC filter handle of SNAS programs.
pub const TC_HANDLE: u32 = 0x534e;
/// TC filter priority of SNAS programs.
pub const TC_PRIORITY: u32 = 1;

const PROG_SANDBOX: &str = "prog_sandbox_ingress";
const PROG_SANDBOX_EGRESS: &str = "prog_sandbox_egress";
const PROG_UPLINK: &str = "prog_uplink_ingress";

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

/// `JOB_F_ATTACHED` in maps.h: the program is attached to the job's veth.
const JOB_F_ATTACHED: u16 = 2;

/// Maximum proxies (`MAX_PROXIES` in maps.h).
pub const MAX_PROXIES: usize = 64;

/// Maximum IPv4 infrastructure prefixes (`MAX_INFRA` in maps.h).
pub const MAX_INFRA: usize = 16384;

/// Maximum IPv6 infrastructure prefixes (`MAX_INFRA6` in maps.h).
pub const MAX_INFRA6: usize = 4096;

/// The ageing pass counts a flow only if it was admitted this long before the pass read the
/// job's counter: BPF stamps `admitted` after the count went up, so this margin only absorbs
/// the difference between the two readings of CLOCK_MONOTONIC (`bpf_ktime_get_ns` is the
/// NMI-safe fast clock, `clock_gettime` the vDSO one; they differ by nanoseconds). A flow left
/// out is counted at the next pass: until then the job may open one more (over-admission).
pub const COUNT_MARGIN: Duration = Duration::from_micros(100);

/// Entries read per `bpf_map_lookup_batch` call of the ageing pass.
const AGE_BATCH: u32 = 4096;

/// What one ageing pass did ([`Tier1::age_flows`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgeingReport {
    /// Flow entries still in the tables.
    pub kept: u64,
    /// Flow entries removed because they were idle beyond their state's timeout.
    pub removed: u64,
    /// Open connections counted, all jobs together.
    pub open: u64,
}

fn bpf_err(what: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> Tier1Error {
    let what = what.into();
    move |source| Tier1Error::Bpf { what, source }
}

/// Where a test-run packet was redirected (from the debug map; `NodeConfig::record_debug`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugRecord {
    /// Target ifindex.
    pub ifindex: u32,
    /// 1 = bpf_redirect, 2 = bpf_redirect_neigh, 3 = bpf_redirect_peer.
    pub kind: u32,
    /// Proxy index chosen (encap only).
    pub proxy: u32,
    /// Flow hash (encap only).
    pub flow_hash: u32,
}

#[derive(Debug)]
struct Maps {
    jobs: MapHandle,
    job_state: MapHandle,
    job_conns: MapHandle,
    job_conns_bias: MapHandle,
    job_by_key: MapHandle,
    infra: MapHandle,
    infra6: MapHandle,
    dst_exact: MapHandle,
    dst_cidr: MapHandle,
    dst6_exact: MapHandle,
    dst6_cidr: MapHandle,
    proxies: MapHandle,
    proxy_by_ip: MapHandle,
    maglev: MapHandle,
    flows: MapHandle,
    flows6: MapHandle,
    dns_nat: MapHandle,
    counters: MapHandle,
    audit: MapHandle,
    debug: MapHandle,
    node: MapHandle,
}

impl Maps {
    fn open(dir: &Path) -> Result<Maps, Tier1Error> {
        let m = |name: &str| {
            MapHandle::from_pinned_path(dir.join(name))
                .map_err(bpf_err(format!("open pinned map {name}")))
        };
        Ok(Maps {
            jobs: m("snas_jobs")?,
            job_state: m("snas_job_state")?,
            job_conns: m("snas_job_conns")?,
            job_conns_bias: m("snas_job_conns_bias")?,
            job_by_key: m("snas_job_by_key")?,
            infra: m("snas_infra")?,
            infra6: m("snas_infra6")?,
            dst_exact: m("snas_dst_exact")?,
            dst_cidr: m("snas_dst_cidr")?,
            dst6_exact: m("snas_dst6_exact")?,
            dst6_cidr: m("snas_dst6_cidr")?,
            proxies: m("snas_proxies")?,
            proxy_by_ip: m("snas_proxy_by_ip")?,
            maglev: m("snas_maglev")?,
            flows: m("snas_flows")?,
            flows6: m("snas_flows6")?,
            dns_nat: m("snas_dns_nat")?,
            counters: m("snas_counters")?,
            audit: m("snas_audit")?,
            debug: m("snas_debug")?,
            node: m("snas_node")?,
        })
    }
}

/// The tier-1 dataplane of one node.
#[derive(Debug)]
pub struct Tier1 {
    pin_dir: PathBuf,
    maps: Maps,
    sandbox_prog: OwnedFd,
    sandbox_egress_prog: OwnedFd,
    uplink_prog: OwnedFd,
    /// Serialises this handle's read-modify-write sequences on the maps (job configuration,
    /// binding merges, the infrastructure set, the ageing pass). BPF never takes it.
    writers: Mutex<()>,
    /// Live port rules that did not fit an address's entry (see [`crate::binding`]).
    displaced_rules: AtomicU64,
}

fn set_pins(obj: &mut libbpf_rs::OpenObject, dir: &Path) -> Result<(), Tier1Error> {
    for mut map in obj.maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        // Internal maps (.rodata, .bss) are per object and not shared.
        if name.contains('.') {
            continue;
        }
        map.set_pin_path(dir.join(&name))
            .map_err(bpf_err(format!("set pin path of {name}")))?;
    }
    Ok(())
}

fn pin_prog(prog: &mut libbpf_rs::ProgramMut<'_>, path: &Path) -> Result<(), Tier1Error> {
    if path.exists() {
        fs::remove_file(path).map_err(|source| Tier1Error::PinDir {
            path: path.into(),
            source,
        })?;
    }
    prog.pin(path)
        .map_err(bpf_err(format!("pin {}", path.display())))
}

fn ifindex_i32(ifindex: u32) -> i32 {
    i32::try_from(ifindex).unwrap_or(i32::MAX)
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

impl Tier1 {
    /// Loads both programs with the node's constants, pins maps and programs under
    /// `node.pin_dir` (reusing maps already pinned there, so their state survives), and
    /// attaches the uplink program if `node.attach_uplink`.
    ///
    /// The pin directory must be on a bpffs mount (see [`ensure_bpffs`]).
    pub fn load(node: &NodeConfig) -> Result<Tier1, Tier1Error> {
        let dir = node.pin_dir.clone();
        fs::create_dir_all(&dir).map_err(|source| Tier1Error::PinDir {
            path: dir.clone(),
            source,
        })?;

        macro_rules! load_object {
            ($builder:ty, $prog:ident, $pin:expr, $name:literal) => {{
                let mut storage = MaybeUninit::uninit();
                let mut open = <$builder>::default()
                    .open(&mut storage)
                    .map_err(bpf_err(concat!("open ", $name)))?;
                if let Some(ro) = open.maps.rodata_data.as_deref_mut() {
                    ro.cfg_uplink_ifindex = node.uplink_ifindex;
                    ro.cfg_node_ip = u32::from_ne_bytes(node.node_ip.octets());
                    ro.cfg_uplink_mtu = node.uplink_mtu;
                    ro.cfg_horizon_ns = saturating_ns(node.horizon);
                    ro.cfg_geneve_port = node.geneve_port;
                    ro.cfg_audit_rate = node.audit_per_sec;
                    ro.cfg_icmp_rate = node.icmp_budget.per_sec.get();
                    ro.cfg_icmp_burst = node.icmp_budget.burst.get();
                    ro.cfg_record_debug = u8::from(node.record_debug);
                }
                set_pins(open.open_object_mut(), &dir)?;
                let mut skel = open.load().map_err(bpf_err(concat!("load ", $name)))?;
                pin_prog(&mut skel.progs.$prog, &dir.join($pin))?;
            }};
        }
        load_object!(
            sandbox::SandboxIngressSkelBuilder,
            snas_sandbox_ingress,
            PROG_SANDBOX,
            "sandbox_ingress"
        );
        load_object!(
            sandbox_egress::SandboxEgressSkelBuilder,
            snas_sandbox_egress,
            PROG_SANDBOX_EGRESS,
            "sandbox_egress"
        );
        load_object!(
            uplink::UplinkIngressSkelBuilder,
            snas_uplink_ingress,
            PROG_UPLINK,
            "uplink_ingress"
        );

        let t = Tier1::open_pinned(&dir)?;
        t.check_layouts()?;
        let info = types::node_info {
            uplink_ifindex: node.uplink_ifindex,
            node_ip: u32::from_ne_bytes(node.node_ip.octets()),
        };
        let attached = if node.attach_uplink {
            node.uplink_ifindex
        } else {
            0
        };
        let info = types::node_info {
            uplink_ifindex: attached,
            ..info
        };
        update(&t.maps.node, &0u32, &info, "snas_node")?;
        if node.attach_uplink {
            tc_attach(&t.uplink_prog, node.uplink_ifindex, TC_INGRESS)?;
        }
        Ok(t)
    }

    /// Opens the maps and programs pinned under `dir` by an earlier [`Tier1::load`]. Nothing
    /// is attached or detached.
    pub fn open_pinned(dir: &Path) -> Result<Tier1, Tier1Error> {
        let prog = |name: &str| {
            libbpf_rs::Program::fd_from_pinned_path(dir.join(name))
                .map_err(bpf_err(format!("open pinned program {name}")))
        };
        Ok(Tier1 {
            pin_dir: dir.to_path_buf(),
            maps: Maps::open(dir)?,
            sandbox_prog: prog(PROG_SANDBOX)?,
            sandbox_egress_prog: prog(PROG_SANDBOX_EGRESS)?,
            uplink_prog: prog(PROG_UPLINK)?,
            writers: Mutex::new(()),
            displaced_rules: AtomicU64::new(0),
        })
    }

    fn writers(&self) -> MutexGuard<'_, ()> {
        // The guarded data is (); a panic while holding it leaves nothing inconsistent here.
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that every map's key and value sizes (from the kernel) equal the sizes of the
    /// generated Rust types this module writes, so a header change cannot go unnoticed.
    pub fn check_layouts(&self) -> Result<(), Tier1Error> {
        use std::mem::size_of;
        let m = &self.maps;
        let checks: [(&MapHandle, usize, usize, &'static str); 20] = [
            (
                &m.job_conns,
                size_of::<u32>(),
                size_of::<types::job_conns>(),
                "snas_job_conns",
            ),
            (
                &m.job_conns_bias,
                size_of::<u32>(),
                size_of::<i64>(),
                "snas_job_conns_bias",
            ),
            (
                &m.infra,
                size_of::<types::infra_key>(),
                size_of::<u32>(),
                "snas_infra",
            ),
            (
                &m.infra6,
                size_of::<types::infra6_key>(),
                size_of::<u32>(),
                "snas_infra6",
            ),
            (
                &m.dst6_exact,
                size_of::<types::dst6_key>(),
                size_of::<types::dst_val>(),
                "snas_dst6_exact",
            ),
            (
                &m.dst6_cidr,
                size_of::<types::cidr6_key>(),
                size_of::<types::dst_val>(),
                "snas_dst6_cidr",
            ),
            (
                &m.flows6,
                size_of::<types::flow6_key>(),
                size_of::<types::flow_val>(),
                "snas_flows6",
            ),
            (
                &m.jobs,
                size_of::<u32>(),
                size_of::<types::job_cfg>(),
                "snas_jobs",
            ),
            (
                &m.job_state,
                size_of::<u32>(),
                size_of::<types::job_state>(),
                "snas_job_state",
            ),
            (
                &m.job_by_key,
                size_of::<u64>(),
                size_of::<u32>(),
                "snas_job_by_key",
            ),
            (
                &m.dst_exact,
                size_of::<types::dst_key>(),
                size_of::<types::dst_val>(),
                "snas_dst_exact",
            ),
            (
                &m.dst_cidr,
                size_of::<types::cidr_key>(),
                size_of::<types::dst_val>(),
                "snas_dst_cidr",
            ),
            (
                &m.proxies,
                size_of::<u32>(),
                size_of::<types::proxy>(),
                "snas_proxies",
            ),
            (
                &m.proxy_by_ip,
                size_of::<u32>(),
                size_of::<u32>(),
                "snas_proxy_by_ip",
            ),
            (
                &m.dns_nat,
                size_of::<types::dns_nat_key>(),
                size_of::<types::dns_nat_val>(),
                "snas_dns_nat",
            ),
            (
                &m.maglev,
                size_of::<u32>(),
                size_of::<types::maglev_table>(),
                "snas_maglev",
            ),
            (
                &m.flows,
                size_of::<types::flow_key>(),
                size_of::<types::flow_val>(),
                "snas_flows",
            ),
            (
                &m.counters,
                size_of::<types::counter_key>(),
                size_of::<types::counter_val>(),
                "snas_counters",
            ),
            (
                &m.debug,
                size_of::<u32>(),
                size_of::<types::debug_rec>(),
                "snas_debug",
            ),
            (
                &m.node,
                size_of::<u32>(),
                size_of::<types::node_info>(),
                "snas_node",
            ),
        ];
        for (map, k, v, name) in checks {
            if map.key_size() as usize != k || map.value_size() as usize != v {
                return Err(Tier1Error::ValueSize(name));
            }
        }
        Ok(())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Writes a job's configuration (and fresh state) without attaching anything: for tests
    /// through BPF_PROG_TEST_RUN and for updating a running job (serial, limits, expiry). The
    /// state of a job reconfigured under the same key (pacing clocks, buckets, connection
    /// count, flows) is kept.
    pub fn configure_job(&self, job: &JobConfig) -> Result<(), Tier1Error> {
        let _w = self.writers();
        let attached = self.attached(job.veth_ifindex)?;
        self.write_job(job, attached)
    }

    fn attached(&self, veth_ifindex: u32) -> Result<bool, Tier1Error> {
        let cfg: Option<types::job_cfg> = lookup(&self.maps.jobs, &veth_ifindex, "snas_jobs")?;
        Ok(cfg.is_some_and(|c| c.flags & JOB_F_ATTACHED != 0))
    }

    fn write_job(&self, job: &JobConfig, attached: bool) -> Result<(), Tier1Error> {
        let idx = job.veth_ifindex;
        let mut c = job.to_c(&clocks()?);
        if attached {
            c.flags |= JOB_F_ATTACHED;
        }
        // Keep the state of a job being reconfigured (pacing and buckets continue), but not
        // the state a previous job left on a reused ifindex.
        let previous: Option<types::job_cfg> = lookup(&self.maps.jobs, &idx, "snas_jobs")?;
        let state_flags = match previous {
            Some(p) if p.job_key == job.job_key => MapFlags::NO_EXIST,
            Some(p) => {
                if self.veth_of(p.job_key)? == Some(idx) {
                    let _ = self.maps.job_by_key.delete(bytes_of(&p.job_key));
                }
                delete_where::<types::flow_key>(&self.maps.flows, |k| k.ifindex == idx);
                delete_where::<types::flow6_key>(&self.maps.flows6, |k| k.ifindex == idx);
                let _ = self.maps.job_conns_bias.delete(bytes_of(&idx));
                MapFlags::ANY
            }
            None => {
                let _ = self.maps.job_conns_bias.delete(bytes_of(&idx));
                MapFlags::ANY
            }
        };
        // State first: a program that finds the configuration finds its state too.
        let fresh = types::job_state::default();
        let _ = self
            .maps
            .job_state
            .update(bytes_of(&idx), bytes_of(&fresh), state_flags);
        let conns = types::job_conns::default();
        let _ = self
            .maps
            .job_conns
            .update(bytes_of(&idx), bytes_of(&conns), state_flags);
        update(&self.maps.jobs, &idx, &c, "snas_jobs")?;
        update(&self.maps.job_by_key, &job.job_key, &idx, "snas_job_by_key")
    }

    /// Configures the job and attaches the sandbox programs to its veth (clsact ingress and
    /// egress).
    pub fn attach_job(&self, job: &JobConfig) -> Result<(), Tier1Error> {
        let _w = self.writers();
        self.write_job(job, false)?;
        tc_attach(&self.sandbox_prog, job.veth_ifindex, TC_INGRESS)?;
        tc_attach(&self.sandbox_egress_prog, job.veth_ifindex, TC_EGRESS)?;
        self.write_job(job, true)
    }

    /// Takes over a job found at agent start: if the veth's configuration already names this
    /// job as attached, only its configuration is rewritten (so that the restarted agent's
    /// limits and the policy's expiry, converted anew, apply); programs, state, flows and
    /// counters are left alone. Otherwise it is attached like a new job.
    pub fn adopt_job(&self, job: &JobConfig) -> Result<(), Tier1Error> {
        let cfg: Option<types::job_cfg> = lookup(&self.maps.jobs, &job.veth_ifindex, "snas_jobs")?;
        match cfg {
            Some(c) if c.job_key == job.job_key && c.flags & JOB_F_ATTACHED != 0 => {
                let _w = self.writers();
                self.write_job(job, true)
            }
            _ => self.attach_job(job),
        }
    }

    /// The veth ifindex of a job, if it is configured.
    pub fn veth_of(&self, job_key: u64) -> Result<Option<u32>, Tier1Error> {
        lookup(&self.maps.job_by_key, &job_key, "snas_job_by_key")
    }

    /// [`Tier1::detach_job`] by job key. Idempotent; returns whether anything was removed. If
    /// the job's veth ifindex has meanwhile been reused by another job, only the state keyed
    /// by `job_key` is removed and the other job is left alone.
    pub fn detach_job_by_key(&self, job_key: u64) -> Result<bool, Tier1Error> {
        let idx = self.veth_of(job_key)?;
        if let Some(idx) = idx {
            let cfg: Option<types::job_cfg> = lookup(&self.maps.jobs, &idx, "snas_jobs")?;
            if cfg.is_some_and(|c| c.job_key == job_key) {
                return self.detach_job(idx);
            }
        }
        let _ = self.maps.job_by_key.delete(bytes_of(&job_key));
        self.remove_key_state(job_key);
        Ok(idx.is_some())
    }

    /// Detaches the programs from the veth (if it still exists) and removes every map entry
    /// of the job: config, state, rules, flows, DNS NAT, counters. Idempotent; returns whether
    /// a job was configured on the veth.
    pub fn detach_job(&self, veth_ifindex: u32) -> Result<bool, Tier1Error> {
        let _w = self.writers();
        let Some(cfg) = lookup::<types::job_cfg>(&self.maps.jobs, &veth_ifindex, "snas_jobs")?
        else {
            return Ok(false);
        };
        if cfg.flags & JOB_F_ATTACHED != 0 {
            tc_detach(&self.sandbox_prog, veth_ifindex, TC_INGRESS);
            tc_detach(&self.sandbox_egress_prog, veth_ifindex, TC_EGRESS);
        }
        let job = cfg.job_key;
        let _ = self.maps.jobs.delete(bytes_of(&veth_ifindex));
        let _ = self.maps.job_state.delete(bytes_of(&veth_ifindex));
        let _ = self.maps.job_conns.delete(bytes_of(&veth_ifindex));
        let _ = self.maps.job_conns_bias.delete(bytes_of(&veth_ifindex));
        if self.veth_of(job)? == Some(veth_ifindex) {
            let _ = self.maps.job_by_key.delete(bytes_of(&job));
        }
        delete_where::<types::flow_key>(&self.maps.flows, |k| k.ifindex == veth_ifindex);
        delete_where::<types::flow6_key>(&self.maps.flows6, |k| k.ifindex == veth_ifindex);
        delete_where::<types::dns_nat_key>(&self.maps.dns_nat, |k| k.ifindex == veth_ifindex);
        self.remove_key_state(job);
        Ok(true)
    }

    fn remove_key_state(&self, job: u64) {
        delete_where::<types::dst_key>(&self.maps.dst_exact, |k| k.job_key == job);
        delete_where::<types::cidr_key>(&self.maps.dst_cidr, |k| cidr_job(k) == job);
        delete_where::<types::dst6_key>(&self.maps.dst6_exact, |k| k.job_key == job);
        delete_where::<types::cidr6_key>(&self.maps.dst6_cidr, |k| {
            (u64::from(u32::from_be(k.job_hi)) << 32) | u64::from(u32::from_be(k.job_lo)) == job
        });
        delete_where::<types::counter_key>(&self.maps.counters, |k| k.job_key == job);
    }

    /// Allows `ip` for the job on `rules` until `ttl` from now (`None`: until revoked), for new
    /// connections; packets of established flows are never cut by the expiry. DNS answers use
    /// this with the binding lifetime. The address keeps the rules other names installed on it
    /// (each with its own expiry); an identical rule is refreshed to the later expiry. An entry
    /// holds [`MAX_PORT_RULES`]: beyond, the rule that expires first is replaced
    /// ([`Tier1::displaced_port_rules`]). At most [`MAX_PORT_RULES`] rules per call.
    pub fn allow_ip(
        &self,
        job_key: u64,
        ip: Ipv4Addr,
        rules: &[PortRule],
        ttl: Option<Duration>,
    ) -> Result<(), Tier1Error> {
        let key = types::dst_key {
            job_key,
            ip: u32::from_ne_bytes(ip.octets()),
            _pad0: 0,
        };
        self.merge_binding(&self.maps.dst_exact, &key, rules, ttl, "snas_dst_exact")
    }

    /// The read-merge-write of a DNS-learned entry (see [`crate::binding`]).
    fn merge_binding<K: Pod>(
        &self,
        map: &MapHandle,
        key: &K,
        rules: &[PortRule],
        ttl: Option<Duration>,
        name: &'static str,
    ) -> Result<(), Tier1Error> {
        if rules.len() > MAX_PORT_RULES {
            return Err(Tier1Error::TooManyPortRules(rules.len()));
        }
        let now = mono_now()?;
        let now_s = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        let expires_s = ttl.map(|ttl| expiry_seconds(now.saturating_add(ttl)));
        let _w = self.writers();
        let old: Option<types::dst_val> = lookup(map, key, name)?;
        let existing: Vec<TimedRule> = old
            .iter()
            .flat_map(|v| v.rules.iter().take(v.nrules as usize))
            .map(|c| {
                let (rule, expires_s) = PortRule::from_c(c);
                TimedRule { rule, expires_s }
            })
            .collect();
        let merged = binding::merge(&existing, rules, expires_s, now_s);
        self.displaced_rules
            .fetch_add(merged.displaced, Ordering::Relaxed);
        let mut v = types::dst_val {
            nrules: merged.rules.len() as u32,
            flags: 0,
            ..Default::default()
        };
        for (slot, t) in v.rules.iter_mut().zip(&merged.rules) {
            *slot = t.rule.to_c(t.expires_s);
        }
        update(map, key, &v, name)
    }

    /// Live port rules that did not fit an address's entry since this handle was opened
    /// (see [`Tier1::allow_ip`]).
    pub fn displaced_port_rules(&self) -> u64 {
        self.displaced_rules.load(Ordering::Relaxed)
    }

    /// Removes an exact-IP entry.
    pub fn revoke_ip(&self, job_key: u64, ip: Ipv4Addr) -> Result<(), Tier1Error> {
        let key = types::dst_key {
            job_key,
            ip: u32::from_ne_bytes(ip.octets()),
            _pad0: 0,
        };
        let _ = self.maps.dst_exact.delete(bytes_of(&key));
        Ok(())
    }

    /// Allows the CIDR `net` for the job on `rules`. `allow_private` must come from a signed
    /// `allow_private = true` rule: only then may the entry open always-denied ranges.
    pub fn allow_cidr(
        &self,
        job_key: u64,
        net: Ipv4Net,
        rules: &[PortRule],
        allow_private: bool,
    ) -> Result<(), Tier1Error> {
        let key = cidr_key(job_key, net);
        let val = dst_val(rules, allow_private)?;
        update(&self.maps.dst_cidr, &key, &val, "snas_dst_cidr")
    }

    /// Removes a CIDR entry.
    pub fn revoke_cidr(&self, job_key: u64, net: Ipv4Net) -> Result<(), Tier1Error> {
        let _ = self.maps.dst_cidr.delete(bytes_of(&cidr_key(job_key, net)));
        Ok(())
    }

    /// [`Tier1::allow_ip`] for an IPv6 address (used only for jobs with IPv6 rules).
    pub fn allow_ip6(
        &self,
        job_key: u64,
        ip: Ipv6Addr,
        rules: &[PortRule],
        ttl: Option<Duration>,
    ) -> Result<(), Tier1Error> {
        let key = types::dst6_key {
            job_key,
            ip: ip.octets(),
        };
        self.merge_binding(&self.maps.dst6_exact, &key, rules, ttl, "snas_dst6_exact")
    }

    /// Removes an exact IPv6 entry.
    pub fn revoke_ip6(&self, job_key: u64, ip: Ipv6Addr) -> Result<(), Tier1Error> {
        let key = types::dst6_key {
            job_key,
            ip: ip.octets(),
        };
        let _ = self.maps.dst6_exact.delete(bytes_of(&key));
        Ok(())
    }

    /// [`Tier1::allow_cidr`] for an IPv6 prefix.
    pub fn allow_cidr6(
        &self,
        job_key: u64,
        net: Ipv6Net,
        rules: &[PortRule],
        allow_private: bool,
    ) -> Result<(), Tier1Error> {
        let key = cidr6_key(job_key, net);
        let val = dst_val(rules, allow_private)?;
        update(&self.maps.dst6_cidr, &key, &val, "snas_dst6_cidr")
    }

    /// Removes an IPv6 CIDR entry.
    pub fn revoke_cidr6(&self, job_key: u64, net: Ipv6Net) -> Result<(), Tier1Error> {
        let _ = self
            .maps
            .dst6_cidr
            .delete(bytes_of(&cidr6_key(job_key, net)));
        Ok(())
    }

    /// Replaces the node-wide infrastructure set: destinations refused for every job whatever
    /// its rules say (`infrastructure_denied`; not even an `allow_private` rule opens them).
    /// The new prefixes are inserted before the old ones that are gone are deleted, so no
    /// prefix in both sets is ever open. The maps are pinned: the set survives an agent
    /// restart until replaced.
    pub fn set_infrastructure(&self, nets: &[IpNet]) -> Result<(), Tier1Error> {
        let mut v4 = HashSet::new();
        let mut v6 = HashSet::new();
        for n in nets {
            match n.trunc() {
                IpNet::V4(n) => {
                    v4.insert((n.prefix_len(), u32::from_ne_bytes(n.network().octets())));
                }
                IpNet::V6(n) => {
                    v6.insert((n.prefix_len(), n.network().octets()));
                }
            }
        }
        if v4.len() > MAX_INFRA {
            return Err(Tier1Error::TooManyInfrastructurePrefixes {
                family: 4,
                count: v4.len(),
                max: MAX_INFRA,
            });
        }
        if v6.len() > MAX_INFRA6 {
            return Err(Tier1Error::TooManyInfrastructurePrefixes {
                family: 6,
                count: v6.len(),
                max: MAX_INFRA6,
            });
        }
        let _w = self.writers();
        for &(len, ip) in &v4 {
            let k = types::infra_key {
                prefixlen: u32::from(len),
                ip,
            };
            update(&self.maps.infra, &k, &1u32, "snas_infra")?;
        }
        for &(len, ip) in &v6 {
            let k = types::infra6_key {
                prefixlen: u32::from(len),
                ip,
            };
            update(&self.maps.infra6, &k, &1u32, "snas_infra6")?;
        }
        delete_where::<types::infra_key>(&self.maps.infra, |k| {
            !v4.contains(&(k.prefixlen as u8, k.ip))
        });
        delete_where::<types::infra6_key>(&self.maps.infra6, |k| {
            !v6.contains(&(k.prefixlen as u8, k.ip))
        });
        Ok(())
    }

    /// The current infrastructure set (as [`Tier1::set_infrastructure`] stored it).
    pub fn infrastructure(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        for k in self.maps.infra.keys() {
            if let Some(k) = from_bytes::<types::infra_key>(&k) {
                let ip = Ipv4Addr::from(k.ip.to_ne_bytes());
                if let Ok(n) = Ipv4Net::new(ip, k.prefixlen as u8) {
                    out.push(IpNet::V4(n));
                }
            }
        }
        for k in self.maps.infra6.keys() {
            if let Some(k) = from_bytes::<types::infra6_key>(&k) {
                if let Ok(n) = Ipv6Net::new(Ipv6Addr::from(k.ip), k.prefixlen as u8) {
                    out.push(IpNet::V6(n));
                }
            }
        }
        out.sort();
        out
    }

    /// Replaces the proxy set and rebuilds the Maglev table from the alive proxies that are
    /// not draining. Index = position in `proxies`. Flows pinned to a proxy that is still
    /// alive (draining or not) stay on it.
    pub fn set_proxies(&self, proxies: &[ProxyEntry]) -> Result<(), Tier1Error> {
        if proxies.len() > MAX_PROXIES {
            return Err(Tier1Error::TooManyProxies(proxies.len()));
        }
        let mut backends = Vec::new();
        let mut ips = HashSet::new();
        for i in 0..MAX_PROXIES {
            let idx = i as u32;
            let val = match proxies.get(i) {
                Some(p) => {
                    let ip = u32::from_ne_bytes(p.ip.octets());
                    ips.insert(ip);
                    update(&self.maps.proxy_by_ip, &ip, &idx, "snas_proxy_by_ip")?;
                    if p.alive && !p.draining {
                        backends.push(Backend {
                            index: i as u16,
                            id: u64::from(u32::from(p.ip)),
                        });
                    }
                    types::proxy {
                        ip,
                        flags: u32::from(p.alive),
                    }
                }
                None => types::proxy::default(),
            };
            update(&self.maps.proxies, &idx, &val, "snas_proxies")?;
        }
        for key in self.maps.proxy_by_ip.keys() {
            if let Some(ip) = from_bytes::<u32>(&key) {
                if !ips.contains(&ip) {
                    let _ = self.maps.proxy_by_ip.delete(&key);
                }
            }
        }
        let slots = maglev::build(&backends);
        let old: Option<types::maglev_table> = lookup(&self.maps.maglev, &0u32, "snas_maglev")?;
        let mut table = types::maglev_table {
            generation: old.map_or(1, |t| t.generation.wrapping_add(1)),
            ..Default::default()
        };
        table.slot.copy_from_slice(&slots);
        update(&self.maps.maglev, &0u32, &table, "snas_maglev")
    }

    /// Counters of one job (both directions).
    pub fn counters(&self, job_key: u64) -> Result<JobCounters, Tier1Error> {
        Ok(JobCounters {
            from_sandbox: self.dir_counters(job_key, Direction::FromSandbox)?,
            to_sandbox: self.dir_counters(job_key, Direction::ToSandbox)?,
        })
    }

    /// Drops not attributable to a job (unknown veth, untrusted GENEVE) are counted under job
    /// key 0.
    pub fn unattributed_counters(&self) -> Result<JobCounters, Tier1Error> {
        self.counters(0)
    }

    fn dir_counters(&self, job_key: u64, dir: Direction) -> Result<DirCounters, Tier1Error> {
        let mut out = DirCounters {
            forwarded: self.count(job_key, dir, 0)?,
            ..Default::default()
        };
        for r in Reason::ALL {
            let c = self.count(job_key, dir, u32::from(r.code()))?;
            if c.packets > 0 {
                out.drops.insert(r, c);
            }
        }
        Ok(out)
    }

    fn count(&self, job_key: u64, dir: Direction, reason: u32) -> Result<PacketCount, Tier1Error> {
        let key = types::counter_key {
            job_key,
            dir: dir as u32,
            reason,
        };
        let per_cpu = self
            .maps
            .counters
            .lookup_percpu(bytes_of(&key), MapFlags::ANY)
            .map_err(bpf_err("lookup snas_counters"))?;
        let mut total = PacketCount::default();
        for v in per_cpu.unwrap_or_default() {
            let c: types::counter_val =
                from_bytes(&v).ok_or(Tier1Error::ValueSize("snas_counters"))?;
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
        Ok(total)
    }

    fn state(&self, veth_ifindex: u32) -> Result<types::job_state, Tier1Error> {
        lookup(&self.maps.job_state, &veth_ifindex, "snas_job_state")?
            .ok_or(Tier1Error::UnknownJob(veth_ifindex))
    }

    /// Audit events suppressed by the per-job rate limit or a full ring.
    pub fn audit_suppressed(&self, veth_ifindex: u32) -> Result<u64, Tier1Error> {
        Ok(self.state(veth_ifindex)?.audit_suppressed)
    }

    /// Denied UDP datagrams of the job left without an ICMP answer by the per-job ICMP budget
    /// (`NodeConfig::icmp_budget`).
    pub fn icmp_suppressed(&self, veth_ifindex: u32) -> Result<u64, Tier1Error> {
        Ok(self.state(veth_ifindex)?.icmp_suppressed)
    }

    /// The job's open connections as tier 1 counts them for `max_connections`: BPF's count
    /// less the last ageing pass's correction (see [`Tier1::age_flows`]).
    pub fn live_flows(&self, veth_ifindex: u32) -> Result<u64, Tier1Error> {
        let open = self.conns_open(veth_ifindex)?;
        let bias: i64 = lookup(
            &self.maps.job_conns_bias,
            &veth_ifindex,
            "snas_job_conns_bias",
        )?
        .unwrap_or(0);
        Ok(u64::try_from(open.saturating_sub(bias)).unwrap_or(0))
    }

    /// BPF's admissions minus closes of a job (read under its lock).
    fn conns_open(&self, veth_ifindex: u32) -> Result<i64, Tier1Error> {
        let v = self
            .maps
            .job_conns
            .lookup(bytes_of(&veth_ifindex), MapFlags::LOCK)
            .map_err(bpf_err("lookup snas_job_conns"))?
            .ok_or(Tier1Error::UnknownJob(veth_ifindex))?;
        let c: types::job_conns = from_bytes(&v).ok_or(Tier1Error::ValueSize("snas_job_conns"))?;
        Ok(c.open)
    }

    /// The ageing pass (call it every few seconds): removes flow entries idle beyond their
    /// state's timeout ([`FlowTimeouts`], defaults equal to tier 2's conntrack: SYN sent 30 s,
    /// established 1 h, closing 60 s, closed 30 s, UDP 30 s unreplied / 120 s replied) and
    /// recounts each job's open connections, correcting what BPF cannot see end (idle
    /// timeouts, LRU evictions).
    ///
    /// The recount never overwrites BPF's counter: it reads each job's counter first, counts
    /// the open entries admitted before that read, and stores the difference as the job's
    /// bias; admissions and closes BPF makes meanwhile keep moving the counter. Every race
    /// (an entry closed or admitted while the pass runs) leaves the count low, never high:
    /// tier 1 may over-admit briefly, never under-admit.
    pub fn age_flows(&self, timeouts: &FlowTimeouts) -> Result<AgeingReport, Tier1Error> {
        let _w = self.writers();
        let now = saturating_ns(mono_now()?);
        let count_before = now.saturating_sub(saturating_ns(COUNT_MARGIN));
        let mut read_open = HashMap::<u32, i64>::new();
        for key in self.maps.job_conns.keys() {
            if let Some(idx) = from_bytes::<u32>(&key) {
                if let Ok(open) = self.conns_open(idx) {
                    read_open.insert(idx, open);
                }
            }
        }
        let mut report = AgeingReport::default();
        let mut counted = HashMap::<u32, i64>::new();
        let mut age =
            |key: &[u8], val: &[u8], ifindex: u32, proto: u8, doomed: &mut Vec<Vec<u8>>| {
                let Some(v) = from_bytes::<types::flow_val>(val) else {
                    return;
                };
                match flows::age_entry(
                    timeouts,
                    proto,
                    v.flags,
                    v.last_seen,
                    v.admitted,
                    now,
                    count_before,
                ) {
                    Ageing::Remove => doomed.push(key.to_vec()),
                    Ageing::KeepOpen => {
                        *counted.entry(ifindex).or_default() += 1;
                        report.kept += 1;
                        report.open += 1;
                    }
                    Ageing::Keep => report.kept += 1,
                }
            };
        let mut doomed = Vec::new();
        for_each_entry(&self.maps.flows, "snas_flows", |key, val| {
            if let Some(k) = from_bytes::<types::flow_key>(key) {
                age(key, val, k.ifindex, k.proto, &mut doomed);
            }
        })?;
        let mut doomed6 = Vec::new();
        for_each_entry(&self.maps.flows6, "snas_flows6", |key, val| {
            if let Some(k) = from_bytes::<types::flow6_key>(key) {
                age(key, val, k.ifindex, k.proto, &mut doomed6);
            }
        })?;
        for k in &doomed {
            if self.maps.flows.delete(k).is_ok() {
                report.removed += 1;
            }
        }
        for k in &doomed6 {
            if self.maps.flows6.delete(k).is_ok() {
                report.removed += 1;
            }
        }
        for (idx, open) in read_open {
            let bias = open - counted.get(&idx).copied().unwrap_or(0);
            update(
                &self.maps.job_conns_bias,
                &idx,
                &bias,
                "snas_job_conns_bias",
            )?;
        }
        Ok(report)
    }

    /// A reader of audit events; `on_event` is called from [`AuditReader::poll`].
    pub fn audit_reader<F>(&self, mut on_event: F) -> Result<AuditReader, Tier1Error>
    where
        F: FnMut(AuditEvent) + 'static,
    {
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&self.maps.audit, move |data: &[u8]| {
            if let Some(e) = AuditEvent::parse(data) {
                on_event(e);
            }
            0
        })
        .map_err(bpf_err("ring buffer add"))?;
        let rb = b.build().map_err(bpf_err("ring buffer build"))?;
        Ok(AuditReader { rb })
    }

    /// The last redirect recorded by a program loaded with `record_debug`.
    pub fn last_redirect(&self) -> Result<Option<DebugRecord>, Tier1Error> {
        let d: Option<types::debug_rec> = lookup(&self.maps.debug, &0u32, "snas_debug")?;
        Ok(d.filter(|d| d.redirect_kind != 0).map(|d| DebugRecord {
            ifindex: d.redirect_ifindex,
            kind: d.redirect_kind,
            proxy: d.proxy,
            flow_hash: d.flow_hash,
        }))
    }

    /// Clears the debug record.
    pub fn clear_debug(&self) -> Result<(), Tier1Error> {
        update(
            &self.maps.debug,
            &0u32,
            &types::debug_rec::default(),
            "snas_debug",
        )
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

    /// Detaches everything this node attached (every job's veth, the uplink) and removes the
    /// pins and the pin directory. The kernel frees the maps when the last user goes.
    pub fn teardown(self) -> Result<(), Tier1Error> {
        for key in self.maps.jobs.keys() {
            if let Some(idx) = from_bytes::<u32>(&key) {
                if self.attached(idx)? {
                    tc_detach(&self.sandbox_prog, idx, TC_INGRESS);
                    tc_detach(&self.sandbox_egress_prog, idx, TC_EGRESS);
                }
            }
        }
        if let Some(info) = lookup::<types::node_info>(&self.maps.node, &0u32, "snas_node")? {
            if info.uplink_ifindex != 0 {
                tc_detach(&self.uplink_prog, info.uplink_ifindex, TC_INGRESS);
            }
        }
        remove_pins(&self.pin_dir)
    }
}

/// Removes every pin in `dir` and the directory itself.
pub fn remove_pins(dir: &Path) -> Result<(), Tier1Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Tier1Error::PinDir {
                path: dir.into(),
                source,
            })
        }
    };
    for e in entries.flatten() {
        fs::remove_file(e.path()).map_err(|source| Tier1Error::PinDir {
            path: e.path(),
            source,
        })?;
    }
    fs::remove_dir(dir).map_err(|source| Tier1Error::PinDir {
        path: dir.into(),
        source,
    })
}

/// Mounts bpffs on `/sys/fs/bpf` if nothing is mounted there (needs root). Returns whether it
/// mounted.
pub fn ensure_bpffs() -> Result<bool, Tier1Error> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let path = c"/sys/fs/bpf";
    let mut st = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: path is a valid C string and st points to writable memory of the right size.
    let rc = unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc == 0 {
        // SAFETY: statfs succeeded and initialised st.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)]
        if st.f_type as i64 == BPF_FS_MAGIC {
            return Ok(false);
        }
    }
    // SAFETY: all pointers are valid C strings; data is null, allowed for bpffs.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Tier1Error::PinDir {
            path: PathBuf::from("/sys/fs/bpf"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(true)
}

/// Reader of the audit ring buffer.
pub struct AuditReader {
    rb: libbpf_rs::RingBuffer<'static>,
}

impl std::fmt::Debug for AuditReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditReader").finish_non_exhaustive()
    }
}

impl AuditReader {
    /// Waits up to `timeout` for events and delivers them to the callback.
    pub fn poll(&self, timeout: Duration) -> Result<(), Tier1Error> {
        self.rb.poll(timeout).map_err(bpf_err("ring buffer poll"))
    }

    /// Delivers every pending event without waiting.
    pub fn consume(&self) -> Result<(), Tier1Error> {
        self.rb.consume().map_err(bpf_err("ring buffer consume"))
    }

    /// File descriptor to wait on with epoll.
    pub fn epoll_fd(&self) -> i32 {
        self.rb.epoll_fd()
    }
}

fn cidr_key(job_key: u64, net: Ipv4Net) -> types::cidr_key {
    let net = net.trunc();
    types::cidr_key {
        prefixlen: 64 + u32::from(net.prefix_len()),
        job_hi: ((job_key >> 32) as u32).to_be(),
        job_lo: (job_key as u32).to_be(),
        ip: u32::from_ne_bytes(net.network().octets()),
    }
}

fn cidr6_key(job_key: u64, net: Ipv6Net) -> types::cidr6_key {
    let net = net.trunc();
    types::cidr6_key {
        prefixlen: 64 + u32::from(net.prefix_len()),
        job_hi: ((job_key >> 32) as u32).to_be(),
        job_lo: (job_key as u32).to_be(),
        ip: net.network().octets(),
    }
}

fn cidr_job(k: &types::cidr_key) -> u64 {
    (u64::from(u32::from_be(k.job_hi)) << 32) | u64::from(u32::from_be(k.job_lo))
}

/// A CIDR entry: rules without expiry.
fn dst_val(rules: &[PortRule], allow_private: bool) -> Result<types::dst_val, Tier1Error> {
    if rules.len() > MAX_PORT_RULES {
        return Err(Tier1Error::TooManyPortRules(rules.len()));
    }
    let mut v = types::dst_val {
        nrules: rules.len() as u32,
        flags: u32::from(allow_private),
        ..Default::default()
    };
    for (slot, r) in v.rules.iter_mut().zip(rules) {
        *slot = r.to_c(None);
    }
    Ok(v)
}

/// Whole CLOCK_MONOTONIC seconds of an expiry, rounded up (a rule never ends early), at least
/// 1 (0 means "no expiry" to the programs).
fn expiry_seconds(at: Duration) -> u32 {
    let s = at.as_secs() + u64::from(at.subsec_nanos() > 0);
    u32::try_from(s).unwrap_or(u32::MAX).max(1)
}

fn clocks() -> Result<Clocks, Tier1Error> {
    Ok(Clocks {
        wall: SystemTime::now(),
        mono: mono_now()?,
    })
}

fn update<K: Pod, V: Pod>(map: &MapHandle, k: &K, v: &V, name: &str) -> Result<(), Tier1Error> {
    map.update(bytes_of(k), bytes_of(v), MapFlags::ANY)
        .map_err(bpf_err(format!("update {name}")))
}

fn lookup<V: Pod>(
    map: &MapHandle,
    k: &impl Pod,
    name: &'static str,
) -> Result<Option<V>, Tier1Error> {
    match map
        .lookup(bytes_of(k), MapFlags::ANY)
        .map_err(bpf_err(format!("lookup {name}")))?
    {
        None => Ok(None),
        Some(b) => from_bytes(&b).map(Some).ok_or(Tier1Error::ValueSize(name)),
    }
}

/// Calls `f(key, value)` for every entry of a hash map, `AGE_BATCH` entries per
/// `bpf_map_lookup_batch`. (libbpf-rs 0.27's `lookup_batch` iterator ends at the first batch
/// shorter than asked, but the kernel returns short batches whenever the next bucket does not
/// fit: it would stop early. The end is ENOENT.) Entries inserted or deleted meanwhile may or
/// may not be seen, as with any iteration of a live map.
fn for_each_entry(
    map: &MapHandle,
    name: &'static str,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<(), Tier1Error> {
    let (ksz, vsz) = (map.key_size() as usize, map.value_size() as usize);
    let mut want = AGE_BATCH;
    let mut keys = vec![0u8; ksz * want as usize];
    let mut vals = vec![0u8; vsz * want as usize];
    // The batch position is opaque to userspace (a bucket index for hash maps), at most a key.
    let tok_len = ksz.max(8);
    let (mut tok_in, mut tok_out) = (vec![0u8; tok_len], vec![0u8; tok_len]);
    let mut first = true;
    let opts = libbpf_rs::libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    loop {
        let mut count = want;
        let in_batch = if first {
            std::ptr::null_mut()
        } else {
            tok_in.as_mut_ptr().cast()
        };
        // SAFETY: the fd is a live map; keys/vals hold `want` entries of the map's key and
        // value sizes, the tokens `tok_len` bytes, and `count` says how many entries fit; all
        // buffers outlive the call.
        let rc = unsafe {
            libbpf_rs::libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                in_batch,
                tok_out.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                vals.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let errno = if rc < 0 { -rc } else { 0 };
        if errno == libc::ENOSPC && count == 0 {
            // One bucket holds more entries than a batch: ask for more at once.
            want = want.saturating_mul(2);
            keys.resize(ksz * want as usize, 0);
            vals.resize(vsz * want as usize, 0);
            continue;
        }
        if errno != 0 && errno != libc::ENOENT {
            return Err(Tier1Error::Bpf {
                what: format!("lookup_batch {name}"),
                source: libbpf_rs::Error::from(io::Error::from_raw_os_error(errno)),
            });
        }
        let n = (count as usize).min(want as usize);
        for i in 0..n {
            f(&keys[i * ksz..(i + 1) * ksz], &vals[i * vsz..(i + 1) * vsz]);
        }
        if errno == libc::ENOENT {
            return Ok(());
        }
        std::mem::swap(&mut tok_in, &mut tok_out);
        first = false;
    }
}

fn delete_where<K: Pod>(map: &MapHandle, pred: impl Fn(&K) -> bool) {
    let doomed: Vec<Vec<u8>> = map
        .keys()
        .filter(|k| from_bytes::<K>(k).is_some_and(|k| pred(&k)))
        .collect();
    for k in doomed {
        let _ = map.delete(&k);
    }
}

/// Attaches `prog` at `point`. The clsact qdisc is created first (an existing one is fine;
/// libbpf then logs "Exclusivity flag on", which is harmless) when the point is ingress, so a
/// following egress attach on the same device does not ask again.
fn tc_attach(prog: &OwnedFd, ifindex: u32, point: TcAttachPoint) -> Result<(), Tier1Error> {
    let mut hook = TcHookBuilder::new(prog.as_fd())
        .ifindex(ifindex_i32(ifindex))
        .replace(true)
        .handle(TC_HANDLE)
        .priority(TC_PRIORITY)
        .hook(point);
    if point == TC_INGRESS {
        hook.create()
            .map_err(bpf_err(format!("create clsact on ifindex {ifindex}")))?;
    }
    hook.attach()
        .map_err(bpf_err(format!("attach to ifindex {ifindex}")))?;
    Ok(())
}

/// Best effort: the device may already be gone (veth deleted with its netns).
fn tc_detach(prog: &OwnedFd, ifindex: u32, point: TcAttachPoint) {
    let mut hook = TcHookBuilder::new(prog.as_fd())
        .ifindex(ifindex_i32(ifindex))
        .handle(TC_HANDLE)
        .priority(TC_PRIORITY)
        .hook(point);
    let _ = hook.detach();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier1_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tier1>();
    }

    #[test]
    fn cidr_key_carries_the_job_and_the_truncated_prefix() {
        let net: Ipv4Net = "203.0.113.77/24".parse().expect("net");
        let k = cidr_key(0x0102_0304_0506_0708, net);
        assert_eq!(k.prefixlen, 64 + 24);
        assert_eq!(cidr_job(&k), 0x0102_0304_0506_0708);
        assert_eq!(k.ip.to_ne_bytes(), [203, 0, 113, 0]);
        assert_eq!(k.job_hi.to_ne_bytes(), [1, 2, 3, 4]);
    }

    #[test]
    fn too_many_port_rules_are_refused() {
        let rules = vec![PortRule::all(crate::Proto::Any); MAX_PORT_RULES + 1];
        assert!(matches!(
            dst_val(&rules, false),
            Err(Tier1Error::TooManyPortRules(17))
        ));
        let v = dst_val(&rules[..2], true).expect("fits");
        assert_eq!((v.nrules, v.flags, v.rules[0].expires_s), (2, 1, 0));
    }

    #[test]
    fn rule_expiries_round_up_to_whole_seconds() {
        assert_eq!(expiry_seconds(Duration::from_secs(90)), 90);
        assert_eq!(expiry_seconds(Duration::from_millis(90_001)), 91);
        assert_eq!(expiry_seconds(Duration::ZERO), 1, "0 would mean never");
        assert_eq!(expiry_seconds(Duration::from_secs(u64::MAX / 2)), u32::MAX);
    }
}
